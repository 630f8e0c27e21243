//! Queues: a cloneable [`QueueHandle`] held by connections and the vhost, and
//! one actor task per queue that owns all queue state (ready messages,
//! unacked messages, consumers and their credit). No lock on queue state.
//!
//! One FIFO mailbox, so a channel's publish and its next `basic.get` (or
//! declare, purge, ...) reach the queue in the order they were sent. Publishes
//! need a permit from a per-queue semaphore first, and give it back when the
//! actor takes them: a publisher that outruns the queue is slowed (its
//! connection task waits, its socket stops being read, TCP pushes back).
//! Other messages need no permit; their volume is bounded by other means
//! (acks by prefetch, requests by their replies). The actor itself never
//! waits on anyone, so connections and queues cannot deadlock.
//!
//! Deliveries go to the consuming connection's event channel; each consumer
//! has an in-flight credit ([`FLOW_WINDOW`]) that the connection returns as it
//! writes deliveries to its socket, so a slow consumer's connection never
//! accumulates more than a window of deliveries.

use crate::connection::ConnEvent;
use crate::error::{access_refused, precondition, AmqpError};
use crate::message::MessageRef;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use warren_protocol::types::FieldTable;

/// Deliveries a consumer may have in its connection's mailbox, not yet written.
pub const FLOW_WINDOW: u32 = 512;
/// Publishes that may wait in a queue's mailbox.
pub const PUBLISH_PERMITS: usize = 1024;

/// Shared facts about a queue, immutable after declaration.
#[derive(Debug)]
pub struct QueueInfo {
    pub name: Arc<str>,
    pub id: u64,
    pub vhost: String,
    pub durable: bool,
    /// The owning connection of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// What connections and the vhost hold to talk to a queue.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    pub info: Arc<QueueInfo>,
    permits: Arc<Semaphore>,
    control: mpsc::UnboundedSender<Control>,
}

impl PartialEq for QueueHandle {
    fn eq(&self, other: &Self) -> bool {
        self.info.id == other.info.id
    }
}

impl QueueHandle {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn id(&self) -> u64 {
        self.info.id
    }
    /// Enqueue; waits while the queue's mailbox is full (back-pressure).
    /// A queue deleted meanwhile drops the message (and releases its confirm).
    pub async fn publish(&self, msg: MessageRef, confirm: Option<Arc<ConfirmTicket>>) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return; // the queue is gone
        };
        let _ = self.control.send(Control::Publish(Publish {
            msg,
            _confirm: confirm,
            _permit: permit,
        }));
    }
    /// Send a control message; false if the queue is gone.
    pub fn control(&self, c: Control) -> bool {
        self.control.send(c).is_ok()
    }
    /// Ask something and wait for the answer; None if the queue is gone.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.control(make(tx)) {
            return None;
        }
        rx.await.ok()
    }
}

/// A publish on its way into a queue. Holding the confirm ticket until the
/// message is stored is what makes the confirm mean "enqueued".
pub struct Publish {
    msg: MessageRef,
    _confirm: Option<Arc<ConfirmTicket>>,
    _permit: OwnedSemaphorePermit,
}

/// A publisher confirm outstanding on one or more queues: when the last
/// queue drops its clone, the publishing connection hears about it.
pub struct ConfirmTicket {
    pub conn: mpsc::UnboundedSender<ConnEvent>,
    pub chan_key: u64,
    pub seq: u64,
}

impl Drop for ConfirmTicket {
    fn drop(&mut self) {
        let _ = self.conn.send(ConnEvent::Confirm {
            chan_key: self.chan_key,
            seq: self.seq,
        });
    }
}

/// The prefetch shared by all consumers of a channel (`basic.qos global=true`).
#[derive(Debug, Default)]
pub struct ChannelCredit {
    /// 0: unlimited.
    pub limit: AtomicU32,
    pub unacked: AtomicU32,
}

impl ChannelCredit {
    /// Take one unit if under the limit.
    pub fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            self.unacked.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.unacked
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                (u < limit).then_some(u + 1)
            })
            .is_ok()
    }
    /// Return `n` units; true if the channel was at its limit (queues to wake).
    pub fn release(&self, n: u32) -> bool {
        if n == 0 {
            return false;
        }
        let prev = self
            .unacked
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or(0);
        let limit = self.limit.load(Ordering::Relaxed);
        limit != 0 && prev >= limit
    }
}

