//! What the rest of the broker holds to talk to a queue: the cloneable
//! [`QueueHandle`] and the mailbox it sends into, [`QueueCmd`]. Also the
//! types that travel through the mailbox (a [`Publish`], a [`Consumer`], a
//! [`Got`] answer) and a channel's shared prefetch ([`ChannelCredit`]), which
//! the channel and the queues it delivers from both count against.

use super::QueueInfo;
use crate::error::AmqpError;
use crate::events::{ConfirmTicket, ConnEvent};
use crate::message::MessageRef;
use crate::persist::Page;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore, TryAcquireError};

/// What connections and the vhost hold to talk to a queue. One `Arc`, so
/// that the clone every delivery keeps (for its ack) is one counter bump.
#[derive(Clone, Debug)]
pub struct QueueHandle(Arc<HandleInner>);

#[derive(Debug)]
pub struct HandleInner {
    pub info: Arc<QueueInfo>,
    /// Mailbox slots for publishes (back-pressure). A publisher forgets the
    /// permit it takes; the actor adds them back once per wake-up.
    permits: Arc<Semaphore>,
    mailbox: mpsc::UnboundedSender<QueueCmd>,
    /// The next sequence number: publishers take one per message, right
    /// before handing it over (so the sequences a queue receives are dense).
    seqs: AtomicU64,
    /// The header holding a message's key, for a deduplicating queue.
    dedup_header: Option<String>,
    /// A stream (`x-queue-type: stream`): it stores what it is sent itself.
    stream: bool,
}

impl std::ops::Deref for QueueHandle {
    type Target = HandleInner;
    fn deref(&self) -> &HandleInner {
        &self.0
    }
}

impl PartialEq for QueueHandle {
    fn eq(&self, other: &Self) -> bool {
        self.info.id == other.info.id
    }
}

impl QueueHandle {
    /// The handle of a queue whose actor reads `mailbox` and gives back
    /// `permits` (see `actor::spawn`).
    pub(super) fn new(
        info: Arc<QueueInfo>,
        permits: Arc<Semaphore>,
        mailbox: mpsc::UnboundedSender<QueueCmd>,
    ) -> QueueHandle {
        let dedup_header = crate::dedup::queue_enabled(&info.arguments).then(|| {
            crate::dedup::header_name(&info.arguments)
                .unwrap_or_else(|_| crate::dedup::DEFAULT_HEADER.to_owned())
        });
        let stream = super::args::QueueArgs::parse(&info.arguments).stream;
        QueueHandle(Arc::new(HandleInner {
            info,
            permits,
            mailbox,
            seqs: AtomicU64::new(1),
            dedup_header,
            stream,
        }))
    }

    /// Whether it is a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// Whether a publisher stores a persistent message for this queue
    /// before handing it over (a durable classic or quorum queue). A
    /// stream stores every message itself, in offset order.
    pub fn stored_by_publisher(&self) -> bool {
        self.persisted() && !self.stream
    }

    /// Whether the queue deduplicates (`x-message-deduplication`).
    pub fn dedups(&self) -> bool {
        self.dedup_header.is_some()
    }

