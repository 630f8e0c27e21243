//! One task per client connection. It owns the socket and all the
//! connection's channels, and `select!`s over: bytes from the socket, events
//! for it (deliveries, confirms, cancels) from queues, the heartbeat timer and
//! the shutdown signal. Output is gathered in one buffer and written once per
//! batch. Frames are checked (size, type, end octet) before being buffered.
//!
//! Resource alarms (see `alarm.rs`) block publishers as RabbitMQ's reader
//! does: while an alarm is on, the first content frame (header or body) a
//! connection sends blocks it. A blocked connection sends `connection.blocked`
//! (if the client announced that capability), stops reading and processing
//! input, so TCP back-pressure holds the publisher, but keeps writing
//! deliveries, confirms and heartbeats, and does not check for the client's
//! heartbeats (a blocked client may stop sending anything, as lapin does).
//! When every alarm clears it sends `connection.unblocked` and resumes with
//! the frames it had already buffered. A connection that never publishes is
//! never blocked, so consumers can drain queues.

use crate::alarm::Blocked;
use crate::channel::{ChanConsumer, Channel, Confirms, Content, Deliveries, Delivery, Settle, Tx};
use crate::error::{precondition, AmqpError, AmqpResult};
use crate::exchange::Dest;
use crate::message::{Message, MessageRef};
use crate::events::{ConfirmTicket, ConnEvent};
use crate::queue::{self, Consumer, QueueCmd, QueueHandle, FLOW_WINDOW};
use crate::broker::Broker;
use crate::vhost::{QueueSpec, Routed, VHost};
use bytes::{Buf, Bytes, BytesMut};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use warren_protocol::amqp::{
    access, basic, channel as chan, confirm, connection as conn, exchange, queue as q, tx,
    AMQPClass,
};
use warren_protocol::content::{ContentError, ContentHeader};
use warren_protocol::frame::{self, FrameHeader};
use warren_protocol::method::{self, short, Method, Publish};
use warren_protocol::reply;
use warren_protocol::types::{AMQPValue, FieldTable, LongString};
use warren_storage::MessageOp;

/// The pseudo-queue of direct reply-to.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Prefix of the per-channel reply addresses.
const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// What the client said it supports.
#[derive(Default, Debug)]
struct ClientCaps {
    consumer_cancel_notify: bool,
    connection_blocked: bool,
    authentication_failure_close: bool,
}

/// Why processing stopped.
enum Fault {
    /// Close this channel with channel.close.
    Channel(u16, AmqpError),
    /// Close the connection with connection.close.
    Connection(AmqpError),
    /// Drop the socket without a word.
    Drop(String),
}

impl From<std::io::Error> for Fault {
    fn from(e: std::io::Error) -> Self {
        Fault::Drop(e.to_string())
    }
}

fn hard(code: u16, text: impl Into<String>) -> Fault {
    Fault::Connection(AmqpError::new(code, text))
}

/// Events handled per wake-up before the socket gets a turn.
const EVENT_BATCH: usize = 512;
/// Bytes read per wake-up at most before events get a turn.
const READ_BATCH: usize = 256 * 1024;
/// Bodies at least this large are written from the message itself (see
/// `Connection::put_content`); smaller ones are cheaper to copy.
const SHARED_BODY: usize = 4096;

pub struct Connection {
    id: u64,
    peer: SocketAddr,
    broker: Arc<Broker>,
    stream: TcpStream,
    inbuf: BytesMut,
    out: BytesMut,
    /// Output queued ahead of `out` when large bodies are sent: encoded
    /// bytes cut off `out`, and bodies shared with their message (never
    /// copied), in order; written with vectored writes.
    segs: std::collections::VecDeque<Bytes>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    user: String,
    caps: ClientCaps,
    vhost: Option<Arc<VHost>>,
    channels: FxHashMap<u16, Channel>,
    /// The last route this connection published on (see `VHost::route_memo`).
    route_memo: Option<Arc<crate::vhost::Route>>,
    /// Acks not yet sent to their queues: (queue, channel key, sequences).
    acks: Vec<(QueueHandle, u64, queue::Seqs)>,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    events_rx: mpsc::UnboundedReceiver<ConnEvent>,
    /// Exclusive queues this connection declared (deleted when it closes).
    exclusive: Vec<queue::QueueHandle>,
    last_read: Instant,
    last_write: Instant,
    /// The broker's resource alarms.
    alarm: watch::Receiver<Blocked>,
    /// Input suspended: the connection published while an alarm was on.
    blocked: bool,
    /// `connection.blocked` went out and `connection.unblocked` is owed.
    blocked_sent: bool,
}

impl Connection {
    pub fn new(id: u64, stream: TcpStream, peer: SocketAddr, broker: Arc<Broker>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let _ = stream.set_nodelay(true);
        let alarm = broker.alarms.subscribe();
        Connection {
            id,
            peer,
            broker,
            stream,
            inbuf: BytesMut::with_capacity(16 * 1024),
            out: BytesMut::with_capacity(16 * 1024),
            segs: std::collections::VecDeque::new(),
            frame_max: crate::config::PRE_TUNE_FRAME_MAX,
            channel_max: 0,
            heartbeat: 0,
            user: String::new(),
            caps: ClientCaps::default(),
            vhost: None,
            channels: FxHashMap::default(),
            route_memo: None,
            acks: Vec::new(),
            events_tx,
            events_rx,
            exclusive: Vec::new(),
            last_read: Instant::now(),
            last_write: Instant::now(),
            alarm,
            blocked: false,
            blocked_sent: false,
        }
    }

