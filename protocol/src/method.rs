//! Method frames: decoding what clients send and encoding what Warren sends.
//!
//! Hot path (per message): `basic.publish`, `basic.ack`, `basic.nack`,
//! `basic.reject` are decoded by hand without allocating (names are slices of
//! the frame buffer); `basic.deliver`, `basic.get-ok`, confirm `ack`/`nack` and
//! content frames are encoded by hand. Everything else goes through
//! amq-protocol, but only after [`validate`] has walked the payload against the
//! method's field layout, so amq-protocol never sees a deep or malformed table.

use crate::frame::{self, FRAME_END};
use crate::table::{self, TableError};
use amq_protocol::protocol::{parse_class, AMQPClass};
use amq_protocol::types::ShortString;
use bytes::{BufMut, Bytes, BytesMut};

/// A short string taken from a frame without copying, known to be UTF-8.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ShortStr(Bytes);

impl ShortStr {
    /// Wrap bytes already checked to be UTF-8 and at most 255 long.
    fn from_checked(b: Bytes) -> Self {
        ShortStr(b)
    }
    /// Wrap stored bytes, checking they form a short string.
    pub fn from_bytes(b: Bytes) -> Option<Self> {
        (b.len() <= 255 && std::str::from_utf8(&b).is_ok()).then_some(ShortStr(b))
    }
    /// The bytes (shared, not copied).
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }
    pub fn from_static(s: &'static str) -> Self {
        assert!(s.len() <= 255);
        ShortStr(Bytes::from_static(s.as_bytes()))
    }
    /// Build from a string, truncating at a char boundary to fit 255 bytes.
    pub fn truncating(s: &str) -> Self {
        ShortStr(Bytes::copy_from_slice(truncate(s).as_bytes()))
    }
    pub fn as_str(&self) -> &str {
        debug_assert!(std::str::from_utf8(&self.0).is_ok());
        // SAFETY: every constructor checks the bytes are UTF-8 (a frame's
        // short strings as they are decoded, stored ones in `from_bytes`)
        // or takes them from a `str`, and they never change after. This is
        // on every publish's path (routing, the reply-to check), where a
        // check of its own cost about 1% of the broker's CPU.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for ShortStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cut `s` at a char boundary so that it fits a short string.
pub fn truncate(s: &str) -> &str {
    if s.len() <= 255 {
        return s;
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An amq-protocol short string that can never panic (truncates at 255 bytes).
pub fn short(s: &str) -> ShortString {
    ShortString::try_new(truncate(s)).unwrap_or_default()
}

/// `basic.publish`, borrowed from the frame buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub mandatory: bool,
    pub immediate: bool,
}

/// A decoded client method.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    Publish(Publish),
    Ack {
        delivery_tag: u64,
        multiple: bool,
    },
    Nack {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        delivery_tag: u64,
        requeue: bool,
    },
    /// Hand-decoded because amq-protocol drops `prefetch_size`.
    Qos {
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    },
    Other(AMQPClass),
}

/// Why a method frame could not be decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum DecodeError {
    /// No such class or method in AMQP 0-9-1.
    Unknown { class_id: u16, method_id: u16 },
    /// A method only a server sends.
    NotForServer { class_id: u16, method_id: u16 },
    /// Fields do not decode (truncated, bad string, bad table).
    Malformed {
        class_id: u16,
        method_id: u16,
        reason: String,
    },
}

