//! A raw AMQP client over a `TcpStream`, for what lapin cannot or will not
//! send: exact bytes, protocol violations, hostile peers. Frames are built
//! with `warren_protocol::client` (or [`frame()`] for deliberately malformed
//! ones) and sent with [`Raw::send`] / [`Raw::send_with`].

use crate::{within, TestBroker, WAIT};
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::client::{
    self, Args, BASIC_GET, BASIC_GET_EMPTY, BASIC_GET_OK, CHANNEL_OPEN_OK, CONNECTION_CLOSE,
    CONNECTION_CLOSE_OK, CONNECTION_OPEN_OK, CONNECTION_START, CONNECTION_TUNE, QUEUE_DECLARE_OK,
    QUEUE_DELETE_OK,
};
use warren_protocol::frame::{self, BODY, FRAME_END, HEADER, HEADER_LEN, HEARTBEAT, METHOD};

/// The bytes `f` writes: any mix of `warren_protocol::client` encoders and
/// [`frame()`]s, to be sent in one write.
pub fn encode(f: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::new();
    f(&mut b);
    b
}

/// A whole frame exactly as given (type, channel, size, payload, frame-end),
/// for the frames no encoder writes: unknown types, oversize payloads,
/// orphan bodies, hand-made content headers.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(frame::OVERHEAD + payload.len());
    frame::put_header(&mut b, kind, channel, payload.len());
    b.put_slice(payload);
    b.put_u8(FRAME_END);
    b
}

/// A frame read from the socket.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// Class and method ids of a method frame.
    pub fn ids(&self) -> Option<(u16, u16)> {
        if self.kind != METHOD {
            return None;
        }
        warren_protocol::method::ids(&self.payload)
    }
}

/// A decoded `connection.close` or `channel.close`.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    pub reply_code: u16,
    pub reply_text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl Close {
    /// From a whole method payload (class and method ids included).
    pub fn parse(payload: &[u8]) -> Close {
        let mut a = Args(&payload[4..]);
        let mut close = || {
            Some(Close {
                reply_code: a.u16()?,
                reply_text: String::from_utf8_lossy(a.short()?).into_owned(),
                class_id: a.u16()?,
                method_id: a.u16()?,
            })
        };
        close().expect("truncated close arguments")
    }
}

/// What the peer did at the end of a read.
#[derive(Debug)]
pub enum Next {
    Frame(RawFrame),
    Eof,
    Timeout,
}

/// Options for [`Raw::open_with`].
pub struct Handshake {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    /// The encoded client-properties table, length prefix included.
    pub client_properties: Vec<u8>,
}

impl Default for Handshake {
    fn default() -> Self {
        // capabilities: consumer_cancel_notify etc. not needed by raw tests.
        let mut table = BytesMut::new();
        client::table(&mut table, &[("product", "warren-raw-test")]);
        Handshake {
            channel_max: 0,
            frame_max: 131072,
            heartbeat: 0,
            client_properties: table.to_vec(),
        }
    }
}

/// The user and password in the broker URL.
fn credentials(url: &str) -> (String, String) {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let userinfo = rest.split('@').next().unwrap_or("guest:guest");
    let mut it = userinfo.splitn(2, ':');
    let user = it.next().unwrap_or("guest").to_owned();
    let pass = it.next().unwrap_or("guest").to_owned();
    (user, pass)
}

/// A hand-driven AMQP connection.
pub struct Raw {
    pub sock: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(broker: &TestBroker) -> Raw {
        let sock = within("tcp connect", TcpStream::connect(broker.addr()))
            .await
            .expect("tcp connect");
        sock.set_nodelay(true).ok();
        Raw {
            sock,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.expect("write to broker");
    }

    /// Send what `f` encodes, in one write.
    pub async fn send_with(&mut self, f: impl FnOnce(&mut BytesMut)) {
        self.send(&encode(f)).await;
    }

    /// Like `send`, but the broker may already have closed the socket.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes).await
    }

