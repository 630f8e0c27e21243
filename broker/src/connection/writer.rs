//! A connection's output: every frame a connection sends is encoded into one
//! buffer and written once per batch of work, not once per frame. Bodies of
//! at least [`SHARED_BODY`] bytes are not copied: their frames' payloads are
//! slices of the message's own body, queued behind the encoded bytes before
//! them and written with vectored writes.

use super::stream::Stream;
use crate::channel::Output;
use crate::message::Message;
use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use warren_protocol::amqp::AMQPClass;
use warren_protocol::method;

/// Bodies at least this large are written from the message itself; smaller
/// ones are cheaper to copy.
const SHARED_BODY: usize = 4096;

pub struct Writer {
    /// Encoded frames not yet written.
    out: BytesMut,
    /// Output queued ahead of `out` when large bodies are sent: encoded
    /// bytes cut off `out`, and bodies shared with their message (never
    /// copied), in order.
    segs: VecDeque<Bytes>,
    /// The negotiated frame_max: bodies are split into frames of this size.
    frame_max: u32,
    /// When the socket last took bytes (heartbeats are sent after silence).
    pub last_write: Instant,
    /// A write that makes no progress for this long fails (`TimedOut`): a
    /// peer that stopped reading cannot hold the connection, and the
    /// messages it was sent, for ever.
    stall: Duration,
}

impl Writer {
    pub fn new(frame_max: u32) -> Writer {
        Writer {
            out: BytesMut::with_capacity(16 * 1024),
            segs: VecDeque::new(),
            frame_max,
            last_write: Instant::now(),
            stall: Duration::from_secs(15),
        }
    }

    /// How long a write may make no progress (see `stall`).
    pub fn set_stall_limit(&mut self, stall: Duration) {
        self.stall = stall;
    }

    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// Nothing is waiting to be written.
    pub fn is_idle(&self) -> bool {
        self.out.is_empty() && self.segs.is_empty()
    }

    /// Write everything queued.
    pub async fn flush(&mut self, stream: &mut Stream) -> std::io::Result<()> {
        if !self.segs.is_empty() {
            self.write_segments(stream).await?;
        } else if !self.out.is_empty() {
            let mut at = 0;
            while at < self.out.len() {
                at += write_or_stall(self.stall, stream.write(&self.out[at..])).await?;
            }
            self.out.clear();
            self.last_write = Instant::now();
        }
        if stream.is_tls() {
            // TLS records the session still holds go out now.
            let flush = async { stream.flush().await.map(|()| 1) };
            write_or_stall(self.stall, flush).await?;
        }
        Ok(())
    }

    /// Write `segs`, then `out`, with vectored writes.
    async fn write_segments(&mut self, stream: &mut Stream) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.segs.push_back(self.out.split().freeze());
        }
        while !self.segs.is_empty() {
            let slices: SmallVec<[std::io::IoSlice<'_>; 64]> = self
                .segs
                .iter()
                .take(64)
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            let mut n = write_or_stall(self.stall, stream.write_vectored(&slices)).await?;
            drop(slices);
            while n > 0 {
                let Some(front) = self.segs.front_mut() else {
                    break;
                };
                if n >= front.len() {
                    n -= front.len();
                    self.segs.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        self.last_write = Instant::now();
        Ok(())
    }
}

/// One write, failed with `TimedOut` if the socket takes nothing for
/// `stall`; a write of nothing is an error too (the peer is gone).
async fn write_or_stall(
    stall: Duration,
    write: impl std::future::Future<Output = std::io::Result<usize>>,
) -> std::io::Result<usize> {
    match tokio::time::timeout(stall, write).await {
        Ok(Ok(0)) => Err(std::io::ErrorKind::WriteZero.into()),
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client read nothing for {stall:?}"),
        )),
    }
}

impl Output for Writer {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    fn send_method(&mut self, channel: u16, m: AMQPClass) {
        method::put_method(&mut self.out, channel, &m);
    }

    fn put_content(&mut self, channel: u16, msg: &Message) {
        if msg.body.len() < SHARED_BODY {
            method::put_content(
                &mut self.out,
                channel,
                msg.header.raw(),
                &msg.body,
                self.frame_max,
            );
            return;
        }
        let segs = &mut self.segs;
        method::put_content_parts(
            &mut self.out,
            channel,
            msg.header.raw(),
            msg.body.len(),
            self.frame_max,
            |out, r| {
                segs.push_back(out.split().freeze());
                segs.push_back(msg.body.slice(r));
            },
        );
    }
}
