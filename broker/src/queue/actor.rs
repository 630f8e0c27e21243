//! The queue actor: one task per queue that owns all the queue's state and
//! serves its mailbox. A wake-up takes a batch of commands, then dispatches,
//! expires heads, submits the batch's store writes and asks for the next
//! page; mailbox slots go back to publishers once per wake-up (or are held,
//! see `HOLD_MESSAGES`). The actor never waits on anyone.
//!
//! The rest of the actor's behaviour lives beside it: `deliver` (dispatch,
//! get, settlement), `paging`, `limits` (TTL, length limits,
//! dead-lettering).

use super::args::{Overflow, QueueArgs};
use super::dead_letter::Reason;
use super::handle::{Consumer, Got, OnAutoDelete, Publish, QueueCmd, QueueHandle};
use super::paging::Tail;
use super::ready::{Entry, Ready, Unacked, NEVER};
use super::{DeadLetterRouter, QueueInfo};
use super::{HOLD_BYTES, HOLD_MESSAGES, HOLD_STALL_MS, PUBLISH_PERMITS};
use crate::error::{access_refused, precondition};
use crate::events::ConnEvent;
use crate::persist::Persister;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use warren_storage::MessageOp;

/// A connection's mailbox.
pub(super) type ConnTx = mpsc::UnboundedSender<ConnEvent>;

/// A `basic.get` waiting for a page: channel, no-ack, connection, reply.
pub(super) type ParkedGet = (u64, bool, Option<ConnTx>, oneshot::Sender<Option<Got>>);

/// The state one queue actor owns.
pub(super) struct Actor {
    pub(super) info: Arc<QueueInfo>,
    /// The arguments this queue acts on, decoded once.
    pub(super) args: QueueArgs,
    /// Routes dead-lettered messages: the queue's vhost, held weakly and
    /// never kept upgraded.
    pub(super) router: Weak<dyn DeadLetterRouter>,
    /// Ready messages, by priority then sequence.
    pub(super) ready: Ready,
    /// Delivered, awaiting ack, by sequence.
    pub(super) unacked: FxHashMap<u64, Unacked>,
    pub(super) consumers: Vec<Consumer>,
    /// Round-robin position in `consumers`.
    pub(super) next_consumer: usize,
    /// The highest sequence that has arrived.
    pub(super) max_seen: u64,
    /// Sequences below this were recovered from a previous run.
    pub(super) recovered_below: u64,
    /// The on-disk part of the queue while it pages.
    pub(super) tail: Option<Tail>,
    /// Last tail generation handed out.
    pub(super) generations: u64,
    /// Whether new messages may go to the tail (queues with priorities,
    /// a message TTL or length limits keep theirs in memory).
    pub(super) pageable: bool,
    /// Persistent messages in this queue are stored (durable, not exclusive).
    pub(super) persisted: bool,
    /// `basic.get`s waiting for a page read (the queue had messages only on disk).
    pub(super) parked_gets: VecDeque<ParkedGet>,
    /// The actor's own mailbox, for page-read replies (weak: the mailbox
    /// still closes when every handle is gone).
    pub(super) myself: mpsc::WeakUnboundedSender<QueueCmd>,
    /// Whether a consumer ever subscribed (auto-delete needs one first).
    pub(super) had_consumer: bool,
    pub(super) on_auto_delete: Option<OnAutoDelete>,
    /// Origin of the actor's coarse millisecond clock.
    pub(super) epoch: Instant,
    /// The same origin in Unix milliseconds (enqueue times are stored in
    /// wall-clock time, so they mean the same after a restart).
    pub(super) wall_epoch: u64,
    /// Milliseconds since `epoch`, read once per wake-up (a coarse clock).
    pub(super) now: u64,
    /// When the queue was last used (`x-expires`): a consumer left, a
    /// `basic.get`, a declare.
    pub(super) last_used: u64,
    /// The store: persistent messages that leave a durable queue are
    /// removed from disk; a paging queue writes and reads its tail.
    pub(super) persister: Option<Persister>,
    /// Store removals gathered during one wake-up, submitted together.
    pub(super) pending: Vec<MessageOp>,
    /// A quorum queue's leader: this queue's own store writes go here (to
    /// be replicated) instead of to the store; see [`spawn_replica`].
    pub(super) sink: Option<mpsc::UnboundedSender<Vec<MessageOp>>>,
    /// Set when the queue is deleted (not merely stopped at shutdown): only
    /// then are its stored messages dropped.
    pub(super) deleted: bool,
    /// Mailbox slots of publishes taken in this wake-up, given back at once.
    pub(super) freed: usize,
    /// Mailbox slots held back from publishers (see `HOLD_MESSAGES`).
    pub(super) held: usize,
    /// When a consumer last took a message (coarse clock).
    pub(super) last_delivery: u64,
    /// Message totals for operators (see `QueueStats`).
    pub(super) counts: Counts,
    /// `x-single-active-consumer`: the consumer that gets the messages
    /// (its channel key and tag).
    pub(super) active: Option<(u64, Arc<str>)>,
    /// Consumers registered so far (their registration order).
    pub(super) registrations: u64,
    /// When deliveries were last checked for consumer timeouts.
    pub(super) timeouts_checked: u64,
    /// `x-message-deduplication: true`: the keys of the messages held.
    pub(super) dedup: Option<Box<super::dedup::QueueDedup>>,
}

