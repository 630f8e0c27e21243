//! The few AMQP 0-9-1 frames a load generator (and the sink) needs, hand-encoded
//! into one `BytesMut` so a whole batch goes out in one write, and an
//! incremental frame parser that borrows from the read buffer.
//!
//! Frame header checks and the frame constants come from `warren-protocol`.

use bytes::{BufMut, BytesMut};
use warren_protocol::frame::{self, FrameError, FRAME_END, HEADER_LEN};

pub use warren_protocol::frame::PROTOCOL_HEADER;
pub use warren_protocol::method::{put_ack, put_nack};

// (class, method) pairs used below.
pub const CONNECTION_START: (u16, u16) = (10, 10);
pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
pub const CONNECTION_BLOCKED: (u16, u16) = (10, 60);
pub const CONNECTION_UNBLOCKED: (u16, u16) = (10, 61);
pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
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
pub const BASIC_RETURN: (u16, u16) = (60, 50);
pub const BASIC_DELIVER: (u16, u16) = (60, 60);
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

pub fn short(buf: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(255)];
    buf.put_u8(s.len() as u8);
    buf.put_slice(s);
}

pub fn long(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u32(s.len() as u32);
    buf.put_slice(s);
}

/// A field table of long-string values.
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

pub fn start_ok(buf: &mut BytesMut, user: &str, pass: &str) {
    method(buf, 0, CONNECTION_START_OK, |b| {
        table(b, &[("product", "warren-perf")]);
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

pub fn queue_declare(buf: &mut BytesMut, ch: u16, name: &str, durable: bool) {
    method(buf, ch, QUEUE_DECLARE, |b| {
        b.put_u16(0);
        short(b, name.as_bytes());
        b.put_u8(if durable { 2 } else { 0 });
        b.put_u32(0);
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
    method(buf, ch, BASIC_CONSUME, |b| {
        b.put_u16(0);
        short(b, queue.as_bytes());
        short(b, tag.as_bytes());
        b.put_u8(if no_ack { 2 } else { 0 });
        b.put_u32(0);
    });
}

pub fn confirm_select(buf: &mut BytesMut, ch: u16) {
    method(buf, ch, CONFIRM_SELECT, |b| b.put_u8(0));
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
    method(&mut buf, ch, BASIC_PUBLISH, |b| {
        b.put_u16(0);
        short(b, exchange.as_bytes());
        short(b, routing_key.as_bytes());
        b.put_u8(0);
    });
    let size = 2 + 2 + 8 + 2 + persistent as usize;
    frame::put_header(&mut buf, frame::HEADER, ch, size);
    buf.put_u16(60);
    buf.put_u16(0);
    buf.put_u64(body_size as u64);
    if persistent {
        buf.put_u16(0x1000); // delivery-mode present
        buf.put_u8(2);
    } else {
        buf.put_u16(0);
    }
    buf.put_u8(FRAME_END);
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

// ---- server → client (sink) ----

pub fn start(buf: &mut BytesMut) {
    method(buf, 0, CONNECTION_START, |b| {
        b.put_u8(0);
        b.put_u8(9);
        table(b, &[("product", "warren-perf sink")]);
        long(b, b"PLAIN");
        long(b, b"en_US");
    });
}

pub fn tune(buf: &mut BytesMut, channel_max: u16, frame_max: u32, heartbeat: u16) {
    method(buf, 0, CONNECTION_TUNE, |b| {
        b.put_u16(channel_max);
        b.put_u32(frame_max);
        b.put_u16(heartbeat);
    });
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
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
    pub fn short(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    pub fn long(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
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
