//! Helpers shared by the integration test binaries: reading reply codes out of
//! lapin errors, waiting for asynchronous channel/connection errors, and a
//! minimal raw AMQP client (hand-built frames over a `TcpStream`) for what lapin
//! cannot or will not send.
#![allow(dead_code)]

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ErrorKind, Event};
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_tests::TestBroker;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- reply codes

pub const NO_ROUTE: u16 = 312;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Assert that `r` failed with the AMQP reply code `expected`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: lapin::Result<T>, expected: u16) {
    match r {
        Ok(v) => panic!("expected reply code {expected}, got success: {v:?}"),
        Err(e) => assert_eq!(
            code(&e),
            Some(expected),
            "expected reply code {expected}, got error: {e}"
        ),
    }
}

/// Run `fut` with the test timeout.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Errors (channel and connection closes) a connection reports asynchronously.
/// Subscribe *before* doing what should fail: lapin only emits events while a
/// listener exists.
pub struct Errors(Pin<Box<dyn futures_lite::Stream<Item = Event> + Send>>);

impl Errors {
    pub fn of(conn: &Connection) -> Errors {
        Errors(Box::pin(conn.events_listener()))
    }

    /// The reply code of the next error event.
    pub async fn next_code(&mut self) -> u16 {
        within("an error event", async {
            loop {
                match self.0.next().await {
                    Some(Event::Error(e)) => {
                        return code(&e)
                            .unwrap_or_else(|| panic!("error without a reply code: {e}"))
                    }
                    Some(_) => continue,
                    None => panic!("event stream ended without an error"),
                }
            }
        })
        .await
    }
}

// ------------------------------------------------------------- lapin helpers

/// Declare a plain (non-durable, not exclusive, not auto-delete) queue.
/// `queue.declare passive=true`.
pub async fn passive_queue(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
}

pub async fn declare_queue(ch: &Channel, name: &str) -> lapin::Queue {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.declare")
}

/// Publish and wait until the frames are written.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .expect("basic.publish");
}

/// Round trip on the channel: when it returns, the broker has processed
/// everything sent earlier on this channel (publishes included).
pub async fn sync(ch: &Channel) {
    ch.exchange_declare(
        "amq.direct".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("sync round trip");
}

/// Wait until the queue holds exactly `n` ready messages (publishes and
/// requeues are asynchronous; a passive declare reads the count).
pub async fn wait_count(ch: &Channel, queue: &str, n: u32) {
    within("the queue's message count", async {
        loop {
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("passive queue.declare");
            if q.message_count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// `basic.get` with auto-ack, returning the body (None when empty).
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data)
}

/// Bodies (as strings) currently in `queue`, drained with basic.get.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = get_body(ch, queue).await {
        out.push(String::from_utf8(b).expect("utf-8 body"));
    }
    out
}

/// The next delivery of a consumer, within the test timeout.
pub async fn next_delivery(c: &mut lapin::Consumer) -> lapin::message::Delivery {
    within("a delivery", c.next())
        .await
        .expect("consumer stream ended")
        .expect("delivery error")
}

/// Assert that a consumer gets nothing for a short while.
pub async fn assert_no_delivery(c: &mut lapin::Consumer, wait: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(wait, c.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            d.map(|d| String::from_utf8_lossy(&d.data).into_owned())
        );
    }
}

// ------------------------------------------------------------ raw AMQP client

pub const METHOD: u8 = 1;
pub const HEADER: u8 = 2;
pub const BODY: u8 = 3;
pub const HEARTBEAT: u8 = 8;
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Append an AMQP short string.
pub fn put_sstr(b: &mut Vec<u8>, s: &str) {
    assert!(s.len() <= 255);
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

/// Append an AMQP long string.
pub fn put_lstr(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s);
}

/// A method payload: class id, method id, then the argument bytes.
pub fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + args.len());
    b.extend_from_slice(&class.to_be_bytes());
    b.extend_from_slice(&method.to_be_bytes());
    b.extend_from_slice(args);
    b
}

/// A whole frame: type, channel, size, payload, frame-end.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.push(kind);
    b.extend_from_slice(&channel.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.push(0xCE);
    b
}

/// A method frame.
pub fn method_frame(channel: u16, class: u16, meth: u16, args: &[u8]) -> Vec<u8> {
    frame(METHOD, channel, &method(class, meth, args))
}

