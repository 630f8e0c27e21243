//! Client-side encoding for Warren's load generator and tests: the frames a
//! client sends, hand-encoded into one `BytesMut` so that a whole batch goes
//! out in one write, and an incremental frame parser that borrows from the
//! read buffer.
//!
//! The broker never uses this module (it decodes with [`crate::method`]);
//! warren-perf's producers and consumers run on it, its fake sink broker
//! reuses the framing, and the integration tests' raw client builds its
//! frames with it.

use crate::frame::{self, FrameError, FRAME_END, HEADER_LEN};
use bytes::{BufMut, BytesMut};

pub use crate::frame::PROTOCOL_HEADER;
pub use crate::method::put_ack;

// (class, method) pairs.
pub const CONNECTION_START: (u16, u16) = (10, 10);
pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
pub const CHANNEL_FLOW: (u16, u16) = (20, 20);
pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
pub const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
pub const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
pub const EXCHANGE_DECLARE_OK: (u16, u16) = (40, 11);
pub const EXCHANGE_DELETE: (u16, u16) = (40, 20);
pub const EXCHANGE_DELETE_OK: (u16, u16) = (40, 21);
pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
pub const QUEUE_BIND: (u16, u16) = (50, 20);
pub const QUEUE_BIND_OK: (u16, u16) = (50, 21);
pub const QUEUE_DELETE: (u16, u16) = (50, 40);
pub const QUEUE_DELETE_OK: (u16, u16) = (50, 41);
pub const BASIC_QOS: (u16, u16) = (60, 10);
pub const BASIC_QOS_OK: (u16, u16) = (60, 11);
pub const BASIC_CONSUME: (u16, u16) = (60, 20);
pub const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
pub const BASIC_CANCEL: (u16, u16) = (60, 30);
pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
pub const BASIC_DELIVER: (u16, u16) = (60, 60);
pub const BASIC_GET: (u16, u16) = (60, 70);
pub const BASIC_GET_OK: (u16, u16) = (60, 71);
pub const BASIC_GET_EMPTY: (u16, u16) = (60, 72);
pub const BASIC_ACK: (u16, u16) = (60, 80);
pub const BASIC_NACK: (u16, u16) = (60, 120);
pub const CONFIRM_SELECT: (u16, u16) = (85, 10);
pub const CONFIRM_SELECT_OK: (u16, u16) = (85, 11);

/// Write one method frame; `args` appends the arguments.
pub fn method(buf: &mut BytesMut, ch: u16, id: (u16, u16), args: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    frame::put_header(buf, frame::METHOD, ch, 0);
    buf.put_u16(id.0);
    buf.put_u16(id.1);
    args(buf);
    let size = (buf.len() - start - HEADER_LEN) as u32;
    buf[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    buf.put_u8(FRAME_END);
}

/// Append a short string (cut at 255 bytes).
pub fn short(buf: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(255)];
    buf.put_u8(s.len() as u8);
    buf.put_slice(s);
}

/// Append a long string.
pub fn long(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u32(s.len() as u32);
    buf.put_slice(s);
}

/// Append a field table of long-string values, length prefix included.
pub fn table(buf: &mut BytesMut, entries: &[(&str, &str)]) {
    let mut t = BytesMut::new();
    for (k, v) in entries {
        short(&mut t, k.as_bytes());
        t.put_u8(b'S');
        long(&mut t, v.as_bytes());
    }
    long(buf, &t);
}

// ---- client → server ----

/// `connection.start-ok` with PLAIN credentials; `client_properties` is an
/// encoded field table (length prefix included, see [`table`]), written as
/// given.
pub fn start_ok(buf: &mut BytesMut, client_properties: &[u8], user: &str, pass: &str) {
    method(buf, 0, CONNECTION_START_OK, |b| {
        b.put_slice(client_properties);
        short(b, b"PLAIN");
        long(b, format!("\0{user}\0{pass}").as_bytes());
        short(b, b"en_US");
    });
}

pub fn tune_ok(buf: &mut BytesMut, channel_max: u16, frame_max: u32, heartbeat: u16) {
    method(buf, 0, CONNECTION_TUNE_OK, |b| {
        b.put_u16(channel_max);
        b.put_u32(frame_max);
        b.put_u16(heartbeat);
    });
}

pub fn open(buf: &mut BytesMut, vhost: &str) {
    method(buf, 0, CONNECTION_OPEN, |b| {
        short(b, vhost.as_bytes());
        short(b, b"");
        b.put_u8(0);
    });
}

