//! The content header, kept as the publisher's raw bytes so consumers receive
//! it byte for byte, with the few properties the broker needs located once.

use crate::table::{self, TableError};
use amq_protocol::protocol::basic::{parse_properties, AMQPProperties};
use amq_protocol::types::FieldTable;
use bytes::Bytes;

/// Property flag bits of the basic class, most significant first.
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const TIMESTAMP: u16 = 1 << 6;
const USER_ID: u16 = 1 << 4;
const EXPIRATION: u16 = 1 << 8;
const REPLY_TO: u16 = 1 << 9;

/// Offsets into the raw header: 2 class + 2 weight + 8 size + 2 flags.
const PROPS_AT: usize = 14;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentError {
    Truncated,
    /// Only the basic class (60) carries content.
    WrongClass(u16),
    /// A continuation flag word: basic has 14 properties, so never needed.
    Continuation,
    BadProperty(TableError),
}

impl std::fmt::Display for ContentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentError::Truncated => f.write_str("truncated content header"),
            ContentError::WrongClass(c) => write!(f, "content header for class {c}"),
            ContentError::Continuation => f.write_str("unsupported property flag continuation"),
            ContentError::BadProperty(e) => write!(f, "bad content header property: {e}"),
        }
    }
}

/// A validated content header payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentHeader {
    /// The payload exactly as the publisher sent it.
    raw: Bytes,
    body_size: u64,
    flags: u16,
    /// Location of the delivery-mode octet, if present.
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    /// Byte range of the headers table (with its length prefix), if present.
    headers: Option<(u32, u32)>,
    /// Byte range of the expiration string's text, if present.
    expiration: Option<(u32, u32)>,
    /// Byte range of the reply-to string's text, if present.
    reply_to: Option<(u32, u32)>,
    /// Byte range of the user-id string's text, if present.
    user_id: Option<(u32, u32)>,
}

impl ContentHeader {
    /// Validate a content header payload, locating the properties of interest.
    pub fn parse(raw: Bytes) -> Result<Self, ContentError> {
        if raw.len() < PROPS_AT {
            return Err(ContentError::Truncated);
        }
        let class = u16::from_be_bytes([raw[0], raw[1]]);
        if class != 60 {
            return Err(ContentError::WrongClass(class));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&raw[4..12]);
        let body_size = u64::from_be_bytes(size);
        let flags = u16::from_be_bytes([raw[12], raw[13]]);
        if flags & 1 != 0 {
            return Err(ContentError::Continuation);
        }
        let mut h = ContentHeader {
            raw,
            body_size,
            flags,
            delivery_mode: None,
            priority: None,
            headers: None,
            expiration: None,
            reply_to: None,
            user_id: None,
        };
        let mut pos = PROPS_AT;
        let p = &h.raw[..];
        // Walk the 14 properties in order; bit 15 first.
        for bit in (2..16).rev() {
            let flag = 1u16 << bit;
            if flags & flag == 0 {
                continue;
            }
            let rest = &p[pos..];
            let n = match flag {
                HEADERS => {
                    let n = table::skip_table(rest).map_err(ContentError::BadProperty)?;
                    h.headers = Some((pos as u32, (pos + n) as u32));
                    n
                }
                DELIVERY_MODE | PRIORITY => {
                    let v = *rest.first().ok_or(ContentError::Truncated)?;
                    if flag == DELIVERY_MODE {
                        h.delivery_mode = Some(v);
                    } else {
                        h.priority = Some(v);
                    }
                    1
                }
                TIMESTAMP => {
                    if rest.len() < 8 {
                        return Err(ContentError::Truncated);
                    }
                    8
                }
                _ => {
                    // Any bytes: RabbitMQ accepts and forwards short-string
                    // properties that are not UTF-8 (the getters below
                    // read only those that are).
                    let n = table::skip_short_bytes(rest).map_err(|e| match e {
                        TableError::Truncated => ContentError::Truncated,
                        e => ContentError::BadProperty(e),
                    })?;
                    let range = Some(((pos + 1) as u32, (pos + n) as u32));
                    if flag == EXPIRATION {
                        h.expiration = range;
                    } else if flag == REPLY_TO {
                        h.reply_to = range;
                    } else if flag == USER_ID {
                        h.user_id = range;
                    }
                    n
                }
            };
            pos += n;
        }
        Ok(h)
    }

