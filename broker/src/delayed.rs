//! Delayed messages, with the API of `rabbitmq-delayed-message-exchange`: an
//! exchange of type `x-delayed-message` (its `x-delayed-type` says how it
//! routes) holds a message with an `x-delay` header (ms, > 0) until it is
//! due, then routes it as an exchange of that type would.
//!
//! One scheduler task per broker keeps the messages due next in memory, by
//! due time. A persistent message published to a durable delayed exchange
//! is stored first (its body and a `due ‖ id` entry, in one batch, confirmed
//! after the sync): the scheduler keeps only a window of the next due ones
//! ([`WINDOW`]) and reads the rest back from the store, in due order, as the
//! window drains, so memory stays flat with millions pending, and they
//! survive a crash. Others (transient, or a non-durable exchange) live in
//! memory only and go with a restart, as they would in a queue.
//!
//! At its due time (within a few ms: the task sleeps until the first due),
//! a message is routed through its exchange now: to the queues bound now,
//! else to the exchange's alternate exchange, else it is counted
//! ([`UNROUTABLE`]) and dropped. A stored one goes to its queues in one
//! batch that also removes its delayed entry: it is delivered or still
//! delayed, never both, never neither.
//!
//! The window's invariant: every stored entry up to `loaded` is in memory;
//! entries after it may be only on disk (`more_on_disk`). A new stored entry
//! due after `loaded` stays on disk (unless a read is under way: then it is
//! kept, and the read's copy of it, like those of entries fired meanwhile,
//! is ignored).

use crate::broker::Broker;
use crate::message::{unix_ms, Message, MessageRef};
use crate::queue::QueueHandle;
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use warren_storage::MessageOp;

/// Stored delayed messages kept in memory at most.
pub const WINDOW: usize = 10_000;
/// A window this small asks for more from the store.
const LOW: usize = WINDOW / 2;

/// Delayed messages that routed nowhere at their due time (and had no
/// alternate exchange): dropped and counted.
pub static UNROUTABLE: AtomicU64 = AtomicU64::new(0);
/// Delayed messages accepted so far.
pub static DELAYED: AtomicU64 = AtomicU64::new(0);
/// Delayed messages sent on at their due time so far.
pub static SENT: AtomicU64 = AtomicU64::new(0);

/// The `x-delay` header: Some(ms) when it is an integer > 0 (anything else
/// routes at once, as with the plugin).
pub fn delay_of(msg: &Message) -> Option<u64> {
    if !msg.header.has_headers() {
        return None;
    }
    let h = msg.header.headers()?;
    let ms = crate::fields::as_int(h.inner().get("x-delay")?)?;
    (ms > 0).then(|| ms.min(i128::from(u64::MAX)) as u64)
}

/// Where a delayed message goes: vhost and exchange.
fn encode_target(vhost: &str, exchange: &str) -> Bytes {
    let mut b = Vec::with_capacity(vhost.len() + exchange.len() + 1);
    b.extend_from_slice(vhost.as_bytes());
    b.push(0);
    b.extend_from_slice(exchange.as_bytes());
    b.into()
}

fn decode_target(b: &[u8]) -> Option<(String, String)> {
    let i = b.iter().position(|&c| c == 0)?;
    Some((
        String::from_utf8(b[..i].to_vec()).ok()?,
        String::from_utf8(b[i + 1..].to_vec()).ok()?,
    ))
}

struct Entry {
    vhost: String,
    msg: MessageRef,
    /// In the store (key `due ‖ msg.stored`).
    stored: bool,
}

/// Entries read back from the store (None: its body could not be read,
/// e.g. it was sent on while the read was under way), and whether the read
/// was full (more may follow).
type Loaded = (Vec<(u64, u64, Option<Entry>)>, bool);

enum Cmd {
    Add { due: u64, entry: Entry },
    Loaded(Result<Loaded, String>),
}

/// The handle publishers hand delayed messages to.
pub struct Delays {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Ids for messages that are not stored (their key's second half).
    next_volatile: AtomicU64,
}

impl Delays {
    /// The handle and the receiver for [`run`].
    pub fn new() -> (Delays, DelayInbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Delays {
                tx,
                next_volatile: AtomicU64::new(1),
            },
            DelayInbox(rx),
        )
    }