    /// Serve the connection to its end.
    pub async fn run(mut self) {
        let timeout = self.broker.config.handshake_timeout;
        let ok = match tokio::time::timeout(timeout, self.handshake()).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(f)) => {
                self.fail(f).await;
                false
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "handshake timed out");
                false
            }
        };
        if ok {
            let r = self.serve().await;
            if let Err(f) = r {
                self.fail(f).await;
            }
        }
        self.release_all().await;
        let _ = self.stream.shutdown().await;
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    // ------------------------------------------------------------ plumbing

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.segs.is_empty() {
            self.write_segments().await?;
        } else if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
            self.last_write = Instant::now();
        }
        Ok(())
    }

    /// Write `segs`, then `out`, with vectored writes.
    async fn write_segments(&mut self) -> std::io::Result<()> {
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
            let mut n = self.stream.write_vectored(&slices).await?;
            drop(slices);
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
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

    /// A message's content header and body frames. Bodies of at least
    /// `SHARED_BODY` bytes are not copied: their frames' payloads are
    /// slices of the message's own body, written in place.
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

    fn send_method(&mut self, channel: u16, m: AMQPClass) {
        method::put_method(&mut self.out, channel, &m);
    }

    /// Take one complete frame from the input buffer, if there is one.
    fn next_frame(&mut self) -> Result<Option<(FrameHeader, Bytes)>, Fault> {
        match frame::check(&self.inbuf, self.frame_max) {
            Ok(None) => Ok(None),
            Ok(Some((h, total))) => {
                let f = self.inbuf.split_to(total).freeze();
                Ok(Some((h, f.slice(frame::HEADER_LEN..total - 1))))
            }
            Err(e) => Err(hard(reply::FRAME_ERROR, e.to_string())),
        }
    }

    /// Read until a whole frame is in (handshake only).
    async fn read_frame(&mut self) -> Result<(FrameHeader, Bytes), Fault> {
        loop {
            if let Some(f) = self.next_frame()? {
                if f.0.kind == frame::HEARTBEAT {
                    continue;
                }
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.inbuf).await? == 0 {
                return Err(Fault::Drop("peer closed during handshake".into()));
            }
        }
    }

    /// Read the next method of the handshake on channel 0.
    async fn read_method(&mut self) -> Result<AMQPClass, Fault> {
        let (h, payload) = self.read_frame().await?;
        if h.kind != frame::METHOD || h.channel != 0 {
            return Err(hard(
                reply::UNEXPECTED_FRAME,
                "expected a connection method on channel 0",
            ));
        }
        match method::decode(&payload) {
            Ok(Method::Other(m)) => Ok(m),
            Ok(_) => Err(hard(reply::COMMAND_INVALID, "expected a connection method")),
            Err(e) => Err(Fault::Connection(
                AmqpError::new(e.reply_code(), e.to_string()).at(e.ids().0, e.ids().1),
            )),
        }
    }

    /// Report a fault to the client as its kind requires, then wait briefly
    /// for the close handshake.
    async fn fail(&mut self, f: Fault) {
        match f {
            Fault::Drop(why) => tracing::debug!(peer = %self.peer, %why, "dropping connection"),
            Fault::Channel(ch, e) => {
                // Only reached through paths that already handle channel faults.
                tracing::warn!(peer = %self.peer, channel = ch, error = %e, "channel fault at connection level");
            }
            Fault::Connection(e) => {
                tracing::info!(peer = %self.peer, user = %self.user, error = %e, "closing connection");
                self.send_method(
                    0,
                    AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
                        reply_code: e.code,
                        reply_text: short(&e.reply_text()),
                        class_id: e.class_id,
                        method_id: e.method_id,
                    })),
                );
                if self.flush().await.is_err() {
                    return;
                }
                self.release_all().await;
                self.await_close_ok(Duration::from_secs(3)).await;
            }
        }
    }

    /// After sending connection.close: discard frames until close-ok.
    async fn await_close_ok(&mut self, limit: Duration) {
        let wait = async {
            loop {
                match self.next_frame() {
                    Ok(Some((h, p))) => {
                        if h.kind == frame::METHOD && method::ids(&p) == Some((10, 51)) {
                            return;
                        }
                        if h.kind == frame::METHOD && method::ids(&p) == Some((10, 50)) {
                            self.send_method(
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

    // ----------------------------------------------------------- handshake

    async fn handshake(&mut self) -> Result<bool, Fault> {
        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header).await?;
        if &header != frame::PROTOCOL_HEADER {
            self.stream.write_all(frame::PROTOCOL_HEADER).await?;
            return Ok(false);
        }
        self.send_method(
            0,
            AMQPClass::Connection(conn::AMQPMethod::Start(conn::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(),
                mechanisms: LongString::from("PLAIN AMQPLAIN"),
                locales: LongString::from("en_US"),
            })),
        );
        self.flush().await?;

        let start_ok = match self.read_method().await? {
            AMQPClass::Connection(conn::AMQPMethod::StartOk(s)) => s,
            _ => {
                return Err(
                    hard(reply::COMMAND_INVALID, "expected connection.start-ok").into_at(10, 11)
                )
            }
        };
        self.read_client_properties(&start_ok.client_properties);
        let mechanism = start_ok.mechanism.as_str();
        let creds = match mechanism {
            "PLAIN" => parse_plain(start_ok.response.as_bytes()),
            "AMQPLAIN" => parse_amqplain(start_ok.response.as_bytes()),
            other => {
                return Err(hard(
                    reply::COMMAND_INVALID,
                    format!("unknown authentication mechanism '{other}'"),
                )
                .into_at(10, 11))
            }
        };
        let refused = |why: &str| {
            tracing::warn!(peer = %self.peer, mechanism, why, "login refused");
        };
        let user = match creds {
            None => {
                refused("malformed response");
                None
            }
            Some((u, p)) => {
                let known = self
                    .broker
                    .config
                    .users
                    .iter()
                    .any(|(n, pw)| n == &u && pw == &p);
                if !known {
                    refused(&format!("invalid credentials for user '{u}'"));
                    None
                } else if u == "guest" && !self.peer.ip().is_loopback() {
                    refused("user 'guest' can only connect via localhost");
                    None
                } else {
                    Some(u)
                }
            }
        };
        let Some(user) = user else {
            if self.caps.authentication_failure_close {
                return Err(Fault::Connection(
                    AmqpError::new(
                        reply::ACCESS_REFUSED,
                        format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
                    )
                    .at(10, 11),
                ));
            }
            return Err(Fault::Drop("login refused".into()));
        };
        self.user = user;

        let cfg = &self.broker.config;
        let (channel_max, frame_max, heartbeat) = (cfg.channel_max, cfg.frame_max, cfg.heartbeat);
        self.send_method(
            0,
            AMQPClass::Connection(conn::AMQPMethod::Tune(conn::Tune {
                channel_max,
                frame_max,
                heartbeat,
            })),
        );
        self.flush().await?;
        let tune_ok = match self.read_method().await? {
            AMQPClass::Connection(conn::AMQPMethod::TuneOk(t)) => t,
            _ => {
                return Err(
                    hard(reply::COMMAND_INVALID, "expected connection.tune-ok").into_at(10, 31)
                )
            }
        };
        if tune_ok.frame_max < crate::config::FRAME_MIN || tune_ok.frame_max > frame_max {
            return Err(hard(
                reply::NOT_ALLOWED,
                format!(
                    "negotiated frame_max = {} is outside the allowed range {}..{}",
                    tune_ok.frame_max,
                    crate::config::FRAME_MIN,
                    frame_max
                ),
            )
            .into_at(10, 31));
        }
        // channel_max 0 means "no limit of the client's own": ours applies (as RabbitMQ).
        let tune_ok = conn::TuneOk {
            channel_max: if tune_ok.channel_max == 0 {
                channel_max
            } else {
                tune_ok.channel_max
            },
            ..tune_ok
        };
        if tune_ok.channel_max > channel_max {
            return Err(hard(
                reply::NOT_ALLOWED,
                format!(
                    "negotiated channel_max = {} is outside the allowed range 1..{}",
                    tune_ok.channel_max, channel_max
                ),
            )
            .into_at(10, 31));
        }
        self.frame_max = tune_ok.frame_max;
        self.channel_max = tune_ok.channel_max;
        self.heartbeat = tune_ok.heartbeat;

        let open = match self.read_method().await? {
            AMQPClass::Connection(conn::AMQPMethod::Open(o)) => o,
            _ => {
                return Err(hard(reply::COMMAND_INVALID, "expected connection.open").into_at(10, 40))
            }
        };
        let vh = open.virtual_host.as_str();
        let Some(v) = self.broker.vhost(vh) else {
            return Err(hard(reply::NOT_ALLOWED, format!("vhost {vh} not found")).into_at(10, 40));
        };
        self.vhost = Some(v);
        self.send_method(
            0,
            AMQPClass::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})),
        );
        self.flush().await?;
        tracing::info!(peer = %self.peer, user = %self.user, vhost = vh, "connection opened");
        Ok(true)
    }

    fn read_client_properties(&mut self, props: &FieldTable) {
        if let Some(AMQPValue::FieldTable(caps)) = props.inner().get("capabilities") {
            let on = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
            self.caps = ClientCaps {
                consumer_cancel_notify: on("consumer_cancel_notify"),
                connection_blocked: on("connection.blocked"),
                authentication_failure_close: on("authentication_failure_close"),
            };
        }
        let name = match props.inner().get("connection_name") {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        };
        let product = match props.inner().get("product") {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            _ => String::new(),
        };
        tracing::debug!(peer = %self.peer, connection_name = ?name, %product, caps = ?self.caps, "client properties");
        if let Some(n) = name {
            tracing::Span::current().record("name", n.as_str());
        }
    }

    // ----------------------------------------------------------- main loop

    async fn serve(&mut self) -> Result<(), Fault> {
        let mut shutdown = self.broker.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return Err(hard(
                reply::CONNECTION_FORCED,
                "broker forced connection closure with reason 'shutdown'",
            ));
        }
        let hb = Duration::from_secs(self.heartbeat as u64);
        let tick = if self.heartbeat > 0 {
            hb / 2
        } else {
            Duration::from_secs(3600)
        };
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_read = Instant::now();
        let mut alarm = self.alarm.clone();
        alarm.mark_unchanged();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return Err(hard(reply::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"));
                }
                r = alarm.changed(), if self.blocked => {
                    let now = *alarm.borrow_and_update();
                    // (A closed sender cannot happen while we hold the broker;
                    // treat it as "no alarm" rather than spin.)
                    if (r.is_err() || !now.any()) && self.unblock() && self.process_input().await? {
                        self.flush().await?;
                        return Ok(());
                    }
                    self.flush_confirms();
                }
                ev = self.events_rx.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev);
                        for _ in 1..EVENT_BATCH {
                            match self.events_rx.try_recv() {
                                Ok(ev) => self.on_event(ev),
                                Err(_) => break,
                            }
                        }
                        self.flush_confirms();
                    }
                }
                n = self.stream.read_buf(&mut self.inbuf), if !self.blocked => {
                    if n? == 0 {
                        return Err(Fault::Drop("peer closed the socket".into()));
                    }
                    self.last_read = Instant::now();
                    if self.process_input().await? {
                        self.flush().await?;
                        return Ok(());
                    }
                    self.flush_confirms();
                }
                _ = timer.tick() => {
                    if self.heartbeat > 0 {
                        // Suspended while blocked: we are not reading.
                        if !self.blocked && self.last_read.elapsed() > hb * 2 {
                            return Err(Fault::Drop(format!("missed heartbeats from client, timeout: {}s", self.heartbeat)));
                        }
                        if self.last_write.elapsed() >= tick && self.out.is_empty() && self.segs.is_empty() {
                            frame::put_heartbeat(&mut self.out);
                        }
                    }
                }
            }
            self.flush().await?;
        }
    }

    /// Handle every complete frame in the input buffer. Returns true when
    /// the connection closed cleanly.
    async fn process_input(&mut self) -> Result<bool, Fault> {
        let mut handled = 0usize;
        while !self.blocked {
            let Some((h, payload)) = self.next_frame()? else {
                break;
            };
            handled += payload.len() + frame::OVERHEAD;
            let content = h.kind == frame::HEADER || h.kind == frame::BODY;
            // Per-message frames are handled without awaiting; only the rest
            // (and a publish that must wait for room) takes the async path.
            let r = match self.on_frame(h, payload) {
                Ok(None) => Ok(false),
                Ok(Some(slow)) => self.on_slow(slow).await,
                Err(f) => Err(f),
            };
            match r {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(Fault::Channel(ch, e)) => self.close_channel(ch, e).await,
                Err(f) => return Err(f),
            }
            if content {
                // A publish while an alarm is on blocks the connection; the
                // rest of the input waits in the buffer and the socket.
                if self.broker.alarms.any() {
                    let state = *self.alarm.borrow();
                    if state.any() {
                        self.block(state);
                        break;
                    }
                }
            }
            if handled >= READ_BATCH {
                // Let queued events and the writer in; the rest waits.
                self.flush_acks();
                self.flush().await?;
                handled = 0;
                tokio::task::yield_now().await;
            }
        }
        self.flush_acks();
        // Keep the read buffer from holding a large allocation forever.
        if self.inbuf.is_empty() && self.inbuf.capacity() > 4 * self.frame_max as usize {
            self.inbuf = BytesMut::with_capacity(16 * 1024);
        }
        Ok(false)
    }

    /// Stop reading: the connection published while an alarm is on.
    fn block(&mut self, state: Blocked) {
        self.blocked = true;
        let reason = state.reason().unwrap_or("low on resources");
        tracing::debug!(peer = %self.peer, reason, "publisher blocked by a resource alarm");
        if self.caps.connection_blocked && !self.blocked_sent {
            self.blocked_sent = true;
            self.send_method(
                0,
                AMQPClass::Connection(conn::AMQPMethod::Blocked(conn::Blocked {
                    reason: short(reason),
                })),
            );
        }
    }

    /// Every alarm cleared: read again (the caller processes what is already
    /// buffered). Returns true if the connection was blocked.
    fn unblock(&mut self) -> bool {
        if !self.blocked {
            return false;
        }
        self.blocked = false;
        // Heartbeat monitoring resumes afresh, as RabbitMQ's resume_monitor.
        self.last_read = Instant::now();
        tracing::debug!(peer = %self.peer, "publisher unblocked");
        if self.blocked_sent {
            self.blocked_sent = false;
            self.send_method(
                0,
                AMQPClass::Connection(conn::AMQPMethod::Unblocked(conn::Unblocked {})),
            );
        }
        true
    }

    /// Handle a frame without awaiting, or say what is left to do.
    fn on_frame(&mut self, h: FrameHeader, payload: Bytes) -> Result<Option<Slow>, Fault> {
        let ch = h.channel;
        match h.kind {
            frame::HEARTBEAT => {
                if ch != 0 {
                    return Err(hard(
                        reply::UNEXPECTED_FRAME,
                        format!("heartbeat frame on channel {ch}"),
                    ));
                }
                Ok(None)
            }
            frame::METHOD => {
                let m = match method::decode(&payload) {
                    Ok(m) => m,
                    Err(e) => {
                        let (c, mid) = e.ids();
                        return Err(Fault::Connection(
                            AmqpError::new(e.reply_code(), e.to_string()).at(c, mid),
                        ));
                    }
                };
                let (c, mid) = method::ids(&payload).unwrap_or((0, 0));
                if ch == 0 {
                    return Ok(Some(Slow::Connection(m, c, mid)));
                }
                if c == 10 {
                    return Err(hard(
                        reply::COMMAND_INVALID,
                        format!("connection method on channel {ch}"),
                    )
                    .into_at(c, mid));
                }
                match self.on_channel_method(ch, m, mid) {
                    Ok(None) => Ok(None),
                    Ok(Some(class)) => Ok(Some(Slow::Channel(ch, class, c, mid))),
                    Err(e) => Err(channel_fault(ch, e.at(c, mid))),
                }
            }
            frame::HEADER | frame::BODY => Ok(self
                .on_content(ch, h.kind, payload)?
                .map(|p| Slow::Publish(ch, p))),
            _ => Err(hard(
                reply::FRAME_ERROR,
                format!("unknown frame type {}", h.kind),
            )),
        }
    }

    /// The async rest of [`Connection::on_frame`]. Returns true when the
    /// client closed the connection.
    async fn on_slow(&mut self, slow: Slow) -> Result<bool, Fault> {
        self.flush_acks();
        match slow {
            Slow::Connection(m, c, mid) => self.on_connection_method(m, c, mid).await,
            Slow::Channel(ch, class, c, mid) => {
                let r = self.on_other(ch, class).await;
                r.map_err(|e| channel_fault(ch, e.at(c, mid)))?;
                Ok(false)
            }
            Slow::Publish(ch, p) => {
                self.enqueue_waiting(p)
                    .await
                    .map_err(|e| channel_fault(ch, e.at(60, 40)))?;
                Ok(false)
            }
        }
    }

    async fn on_connection_method(&mut self, m: Method, c: u16, mid: u16) -> Result<bool, Fault> {
        match m {
            Method::Other(AMQPClass::Connection(cm)) => match cm {
                conn::AMQPMethod::Close(_) => {
                    self.release_all().await;
                    self.send_method(
                        0,
                        AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                    );
                    Ok(true)
                }
                conn::AMQPMethod::CloseOk(_) => Ok(true),
                conn::AMQPMethod::UpdateSecret(_) => {
                    self.send_method(
                        0,
                        AMQPClass::Connection(conn::AMQPMethod::UpdateSecretOk(
                            conn::UpdateSecretOk {},
                        )),
                    );
                    Ok(false)
                }
                _ => Err(hard(
                    reply::CHANNEL_ERROR,
                    "unexpected method in connection state running",
                )
                .into_at(c, mid)),
            },
            _ => Err(hard(
                reply::CHANNEL_ERROR,
                "expected a connection method on channel 0",
            )
            .into_at(c, mid)),
        }
    }

    // ------------------------------------------------------------ channels

    fn vhost(&self) -> Arc<VHost> {
        self.vhost.clone().expect("vhost set by handshake")
    }

    /// Send channel.close and release the channel's resources; frames for it
    /// are dropped until the client's close-ok.
    async fn close_channel(&mut self, ch: u16, e: AmqpError) {
        tracing::info!(peer = %self.peer, channel = ch, error = %e, "closing channel");
        if let Some(c) = self.channels.get_mut(&ch) {
            c.closing = true;
        }
        self.release_channel(ch, false);
        self.send_method(
            ch,
            AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
                reply_code: e.code,
                reply_text: short(&e.reply_text()),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }

    /// Give a channel's consumers and unacked messages back to their queues.
    fn release_channel(&mut self, ch: u16, remove: bool) {
        self.flush_acks();
        let Some(c) = (if remove {
            self.channels.remove(&ch)
        } else {
            self.channels.get_mut(&ch).map(|c| {
                // keep the channel entry (closing), but drop its state
                let mut fresh = Channel::new(c.id, c.key);
                fresh.closing = true;
                std::mem::replace(c, fresh)
            })
        }) else {
            return;
        };
        if let Some((_, name)) = &c.reply {
            self.broker.replies().remove(name);
        }
        let mut queues = c.touched;
        for cons in c.consumers.values() {
            if !queues.iter().any(|q| q == &cons.queue) {
                queues.push(cons.queue.clone());
            }
        }
        for q in queues {
            q.control(QueueCmd::ChannelClosed { chan_key: c.key });
        }
    }

    async fn release_all(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for ch in ids {
            self.release_channel(ch, true);
        }
        if let Some(v) = self.vhost.clone() {
            for q in std::mem::take(&mut self.exclusive) {
                let _ = v.delete_queue(&q, false, false).await;
            }
        }
    }

    fn chan(&mut self, ch: u16) -> AmqpResult<&mut Channel> {
        self.channels.get_mut(&ch).ok_or_else(|| {
            AmqpError::new(
                reply::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )
        })
    }

    /// Channel methods: the per-message ones are handled here; any other
    /// method (`Some`) goes on to [`Connection::on_other`].
    fn on_channel_method(&mut self, ch: u16, m: Method, mid: u16) -> AmqpResult<Option<AMQPClass>> {
        // Channel lifecycle first: open, and the closing handshake.
        match (&m, self.channels.get(&ch)) {
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Open(_))), None) => {
                // RabbitMQ counts open channels; the channel number itself may exceed channel_max.
                if self.channels.len() >= self.channel_max as usize {
                    return Err(AmqpError::new(
                        reply::NOT_ALLOWED,
                        format!("number of channels opened ({}) has reached the negotiated channel_max ({})", self.channels.len(), self.channel_max),
                    ));
                }
                let key = self.broker.next_chan_key();
                self.channels.insert(ch, Channel::new(ch, key));
                self.send_method(
                    ch,
                    AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
                );
                return Ok(None);
            }
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Open(_))), Some(_)) => {
                return Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    "second 'channel.open' seen",
                ));
            }
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::CloseOk(_))), _) => {
                if self.channels.get(&ch).is_some_and(|c| c.closing) {
                    self.channels.remove(&ch);
                }
                return Ok(None);
            }
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Close(_))), Some(_)) => {
                self.release_channel(ch, true);
                self.send_method(
                    ch,
                    AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                );
                return Ok(None);
            }
            (_, None) => {
                return Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    format!("expected 'channel.open' on channel {ch}"),
                ));
            }
            (_, Some(c)) if c.closing => return Ok(None),
            (_, Some(c)) if c.content.is_some() => {
                return Err(AmqpError::new(
                    reply::UNEXPECTED_FRAME,
                    format!(
                        "expected content header for class 60, got method {c}/{mid} instead",
                        c = 60
                    ),
                ));
            }
            _ => {}
        }
        match m {
            Method::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.chan(ch)?.content = Some(Content {
                    publish: p,
                    header: None,
                    body: None,
                    gathered: BytesMut::new(),
                    received: 0,
                });
                Ok(None)
            }
            Method::Ack {
                delivery_tag,
                multiple,
            } => {
                let ds = self.take_deliveries(ch, delivery_tag, multiple)?;
                self.settle(ch, Settle::Ack(ds)).map(|()| None)
            }
            Method::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => {
                let ds = self.take_deliveries(ch, delivery_tag, multiple)?;
                self.settle(ch, Settle::Reject(ds, requeue)).map(|()| None)
            }
            Method::Reject {
                delivery_tag,
                requeue,
            } => {
                let ds = self.take_deliveries(ch, delivery_tag, false)?;
                self.settle(ch, Settle::Reject(ds, requeue)).map(|()| None)
            }
            Method::Qos {
                prefetch_size,
                prefetch_count,
                global,
            } => {
                if prefetch_size != 0 {
                    return Err(AmqpError::new(
                        reply::NOT_IMPLEMENTED,
                        format!("prefetch_size!=0 ({prefetch_size})"),
                    ));
                }
                let c = self.chan(ch)?;
                if global {
                    c.credit
                        .limit
                        .store(prefetch_count as u32, Ordering::Release);
                    for cons in c.consumers.values() {
                        cons.queue.control(QueueCmd::Wake);
                    }
                } else {
                    c.prefetch = prefetch_count;
                }
                self.send_method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(None)
            }
            Method::Other(class) => Ok(Some(class)),
        }
    }

    async fn on_other(&mut self, ch: u16, class: AMQPClass) -> AmqpResult<()> {
        let v = self.vhost();
        match class {
            AMQPClass::Channel(chan::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "active=false"));
                }
                self.send_method(
                    ch,
                    AMQPClass::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk { active: true })),
                );
            }
            AMQPClass::Channel(chan::AMQPMethod::FlowOk(_)) => {}
            AMQPClass::Channel(_) => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "unexpected channel method",
                ))
            }
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.send_method(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
            }
            AMQPClass::Exchange(m) => self.on_exchange(ch, m, &v)?,
            AMQPClass::Queue(m) => self.on_queue(ch, m, &v).await?,
            AMQPClass::Basic(m) => self.on_basic(ch, m, &v).await?,
            AMQPClass::Tx(m) => self.on_tx(ch, m).await?,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.chan(ch)?;
                if c.tx.is_some() {
                    return Err(precondition("cannot switch from tx to confirm mode"));
                }
                if c.confirms.is_none() {
                    c.confirms = Some(Confirms::new());
                }
                if !s.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "method not expected from a client",
                ))
            }
        }
        Ok(())
    }

    fn on_exchange(&mut self, ch: u16, m: exchange::AMQPMethod, v: &VHost) -> AmqpResult<()> {
        match m {
            exchange::AMQPMethod::Declare(d) => {
                v.declare_exchange(
                    d.exchange.as_str(),
                    d.kind.as_str(),
                    d.passive,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    &d.arguments,
                )?;
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            exchange::AMQPMethod::Delete(d) => {
                v.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                let (src, dst, key) = (
                    b.source.as_str(),
                    b.destination.as_str(),
                    b.routing_key.as_str(),
                );
                self.bind_exchange(ch, v, true, src, dst, key, &b.arguments, b.nowait)?;
            }
            exchange::AMQPMethod::Unbind(b) => {
                let (src, dst, key) = (
                    b.source.as_str(),
                    b.destination.as_str(),
                    b.routing_key.as_str(),
                );
                self.bind_exchange(ch, v, false, src, dst, key, &b.arguments, b.nowait)?;
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "method not expected from a client",
                ))
            }
        }
        Ok(())
    }

    /// `exchange.bind` / `exchange.unbind`.
    #[allow(clippy::too_many_arguments)]
    fn bind_exchange(
        &mut self,
        ch: u16,
        v: &VHost,
        bind: bool,
        source: &str,
        destination: &str,
        key: &str,
        args: &FieldTable,
        nowait: bool,
    ) -> AmqpResult<()> {
        v.set_binding(
            bind,
            source,
            Dest::Exchange(destination.into()),
            key,
            args,
            self.id,
        )?;
        if !nowait {
            let ok = if bind {
                exchange::AMQPMethod::BindOk(exchange::BindOk {})
            } else {
                exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})
            };
            self.send_method(ch, AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    /// An empty queue name means the channel's last declared queue.
    fn queue_name(&mut self, ch: u16, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.chan(ch)?
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::new(reply::NOT_FOUND, "no previously declared queue"))
    }

    async fn on_queue(&mut self, ch: u16, m: q::AMQPMethod, v: &VHost) -> AmqpResult<()> {
        match m {
            q::AMQPMethod::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if name.is_empty() && d.passive {
                    name = self.queue_name(ch, "")?;
                }
                if name.starts_with("amq.") && !d.passive && v.queue(&name, self.id).is_err() {
                    return Err(crate::error::access_refused(format!(
                        "queue name '{name}' contains reserved prefix 'amq.*'"
                    )));
                }
                if name.is_empty() {
                    name = generated_name("amq.gen-");
                }
                let handle = v.declare_queue(
                    &QueueSpec {
                        name: &name,
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: &d.arguments,
                    },
                    self.id,
                )?;
                if handle.info.exclusive_owner == Some(self.id)
                    && !self.exclusive.iter().any(|q| q == &handle)
                {
                    self.exclusive.push(handle.clone());
                }
                self.chan(ch)?.last_queue = Some(name.clone());
                if !d.nowait {
                    let (messages, consumers) = handle
                        .ask(|reply| QueueCmd::Stats { reply })
                        .await
                        .unwrap_or((0, 0));
                    self.send_method(
                        ch,
                        AMQPClass::Queue(q::AMQPMethod::DeclareOk(q::DeclareOk {
                            queue: short(&name),
                            message_count: messages,
                            consumer_count: consumers,
                        })),
                    );
                }
            }
            q::AMQPMethod::Bind(b) => {
                let name = self.queue_name(ch, b.queue.as_str())?;
                let key = if b.routing_key.as_str().is_empty() && b.queue.as_str().is_empty() {
                    name.clone()
                } else {
                    b.routing_key.as_str().to_owned()
                };
                v.set_binding(
                    true,
                    b.exchange.as_str(),
                    Dest::Queue(name.as_str().into()),
                    &key,
                    &b.arguments,
                    self.id,
                )?;
                if !b.nowait {
                    self.send_method(ch, AMQPClass::Queue(q::AMQPMethod::BindOk(q::BindOk {})));
                }
            }
            q::AMQPMethod::Unbind(b) => {
                let name = self.queue_name(ch, b.queue.as_str())?;
                v.set_binding(
                    false,
                    b.exchange.as_str(),
                    Dest::Queue(name.as_str().into()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    self.id,
                )?;
                self.send_method(
                    ch,
                    AMQPClass::Queue(q::AMQPMethod::UnbindOk(q::UnbindOk {})),
                );
            }
            q::AMQPMethod::Purge(p) => {
                let name = self.queue_name(ch, p.queue.as_str())?;
                let handle = v.queue(&name, self.id)?;
                let n = handle
                    .ask(|reply| QueueCmd::Purge { reply })
                    .await
                    .unwrap_or(0);
                if !p.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(q::AMQPMethod::PurgeOk(q::PurgeOk { message_count: n })),
                    );
                }
            }
            q::AMQPMethod::Delete(d) => {
                let name = self.queue_name(ch, d.queue.as_str())?;
                let n = match v.queue(&name, self.id) {
                    Ok(handle) => {
                        let n = v.delete_queue(&handle, d.if_unused, d.if_empty).await?;
                        self.exclusive.retain(|q| q != &handle);
                        n
                    }
                    Err(e) if e.code == reply::NOT_FOUND => 0,
                    Err(e) => return Err(e),
                };
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(q::AMQPMethod::DeleteOk(q::DeleteOk { message_count: n })),
                    );
                }
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "method not expected from a client",
                ))
            }
        }
        Ok(())
    }

    async fn on_basic(&mut self, ch: u16, m: basic::AMQPMethod, v: &VHost) -> AmqpResult<()> {
        match m {
            basic::AMQPMethod::Consume(cm) => {
                let name = self.queue_name(ch, cm.queue.as_str())?;
                let tag: Arc<str> = if cm.consumer_tag.as_str().is_empty() {
                    generated_name("amq.ctag-").into()
                } else {
                    cm.consumer_tag.as_str().into()
                };
                let c = self.chan(ch)?;
                if c.consumers.contains_key(&tag) || c.reply.as_ref().is_some_and(|r| r.0 == tag) {
                    return Err(AmqpError::new(
                        reply::NOT_ALLOWED,
                        format!("attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                if name == REPLY_TO {
                    return self.consume_replies(ch, tag, cm.no_ack, cm.nowait);
                }
                let handle = v.queue(&name, self.id)?;
                let c = self.chan(ch)?;
                let in_flight = Arc::new(AtomicU32::new(0));
                let priority = match cm.arguments.inner().get("x-priority") {
                    None => 0,
                    Some(v) => match crate::exchange::as_int(v).and_then(|p| i32::try_from(p).ok())
                    {
                        Some(p) => p,
                        None => {
                            return Err(precondition(format!(
                                "invalid arg 'x-priority' for consumer: {v:?}"
                            )))
                        }
                    },
                };
                let consumer = Consumer {
                    tag: tag.clone(),
                    chan_key: c.key,
                    channel: ch,
                    no_ack: cm.no_ack,
                    exclusive: cm.exclusive,
                    prefetch: c.prefetch as u32,
                    channel_credit: c.credit.clone(),
                    in_flight: in_flight.clone(),
                    conn: self.events_tx.clone(),
                    priority,
                    unacked: 0,
                };
                match handle
                    .ask(|reply| QueueCmd::Consume { consumer, reply })
                    .await
                {
                    Some(r) => r?,
                    None => return Err(crate::error::not_found("queue", &name, &v.name)),
                }
                let c = self.chan(ch)?;
                c.touch(&handle);
                c.consumers.insert(
                    tag.clone(),
                    ChanConsumer {
                        queue: handle,
                        no_ack: cm.no_ack,
                        cancelling: false,
                        cancel_nowait: false,
                        in_flight,
                    },
                );
                if !cm.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: short(&tag),
                        })),
                    );
                }
            }
            basic::AMQPMethod::Cancel(cm) => {
                let tag: Arc<str> = cm.consumer_tag.as_str().into();
                let c = self.chan(ch)?;
                let key = c.key;
                if c.reply.as_ref().is_some_and(|r| r.0 == tag) {
                    if let Some((_, name)) = c.reply.take() {
                        self.broker.replies().remove(&name);
                    }
                    if !cm.nowait {
                        self.send_method(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: short(&tag),
                            })),
                        );
                    }
                    return Ok(());
                }
                match c.consumers.get_mut(&tag) {
                    Some(cons) if !cons.cancelling => {
                        cons.cancelling = true;
                        cons.cancel_nowait = cm.nowait;
                        if !cons.queue.control(QueueCmd::Cancel {
                            chan_key: key,
                            tag: tag.clone(),
                        }) {
                            c.consumers.remove(&tag);
                            if !cm.nowait {
                                self.send_method(
                                    ch,
                                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(
                                        basic::CancelOk {
                                            consumer_tag: short(&tag),
                                        },
                                    )),
                                );
                            }
                        }
                    }
                    Some(_) => {}
                    None => {
                        if !cm.nowait {
                            self.send_method(
                                ch,
                                AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                    consumer_tag: short(&tag),
                                })),
                            );
                        }
                    }
                }
            }
            basic::AMQPMethod::Get(g) => {
                let name = self.queue_name(ch, g.queue.as_str())?;
                let handle = v.queue(&name, self.id)?;
                let key = self.chan(ch)?.key;
                let got = handle
                    .ask(|reply| QueueCmd::Get {
                        chan_key: key,
                        no_ack: g.no_ack,
                        reply,
                    })
                    .await
                    .flatten();
                match got {
                    None => self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                    ),
                    Some(got) => {
                        let c = self.chan(ch)?;
                        let tag = c.next_tag;
                        c.next_tag += 1;
                        if !g.no_ack {
                            c.touch(&handle);
                            c.unacked.insert(
                                tag,
                                Delivery {
                                    queue: handle,
                                    seq: got.seq,
                                    counted: false,
                                },
                            );
                        }
                        let msg = &got.msg;
                        method::put_get_ok(
                            &mut self.out,
                            ch,
                            tag,
                            got.redelivered,
                            msg.exchange.as_bytes(),
                            msg.routing_key.as_bytes(),
                            got.remaining,
                        );
                        let msg = msg.clone();
                        self.put_content(ch, &msg);
                    }
                }
            }
            basic::AMQPMethod::Recover(basic::Recover { requeue }) => {
                self.recover(ch, requeue)?;
                self.send_method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
            }
            basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                self.recover(ch, requeue)?
            }
            basic::AMQPMethod::CancelOk(_) => {}
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "method not expected from a client",
                ))
            }
        }
        Ok(())
    }

    /// `basic.consume` on `amq.rabbitmq.reply-to`: register this channel as
    /// the destination of replies to its requests.
    fn consume_replies(
        &mut self,
        ch: u16,
        tag: Arc<str>,
        no_ack: bool,
        nowait: bool,
    ) -> AmqpResult<()> {
        if !no_ack {
            return Err(precondition("reply consumer cannot acknowledge"));
        }
        let events = self.events_tx.clone();
        let c = self.chan(ch)?;
        if c.reply.is_some() {
            return Err(precondition("reply consumer already set"));
        }
        let name = generated_name(REPLY_TO_PREFIX);
        let target = crate::broker::ReplyTarget {
            events,
            chan_key: c.key,
            channel: ch,
            tag: tag.clone(),
        };
        c.reply = Some((tag.clone(), name.clone()));
        self.broker.replies().insert(name, target);
        if !nowait {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    fn recover(&mut self, ch: u16, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "requeue=false"));
        }
        let c = self.chan(ch)?;
        let unacked = c.unacked.take_all();
        let counted = unacked.iter().filter(|(_, d)| d.counted).count() as u32;
        c.credit.release(counted);
        let mut queues: Vec<queue::QueueHandle> = Vec::new();
        for (_, d) in unacked {
            if !queues.iter().any(|q| q == &d.queue) {
                queues.push(d.queue);
            }
        }
        for q in queues {
            q.control(QueueCmd::Recover { chan_key: c.key });
        }
        for cons in c.consumers.values() {
            cons.queue.control(QueueCmd::Wake);
        }
        Ok(())
    }

    async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> AmqpResult<()> {
        match m {
            tx::AMQPMethod::Select(_) => {
                let c = self.chan(ch)?;
                if c.confirms.is_some() {
                    return Err(precondition("cannot switch from confirm to tx mode"));
                }
                if c.tx.is_none() {
                    c.tx = Some(Tx::default());
                }
                self.send_method(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            tx::AMQPMethod::Commit(_) => {
                let c = self.chan(ch)?;
                let Some(t) = c.tx.as_mut() else {
                    return Err(precondition("channel is not transactional"));
                };
                let work = std::mem::take(t);
                let persistent = work.publishes.iter().any(|(_, m)| m.stored.is_some());
                for (mandatory, msg) in work.publishes {
                    self.enqueue(ch, mandatory, msg).await?;
                }
                for s in work.settles {
                    self.apply_settle(ch, s)?;
                }
                // commit-ok promises the persistent publishes are on disk.
                if persistent && !self.broker.persister.barrier().await {
                    return Err(AmqpError::new(
                        reply::INTERNAL_ERROR,
                        "message store write failed; transaction not durable",
                    ));
                }
                self.send_method(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            }
            tx::AMQPMethod::Rollback(_) => {
                let c = self.chan(ch)?;
                let Some(t) = c.tx.as_mut() else {
                    return Err(precondition("channel is not transactional"));
                };
                let work = std::mem::take(t);
                // Settlements are undone: those deliveries are unacked again.
                for s in work.settles {
                    let (Settle::Ack(ds) | Settle::Reject(ds, _)) = s;
                    for (tag, d) in ds {
                        c.unacked.insert(tag, d);
                    }
                }
                self.send_method(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "method not expected from a client",
                ))
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------- settlement

    fn take_deliveries(&mut self, ch: u16, tag: u64, multiple: bool) -> AmqpResult<Deliveries> {
        let c = self.chan(ch)?;
        if multiple && tag == 0 {
            return Ok(c.unacked.take_all());
        }
        if !multiple {
            return match c.unacked.remove(tag) {
                Some(d) => Ok(smallvec::smallvec![(tag, d)]),
                None => Err(precondition(format!("unknown delivery tag {tag}"))),
            };
        }
        if !c.unacked.contains(tag) {
            return Err(precondition(format!("unknown delivery tag {tag}")));
        }
        Ok(c.unacked.take_through(tag))
    }

    fn settle(&mut self, ch: u16, s: Settle) -> AmqpResult<()> {
        let c = self.chan(ch)?;
        if let Some(t) = c.tx.as_mut() {
            t.settles.push(s);
            return Ok(());
        }
        self.apply_settle(ch, s)
    }

    /// Send the acks gathered so far to their queues. Called before anything
    /// else this connection tells a queue (which must come after them: a
    /// channel close would otherwise requeue what was acked) and at the end
    /// of each batch of input.
    fn flush_acks(&mut self) {
        for (q, chan_key, seqs) in self.acks.drain(..) {
            q.control(QueueCmd::Ack { chan_key, seqs });
        }
    }

    /// Tell queues about acks and rejects, grouped per queue.
    fn apply_settle(&mut self, ch: u16, s: Settle) -> AmqpResult<()> {
        let c = self.chan(ch)?;
        let (ds, reject) = match s {
            Settle::Ack(ds) => (ds, None),
            Settle::Reject(ds, requeue) => (ds, Some(requeue)),
        };
        let counted = ds.iter().filter(|(_, d)| d.counted).count() as u32;
        let key = c.key;
        match reject {
            // Acks wait in `self.acks` until the input at hand is handled:
            // one message per queue per read instead of one per ack.
            None => {
                for (_, d) in ds {
                    let at = self
                        .acks
                        .iter_mut()
                        .find(|(q, k, _)| *k == key && q == &d.queue);
                    match at {
                        Some((_, _, seqs)) => seqs.push(d.seq),
                        None => self.acks.push((d.queue, key, smallvec::smallvec![d.seq])),
                    }
                }
            }
            Some(requeue) => {
                self.flush_acks();
                let mut groups: SmallVec<[(QueueHandle, queue::Seqs); 2]> = SmallVec::new();
                for (_, d) in ds {
                    match groups.iter_mut().find(|(q, _)| q == &d.queue) {
                        Some((_, seqs)) => seqs.push(d.seq),
                        None => groups.push((d.queue, smallvec::smallvec![d.seq])),
                    }
                }
                for (q, seqs) in groups {
                    q.control(QueueCmd::Reject {
                        chan_key: key,
                        seqs,
                        requeue,
                    });
                }
            }
        }
        let c = self.chan(ch)?;
        if c.credit.release(counted) {
            for cons in c.consumers.values() {
                cons.queue.control(QueueCmd::Wake);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------- publish

    /// A content frame; a complete message is published. `Some`: the
    /// message is routed but must wait for room in a queue or the writer.
    fn on_content(&mut self, ch: u16, kind: u8, payload: Bytes) -> Result<Option<Pending>, Fault> {
        let max = self.broker.config.max_message_size;
        let Some(c) = self.channels.get_mut(&ch) else {
            return Err(hard(
                reply::CHANNEL_ERROR,
                format!("content frame on unopened channel {ch}"),
            ));
        };
        if c.closing {
            return Ok(None);
        }
        let Some(content) = c.content.as_mut() else {
            return Err(hard(
                reply::UNEXPECTED_FRAME,
                "expected method frame, got non method frame instead",
            ));
        };
        if kind == frame::HEADER {
            if content.header.is_some() {
                return Err(hard(
                    reply::UNEXPECTED_FRAME,
                    "expected content body, got content header instead",
                )
                .into_at(60, 40));
            }
            let h = ContentHeader::parse(payload).map_err(|e| match e {
                ContentError::WrongClass(c) => hard(
                    reply::UNEXPECTED_FRAME,
                    format!("expected content header for class 60, got one for class {c} instead"),
                ),
                e => hard(reply::FRAME_ERROR, e.to_string()),
            });
            let h = h.map_err(|f| f.into_at(60, 40))?;
            if h.body_size() > max {
                c.content = None;
                return Err(Fault::Channel(
                    ch,
                    precondition(format!(
                        "message size {} is larger than configured max size {max}",
                        h.body_size()
                    ))
                    .at(60, 40),
                ));
            }
            content.header = Some(h);
        } else {
            let Some(h) = content.header.as_ref() else {
                return Err(hard(
                    reply::UNEXPECTED_FRAME,
                    "expected content header for class 60, got non content header frame instead",
                )
                .into_at(60, 40));
            };
            let size = h.body_size();
            content.received += payload.len() as u64;
            if content.received > size {
                return Err(hard(
                    reply::FRAME_ERROR,
                    format!("content body larger than declared size {size}"),
                ));
            }
            if content.received == size && content.body.is_none() && content.gathered.is_empty() {
                content.body = Some(payload);
            } else {
                if content.gathered.is_empty() {
                    content.gathered.reserve(size as usize);
                }
                content.gathered.extend_from_slice(&payload);
            }
        }
        let h = content.header.as_ref().map(|h| h.body_size());
        if h != Some(content.received) {
            return Ok(None);
        }
        let Some(content) = c.content.take() else {
            return Ok(None);
        };
        let body = content.body.unwrap_or_else(|| content.gathered.freeze());
        let Some(header) = content.header else {
            return Ok(None);
        };
        self.publish(ch, content.publish, header, body)
            .map_err(|e| channel_fault(ch, e.at(60, 40)))
    }

    fn publish(
        &mut self,
        ch: u16,
        p: Publish,
        header: ContentHeader,
        body: Bytes,
    ) -> AmqpResult<Option<Pending>> {
        if let Some(uid) = header.user_id() {
            if uid != self.user {
                return Err(precondition(format!(
                    "user_id property set to '{uid}' but authenticated user was '{}'",
                    self.user
                )));
            }
        }
        let header = if header.reply_to() == Some(REPLY_TO) {
            let Some((_, name)) = self.chan(ch)?.reply.as_ref() else {
                return Err(precondition("fast reply consumer does not exist"));
            };
            header
                .with_reply_to(name)
                .ok_or_else(|| AmqpError::new(reply::INTERNAL_ERROR, "cannot rewrite reply_to"))?
        } else {
            header
        };
        let stored = header
            .is_persistent()
            .then(|| self.broker.next_message_id());
        let msg = Arc::new(Message {
            exchange: p.exchange,
            routing_key: p.routing_key,
            header,
            body,
            stored,
        });
        if self.chan(ch)?.tx.is_some() {
            // Check the exchange now (as RabbitMQ does), route at commit.
            self.vhost()
                .route(&msg.exchange, &msg.routing_key, &msg.header)?;
            if let Some(t) = self.chan(ch)?.tx.as_mut() {
                t.publishes.push((p.mandatory, msg));
            }
            return Ok(None);
        }
        self.enqueue_now(ch, p.mandatory, msg)
    }

    /// Route a message and hand it to its queues, waiting for room.
    async fn enqueue(&mut self, ch: u16, mandatory: bool, msg: MessageRef) -> AmqpResult<()> {
        match self.enqueue_now(ch, mandatory, msg)? {
            Some(p) => self.enqueue_waiting(p).await,
            None => Ok(()),
        }
    }

    /// Route a message and hand it to its queues if each has room now (and
    /// the store writer too, for a persistent one): the common case, with
    /// no await. Otherwise the routed message comes back, to be handed over
    /// by [`Connection::enqueue_waiting`].
    fn enqueue_now(
        &mut self,
        ch: u16,
        mandatory: bool,
        msg: MessageRef,
    ) -> AmqpResult<Option<Pending>> {
        if msg.exchange.is_empty() && msg.routing_key.as_str().starts_with(REPLY_TO_PREFIX) {
            let delivered = match self.broker.replies().get(msg.routing_key.as_str()) {
                Some(t) => t
                    .events
                    .send(ConnEvent::Reply {
                        chan_key: t.chan_key,
                        channel: t.channel,
                        tag: t.tag.clone(),
                        msg: msg.clone(),
                    })
                    .is_ok(),
                None => false,
            };
            if let Some(cf) = self.chan(ch)?.confirms.as_mut() {
                let seq = cf.assign();
                cf.confirm(seq);
            }
            if !delivered && mandatory {
                self.send_return(ch, &msg);
            }
            return Ok(None);
        }
        let vhost = self.vhost.as_ref().expect("vhost set by handshake");
        let routed = vhost.route_memo(
            &mut self.route_memo,
            &msg.exchange,
            &msg.routing_key,
            &msg.header,
        )?;
        let events = &self.events_tx;
        let c = self.channels.get_mut(&ch).ok_or_else(|| {
            AmqpError::new(
                reply::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )
        })?;
        let key = c.key;
        let ticket = c.confirms.as_mut().map(|cf| {
            Arc::new(ConfirmTicket {
                conn: events.clone(),
                chan_key: key,
                seq: cf.assign(),
                nacked: Default::default(),
            })
        });
        if routed.queues().is_empty() {
            if mandatory {
                self.send_return(ch, &msg);
            }
            return Ok(None);
        }
        let p = Pending {
            msg,
            routed,
            ticket,
        };
        // Room in every queue and at the writer, taken without waiting; or
        // none of it (what was taken is given back) and the slow path.
        let mut slots: SmallVec<[&QueueHandle; 4]> = SmallVec::new();
        let mut full = false;
        for q in p.routed.queues() {
            match q.try_reserve() {
                Some(true) => slots.push(q),
                Some(false) => {}
                None => {
                    full = true;
                    break;
                }
            }
        }
        let stored = p.msg.stored.filter(|_| slots.iter().any(|q| q.persisted()));
        let writer = match (full, stored) {
            (true, _) => None,
            (false, None) => Some(None),
            (false, Some(_)) => self.broker.persister.try_reserve(),
        };
        let Some(writer) = writer else {
            slots.iter().for_each(|q| q.unreserve());
            drop(slots);
            return Ok(Some(p));
        };
        hand_over(&self.broker, p.msg, p.ticket, &slots, stored, writer);
        Ok(None)
    }

    /// Hand over a routed message, waiting for room in its queues and at
    /// the store writer (this is where a publisher that outruns its queues
    /// waits).
    async fn enqueue_waiting(&mut self, p: Pending) -> AmqpResult<()> {
        let mut slots: SmallVec<[&QueueHandle; 4]> = SmallVec::new();
        for q in p.routed.queues() {
            if q.reserve().await {
                slots.push(q);
            }
        }
        let stored = p.msg.stored.filter(|_| slots.iter().any(|q| q.persisted()));
        let writer = match stored {
            Some(_) => self.broker.persister.reserve().await,
            None => None,
        };
        hand_over(&self.broker, p.msg, p.ticket, &slots, stored, writer);
        Ok(())
    }

    /// `basic.return` 312 NO_ROUTE with the message.
    fn send_return(&mut self, ch: u16, msg: &Message) {
        self.send_method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: reply::NO_ROUTE,
                reply_text: short("NO_ROUTE"),
                exchange: short(msg.exchange.as_str()),
                routing_key: short(msg.routing_key.as_str()),
            })),
        );
        self.put_content(ch, msg);
    }

    // -------------------------------------------------------------- events

    fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver {
                chan_key,
                channel,
                tag,
                msg,
                redelivered,
                seq,
                queue: _,
                in_flight,
            } => {
                let wake = in_flight.fetch_sub(1, Ordering::AcqRel) == FLOW_WINDOW;
                let Some(c) = self.channels.get_mut(&channel) else {
                    return;
                };
                if c.key != chan_key || c.closing {
                    return;
                }
                let Some(cons) = c.consumers.get(&tag) else {
                    return;
                };
                let dtag = c.next_tag;
                c.next_tag += 1;
                if !cons.no_ack {
                    c.unacked.insert(
                        dtag,
                        Delivery {
                            queue: cons.queue.clone(),
                            seq,
                            counted: true,
                        },
                    );
                }
                if wake {
                    cons.queue.control(QueueCmd::Wake);
                }
                method::put_deliver(
                    &mut self.out,
                    channel,
                    tag.as_bytes(),
                    dtag,
                    redelivered,
                    msg.exchange.as_bytes(),
                    msg.routing_key.as_bytes(),
                );
                self.put_content(channel, &msg);
            }
            ConnEvent::Reply {
                chan_key,
                channel,
                tag,
                msg,
            } => {
                let Some(c) = self.channels.get_mut(&channel) else {
                    return;
                };
                if c.key != chan_key || c.closing || c.reply.is_none() {
                    return;
                }
                let dtag = c.next_tag;
                c.next_tag += 1;
                method::put_deliver(
                    &mut self.out,
                    channel,
                    tag.as_bytes(),
                    dtag,
                    false,
                    msg.exchange.as_bytes(),
                    msg.routing_key.as_bytes(),
                );
                self.put_content(channel, &msg);
            }
            ConnEvent::Confirm {
                chan_key,
                seq,
                nack,
            } => {
                if let Some(c) = self.channels.values_mut().find(|c| c.key == chan_key) {
                    if let Some(cf) = c.confirms.as_mut() {
                        if nack {
                            cf.nack(seq);
                        } else {
                            cf.confirm(seq);
                        }
                    }
                }
            }
            ConnEvent::CancelOk { chan_key, tag } => {
                let Some(c) = self.channels.values_mut().find(|c| c.key == chan_key) else {
                    return;
                };
                let id = c.id;
                if let Some(cons) = c.consumers.remove(&tag) {
                    if !cons.cancel_nowait {
                        self.send_method(
                            id,
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: short(&tag),
                            })),
                        );
                    }
                }
            }
            ConnEvent::Cancelled { chan_key, tag } => {
                let Some(c) = self.channels.values_mut().find(|c| c.key == chan_key) else {
                    return;
                };
                let id = c.id;
                if let Some(cons) = c.consumers.remove(&tag) {
                    if cons.cancelling {
                        if !cons.cancel_nowait {
                            self.send_method(
                                id,
                                AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                    consumer_tag: short(&tag),
                                })),
                            );
                        }
                    } else if self.caps.consumer_cancel_notify {
                        self.send_method(
                            id,
                            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                                consumer_tag: short(&tag),
                                nowait: true,
                            })),
                        );
                    }
                }
            }
        }
    }

    /// Send publisher confirms for every channel whose confirmed prefix grew:
    /// one `basic.ack` (or `basic.nack`) with `multiple` per run per batch.
    fn flush_confirms(&mut self) {
        for c in self.channels.values_mut() {
            let Some(cf) = c.confirms.as_mut() else {
                continue;
            };
            if !cf.dirty {
                continue;
            }
            let (out, id) = (&mut self.out, c.id);
            cf.take_ready(|last, multiple, nack| {
                if nack {
                    method::put_nack(out, id, last, multiple);
                } else {
                    method::put_ack(out, id, last, multiple);
                }
            });
        }
    }
}

