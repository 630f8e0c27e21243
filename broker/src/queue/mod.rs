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
//! Queue arguments ([`args`]) are the actor's too: message TTL
//! and per-message expiration (expired heads are dropped when they reach the
//! head, and proactively by one timer armed for the earliest head), `x-expires`
//! (the same timer deletes an unused queue), length limits with their overflow
//! behaviour, priority levels (`x-max-priority`), and dead-lettering
//! ([`dead_letter`]): the actor routes the dead message through the
//! [`DeadLetterRouter`] it was given at spawn (its vhost) and hands it to the target queues without a permit and without
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
//!
//! Files:
//! - [`handle`]: the [`QueueHandle`] and the mailbox's commands ([`QueueCmd`]).
//! - `actor`: the task and its state; the wake-up loop; enqueue; commands.
//! - `ready`: messages in memory, by priority level then sequence.
//! - `deliver`: dispatch to consumers, `basic.get`, settlement.
//! - `paging`: the on-disk tail and reading it back.
//! - `limits`: TTL, length limits, dead-lettering.
//! - [`args`]: the queue arguments, checked and decoded.
//! - [`dead_letter`]: the dead-lettered message and its `x-death` header.
//! - `timeouts`: consumer timeouts.
//! - `dedup`: queue-level deduplication.
//! - [`stream`]: streams (`x-queue-type: stream`), an actor of their own
//!   behind the same handle and mailbox.

mod actor;
pub mod args;
pub mod dead_letter;
mod dedup;
mod deliver;
pub mod handle;
mod limits;
mod paging;
pub mod quorum;
mod ready;
pub mod remote;
pub mod stream;
#[cfg(test)]
mod tests;
mod timeouts;

pub use actor::spawn;
pub use handle::{
    ChannelCredit, Consumer, ConsumerInfo, Got, OnAutoDelete, Publish, QueueCmd, QueueHandle,
    QueueStats, Seqs, StreamStats,
};

use crate::error::AmqpResult;
use crate::message::Message;
use std::sync::Arc;
use warren_protocol::types::FieldTable;

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
pub(crate) const PAGE_READ: usize = 1024;
/// A queue whose consumers are taking messages holds publishers back (keeps
/// their mailbox slots) while this many messages, or body bytes, wait in
/// its memory: the consumers set the pace, through TCP back-pressure on the
/// publishing connections, instead of the backlog growing until the memory
/// alarm. A queue without consumers is a buffer and is never held.
pub(crate) const HOLD_MESSAGES: usize = 4 * PAGE_WINDOW;
pub(crate) const HOLD_BYTES: u64 = 64 << 20;
/// ... unless its consumers have taken nothing for this long (stalled:
/// prefetch full and no acks); then publishers go on and the queue grows.
pub(crate) const HOLD_STALL_MS: u64 = 200;

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
    /// The node a queue of a cluster lives on, if not this one: this node
    /// holds a [`remote`] handle that forwards to it.
    pub home: Option<Arc<str>>,
    /// The Raft group of a quorum queue of a cluster: this node holds the
    /// queue's front (see [`quorum`]), which reaches its leader.
    pub quorum: Option<u64>,
}

/// Hand `msg` to `targets` without mailbox slots and without waiting: for
/// messages the broker makes itself (dead letters, delayed messages at
/// their due time), whose volume is bounded elsewhere. A persistent one is
/// stored first, under a fresh id, for its durable targets, in one batch
/// with `ops` (which is written in any case).
pub fn send_unreserved(
    persister: Option<&crate::persist::Persister>,
    mut msg: Message,
    targets: &[&QueueHandle],
    mut ops: Vec<warren_storage::MessageOp>,
) {
    use warren_storage::{EntryMeta, MessageOp};
    let stored = targets.iter().filter(|q| q.stored_by_publisher()).count() as u32;
    msg.stored = None;
    if let (true, true, Some(p)) = (msg.persistent(), stored > 0, persister) {
        let id = p.next_id();
        msg.stored = Some(id);
        ops.push(MessageOp::PutMessage {
            id,
            refs: stored,
            message: msg.to_stored(),
        });
    }
    let msg = Arc::new(msg);
    // No await from taking a sequence to sending (callers never wait).
    let seqs: Vec<u64> = targets.iter().map(|q| q.take_seq()).collect();
    if let Some(id) = msg.stored {
        let meta = EntryMeta {
            enqueued_at: crate::message::unix_ms(),
            deliveries: 0,
        };
        for (q, &seq) in targets.iter().zip(&seqs) {
            if q.stored_by_publisher() {
                ops.push(MessageOp::Enqueue {
                    queue: q.id(),
                    seq,
                    id,
                    meta,
                });
                ops.extend(q.dedup_put(&msg, seq));
            }
        }
    }
    if let (false, Some(p)) = (ops.is_empty(), persister) {
        p.submit_nowait(ops);
    }
    for (q, seq) in targets.iter().zip(seqs) {
        q.send(seq, msg.clone(), None, false);
    }
}

/// Where a queue's dead letters go: the queues a message published to its
/// exchange with its routing key reaches. The vhost implements it and hands
/// itself (weakly) to every queue it spawns, so the queue layer needs
/// nothing from the layer above it.
pub trait DeadLetterRouter: Send + Sync {
    /// The target queues; an error if the exchange does not exist.
    fn route_dead_letter(&self, msg: &Message) -> AmqpResult<Vec<QueueHandle>>;
}
