//! Streams (`x-queue-type: stream`): an append-only log that consumers read
//! by offset without removing anything, as RabbitMQ's stream queues over
//! AMQP 0-9-1. One actor per stream, behind the same [`QueueHandle`] and
//! mailbox as a queue, so publishing, routing, dead-lettering into it and
//! the management API need nothing special.
//!
//! Appends: the actor gives each message the next offset in arrival order,
//! adds the `x-stream-offset` header once (so every read of it, from memory
//! or disk, is ready to send), and writes the wake-up's messages straight
//! into one chunk, which the store writes as it is (`StreamChunk`), and
//! the in-memory tail keeps as messages over the same bytes; persistent or
//! not. Their confirms go out,
//! and consumers see them, once the group-commit sync has them: a message
//! a consumer saw is never lost, and an offset never names two messages.
//! Publishers' mailbox slots come back at that sync too, which bounds what
//! a stream has in flight.
//!
//! Reads: the newest messages stay in memory ([`TAIL_MESSAGES`],
//! [`TAIL_BYTES`]; far fewer under memory pressure) and serve consumers
//! near the end, however many; a consumer further back reads pages from
//! the store on the reader thread, with a read-ahead of its own bounded in
//! messages and bytes. Acks only return credit (and move
//! a tracked offset). Filters are applied per message, exactly.
//!
//! Retention: the log is cut into segments of
//! `x-stream-max-segment-size-bytes` (default 500 MB, as RabbitMQ); whole
//! segments go, oldest first, once the stream is over `x-max-length-bytes`
//! or a segment's newest message is older than `x-max-age`. The segment
//! being written is never removed. Segment sizes and tracked offsets are
//! stored beside the records (the store's small keyed map), so a restart
//! reads a handful of keys, not the log.

mod append;
mod consume;
mod read;

pub use consume::{parse as parse_consume, Start, StreamConsume, STREAM_CONSUMER_ARGS};
pub use read::StreamRead;

use super::args::QueueArgs;
use super::handle::{QueueCmd, QueueHandle};
use super::QueueInfo;
use crate::error::{access_refused, AmqpError};
use crate::events::{ConfirmTicket, ConnEvent};
use crate::message::MessageRef;
use crate::persist::Persister;
use bytes::Bytes;
use read::Reader;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use warren_storage::{MessageOp, MessageStore};

/// Messages kept in memory at the end of a stream, at most ...
pub const TAIL_MESSAGES: usize = 65_536;
/// ... and their bytes.
pub const TAIL_BYTES: u64 = 64 << 20;
/// The same while the broker's memory is under pressure (the paging
/// threshold, half the memory alarm's).
const TAIL_UNDER_PRESSURE: usize = 1024;
const TAIL_BYTES_UNDER_PRESSURE: u64 = 1 << 20;
/// Publishes a stream may have on their way to disk.
const STREAM_PERMITS: usize = 8192;
/// RabbitMQ's default segment size.
const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;
/// How often a stream with a maximum age looks for expired segments (and
/// at every new segment).
const AGE_CHECK: Duration = Duration::from_secs(10);
/// How many mailbox messages one wake-up takes.
const BATCH: usize = 256;

/// What a stream refuses that a queue does (540, a connection error, as
/// RabbitMQ): "basic.get not supported by stream queues queue 's' in
/// vhost '/'".
pub fn not_supported(what: &str, q: &QueueHandle) -> AmqpError {
    AmqpError::new(
        warren_protocol::reply::NOT_IMPLEMENTED,
        format!(
            "{what} not supported by stream queues queue '{}' in vhost '{}'",
            q.name(),
            q.info.vhost
        ),
    )
}

/// One message of the stream, in memory.
#[derive(Clone)]
pub struct Rec {
    pub offset: u64,
    /// When it was appended (Unix ms).
    pub ts: u64,
    pub msg: MessageRef,
    /// Its `x-stream-filter-value`.
    pub filter: Option<Arc<[u8]>>,
}

/// A run of offsets that is removed together.
#[derive(Clone, Copy, Debug)]
struct Segment {
    first: u64,
    bytes: u64,
    /// Append time of its newest message.
    last_ts: u64,
}

/// The store writes that remove everything of a deleted stream: its
/// records, time index, segment sizes and tracked offsets.
pub fn drop_ops(id: u64) -> Vec<MessageOp> {
    vec![
        MessageOp::StreamDrop { stream: id },
        MessageOp::DedupDropScope {
            scope: segment_scope(id),
        },
        MessageOp::DedupDropScope {
            scope: offset_scope(id),
        },
    ]
}

