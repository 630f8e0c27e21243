//! A stream's consumers ("readers"): where each starts, handing them
//! messages from the in-memory tail or from their own read-ahead of store
//! pages, credit, acks and tracked offsets.

use super::consume::{Start, StreamConsume};
use super::{offset_scope, Rec, Stream};
use crate::events::ConnEvent;
use crate::message::{Message, MessageRef};
use crate::queue::handle::{Consumer, QueueCmd};
use crate::queue::FLOW_WINDOW;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use warren_protocol::types::AMQPValue;
use warren_storage::MessageOp;

/// Records one store read brings back at most ...
const READ_PAGE: usize = 4096;
/// ... and bytes of bodies and headers, at most (so a consumer's read-ahead
/// is bounded whatever the message size)...
const READ_BYTES: u64 = 4 << 20;
/// ... and a reader asks for the next page once it holds fewer than a
/// page, or half of READ_BYTES: the next page is read while the consumer
/// takes this one.
const READ_AHEAD_LOW: usize = READ_PAGE;
/// Messages a reader passes over (filtered out, too old) in one wake-up
/// before the stream lets the others have a turn.
const MAX_SCAN: usize = 65_536;

/// One stream consumer.
pub(super) struct Reader {
    pub(super) c: Consumer,
    settings: StreamConsume,
    /// The next offset to look at.
    pub(super) next: u64,
    /// Delivered, not yet acknowledged (offsets, in delivery order).
    pub(super) outstanding: VecDeque<u64>,
    /// Records read from the store for it, from `next` on, and their size.
    ahead: VecDeque<Rec>,
    ahead_bytes: u64,
    /// Store reads have covered offsets below this.
    fetched: u64,
    /// A read is under way.
    reading: bool,
    /// Bumped when the reader moves back (`basic.recover`): an older read
    /// is stale.
    generation: u64,
    /// Unique within the stream (matches reads to readers).
    id: u64,
    /// Messages appended before this (Unix ms) are passed over.
    min_ts: u64,
    /// `x-stream-automatic-offset-tracking`: its offset is stored.
    track: bool,
    /// Acks since its offset was last stored.
    dirty: bool,
}

/// Records read for a reader (the reader thread's reply).
pub struct StreamRead {
    reader: u64,
    generation: u64,
    /// Offsets below this were covered by the read.
    end: u64,
    records: Result<Vec<Rec>, String>,
}

/// Drop the first record of a read-ahead, and its weight.
fn pop_ahead(ahead: &mut VecDeque<Rec>, bytes: &mut u64) {
    if let Some(r) = ahead.pop_front() {
        *bytes = bytes.saturating_sub(size(&r));
    }
}

/// What a record weighs in memory (body and header).
fn size(r: &Rec) -> u64 {
    (r.msg.body.len() + r.msg.header.raw().len()) as u64
}