/// `channel.open` on `channel`.
pub fn channel_open(channel: u16) -> Vec<u8> {
    method_frame(channel, 20, 10, &[0])
}

/// A `basic` content header frame with no properties.
pub fn content_header(channel: u16, body_size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&60u16.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    frame(HEADER, channel, &p)
}

/// `basic.publish` (exchange, routing key, flags).
pub fn basic_publish(
    channel: u16,
    exchange: &str,
    key: &str,
    mandatory: bool,
    immediate: bool,
) -> Vec<u8> {
    let mut a = vec![0, 0];
    put_sstr(&mut a, exchange);
    put_sstr(&mut a, key);
    a.push(mandatory as u8 | (immediate as u8) << 1);
    method_frame(channel, 60, 40, &a)
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
        if self.kind != METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
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
    pub fn parse(payload: &[u8]) -> Close {
        let a = &payload[4..];
        let reply_code = u16::from_be_bytes([a[0], a[1]]);
        let n = a[2] as usize;
        let reply_text = String::from_utf8_lossy(&a[3..3 + n]).into_owned();
        let r = &a[3 + n..];
        Close {
            reply_code,
            reply_text,
            class_id: u16::from_be_bytes([r[0], r[1]]),
            method_id: u16::from_be_bytes([r[2], r[3]]),
        }
    }
}

/// What the peer did at the end of a read.
#[derive(Debug)]
pub enum Next {
    Frame(RawFrame),
    Eof,
    Timeout,
}

/// A hand-driven AMQP connection.
pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
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

/// Options for [`Raw::open`].
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
        let mut t = Vec::new();
        put_sstr(&mut t, "product");
        t.push(b'S');
        put_lstr(&mut t, b"warren-raw-test");
        let mut table = (t.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&t);
        Handshake {
            channel_max: 0,
            frame_max: 131072,
            heartbeat: 0,
            client_properties: table,
        }
    }
}

