//! One task per client connection. It owns the socket and all the
//! connection's channels, and `select!`s over: bytes from the socket, events
//! for it (deliveries, confirms, cancels) from queues, the heartbeat timer and
//! the shutdown signal. Output is gathered by the [`writer`] and written once
//! per batch. Frames are checked (size, type, end octet) before being
//! buffered. The [`handshake`] comes first; then frames are decoded here and
//! handed to their channel (`crate::channel`), where every method's
//! behaviour lives.
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

pub mod admission;
mod channels;
pub mod handshake;
mod inbox;
mod io;
pub mod stream;
pub mod writer;

use crate::alarm::Blocked;
use crate::broker::Broker;
use crate::channel::publish::Pending;
use crate::channel::{Channel, ConnShared, Ctx, Output, Session};
use crate::error::AmqpError;
use crate::events::ConnEvent;
use bytes::{Bytes, BytesMut};
use io::Io;
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use stream::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use warren_protocol::amqp::{connection as conn, AMQPClass};
use warren_protocol::frame::{self, FrameHeader};
use warren_protocol::method::{self, short, Method};
use warren_protocol::reply;

/// Why processing stopped.
pub enum Fault {
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

/// A connection error (connection.close) with this code and text.
fn conn_error(code: u16, text: impl Into<String>) -> Fault {
    Fault::Connection(AmqpError::new(code, text))
}

/// A method's error: a hard code closes the connection, another its channel.
fn method_fault(ch: u16, e: AmqpError) -> Fault {
    if e.is_hard() {
        Fault::Connection(e)
    } else {
        Fault::Channel(ch, e)
    }
}

/// Attach the offending method's ids to a fault (unless it has some).
trait AtMethod {
    fn at_method(self, class_id: u16, method_id: u16) -> Self;
}

impl AtMethod for Fault {
    fn at_method(self, class_id: u16, method_id: u16) -> Self {
        match self {
            Fault::Connection(e) => Fault::Connection(e.at(class_id, method_id)),
            Fault::Channel(ch, e) => Fault::Channel(ch, e.at(class_id, method_id)),
            f => f,
        }
    }
}

/// How long a connection the client closed keeps reading (and discarding)
/// for the client to close its end.
const CLOSE_LINGER: Duration = Duration::from_secs(3);
/// Events handled per wake-up before the socket gets a turn.
const EVENT_BATCH: usize = 512;
/// Bytes read per wake-up at most before events get a turn.
const READ_BATCH: usize = 256 * 1024;

/// Serve a client connection to its end: the task body.
pub async fn serve(
    id: u64,
    stream: Stream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    handshake_slot: admission::HandshakeSlot,
) {
    let mut io = Io::new(stream, peer);
    let timeout = broker.config.handshake_timeout;
    let done = tokio::time::timeout(timeout, handshake::handshake(&mut io, &broker)).await;
    // Authenticated (or not, and closing): out of the handshake budget.
    drop(handshake_slot);
    match done {
        Ok(Ok(Some(opened))) => Connection::new(id, io, opened, broker).run().await,
        Ok(Ok(None)) => {
            let _ = io.stream.shutdown().await;
        }
        Ok(Err(Fault::Connection(e))) => {
            tracing::info!(peer = %io.peer, error = %e, "closing connection in handshake");
            if io.send_close(&e).await {
                io.await_close_ok(Duration::from_secs(3)).await;
            }
            let _ = io.stream.shutdown().await;
        }
        Ok(Err(f)) => {
            if let Fault::Drop(why) = f {
                tracing::debug!(%peer, %why, "dropping connection in handshake");
            }
            let _ = io.stream.shutdown().await;
        }
        Err(_) => {
            tracing::info!(peer = %peer, "handshake timed out");
            let _ = io.stream.shutdown().await;
        }
    }
    tracing::debug!(peer = %peer, "connection closed");
}

/// An open connection.
struct Connection {
    io: Io,
    session: Session,
    channels: FxHashMap<u16, Channel>,
    /// What the channels of this connection share.
    shared: ConnShared,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    channel_max: u16,
    heartbeat: u16,
    last_read: Instant,
    /// The broker's resource alarms.
    alarm: watch::Receiver<Blocked>,
    /// Input suspended: the connection published while an alarm was on.
    blocked: bool,
    /// `connection.blocked` went out and `connection.unblocked` is owed.
    blocked_sent: bool,
    /// This connection's slot under `max_connections`.
    _slot: tokio::sync::OwnedSemaphorePermit,
    _usage: crate::access::limits::Ticket,
    /// This connection in the broker's registry (for operators).
    info: Arc<crate::broker::ConnInfo>,
    /// Set when the broker asks the connection to close (see `ConnEvent::Close`).
    forced: Option<AmqpError>,
}

/// What a frame leaves for the async path.
enum Deferred {
    /// A method on channel 0.
    Connection(Method, u16, u16),
    /// A channel method that is not per-message (class, method ids).
    Channel(u16, AMQPClass, u16, u16),
    /// A routed message waiting for room in a queue or at the writer.
    Publish(u16, Pending),
}

/// The channel context from a connection's fields (a macro, so that the
/// borrow of `channels` stays apart from the others).
macro_rules! ctx {
    ($c:ident) => {
        Ctx {
            out: &mut $c.io.out,
            session: &$c.session,
            shared: &mut $c.shared,
        }
    };
}
use ctx;

impl Connection {
    fn new(id: u64, mut io: Io, o: handshake::Opened, broker: Arc<Broker>) -> Connection {
        io.set_stall_limit(match o.heartbeat {
            0 => broker.config.write_timeout,
            hb => Duration::from_secs(2 * hb as u64),
        });
        let (events_tx, events) = mpsc::unbounded_channel();
        let alarm = broker.alarms.subscribe();
        let info = broker.register_connection(crate::broker::ConnInfo {
            id,
            peer: io.peer,
            local: io.stream.tcp().local_addr().unwrap_or(io.peer),
            tls: io.stream.is_tls(),
            user: o.user.clone(),
            vhost: o.vhost.name.clone(),
            connected_at: crate::broker::now_ms(),
            client_properties: o.client_properties,
            auth_mechanism: o.auth_mechanism,
            channel_max: o.channel_max,
            frame_max: o.frame_max,
            heartbeat: o.heartbeat,
            channels: Default::default(),
            events: events_tx.clone(),
        });
        let impersonator = broker
            .access
            .snapshot()
            .users
            .get(&o.user)
            .is_some_and(|u| u.has_tag("impersonator"));
        Connection {
            io,
            session: Session {
                conn_id: id,
                impersonator,
                user: o.user,
                vhost: o.vhost,
                broker,
                caps: o.caps,
                events: events_tx,
            },
            channels: FxHashMap::default(),
            shared: ConnShared::default(),
            events,
            channel_max: o.channel_max,
            heartbeat: o.heartbeat,
            last_read: Instant::now(),
            alarm,
            blocked: false,
            blocked_sent: false,
            _slot: o.slot,
            _usage: o.usage,
            info,
            forced: None,
        }
    }