/// A message's `x-stream-filter-value`.
fn filter_value(msg: &Message) -> Option<Arc<[u8]>> {
    match msg.header.headers()?.inner().get("x-stream-filter-value")? {
        AMQPValue::LongString(s) => Some(Arc::from(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Arc::from(s.as_str().as_bytes())),
        _ => None,
    }
}

impl Reader {
    /// Read again from its oldest unacknowledged delivery.
    pub(super) fn rewind(&mut self) {
        if let Some(&o) = self.outstanding.front() {
            self.next = o;
        }
        self.outstanding.clear();
        self.ahead.clear();
        self.ahead_bytes = 0;
        self.fetched = self.next;
        self.reading = false;
        self.generation += 1;
    }

    /// Where a tracked consumer resumes: its oldest unacknowledged
    /// delivery, else the next offset it would look at.
    fn resume_at(&self) -> u64 {
        self.outstanding.front().copied().unwrap_or(self.next)
    }
}

impl Stream {
    /// A new reader for `c`, placed where its arguments say (a tracked
    /// consumer without `x-stream-offset` resumes where it got to).
    pub(super) fn attach(&mut self, mut c: Consumer) -> Reader {
        let settings = c.stream.take().map(|b| *b).unwrap_or_default();
        let start = settings
            .start
            .or_else(|| {
                settings
                    .track
                    .then(|| self.tracked.get(&c.tag).map(|&o| Start::Offset(o)))
                    .flatten()
            })
            .unwrap_or(Start::Next);
        let (next, min_ts) = match start {
            Start::First => (self.first, 0),
            Start::Last => (self.last_chunk.max(self.first).min(self.next), 0),
            Start::Next => (self.next, 0),
            Start::Offset(o) => (o.max(self.first), 0),
            Start::Time(ms) => (self.seek(ms), ms),
        };
        Reader {
            c,
            track: settings.track,
            settings,
            next,
            outstanding: VecDeque::new(),
            ahead: VecDeque::new(),
            ahead_bytes: 0,
            fetched: next,
            reading: false,
            generation: 0,
            id: self.registrations,
            min_ts,
            dirty: false,
        }
    }

    /// Where to start for the messages appended at `ms` or later: in the
    /// tail without a read, else from the store's time index (which lands
    /// at most a second early; older messages are passed over).
    fn seek(&self, ms: u64) -> u64 {
        if ms > self.last_ts {
            return self.next;
        }
        if self.tail.front().is_some_and(|r| r.ts <= ms) {
            return self.tail_start + self.tail.partition_point(|r| r.ts < ms) as u64;
        }
        let id = self.info.id;
        match self.persister.read_now(|s| s.stream_seek_time(id, ms)) {
            Ok(Some(o)) => o.max(self.first),
            Ok(None) => self.next,
            Err(e) => {
                tracing::warn!(error = %e, "stream time index read failed; starting at the first offset");
                self.first
            }
        }
    }

    /// Hand every reader what it has credit for.
    pub(super) fn dispatch(&mut self) {
        let mut again = false;
        for i in 0..self.readers.len() {
            again |= self.feed(i);
        }
        if again {
            if let Some(me) = self.myself.upgrade() {
                let _ = me.send(QueueCmd::Wake);
            }
        }
    }

    /// Deliver to reader `i`; true if it stopped early to let others run.
    fn feed(&mut self, i: usize) -> bool {
        let committed = self.committed;
        let first = self.first;
        let tail_start = self.tail_start;
        let avg_size = self.tail_bytes / self.tail.len().max(1) as u64;
        let r = &mut self.readers[i];
        let mut scanned = 0;
        let mut yielded = false;
        // What this wake-up hands the reader goes out as one event.
        let mut batch: Vec<(MessageRef, bool, u64)> = Vec::new();
        loop {
            let c = &r.c;
            if r.outstanding.len() as u32 >= c.prefetch
                || c.in_flight.load(Ordering::Acquire) >= FLOW_WINDOW
            {
                break;
            }
            if r.next < first {
                r.next = first;
            }
            while r.ahead.front().is_some_and(|a| a.offset < r.next) {
                pop_ahead(&mut r.ahead, &mut r.ahead_bytes);
            }
            if r.next >= committed {
                break;
            }
            let from_ahead = r.ahead.front().is_some_and(|a| a.offset == r.next);
            let rec = if from_ahead {
                r.ahead.front().expect("checked").clone()
            } else if r.next >= tail_start {
                self.tail[(r.next - tail_start) as usize].clone()
            } else if let Some(a) = r.ahead.front() {
                // A gap (retention, a failed write): go on from the next.
                r.next = a.offset;
                continue;
            } else if r.next < r.fetched {
                r.next = r.fetched;
                continue;
            } else {
                break; // waits for a read
            };
            scanned += 1;
            if scanned > MAX_SCAN {
                yielded = true;
                break;
            }
            let skip = rec.ts < r.min_ts
                || !r.settings.wants(rec.filter.as_deref())
                || (!self.lost.is_empty() && self.lost.iter().any(|l| l.contains(&rec.offset)));
            if !skip {
                if !c.channel_credit.try_acquire() {
                    break;
                }
                c.in_flight.fetch_add(1, Ordering::AcqRel);
                batch.push((rec.msg, false, rec.offset));
                r.outstanding.push_back(rec.offset);
                self.counts.delivered += 1;
            }
            r.next = rec.offset + 1;
            if from_ahead {
                pop_ahead(&mut r.ahead, &mut r.ahead_bytes);
            }
        }
        if !batch.is_empty() {
            let ev = r.c.deliveries(self.info.id, batch.into_iter());
            // A connection that is gone has its ChannelClosed on the way,
            // which drops this reader; a stream loses nothing by it.
            let _ = r.c.conn.send(ev);
        }
        // Read ahead from the store while it is behind the tail.
        let from = r.fetched.max(r.next);
        if !r.reading
            && from < tail_start
            && from < committed
            && r.ahead.len() < READ_AHEAD_LOW
            && r.ahead_bytes < READ_BYTES / 2
        {
            r.reading = true;
            // Sized by the tail's average message, so that large messages
            // are not read only to be dropped by the byte cap.
            let avg = avg_size.max(1);
            let limit = READ_PAGE
                .min((READ_BYTES / avg) as usize + 1)
                .min((tail_start - from) as usize);
            let (id, reader, generation) = (self.info.id, r.id, r.generation);
            let filters = r.settings.filter.is_some();
            let me = self.myself.clone();
            self.persister.read_with(Box::new(move |store| {
                let read = store.read_stream(id, from, limit);
                // A full page covers up to its last record; a short one
                // reached the end of what is stored.
                let end = match &read {
                    Ok(v) if v.len() >= limit => v.last().map_or(tail_start, |l| l.offset + 1),
                    _ => tail_start,
                }
                .min(tail_start);
                let mut end = end;
                let records = read.map_err(|e| e.to_string()).map(|recs| {
                    // At most READ_BYTES (at least one record): the rest is
                    // read again next time.
                    let mut bytes = 0u64;
                    let keep = recs
                        .iter()
                        .position(|x| {
                            bytes += (x.message.body.len() + x.message.header.len()) as u64;
                            bytes > READ_BYTES
                        })
                        .map_or(recs.len(), |i| i.max(1));
                    if keep < recs.len() {
                        end = end.min(recs[keep].offset);
                    }
                    recs.into_iter()
                        .take(keep)
                        .filter(|x| x.offset < tail_start)
                        .filter_map(|x| {
                            let mut msg = Message::from_stored(0, x.message)?;
                            msg.stored = None;
                            let filter = if filters { filter_value(&msg) } else { None };
                            Some(Rec {
                                offset: x.offset,
                                ts: x.timestamp,
                                msg: Arc::new(msg),
                                filter,
                            })
                        })
                        .collect::<Vec<_>>()
                });
                if let Some(me) = me.upgrade() {
                    let _ = me.send(QueueCmd::StreamRead(Box::new(StreamRead {
                        reader,
                        generation,
                        end,
                        records,
                    })));
                }
            }));
        }
        yielded
    }

    /// A store read for a reader came back.
    pub(super) fn read_done(&mut self, read: StreamRead) {
        let Some(i) = self.readers.iter().position(|r| r.id == read.reader) else {
            return;
        };
        let r = &mut self.readers[i];
        if r.generation != read.generation {
            return;
        }
        r.reading = false;
        match read.records {
            Ok(recs) => {
                let next = r.next;
                for x in recs.into_iter().filter(|x| x.offset >= next) {
                    r.ahead_bytes += size(&x);
                    r.ahead.push_back(x);
                }
                r.fetched = r.fetched.max(read.end);
            }
            Err(e) => {
                // The consumer cannot go on: it is cancelled (the client
                // hears basic.cancel and may consume again).
                tracing::error!(error = %e, stream = %self.info.name, "stream read failed; cancelling the consumer");
                let r = self.readers.remove(i);
                let _ = r.c.conn.send(ConnEvent::Cancelled {
                    chan_key: r.c.chan_key,
                    tag: r.c.tag.clone(),
                });
            }
        }
    }

    /// An ack from channel `chan_key` for `offset`: its reader's credit
    /// comes back. False if no reader had it outstanding.
    pub(super) fn acked(&mut self, chan_key: u64, offset: u64) -> bool {
        for r in self.readers.iter_mut().filter(|r| r.c.chan_key == chan_key) {
            if let Some(pos) = r.outstanding.iter().position(|&o| o == offset) {
                r.outstanding.remove(pos);
                r.dirty |= r.track;
                return true;
            }
        }
        false
    }

    /// Store a tracked reader's offset (it is leaving).
    pub(super) fn save_offset(&mut self, r: &Reader) {
        if r.track {
            let at = r.resume_at();
            self.put_offset(r.c.tag.clone(), at);
        }
    }

    /// Store the offsets of tracked readers that had acks (once per
    /// wake-up, in the wake-up's job).
    pub(super) fn save_dirty_offsets(&mut self) {
        let mut changed = Vec::new();
        for r in self.readers.iter_mut().filter(|r| r.dirty) {
            r.dirty = false;
            changed.push((r.c.tag.clone(), r.resume_at()));
        }
        for (tag, at) in changed {
            self.put_offset(tag, at);
        }
    }

    fn put_offset(&mut self, tag: Arc<str>, at: u64) {
        if self.tracked.get(&tag) == Some(&at) {
            return;
        }
        self.ops.push(MessageOp::DedupPut {
            scope: offset_scope(self.info.id),
            key: Bytes::copy_from_slice(tag.as_bytes()),
            value: at,
        });
        self.tracked.insert(tag, at);
    }
}
