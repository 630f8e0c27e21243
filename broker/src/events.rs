//! What queues tell connections: deliveries, confirms and consumer
//! cancellations travel as [`ConnEvent`]s on the connection's mailbox. This
//! module sits below both queues and connections, so a queue never imports
//! the connection layer.

use crate::message::MessageRef;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What queues (and confirm tickets) tell a connection.
pub enum ConnEvent {
    Deliver {
        chan_key: u64,
        channel: u16,
        tag: Arc<str>,
        msg: MessageRef,
        redelivered: bool,
        seq: u64,
        queue: u64,
        in_flight: Arc<AtomicU32>,
    },
    /// Several deliveries to one consumer, in order: what a queue hands it
    /// in one wake-up travels as one event (one mailbox push, one clone of
    /// the tag and of the flow counter, which counts every message in it).
    DeliverMany {
        chan_key: u64,
        channel: u16,
        tag: Arc<str>,
        /// (message, redelivered, queue sequence)
        items: Vec<(MessageRef, bool, u64)>,
        in_flight: Arc<AtomicU32>,
    },
    /// A publish is enqueued on every queue it was routed to (`nack`: a
    /// queue refused it, e.g. `x-overflow: reject-publish`).
    Confirm { chan_key: u64, seq: u64, nack: bool },
    /// Several of those for one channel at once: `(seq, nack)` in the
    /// order they were settled.
    Confirms {
        chan_key: u64,
        seqs: Vec<(u64, bool)>,
    },
    /// The queue removed a consumer at the client's request.
    CancelOk { chan_key: u64, tag: Arc<str> },
    /// The queue went away under a consumer.
    Cancelled { chan_key: u64, tag: Arc<str> },
    /// A delivery on the channel was not acknowledged within `timeout`
    /// ms. `tag`: the queue cancelled that consumer and took back its
    /// unacked messages (`returned`, sequences in queue `queue`); None: the
    /// channel is to be closed with 406 (its messages come back with it).
    TimedOut {
        chan_key: u64,
        tag: Option<Arc<str>>,
        timeout: u64,
        queue: u64,
        returned: Box<[u64]>,
    },
    /// Close the connection (an operator closed it, or its vhost was
    /// deleted): connection.close with this code and text.
    Close { code: u16, text: String },
    /// Describe the open channels (for operators).
    Describe {
        reply: tokio::sync::oneshot::Sender<Vec<ChannelInfo>>,
    },
    /// A direct reply-to message for this connection's reply consumer.
    Reply {
        chan_key: u64,
        channel: u16,
        tag: Arc<str>,
        msg: MessageRef,
    },
}

/// A channel, as operators see it.
#[derive(Clone, Debug)]
pub struct ChannelInfo {
    pub number: u16,
    pub consumers: u32,
    pub unacked: u64,
    /// Per-consumer prefetch for new consumers.
    pub prefetch: u16,
    /// Channel-wide prefetch (`global`); 0: none.
    pub global_prefetch: u32,
    pub confirm: bool,
    pub transactional: bool,
}