/// What a frame leaves for the async path.
enum Slow {
    /// A method on channel 0.
    Connection(Method, u16, u16),
    /// A channel method that is not per-message (class, method ids).
    Channel(u16, AMQPClass, u16, u16),
    /// A routed message waiting for room in a queue or at the writer.
    Publish(u16, Pending),
}

/// A routed message not yet handed to its queues.
struct Pending {
    msg: MessageRef,
    routed: Routed,
    ticket: Option<Arc<ConfirmTicket>>,
}

/// Hand a routed message to the queues that gave it a slot (and `writer`,
/// the store's slot, for a persistent one). Each queue's sequence is taken
/// and its message sent with no await in between, so the sequences a queue
/// receives are dense; the store write is submitted before any queue sees
/// the message (a queue's page reads wait for it).
fn hand_over(
    broker: &Broker,
    msg: MessageRef,
    ticket: Option<Arc<ConfirmTicket>>,
    slots: &[&QueueHandle],
    stored: Option<u64>,
    writer: Option<OwnedSemaphorePermit>,
) {
    let seqs: SmallVec<[u64; 4]> = slots.iter().map(|q| q.take_seq()).collect();
    if let Some(id) = stored {
        // Persistent: written once for every durable queue it reached; the
        // confirm waits for the sync too.
        let refs = slots.iter().filter(|q| q.persisted()).count() as u32;
        let mut ops = Vec::with_capacity(refs as usize + 1);
        ops.push(MessageOp::PutMessage {
            id,
            refs,
            message: msg.to_stored(),
        });
        for (q, &seq) in slots.iter().zip(&seqs) {
            if q.persisted() {
                ops.push(MessageOp::Enqueue {
                    queue: q.id(),
                    seq,
                    id,
                });
            }
        }
        let t = ticket.clone();
        let done: crate::persist::Done = Box::new(move |ok| {
            if let (false, Some(t)) = (ok, &t) {
                t.nack();
            }
            drop(t);
        });
        broker.persister.submit_reserved(writer, ops, done);
    }
    // (The last queue takes the message and ticket without a clone.)
    let last = slots.len().wrapping_sub(1);
    for (i, (q, seq)) in slots.iter().zip(seqs).enumerate() {
        if i == last {
            q.send(seq, msg, ticket, true);
            break;
        }
        q.send(seq, msg.clone(), ticket.clone(), true);
    }
}

