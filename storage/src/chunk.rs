//! A stream chunk: consecutive records of one stream stored as one value,
//! `count (u32) ‖ record*`. A record is `timestamp (u64) ‖ length (u32) ‖
//! message`, and a message is its exchange, routing key, raw header and
//! body, each length-prefixed ([`crate::codec::Writer::bytes`]).
//!
//! The broker builds a chunk as it appends (one per wake-up of a stream,
//! split at [`CHUNK_RECORDS`] or [`CHUNK_BYTES`]), so the store writes it
//! as it is; stores and tests build them with [`ChunkWriter::push`].

use crate::codec::{Reader, Writer};
use crate::{StoreError, StoredMessage, StreamRecord};
use bytes::Bytes;
use std::ops::Range;

/// Records a chunk holds at most, and its size: a larger run of appends
/// is split.
pub const CHUNK_RECORDS: u32 = 4096;
pub const CHUNK_BYTES: usize = 4 << 20;

/// A chunk being written, from offset `first` on.
#[derive(Debug)]
pub struct ChunkWriter {
    first: u64,
    count: u32,
    buf: Vec<u8>,
}

/// Where a record's message parts are in its chunk's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSpans {
    pub exchange: Range<usize>,
    pub routing_key: Range<usize>,
    pub header: Range<usize>,
    pub body: Range<usize>,
}

impl ChunkWriter {
    /// A chunk starting at `first`, with room for `bytes` of records.
    pub fn new(first: u64, bytes: usize) -> ChunkWriter {
        let mut buf = Vec::with_capacity(4 + bytes.min(CHUNK_BYTES + (64 << 10)));
        buf.extend_from_slice(&0u32.to_be_bytes());
        ChunkWriter {
            first,
            count: 0,
            buf,
        }
    }
    pub fn first(&self) -> u64 {
        self.first
    }
    /// The offset the next record gets.
    pub fn next(&self) -> u64 {
        self.first + self.count as u64
    }
    pub fn count(&self) -> u32 {
        self.count
    }
    /// No more records should join it.
    pub fn full(&self) -> bool {
        self.count >= CHUNK_RECORDS || self.buf.len() >= CHUNK_BYTES
    }

    /// Add a record of a stored message.
    pub fn push(&mut self, timestamp: u64, m: &StoredMessage) {
        self.push_parts(timestamp, &m.exchange, &m.routing_key, &m.body, |out| {
            out.extend_from_slice(&m.header)
        });
    }

    /// Add a record whose header `header` writes straight into the chunk;
    /// returns where its parts are, and what `header` returned.
    pub fn push_parts<R>(
        &mut self,
        timestamp: u64,
        exchange: &[u8],
        routing_key: &[u8],
        body: &[u8],
        header: impl FnOnce(&mut Vec<u8>) -> R,
    ) -> (RecordSpans, R) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&timestamp.to_be_bytes());
        self.buf.extend_from_slice(&0u32.to_be_bytes());
        let mut w = Writer(std::mem::take(&mut self.buf));
        w.bytes(exchange).bytes(routing_key);
        let mut buf = w.0;
        let exchange_at = start + 12 + 4;
        let exchange_span = exchange_at..exchange_at + exchange.len();
        let routing_key_span = exchange_span.end + 4..exchange_span.end + 4 + routing_key.len();
        let header_len_at = buf.len();
        buf.extend_from_slice(&0u32.to_be_bytes());
        let made = header(&mut buf);
        let header_span = header_len_at + 4..buf.len();
        let header_len = (header_span.len() as u32).to_be_bytes();
        buf[header_len_at..header_len_at + 4].copy_from_slice(&header_len);
        let mut w = Writer(buf);
        w.bytes(body);
        self.buf = w.0;
        let body_span = self.buf.len() - body.len()..self.buf.len();
        let record_len = ((self.buf.len() - start - 12) as u32).to_be_bytes();
        self.buf[start + 8..start + 12].copy_from_slice(&record_len);
        self.count += 1;
        (
            RecordSpans {
                exchange: exchange_span,
                routing_key: routing_key_span,
                header: header_span,
                body: body_span,
            },
            made,
        )
    }

    /// The chunk's value: its count, then its records.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.count.to_be_bytes());
        self.buf
    }
}

/// How many records a chunk value holds (its first four bytes).
pub fn count(v: &[u8]) -> u64 {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_be_bytes(b) as u64)
}

/// Chunk values of consecutive records (each one's first offset the
/// previous one's next) as one value.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let total: u64 = parts.iter().map(|p| count(p)).sum();
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len() - 4).sum::<usize>() + 4);
    v.extend_from_slice(&(total as u32).to_be_bytes());
    for p in parts {
        v.extend_from_slice(&p[4..]);
    }
    v
}

/// A stored message whose parts are slices of `v`.
pub fn decode_message(v: Bytes) -> Result<StoredMessage, StoreError> {
    let mut r = Reader(&v);
    let mut part = || -> Result<Bytes, StoreError> { Ok(v.slice_ref(r.bytes()?)) };
    Ok(StoredMessage {
        exchange: part()?,
        routing_key: part()?,
        header: part()?,
        body: part()?,
    })
}

