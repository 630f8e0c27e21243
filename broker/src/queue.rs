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
//!
//! Queue arguments ([`crate::queue_args`]) are the actor's too: message TTL
//! and per-message expiration (expired heads are dropped when they reach the
//! head, and proactively by one timer armed for the earliest head), `x-expires`
//! (the same timer deletes an unused queue), length limits with their overflow
//! behaviour, priority levels (`x-max-priority`), and dead-lettering
//! ([`crate::dead_letter`]): the actor routes the dead message through its
//! vhost and hands it to the target queues without a permit and without
//! waiting (their volume is bounded by this queue's own).
//!
//! Paging: each message carries a per-queue sequence, taken by the publisher
//! right before it hands the message over (so the sequences a queue receives
//! are dense), which is also its store key `queue ‖ seq`. A queue whose
//! in-memory window ([`PAGE_WINDOW`]) is full starts paging: from then on it
//! keeps of each new message only the fact that it arrived (a [`Tail`]: a
//! range of sequences). Persistent messages in durable queues are on disk
//! already; others are written by the actor (always for `x-queue-mode: lazy`
//! queues and under memory pressure; otherwise the queue does not page). As
//! consumers drain the window, the store's reader thread reads the next page
//! back, after every write submitted before the request has landed. At
//! start-up a durable queue is only told its range: no body is read until a
//! consumer needs it.

use crate::events::{ConfirmTicket, ConnEvent};
use crate::dead_letter::{self, Reason};
use crate::error::{access_refused, precondition, AmqpError};
use crate::message::MessageRef;
use crate::persist::{Page, Persister};
use crate::queue_args::{Overflow, QueueArgs};
use crate::vhost::VHost;
use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore, TryAcquireError};
use tokio::time::Instant;
use warren_protocol::types::FieldTable;
use warren_storage::MessageOp;