impl DecodeError {
    pub fn reply_code(&self) -> u16 {
        use crate::reply::*;
        match self {
            DecodeError::Unknown { .. } => NOT_IMPLEMENTED,
            DecodeError::NotForServer { .. } => COMMAND_INVALID,
            DecodeError::Malformed { .. } => FRAME_ERROR,
        }
    }
    pub fn ids(&self) -> (u16, u16) {
        match *self {
            DecodeError::Unknown {
                class_id,
                method_id,
            }
            | DecodeError::NotForServer {
                class_id,
                method_id,
            }
            | DecodeError::Malformed {
                class_id,
                method_id,
                ..
            } => (class_id, method_id),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Unknown {
                class_id,
                method_id,
            } => {
                write!(f, "unknown method {class_id}/{method_id}")
            }
            DecodeError::NotForServer {
                class_id,
                method_id,
            } => {
                write!(f, "method {class_id}/{method_id} is not sent by clients")
            }
            DecodeError::Malformed {
                class_id,
                method_id,
                reason,
            } => {
                write!(f, "cannot decode method {class_id}/{method_id}: {reason}")
            }
        }
    }
}

/// Field kinds, for validating a method's payload before amq-protocol parses it.
#[derive(Clone, Copy)]
enum F {
    Octet,
    U16,
    U32,
    U64,
    SStr,
    LStr,
    Table,
}

/// The layout of every method a client may send; `None` for server-only
/// methods, `Err` for ids that do not exist.
fn client_layout(class_id: u16, method_id: u16) -> Result<Option<&'static [F]>, ()> {
    use F::*;
    Ok(Some(match (class_id, method_id) {
        (10, 11) => &[Table, SStr, LStr, SStr],
        (10, 21) => &[LStr],
        (10, 31) => &[U16, U32, U16],
        (10, 40) => &[SStr, SStr, Octet],
        (10, 50) => &[U16, SStr, U16, U16],
        (10, 51) => &[],
        (10, 70) => &[LStr, SStr],
        (10, 10 | 20 | 30 | 41 | 60 | 61 | 71) => return Ok(None),
        (20, 10) => &[SStr],
        (20, 20 | 21) => &[Octet],
        (20, 40) => &[U16, SStr, U16, U16],
        (20, 41) => &[],
        (20, 11) => return Ok(None),
        (30, 10) => &[SStr, Octet],
        (30, 11) => return Ok(None),
        (40, 10) => &[U16, SStr, SStr, Octet, Table],
        (40, 20) => &[U16, SStr, Octet],
        (40, 30 | 40) => &[U16, SStr, SStr, SStr, Octet, Table],
        (40, 11 | 21 | 31 | 51) => return Ok(None),
        (50, 10) => &[U16, SStr, Octet, Table],
        (50, 20) => &[U16, SStr, SStr, SStr, Octet, Table],
        (50, 30 | 40) => &[U16, SStr, Octet],
        (50, 50) => &[U16, SStr, SStr, SStr, Table],
        (50, 11 | 21 | 31 | 41 | 51) => return Ok(None),
        (60, 10) => &[U32, U16, Octet],
        (60, 20) => &[U16, SStr, SStr, Octet, Table],
        (60, 30) => &[SStr, Octet],
        (60, 31) => &[SStr],
        (60, 40) => &[U16, SStr, SStr, Octet],
        (60, 70) => &[U16, SStr, Octet],
        (60, 80 | 90 | 120) => &[U64, Octet],
        (60, 100 | 110) => &[Octet],
        (60, 11 | 21 | 50 | 60 | 71 | 72 | 111) => return Ok(None),
        (90, 10 | 20 | 30) => &[],
        (90, 11 | 21 | 31) => return Ok(None),
        (85, 10) => &[Octet],
        (85, 11) => return Ok(None),
        _ => return Err(()),
    }))
}

fn validate(layout: &[F], mut p: &[u8]) -> Result<(), String> {
    let short = |what: &str| format!("truncated {what}");
    for f in layout {
        let n = match f {
            F::Octet => 1,
            F::U16 => 2,
            F::U32 => 4,
            F::U64 => 8,
            F::SStr => table::skip_short_str(p).map_err(|e| match e {
                TableError::BadUtf8 => "short string is not valid UTF-8".to_string(),
                e => e.to_string(),
            })?,
            F::LStr => {
                if p.len() < 4 {
                    return Err(short("long string"));
                }
                4 + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize
            }
            F::Table => table::skip_table(p).map_err(|e| e.to_string())?,
        };
        if p.len() < n {
            return Err(short("method fields"));
        }
        p = &p[n..];
    }
    if !p.is_empty() {
        // As RabbitMQ: 501 "cannot decode" rather than ignore them.
        return Err(format!("{} bytes after the method's arguments", p.len()));
    }
    Ok(())
}