/// A consumer as the queue sees it.
pub struct Consumer {
    pub tag: Arc<str>,
    /// Identifies the channel incarnation (unique per broker run).
    pub chan_key: u64,
    pub channel: u16,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (0: unlimited).
    pub prefetch: u32,
    pub channel_credit: Arc<ChannelCredit>,
    /// Deliveries sent to the connection and not yet written to its socket.
    pub in_flight: Arc<AtomicU32>,
    pub conn: mpsc::UnboundedSender<ConnEvent>,
    /// `x-priority`: higher-priority consumers get messages first.
    pub priority: i32,
    /// Unacked deliveries of this consumer (queue-side count); starts at 0.
    pub unacked: u32,
}

/// A message fetched by `basic.get`.
pub struct Got {
    pub msg: MessageRef,
    pub seq: u64,
    pub redelivered: bool,
    /// Ready messages left after this one.
    pub remaining: u32,
}

/// What a queue's mailbox carries.
pub enum Control {
    Publish(Publish),
    Consume {
        consumer: Consumer,
        reply: oneshot::Sender<Result<(), AmqpError>>,
    },
    /// Remove a consumer; the connection hears `CancelOk` through its event
    /// channel, after every delivery the queue made to that consumer.
    Cancel {
        chan_key: u64,
        tag: Arc<str>,
    },
    Ack {
        chan_key: u64,
        seqs: Vec<u64>,
    },
    Reject {
        chan_key: u64,
        seqs: Vec<u64>,
        requeue: bool,
    },
    Get {
        chan_key: u64,
        no_ack: bool,
        reply: oneshot::Sender<Option<Got>>,
    },
    /// The channel closed: drop its consumers, requeue its unacked messages.
    ChannelClosed {
        chan_key: u64,
    },
    /// `basic.recover requeue=true`: requeue the channel's unacked messages.
    Recover {
        chan_key: u64,
    },
    /// Credit came back (in-flight window or channel prefetch): try again.
    Wake,
    Stats {
        reply: oneshot::Sender<(u32, u32)>,
    },
    Purge {
        reply: oneshot::Sender<u32>,
    },
    /// Delete if the conditions hold; replies with the ready count.
    Delete {
        if_unused: bool,
        if_empty: bool,
        reply: oneshot::Sender<Result<u32, AmqpError>>,
    },
}

/// Called by the actor when it deletes itself (auto-delete).
pub type OnAutoDelete = Box<dyn FnOnce(&QueueInfo) + Send>;

struct Entry {
    seq: u64,
    msg: MessageRef,
    redelivered: bool,
}

struct Unacked {
    entry: Entry,
    chan_key: u64,
    /// None for `basic.get` deliveries.
    tag: Option<Arc<str>>,
}

/// The state one queue actor owns.
struct Actor {
    info: Arc<QueueInfo>,
    /// Ready messages in sequence order.
    ready: VecDeque<Entry>,
    /// Delivered, awaiting ack, by sequence.
    unacked: HashMap<u64, Unacked>,
    consumers: Vec<Consumer>,
    /// Round-robin position in `consumers`.
    next_consumer: usize,
    /// Next sequence number to assign.
    next_seq: u64,
    /// Whether a consumer ever subscribed (auto-delete needs one first).
    had_consumer: bool,
    on_auto_delete: Option<OnAutoDelete>,
}

/// Start a queue actor; returns its handle.
pub fn spawn(info: QueueInfo, on_auto_delete: OnAutoDelete) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PUBLISH_PERMITS));
    let (ctx, crx) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    let actor = Actor {
        info: info.clone(),
        ready: VecDeque::new(),
        unacked: HashMap::new(),
        consumers: Vec::new(),
        next_consumer: 0,
        next_seq: 1,
        had_consumer: false,
        on_auto_delete: Some(on_auto_delete),
    };
    let span = tracing::debug_span!("queue", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(crx, permits.clone()),
        span,
    ));
    QueueHandle {
        info,
        permits,
        control: ctx,
    }
}

/// How many mailbox messages one wake-up takes before dispatching.
const BATCH: usize = 256;