    async fn run(mut self) {
        let broker = self.session.broker.clone();
        crate::metrics::Churn::add(&broker.churn.connections_opened);
        let r = self.serve().await;
        broker.unregister_connection(self.info.id);
        match r {
            Ok(()) => {
                // The client closed and has its close-ok: leave closing the
                // socket to it, as RabbitMQ does (see `Io::finish`).
                self.release_all().await;
                self.io.finish(CLOSE_LINGER).await;
            }
            Err(f) => {
                self.fail(f).await;
                self.release_all().await;
                let _ = self.io.stream.shutdown().await;
            }
        }
        self.shared
            .stats
            .flush_into_both(&broker.metrics, &self.session.vhost.metrics);
        self.shared.exchange_stats.flush();
        crate::metrics::Churn::add(&broker.churn.connections_closed);
    }

    /// Report a fault to the client as its kind requires, then wait briefly
    /// for the close handshake.
    async fn fail(&mut self, f: Fault) {
        let peer = self.io.peer;
        match f {
            Fault::Drop(why) => tracing::debug!(%peer, %why, "dropping connection"),
            Fault::Channel(ch, e) => {
                // Only reached through paths that already handle channel faults.
                tracing::warn!(%peer, channel = ch, error = %e, "channel fault at connection level");
            }
            Fault::Connection(e) => {
                tracing::info!(%peer, user = %self.session.user, error = %e, "closing connection");
                if !self.io.send_close(&e).await {
                    return;
                }
                self.release_all().await;
                self.io.await_close_ok(Duration::from_secs(3)).await;
            }
        }
    }