/// The records of the chunk value `v` stored under first offset `first`
/// from offset `from` on, `room` at most: only their bytes are copied out
/// of `v` (a page of a large chunk copies and decodes that page, not the
/// chunk).
pub fn decode_range(
    first: u64,
    v: &[u8],
    from: u64,
    room: usize,
) -> Result<Vec<StreamRecord>, StoreError> {
    let bad = || StoreError::Corrupt("stream chunk".into());
    let n = count(v);
    // (offset, timestamp, start, end) of each wanted record in `v`.
    let mut spans = Vec::with_capacity(room.min(n as usize));
    let mut at = 4usize;
    for i in 0..n {
        if spans.len() >= room {
            break;
        }
        let head = v.get(at..at + 12).ok_or_else(bad)?;
        let timestamp = u64::from_be_bytes(head[..8].try_into().map_err(|_| bad())?);
        let len = u32::from_be_bytes(head[8..].try_into().map_err(|_| bad())?) as usize;
        let end = (at + 12)
            .checked_add(len)
            .filter(|&e| e <= v.len())
            .ok_or_else(bad)?;
        if first + i >= from {
            spans.push((first + i, timestamp, at + 12, end));
        }
        at = end;
    }
    let (Some(&(_, _, start, _)), Some(&(_, _, _, stop))) = (spans.first(), spans.last()) else {
        return Ok(Vec::new());
    };
    let copy = Bytes::copy_from_slice(&v[start..stop]);
    spans
        .into_iter()
        .map(|(offset, timestamp, a, b)| {
            Ok(StreamRecord {
                offset,
                timestamp,
                message: decode_message(copy.slice(a - start..b - start))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u64) -> StoredMessage {
        StoredMessage {
            exchange: Bytes::from_static(b"ex"),
            routing_key: Bytes::from(format!("k{i}")),
            header: Bytes::from(vec![i as u8; 3]),
            body: Bytes::from(vec![7u8; i as usize]),
        }
    }

    #[test]
    fn records_written_by_parts_read_back_as_written_and_spans_locate_them() {
        let mut c = ChunkWriter::new(100, 0);
        let (spans, made) = c.push_parts(5, b"ex", b"key", b"body!", |out| {
            out.extend_from_slice(b"hdr");
            "made"
        });
        assert_eq!(made, "made");
        c.push(6, &message(3));
        assert_eq!((c.count(), c.next()), (2, 102));
        let v = Bytes::from(c.finish());
        assert_eq!(&v[spans.exchange.clone()], b"ex");
        assert_eq!(&v[spans.routing_key.clone()], b"key");
        assert_eq!(&v[spans.header.clone()], b"hdr");
        assert_eq!(&v[spans.body.clone()], b"body!");
        let recs = decode_range(100, &v, 0, usize::MAX).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].offset, recs[0].timestamp), (100, 5));
        assert_eq!(&recs[0].message.header[..], b"hdr");
        assert_eq!(&recs[0].message.body[..], b"body!");
        assert_eq!(recs[1].message, message(3));
        assert_eq!((recs[1].offset, recs[1].timestamp), (101, 6));
    }

    #[test]
    fn a_range_copies_and_decodes_only_its_records() {
        let mut c = ChunkWriter::new(100, 1024);
        for i in 0..10 {
            c.push(1000 + i, &message(i));
        }
        let v = c.finish();
        let offsets = |from, room| -> Vec<u64> {
            decode_range(100, &v, from, room)
                .unwrap()
                .iter()
                .map(|r| r.offset)
                .collect()
        };
        assert_eq!(offsets(0, usize::MAX), (100..110).collect::<Vec<_>>());
        assert_eq!(offsets(105, 2), vec![105, 106]);
        assert_eq!(offsets(110, 5), Vec::<u64>::new());
        let r = decode_range(100, &v, 108, 1).unwrap();
        assert_eq!(r[0].message, message(8));
        assert_eq!(r[0].timestamp, 1008);
        // A truncated chunk is an error, not a panic.
        assert!(decode_range(100, &v[..v.len() - 3], 0, usize::MAX).is_err());
    }

    #[test]
    fn joined_chunks_read_as_one() {
        let mut a = ChunkWriter::new(10, 0);
        let mut b = ChunkWriter::new(12, 0);
        for i in 0..2 {
            a.push(i, &message(i));
            b.push(i + 2, &message(i + 2));
        }
        let (a, b) = (a.finish(), b.finish());
        let v = join(&[&a, &b]);
        assert_eq!(count(&v), 4);
        let recs = decode_range(10, &v, 0, usize::MAX).unwrap();
        let got: Vec<_> = recs.iter().map(|r| (r.offset, r.message.clone())).collect();
        let want: Vec<_> = (0..4).map(|i| (10 + i, message(i))).collect();
        assert_eq!(got, want);
    }
}