/// The store's keyed-map scope of a stream's segment sizes.
fn segment_scope(stream: u64) -> Bytes {
    scope(b's', stream)
}
/// ... and of its consumers' tracked offsets.
fn offset_scope(stream: u64) -> Bytes {
    scope(b'o', stream)
}
fn scope(kind: u8, stream: u64) -> Bytes {
    let mut s = Vec::with_capacity(9);
    s.push(kind);
    s.extend_from_slice(&stream.to_be_bytes());
    s.into()
}

/// A stream's message totals.
#[derive(Default)]
struct Counts {
    published: u64,
    delivered: u64,
    acked: u64,
}

pub(super) struct Stream {
    info: Arc<QueueInfo>,
    args: QueueArgs,
    persister: Persister,
    myself: mpsc::WeakUnboundedSender<QueueCmd>,
    /// The next offset to give out.
    next: u64,
    /// Offsets below this are durable (and may be read).
    committed: u64,
    /// The first offset kept.
    first: u64,
    /// The first offset of the last chunk committed (`x-stream-offset: last`).
    last_chunk: u64,
    /// Append time of the newest message (appends never go back in time).
    last_ts: u64,
    /// The second of the last time-index entry.
    indexed_sec: u64,
    /// The newest messages, offsets `tail_start..next`.
    tail: VecDeque<Rec>,
    tail_start: u64,
    tail_bytes: u64,
    /// This wake-up's appends and other store writes, and the confirms
    /// and mailbox slots that wait for them.
    building: Option<append::Building>,
    ops: Vec<MessageOp>,
    tickets: Vec<Arc<ConfirmTicket>>,
    permits: u32,
    /// The first offset appended in this wake-up.
    batch_from: Option<u64>,
    /// Offsets whose write failed: never delivered.
    lost: Vec<std::ops::Range<u64>>,
    segments: VecDeque<Segment>,
    readers: Vec<Reader>,
    registrations: u64,
    /// Tracked offsets, by consumer tag.
    tracked: FxHashMap<Arc<str>, u64>,
    counts: Counts,
    /// Mailbox slots to give back at the end of this wake-up.
    freed: usize,
    deleted: bool,
    epoch: std::time::Instant,
    wall_epoch: u64,
    now: u64,
}

/// What a stream finds in the store at start.
struct Found {
    bounds: Option<(u64, u64)>,
    segments: Vec<Segment>,
    tracked: Vec<(Bytes, u64)>,
    last_ts: u64,
}

fn find(store: &dyn MessageStore, id: u64) -> Result<Found, String> {
    let e = |e: warren_storage::StoreError| e.to_string();
    let bounds = store.stream_bounds(id).map_err(e)?;
    let mut sizes: Vec<(u64, u64)> = store
        .load_dedup(&segment_scope(id))
        .map_err(e)?
        .into_iter()
        .filter_map(|(k, bytes)| Some((u64::from_be_bytes(k.as_ref().try_into().ok()?), bytes)))
        .collect();
    sizes.sort_unstable();
    let tracked = store.load_dedup(&offset_scope(id)).map_err(e)?;
    let Some((first, last)) = bounds else {
        return Ok(Found {
            bounds,
            segments: Vec::new(),
            tracked,
            last_ts: 0,
        });
    };
    // Segments that start at or before the first record kept; the first
    // of them is where the stream starts now.
    let keep_from = sizes.iter().rposition(|&(f, _)| f <= first).unwrap_or(0);
    let mut sizes = sizes.split_off(keep_from.min(sizes.len()));
    if sizes.is_empty() {
        sizes.push((first, 0));
    }
    sizes[0].0 = first;
    let ts_at = |offset: u64| -> Result<u64, String> {
        Ok(store
            .read_stream(id, offset, 1)
            .map_err(e)?
            .first()
            .map_or(0, |r| r.timestamp))
    };
    let mut segments = Vec::with_capacity(sizes.len());
    for (i, &(f, bytes)) in sizes.iter().enumerate() {
        let end = sizes.get(i + 1).map_or(last + 1, |n| n.0);
        segments.push(Segment {
            first: f,
            bytes,
            last_ts: ts_at(end.saturating_sub(1).max(f))?,
        });
    }
    let last_ts = segments.last().map_or(0, |s| s.last_ts);
    Ok(Found {
        bounds,
        segments,
        tracked,
        last_ts,
    })
}