    /// The payload as received, for sending on verbatim.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
    pub fn body_size(&self) -> u64 {
        self.body_size
    }
    pub fn delivery_mode(&self) -> Option<u8> {
        self.delivery_mode
    }
    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }
    pub fn priority(&self) -> Option<u8> {
        self.priority
    }
    fn text(&self, r: Option<(u32, u32)>) -> Option<&str> {
        r.and_then(|(a, b)| std::str::from_utf8(&self.raw[a as usize..b as usize]).ok())
    }
    pub fn expiration(&self) -> Option<&str> {
        self.text(self.expiration)
    }
    pub fn reply_to(&self) -> Option<&str> {
        self.text(self.reply_to)
    }
    /// The same header with the reply-to property replaced (it must be
    /// present); every other byte stays as the publisher sent it.
    pub fn with_reply_to(&self, value: &str) -> Option<ContentHeader> {
        let (a, b) = self.reply_to?;
        let value = crate::method::truncate(value);
        let (a, b) = (a as usize, b as usize);
        let mut raw = Vec::with_capacity(self.raw.len() + value.len());
        raw.extend_from_slice(&self.raw[..a - 1]);
        raw.push(value.len() as u8);
        raw.extend_from_slice(value.as_bytes());
        raw.extend_from_slice(&self.raw[b..]);
        ContentHeader::parse(Bytes::from(raw)).ok()
    }
    pub fn user_id(&self) -> Option<&str> {
        self.text(self.user_id)
    }
    /// The user-id property's bytes, UTF-8 or not (it is checked against
    /// the login byte for byte).
    pub fn user_id_bytes(&self) -> Option<&[u8]> {
        self.user_id.map(|(a, b)| &self.raw[a as usize..b as usize])
    }
    pub fn has_headers(&self) -> bool {
        self.flags & HEADERS != 0
    }
    /// The headers table as the publisher encoded it, length prefix
    /// included.
    pub fn headers_raw(&self) -> Option<&[u8]> {
        let (a, b) = self.headers?;
        Some(&self.raw[a as usize..b as usize])
    }
    /// The headers table, decoded (validated already, so safe to parse).
    pub fn headers(&self) -> Option<FieldTable> {
        let (a, b) = self.headers?;
        amq_protocol::types::parsing::parse_field_table(&self.raw[a as usize..b as usize])
            .ok()
            .map(|(_, t)| t)
    }
    /// The byte range of each present property, by flag, in wire order.
    fn extents(&self) -> Vec<(u16, usize, usize)> {
        let p = &self.raw[..];
        let mut out = Vec::with_capacity(14);
        let mut pos = PROPS_AT;
        for bit in (2..16).rev() {
            let flag = 1u16 << bit;
            if self.flags & flag == 0 {
                continue;
            }
            let rest = &p[pos..];
            // Validated by `parse`: every length is in bounds.
            let n = match flag {
                HEADERS => 4 + u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize,
                DELIVERY_MODE | PRIORITY => 1,
                TIMESTAMP => 8,
                _ => 1 + rest[0] as usize,
            };
            out.push((flag, pos, pos + n));
            pos += n;
        }
        out
    }

    /// The same header with the headers table replaced by `headers` (an
    /// encoded field table, length prefix included) and, if
    /// `drop_expiration`, without the expiration property. Every other
    /// property keeps the publisher's bytes, whatever they are (the broker
    /// never re-encodes what it does not change).
    pub fn rebuilt(
        &self,
        headers: Option<&[u8]>,
        drop_expiration: bool,
    ) -> Result<ContentHeader, ContentError> {
        let mut flags = self.flags & !HEADERS;
        if headers.is_some() {
            flags |= HEADERS;
        }
        if drop_expiration {
            flags &= !EXPIRATION;
        }
        let extents = self.extents();
        let mut raw = Vec::with_capacity(self.raw.len() + headers.map_or(0, |h| h.len()));
        raw.extend_from_slice(&self.raw[..12]);
        raw.extend_from_slice(&flags.to_be_bytes());
        for bit in (2..16).rev() {
            let flag = 1u16 << bit;
            if flags & flag == 0 {
                continue;
            }
            if flag == HEADERS {
                raw.extend_from_slice(headers.unwrap_or_default());
            } else if let Some(&(_, a, b)) = extents.iter().find(|e| e.0 == flag) {
                raw.extend_from_slice(&self.raw[a..b]);
            }
        }
        ContentHeader::parse(Bytes::from(raw))
    }

    /// A header for a body of `body_size` bytes with `props`, encoded by
    /// amq-protocol (for messages made inside the broker, such as those
    /// published through the management API; not the hot path).
    pub fn from_properties(
        props: AMQPProperties,
        body_size: u64,
    ) -> Result<ContentHeader, ContentError> {
        use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame};
        let f = cookie_factory::gen_simple(
            gen_frame(&AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size,
                    properties: props,
                },
            )),
            Vec::new(),
        )
        .map_err(|_| ContentError::Truncated)?;
        // Frame header (type, channel, size: 7 bytes) and frame-end off.
        ContentHeader::parse(Bytes::copy_from_slice(&f[7..f.len() - 1]))
    }

    /// The same header with its headers table replaced by `headers`
    /// (encoded here) and, if `drop_expiration`, without the expiration
    /// property: [`ContentHeader::rebuilt`] for callers holding a decoded
    /// table. None only if the table cannot be encoded or the result is
    /// refused, which a header valid on arrival cannot be.
    pub fn with_headers(
        &self,
        headers: &FieldTable,
        drop_expiration: bool,
    ) -> Option<ContentHeader> {
        let table = cookie_factory::gen_simple(
            amq_protocol::types::generation::gen_field_table(headers),
            Vec::new(),
        )
        .ok()?;
        self.rebuilt(Some(&table), drop_expiration).ok()
    }

    /// Write this header into `out` with `entry` (one encoded field-table
    /// entry: name, type tag, value) added at the end of its headers table,
    /// or as a new table if it has none. Every other byte stays as the
    /// publisher sent it. The layout returned locates the properties in
    /// what was written, so no parse is needed to use it (the stream's
    /// append writes each message's header straight into its chunk).
    /// The entry's name must not be in the table already.
    pub fn write_with_entry(&self, entry: &[u8], out: &mut Vec<u8>) -> HeaderLayout {
        let start = out.len();
        // Where the bytes after the change start (in `self.raw`), how far
        // they move, and the new table's range.
        let (at, by, headers) = match self.headers {
            Some((a, b)) => {
                let (a, b) = (a as usize, b as usize);
                let n = (b - a - 4 + entry.len()) as u32;
                out.extend_from_slice(&self.raw[..a]);
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(&self.raw[a + 4..b]);
                out.extend_from_slice(entry);
                out.extend_from_slice(&self.raw[b..]);
                (b, entry.len(), (a, b + entry.len()))
            }
            None => {
                // The table's place: after content-type and
                // content-encoding, the only properties before it.
                let mut pos = PROPS_AT;
                for flag in [1u16 << 15, 1 << 14] {
                    if self.flags & flag != 0 {
                        pos += 1 + self.raw[pos] as usize;
                    }
                }
                out.extend_from_slice(&self.raw[..12]);
                out.extend_from_slice(&(self.flags | HEADERS).to_be_bytes());
                out.extend_from_slice(&self.raw[PROPS_AT..pos]);
                out.extend_from_slice(&(entry.len() as u32).to_be_bytes());
                out.extend_from_slice(entry);
                out.extend_from_slice(&self.raw[pos..]);
                (pos, 4 + entry.len(), (pos, pos + 4 + entry.len()))
            }
        };
        let moved = |r: Option<(u32, u32)>| {
            r.map(|(a, b)| match a as usize >= at {
                true => (a + by as u32, b + by as u32),
                false => (a, b),
            })
        };
        HeaderLayout {
            len: out.len() - start,
            header: ContentHeader {
                raw: Bytes::new(),
                body_size: self.body_size,
                flags: self.flags | HEADERS,
                delivery_mode: self.delivery_mode,
                priority: self.priority,
                headers: Some((headers.0 as u32, headers.1 as u32)),
                expiration: moved(self.expiration),
                reply_to: moved(self.reply_to),
                user_id: moved(self.user_id),
            },
        }
    }

    /// Write this header into `out` unchanged, with its layout.
    pub fn write_to(&self, out: &mut Vec<u8>) -> HeaderLayout {
        out.extend_from_slice(&self.raw);
        HeaderLayout {
            len: self.raw.len(),
            header: ContentHeader {
                raw: Bytes::new(),
                ..self.clone()
            },
        }
    }

    /// All properties decoded (for tests and diagnostics, not the hot path).
    pub fn properties(&self) -> Option<AMQPProperties> {
        parse_properties(&self.raw[12..]).ok().map(|(_, p)| p)
    }
}