/// Deliveries a consumer may have in its connection's mailbox, not yet written.
pub const FLOW_WINDOW: u32 = 512;
/// Publishes that may wait in a queue's mailbox.
pub const PUBLISH_PERMITS: usize = 1024;
/// Ready messages a paging queue keeps in memory at most (the rest waits
/// on disk and is read back in order as consumers drain the queue).
pub const PAGE_WINDOW: usize = 4096;
/// Body bytes a paging queue keeps in memory at most.
pub const PAGE_WINDOW_BYTES: u64 = 16 << 20;
/// Messages read back per page.
const PAGE_READ: usize = 1024;
/// A queue whose consumers are taking messages holds publishers back (keeps
/// their mailbox slots) while this many messages, or body bytes, wait in
/// its memory: the consumers set the pace, through TCP back-pressure on the
/// publishing connections, instead of the backlog growing until the memory
/// alarm. A queue without consumers is a buffer and is never held.
const HOLD_MESSAGES: usize = 4 * PAGE_WINDOW;
const HOLD_BYTES: u64 = 64 << 20;
/// ... unless its consumers have taken nothing for this long (stalled:
/// prefetch full and no acks); then publishers go on and the queue grows.
const HOLD_STALL_MS: u64 = 200;

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
    control: mpsc::UnboundedSender<QueueCmd>,
    /// The next sequence number: publishers take one per message, right
    /// before handing it over (so the sequences a queue receives are dense).
    seqs: AtomicU64,
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
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn id(&self) -> u64 {
        self.info.id
    }
    /// Whether persistent messages in this queue are written to the store
    /// (durable, not exclusive: exclusive queues do not survive a restart).
    pub fn persisted(&self) -> bool {
        self.info.durable && self.info.exclusive_owner.is_none()
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
        let _ = self.control.send(QueueCmd::Publish(Publish {
            seq,
            msg,
            confirm,
            permit,
        }));
    }
    /// Send a control message; false if the queue is gone.
    pub fn control(&self, c: QueueCmd) -> bool {
        self.control.send(c).is_ok()
    }
    /// Ask something and wait for the answer; None if the queue is gone.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> QueueCmd) -> Option<T> {
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
    seq: u64,
    msg: MessageRef,
    /// Dropped once the message is enqueued (or refused: then nacked first).
    confirm: Option<Arc<ConfirmTicket>>,
    /// It holds a mailbox slot (dead-lettered messages do not).
    permit: bool,
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
    /// Messages read back from the store (reply to a page read).
    Paged {
        generation: u64,
        page: Result<Page, String>,
    },
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
        seqs: Seqs,
    },
    Reject {
        chan_key: u64,
        seqs: Seqs,
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
    /// The queue was redeclared (or passively declared): it counts as used
    /// for `x-expires`.
    Touch,
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

/// Called by the actor when it deletes itself (auto-delete, `x-expires`).
pub type OnAutoDelete = Box<dyn FnOnce(&QueueInfo) + Send>;

/// "Never" on the actor's millisecond clock.
const NEVER: u64 = u64::MAX;

struct Entry {
    seq: u64,
    msg: MessageRef,
    redelivered: bool,
    /// Actor-clock millisecond after which the message is expired ([`NEVER`]
    /// without a TTL). Kept across requeues.
    expires: u64,
    /// The store holds an index entry `queue ‖ seq` for it (removed when the
    /// message leaves the queue).
    on_disk: bool,
}

/// The part of a queue that lives only on disk: every message with a
/// sequence from `start` on that has arrived since paging began, in index
/// entries `queue ‖ seq`. Sequences are dense (publishers take them just
/// before sending), so "arrived" is a contiguous range plus a few that came
/// early; later arrivals below `start` are stragglers and stay in memory.
struct Tail {
    start: u64,
    /// Next sequence to read back.
    cursor: u64,
    /// Every sequence below `end` has arrived.
    end: u64,
    /// Sequences at or above `end + 1` that arrived early.
    ahead: BTreeSet<u64>,
    /// Messages in the tail.
    len: u64,
    /// A read is under way.
    reading: bool,
    /// Unique per tail and purge: a read started before either is stale.
    generation: u64,
}

impl Tail {
    fn new(first: u64, end: u64, len: u64, generation: u64) -> Tail {
        Tail {
            start: first,
            cursor: first,
            end,
            ahead: BTreeSet::new(),
            len,
            reading: false,
            generation,
        }
    }
    fn arrived(&mut self, seq: u64) {
        if seq == self.end {
            self.end += 1;
            while self.ahead.remove(&self.end) {
                self.end += 1;
            }
        } else if seq > self.end {
            self.ahead.insert(seq);
        }
    }
    /// Nothing left on disk and nothing under way.
    fn drained(&self) -> bool {
        self.cursor >= self.end && self.ahead.is_empty() && !self.reading
    }
}

struct Unacked {
    entry: Entry,
    chan_key: u64,
    /// None for `basic.get` deliveries.
    tag: Option<Arc<str>>,
}

/// Ready messages: one FIFO per priority level (a single level without
/// `x-max-priority`), each in sequence order; the highest level goes first.
struct Ready {
    /// Indexed by priority level.
    levels: Vec<VecDeque<Entry>>,
    /// Messages in all levels.
    len: usize,
    /// Body bytes in all levels (`x-max-length-bytes`).
    bytes: u64,
}

impl Ready {
    fn new(max_priority: Option<u8>) -> Ready {
        let n = max_priority.map_or(1, |p| p as usize + 1);
        Ready {
            levels: (0..n).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    /// The level a message belongs to: its priority, capped; 0 without one.
    fn level_of(&self, e: &Entry) -> usize {
        let top = self.levels.len() - 1;
        if top == 0 {
            return 0;
        }
        e.msg.header.priority().map_or(0, |p| (p as usize).min(top))
    }
    /// The highest non-empty level.
    fn top(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.levels.iter().rposition(|l| !l.is_empty())
    }
    fn front_of(&self, level: usize) -> Option<&Entry> {
        self.levels.get(level)?.front()
    }
    fn pop_level(&mut self, level: usize) -> Option<Entry> {
        let e = self.levels.get_mut(level)?.pop_front()?;
        self.len -= 1;
        self.bytes -= e.msg.body.len() as u64;
        Some(e)
    }
    fn pop_front(&mut self) -> Option<Entry> {
        let top = self.top()?;
        self.pop_level(top)
    }
    fn push_back(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        self.levels[l].push_back(e);
    }
    fn push_front(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        self.levels[l].push_front(e);
    }
    /// Put a message back at its place in sequence order within its level.
    fn insert(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        let level = &mut self.levels[l];
        let pos = level.partition_point(|r| r.seq < e.seq);
        level.insert(pos, e);
    }
    /// The earliest expiry among the level heads.
    fn next_expiry(&self) -> u64 {
        self.levels
            .iter()
            .filter_map(|l| l.front())
            .map(|e| e.expires)
            .min()
            .unwrap_or(NEVER)
    }
}

/// The state one queue actor owns.
struct Actor {
    info: Arc<QueueInfo>,
    /// The arguments this queue acts on, decoded once.
    args: QueueArgs,
    /// For routing dead-lettered messages (never kept upgraded).
    vhost: Weak<VHost>,
    /// Ready messages, by priority then sequence.
    ready: Ready,
    /// Delivered, awaiting ack, by sequence.
    unacked: FxHashMap<u64, Unacked>,
    consumers: Vec<Consumer>,
    /// Round-robin position in `consumers`.
    next_consumer: usize,
    /// The highest sequence that has arrived.
    max_seen: u64,
    /// Sequences below this were recovered from a previous run.
    recovered_below: u64,
    /// The on-disk part of the queue while it pages.
    tail: Option<Tail>,
    /// Last tail generation handed out.
    generations: u64,
    /// Whether new messages may go to the tail (queues with priorities,
    /// a message TTL or length limits keep theirs in memory).
    pageable: bool,
    /// Persistent messages in this queue are stored (durable, not exclusive).
    persisted: bool,
    /// `basic.get`s waiting for a page read (the queue had messages only on disk).
    parked_gets: VecDeque<(u64, bool, oneshot::Sender<Option<Got>>)>,
    /// The actor's own mailbox, for page-read replies (weak: the mailbox
    /// still closes when every handle is gone).
    myself: mpsc::WeakUnboundedSender<QueueCmd>,
    /// Whether a consumer ever subscribed (auto-delete needs one first).
    had_consumer: bool,
    on_auto_delete: Option<OnAutoDelete>,
    /// Origin of the actor's coarse millisecond clock.
    epoch: Instant,
    /// Milliseconds since `epoch`, read once per wake-up (a coarse clock).
    now: u64,
    /// When the queue was last used (`x-expires`): a consumer left, a
    /// `basic.get`, a declare.
    last_used: u64,
    /// The store: persistent messages that leave a durable queue are
    /// removed from disk; a paging queue writes and reads its tail.
    persister: Option<Persister>,
    /// Store removals gathered during one wake-up, submitted together.
    pending: Vec<MessageOp>,
    /// Set when the queue is deleted (not merely stopped at shutdown): only
    /// then are its stored messages dropped.
    deleted: bool,
    /// Mailbox slots of publishes taken in this wake-up, given back at once.
    freed: usize,
    /// Mailbox slots held back from publishers (see `HOLD_MESSAGES`).
    held: usize,
    /// When a consumer last took a message (coarse clock).
    last_delivery: u64,
}

/// Start a queue actor; returns its handle. `vhost` routes its dead letters.
pub fn spawn(
    info: QueueInfo,
    vhost: Weak<VHost>,
    persister: Option<Persister>,
    on_auto_delete: OnAutoDelete,
) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PUBLISH_PERMITS));
    let (ctx, crx) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    let args = QueueArgs::parse(&info.arguments);
    let pageable = args.max_priority.is_none()
        && args.message_ttl.is_none()
        && args.max_length.is_none()
        && args.max_length_bytes.is_none();
    let actor = Actor {
        info: info.clone(),
        ready: Ready::new(args.max_priority),
        args,
        vhost,
        unacked: FxHashMap::default(),
        consumers: Vec::new(),
        next_consumer: 0,
        max_seen: 0,
        recovered_below: 0,
        tail: None,
        generations: 0,
        pageable,
        persisted: info.durable && info.exclusive_owner.is_none(),
        parked_gets: VecDeque::new(),
        myself: ctx.downgrade(),
        had_consumer: false,
        on_auto_delete: Some(on_auto_delete),
        epoch: Instant::now(),
        now: 0,
        last_used: 0,
        persister,
        pending: Vec::new(),
        deleted: false,
        freed: 0,
        held: 0,
        last_delivery: 0,
    };
    let span = tracing::debug_span!("queue", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(crx, permits.clone()),
        span,
    ));
    QueueHandle(Arc::new(HandleInner {
        info,
        permits,
        control: ctx,
        seqs: AtomicU64::new(1),
    }))
}