/// A publisher confirm outstanding on one or more holders: every queue the
/// message was routed to holds a clone until it has taken the message, and
/// the store writer one until the message is synced. Each holder calls
/// [`ConfirmTicket::settle`] when its part is done; the last one sends the
/// confirm (an ack, or a nack if anyone refused the message).
///
/// A ticket dropped without `settle` (a queue deleted with the message still
/// in its mailbox, the store shut down under it) settles as its holder would
/// have, so a publisher is never left waiting; that is the teardown path, and
/// every ordinary path settles explicitly.
pub struct ConfirmTicket {
    pub conn: mpsc::UnboundedSender<ConnEvent>,
    pub chan_key: u64,
    pub seq: u64,
    /// Set by a holder that refused the message (`x-overflow`
    /// reject-publish, a failed store write): the publisher then gets
    /// `basic.nack` instead of `basic.ack`.
    pub nacked: AtomicBool,
    /// The confirm went out (through `settle`).
    sent: bool,
    /// Run if the confirm turns out a nack (a deduplicating exchange
    /// forgets the key of a refused publish, so its retry goes through).
    pub on_nack: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl ConfirmTicket {
    pub fn new(conn: mpsc::UnboundedSender<ConnEvent>, chan_key: u64, seq: u64) -> Self {
        ConfirmTicket {
            conn,
            chan_key,
            seq,
            nacked: AtomicBool::new(false),
            sent: false,
            on_nack: std::sync::Mutex::new(None),
        }
    }

    /// Mark the publish refused: the confirm becomes a `basic.nack`.
    pub fn nack(&self) {
        self.nacked.store(true, Ordering::Relaxed);
    }

    /// This holder is done with the message; the last holder to settle
    /// sends the confirm.
    pub fn settle(self: Arc<Self>) {
        if let Some(mut t) = Arc::into_inner(self) {
            t.send();
            t.sent = true;
        }
    }

    /// `settle` for many tickets at once (a stream's batch of appends):
    /// the confirms that are due go to each channel as one event per run
    /// of tickets of that channel (a `Confirm` for a run of one).
    pub fn settle_all(tickets: impl IntoIterator<Item = Arc<Self>>) {
        // The channel's connection, its key, and its confirms so far.
        type Run = (mpsc::UnboundedSender<ConnEvent>, u64, Vec<(u64, bool)>);
        let mut run: Option<Run> = None;
        let flush = |run: Option<Run>| {
            let Some((conn, chan_key, seqs)) = run else {
                return;
            };
            let ev = match seqs[..] {
                [(seq, nack)] => ConnEvent::Confirm {
                    chan_key,
                    seq,
                    nack,
                },
                _ => ConnEvent::Confirms { chan_key, seqs },
            };
            let _ = conn.send(ev);
        };
        for t in tickets {
            let Some(mut t) = Arc::into_inner(t) else {
                continue;
            };
            t.sent = true;
            let nack = t.take_nack();
            match &mut run {
                Some((conn, key, seqs)) if *key == t.chan_key && conn.same_channel(&t.conn) => {
                    seqs.push((t.seq, nack));
                }
                _ => {
                    flush(run.take());
                    run = Some((t.conn.clone(), t.chan_key, vec![(t.seq, nack)]));
                }
            }
        }
        flush(run);
    }

    /// Whether the confirm is a nack; runs the nack hook if so.
    fn take_nack(&mut self) -> bool {
        let nack = self.nacked.load(Ordering::Relaxed);
        if nack {
            let hook = self
                .on_nack
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(f) = hook {
                f();
            }
        }
        nack
    }

    fn send(&mut self) {
        let nack = self.take_nack();
        let _ = self.conn.send(ConnEvent::Confirm {
            chan_key: self.chan_key,
            seq: self.seq,
            nack,
        });
    }
}

impl Drop for ConfirmTicket {
    fn drop(&mut self) {
        // Reached only when the last holder dropped its clone without
        // settling (teardown): confirm all the same.
        if !self.sent {
            self.send();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirms(rx: &mut mpsc::UnboundedReceiver<ConnEvent>) -> Vec<(u64, Vec<(u64, bool)>)> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                ConnEvent::Confirms { chan_key, seqs } => out.push((chan_key, seqs)),
                ConnEvent::Confirm {
                    chan_key,
                    seq,
                    nack,
                } => out.push((chan_key, vec![(seq, nack)])),
                _ => panic!("not a confirm"),
            }
        }
        out
    }

    #[test]
    fn settling_many_tickets_sends_one_event_per_run_of_a_channel() {
        let (a, mut rx_a) = mpsc::unbounded_channel();
        let (b, mut rx_b) = mpsc::unbounded_channel();
        let t = |conn: &mpsc::UnboundedSender<ConnEvent>, key, seq| {
            Arc::new(ConfirmTicket::new(conn.clone(), key, seq))
        };
        let refused = t(&a, 1, 3);
        refused.nack();
        // Held by another queue too: its confirm waits for that one.
        let shared = t(&a, 1, 4);
        let other_holder = shared.clone();
        let tickets = vec![
            t(&a, 1, 1),
            t(&a, 1, 2),
            refused,
            shared,
            t(&a, 2, 1),
            t(&b, 1, 1),
            t(&a, 1, 5),
        ];
        ConfirmTicket::settle_all(tickets);
        assert_eq!(
            confirms(&mut rx_a),
            vec![
                (1, vec![(1, false), (2, false), (3, true)]),
                (2, vec![(1, false)]),
                (1, vec![(5, false)])
            ]
        );
        assert_eq!(confirms(&mut rx_b), vec![(1, vec![(1, false)])]);
        other_holder.settle();
        assert_eq!(confirms(&mut rx_a), vec![(1, vec![(4, false)])]);
    }
}