    /// The store writes of a message delayed on a durable exchange
    /// (`msg.stored` set): its body and entry, to go in one batch.
    pub fn store_ops(msg: &Message, due: u64, vhost: &str) -> Vec<MessageOp> {
        let Some(id) = msg.stored else {
            return Vec::new();
        };
        vec![
            MessageOp::PutMessage {
                id,
                refs: 1,
                message: msg.to_stored(),
            },
            MessageOp::PutDelayed {
                due,
                id,
                target: encode_target(vhost, msg.exchange.as_str()),
            },
        ]
    }

    /// Hold `msg` until `due` (Unix ms). `stored`: its [`Delays::store_ops`]
    /// were submitted.
    pub fn add(&self, vhost: &str, msg: MessageRef, due: u64, stored: bool) {
        DELAYED.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Cmd::Add {
            due,
            entry: Entry {
                vhost: vhost.to_owned(),
                msg,
                stored,
            },
        });
    }

    fn volatile_id(&self) -> u64 {
        // High bit set: never a store id.
        self.next_volatile.fetch_add(1, Ordering::Relaxed) | (1 << 63)
    }
}

pub struct DelayInbox(mpsc::UnboundedReceiver<Cmd>);

struct Scheduler {
    broker: Weak<Broker>,
    /// Due → message, stored ones (up to `loaded`) and volatile ones.
    window: BTreeMap<(u64, u64), Entry>,
    stored_in_window: usize,
    /// Every stored entry up to here is in `window` (None: none loaded yet).
    loaded: Option<(u64, u64)>,
    more_on_disk: bool,
    reading: bool,
    /// Stored entries fired while a read was under way (the read may
    /// return them again).
    fired_while_reading: HashSet<(u64, u64)>,
    /// Its own mailbox, for read results (weak: the mailbox closes, and the
    /// task ends, when the broker's handle goes).
    me: mpsc::WeakUnboundedSender<Cmd>,
}