/// How many mailbox messages one wake-up takes before dispatching.
const BATCH: usize = 256;

impl Actor {
    async fn run(mut self, mut mailbox: mpsc::UnboundedReceiver<QueueCmd>, permits: Arc<Semaphore>) {
        // One timer, re-armed for the next deadline (head expiry, x-expires).
        let timer = tokio::time::sleep_until(self.epoch + Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        'life: loop {
            tokio::select! {
                c = mailbox.recv() => {
                    let Some(c) = c else { break };
                    self.tick();
                    if self.on_control(c) {
                        self.deleted = true;
                        break;
                    }
                    for _ in 1..BATCH {
                        match mailbox.try_recv() {
                            Ok(c) => {
                                if self.on_control(c) {
                                    self.deleted = true;
                                    break 'life;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                () = &mut timer, if armed.is_some() => {
                    // (no publishes taken here)
                    armed = None;
                    self.tick();
                    if self.unused_too_long() {
                        tracing::debug!("queue expired (x-expires)");
                        self.delete_self();
                        self.deleted = true;
                        break;
                    }
                }
            }
            self.dispatch();
            self.expire_heads();
            self.flush_store();
            // After the flush: a read waits for every write submitted so far.
            self.page_in();
            // Mailbox slots go back to publishers, or are held (see HOLD_*).
            let slots = std::mem::take(&mut self.freed) + std::mem::take(&mut self.held);
            if self.holding() {
                self.held = slots;
            } else if slots > 0 {
                permits.add_permits(slots);
            }
            let next = self.next_deadline();
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed = next;
            }
        }
        self.flush_store();
        if self.deleted {
            if let Some(p) = &self.persister {
                p.submit_nowait(vec![MessageOp::DropQueue {
                    queue: self.info.id,
                }]);
            }
        }
        // Publishers waiting for a permit give up; later sends fail.
        permits.close();
        mailbox.close();
        tracing::debug!("queue stopped");
    }

    /// Read the coarse clock.
    fn tick(&mut self) {
        self.now = self.epoch.elapsed().as_millis() as u64;
    }

    /// Whether publishers are held back: consumers are taking messages,
    /// and the backlog in memory is over the bound.
    fn holding(&self) -> bool {
        !self.consumers.is_empty()
            && (self.ready.len() >= HOLD_MESSAGES || self.ready.bytes >= HOLD_BYTES)
            && self.now < self.last_delivery.saturating_add(HOLD_STALL_MS)
    }

    /// When the timer should next fire: the earliest head expiry, the
    /// moment an unused `x-expires` queue runs out, or when held publishers
    /// are let go if the consumers stall.
    fn next_deadline(&self) -> Option<Instant> {
        let mut at = self.ready.next_expiry().saturating_add(1);
        if self.held > 0 {
            // Let publishers go if the consumers stall.
            at = at.min(self.last_delivery.saturating_add(HOLD_STALL_MS));
        }
        if let Some(ms) = self.args.expires {
            if self.consumers.is_empty() {
                at = at.min(self.last_used.saturating_add(ms));
            }
        }
        (at < NEVER).then(|| self.epoch + Duration::from_millis(at))
    }

    fn unused_too_long(&self) -> bool {
        match self.args.expires {
            Some(ms) => self.consumers.is_empty() && self.now >= self.last_used.saturating_add(ms),
            None => false,
        }
    }

    fn is_expired(&self, e: &Entry) -> bool {
        e.expires < self.now
    }

    /// Drop (dead-letter, reason `expired`) the expired messages at the head
    /// of every level.
    fn expire_heads(&mut self) {
        for l in 0..self.ready.levels.len() {
            while self.ready.front_of(l).is_some_and(|e| e.expires < self.now) {
                if let Some(e) = self.ready.pop_level(l) {
                    self.dead_letter(&e.msg, Reason::Expired);
                    self.forget(&e);
                }
            }
        }
    }

    /// The next message to hand out, skipping (and dead-lettering) expired ones.
    fn pop_live(&mut self) -> Option<Entry> {
        while let Some(e) = self.ready.pop_front() {
            if !self.is_expired(&e) {
                return Some(e);
            }
            self.dead_letter(&e.msg, Reason::Expired);
            self.forget(&e);
        }
        None
    }

    /// Whether a live message is ready (expired heads are dropped on the way).
    fn has_live(&mut self) -> bool {
        while let Some(top) = self.ready.top() {
            if !self.ready.front_of(top).is_some_and(|e| self.is_expired(e)) {
                return true;
            }
            if let Some(e) = self.ready.pop_level(top) {
                self.dead_letter(&e.msg, Reason::Expired);
                self.forget(&e);
            }
        }
        false
    }

    fn enqueue(&mut self, p: Publish) {
        self.freed += p.permit as usize;
        self.max_seen = self.max_seen.max(p.seq);
        // The publisher stored it for this queue (before sending it here).
        let on_disk = p.msg.stored.is_some() && self.persisted;
        if self.pageable && self.tail.as_ref().is_some_and(|t| p.seq >= t.start) {
            self.page_out(p, on_disk);
            return;
        }
        let size = p.msg.body.len() as u64;
        let a = &self.args;
        if a.overflow != Overflow::DropHead {
            let full = a.max_length.is_some_and(|m| self.ready_count() >= m)
                || a.max_length_bytes
                    .is_some_and(|m| self.ready.bytes.saturating_add(size) > m);
            if full {
                if let Some(t) = &p.confirm {
                    t.nack();
                }
                if a.overflow == Overflow::RejectPublishDlx {
                    self.dead_letter(&p.msg, Reason::MaxLen);
                }
                self.forget(&Entry {
                    seq: p.seq,
                    msg: p.msg,
                    redelivered: false,
                    expires: NEVER,
                    on_disk,
                });
                return;
            }
        }
        let expires = self.expiry_for(&p.msg);
        self.ready.push_back(Entry {
            seq: p.seq,
            msg: p.msg,
            redelivered: false,
            expires,
            on_disk,
        });
        // `p.confirm` drops here: enqueued in memory is the promise for now.
        if self.args.overflow == Overflow::DropHead {
            self.drop_heads_over_limit();
        }
        if self.tail.is_none() && self.should_page(on_disk) {
            // Every later sequence goes to disk; those below it that are
            // still on their way stay in memory.
            self.generations += 1;
            let start = self.max_seen + 1;
            self.tail = Some(Tail::new(start, start, 0, self.generations));
        }
    }

    /// Ready messages, in memory and on disk.
    fn ready_count(&self) -> u64 {
        self.ready.len() as u64 + self.tail.as_ref().map_or(0, |t| t.len)
    }

    /// Whether the queue should start paging: its window is full, and the
    /// message is on disk anyway, the queue is lazy, or memory is under
    /// pressure.
    fn should_page(&self, on_disk: bool) -> bool {
        let Some(p) = &self.persister else {
            return false;
        };
        self.pageable
            && (self.ready.len() >= PAGE_WINDOW || self.ready.bytes >= PAGE_WINDOW_BYTES)
            && (on_disk || self.args.lazy || p.paging())
    }

    /// A message for the tail: keep only its place. A message not stored yet
    /// (transient, or a queue that does not persist) is written now, under a
    /// fresh id; a stored one stays in the body cache for its read-back.
    fn page_out(&mut self, p: Publish, on_disk: bool) {
        let (Some(persister), Some(t)) = (&self.persister, self.tail.as_mut()) else {
            return;
        };
        match p.msg.stored {
            Some(id) if on_disk => persister.cache_body(id, &p.msg),
            _ => {
                let id = persister.next_id();
                self.pending.push(MessageOp::PutMessage {
                    id,
                    refs: 1,
                    message: p.msg.to_stored(),
                });
                self.pending.push(MessageOp::Enqueue {
                    queue: self.info.id,
                    seq: p.seq,
                    id,
                });
            }
        }
        t.arrived(p.seq);
        t.len += 1;
    }

    /// Ask for the next page when the in-memory window runs low.
    fn page_in(&mut self) {
        let (Some(persister), Some(t)) = (&self.persister, self.tail.as_mut()) else {
            return;
        };
        // A queue that does not page (priorities, TTL, length limits) only
        // has a tail after a restart: it reads it all back at once, so the
        // recovered messages go first.
        let low = !self.pageable
            || (self.ready.len() < PAGE_WINDOW / 2 && self.ready.bytes < PAGE_WINDOW_BYTES / 2);
        if t.drained() {
            if low {
                // Back to memory until the window fills again.
                self.tail = None;
                self.answer_parked_gets();
            }
            return;
        }
        if t.reading || t.cursor >= t.end || !low {
            return;
        }
        let Some(me) = self.myself.upgrade() else {
            return;
        };
        t.reading = true;
        let generation = t.generation;
        let limit = PAGE_WINDOW
            .saturating_sub(self.ready.len())
            .clamp(1, PAGE_READ);
        persister.read_page(
            self.info.id,
            t.cursor,
            t.end,
            limit,
            Box::new(move |page| {
                let _ = me.send(QueueCmd::Paged { generation, page });
            }),
        );
    }

    /// Messages read back from disk join the in-memory window.
    fn paged(&mut self, generation: u64, page: Result<Page, String>) {
        let Some(t) = self.tail.as_mut() else { return };
        if t.generation != generation {
            return; // purged meanwhile
        }
        t.reading = false;
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "reading the queue back from disk failed");
                return;
            }
        };
        t.cursor = t.cursor.max(page.next);
        t.len = t.len.saturating_sub(page.entries.len() as u64);
        if t.cursor >= t.end && t.ahead.is_empty() {
            t.len = 0;
        }
        for (seq, msg) in page.entries {
            let old = seq < self.recovered_below;
            if old && !msg.persistent() {
                // A transient message paged out before a restart: gone.
                if let Some(id) = msg.stored {
                    self.pending.push(MessageOp::Remove {
                        queue: self.info.id,
                        seq,
                        id,
                    });
                }
                continue;
            }
            let expires = self.expiry_for(&msg);
            self.ready.insert(Entry {
                seq,
                msg,
                redelivered: old,
                expires,
                on_disk: true,
            });
        }
        self.answer_parked_gets();
    }