/// A queue's message totals (plain counters: the actor owns them).
#[derive(Default)]
pub(super) struct Counts {
    pub(super) published: u64,
    pub(super) delivered: u64,
    pub(super) acked: u64,
    pub(super) redelivered: u64,
}

/// Start a queue actor; returns its handle. `router` routes its dead
/// letters; `on_auto_delete` removes it from its vhost when it deletes
/// itself.
pub fn spawn(
    info: QueueInfo,
    args: QueueArgs,
    router: Weak<dyn DeadLetterRouter>,
    persister: Option<Persister>,
    on_auto_delete: OnAutoDelete,
) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PUBLISH_PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    let actor = Actor::new(info.clone(), args, router, persister, on_auto_delete, &tx);
    let span = tracing::debug_span!("queue", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(mailbox, permits.clone()),
        span,
    ));
    QueueHandle::new(info, permits, tx)
}

/// A message a quorum queue's leader takes over: sequence, message, when
/// it entered the queue (Unix ms), its delivery count.
pub type Adopted = (u64, crate::message::Message, u64, u32);

/// Start the queue actor of a quorum queue's leader, holding `adopted`
/// (the replicated messages, in sequence order). It shares `info` with the
/// queue's front (deliveries name the front's id). It never pages; its own
/// store writes (removals, delivery counts) go to `sink` to be replicated,
/// while dead letters it sends elsewhere are stored through `persister`.
/// Every adopted message counts as redelivered: the previous leader may
/// have delivered any of them.
pub fn spawn_replica(
    info: Arc<QueueInfo>,
    args: QueueArgs,
    router: Weak<dyn DeadLetterRouter>,
    persister: Option<Persister>,
    on_auto_delete: OnAutoDelete,
    sink: mpsc::UnboundedSender<Vec<MessageOp>>,
    adopted: Vec<Adopted>,
) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PUBLISH_PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let mut actor = Actor::new(info.clone(), args, router, persister, on_auto_delete, &tx);
    actor.sink = Some(sink);
    actor.pageable = false;
    actor.tick();
    for (seq, msg, enqueued_at, deliveries) in adopted {
        actor.adopt(seq, Arc::new(msg), enqueued_at, deliveries);
    }
    let handle = QueueHandle::new(info.clone(), permits.clone(), tx);
    handle.set_next_seq(actor.max_seen + 1);
    let span = tracing::debug_span!("queue", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(mailbox, permits),
        span,
    ));
    handle
}