/// The scheduler task: runs until the broker is gone.
pub async fn run(broker: Weak<Broker>, inbox: DelayInbox) {
    let Some(b) = broker.upgrade() else { return };
    let me = b.delayed.tx.downgrade();
    drop(b);
    let mut s = Scheduler {
        broker,
        window: BTreeMap::new(),
        stored_in_window: 0,
        loaded: None,
        more_on_disk: true,
        reading: false,
        fired_while_reading: HashSet::new(),
        me,
    };
    let mut rx = inbox.0;
    loop {
        s.maybe_read();
        let next = s.window.keys().next().map(|k| k.0);
        let wait = match next {
            Some(due) => Duration::from_millis(due.saturating_sub(unix_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            c = rx.recv() => match c {
                Some(c) => s.on_cmd(c),
                None => return,
            },
            () = tokio::time::sleep(wait), if !wait.is_zero() => {}
            () = std::future::ready(()), if wait.is_zero() => {}
        }
        if !s.fire_due() {
            return;
        }
    }
}

impl Scheduler {
    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Add { due, entry } => {
                let id = match (entry.stored, entry.msg.stored) {
                    (true, Some(id)) => id,
                    _ => match self.broker.upgrade() {
                        Some(b) => b.delayed.volatile_id(),
                        None => return,
                    },
                };
                let key = (due, id);
                if self.window.contains_key(&key) {
                    return; // read back from the store already
                }
                if entry.stored {
                    let beyond = self.more_on_disk && self.loaded.is_none_or(|l| key > l);
                    if beyond && !self.reading {
                        return; // on disk; read back when its turn comes
                    }
                    self.stored_in_window += 1;
                }
                self.window.insert(key, entry);
                self.trim();
            }
            Cmd::Loaded(r) => {
                self.reading = false;
                let fired = std::mem::take(&mut self.fired_while_reading);
                match r {
                    Ok((entries, full)) => {
                        for (due, id, e) in entries {
                            let key = (due, id);
                            self.loaded = Some(self.loaded.map_or(key, |l| l.max(key)));
                            if fired.contains(&key) || self.window.contains_key(&key) {
                                continue;
                            }
                            let Some(e) = e else {
                                tracing::error!(
                                    id,
                                    "a delayed message's entry or body is unreadable; skipped"
                                );
                                continue;
                            };
                            self.stored_in_window += 1;
                            self.window.insert(key, e);
                        }
                        self.more_on_disk = full;
                        self.trim();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading delayed messages back failed");
                    }
                }
            }
        }
    }

    fn read_limit(&self) -> usize {
        WINDOW - LOW
    }

    /// Too many stored entries in memory: the latest due go back to being
    /// only on disk.
    fn trim(&mut self) {
        while self.stored_in_window > WINDOW && !self.reading {
            let last = self
                .window
                .iter()
                .rev()
                .find(|(_, e)| e.stored)
                .map(|(k, _)| *k);
            let Some(k) = last else { break };
            self.window.remove(&k);
            self.stored_in_window -= 1;
            self.more_on_disk = true;
            // k was the latest in memory: what was covered stays covered
            // up to just before it. (Entries past the covered range that
            // came in during a read are in memory but not covered: evicting
            // one leaves the coverage as it was.)
            let before_k = match k.1 {
                0 => (k.0.saturating_sub(1), u64::MAX),
                id => (k.0, id - 1),
            };
            self.loaded = self.loaded.map(|l| l.min(before_k));
        }
    }

    /// Ask the store for the next stored entries when the window runs low.
    /// (Also when every stored entry left in memory lies past the covered
    /// range: entries on disk may be due before them.)
    fn maybe_read(&mut self) {
        if self.reading || !self.more_on_disk {
            return;
        }
        let covered_left = self
            .loaded
            .is_some_and(|l| self.window.range(..=l).any(|(_, e)| e.stored));
        if self.stored_in_window >= LOW && covered_left {
            return;
        }
        let (Some(b), Some(me)) = (self.broker.upgrade(), self.me.upgrade()) else {
            return;
        };
        self.reading = true;
        let p = b.persister.clone();
        let since = p.submitted();
        let after = self.loaded;
        let limit = self.read_limit();
        tokio::task::spawn_blocking(move || {
            let r = p.read_delayed(after, limit, since).map(|rows| {
                let full = rows.len() >= limit;
                let entries = rows
                    .into_iter()
                    .map(|((due, id, target), msg)| {
                        let entry = match (decode_target(&target), msg) {
                            (Some((vhost, _exchange)), Some(msg)) => Some(Entry {
                                vhost,
                                msg: Arc::new(msg),
                                stored: true,
                            }),
                            _ => None,
                        };
                        (due, id, entry)
                    })
                    .collect();
                (entries, full)
            });
            let _ = me.send(Cmd::Loaded(r));
        });
    }

    /// Send on every message that is due. False when the broker is gone.
    fn fire_due(&mut self) -> bool {
        let Some(b) = self.broker.upgrade() else {
            return false;
        };
        let now = unix_ms();
        while let Some((&key, _)) = self.window.iter().next() {
            if key.0 > now {
                break;
            }
            let Some(e) = self.window.remove(&key) else {
                break;
            };
            if e.stored {
                self.stored_in_window -= 1;
                if self.reading {
                    self.fired_while_reading.insert(key);
                }
            }
            send_on(&b, key, e);
        }
        true
    }
}

/// Route a due message through its exchange now and hand it to its
/// queues (without waiting: like a dead letter, it takes no mailbox slot).
fn send_on(b: &Broker, key: (u64, u64), e: Entry) {
    SENT.fetch_add(1, Ordering::Relaxed);
    let mut ops = Vec::new();
    if e.stored {
        ops.push(MessageOp::RemoveDelayed {
            due: key.0,
            id: key.1,
        });
    }
    let queues = match b.vhost(&e.vhost) {
        Some(v) => match v.route(&e.msg.exchange, &e.msg.routing_key, &e.msg.header) {
            Ok(r) => r.queues().to_vec(),
            Err(err) => {
                tracing::debug!(error = %err, "delayed message dropped at its due time");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    if queues.is_empty() {
        UNROUTABLE.fetch_add(1, Ordering::Relaxed);
        if !ops.is_empty() {
            b.persister.submit_nowait(ops);
        }
        return;
    }
    // A fresh copy for the queues (the delayed one's body goes with its
    // entry), stored for the durable ones in the batch that removes it.
    let msg = Message {
        exchange: e.msg.exchange.clone(),
        routing_key: e.msg.routing_key.clone(),
        header: e.msg.header.clone(),
        body: e.msg.body.clone(),
        stored: None,
    };
    let targets: Vec<&QueueHandle> = queues.iter().collect();
    crate::queue::send_unreserved(Some(&b.persister), msg, &targets, ops);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip() {
        let t = encode_target("/", "delayed.x");
        assert_eq!(decode_target(&t), Some(("/".into(), "delayed.x".into())));
        assert_eq!(decode_target(b"no separator"), None);
    }
}