    /// Answer `basic.get`s that waited for a page, while there is something
    /// to give or nothing left to wait for.
    fn answer_parked_gets(&mut self) {
        while !self.parked_gets.is_empty() {
            let waiting = self.tail.as_ref().is_some_and(|t| !t.drained());
            if !self.has_live() && waiting {
                return;
            }
            if let Some((chan_key, no_ack, reply)) = self.parked_gets.pop_front() {
                self.get(chan_key, no_ack, reply);
            }
        }
    }

    /// `basic.get`: the next live message, or None; parked while the queue
    /// has messages only on disk.
    fn get(&mut self, chan_key: u64, no_ack: bool, reply: oneshot::Sender<Option<Got>>) {
        self.last_used = self.now;
        let Some(e) = self.pop_live() else {
            if self.tail.as_ref().is_some_and(|t| !t.drained()) {
                self.parked_gets.push_back((chan_key, no_ack, reply));
            } else {
                let _ = reply.send(None);
            }
            return;
        };
        let g = Got {
            msg: e.msg.clone(),
            seq: e.seq,
            redelivered: e.redelivered,
            remaining: self.ready_count().min(u32::MAX as u64) as u32,
        };
        if reply.send(Some(g)).is_err() {
            // The asker went away: put the message back untouched.
            self.ready.push_front(e);
        } else if no_ack {
            self.forget(&e);
        } else {
            self.unacked.insert(
                e.seq,
                Unacked {
                    entry: e,
                    chan_key,
                    tag: None,
                },
            );
        }
    }