impl Actor {
    async fn run(mut self, mut mailbox: mpsc::UnboundedReceiver<Control>, permits: Arc<Semaphore>) {
        'life: while let Some(c) = mailbox.recv().await {
            if self.on_control(c) {
                break;
            }
            for _ in 1..BATCH {
                match mailbox.try_recv() {
                    Ok(c) => {
                        if self.on_control(c) {
                            break 'life;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.dispatch();
        }
        // Publishers waiting for a permit give up; later sends fail.
        permits.close();
        mailbox.close();
        tracing::debug!("queue stopped");
    }

    fn enqueue(&mut self, p: Publish) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready.push_back(Entry {
            seq,
            msg: p.msg,
            redelivered: false,
        });
        // `p._confirm` drops here: enqueued in memory is the promise for now.
    }

    /// Hand ready messages to consumers with credit, round robin.
    fn dispatch(&mut self) {
        while !self.ready.is_empty() {
            let Some(i) = self.pick() else { break };
            let Some(entry) = self.ready.pop_front() else {
                break;
            };
            let c = &mut self.consumers[i];
            c.in_flight.fetch_add(1, Ordering::AcqRel);
            let ev = ConnEvent::Deliver {
                chan_key: c.chan_key,
                channel: c.channel,
                tag: c.tag.clone(),
                msg: entry.msg.clone(),
                redelivered: entry.redelivered,
                seq: entry.seq,
                queue: self.info.id,
                in_flight: c.in_flight.clone(),
            };
            if c.conn.send(ev).is_err() {
                // The connection is gone; its ChannelClosed is on the way.
                self.ready.push_front(entry);
                break;
            }
            if !c.no_ack {
                c.unacked += 1;
                let u = Unacked {
                    entry,
                    chan_key: c.chan_key,
                    tag: Some(c.tag.clone()),
                };
                self.unacked.insert(u.entry.seq, u);
            }
        }
    }

    /// The consumer to deliver to next: the highest priority level that has
    /// a consumer with credit, round robin within it. Takes the channel
    /// prefetch unit for the chosen consumer.
    fn pick(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        let mut start = 0;
        while start < n {
            let p = self.consumers[start].priority;
            let len = self.consumers[start..]
                .iter()
                .take_while(|c| c.priority == p)
                .count();
            for k in 0..len {
                let i = start + (self.next_consumer + k) % len;
                let c = &self.consumers[i];
                let window_ok = c.in_flight.load(Ordering::Acquire) < FLOW_WINDOW;
                let prefetch_ok = c.no_ack || c.prefetch == 0 || c.unacked < c.prefetch;
                if window_ok && prefetch_ok && (c.no_ack || c.channel_credit.try_acquire()) {
                    self.next_consumer = self.next_consumer.wrapping_add(k + 1);
                    return Some(i);
                }
            }
            start += len;
        }
        None
    }

    /// Put messages back in sequence order, marked redelivered.
    fn requeue(&mut self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| e.seq);
        for mut e in entries.into_iter().rev() {
            e.redelivered = true;
            let pos = self.ready.partition_point(|r| r.seq < e.seq);
            self.ready.insert(pos, e);
        }
    }

    fn settle(&mut self, chan_key: u64, seq: u64) -> Option<Entry> {
        match self.unacked.get(&seq) {
            Some(u) if u.chan_key == chan_key => {}
            _ => return None,
        }
        let u = self.unacked.remove(&seq)?;
        if let Some(tag) = &u.tag {
            if let Some(c) = self
                .consumers
                .iter_mut()
                .find(|c| c.chan_key == chan_key && &c.tag == tag)
            {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
        Some(u.entry)
    }

    fn take_channel_unacked(&mut self, chan_key: u64) -> Vec<Entry> {
        let seqs: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.chan_key == chan_key)
            .map(|(s, _)| *s)
            .collect();
        seqs.into_iter()
            .filter_map(|s| self.settle(chan_key, s))
            .collect()
    }

    /// Returns true when the actor should stop.
    fn on_control(&mut self, c: Control) -> bool {
        match c {
            Control::Publish(p) => self.enqueue(p),
            Control::Consume { consumer, reply } => {
                let name = &self.info.name;
                let vhost = &self.info.vhost;
                if consumer.exclusive && !self.consumers.is_empty()
                    || self.consumers.iter().any(|c| c.exclusive)
                {
                    let _ = reply.send(Err(access_refused(format!(
                        "queue '{name}' in vhost '{vhost}' in exclusive use"
                    ))));
                    return false;
                }
                // Keep consumers ordered by priority, highest first.
                let pos = self
                    .consumers
                    .partition_point(|c| c.priority >= consumer.priority);
                self.consumers.insert(pos, consumer);
                self.had_consumer = true;
                let _ = reply.send(Ok(()));
            }
            Control::Cancel { chan_key, tag } => {
                if let Some(pos) = self
                    .consumers
                    .iter()
                    .position(|c| c.chan_key == chan_key && c.tag == tag)
                {
                    let c = self.consumers.remove(pos);
                    let _ = c.conn.send(ConnEvent::CancelOk { chan_key, tag });
                }
                return self.maybe_auto_delete();
            }
            Control::Ack { chan_key, seqs } => {
                for s in seqs {
                    self.settle(chan_key, s);
                }
            }
            Control::Reject {
                chan_key,
                seqs,
                requeue,
            } => {
                let entries: Vec<Entry> = seqs
                    .into_iter()
                    .filter_map(|s| self.settle(chan_key, s))
                    .collect();
                if requeue {
                    self.requeue(entries);
                }
            }
            Control::Get {
                chan_key,
                no_ack,
                reply,
            } => {
                let got = self.ready.pop_front().map(|e| {
                    let g = Got {
                        msg: e.msg.clone(),
                        seq: e.seq,
                        redelivered: e.redelivered,
                        remaining: self.ready.len() as u32,
                    };
                    if !no_ack {
                        self.unacked.insert(
                            e.seq,
                            Unacked {
                                entry: e,
                                chan_key,
                                tag: None,
                            },
                        );
                    }
                    g
                });
                if let Err(Some(g)) = reply.send(got) {
                    // The asker went away: put the message back untouched.
                    if let Some(u) = self.unacked.remove(&g.seq) {
                        self.ready.push_front(u.entry);
                    } else if no_ack {
                        self.ready.push_front(Entry {
                            seq: g.seq,
                            msg: g.msg,
                            redelivered: g.redelivered,
                        });
                    }
                }
            }
            Control::ChannelClosed { chan_key } => {
                self.consumers.retain(|c| c.chan_key != chan_key);
                let back = self.take_channel_unacked(chan_key);
                self.requeue(back);
                return self.maybe_auto_delete();
            }
            Control::Recover { chan_key } => {
                let back = self.take_channel_unacked(chan_key);
                self.requeue(back);
            }
            Control::Wake => {}
            Control::Stats { reply } => {
                let _ = reply.send((self.ready.len() as u32, self.consumers.len() as u32));
            }
            Control::Purge { reply } => {
                let n = self.ready.len() as u32;
                self.ready.clear();
                let _ = reply.send(n);
            }
            Control::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let name = &self.info.name;
                let vhost = &self.info.vhost;
                if if_unused && !self.consumers.is_empty() {
                    let _ = reply.send(Err(precondition(format!(
                        "queue '{name}' in vhost '{vhost}' in use"
                    ))));
                    return false;
                }
                if if_empty && !self.ready.is_empty() {
                    let _ = reply.send(Err(precondition(format!(
                        "queue '{name}' in vhost '{vhost}' is not empty"
                    ))));
                    return false;
                }
                let _ = reply.send(Ok(self.ready.len() as u32));
                self.cancel_all();
                return true;
            }
        }
        false
    }

    /// Tell every consumer's connection that the queue is gone.
    fn cancel_all(&mut self) {
        for c in self.consumers.drain(..) {
            let _ = c.conn.send(ConnEvent::Cancelled {
                chan_key: c.chan_key,
                tag: c.tag.clone(),
            });
        }
    }

    fn maybe_auto_delete(&mut self) -> bool {
        if self.info.auto_delete && self.had_consumer && self.consumers.is_empty() {
            if let Some(f) = self.on_auto_delete.take() {
                f(&self.info);
            }
            return true;
        }
        false
    }
}