    /// Read exactly `n` bytes (or fewer if the peer closes).
    pub async fn read_bytes(&mut self, n: usize, wait: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.buf.len() < n {
            self.buf.reserve(8192);
            match tokio::time::timeout_at(deadline, self.sock.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        let k = n.min(self.buf.len());
        self.buf.split_to(k).to_vec()
    }

    /// The next frame, EOF, or a timeout.
    pub async fn next(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match frame::check(&self.buf, u32::MAX) {
                Ok(Some((h, total))) => {
                    let f = self.buf.split_to(total);
                    return Next::Frame(RawFrame {
                        kind: h.kind,
                        channel: h.channel,
                        payload: f[HEADER_LEN..total - 1].to_vec(),
                    });
                }
                Ok(None) => {}
                Err(e) => panic!("broker sent a bad frame: {e}"),
            }
            // Read straight into the buffer: no large array in the future
            // (debug builds copy futures around on the stack).
            self.buf.reserve(65536);
            match tokio::time::timeout_at(deadline, self.sock.read_buf(&mut self.buf)).await {
                Err(_) => return Next::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Eof,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next frame that is not a heartbeat; panics on EOF or timeout.
    pub async fn frame(&mut self) -> RawFrame {
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.kind == HEARTBEAT => continue,
                Next::Frame(f) => return f,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next method frame, which must be `id` on `channel`.
    pub async fn expect_method(&mut self, channel: u16, id: (u16, u16)) -> RawFrame {
        let f = self.frame().await;
        assert_eq!(
            (f.channel, f.ids()),
            (channel, Some(id)),
            "unexpected frame {f:?}"
        );
        f
    }

    /// Read until method `id` arrives on `channel`, skipping every other
    /// frame; panics if the socket closes or `wait` runs out first.
    pub async fn skip_to_method(
        &mut self,
        channel: u16,
        id: (u16, u16),
        wait: Duration,
    ) -> RawFrame {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(f) if f.channel == channel && f.ids() == Some(id) => return f,
                Next::Frame(_) => continue,
                other => panic!("expected method {id:?} on channel {channel}, got {other:?}"),
            }
        }
    }

    async fn send_close_ok(&mut self) {
        let close_ok = encode(|b| client::method(b, 0, CONNECTION_CLOSE_OK, |_| {}));
        let _ = self.try_send(&close_ok).await;
    }

    /// Read until `connection.close` arrives; answer close-ok; return it.
    /// Panics if the socket closes or times out first.
    pub async fn expect_connection_close(&mut self) -> Close {
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.channel == 0 && f.ids() == Some(CONNECTION_CLOSE) => {
                    let c = Close::parse(&f.payload);
                    self.send_close_ok().await;
                    return c;
                }
                Next::Frame(_) => continue,
                other => panic!("expected connection.close, got {other:?}"),
            }
        }
    }

    /// Wait until the broker closes the socket (frames before that ignored).
    /// Returns false on timeout.
    pub async fn wait_eof(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Eof => return true,
                Next::Timeout => return false,
                Next::Frame(_) => continue,
            }
        }
    }

    /// Protocol header, then wait for `connection.start`; returns its frame.
    pub async fn start(broker: &TestBroker) -> (Raw, RawFrame) {
        let mut raw = Raw::connect(broker).await;
        raw.send(client::PROTOCOL_HEADER).await;
        let start = raw.expect_method(0, CONNECTION_START).await;
        (raw, start)
    }

    /// A full handshake up to `connection.open-ok`.
    pub async fn open_with(broker: &TestBroker, h: Handshake) -> Raw {
        let (mut raw, _start) = Raw::start(broker).await;
        let (user, pass) = credentials(&broker.url);
        raw.send_with(|b| client::start_ok(b, &h.client_properties, &user, &pass))
            .await;
        let tune = raw.expect_method(0, CONNECTION_TUNE).await;
        let mut a = Args(&tune.payload[4..]);
        let server_channel_max = a.u16().expect("connection.tune channel-max");
        let server_frame_max = a.u32().expect("connection.tune frame-max");
        let channel_max = if h.channel_max == 0 {
            server_channel_max
        } else {
            h.channel_max
        };
        let frame_max = h.frame_max.min(server_frame_max);
        raw.send_with(|b| client::tune_ok(b, channel_max, frame_max, h.heartbeat))
            .await;
        raw.send_with(|b| client::open(b, "/")).await;
        raw.expect_method(0, CONNECTION_OPEN_OK).await;
        raw
    }

    /// A full handshake with defaults (frame_max 131072, no heartbeat).
    pub async fn open(broker: &TestBroker) -> Raw {
        Raw::open_with(broker, Handshake::default()).await
    }

    /// Open `channel` and wait for open-ok.
    pub async fn open_channel(&mut self, channel: u16) {
        self.send_with(|b| client::channel_open(b, channel)).await;
        self.expect_method(channel, CHANNEL_OPEN_OK).await;
    }

    /// `basic.get` (no-ack) on `channel` until a message arrives; returns its
    /// content-header payload and its body (all body frames joined).
    pub async fn get_message(&mut self, channel: u16, queue: &str) -> (Vec<u8>, Vec<u8>) {
        within("a message from basic.get", async {
            loop {
                self.send_with(|b| {
                    client::method(b, channel, BASIC_GET, |b| {
                        b.put_u16(0);
                        client::short(b, queue.as_bytes());
                        b.put_u8(1); // no-ack
                    })
                })
                .await;
                let f = self.frame().await;
                match f.ids() {
                    Some(BASIC_GET_EMPTY) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Some(BASIC_GET_OK) => {
                        let h = self.frame().await;
                        assert_eq!(h.kind, HEADER, "expected a content header: {h:?}");
                        let size =
                            u64::from_be_bytes(h.payload[4..12].try_into().unwrap()) as usize;
                        let mut body = Vec::new();
                        while body.len() < size {
                            let b = self.frame().await;
                            assert_eq!(b.kind, BODY, "expected a body frame: {b:?}");
                            body.extend_from_slice(&b.payload);
                        }
                        assert_eq!(body.len(), size, "body longer than its header says");
                        return (h.payload, body);
                    }
                    other => panic!("unexpected {other:?}: {f:?}"),
                }
            }
        })
        .await
    }

    /// `queue.declare` (plain) on `channel`, waiting for declare-ok.
    pub async fn declare_queue(&mut self, channel: u16, queue: &str) {
        self.send_with(|b| client::queue_declare(b, channel, queue, false))
            .await;
        self.expect_method(channel, QUEUE_DECLARE_OK).await;
    }

    /// `queue.delete` on `channel`, waiting for delete-ok.
    pub async fn delete_queue(&mut self, channel: u16, queue: &str) {
        self.send_with(|b| client::queue_delete(b, channel, queue))
            .await;
        self.expect_method(channel, QUEUE_DELETE_OK).await;
    }

    /// The broker's answer to a connection-level error: a connection.close
    /// with `code`. Against a non-Warren broker (`lenient`), a dropped socket
    /// is accepted too: RabbitMQ 3.10 drops some peers without a close.
    pub async fn expect_close_or_drop(&mut self, code: u16, lenient: bool) -> Option<Close> {
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.channel == 0 && f.ids() == Some(CONNECTION_CLOSE) => {
                    let c = Close::parse(&f.payload);
                    self.send_close_ok().await;
                    assert_eq!(c.reply_code, code, "{c:?}");
                    return Some(c);
                }
                Next::Frame(_) => continue,
                Next::Eof if lenient => return None,
                other => panic!("expected connection.close {code}, got {other:?}"),
            }
        }
    }

    /// Politely close the connection.
    pub async fn close(mut self) {
        self.send_with(client::connection_close).await;
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.ids() == Some(CONNECTION_CLOSE_OK) => return,
                Next::Frame(_) => continue,
                other => panic!("expected connection.close-ok, got {other:?}"),
            }
        }
    }
}