/// A channel error closes the channel; a hard one the connection.
fn channel_fault(ch: u16, e: AmqpError) -> Fault {
    if e.is_hard() {
        Fault::Connection(e)
    } else {
        Fault::Channel(ch, e)
    }
}

trait IntoAt {
    fn into_at(self, class_id: u16, method_id: u16) -> Self;
}

impl IntoAt for Fault {
    fn into_at(self, class_id: u16, method_id: u16) -> Self {
        match self {
            Fault::Connection(e) => Fault::Connection(e.at(class_id, method_id)),
            Fault::Channel(ch, e) => Fault::Channel(ch, e.at(class_id, method_id)),
            f => f,
        }
    }
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let s = |v: &str| AMQPValue::LongString(v.into());
    let mut p = FieldTable::default();
    p.insert("product".into(), s("Warren"));
    p.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), s("Rust"));
    p.insert("cluster_name".into(), s("warren"));
    p.insert("copyright".into(), s("Copyright the Warren authors"));
    p.insert(
        "information".into(),
        s("Licensed under the Apache License 2.0"),
    );
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

/// PLAIN: "\0user\0password" (an authorization identity before the first NUL is ignored).
fn parse_plain(resp: &[u8]) -> Option<(String, String)> {
    let mut parts = resp.split(|b| *b == 0);
    let _authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let pass = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    if parts.next().is_some() {
        return None;
    }
    Some((user, pass))
}

/// AMQPLAIN: a field table body (no length prefix) with LOGIN and PASSWORD.
fn parse_amqplain(resp: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(resp.len() + 4);
    framed.extend_from_slice(&(resp.len() as u32).to_be_bytes());
    framed.extend_from_slice(resp);
    warren_protocol::table::skip_table(&framed).ok()?;
    let (_, t) = warren_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match t.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

/// A server-generated name: prefix + 22 URL-safe random characters.
pub fn generated_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut out = String::with_capacity(prefix.len() + 22);
    out.push_str(prefix);
    let mut bits: u128 = 0;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        bits = (bits << 64) | h.finish() as u128;
    }
    for _ in 0..22 {
        out.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    out
}