/// Where a header's properties are, without its bytes: what
/// [`ContentHeader::write_with_entry`] wrote, joined with those bytes once
/// they are in their final buffer.
#[derive(Clone, Debug)]
pub struct HeaderLayout {
    header: ContentHeader,
    len: usize,
}

impl HeaderLayout {
    /// The length of the header bytes written.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The header over `raw`: the bytes that were written, wherever they
    /// are now.
    pub fn with_raw(self, raw: Bytes) -> ContentHeader {
        assert_eq!(
            raw.len(),
            self.len,
            "a header layout joined with other bytes"
        );
        let h = ContentHeader { raw, ..self.header };
        debug_assert_eq!(Ok(&h), ContentHeader::parse(h.raw.clone()).as_ref());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame};
    use amq_protocol::types::AMQPValue;

    fn encode(props: AMQPProperties, size: u64) -> Bytes {
        let f = cookie_factory::gen_simple(
            gen_frame(&AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: size,
                    properties: props,
                },
            )),
            Vec::new(),
        )
        .unwrap();
        Bytes::copy_from_slice(&f[7..f.len() - 1])
    }

    #[test]
    fn rebuilt_replaces_headers_drops_expiration_and_keeps_other_bytes() {
        // content-type (not UTF-8), expiration, message-id, app-id.
        let mut raw = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let flags: u16 = 0x8000 | 0x0100 | 0x0080 | 0x0008;
        raw.extend_from_slice(&flags.to_be_bytes());
        for s in [&b"caf\xe9"[..], b"6000", b"m-1", b"app"] {
            raw.push(s.len() as u8);
            raw.extend_from_slice(s);
        }
        let h = ContentHeader::parse(Bytes::from(raw)).expect("accepted as bytes");
        assert_eq!(h.expiration(), Some("6000"));
        let mut t = FieldTable::default();
        t.insert("x".into(), AMQPValue::LongLongInt(1));
        let table = cookie_factory::gen_simple(
            amq_protocol::types::generation::gen_field_table(&t),
            Vec::new(),
        )
        .unwrap();
        let r = h.rebuilt(Some(&table), true).unwrap();
        assert_eq!(r.expiration(), None);
        assert_eq!(r.headers(), Some(t));
        assert_eq!(r.body_size(), 5);
        let mut want = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        want.extend_from_slice(&(0x8000u16 | 0x2000 | 0x0080 | 0x0008).to_be_bytes());
        want.extend_from_slice(b"\x04caf\xe9");
        want.extend_from_slice(&table);
        want.extend_from_slice(b"\x03m-1\x03app");
        assert_eq!(&r.raw()[..], &want[..]);
        // Unchanged when nothing changes.
        assert_eq!(h.rebuilt(None, false).unwrap(), h);
    }

    #[test]
    fn locates_properties() {
        let mut headers = FieldTable::default();
        headers.insert("k".into(), AMQPValue::LongString("v".into()));
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers.clone())
            .with_delivery_mode(2)
            .with_priority(4)
            .with_expiration("6000".into())
            .with_timestamp(12)
            .with_user_id("guest".into())
            .with_app_id("app".into());
        let raw = encode(props.clone(), 1234);
        let h = ContentHeader::parse(raw.clone()).unwrap();
        assert_eq!(h.body_size(), 1234);
        assert!(h.is_persistent());
        assert_eq!(h.priority(), Some(4));
        assert_eq!(h.expiration(), Some("6000"));
        assert_eq!(h.reply_to(), None);
        assert_eq!(h.user_id(), Some("guest"));
        assert_eq!(h.headers(), Some(headers));
        assert_eq!(h.properties(), Some(props));
        assert_eq!(h.raw(), &raw);
        for cut in 0..raw.len() {
            assert!(ContentHeader::parse(raw.slice(..cut)).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn reply_to_is_replaced_in_place() {
        let props = AMQPProperties::default()
            .with_content_type("a".into())
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("c".into())
            .with_app_id("z".into());
        let h = ContentHeader::parse(encode(props.clone(), 5)).unwrap();
        assert_eq!(h.reply_to(), Some("amq.rabbitmq.reply-to"));
        let r = h.with_reply_to("amq.rabbitmq.reply-to.XYZ").unwrap();
        assert_eq!(r.reply_to(), Some("amq.rabbitmq.reply-to.XYZ"));
        assert_eq!(
            r.properties(),
            Some(props.with_reply_to("amq.rabbitmq.reply-to.XYZ".into()))
        );
        assert_eq!(r.body_size(), 5);
    }

    #[test]
    fn empty_properties() {
        let h = ContentHeader::parse(encode(AMQPProperties::default(), 0)).unwrap();
        assert_eq!(h.delivery_mode(), None);
        assert!(!h.is_persistent());
        assert_eq!(h.headers(), None);
    }

    #[test]
    fn deep_headers_are_refused() {
        let mut raw = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0];
        raw.extend_from_slice(&crate::table::tests::nested(3000));
        assert_eq!(
            ContentHeader::parse(Bytes::from(raw)),
            Err(ContentError::BadProperty(TableError::TooDeep))
        );
    }

    #[test]
    fn a_header_written_with_an_entry_is_what_a_parse_of_its_bytes_finds() {
        let entry = {
            let mut e = vec![15u8];
            e.extend_from_slice(b"x-stream-offset");
            e.push(b'l');
            e.extend_from_slice(&42i64.to_be_bytes());
            e
        };
        let mut with_headers = FieldTable::default();
        with_headers.insert("app".into(), AMQPValue::LongString("v".into()));
        let cases = [
            AMQPProperties::default(),
            AMQPProperties::default().with_delivery_mode(2),
            AMQPProperties::default()
                .with_content_type("text/plain".into())
                .with_content_encoding("gzip".into())
                .with_expiration("6000".into())
                .with_reply_to("r".into())
                .with_user_id("guest".into())
                .with_priority(3),
            AMQPProperties::default()
                .with_content_type("a".into())
                .with_headers(with_headers.clone())
                .with_expiration("5".into())
                .with_user_id("u".into()),
            AMQPProperties::default().with_headers(FieldTable::default()),
        ];
        for props in cases {
            let h = ContentHeader::parse(encode(props.clone(), 9)).unwrap();
            let mut out = b"before".to_vec();
            let layout = h.write_with_entry(&entry, &mut out);
            assert_eq!(layout.len(), out.len() - 6);
            let raw = Bytes::from(out).slice(6..);
            let parsed = ContentHeader::parse(raw.clone()).unwrap();
            let joined = layout.with_raw(raw);
            assert_eq!(joined, parsed);
            assert_eq!(joined.expiration(), h.expiration());
            assert_eq!(joined.reply_to(), h.reply_to());
            assert_eq!(joined.user_id(), h.user_id());
            assert_eq!(joined.priority(), h.priority());
            assert_eq!(joined.delivery_mode(), h.delivery_mode());
            let got = joined.headers().unwrap();
            assert_eq!(
                got.inner().get("x-stream-offset"),
                Some(&AMQPValue::LongLongInt(42))
            );
            let mut others = got.inner().clone();
            others.remove("x-stream-offset");
            let before = h.headers().unwrap_or_default();
            assert_eq!(&others, before.inner());
            // Every other property is as it was.
            let mut a = joined.properties().unwrap();
            a = a.with_headers(FieldTable::default());
            assert_eq!(
                a,
                h.properties().unwrap().with_headers(FieldTable::default())
            );
            // Unchanged, with its layout.
            let mut out = Vec::new();
            let same = h.write_to(&mut out).with_raw(Bytes::from(out));
            assert_eq!(same, h);
        }
    }
}
