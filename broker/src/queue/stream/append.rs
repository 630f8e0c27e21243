//! A stream's writing side: appending (offsets, the `x-stream-offset`
//! header, segments), submitting a wake-up's appends as one store job,
//! taking the sync's answer, and retention.

use super::{
    segment_scope, Rec, Segment, Stream, DEFAULT_SEGMENT_BYTES, TAIL_BYTES,
    TAIL_BYTES_UNDER_PRESSURE, TAIL_MESSAGES, TAIL_UNDER_PRESSURE,
};
use crate::message::Message;
use crate::queue::handle::{Publish, QueueCmd};
use bytes::Bytes;
use std::sync::Arc;
use warren_protocol::content::HeaderLayout;
use warren_protocol::method::ShortStr;
use warren_protocol::types::AMQPValue;
use warren_storage::chunk::{ChunkWriter, RecordSpans};
use warren_storage::MessageOp;

/// The appends of this wake-up, written straight into the chunk the store
/// writes as it is; the in-memory tail gets them once the chunk is sealed,
/// as messages over the chunk's own bytes (no copy of their own, and
/// nothing of the publisher's read buffer kept).
pub(super) struct Building {
    chunk: ChunkWriter,
    recs: Vec<Pending>,
    /// Time index entries `(timestamp, offset)`.
    times: Vec<(u64, u64)>,
}

/// A record of the chunk being built, as the tail will need it.
struct Pending {
    ts: u64,
    spans: RecordSpans,
    header: HeaderLayout,
    filter: Option<Arc<[u8]>>,
}

/// Write `msg`'s header into `out` with `x-stream-offset` set; returns its
/// layout and the message's filter value.
fn write_header(
    msg: &Message,
    offset: u64,
    out: &mut Vec<u8>,
) -> (HeaderLayout, Option<Arc<[u8]>>) {
    const KEY: &[u8] = b"x-stream-offset";
    const FILTER: &[u8] = b"x-stream-filter-value";
    let contains = |t: &[u8], k: &[u8]| t.windows(k.len()).any(|w| w == k);
    // The common case, without decoding the table: the entry is added to
    // the publisher's table bytes (no offset or filter value there).
    if msg
        .header
        .headers_raw()
        .is_none_or(|t| !contains(t, KEY) && !contains(t, FILTER))
    {
        let mut entry = [0u8; 1 + KEY.len() + 1 + 8];
        entry[0] = KEY.len() as u8;
        entry[1..1 + KEY.len()].copy_from_slice(KEY);
        entry[1 + KEY.len()] = b'l';
        entry[2 + KEY.len()..].copy_from_slice(&(offset as i64).to_be_bytes());
        return (msg.header.write_with_entry(&entry, out), None);
    }
    let mut headers = msg.header.headers().unwrap_or_default();
    let filter = match headers.inner().get("x-stream-filter-value") {
        Some(AMQPValue::LongString(s)) => Some(Arc::from(s.as_bytes())),
        Some(AMQPValue::ShortString(s)) => Some(Arc::from(s.as_str().as_bytes())),
        _ => None,
    };
    headers.insert(
        "x-stream-offset".into(),
        AMQPValue::LongLongInt(offset as i64),
    );
    let header = msg
        .header
        .with_headers(&headers, false)
        .unwrap_or_else(|| msg.header.clone());
    (header.write_to(out), filter)
}

impl Stream {
    /// Give a message the next offset and write it in this wake-up's chunk.
    pub(super) fn append(&mut self, p: Publish) {
        self.counts.published += 1;
        self.permits += p.permit as u32;
        let offset = self.next;
        self.next += 1;
        let ts = self.wall_now().max(self.last_ts);
        self.last_ts = ts;
        if self.building.as_ref().is_some_and(|b| b.chunk.full()) {
            self.seal();
        }
        let b = self.building.get_or_insert_with(|| Building {
            chunk: ChunkWriter::new(offset, 16 << 10),
            recs: Vec::new(),
            times: Vec::new(),
        });
        debug_assert_eq!(b.chunk.next(), offset);
        let m = &p.msg;
        let (spans, (header, filter)) = b.chunk.push_parts(
            ts,
            m.exchange.as_bytes(),
            m.routing_key.as_bytes(),
            &m.body,
            |out| write_header(m, offset, out),
        );
        let size = (m.body.len() + header.len()) as u64;
        let sec = ts / 1000;
        // The time index: the first message of each second.
        if sec != self.indexed_sec {
            b.times.push((ts, offset));
        }
        self.indexed_sec = sec;
        b.recs.push(Pending {
            ts,
            spans,
            header,
            filter,
        });
        self.batch_from.get_or_insert(offset);
        if let Some(t) = p.confirm {
            self.tickets.push(t);
        }
        // The segment it belongs to; a full one ends with it.
        let seg = self.segments.back_mut().expect("a stream has a segment");
        seg.bytes += size;
        seg.last_ts = ts;
        if seg.bytes
            >= self
                .args
                .segment_bytes
                .unwrap_or(DEFAULT_SEGMENT_BYTES)
                .max(1)
        {
            let done = *seg;
            self.put_segment(done);
            self.segments.push_back(Segment {
                first: offset + 1,
                bytes: 0,
                last_ts: ts,
            });
        }
    }