/// Whether a queue with these settings may page new messages to disk
/// (queues with priorities, a message TTL or length limits keep theirs in
/// memory).
fn pageable(args: &QueueArgs) -> bool {
    args.max_priority.is_none()
        && args.message_ttl.is_none()
        && args.max_length.is_none()
        && args.max_length_bytes.is_none()
}

/// How many mailbox messages one wake-up takes before dispatching.
const BATCH: usize = 256;

impl Actor {
    /// The state of a new queue whose mailbox `mailbox` sends into; `args`
    /// are the settings in force (its arguments under the vhost's policies).
    pub(super) fn new(
        info: Arc<QueueInfo>,
        args: QueueArgs,
        router: Weak<dyn DeadLetterRouter>,
        persister: Option<Persister>,
        on_auto_delete: OnAutoDelete,
        mailbox: &mpsc::UnboundedSender<QueueCmd>,
    ) -> Actor {
        let pageable = pageable(&args);
        let info_args = info.arguments.clone();
        let info_id = info.id;
        Actor {
            persisted: info.durable && info.exclusive_owner.is_none(),
            info,
            ready: Ready::new(args.max_priority),
            args,
            router,
            unacked: FxHashMap::default(),
            consumers: Vec::new(),
            next_consumer: 0,
            max_seen: 0,
            recovered_below: 0,
            tail: None,
            generations: 0,
            pageable,
            parked_gets: VecDeque::new(),
            myself: mailbox.downgrade(),
            had_consumer: false,
            on_auto_delete: Some(on_auto_delete),
            epoch: Instant::now(),
            wall_epoch: crate::message::unix_ms(),
            now: 0,
            last_used: 0,
            persister,
            pending: Vec::new(),
            sink: None,
            deleted: false,
            freed: 0,
            held: 0,
            last_delivery: 0,
            counts: Counts::default(),
            active: None,
            registrations: 0,
            timeouts_checked: 0,
            dedup: crate::dedup::queue_enabled(&info_args).then(|| {
                Box::new(super::dedup::QueueDedup::new(
                    crate::dedup::header_name(&info_args)
                        .unwrap_or_else(|_| crate::dedup::DEFAULT_HEADER.to_owned()),
                    info_id,
                ))
            }),
        }
    }