pub fn connection_close(buf: &mut BytesMut) {
    method(buf, 0, CONNECTION_CLOSE, |b| {
        b.put_u16(200);
        short(b, b"bye");
        b.put_u16(0);
        b.put_u16(0);
    });
}

pub fn channel_open(buf: &mut BytesMut, ch: u16) {
    method(buf, ch, CHANNEL_OPEN, |b| short(b, b""));
}

pub fn exchange_declare(buf: &mut BytesMut, ch: u16, name: &str, kind: &str, durable: bool) {
    method(buf, ch, EXCHANGE_DECLARE, |b| {
        b.put_u16(0);
        short(b, name.as_bytes());
        short(b, kind.as_bytes());
        b.put_u8(if durable { 2 } else { 0 });
        b.put_u32(0);
    });
}

pub fn exchange_delete(buf: &mut BytesMut, ch: u16, name: &str) {
    method(buf, ch, EXCHANGE_DELETE, |b| {
        b.put_u16(0);
        short(b, name.as_bytes());
        b.put_u8(0);
    });
}

/// `queue.declare` flag bits (the `flags` of [`queue_declare_with`]).
pub const PASSIVE: u8 = 1;
pub const DURABLE: u8 = 2;
pub const EXCLUSIVE: u8 = 4;

pub fn queue_declare(buf: &mut BytesMut, ch: u16, name: &str, durable: bool) {
    let flags = if durable { DURABLE } else { 0 };
    queue_declare_with(buf, ch, name, flags, &0u32.to_be_bytes());
}

/// `queue.declare` with any flags and an encoded arguments table (length
/// prefix included), which is written as given.
pub fn queue_declare_with(buf: &mut BytesMut, ch: u16, name: &str, flags: u8, arguments: &[u8]) {
    method(buf, ch, QUEUE_DECLARE, |b| {
        b.put_u16(0);
        short(b, name.as_bytes());
        b.put_u8(flags);
        b.put_slice(arguments);
    });
}

pub fn queue_bind(buf: &mut BytesMut, ch: u16, queue: &str, exchange: &str, key: &str) {
    method(buf, ch, QUEUE_BIND, |b| {
        b.put_u16(0);
        short(b, queue.as_bytes());
        short(b, exchange.as_bytes());
        short(b, key.as_bytes());
        b.put_u8(0);
        b.put_u32(0);
    });
}

pub fn queue_delete(buf: &mut BytesMut, ch: u16, name: &str) {
    method(buf, ch, QUEUE_DELETE, |b| {
        b.put_u16(0);
        short(b, name.as_bytes());
        b.put_u8(0);
    });
}

pub fn qos(buf: &mut BytesMut, ch: u16, prefetch: u16) {
    method(buf, ch, BASIC_QOS, |b| {
        b.put_u32(0);
        b.put_u16(prefetch);
        b.put_u8(0);
    });
}

pub fn consume(buf: &mut BytesMut, ch: u16, queue: &str, tag: &str, no_ack: bool) {
    consume_with(buf, ch, queue, tag, no_ack, &0u32.to_be_bytes());
}

/// `basic.consume` with an encoded arguments table (length prefix
/// included), written as given.
pub fn consume_with(
    buf: &mut BytesMut,
    ch: u16,
    queue: &str,
    tag: &str,
    no_ack: bool,
    arguments: &[u8],
) {
    method(buf, ch, BASIC_CONSUME, |b| {
        b.put_u16(0);
        short(b, queue.as_bytes());
        short(b, tag.as_bytes());
        b.put_u8(if no_ack { 2 } else { 0 });
        b.put_slice(arguments);
    });
}

pub fn confirm_select(buf: &mut BytesMut, ch: u16) {
    method(buf, ch, CONFIRM_SELECT, |b| b.put_u8(0));
}

/// `basic.publish` (not mandatory, not immediate).
pub fn publish(buf: &mut BytesMut, ch: u16, exchange: &str, routing_key: &str) {
    method(buf, ch, BASIC_PUBLISH, |b| {
        b.put_u16(0);
        short(b, exchange.as_bytes());
        short(b, routing_key.as_bytes());
        b.put_u8(0);
    });
}