    /// The chunk being built goes to this wake-up's store job, and its
    /// messages to the tail (readers see them once the job is synced).
    fn seal(&mut self) {
        let Some(b) = self.building.take() else {
            return;
        };
        let first = b.chunk.first();
        let v = Bytes::from(b.chunk.finish());
        // Copies of the publishers' short strings, valid as those were;
        // a run of messages to one exchange and key shares the first's.
        let short = |r: std::ops::Range<usize>, prev: &mut ShortStr| {
            if prev.as_bytes() != &v[r.clone()] {
                *prev = ShortStr::from_bytes(v.slice(r)).expect("a copy of a short string");
            }
            prev.clone()
        };
        let (mut exchange, mut routing_key) = (ShortStr::default(), ShortStr::default());
        for (i, p) in b.recs.into_iter().enumerate() {
            let header = p.header.with_raw(v.slice(p.spans.header));
            let body = v.slice(p.spans.body);
            self.tail_bytes += (body.len() + header.raw().len()) as u64;
            self.tail.push_back(Rec {
                offset: first + i as u64,
                ts: p.ts,
                msg: Arc::new(Message {
                    exchange: short(p.spans.exchange, &mut exchange),
                    routing_key: short(p.spans.routing_key, &mut routing_key),
                    header,
                    body,
                    stored: None,
                }),
                filter: p.filter,
            });
        }
        self.ops.push(MessageOp::StreamChunk {
            stream: self.info.id,
            first,
            records: v,
            times: b.times,
        });
    }

    pub(super) fn put_segment(&mut self, s: Segment) {
        self.ops.push(MessageOp::DedupPut {
            scope: segment_scope(self.info.id),
            key: Bytes::copy_from_slice(&s.first.to_be_bytes()),
            value: s.bytes,
        });
    }

    /// Submit this wake-up's writes: the appends (with the current
    /// segment's size) are confirmed, and become readable, after the sync.
    pub(super) fn flush(&mut self) {
        self.seal();
        self.save_dirty_offsets();
        if self.batch_from.take().is_none() {
            if !self.ops.is_empty() {
                self.persister.submit_nowait(std::mem::take(&mut self.ops));
            }
            return;
        }
        let cur = *self.segments.back().expect("a stream has a segment");
        self.put_segment(cur);
        let ops = std::mem::take(&mut self.ops);
        let tickets = std::mem::take(&mut self.tickets);
        let permits = std::mem::take(&mut self.permits);
        let upto = self.next;
        let me = self.myself.clone();
        self.persister.submit_then(
            ops,
            Box::new(move |ok| {
                if !ok {
                    tickets.iter().for_each(|t| t.nack());
                }
                crate::events::ConfirmTicket::settle_all(tickets);
                if let Some(me) = me.upgrade() {
                    let _ = me.send(QueueCmd::StreamCommitted { upto, permits, ok });
                }
            }),
        );
    }

    /// Appends up to `upto` are durable (or failed): consumers may have
    /// them; the publishers' slots come back; retention looks again.
    pub(super) fn committed(&mut self, upto: u64, permits: u32, ok: bool) {
        self.freed += permits as usize;
        let from = self.committed;
        if !ok {
            tracing::error!(stream = %self.info.name, from, upto, "stream append failed; those offsets are skipped");
            self.lost.push(from..upto);
        }
        if upto > from {
            self.last_chunk = from;
        }
        self.committed = self.committed.max(upto);
        // Memory: the oldest committed messages leave the tail.
        // Under memory pressure the tail shrinks to a small window (readers
        // behind it read from the store, as when it is full).
        let (most, most_bytes) = if self.persister.paging() {
            (TAIL_UNDER_PRESSURE, TAIL_BYTES_UNDER_PRESSURE)
        } else {
            (TAIL_MESSAGES, TAIL_BYTES)
        };
        while self.tail.len() > most || self.tail_bytes > most_bytes {
            match self.tail.front() {
                Some(r) if r.offset < self.committed => {
                    let r = self.tail.pop_front().expect("front exists");
                    self.tail_bytes -= (r.msg.body.len() + r.msg.header.raw().len()) as u64;
                    self.tail_start = r.offset + 1;
                }
                _ => break,
            }
        }
        self.retain();
    }