impl Raw {
    pub async fn connect(broker: &TestBroker) -> Raw {
        let sock = within("tcp connect", TcpStream::connect(broker.addr()))
            .await
            .expect("tcp connect");
        sock.set_nodelay(true).ok();
        Raw {
            sock,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.expect("write to broker");
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
        self.buf.drain(..k).collect()
    }

    /// The next frame, EOF, or a timeout.
    pub async fn next(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= 8 + size {
                    let kind = self.buf[0];
                    let channel = u16::from_be_bytes([self.buf[1], self.buf[2]]);
                    let payload = self.buf[7..7 + size].to_vec();
                    assert_eq!(
                        self.buf[7 + size],
                        0xCE,
                        "broker sent a bad frame-end octet"
                    );
                    self.buf.drain(..8 + size);
                    return Next::Frame(RawFrame {
                        kind,
                        channel,
                        payload,
                    });
                }
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

    /// The next method frame, which must be `class.method` on `channel`.
    pub async fn expect_method(&mut self, channel: u16, class: u16, meth: u16) -> RawFrame {
        let f = self.frame().await;
        assert_eq!(
            (f.channel, f.ids()),
            (channel, Some((class, meth))),
            "unexpected frame {f:?}"
        );
        f
    }

    /// Read until `connection.close` arrives; answer close-ok; return it.
    /// Panics if the socket closes or times out first.
    pub async fn expect_connection_close(&mut self) -> Close {
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.channel == 0 && f.ids() == Some((10, 50)) => {
                    let c = Close::parse(&f.payload);
                    let _ = self.try_send(&method_frame(0, 10, 51, &[])).await;
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
        raw.send(PROTOCOL_HEADER).await;
        let start = raw.expect_method(0, 10, 10).await;
        (raw, start)
    }

    /// A full handshake up to `connection.open-ok`.
    pub async fn open_with(broker: &TestBroker, h: Handshake) -> Raw {
        let (mut raw, _start) = Raw::start(broker).await;
        let (user, pass) = credentials(&broker.url);
        raw.send(&start_ok(&h.client_properties, &user, &pass))
            .await;
        let tune = raw.expect_method(0, 10, 30).await;
        let a = &tune.payload[4..];
        let server_channel_max = u16::from_be_bytes([a[0], a[1]]);
        let server_frame_max = u32::from_be_bytes([a[2], a[3], a[4], a[5]]);
        let channel_max = if h.channel_max == 0 {
            server_channel_max
        } else {
            h.channel_max
        };
        let frame_max = h.frame_max.min(server_frame_max);
        let mut t = Vec::new();
        t.extend_from_slice(&channel_max.to_be_bytes());
        t.extend_from_slice(&frame_max.to_be_bytes());
        t.extend_from_slice(&h.heartbeat.to_be_bytes());
        raw.send(&method_frame(0, 10, 31, &t)).await;
        let mut o = Vec::new();
        put_sstr(&mut o, "/");
        put_sstr(&mut o, "");
        o.push(0);
        raw.send(&method_frame(0, 10, 40, &o)).await;
        raw.expect_method(0, 10, 41).await;
        raw
    }

    /// A full handshake with defaults (frame_max 131072, no heartbeat).
    pub async fn open(broker: &TestBroker) -> Raw {
        Raw::open_with(broker, Handshake::default()).await
    }

    /// Open `channel` and wait for open-ok.
    pub async fn open_channel(&mut self, channel: u16) {
        self.send(&channel_open(channel)).await;
        self.expect_method(channel, 20, 11).await;
    }

    /// `basic.get` (no-ack) on `channel` until a message arrives; returns its
    /// content-header payload and its body (all body frames joined).
    pub async fn get_message(&mut self, channel: u16, queue: &str) -> (Vec<u8>, Vec<u8>) {
        within("a message from basic.get", async {
            loop {
                let mut a = vec![0, 0];
                put_sstr(&mut a, queue);
                a.push(1); // no-ack
                self.send(&method_frame(channel, 60, 70, &a)).await;
                let f = self.frame().await;
                match f.ids() {
                    Some((60, 72)) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Some((60, 71)) => {
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
        let mut a = vec![0, 0];
        put_sstr(&mut a, queue);
        a.push(0);
        a.extend_from_slice(&0u32.to_be_bytes());
        self.send(&method_frame(channel, 50, 10, &a)).await;
        self.expect_method(channel, 50, 11).await;
    }

    /// `queue.delete` on `channel`, waiting for delete-ok.
    pub async fn delete_queue(&mut self, channel: u16, queue: &str) {
        let mut a = vec![0, 0];
        put_sstr(&mut a, queue);
        a.push(0);
        self.send(&method_frame(channel, 50, 40, &a)).await;
        self.expect_method(channel, 50, 41).await;
    }

    /// The broker's answer to a connection-level error: a connection.close
    /// with `code`. Against a non-Warren broker (`lenient`), a dropped socket
    /// is accepted too: RabbitMQ 3.10 drops some peers without a close.
    pub async fn expect_close_or_drop(&mut self, code: u16, lenient: bool) -> Option<Close> {
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.channel == 0 && f.ids() == Some((10, 50)) => {
                    let c = Close::parse(&f.payload);
                    let _ = self.try_send(&method_frame(0, 10, 51, &[])).await;
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
        let mut a = Vec::new();
        a.extend_from_slice(&200u16.to_be_bytes());
        put_sstr(&mut a, "bye");
        a.extend_from_slice(&[0, 0, 0, 0]);
        self.send(&method_frame(0, 10, 50, &a)).await;
        loop {
            match self.next(WAIT).await {
                Next::Frame(f) if f.ids() == Some((10, 51)) => return,
                Next::Frame(_) => continue,
                other => panic!("expected connection.close-ok, got {other:?}"),
            }
        }
    }
}

/// `connection.start-ok` with PLAIN credentials and the given client-properties
/// table bytes (length prefix included).
pub fn start_ok(client_properties: &[u8], user: &str, pass: &str) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(client_properties);
    put_sstr(&mut a, "PLAIN");
    let resp = format!("\0{user}\0{pass}");
    put_lstr(&mut a, resp.as_bytes());
    put_sstr(&mut a, "en_US");
    method_frame(0, 10, 11, &a)
}

/// Check that an ordinary lapin client can still connect, declare, publish
/// and get: the broker is alive and well.
pub async fn assert_broker_healthy(broker: &TestBroker) {
    let (conn, ch) = within("lapin connect", broker.channel()).await;
    let q = warren_tests::unique("healthy");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"still alive").await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(
        get_body(&ch, &q).await.as_deref(),
        Some(&b"still alive"[..])
    );
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
    conn.close(200, "bye".into())
        .await
        .expect("connection.close");
}
