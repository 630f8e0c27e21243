//! The socket side of a connection: the stream, the bytes read and not yet
//! handled (split into checked frames without copying), the writer, and the
//! closing handshake's socket work.

use super::stream::Stream;
use super::{conn_error, Fault};
use crate::error::AmqpError;
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use warren_protocol::amqp::{connection as conn, AMQPClass};
use warren_protocol::frame::{self, FrameHeader};
use warren_protocol::method::{self, short};
use warren_protocol::reply;

use super::writer::Writer;
use crate::channel::Output;

/// The socket side of a connection: the stream, what was read and not yet
/// handled, and the writer.
pub struct Io {
    pub(super) stream: Stream,
    pub(super) peer: SocketAddr,
    pub(super) inbuf: BytesMut,
    pub(super) out: Writer,
    /// Largest frame accepted (before tune-ok: `PRE_TUNE_FRAME_MAX`).
    pub(super) frame_max: u32,
}

impl Io {
    pub(super) fn new(stream: Stream, peer: SocketAddr) -> Io {
        let _ = stream.tcp().set_nodelay(true);
        let frame_max = crate::config::PRE_TUNE_FRAME_MAX;
        Io {
            stream,
            peer,
            inbuf: BytesMut::with_capacity(16 * 1024),
            out: Writer::new(frame_max),
            frame_max,
        }
    }

    /// How long a write may make no progress before the connection is
    /// closed.
    pub(super) fn set_stall_limit(&mut self, stall: Duration) {
        self.out.set_stall_limit(stall);
    }

    pub(super) fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
        self.out.set_frame_max(frame_max);
    }

    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush(&mut self.stream).await
    }

    /// Take one complete frame from the input buffer, if there is one.
    pub(super) fn next_frame(&mut self) -> Result<Option<(FrameHeader, Bytes)>, Fault> {
        match frame::check(&self.inbuf, self.frame_max) {
            Ok(None) => Ok(None),
            Ok(Some((h, total))) => {
                let f = self.inbuf.split_to(total).freeze();
                Ok(Some((h, f.slice(frame::HEADER_LEN..total - 1))))
            }
            Err(e) => Err(conn_error(reply::FRAME_ERROR, e.to_string())),
        }
    }

    /// Read until a whole frame is in (handshake only; heartbeats skipped).
    pub(super) async fn read_frame(&mut self) -> Result<(FrameHeader, Bytes), Fault> {
        loop {
            if let Some(f) = self.next_frame()? {
                if f.0.kind == frame::HEARTBEAT {
                    check_heartbeat(f.0.channel, &f.1)?;
                    continue;
                }
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.inbuf).await? == 0 {
                return Err(Fault::Drop("peer closed during handshake".into()));
            }
        }
    }

    /// Send connection.close for `e`; false if the socket failed.
    pub(super) async fn send_close(&mut self, e: &AmqpError) -> bool {
        self.out.send_method(
            0,
            AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
                reply_code: e.code,
                reply_text: short(&e.reply_text()),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        self.flush().await.is_ok()
    }

    /// The client closed the connection and close-ok is written: send our
    /// FIN, then read and discard until the client closes its end (or
    /// `linger` passes). Closing with input unread would make the kernel
    /// reset the connection, and a client whose publishes were still on
    /// the wire behind its connection.close would lose the close-ok.
    pub(super) async fn finish(&mut self, linger: Duration) {
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.shutdown().await;
        self.inbuf.clear();
        let mut scratch = vec![0u8; 16 * 1024];
        let drain = async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    }

    /// After sending connection.close: discard frames until close-ok.
    pub(super) async fn await_close_ok(&mut self, limit: Duration) {
        let wait = async {
            loop {
                match self.next_frame() {
                    Ok(Some((h, p))) => {
                        if h.kind == frame::METHOD && method::ids(&p) == Some((10, 51)) {
                            return;
                        }
                        if h.kind == frame::METHOD && method::ids(&p) == Some((10, 50)) {
                            self.out.send_method(
                                0,
                                AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                            );
                            let _ = self.flush().await;
                            return;
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
                match self.stream.read_buf(&mut self.inbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if self.inbuf.len() > 1 << 20 {
                    self.inbuf.clear();
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }
}

/// A heartbeat frame is on channel 0 (505 otherwise) and empty (501
/// otherwise), as RabbitMQ checks it, in the handshake and after.
pub(super) fn check_heartbeat(channel: u16, payload: &[u8]) -> Result<(), Fault> {
    if channel != 0 {
        return Err(conn_error(
            reply::UNEXPECTED_FRAME,
            format!("heartbeat frame on channel {channel}"),
        ));
    }
    if !payload.is_empty() {
        return Err(conn_error(
            reply::FRAME_ERROR,
            format!("heartbeat frame with a {}-byte payload", payload.len()),
        ));
    }
    Ok(())
}