    /// Retention: drop whole segments, oldest first, while the stream is
    /// over its byte limit or the oldest segment is past the maximum age.
    /// The segment being written stays, and a segment goes only once the
    /// next one's first message is durable.
    pub(super) fn retain(&mut self) {
        let now = self.wall_now();
        let mut total: u64 = self.segments.iter().map(|s| s.bytes).sum();
        while self.segments.len() > 1 {
            let oldest = self.segments[0];
            let next_first = self.segments[1].first;
            let over = self.args.max_length_bytes.is_some_and(|m| total > m);
            let old = self
                .args
                .max_age
                .is_some_and(|age| oldest.last_ts.saturating_add(age) < now);
            if !(over || old) || next_first >= self.committed {
                break;
            }
            self.segments.pop_front();
            total -= oldest.bytes;
            self.ops.push(MessageOp::StreamTruncate {
                stream: self.info.id,
                before: next_first,
            });
            self.ops.push(MessageOp::DedupDelete {
                scope: segment_scope(self.info.id),
                key: Bytes::copy_from_slice(&oldest.first.to_be_bytes()),
                if_value: None,
            });
            self.first = next_first;
            tracing::debug!(first = next_first, "stream segment removed by retention");
        }
        while self.tail.front().is_some_and(|r| r.offset < self.first) {
            let r = self.tail.pop_front().expect("front exists");
            self.tail_bytes -= (r.msg.body.len() + r.msg.header.raw().len()) as u64;
            self.tail_start = r.offset + 1;
        }
        self.lost.retain(|r| r.end > self.first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::content::ContentHeader;
    use warren_protocol::types::{FieldTable, LongString};

    fn message(headers: Option<FieldTable>) -> Message {
        let mut props =
            warren_protocol::amqp::basic::AMQPProperties::default().with_delivery_mode(2);
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        Message {
            exchange: warren_protocol::method::ShortStr::from_bytes(bytes::Bytes::from_static(
                b"x",
            ))
            .unwrap(),
            routing_key: warren_protocol::method::ShortStr::from_bytes(bytes::Bytes::from_static(
                b"k",
            ))
            .unwrap(),
            header: ContentHeader::from_properties(props, 3).unwrap(),
            body: bytes::Bytes::from_static(b"abc"),
            stored: None,
        }
    }

    /// `m` as a stream stores it at `offset`, and its filter value.
    fn with_offset(m: &Message, offset: u64) -> (Message, Option<Arc<[u8]>>) {
        let mut out = b"x".to_vec();
        let (layout, filter) = write_header(m, offset, &mut out);
        let header = layout.with_raw(Bytes::from(out).slice(1..));
        (
            Message {
                exchange: m.exchange.clone(),
                routing_key: m.routing_key.clone(),
                header,
                body: m.body.clone(),
                stored: None,
            },
            filter,
        )
    }

    fn offset(m: &Message) -> Option<AMQPValue> {
        m.header.headers()?.inner().get("x-stream-offset").cloned()
    }

    #[test]
    fn the_offset_header_is_added_with_or_without_other_headers() {
        let (m, f) = with_offset(&message(None), 7);
        assert_eq!(offset(&m), Some(AMQPValue::LongLongInt(7)));
        assert_eq!(f, None);
        assert!(m.header.is_persistent());
        let mut h = FieldTable::default();
        h.insert("app".into(), AMQPValue::LongString(LongString::from("v")));
        let (m, f) = with_offset(&message(Some(h)), 1 << 40);
        let got = m.header.headers().unwrap();
        assert_eq!(
            got.inner().get("x-stream-offset"),
            Some(&AMQPValue::LongLongInt(1 << 40))
        );
        assert_eq!(
            got.inner().get("app"),
            Some(&AMQPValue::LongString(LongString::from("v")))
        );
        assert_eq!(f, None);
        // A filter value is found; an offset the publisher set is replaced.
        let mut h = FieldTable::default();
        h.insert(
            "x-stream-filter-value".into(),
            AMQPValue::LongString(LongString::from("eu")),
        );
        h.insert("x-stream-offset".into(), AMQPValue::LongLongInt(999));
        let (m, f) = with_offset(&message(Some(h)), 3);
        assert_eq!(offset(&m), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(f.as_deref(), Some(&b"eu"[..]));
        assert_eq!(m.body, bytes::Bytes::from_static(b"abc"));
    }
}