    /// `x-overflow: drop-head`: drop (dead-letter, reason `maxlen`) from the
    /// head until within the length limits.
    fn drop_heads_over_limit(&mut self) {
        loop {
            let over = self
                .args
                .max_length
                .is_some_and(|m| self.ready.len() as u64 > m)
                || self
                    .args
                    .max_length_bytes
                    .is_some_and(|m| self.ready.bytes > m);
            if !over {
                return;
            }
            match self.ready.pop_front() {
                Some(e) => {
                    self.dead_letter(&e.msg, Reason::MaxLen);
                    self.forget(&e);
                }
                None => return,
            }
        }
    }

    /// Republish a message that died here to the dead-letter exchange, if
    /// the queue has one. Never waits: target queues take it without a
    /// permit. Automatic cycles back to a queue are dropped, as RabbitMQ does.
    /// A persistent dead letter is stored for its durable targets before
    /// they see it (the original's removal follows in a later write, so a
    /// crash in between leaves a duplicate, never a loss).
    fn dead_letter(&mut self, msg: &MessageRef, reason: Reason) {
        let Some(dlx) = self.args.dead_letter_exchange.as_deref() else {
            return;
        };
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let rk = self.args.dead_letter_routing_key.as_deref();
        let Some(mut dead) = dead_letter::make(msg, reason, &self.info.name, dlx, rk, now) else {
            return;
        };
        let routed = match vhost.route(&dead.exchange, &dead.routing_key, &dead.header) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dead letter dropped");
                return;
            }
        };
        let targets: Vec<&QueueHandle> = routed
            .queues()
            .iter()
            .filter(|q| {
                let cycle = dead_letter::is_cycle(&dead, reason, q.name());
                if cycle {
                    tracing::debug!(target = q.name(), "dead-letter cycle: dropped");
                }
                !cycle
            })
            .collect();
        let stored = targets.iter().filter(|q| q.persisted()).count() as u32;
        let mut ops = Vec::new();
        if let (true, true, Some(p)) = (dead.persistent(), stored > 0, &self.persister) {
            let id = p.next_id();
            dead.stored = Some(id);
            ops.push(MessageOp::PutMessage {
                id,
                refs: stored,
                message: dead.to_stored(),
            });
        }
        let dead = Arc::new(dead);
        // No await from taking a sequence to sending (the actor never waits).
        let seqs: Vec<u64> = targets.iter().map(|q| q.take_seq()).collect();
        if let Some(id) = dead.stored {
            for (q, &seq) in targets.iter().zip(&seqs) {
                if q.persisted() {
                    ops.push(MessageOp::Enqueue {
                        queue: q.id(),
                        seq,
                        id,
                    });
                }
            }
        }
        if let (false, Some(p)) = (ops.is_empty(), &self.persister) {
            p.submit_nowait(ops);
        }
        for (q, seq) in targets.into_iter().zip(seqs) {
            q.send(seq, dead.clone(), None, false);
        }
    }

    /// Hand ready messages to consumers with credit, round robin.
    fn dispatch(&mut self) {
        while !self.consumers.is_empty() && self.has_live() {
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
            self.last_delivery = self.now;
            if c.no_ack {
                self.forget(&entry);
            } else {
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

    /// Put messages back in sequence order (within their priority level),
    /// marked redelivered. They keep their expiry.
    fn requeue(&mut self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| e.seq);
        for mut e in entries.into_iter().rev() {
            e.redelivered = true;
            self.ready.insert(e);
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

    /// A consumer left: the `x-expires` countdown starts when the last one goes.
    fn consumer_left(&mut self) {
        if self.consumers.is_empty() {
            self.last_used = self.now;
        }
    }

    /// Returns true when the actor should stop.
    fn on_control(&mut self, c: QueueCmd) -> bool {
        match c {
            QueueCmd::Publish(p) => self.enqueue(p),
            QueueCmd::Consume { consumer, reply } => {
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
            QueueCmd::Cancel { chan_key, tag } => {
                if let Some(pos) = self
                    .consumers
                    .iter()
                    .position(|c| c.chan_key == chan_key && c.tag == tag)
                {
                    let c = self.consumers.remove(pos);
                    let _ = c.conn.send(ConnEvent::CancelOk { chan_key, tag });
                    self.consumer_left();
                }
                return self.maybe_auto_delete();
            }
            QueueCmd::Ack { chan_key, seqs } => {
                for s in seqs {
                    if let Some(e) = self.settle(chan_key, s) {
                        self.forget(&e);
                    }
                }
            }
            QueueCmd::Reject {
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
                } else {
                    for e in &entries {
                        self.dead_letter(&e.msg, Reason::Rejected);
                        self.forget(e);
                    }
                }
            }
            QueueCmd::Get {
                chan_key,
                no_ack,
                reply,
            } => self.get(chan_key, no_ack, reply),
            QueueCmd::ChannelClosed { chan_key } => {
                let before = self.consumers.len();
                self.consumers.retain(|c| c.chan_key != chan_key);
                if self.consumers.len() != before {
                    self.consumer_left();
                }
                let back = self.take_channel_unacked(chan_key);
                self.requeue(back);
                return self.maybe_auto_delete();
            }
            QueueCmd::Recover { chan_key } => {
                let back = self.take_channel_unacked(chan_key);
                self.requeue(back);
            }
            QueueCmd::Wake => {}
            QueueCmd::Touch => self.last_used = self.now,
            QueueCmd::Stats { reply } => {
                self.expire_heads();
                let ready = self.ready_count().min(u32::MAX as u64) as u32;
                let _ = reply.send((ready, self.consumers.len() as u32));
            }
            QueueCmd::Purge { reply } => {
                let mut n: u64 = 0;
                while let Some(e) = self.ready.pop_front() {
                    self.forget(&e);
                    n += 1;
                }
                if let Some(t) = self.tail.as_mut() {
                    n += t.len;
                    self.pending.push(MessageOp::RemoveRange {
                        queue: self.info.id,
                        from: t.cursor,
                        to: t.end,
                    });
                    for s in std::mem::take(&mut t.ahead) {
                        self.pending.push(MessageOp::RemoveRange {
                            queue: self.info.id,
                            from: s,
                            to: s + 1,
                        });
                    }
                    // Later arrivals from here on still go to disk.
                    t.end = self.max_seen + 1;
                    t.start = t.end;
                    t.cursor = t.end;
                    t.len = 0;
                    t.reading = false;
                    self.generations += 1;
                    t.generation = self.generations;
                }
                let _ = reply.send(n.min(u32::MAX as u64) as u32);
            }
            QueueCmd::Recovered { first, end, count } => {
                self.recovered_below = end;
                self.max_seen = self.max_seen.max(end.saturating_sub(1));
                self.generations += 1;
                self.tail = Some(Tail::new(first, end, count, self.generations));
            }
            QueueCmd::Paged { generation, page } => self.paged(generation, page),
            QueueCmd::Delete {
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
                if if_empty && self.ready_count() > 0 {
                    let _ = reply.send(Err(precondition(format!(
                        "queue '{name}' in vhost '{vhost}' is not empty"
                    ))));
                    return false;
                }
                let _ = reply.send(Ok(self.ready_count().min(u32::MAX as u64) as u32));
                self.cancel_all();
                return true;
            }
        }
        false
    }

    /// A message left the queue for good: remove its store entry (in this
    /// wake-up's batch).
    fn forget(&mut self, e: &Entry) {
        if let (true, Some(id), Some(_)) = (e.on_disk, e.msg.stored, &self.persister) {
            self.pending.push(MessageOp::Remove {
                queue: self.info.id,
                seq: e.seq,
                id,
            });
        }
    }

    fn flush_store(&mut self) {
        if let Some(p) = &self.persister {
            if !self.pending.is_empty() {
                p.submit_nowait(std::mem::take(&mut self.pending));
            }
        }
    }

    /// When a message arriving now expires: the queue TTL or its own
    /// `expiration`, whichever is sooner.
    fn expiry_for(&self, msg: &MessageRef) -> u64 {
        let ttl = match (self.args.message_ttl, per_message_ttl(msg)) {
            (Some(q), Some(m)) => Some(q.min(m)),
            (q, m) => q.or(m),
        };
        ttl.map_or(NEVER, |t| self.now.saturating_add(t))
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

    /// Remove the queue from its vhost (the actor stops right after).
    fn delete_self(&mut self) {
        self.cancel_all();
        if let Some(f) = self.on_auto_delete.take() {
            f(&self.info);
        }
    }

    fn maybe_auto_delete(&mut self) -> bool {
        if self.info.auto_delete && self.had_consumer && self.consumers.is_empty() {
            self.delete_self();
            return true;
        }
        false
    }
}

/// The per-message TTL: the `expiration` property, a string of milliseconds
/// (anything else is ignored).
fn per_message_ttl(msg: &MessageRef) -> Option<u64> {
    msg.header.expiration()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::{BufMut, Bytes};
    use warren_protocol::amqp::basic::{gen_properties, AMQPProperties};
    use warren_protocol::content::ContentHeader;
    use warren_protocol::method::ShortStr;

    fn entry(seq: u64, priority: Option<u8>, body: &'static str) -> Entry {
        let props = match priority {
            Some(p) => AMQPProperties::default().with_priority(p),
            None => AMQPProperties::default(),
        };
        let mut raw = Vec::new();
        raw.put_u16(60);
        raw.put_u16(0);
        raw.put_u64(body.len() as u64);
        let raw = cookie_factory::gen_simple(gen_properties(&props), raw).unwrap();
        Entry {
            seq,
            msg: Arc::new(Message {
                exchange: ShortStr::truncating(""),
                routing_key: ShortStr::truncating("q"),
                header: ContentHeader::parse(Bytes::from(raw)).unwrap(),
                body: Bytes::from_static(body.as_bytes()),
                stored: None,
            }),
            redelivered: false,
            expires: NEVER,
            on_disk: false,
        }
    }

    fn order(r: &mut Ready) -> Vec<u64> {
        std::iter::from_fn(|| r.pop_front().map(|e| e.seq)).collect()
    }

    #[test]
    fn without_priorities_ready_is_fifo() {
        let mut r = Ready::new(None);
        r.push_back(entry(1, Some(9), "a"));
        r.push_back(entry(2, None, "bb"));
        r.push_back(entry(3, Some(1), "ccc"));
        assert_eq!((r.len(), r.bytes), (3, 6));
        assert_eq!(order(&mut r), vec![1, 2, 3]);
        assert_eq!((r.len(), r.bytes), (0, 0));
    }

    #[test]
    fn priorities_go_first_fifo_within_a_level() {
        let mut r = Ready::new(Some(3));
        for (seq, p) in [
            (1, Some(1)),
            (2, None),
            (3, Some(200)),
            (4, Some(3)),
            (5, Some(1)),
        ] {
            r.push_back(entry(seq, p, "x"));
        }
        assert_eq!(order(&mut r), vec![3, 4, 1, 5, 2]);
    }

    #[test]
    fn requeue_inserts_by_sequence_within_its_level() {
        let mut r = Ready::new(Some(2));
        r.push_back(entry(2, Some(1), "x"));
        r.push_back(entry(5, Some(1), "x"));
        r.push_back(entry(4, Some(2), "x"));
        r.insert(entry(3, Some(1), "x"));
        r.insert(entry(1, Some(2), "x"));
        r.push_front(entry(0, None, "x"));
        assert_eq!(r.len(), 6);
        assert_eq!(order(&mut r), vec![1, 4, 2, 3, 5, 0]);
    }

    #[test]
    fn next_expiry_is_the_earliest_head() {
        let mut r = Ready::new(Some(1));
        assert_eq!(r.next_expiry(), NEVER);
        let mut a = entry(1, Some(1), "x");
        a.expires = 50;
        let mut b = entry(2, None, "x");
        b.expires = 20;
        let mut c = entry(3, None, "x");
        c.expires = 5; // behind b: not a head
        r.push_back(a);
        r.push_back(b);
        r.push_back(c);
        assert_eq!(r.next_expiry(), 20);
        let mut n = 0;
        while r.pop_front().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert_eq!((r.len(), r.bytes, r.next_expiry()), (0, 0, NEVER));
    }
}