/// Start a stream's actor; returns its handle. Reads what the store holds
/// of it first (a few keys).
pub fn spawn(
    info: QueueInfo,
    args: QueueArgs,
    persister: Persister,
) -> Result<QueueHandle, String> {
    let found = persister.read_now(|s| find(s, info.id))?;
    let permits = Arc::new(Semaphore::new(STREAM_PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    let (first, next) = match found.bounds {
        Some((f, l)) => (f, l + 1),
        None => (0, 0),
    };
    let mut segments: VecDeque<Segment> = found.segments.into();
    if segments.is_empty() {
        segments.push_back(Segment {
            first: next,
            bytes: 0,
            last_ts: 0,
        });
    }
    let stream = Stream {
        info: info.clone(),
        args,
        persister,
        myself: tx.downgrade(),
        next,
        committed: next,
        first,
        last_chunk: next.saturating_sub(1).max(first),
        last_ts: found.last_ts,
        indexed_sec: found.last_ts / 1000,
        tail: VecDeque::new(),
        tail_start: next,
        tail_bytes: 0,
        building: None,
        ops: Vec::new(),
        tickets: Vec::new(),
        permits: 0,
        batch_from: None,
        lost: Vec::new(),
        segments,
        readers: Vec::new(),
        registrations: 0,
        tracked: found
            .tracked
            .into_iter()
            .map(|(k, v)| (Arc::from(String::from_utf8_lossy(&k).as_ref()), v))
            .collect(),
        counts: Counts::default(),
        freed: 0,
        deleted: false,
        epoch: std::time::Instant::now(),
        wall_epoch: crate::message::unix_ms(),
        now: 0,
    };
    if next > 0 {
        tracing::info!(vhost = %info.vhost, stream = %info.name, first, last = next - 1, segments = stream.segments.len(), "recovered stream");
    }
    let span = tracing::debug_span!("stream", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        stream.run(mailbox, permits.clone()),
        span,
    ));
    Ok(QueueHandle::new(info, permits, tx))
}

impl Stream {
    async fn run(
        mut self,
        mut mailbox: mpsc::UnboundedReceiver<QueueCmd>,
        permits: Arc<Semaphore>,
    ) {
        let mut ages = tokio::time::interval(AGE_CHECK);
        ages.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = ages.tick(), if self.args.max_age.is_some() => {
                    self.tick();
                    self.retain();
                }
            }
            self.dispatch();
            self.flush();
            let slots = std::mem::take(&mut self.freed);
            if slots > 0 {
                permits.add_permits(slots);
            }
        }
        self.flush();
        if self.deleted {
            self.persister.submit_nowait(drop_ops(self.info.id));
        }
        permits.close();
        mailbox.close();
        tracing::debug!("stream stopped");
    }

    fn tick(&mut self) {
        self.now = self.epoch.elapsed().as_millis() as u64;
    }

    fn wall_now(&self) -> u64 {
        self.wall_epoch + self.now
    }

    /// Remove the readers `gone` picks, keeping their offsets.
    fn end_readers(&mut self, gone: impl Fn(&Reader) -> bool) {
        let (gone, kept): (Vec<Reader>, Vec<Reader>) = std::mem::take(&mut self.readers)
            .into_iter()
            .partition(|r| gone(r));
        self.readers = kept;
        for r in &gone {
            self.save_offset(r);
        }
    }

    /// Serve one command; true when the stream is deleted.
    fn on_cmd(&mut self, c: QueueCmd) -> bool {
        match c {
            QueueCmd::Publish(p) => self.append(p),
            QueueCmd::StreamCommitted { upto, permits, ok } => self.committed(upto, permits, ok),
            QueueCmd::StreamRead(r) => self.read_done(*r),
            QueueCmd::Reconfigure(args) => {
                self.args = *args;
                self.retain();
            }
            QueueCmd::Consume { consumer, reply } => {
                let name = &self.info.name;
                let vhost = &self.info.vhost;
                if consumer.exclusive && !self.readers.is_empty()
                    || self.readers.iter().any(|r| r.c.exclusive)
                {
                    let _ = reply.send(Err(access_refused(format!(
                        "queue '{name}' in vhost '{vhost}' in exclusive use"
                    ))));
                    return false;
                }
                self.registrations += 1;
                let r = self.attach(*consumer);
                self.readers.push(r);
                let _ = reply.send(Ok(()));
            }
            QueueCmd::Cancel { chan_key, tag } => {
                if let Some(i) = self
                    .readers
                    .iter()
                    .position(|r| r.c.chan_key == chan_key && r.c.tag == tag)
                {
                    let r = self.readers.remove(i);
                    self.save_offset(&r);
                    let _ = r.c.conn.send(ConnEvent::CancelOk { chan_key, tag });
                }
            }
            QueueCmd::Ack { chan_key, seqs } => {
                for offset in seqs {
                    if self.acked(chan_key, offset) {
                        self.counts.acked += 1;
                    }
                }
            }
            // The channel refuses nack and reject on a stream (540)
            // before they get here; one that does only frees credit.
            QueueCmd::Reject { chan_key, seqs, .. } => {
                for offset in seqs {
                    self.acked(chan_key, offset);
                }
            }
            // A consumer of another node that its node no longer has: its
            // credit comes back and it leaves (at its offset).
            QueueCmd::Undelivered { chan_key, seqs } => {
                for offset in seqs {
                    self.acked(chan_key, offset);
                }
                self.end_readers(|r| r.c.conn.is_closed());
            }
            QueueCmd::Get { reply, .. } => {
                // The channel refuses basic.get on a stream (540).
                let _ = reply.send(None);
            }
            QueueCmd::ChannelClosed { chan_key } => {
                self.end_readers(|r| r.c.chan_key == chan_key);
            }
            QueueCmd::Recover { chan_key } => {
                for r in self.readers.iter_mut().filter(|r| r.c.chan_key == chan_key) {
                    r.rewind();
                }
            }
            QueueCmd::Wake | QueueCmd::Touch => {}
            QueueCmd::Stats { reply } => {
                let _ = reply.send((
                    self.count().min(u32::MAX as u64) as u32,
                    self.readers.len() as u32,
                ));
            }
            QueueCmd::Consumers { reply } => {
                let end = self.committed;
                let _ = reply.send(
                    self.readers
                        .iter()
                        .map(|r| super::handle::ConsumerInfo {
                            tag: r.c.tag.clone(),
                            conn_id: r.c.conn_id,
                            channel: r.c.channel,
                            ack_required: true,
                            exclusive: r.c.exclusive,
                            prefetch: r.c.prefetch,
                            priority: r.c.priority,
                            active: true,
                            timeout: None,
                            stream: Some((r.next, end.saturating_sub(r.next))),
                        })
                        .collect(),
                );
            }
            QueueCmd::Info { reply } => {
                let _ = reply.send(super::handle::QueueStats {
                    ready: self.count(),
                    ready_bytes: self.segments.iter().map(|s| s.bytes).sum(),
                    // As RabbitMQ: a stream's messages are all "ready";
                    // what consumers hold unacked is still in the stream.
                    unacked: 0,
                    consumers: self.readers.len() as u32,
                    published: self.counts.published,
                    delivered: self.counts.delivered,
                    acked: self.counts.acked,
                    redelivered: 0,
                    deduplicated: None,
                    stream: Some(super::handle::StreamStats {
                        first: (self.committed > self.first).then_some(self.first),
                        last: (self.committed > self.first).then(|| self.committed - 1),
                        segments: self.segments.len() as u64,
                    }),
                });
            }
            QueueCmd::Purge { reply } => {
                // The channel refuses queue.purge on a stream (540).
                let _ = reply.send(0);
            }
            QueueCmd::Recovered { .. } | QueueCmd::Paged { .. } => {}
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let name = &self.info.name;
                let vhost = &self.info.vhost;
                if if_unused && !self.readers.is_empty() {
                    let _ = reply.send(Err(crate::error::precondition(format!(
                        "queue '{name}' in vhost '{vhost}' in use"
                    ))));
                    return false;
                }
                if if_empty && self.count() > 0 {
                    let _ = reply.send(Err(crate::error::precondition(format!(
                        "queue '{name}' in vhost '{vhost}' is not empty"
                    ))));
                    return false;
                }
                let _ = reply.send(Ok::<u32, AmqpError>(
                    self.count().min(u32::MAX as u64) as u32
                ));
                for r in self.readers.drain(..) {
                    let _ = r.c.conn.send(ConnEvent::Cancelled {
                        chan_key: r.c.chan_key,
                        tag: r.c.tag.clone(),
                    });
                }
                return true;
            }
        }
        false
    }

    /// Messages the stream holds (committed, from the first kept).
    fn count(&self) -> u64 {
        self.committed.saturating_sub(self.first)
    }
}