/// A `basic` content header frame with no properties but, if `persistent`,
/// delivery-mode 2.
pub fn content_header(buf: &mut BytesMut, ch: u16, body_size: u64, persistent: bool) {
    let size = 2 + 2 + 8 + 2 + persistent as usize;
    frame::put_header(buf, frame::HEADER, ch, size);
    buf.put_u16(60);
    buf.put_u16(0);
    buf.put_u64(body_size);
    if persistent {
        buf.put_u16(0x1000); // delivery-mode present
        buf.put_u8(2);
    } else {
        buf.put_u16(0);
    }
    buf.put_u8(FRAME_END);
}

/// The bytes in front of every message body: the basic.publish method frame
/// and the content header frame, identical for every message of a producer.
pub fn publish_prefix(
    ch: u16,
    exchange: &str,
    routing_key: &str,
    body_size: usize,
    persistent: bool,
) -> BytesMut {
    let mut buf = BytesMut::new();
    publish(&mut buf, ch, exchange, routing_key);
    content_header(&mut buf, ch, body_size as u64, persistent);
    buf
}

/// Append one whole message: the prefix, then the body in frames that fit
/// `frame_max`, its first 8 bytes replaced by `stamp` when the body is that long.
#[inline]
pub fn put_message(
    buf: &mut BytesMut,
    prefix: &[u8],
    ch: u16,
    body: &[u8],
    frame_max: u32,
    stamp: u64,
) {
    buf.put_slice(prefix);
    let chunk = (frame_max as usize).saturating_sub(frame::OVERHEAD).max(1);
    let mut first = true;
    for part in body.chunks(chunk) {
        frame::put_header(buf, frame::BODY, ch, part.len());
        if first && part.len() >= 8 {
            buf.put_u64(stamp);
            buf.put_slice(&part[8..]);
        } else {
            buf.put_slice(part);
        }
        first = false;
        buf.put_u8(FRAME_END);
    }
}

// ---- parsing ----

/// One frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Method {
        ch: u16,
        id: (u16, u16),
        args: &'a [u8],
    },
    Header {
        ch: u16,
        body_size: u64,
    },
    Body {
        ch: u16,
        data: &'a [u8],
    },
    Heartbeat,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Frame(FrameError),
    Short,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Frame(e) => write!(f, "{e}"),
            ParseError::Short => write!(f, "truncated method or header frame"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The frame at the front of `buf` and its total length, or `None` when more
/// bytes are needed.
#[inline]
pub fn parse(buf: &[u8], frame_max: u32) -> Result<Option<(Frame<'_>, usize)>, ParseError> {
    let Some((h, total)) = frame::check(buf, frame_max).map_err(ParseError::Frame)? else {
        return Ok(None);
    };
    let payload = &buf[HEADER_LEN..total - 1];
    let f = match h.kind {
        frame::METHOD => {
            if payload.len() < 4 {
                return Err(ParseError::Short);
            }
            Frame::Method {
                ch: h.channel,
                id: (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                ),
                args: &payload[4..],
            }
        }
        frame::HEADER => {
            if payload.len() < 12 {
                return Err(ParseError::Short);
            }
            Frame::Header {
                ch: h.channel,
                body_size: u64::from_be_bytes(payload[4..12].try_into().unwrap()),
            }
        }
        frame::BODY => Frame::Body {
            ch: h.channel,
            data: payload,
        },
        _ => Frame::Heartbeat,
    };
    Ok(Some((f, total)))
}

/// Reads method arguments front to back; any read past the end yields `None`.
pub struct Args<'a>(pub &'a [u8]);

impl<'a> Args<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    #[inline]
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    #[inline]
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    #[inline]
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    #[inline]
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
    #[inline]
    pub fn short(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
}