    async fn run(
        mut self,
        mut mailbox: mpsc::UnboundedReceiver<QueueCmd>,
        permits: Arc<Semaphore>,
    ) {
        // One timer, re-armed for the next deadline (head expiry, x-expires).
        let timer = tokio::time::sleep_until(self.epoch + Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        'life: loop {
            tokio::select! {
                c = mailbox.recv() => {
                    let Some(c) = c else { break };
                    self.tick();
                    if self.on_cmd(c) {
                        self.deleted = true;
                        break;
                    }
                    for _ in 1..BATCH {
                        match mailbox.try_recv() {
                            Ok(c) => {
                                if self.on_cmd(c) {
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
            if self.check_timeouts() {
                self.deleted = true;
                break;
            }
            let slots = self.end_wakeup();
            if slots > 0 {
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
        // (A quorum queue's messages go with its Raft group.)
        if self.deleted && self.sink.is_none() {
            if let Some(p) = &self.persister {
                let mut ops = vec![MessageOp::DropQueue {
                    queue: self.info.id,
                }];
                if let Some(d) = &self.dedup {
                    ops.push(MessageOp::DedupDropScope {
                        scope: d.scope.clone(),
                    });
                }
                p.submit_nowait(ops);
            }
        }
        // Publishers waiting for a permit give up; later sends fail.
        permits.close();
        mailbox.close();
        tracing::debug!("queue stopped");
    }

    /// The work after every wake-up's commands: dispatch, expire heads,
    /// submit the store writes, ask for the next page. Returns the mailbox
    /// slots to give back to publishers now (the rest are held, see
    /// `HOLD_MESSAGES`).
    pub(super) fn end_wakeup(&mut self) -> usize {
        self.ensure_active();
        self.dispatch();
        self.expire_heads();
        self.flush_store();
        // After the flush: a read waits for every write submitted so far.
        self.page_in();
        let slots = std::mem::take(&mut self.freed) + std::mem::take(&mut self.held);
        if self.holding() {
            self.held = slots;
            0
        } else {
            slots
        }
    }

    /// `x-single-active-consumer`: when the active consumer is gone (it
    /// cancelled, its channel or connection closed), the next one takes
    /// over: the highest priority, then the earliest registered.
    pub(super) fn ensure_active(&mut self) {
        if !self.args.single_active {
            return;
        }
        let still_there = self.active.as_ref().is_some_and(|(k, t)| {
            self.consumers
                .iter()
                .any(|c| c.chan_key == *k && c.tag == *t)
        });
        if still_there {
            return;
        }
        self.active = self
            .consumers
            .iter()
            .max_by_key(|c| (c.priority, std::cmp::Reverse(c.order)))
            .map(|c| (c.chan_key, c.tag.clone()));
    }

    /// Read the coarse clock.
    pub(super) fn tick(&mut self) {
        self.now = self.epoch.elapsed().as_millis() as u64;
    }

    /// The coarse clock in Unix milliseconds.
    pub(super) fn wall_now(&self) -> u64 {
        self.wall_epoch + self.now
    }

    /// Whether publishers are held back: consumers are taking messages,
    /// and the backlog in memory is over the bound.
    pub(super) fn holding(&self) -> bool {
        !self.consumers.is_empty()
            && (self.ready.len() >= HOLD_MESSAGES || self.ready.bytes >= HOLD_BYTES)
            && self.now < self.last_delivery.saturating_add(HOLD_STALL_MS)
    }

    /// When the timer should next fire: the earliest head expiry, the
    /// moment an unused `x-expires` queue runs out, or when held publishers
    /// are let go if the consumers stall.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
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
        if let Some(check) = self.next_timeout_check() {
            at = at.min(check);
        }
        (at < NEVER).then(|| self.epoch + Duration::from_millis(at))
    }

    pub(super) fn enqueue(&mut self, p: Publish) {
        self.counts.published += 1;
        self.freed += p.permit as usize;
        self.max_seen = self.max_seen.max(p.seq);
        // The publisher stored it for this queue (before sending it here).
        let on_disk = p.msg.stored.is_some() && self.persisted;
        if self.dedup.is_some() && self.is_duplicate(&p.msg, p.seq, on_disk) {
            // Dropped as an idempotent success: the publisher hears ack.
            if let Some(t) = p.confirm {
                t.settle();
            }
            self.unstore(&Entry {
                seq: p.seq,
                msg: p.msg,
                redelivered: false,
                expires: NEVER,
                on_disk,
                enqueued_at: 0,
                deliveries: 0,
            });
            return;
        }
        if self.pageable && self.tail.as_ref().is_some_and(|t| p.seq >= t.start) {
            let confirm = self.page_out(p, on_disk);
            if let Some(t) = confirm {
                t.settle();
            }
            return;
        }
        let size = p.msg.body.len() as u64;
        let a = &self.args;
        if a.overflow != Overflow::DropHead {
            let full = a.max_length.is_some_and(|m| self.ready_count() >= m)
                || a.max_length_bytes
                    .is_some_and(|m| self.ready.bytes.saturating_add(size) > m);
            if full {
                if let Some(t) = p.confirm {
                    // Refused: the publisher hears basic.nack.
                    t.nack();
                    t.settle();
                }
                if a.overflow == Overflow::RejectPublishDlx {
                    self.dead_letter(&p.msg, Reason::MaxLen);
                }
                self.unstore(&Entry {
                    seq: p.seq,
                    msg: p.msg,
                    redelivered: false,
                    expires: NEVER,
                    on_disk,
                    enqueued_at: 0,
                    deliveries: 0,
                });
                return;
            }
        }
        let enqueued_at = self.wall_now();
        let expires = self.expiry_for(&p.msg, enqueued_at);
        self.ready.push_back(Entry {
            seq: p.seq,
            msg: p.msg,
            redelivered: false,
            expires,
            on_disk,
            enqueued_at,
            deliveries: 0,
        });
        // Enqueued in memory is this queue's part of the confirm (a
        // persistent message's store write settles its own part).
        if let Some(t) = p.confirm {
            t.settle();
        }
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

    /// A replicated message a new quorum queue leader holds (see
    /// [`spawn_replica`]): ready, redelivered, with its delivery count.
    fn adopt(
        &mut self,
        seq: u64,
        mut msg: crate::message::MessageRef,
        enqueued_at: u64,
        deliveries: u32,
    ) {
        self.max_seen = self.max_seen.max(seq);
        let entry = |msg| Entry {
            seq,
            msg,
            redelivered: true,
            expires: NEVER,
            on_disk: true,
            enqueued_at,
            deliveries,
        };
        if self.dedup.is_some() && self.is_duplicate(&msg, seq, true) {
            self.unstore(&entry(msg));
            return;
        }
        if deliveries > 0 {
            msg = self.counted(msg, deliveries);
        }
        let expires = self.expiry_for(&msg, enqueued_at);
        let mut e = entry(msg);
        e.expires = expires;
        self.ready.push_back(e);
    }

    /// Whether this queue's own messages are kept somewhere (the store, or
    /// a quorum queue's log) and must be removed from it when they leave.
    pub(super) fn keeps(&self) -> bool {
        self.persister.is_some() || self.sink.is_some()
    }

    /// Ready messages, in memory and on disk.
    pub(super) fn ready_count(&self) -> u64 {
        self.ready.len() as u64 + self.tail.as_ref().map_or(0, |t| t.len)
    }

    /// New settings in force (a policy changed). As RabbitMQ: a lower
    /// length limit drops (dead-letters) from the head at once under
    /// `drop-head`; a new message TTL applies to messages that arrive from
    /// now on; `x-expires` counts from the last use. A queue that may no
    /// longer page reads its on-disk tail back (see `page_in`).
    pub(super) fn reconfigure(&mut self, args: QueueArgs) {
        if args == self.args {
            return;
        }
        tracing::debug!(?args, "settings changed by policy");
        self.pageable = pageable(&args);
        self.args = args;
        if self.args.overflow == Overflow::DropHead {
            self.drop_heads_over_limit();
        }
    }

    /// Serve one command; true when the actor should stop (deleted).
    pub(super) fn on_cmd(&mut self, c: QueueCmd) -> bool {
        match c {
            QueueCmd::Publish(p) => self.enqueue(p),
            QueueCmd::Reconfigure(args) => self.reconfigure(*args),
            QueueCmd::Consume { consumer, reply } => {
                let name = &self.info.name;
                let vhost = &self.info.vhost;
                // An exclusive consumer on a single-active-consumer queue is
                // refused as RabbitMQ refuses it.
                if consumer.exclusive && (!self.consumers.is_empty() || self.args.single_active)
                    || self.consumers.iter().any(|c| c.exclusive)
                {
                    let _ = reply.send(Err(access_refused(format!(
                        "queue '{name}' in vhost '{vhost}' in exclusive use"
                    ))));
                    return false;
                }
                // Keep consumers ordered by priority, highest first.
                let mut consumer = *consumer;
                self.registrations += 1;
                consumer.order = self.registrations;
                let pos = self
                    .consumers
                    .partition_point(|c| c.priority >= consumer.priority);
                self.consumers.insert(pos, consumer);
                self.ensure_active();
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
                        self.counts.acked += 1;
                        self.unstore(&e);
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
                        self.unstore(e);
                    }
                }
            }
            QueueCmd::Undelivered { chan_key, seqs } => {
                let entries: Vec<Entry> = seqs
                    .into_iter()
                    .filter_map(|s| self.settle(chan_key, s))
                    .collect();
                self.put_back(entries);
                self.drop_gone_consumers();
                return self.maybe_auto_delete();
            }
            QueueCmd::Get {
                chan_key,
                no_ack,
                conn,
                reply,
            } => self.get(chan_key, no_ack, conn, reply),
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
            QueueCmd::Consumers { reply } => {
                let _ = reply.send(
                    self.consumers
                        .iter()
                        .map(|c| {
                            let active = !self.args.single_active
                                || self
                                    .active
                                    .as_ref()
                                    .is_some_and(|(k, t)| *k == c.chan_key && *t == c.tag);
                            c.info(active, c.timeout.or(self.args.consumer_timeout))
                        })
                        .collect(),
                );
            }
            QueueCmd::Info { reply } => {
                self.expire_heads();
                let _ = reply.send(super::handle::QueueStats {
                    ready: self.ready_count(),
                    ready_bytes: self.ready.bytes,
                    unacked: self.unacked.len() as u64,
                    consumers: self.consumers.len() as u32,
                    published: self.counts.published,
                    delivered: self.counts.delivered,
                    acked: self.counts.acked,
                    redelivered: self.counts.redelivered,
                    deduplicated: self.dedup.as_ref().map(|d| d.duplicates),
                    stream: None,
                });
            }
            QueueCmd::Purge { reply } => {
                let n = self.purge();
                if self.dedup.is_some() {
                    self.release_purged_keys();
                }
                let _ = reply.send(n.min(u32::MAX as u64) as u32);
            }
            QueueCmd::Recovered { first, end, count } => {
                if self.dedup.is_some() {
                    self.restore_keys(first, end);
                }
                self.recovered_below = end;
                self.max_seen = self.max_seen.max(end.saturating_sub(1));
                self.generations += 1;
                self.tail = Some(Tail::new(first, end, count, self.generations));
            }
            QueueCmd::Paged { generation, page } => self.paged(generation, page),
            // A stream's own commands; never sent to a queue.
            QueueCmd::StreamCommitted { .. } | QueueCmd::StreamRead(_) => {}
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
    pub(super) fn unstore(&mut self, e: &Entry) {
        if self.dedup.is_some() {
            self.release_key(e);
        }
        if let (true, Some(id), true) = (e.on_disk, e.msg.stored, self.keeps()) {
            self.pending.push(MessageOp::Remove {
                queue: self.info.id,
                seq: e.seq,
                id,
            });
        }
    }

    pub(super) fn flush_store(&mut self) {
        if let Some(sink) = &self.sink {
            if !self.pending.is_empty() {
                let _ = sink.send(std::mem::take(&mut self.pending));
            }
            return;
        }
        if let Some(p) = &self.persister {
            if !self.pending.is_empty() {
                p.submit_nowait(std::mem::take(&mut self.pending));
            }
        }
    }

    /// `queue.purge`: drop every ready message, in memory and on disk;
    /// returns how many.
    fn purge(&mut self) -> u64 {
        let mut n: u64 = 0;
        while let Some(e) = self.ready.pop_front() {
            self.unstore(&e);
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
        n
    }

    /// Tell every consumer's connection that the queue is gone.
    pub(super) fn cancel_all(&mut self) {
        for c in self.consumers.drain(..) {
            let _ = c.conn.send(ConnEvent::Cancelled {
                chan_key: c.chan_key,
                tag: c.tag.clone(),
            });
        }
    }

    /// Remove the queue from its vhost (the actor stops right after).
    pub(super) fn delete_self(&mut self) {
        self.cancel_all();
        if let Some(f) = self.on_auto_delete.take() {
            f(&self.info);
        }
    }

    pub(super) fn maybe_auto_delete(&mut self) -> bool {
        if self.info.auto_delete && self.had_consumer && self.consumers.is_empty() {
            self.delete_self();
            return true;
        }
        false
    }
}