    /// The store write of a stored message's deduplication key, for a
    /// deduplicating queue (written in the batch that enqueues it).
    pub fn dedup_put(&self, msg: &MessageRef, seq: u64) -> Option<warren_storage::MessageOp> {
        let key = crate::dedup::key_of(&msg.header, self.dedup_header.as_deref()?)?;
        Some(warren_storage::MessageOp::DedupPut {
            scope: crate::dedup::queue_scope(self.info.id),
            key,
            value: seq,
        })
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn id(&self) -> u64 {
        self.info.id
    }
    /// Whether persistent messages in this queue are written to the store
    /// (durable, not exclusive: exclusive queues do not survive a restart;
    /// not another node's, not a cluster's quorum queue, whose log keeps
    /// them).
    pub fn persisted(&self) -> bool {
        self.info.durable
            && self.info.exclusive_owner.is_none()
            && self.info.home.is_none()
            && self.info.quorum.is_none()
    }
    /// The node the queue lives on, if not this one (a cluster's queue
    /// reached through this node: see [`super::remote`]).
    pub fn home(&self) -> Option<&str> {
        self.info.home.as_deref()
    }
    /// A mailbox slot without waiting: `None` if the mailbox is full,
    /// `Some(false)` if the queue is gone.
    pub fn try_reserve(&self) -> Option<bool> {
        match self.permits.try_acquire() {
            Ok(p) => {
                p.forget();
                Some(true)
            }
            Err(TryAcquireError::Closed) => Some(false),
            Err(TryAcquireError::NoPermits) => None,
        }
    }
    /// Give back a slot from [`QueueHandle::try_reserve`] that is not used.
    pub fn unreserve(&self) {
        self.permits.add_permits(1);
    }
    /// A mailbox slot for one publish; waits while the queue's mailbox is
    /// full (back-pressure). False if the queue is gone. The slot travels
    /// with the message ([`QueueHandle::send`] with `permit: true`).
    pub async fn reserve(&self) -> bool {
        if let Some(taken) = self.try_reserve() {
            return taken;
        }
        match self.permits.acquire().await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }
    /// Take the sequence number of the next message. The caller must hand
    /// the message over with [`QueueHandle::send`] without awaiting anything
    /// in between, so that every sequence taken arrives.
    pub fn take_seq(&self) -> u64 {
        self.seqs.fetch_add(1, Ordering::AcqRel)
    }
    /// Sequences continue from `next` (recovery, before any publish).
    pub fn set_next_seq(&self, next: u64) {
        self.seqs.fetch_max(next, Ordering::AcqRel);
    }
    /// Hand over a message with its sequence; `permit`: it holds a slot
    /// from [`QueueHandle::reserve`] (not dead letters: their volume is
    /// bounded by the dead-lettering queue's own). A queue deleted meanwhile
    /// drops the message (and releases its confirm).
    pub fn send(
        &self,
        seq: u64,
        msg: MessageRef,
        confirm: Option<Arc<ConfirmTicket>>,
        permit: bool,
    ) {
        let _ = self.mailbox.send(QueueCmd::Publish(Publish {
            seq,
            msg,
            confirm,
            permit,
        }));
    }
    /// Send a command that needs no mailbox slot; false if the queue is
    /// gone.
    pub fn tell(&self, c: QueueCmd) -> bool {
        self.mailbox.send(c).is_ok()
    }
    /// Ask something and wait for the answer; None if the queue is gone.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> QueueCmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.tell(make(tx)) {
            return None;
        }
        rx.await.ok()
    }
}

/// A publish on its way into a queue. Holding the confirm ticket until the
/// message is stored is what makes the confirm mean "enqueued".
pub struct Publish {
    pub(super) seq: u64,
    pub(super) msg: MessageRef,
    /// Settled once the message is enqueued (or refused: then nacked first).
    pub(super) confirm: Option<Arc<ConfirmTicket>>,
    /// It holds a mailbox slot (dead-lettered messages do not).
    pub(super) permit: bool,
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
    /// The consuming connection's id (for operators).
    pub conn_id: u64,
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
    /// Registration order on its queue (set by the queue).
    pub order: u64,
    /// `x-consumer-timeout` of the consumer (ms): overrides the queue's.
    pub timeout: Option<u64>,
    /// Its client announced `consumer_cancel_notify`: a timed-out consumer
    /// is cancelled with basic.cancel (else its channel is closed).
    pub cancel_notify: bool,
    /// A stream consumer's arguments (where to start, filter, tracking).
    pub stream: Option<Box<super::stream::StreamConsume>>,
}

/// A message fetched by `basic.get`.
pub struct Got {
    pub msg: MessageRef,
    pub seq: u64,
    pub redelivered: bool,
    /// Ready messages left after this one.
    pub remaining: u32,
}

/// Sequences settled together: one ack (the common case) needs no heap.
pub type Seqs = smallvec::SmallVec<[u64; 2]>;