/// `connection.close` / `channel.close` arguments as text.
pub fn close_reason(args: &[u8]) -> String {
    let mut a = Args(args);
    let code = a.u16().unwrap_or(0);
    let text = a.short().map(String::from_utf8_lossy).unwrap_or_default();
    let class = a.u16().unwrap_or(0);
    let method = a.u16().unwrap_or(0);
    format!("{code} {text} (on {class}.{method})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::ContentHeader;
    use crate::method::{decode, put_content, put_deliver, Method};
    use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
    use amq_protocol::types::{AMQPValue, FieldTable, LongString};
    use bytes::{Buf, Bytes};

    /// Parse exactly one method frame and decode it with Warren's own
    /// (the broker's) decoder.
    fn broker_decodes(buf: &BytesMut) -> Method {
        let (f, n) = parse(buf, 131072).unwrap().unwrap();
        assert_eq!(n, buf.len(), "exactly one frame");
        let Frame::Method { .. } = f else {
            panic!("not a method frame")
        };
        decode(&Bytes::copy_from_slice(&buf[HEADER_LEN..n - 1])).unwrap()
    }

    fn other(m: Method) -> AMQPClass {
        match m {
            Method::Other(c) => c,
            m => panic!("unexpected {m:?}"),
        }
    }

    #[test]
    fn client_methods_decode_in_the_broker() {
        let mut props = BytesMut::new();
        table(&mut props, &[("product", "warren-perf")]);
        let mut b = BytesMut::new();
        start_ok(&mut b, &props, "guest", "pw");
        match other(broker_decodes(&b)) {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(s)) => {
                assert_eq!(s.mechanism.as_str(), "PLAIN");
                assert_eq!(s.response.as_bytes(), b"\0guest\0pw");
                assert_eq!(s.locale.as_str(), "en_US");
                assert_eq!(
                    s.client_properties.inner().get("product"),
                    Some(&AMQPValue::LongString(LongString::from("warren-perf")))
                );
            }
            c => panic!("{c:?}"),
        }

        let mut args = BytesMut::new();
        table(&mut args, &[("x-queue-type", "classic")]);
        let mut want_args = FieldTable::default();
        want_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("classic")),
        );
        type Enc = Box<dyn Fn(&mut BytesMut)>;
        let cases: Vec<(Enc, AMQPClass)> = vec![
            (
                Box::new(|b| tune_ok(b, 2047, 131072, 0)),
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                    channel_max: 2047,
                    frame_max: 131072,
                    heartbeat: 0,
                })),
            ),
            (
                Box::new(|b| open(b, "/")),
                AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: "/".into(),
                })),
            ),
            (
                Box::new(|b| channel_open(b, 1)),
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            (
                Box::new(|b| queue_declare(b, 1, "perf-q0", true)),
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "perf-q0".into(),
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
            (
                Box::new(|b| exchange_declare(b, 1, "perf-fanout", "fanout", false)),
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                    exchange: "perf-fanout".into(),
                    kind: "fanout".into(),
                    passive: false,
                    durable: false,
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
            (
                Box::new(|b| queue_bind(b, 1, "perf-q1", "perf-fanout", "")),
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: "perf-q1".into(),
                    exchange: "perf-fanout".into(),
                    routing_key: "".into(),
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
            (
                Box::new(move |b| queue_declare_with(b, 1, "q", PASSIVE | EXCLUSIVE, &args)),
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "q".into(),
                    passive: true,
                    durable: false,
                    exclusive: true,
                    auto_delete: false,
                    nowait: false,
                    arguments: want_args.clone(),
                })),
            ),
            (
                Box::new(|b| queue_delete(b, 1, "perf-q0")),
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: "perf-q0".into(),
                    if_unused: false,
                    if_empty: false,
                    nowait: false,
                })),
            ),
            (
                Box::new(|b| exchange_delete(b, 1, "perf-fanout")),
                AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                    exchange: "perf-fanout".into(),
                    if_unused: false,
                    nowait: false,
                })),
            ),
            (
                Box::new(|b| consume(b, 1, "perf-q0", "perf-c0", true)),
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: "perf-q0".into(),
                    consumer_tag: "perf-c0".into(),
                    no_local: false,
                    no_ack: true,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
            (
                Box::new(|b| confirm_select(b, 1)),
                AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                    nowait: false,
                })),
            ),
            (
                Box::new(connection_close),
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            ),
        ];
        for (enc, want) in cases {
            let mut b = BytesMut::new();
            enc(&mut b);
            assert_eq!(other(broker_decodes(&b)), want);
        }

        let mut b = BytesMut::new();
        publish(&mut b, 1, "ex", "a.b");
        match broker_decodes(&b) {
            Method::Publish(p) => {
                assert_eq!(p.exchange.as_str(), "ex");
                assert_eq!(p.routing_key.as_str(), "a.b");
                assert!(!p.mandatory && !p.immediate);
            }
            m => panic!("{m:?}"),
        }

        let mut b = BytesMut::new();
        qos(&mut b, 1, 500);
        assert_eq!(
            broker_decodes(&b),
            Method::Qos {
                prefetch_size: 0,
                prefetch_count: 500,
                global: false
            }
        );
    }

    #[test]
    fn published_message_reads_back() {
        for persistent in [false, true] {
            let prefix = publish_prefix(1, "", "perf-q3", 300, persistent);
            let body: Vec<u8> = (0..300).map(|i| i as u8).collect();
            let mut b = BytesMut::new();
            // A tiny frame_max splits the body over three frames.
            put_message(&mut b, &prefix, 1, &body, 128, 0x0102030405060708);
            let mut at = 0;
            let (f, n) = parse(&b[at..], 128).unwrap().unwrap();
            let Frame::Method { ch: 1, id, .. } = f else {
                panic!("{f:?}")
            };
            assert_eq!(id, BASIC_PUBLISH);
            match decode(&Bytes::copy_from_slice(&b[HEADER_LEN..n - 1])).unwrap() {
                Method::Publish(p) => {
                    assert_eq!(p.exchange.as_str(), "");
                    assert_eq!(p.routing_key.as_str(), "perf-q3");
                }
                m => panic!("{m:?}"),
            }
            at += n;
            let (f, n) = parse(&b[at..], 128).unwrap().unwrap();
            assert_eq!(
                f,
                Frame::Header {
                    ch: 1,
                    body_size: 300
                }
            );
            let h = ContentHeader::parse(Bytes::copy_from_slice(&b[at + HEADER_LEN..at + n - 1]))
                .unwrap();
            assert_eq!(h.body_size(), 300);
            assert_eq!(h.is_persistent(), persistent);
            at += n;
            let mut got = Vec::new();
            while at < b.len() {
                let (f, n) = parse(&b[at..], 128).unwrap().unwrap();
                let Frame::Body { ch: 1, data } = f else {
                    panic!("{f:?}")
                };
                assert!(data.len() <= 120);
                got.extend_from_slice(data);
                at += n;
            }
            assert_eq!(&got[..8], &0x0102030405060708u64.to_be_bytes());
            assert_eq!(&got[8..], &body[8..]);
        }
    }

    #[test]
    fn incremental_parse_of_canned_server_bytes() {
        // What a broker sends a consumer: deliver + header + body, a confirm
        // ack, a heartbeat, then a connection.close.
        let mut b = BytesMut::new();
        put_deliver(&mut b, 1, b"perf-c0", 42, false, b"", b"perf-q0");
        let mut raw = vec![0u8, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
        raw[4..12].copy_from_slice(&16u64.to_be_bytes());
        put_content(&mut b, 1, &raw, &[9u8; 16], 131072);
        put_ack(&mut b, 1, 7, true);
        crate::frame::put_heartbeat(&mut b);
        method(&mut b, 0, CONNECTION_CLOSE, |b| {
            b.put_u16(320);
            short(b, b"CONNECTION_FORCED");
            b.put_u16(0);
            b.put_u16(0);
        });
        // Feed one byte at a time: a frame appears only once it is whole.
        let mut fed = BytesMut::new();
        let mut seen = Vec::new();
        for &byte in b.iter() {
            fed.put_u8(byte);
            while let Some((f, n)) = parse(&fed, 131072).unwrap() {
                let s = match f {
                    Frame::Method {
                        id: BASIC_DELIVER,
                        args,
                        ..
                    } => {
                        let mut a = Args(args);
                        assert_eq!(a.short(), Some(&b"perf-c0"[..]));
                        format!("deliver {}", a.u64().unwrap())
                    }
                    Frame::Method {
                        id: BASIC_ACK,
                        args,
                        ..
                    } => {
                        let mut a = Args(args);
                        format!("ack {} {}", a.u64().unwrap(), a.u8().unwrap())
                    }
                    Frame::Method {
                        id: CONNECTION_CLOSE,
                        args,
                        ..
                    } => close_reason(args),
                    Frame::Header { body_size, .. } => format!("header {body_size}"),
                    Frame::Body { data, .. } => format!("body {}", data.len()),
                    f => format!("{f:?}"),
                };
                seen.push(s);
                fed.advance(n);
            }
        }
        assert_eq!(
            seen,
            [
                "deliver 42",
                "header 16",
                "body 16",
                "ack 7 1",
                "Heartbeat",
                "320 CONNECTION_FORCED (on 0.0)"
            ]
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            parse(&[1, 0, 1, 0, 0, 0, 1, 0, 0], 4096),
            Err(ParseError::Frame(FrameError::BadFrameEnd(0)))
        );
        assert_eq!(
            parse(&[1, 0, 1, 0, 0, 0, 1, 0, FRAME_END], 4096),
            Err(ParseError::Short)
        );
    }
}
