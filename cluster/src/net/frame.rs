//! Wire framing: a u32 big-endian length followed by a JSON body.
//!
//! The length is checked against a cap *before* any buffer is allocated, so a peer (or
//! a corrupted stream) cannot make us reserve gigabytes by announcing a huge frame.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ClusterError;

/// Largest frame body accepted or produced once a connection is authenticated.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// Largest frame body accepted during the handshake, before the peer is authenticated.
pub const MAX_HANDSHAKE_FRAME_LEN: usize = 64 * 1024;

const HEADER_LEN: usize = 4;

/// Serializes `msg` into a complete frame (header included).
///
/// Fails with [`ClusterError::FrameTooLarge`] if the body exceeds [`MAX_FRAME_LEN`]; the
/// caller can then split the payload instead of breaking the connection.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ClusterError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg)
        .map_err(|e| ClusterError::Protocol(format!("cannot encode message: {e}")))?;
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(ClusterError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // len <= MAX_FRAME_LEN < u32::MAX, so the cast is lossless.
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Encodes and writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), ClusterError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of at most [`MAX_FRAME_LEN`] bytes and decodes it.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, ClusterError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_limited(r, MAX_FRAME_LEN).await
}

/// Reads one frame whose body may not exceed `max` bytes and decodes it.
pub async fn read_frame_limited<R, T>(r: &mut R, max: usize) -> Result<T, ClusterError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(ClusterError::FrameTooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ClusterError::Protocol(format!("malformed frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec!["a", "b"]).await.expect("write");
        assert_eq!(&buf[..4], &9u32.to_be_bytes());
        let mut rd = buf.as_slice();
        let back: Vec<String> = read_frame(&mut rd).await.expect("read");
        assert_eq!(back, vec!["a", "b"]);
        assert!(rd.is_empty());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_the_body() {
        for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let mut wire = len.to_be_bytes().to_vec();
            wire.extend_from_slice(b"[1,2,3]");
            let mut rd = wire.as_slice();
            let err = read_frame::<_, serde_json::Value>(&mut rd)
                .await
                .expect_err("must refuse");
            match err {
                ClusterError::FrameTooLarge { len: l, max } => {
                    assert_eq!(l, len as usize);
                    assert_eq!(max, MAX_FRAME_LEN);
                }
                other => panic!("unexpected error: {other}"),
            }
            // Only the header was consumed: no attempt was made to read (or size a buffer
            // for) the announced body.
            assert_eq!(rd, b"[1,2,3]");
        }
    }

    #[tokio::test]
    async fn handshake_limit_is_smaller() {
        let wire = (MAX_HANDSHAKE_FRAME_LEN as u32 + 1).to_be_bytes();
        let err = read_frame_limited::<_, serde_json::Value>(
            &mut wire.as_slice(),
            MAX_HANDSHAKE_FRAME_LEN,
        )
        .await
        .expect_err("must refuse");
        assert!(matches!(err, ClusterError::FrameTooLarge { .. }));
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let big = "x".repeat(MAX_FRAME_LEN);
        let err = encode(&big).expect_err("must refuse");
        assert!(matches!(err, ClusterError::FrameTooLarge { .. }));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_io_error() {
        let mut wire = 10u32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"[1,");
        let err = read_frame::<_, serde_json::Value>(&mut wire.as_slice())
            .await
            .expect_err("must fail");
        assert!(matches!(err, ClusterError::Io(_)));
    }
}