/// What a queue's mailbox carries.
pub enum QueueCmd {
    /// At start-up: the queue holds `count` stored messages with sequences
    /// in `first..end`, to be read back as consumers need them.
    Recovered {
        first: u64,
        end: u64,
        count: u64,
    },
    /// A stream's appends up to (not including) offset `upto` are
    /// durable (`ok`), or failed; `permits` mailbox slots go back.
    StreamCommitted {
        upto: u64,
        permits: u32,
        ok: bool,
    },
    /// Records a stream consumer asked for, read from the store.
    StreamRead(Box<super::stream::StreamRead>),
    /// Messages read back from the store (reply to a page read).
    Paged {
        generation: u64,
        page: Result<Page, String>,
    },
    Publish(Publish),
    /// The settings in force changed (a policy was set or cleared).
    Reconfigure(Box<super::args::QueueArgs>),
    Consume {
        /// Boxed: the mailbox's slots are the size of the largest command,
        /// and every publish goes through one.
        consumer: Box<Consumer>,
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
        seqs: Seqs,
    },
    Reject {
        chan_key: u64,
        seqs: Seqs,
        requeue: bool,
    },
    /// Deliveries that never reached their consumer's client (its node no
    /// longer had the consumer): back to the queue, not counted as
    /// deliveries. The consumer they were for is gone (its
    /// event channel closed) and leaves the queue.
    Undelivered {
        chan_key: u64,
        seqs: Seqs,
    },
    Get {
        chan_key: u64,
        no_ack: bool,
        /// The asking connection (told if the delivery times out); None
        /// for the management API's gets.
        conn: Option<mpsc::UnboundedSender<ConnEvent>>,
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
    /// The queue was redeclared (or passively declared): it counts as used
    /// for `x-expires`.
    Touch,
    Stats {
        reply: oneshot::Sender<(u32, u32)>,
    },
    /// What operators see (management API).
    Info {
        reply: oneshot::Sender<QueueStats>,
    },
    /// The queue's consumers, for operators.
    Consumers {
        reply: oneshot::Sender<Vec<ConsumerInfo>>,
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

impl Consumer {
    /// What operators see of it: `active` (not waiting its turn on a
    /// single-active-consumer queue), `timeout` the one in force.
    pub fn info(&self, active: bool, timeout: Option<u64>) -> ConsumerInfo {
        ConsumerInfo {
            tag: self.tag.clone(),
            conn_id: self.conn_id,
            channel: self.channel,
            ack_required: !self.no_ack,
            exclusive: self.exclusive,
            prefetch: self.prefetch,
            priority: self.priority,
            active,
            timeout,
            stream: None,
        }
    }

    /// The event handing this consumer `items` (message, redelivered,
    /// sequence or offset) from queue `queue`, in order: one `Deliver` for
    /// one message, else one `DeliverMany` for the run.
    pub fn deliveries(
        &self,
        queue: u64,
        mut items: impl ExactSizeIterator<Item = (MessageRef, bool, u64)>,
    ) -> ConnEvent {
        if items.len() == 1 {
            let (msg, redelivered, seq) = items.next().expect("one item");
            return ConnEvent::Deliver {
                chan_key: self.chan_key,
                channel: self.channel,
                tag: self.tag.clone(),
                msg,
                redelivered,
                seq,
                queue,
                in_flight: self.in_flight.clone(),
            };
        }
        ConnEvent::DeliverMany {
            chan_key: self.chan_key,
            channel: self.channel,
            tag: self.tag.clone(),
            items: items.collect(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// A consumer, as operators see it.
#[derive(Clone, Debug)]
pub struct ConsumerInfo {
    pub tag: Arc<str>,
    pub conn_id: u64,
    pub channel: u16,
    pub ack_required: bool,
    pub exclusive: bool,
    pub prefetch: u32,
    pub priority: i32,
    /// False while it waits its turn on a single-active-consumer queue.
    pub active: bool,
    /// The consumer timeout in force for it (ms), if any.
    pub timeout: Option<u64>,
    /// A stream consumer's next offset and how far it is behind the end.
    pub stream: Option<(u64, u64)>,
}

/// A queue's numbers, as operators see them.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueStats {
    /// Ready messages (in memory and on disk).
    pub ready: u64,
    /// Body bytes of the ready messages in memory.
    pub ready_bytes: u64,
    /// Delivered, not yet acknowledged.
    pub unacked: u64,
    pub consumers: u32,
    /// Totals since the queue started: messages enqueued, delivered to
    /// consumers or basic.get, acknowledged, redelivered.
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    pub redelivered: u64,
    /// Duplicates dropped (a deduplicating queue), else None.
    pub deduplicated: Option<u64>,
    /// A stream's offsets and segments, else None.
    pub stream: Option<StreamStats>,
}

/// What operators see of a stream beyond a queue's numbers.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamStats {
    /// The first offset kept and the last appended (None: empty).
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub segments: u64,
}

/// Called by the actor when it deletes itself (auto-delete, `x-expires`).
pub type OnAutoDelete = Box<dyn FnOnce(&QueueInfo) + Send>;
