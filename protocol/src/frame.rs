//! Frames: the 7-byte header (type, channel, size), parsed with nom and checked
//! against `frame_max` before the payload is buffered, so a forged 4 GiB size
//! is rejected at once instead of waiting for bytes that never come.

use bytes::{BufMut, BytesMut};
use nom::number::complete::{be_u16, be_u32, be_u8};
use nom::IResult;
use nom::Parser;

pub const METHOD: u8 = 1;
pub const HEADER: u8 = 2;
pub const BODY: u8 = 3;
pub const HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Type, channel, size.
pub const HEADER_LEN: usize = 7;
/// Header plus the frame-end octet: what a frame costs beyond its payload.
pub const OVERHEAD: usize = HEADER_LEN + 1;
/// The only protocol header Warren speaks.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// The fixed part in front of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub channel: u16,
    pub size: u32,
}

/// Why a frame was refused. All of these are 501 FRAME_ERROR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Declared payload plus overhead exceeds the negotiated frame_max.
    TooLarge { size: u32, frame_max: u32 },
    /// A frame type other than method, header, body or heartbeat.
    UnknownType(u8),
    /// The octet after the payload was not 0xCE.
    BadFrameEnd(u8),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { size, frame_max } => write!(
                f,
                "frame size {} exceeds the negotiated frame_max {}",
                *size as u64 + OVERHEAD as u64,
                frame_max
            ),
            FrameError::UnknownType(t) => write!(f, "unknown frame type {t}"),
            FrameError::BadFrameEnd(b) => write!(f, "bad frame end octet 0x{b:02x}"),
        }
    }
}

/// nom parser for the 7-byte frame header.
pub fn parse_header(i: &[u8]) -> IResult<&[u8], FrameHeader> {
    let (i, (kind, channel, size)) = (be_u8, be_u16, be_u32).parse(i)?;
    Ok((
        i,
        FrameHeader {
            kind,
            channel,
            size,
        },
    ))
}

/// Look at the front of `buf` without consuming or allocating.
///
/// - `Ok(None)`: not enough bytes yet for a whole frame (the caller reads more);
///   an oversize or unknown frame is reported as soon as its header is in.
/// - `Ok(Some((header, total)))`: a whole frame of `total` bytes is at the front,
///   its frame-end octet checked.
pub fn check(buf: &[u8], frame_max: u32) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    let header = match parse_header(buf) {
        Ok((_, h)) => h,
        Err(_) => return Ok(None),
    };
    if !matches!(header.kind, METHOD | HEADER | BODY | HEARTBEAT) {
        return Err(FrameError::UnknownType(header.kind));
    }
    if header.size as u64 + OVERHEAD as u64 > frame_max as u64 {
        return Err(FrameError::TooLarge {
            size: header.size,
            frame_max,
        });
    }
    let total = HEADER_LEN + header.size as usize + 1;
    if buf.len() < total {
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(FrameError::BadFrameEnd(end));
    }
    Ok(Some((header, total)))
}

/// Write a frame header for a payload of `size` bytes.
#[inline]
pub fn put_header(buf: &mut BytesMut, kind: u8, channel: u16, size: usize) {
    buf.put_u8(kind);
    buf.put_u16(channel);
    buf.put_u32(size as u32);
}

/// Write a heartbeat frame.
pub fn put_heartbeat(buf: &mut BytesMut) {
    put_header(buf, HEARTBEAT, 0, 0);
    buf.put_u8(FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_header(&mut b, kind, channel, payload.len());
        b.extend_from_slice(payload);
        b.put_u8(FRAME_END);
        b.to_vec()
    }

    #[test]
    fn complete_frame_is_found() {
        let f = frame(METHOD, 3, b"abc");
        let (h, total) = check(&f, 4096).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader {
                kind: METHOD,
                channel: 3,
                size: 3
            }
        );
        assert_eq!(total, f.len());
    }

    #[test]
    fn truncated_input_needs_more() {
        let f = frame(BODY, 1, &[7u8; 100]);
        for cut in 0..f.len() {
            assert_eq!(check(&f[..cut], 4096), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn oversize_is_rejected_from_the_header_alone() {
        // A forged 4 GiB size: refused with only 7 bytes in hand.
        let mut b = BytesMut::new();
        put_header(&mut b, METHOD, 1, u32::MAX as usize);
        assert!(matches!(
            check(&b, 131072),
            Err(FrameError::TooLarge { .. })
        ));
        // Exactly frame_max is fine, one more byte is not.
        let ok = frame(BODY, 1, &vec![0; 4096 - OVERHEAD]);
        assert!(check(&ok, 4096).unwrap().is_some());
        let big = frame(BODY, 1, &vec![0; 4096 - OVERHEAD + 1]);
        assert!(check(&big, 4096).is_err());
    }

    #[test]
    fn bad_frame_end_and_type() {
        let mut f = frame(METHOD, 1, b"xy");
        *f.last_mut().unwrap() = 0;
        assert_eq!(check(&f, 4096), Err(FrameError::BadFrameEnd(0)));
        let f = frame(9, 1, b"xy");
        assert_eq!(check(&f, 4096), Err(FrameError::UnknownType(9)));
    }

    #[test]
    fn heartbeat_matches_amq_protocol() {
        let mut b = BytesMut::new();
        put_heartbeat(&mut b);
        let theirs = cookie_factory::gen_simple(
            amq_protocol::frame::gen_frame(&amq_protocol::frame::AMQPFrame::Heartbeat),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(&b[..], &theirs[..]);
    }
}