    async fn serve(&mut self) -> Result<(), Fault> {
        let mut shutdown = self.session.broker.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return Err(conn_error(
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
        // Frames that came in the same reads as the handshake (a pipelining
        // client sends channel.open right behind connection.open) are
        // handled now, not when more bytes arrive.
        if !self.io.inbuf.is_empty() {
            let closed = self.process_input().await?;
            self.io.flush().await?;
            if closed {
                return Ok(());
            }
            self.flush_confirms();
        }
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return Err(conn_error(reply::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"));
                }
                r = alarm.changed(), if self.blocked => {
                    let now = *alarm.borrow_and_update();
                    // (A closed sender cannot happen while we hold the broker;
                    // treat it as "no alarm" rather than spin.)
                    if (r.is_err() || !now.any()) && self.unblock() && self.process_input().await? {
                        self.io.flush().await?;
                        return Ok(());
                    }
                    self.flush_confirms();
                }
                ev = self.events.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev);
                        for _ in 1..EVENT_BATCH {
                            match self.events.try_recv() {
                                Ok(ev) => self.on_event(ev),
                                Err(_) => break,
                            }
                        }
                        self.flush_confirms();
                        if let Some(e) = self.forced.take() {
                            return Err(Fault::Connection(e));
                        }
                    }
                }
                n = self.io.stream.read_buf(&mut self.io.inbuf), if !self.blocked => {
                    let n = n?;
                    if n == 0 {
                        return Err(Fault::Drop("peer closed the socket".into()));
                    }
                    self.session.broker.alarms.note_ingress(n);
                    self.last_read = Instant::now();
                    if self.process_input().await? {
                        self.io.flush().await?;
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
                        if self.io.out.last_write.elapsed() >= tick && self.io.out.is_idle() {
                            frame::put_heartbeat(self.io.out.buf());
                        }
                    }
                }
            }
            self.io.flush().await?;
        }
    }

    /// Handle every complete frame in the input buffer. Returns true when
    /// the connection closed cleanly.
    async fn process_input(&mut self) -> Result<bool, Fault> {
        let mut handled = 0usize;
        while !self.blocked {
            let Some((h, payload)) = self.io.next_frame()? else {
                break;
            };
            handled += payload.len() + frame::OVERHEAD;
            let content = h.kind == frame::HEADER || h.kind == frame::BODY;
            // Per-message frames are handled without awaiting; only the rest
            // (and a publish that must wait for room) takes the async path.
            let r = match self.on_frame(h, payload) {
                Ok(None) => Ok(false),
                Ok(Some(slow)) => self.on_deferred(slow).await,
                Err(f) => Err(f),
            };
            match r {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(Fault::Channel(ch, e)) => self.close_channel(ch, e),
                Err(f) => return Err(f),
            }
            if content {
                // A publish while an alarm is on blocks the connection; the
                // rest of the input waits in the buffer and the socket.
                if self.session.broker.alarms.any() {
                    let state = *self.alarm.borrow();
                    if state.any() {
                        self.block(state);
                        break;
                    }
                }
            }
            if handled >= READ_BATCH {
                // Let queued events and the writer in; the rest waits.
                self.shared.acks.flush();
                self.io.flush().await?;
                handled = 0;
                tokio::task::yield_now().await;
            }
        }
        self.shared.acks.flush();
        // Keep the read buffer from holding a large allocation forever.
        let inbuf = &mut self.io.inbuf;
        if inbuf.is_empty() && inbuf.capacity() > 4 * self.io.frame_max as usize {
            *inbuf = BytesMut::with_capacity(16 * 1024);
        }
        Ok(false)
    }

    /// Stop reading: the connection published while an alarm is on.
    fn block(&mut self, state: Blocked) {
        self.blocked = true;
        let reason = state.reason().unwrap_or("low on resources");
        tracing::debug!(peer = %self.io.peer, reason, "publisher blocked by a resource alarm");
        if self.session.caps.connection_blocked && !self.blocked_sent {
            self.blocked_sent = true;
            self.io.out.send_method(
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
        tracing::debug!(peer = %self.io.peer, "publisher unblocked");
        if self.blocked_sent {
            self.blocked_sent = false;
            self.io.out.send_method(
                0,
                AMQPClass::Connection(conn::AMQPMethod::Unblocked(conn::Unblocked {})),
            );
        }
        true
    }

    /// Handle a frame without awaiting, or say what is left to do.
    fn on_frame(&mut self, h: FrameHeader, payload: Bytes) -> Result<Option<Deferred>, Fault> {
        let ch = h.channel;
        match h.kind {
            frame::HEARTBEAT => io::check_heartbeat(ch, &payload).map(|()| None),
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
                    return Ok(Some(Deferred::Connection(m, c, mid)));
                }
                if c == 10 {
                    return Err(conn_error(
                        reply::COMMAND_INVALID,
                        format!("connection method on channel {ch}"),
                    )
                    .at_method(c, mid));
                }
                match self.on_channel_method(ch, m, mid) {
                    Ok(None) => Ok(None),
                    Ok(Some(class)) => Ok(Some(Deferred::Channel(ch, class, c, mid))),
                    Err(e) => Err(method_fault(ch, e.at(c, mid))),
                }
            }
            frame::HEADER | frame::BODY => {
                let Some(c) = self.channels.get_mut(&ch) else {
                    return Err(conn_error(
                        reply::CHANNEL_ERROR,
                        format!("content frame on unopened channel {ch}"),
                    ));
                };
                let pending = c
                    .on_content(&mut ctx!(self), h.kind, payload)
                    .map_err(|e| method_fault(ch, e))?;
                Ok(pending.map(|p| Deferred::Publish(ch, p)))
            }
            _ => Err(conn_error(
                reply::FRAME_ERROR,
                format!("unknown frame type {}", h.kind),
            )),
        }
    }

    /// The async rest of [`Connection::on_frame`]. Returns true when the
    /// client closed the connection.
    async fn on_deferred(&mut self, d: Deferred) -> Result<bool, Fault> {
        self.shared.acks.flush();
        match d {
            Deferred::Connection(m, c, mid) => self.on_connection_method(m, c, mid).await,
            Deferred::Channel(ch, class, c, mid) => {
                let Some(chan) = self.channels.get_mut(&ch) else {
                    return Ok(false);
                };
                let r = chan.on_method(&mut ctx!(self), class).await;
                r.map_err(|e| method_fault(ch, e.at(c, mid)))?;
                Ok(false)
            }
            Deferred::Publish(ch, p) => {
                let Some(chan) = self.channels.get_mut(&ch) else {
                    return Ok(false);
                };
                let r = chan.finish_publish(&mut ctx!(self), p).await;
                r.map_err(|e| method_fault(ch, e.at(60, 40)))?;
                Ok(false)
            }
        }
    }

    async fn on_connection_method(&mut self, m: Method, c: u16, mid: u16) -> Result<bool, Fault> {
        let Method::Other(AMQPClass::Connection(cm)) = m else {
            return Err(conn_error(
                reply::CHANNEL_ERROR,
                "expected a connection method on channel 0",
            )
            .at_method(c, mid));
        };
        match cm {
            conn::AMQPMethod::Close(_) => {
                self.release_all().await;
                self.io.out.send_method(
                    0,
                    AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                );
                Ok(true)
            }
            conn::AMQPMethod::CloseOk(_) => Ok(true),
            conn::AMQPMethod::UpdateSecret(_) => {
                self.io.out.send_method(
                    0,
                    AMQPClass::Connection(conn::AMQPMethod::UpdateSecretOk(
                        conn::UpdateSecretOk {},
                    )),
                );
                Ok(false)
            }
            _ => Err(conn_error(
                reply::CHANNEL_ERROR,
                "unexpected method in connection state running",
            )
            .at_method(c, mid)),
        }
    }

    /// Send publisher confirms for every channel whose confirmed prefix grew.
    /// Send the confirms that are ready, and add this wake-up's message
    /// counts to the broker's.
    fn flush_confirms(&mut self) {
        for c in self.channels.values_mut() {
            self.shared.stats.confirmed += c.flush_confirms(&mut self.io.out);
        }
        self.shared
            .stats
            .flush_into_both(&self.session.broker.metrics, &self.session.vhost.metrics);
        self.shared.exchange_stats.flush();
    }
}