/// Class and method ids at the front of a method payload.
pub fn ids(payload: &[u8]) -> Option<(u16, u16)> {
    if payload.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

/// A little cursor for the hand-written decoders.
struct Cur<'a> {
    b: &'a Bytes,
    pos: usize,
}

impl Cur<'_> {
    fn need(&self, n: usize) -> Result<(), String> {
        if self.b.len() < self.pos + n {
            Err("truncated method fields".into())
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, String> {
        self.need(1)?;
        self.pos += 1;
        Ok(self.b[self.pos - 1])
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.need(2)?;
        let v = u16::from_be_bytes([self.b[self.pos], self.b[self.pos + 1]]);
        self.pos += 2;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.need(4)?;
        let s = &self.b[self.pos..self.pos + 4];
        self.pos += 4;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.need(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.b[self.pos..self.pos + 8]);
        self.pos += 8;
        Ok(u64::from_be_bytes(a))
    }
    fn short_str(&mut self) -> Result<ShortStr, String> {
        let len = self.u8()? as usize;
        self.need(len)?;
        let s = self.b.slice(self.pos..self.pos + len);
        std::str::from_utf8(&s).map_err(|_| "short string is not valid UTF-8".to_string())?;
        self.pos += len;
        Ok(ShortStr::from_checked(s))
    }
}

/// Decode a method frame's payload.
pub fn decode(payload: &Bytes) -> Result<Method, DecodeError> {
    // (ok_or_else: the error's String must not be built for every frame.)
    let (class_id, method_id) = ids(payload).ok_or_else(|| DecodeError::Malformed {
        class_id: 0,
        method_id: 0,
        reason: "method frame shorter than its ids".into(),
    })?;
    let malformed = |reason: String| DecodeError::Malformed {
        class_id,
        method_id,
        reason,
    };
    let mut c = Cur { b: payload, pos: 4 };
    let hot = match (class_id, method_id) {
        (60, 40) => (|| {
            c.u16()?;
            let exchange = c.short_str()?;
            let routing_key = c.short_str()?;
            let bits = c.u8()?;
            Ok(Method::Publish(Publish {
                exchange,
                routing_key,
                mandatory: bits & 1 != 0,
                immediate: bits & 2 != 0,
            }))
        })(),
        (60, 80) => (|| {
            let delivery_tag = c.u64()?;
            let bits = c.u8()?;
            Ok(Method::Ack {
                delivery_tag,
                multiple: bits & 1 != 0,
            })
        })(),
        (60, 120) => (|| {
            let delivery_tag = c.u64()?;
            let bits = c.u8()?;
            Ok(Method::Nack {
                delivery_tag,
                multiple: bits & 1 != 0,
                requeue: bits & 2 != 0,
            })
        })(),
        (60, 90) => (|| {
            let delivery_tag = c.u64()?;
            let bits = c.u8()?;
            Ok(Method::Reject {
                delivery_tag,
                requeue: bits & 1 != 0,
            })
        })(),
        (60, 10) => (|| {
            let prefetch_size = c.u32()?;
            let prefetch_count = c.u16()?;
            let bits = c.u8()?;
            Ok(Method::Qos {
                prefetch_size,
                prefetch_count,
                global: bits & 1 != 0,
            })
        })(),
        _ => Err(String::new()),
    };
    match hot {
        Ok(_) if c.pos != payload.len() => {
            return Err(malformed(format!(
                "{} bytes after the method's arguments",
                payload.len() - c.pos
            )))
        }
        Ok(m) => return Ok(m),
        Err(reason) if !reason.is_empty() => return Err(malformed(reason)),
        Err(_) => {}
    }
    let layout = match client_layout(class_id, method_id) {
        Err(()) => {
            return Err(DecodeError::Unknown {
                class_id,
                method_id,
            })
        }
        Ok(None) => {
            return Err(DecodeError::NotForServer {
                class_id,
                method_id,
            })
        }
        Ok(Some(l)) => l,
    };
    validate(layout, &payload[4..]).map_err(malformed)?;
    match parse_class(&payload[..]) {
        Ok((_, class)) => Ok(Method::Other(class)),
        Err(e) => Err(malformed(format!("{e:?}"))),
    }
}

// ---------------------------------------------------------------- encoding

/// Start a method frame; returns the offset of its size field for [`end_frame`].
#[inline]
fn begin_method(buf: &mut BytesMut, channel: u16, class_id: u16, method_id: u16) -> usize {
    buf.put_u8(frame::METHOD);
    buf.put_u16(channel);
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u16(class_id);
    buf.put_u16(method_id);
    at
}

#[inline]
fn end_frame(buf: &mut BytesMut, size_at: usize) {
    let size = (buf.len() - size_at - 4) as u32;
    buf[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    buf.put_u8(FRAME_END);
}

#[inline]
fn put_short(buf: &mut BytesMut, s: &[u8]) {
    // Callers pass strings that came from short strings (<= 255 bytes).
    let s = &s[..s.len().min(255)];
    buf.put_u8(s.len() as u8);
    buf.put_slice(s);
}

/// Encode any method with amq-protocol (the rare, non per-message ones).
pub fn put_method(buf: &mut BytesMut, channel: u16, class: &AMQPClass) {
    let payload = cookie_factory::gen_simple(amq_protocol::protocol::gen_class(class), Vec::new())
        .unwrap_or_default();
    frame::put_header(buf, frame::METHOD, channel, payload.len());
    buf.put_slice(&payload);
    buf.put_u8(FRAME_END);
}

/// `basic.deliver`.
pub fn put_deliver(
    buf: &mut BytesMut,
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
) {
    let at = begin_method(buf, channel, 60, 60);
    put_short(buf, consumer_tag);
    buf.put_u64(delivery_tag);
    buf.put_u8(redelivered as u8);
    put_short(buf, exchange);
    put_short(buf, routing_key);
    end_frame(buf, at);
}

/// `basic.get-ok`.
pub fn put_get_ok(
    buf: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) {
    let at = begin_method(buf, channel, 60, 71);
    buf.put_u64(delivery_tag);
    buf.put_u8(redelivered as u8);
    put_short(buf, exchange);
    put_short(buf, routing_key);
    buf.put_u32(message_count);
    end_frame(buf, at);
}

/// A publisher-confirm `basic.ack`.
pub fn put_ack(buf: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_method(buf, channel, 60, 80);
    buf.put_u64(delivery_tag);
    buf.put_u8(multiple as u8);
    end_frame(buf, at);
}

/// A publisher-confirm `basic.nack`.
pub fn put_nack(buf: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_method(buf, channel, 60, 120);
    buf.put_u64(delivery_tag);
    buf.put_u8(multiple as u8);
    end_frame(buf, at);
}

/// A content header frame carrying the publisher's raw header bytes, then the
/// body split into frames that fit `frame_max`.
pub fn put_content(
    buf: &mut BytesMut,
    channel: u16,
    raw_header: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    put_content_parts(buf, channel, raw_header, body.len(), frame_max, |buf, r| {
        buf.put_slice(&body[r])
    });
}

/// [`put_content`] with the body's payloads left to `part`, called with
/// each body frame's byte range between its header and its frame end
/// (a caller that writes bodies without copying them cuts `buf` there).
pub fn put_content_parts(
    buf: &mut BytesMut,
    channel: u16,
    raw_header: &[u8],
    body_len: usize,
    frame_max: u32,
    mut part: impl FnMut(&mut BytesMut, std::ops::Range<usize>),
) {
    frame::put_header(buf, frame::HEADER, channel, raw_header.len());
    buf.put_slice(raw_header);
    buf.put_u8(FRAME_END);
    let chunk = (frame_max as usize).saturating_sub(frame::OVERHEAD).max(1);
    let mut at = 0;
    while at < body_len {
        let end = (at + chunk).min(body_len);
        frame::put_header(buf, frame::BODY, channel, end - at);
        part(buf, at..end);
        buf.put_u8(FRAME_END);
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPFrame};
    use amq_protocol::protocol::{basic, channel, connection, exchange, queue};
    use amq_protocol::types::FieldTable;

    fn theirs(channel: u16, class: AMQPClass) -> Vec<u8> {
        cookie_factory::gen_simple(gen_frame(&AMQPFrame::Method(channel, class)), Vec::new())
            .unwrap()
    }

    /// Payload (without frame header and end) of an amq-protocol encoding.
    fn payload(class: AMQPClass) -> Bytes {
        let f = theirs(1, class);
        Bytes::copy_from_slice(&f[7..f.len() - 1])
    }

    #[test]
    fn publish_decodes_like_amq_protocol_encodes() {
        let p = payload(AMQPClass::Basic(basic::AMQPMethod::Publish(
            basic::Publish {
                exchange: "ex".into(),
                routing_key: "a.b.c".into(),
                mandatory: true,
                immediate: false,
            },
        )));
        assert_eq!(
            decode(&p).unwrap(),
            Method::Publish(Publish {
                exchange: ShortStr::from_static("ex"),
                routing_key: ShortStr::from_static("a.b.c"),
                mandatory: true,
                immediate: false,
            })
        );
    }

    #[test]
    fn trailing_bytes_after_the_arguments_are_malformed() {
        let with_tail = |class: AMQPClass| {
            let mut p = payload(class).to_vec();
            p.extend_from_slice(&[0, 0, 0]);
            Bytes::from(p)
        };
        // A hot-path method and one decoded through amq-protocol.
        let ack = with_tail(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 1,
            multiple: false,
        })));
        let open = with_tail(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        for (p, ids) in [(ack, (60, 80)), (open, (20, 10))] {
            match decode(&p) {
                Err(e @ DecodeError::Malformed { .. }) => {
                    assert_eq!(e.reply_code(), crate::reply::FRAME_ERROR);
                    assert_eq!(e.ids(), ids);
                }
                other => panic!("expected malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn ack_nack_reject_qos_decode() {
        let p = payload(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 1 << 40,
            multiple: true,
        })));
        assert_eq!(
            decode(&p).unwrap(),
            Method::Ack {
                delivery_tag: 1 << 40,
                multiple: true
            }
        );
        let p = payload(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 7,
            multiple: false,
            requeue: true,
        })));
        assert_eq!(
            decode(&p).unwrap(),
            Method::Nack {
                delivery_tag: 7,
                multiple: false,
                requeue: true
            }
        );
        let p = payload(AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: 9,
            requeue: true,
        })));
        assert_eq!(
            decode(&p).unwrap(),
            Method::Reject {
                delivery_tag: 9,
                requeue: true
            }
        );
        let p = payload(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: true,
        })));
        assert_eq!(
            decode(&p).unwrap(),
            Method::Qos {
                prefetch_size: 0,
                prefetch_count: 10,
                global: true
            }
        );
    }

    #[test]
    fn rare_methods_round_trip_through_amq_protocol() {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            amq_protocol::types::AMQPValue::LongInt(5),
        );
        let cases = vec![
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: true,
                nowait: false,
                arguments: args.clone(),
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: "e".into(),
                kind: "topic".into(),
                passive: false,
                durable: true,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: args.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: "q".into(),
                exchange: "e".into(),
                routing_key: "k".into(),
                arguments: args,
            })),
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max: 4096,
                heartbeat: 0,
            })),
        ];
        for c in cases {
            let p = payload(c.clone());
            assert_eq!(decode(&p).unwrap(), Method::Other(c));
            // every truncation is refused, never a panic
            for cut in 4..p.len() {
                assert!(decode(&p.slice(..cut)).is_err(), "cut {cut}");
            }
        }
    }

    /// Every method a client may send, encoded by amq-protocol, decodes to
    /// the same method (hot ones into their hand-written form), and every
    /// truncation of it is refused without a panic.
    #[test]
    fn every_client_method_round_trips() {
        use amq_protocol::protocol::{access, confirm, tx};
        let mut t = FieldTable::default();
        t.insert(
            "k".into(),
            amq_protocol::types::AMQPValue::LongString("v".into()),
        );
        let classes = vec![
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: t.clone(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
            AMQPClass::Connection(connection::AMQPMethod::SecureOk(connection::SecureOk {
                response: "x".into(),
            })),
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max: 2,
                heartbeat: 3,
            })),
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 1,
                method_id: 2,
            })),
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
                connection::UpdateSecret {
                    new_secret: "s".into(),
                    reason: "r".into(),
                },
            )),
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                active: true,
            })),
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 406,
                reply_text: "x".into(),
                class_id: 60,
                method_id: 80,
            })),
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            AMQPClass::Access(access::AMQPMethod::Request(access::Request {
                realm: "/data".into(),
                exclusive: false,
                passive: true,
                active: true,
                write: true,
                read: true,
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: "e".into(),
                kind: "headers".into(),
                passive: true,
                durable: true,
                auto_delete: true,
                internal: true,
                nowait: true,
                arguments: t.clone(),
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: "e".into(),
                if_unused: true,
                nowait: true,
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "k".into(),
                nowait: true,
                arguments: t.clone(),
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "k".into(),
                nowait: false,
                arguments: t.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "q".into(),
                exchange: "e".into(),
                routing_key: "k".into(),
                nowait: true,
                arguments: t.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: "q".into(),
                nowait: true,
            })),
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: "q".into(),
                if_unused: true,
                if_empty: true,
                nowait: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "q".into(),
                consumer_tag: "c".into(),
                no_local: false,
                no_ack: true,
                exclusive: true,
                nowait: false,
                arguments: t,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "c".into(),
                nowait: true,
            })),
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                consumer_tag: "c".into(),
            })),
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: "q".into(),
                no_ack: true,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(basic::RecoverAsync {
                requeue: true,
            })),
            AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
            AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
            AMQPClass::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: true,
            })),
        ];
        for c in classes {
            let p = payload(c.clone());
            assert_eq!(decode(&p), Ok(Method::Other(c.clone())), "{c:?}");
            for cut in 4..p.len() {
                assert!(decode(&p.slice(..cut)).is_err(), "{c:?} cut at {cut}");
            }
        }
        // The hot methods, decoded by hand, refuse truncation too.
        for c in [
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "e".into(),
                routing_key: "k".into(),
                mandatory: false,
                immediate: true,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 1,
                multiple: true,
                requeue: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 1,
                requeue: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1,
                global: false,
            })),
        ] {
            let p = payload(c.clone());
            assert!(decode(&p).is_ok(), "{c:?}");
            for cut in 4..p.len() {
                assert!(decode(&p.slice(..cut)).is_err(), "{c:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn unknown_server_only_and_deep_tables() {
        assert_eq!(
            decode(&Bytes::from_static(&[0, 99, 0, 1])),
            Err(DecodeError::Unknown {
                class_id: 99,
                method_id: 1
            })
        );
        assert_eq!(
            decode(&Bytes::from_static(&[0, 60, 0, 60]))
                .unwrap_err()
                .reply_code(),
            503
        );
        assert_eq!(
            decode(&Bytes::from_static(&[0, 60, 0, 200]))
                .unwrap_err()
                .reply_code(),
            540
        );
        assert_eq!(
            decode(&Bytes::from_static(&[0, 10, 0, 10])),
            Err(DecodeError::NotForServer {
                class_id: 10,
                method_id: 10
            })
        );
        // start-ok whose client-properties nest 5000 levels: refused, no stack overflow.
        let mut p = vec![0, 10, 0, 11];
        p.extend_from_slice(&crate::table::tests::nested(5000));
        p.extend_from_slice(&[5, b'P', b'L', b'A', b'I', b'N', 0, 0, 0, 0, 5]);
        p.extend_from_slice(b"en_US");
        let err = decode(&Bytes::from(p)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert!(err.to_string().contains("deeper"), "{err}");
    }

    #[test]
    fn bad_utf8_short_string_is_refused() {
        let p = Bytes::from_static(&[0, 60, 0, 40, 0, 0, 1, 0xff, 0, 0]);
        assert!(matches!(decode(&p), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn hand_encoders_match_amq_protocol() {
        let mut b = BytesMut::new();
        put_deliver(&mut b, 5, b"ctag", 42, true, b"ex", b"rk");
        assert_eq!(
            &b[..],
            &theirs(
                5,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: "ctag".into(),
                    delivery_tag: 42,
                    redelivered: true,
                    exchange: "ex".into(),
                    routing_key: "rk".into(),
                }))
            )[..]
        );
        let mut b = BytesMut::new();
        put_get_ok(&mut b, 2, 3, false, b"", b"q", 17);
        assert_eq!(
            &b[..],
            &theirs(
                2,
                AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                    delivery_tag: 3,
                    redelivered: false,
                    exchange: "".into(),
                    routing_key: "q".into(),
                    message_count: 17,
                }))
            )[..]
        );
        let mut b = BytesMut::new();
        put_ack(&mut b, 1, 99, true);
        assert_eq!(
            &b[..],
            &theirs(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 99,
                    multiple: true
                }))
            )[..]
        );
        let mut b = BytesMut::new();
        put_nack(&mut b, 1, 98, false);
        assert_eq!(
            &b[..],
            &theirs(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 98,
                    multiple: false,
                    requeue: false
                }))
            )[..]
        );
        let mut b = BytesMut::new();
        let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: short(&"x".repeat(400)),
            class_id: 0,
            method_id: 0,
        }));
        put_method(&mut b, 0, &close);
        assert_eq!(&b[..], &theirs(0, close)[..]);
    }

    #[test]
    fn content_is_split_at_frame_max() {
        let mut b = BytesMut::new();
        let body = vec![7u8; 10_000];
        put_content(
            &mut b,
            1,
            &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x10, 0, 0],
            &body,
            4096,
        );
        // header frame, then ceil(10000 / 4088) = 3 body frames
        let mut rest = &b[..];
        let mut kinds = vec![];
        let mut total = 0;
        while !rest.is_empty() {
            let (h, n) = frame::check(rest, 4096).unwrap().unwrap();
            kinds.push(h.kind);
            if h.kind == frame::BODY {
                total += h.size;
            }
            rest = &rest[n..];
        }
        assert_eq!(kinds, vec![2, 3, 3, 3]);
        assert_eq!(total, 10_000);
    }

    #[test]
    fn content_parts_cut_around_body_payloads_give_the_same_bytes() {
        let raw = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x10, 0, 0];
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = BytesMut::new();
        put_content(&mut whole, 1, &raw, &body, 4096);
        let mut segs: Vec<Bytes> = Vec::new();
        let mut buf = BytesMut::new();
        put_content_parts(&mut buf, 1, &raw, body.len(), 4096, |buf, r| {
            segs.push(buf.split().freeze());
            segs.push(Bytes::copy_from_slice(&body[r]));
        });
        segs.push(buf.freeze());
        assert_eq!(segs.concat(), &whole[..]);
    }
}
