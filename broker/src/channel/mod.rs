//! A channel: its state and its behaviour, owned by its connection task
//! (plain structs, no locks). Channel methods are methods on [`Channel`]
//! over a narrow context ([`Ctx`]): the connection's writer, the session
//! (user, vhost, broker handle, the connection's event mailbox) and the
//! little state the channels of one connection share (the batch of acks,
//! the route memo, exclusive queues). The connection decodes frames and
//! looks up the channel; everything a method does happens here.
//!
//! One file per method family:
//! - [`topology`]: `exchange.*` and `queue.*`.
//! - [`publish`]: `basic.publish`: content assembly -> route -> hand-over
//!   to queues (and the store), top to bottom.
//! - [`consume`]: `basic.consume`, `basic.cancel`, `basic.get`,
//!   `basic.recover`, `basic.qos`, and deliveries to the client.
//! - [`ack`]: settlement (`basic.ack`, `basic.nack`, `basic.reject`).
//! - [`confirm`]: publisher confirms.
//! - [`tx`] — transactions.
//! - [`reply_to`]: direct reply-to (`amq.rabbitmq.reply-to`).
//! - [`authz`]: permission checks (configure / write / read, topics).
//!
//! Per-message methods (publish, ack, nack, reject, qos) are handled without
//! awaiting ([`Channel::on_fast_method`]); the rest ([`Channel::on_method`]) may
//! await a queue's or the vhost's answer.

pub mod ack;
pub mod authz;
pub mod confirm;
pub mod consume;
pub mod publish;
pub mod reply_to;
pub mod topology;
pub mod tx;

use crate::broker::Broker;
use crate::error::{AmqpError, AmqpResult};
use crate::events::ConnEvent;
use crate::queue::{ChannelCredit, QueueCmd, QueueHandle};
use crate::vhost::{Route, VHost};
use ack::{PendingAcks, Unacked};
use confirm::Confirms;
use consume::ChanConsumer;
use publish::Content;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tx::Tx;
use warren_protocol::amqp::{access, channel as chan, confirm as cf, AMQPClass};
use warren_protocol::method::Method;
use warren_protocol::reply;

/// Where a channel writes its frames: the connection's writer, which
/// batches them and flushes once per batch of work. (A trait, so that the
/// channel layer does not depend on the connection above it.)
pub trait Output {
    /// The encode buffer, for the hand-written hot-path encoders.
    fn buf(&mut self) -> &mut bytes::BytesMut;
    fn send_method(&mut self, channel: u16, m: AMQPClass);
    /// A message's content header and body frames.
    fn put_content(&mut self, channel: u16, msg: &crate::message::Message);
}

/// What the client said it supports (its `capabilities` client property).
#[derive(Default, Debug, Clone, Copy)]
pub struct ClientCaps {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
    pub authentication_failure_close: bool,
}

/// Facts about an open connection that its channels use, fixed once the
/// handshake is done.
pub struct Session {
    /// The connection's id (owner of its exclusive queues).
    pub conn_id: u64,
    /// The authenticated user.
    pub user: String,
    /// The user has the `impersonator` tag (may publish with another
    /// `user_id`).
    pub impersonator: bool,
    pub vhost: Arc<VHost>,
    pub broker: Arc<Broker>,
    pub caps: ClientCaps,
    /// The connection's event mailbox: queues deliver through it.
    pub events: mpsc::UnboundedSender<ConnEvent>,
}

/// State shared by the channels of one connection.
#[derive(Default)]
pub struct ConnShared {
    /// Acks not yet sent to their queues (one message per queue per batch).
    pub acks: PendingAcks,
    /// The last route this connection published on (see `VHost::route_memo`).
    pub route_memo: Option<Arc<Route>>,
    /// Exclusive queues this connection declared (deleted when it closes).
    pub exclusive: Vec<QueueHandle>,
    /// The last publish permission granted (see `authz`).
    pub publish_grant: authz::PublishGrant,
    /// Message counts since the connection last added them to the broker's.
    pub stats: crate::metrics::Local,
    /// Counts for the exchange it last published to.
    pub exchange_stats: crate::metrics::ExchangeTally,
}

/// What a channel method works with.
pub struct Ctx<'a> {
    pub out: &'a mut (dyn Output + Send),
    pub session: &'a Session,
    pub shared: &'a mut ConnShared,
}

pub struct Channel {
    /// The channel number on the wire.
    pub number: u16,
    /// Its place under the user's `max-channels` (given back on drop).
    pub usage: Option<crate::access::limits::Ticket>,
    /// Unique per channel incarnation (a number is reused after close):
    /// queues and events know the channel by it.
    pub key: u64,
    /// We sent channel.close and wait for close-ok; other frames are dropped.
    pub closing: bool,
    /// A `basic.publish` whose header and body frames are still coming.
    pub content: Option<Content>,
    /// Publisher confirms (after `confirm.select`).
    pub confirms: Option<Confirms>,
    /// The open transaction (after `tx.select`).
    pub tx: Option<Tx>,
    pub consumers: FxHashMap<Arc<str>, ChanConsumer>,
    /// Deliveries awaiting the client's ack, by delivery tag.
    pub unacked: Unacked,
    /// The next delivery tag.
    pub next_tag: u64,
    /// Per-consumer prefetch for consumers created from now on.
    pub prefetch: u16,
    /// The channel-wide prefetch (`global=true`).
    pub credit: Arc<ChannelCredit>,
    /// The last queue declared on this channel (for empty queue names).
    pub last_queue: Option<String>,
    /// Queues that hold consumers or unacked messages of this channel: they
    /// are told when it closes.
    pub queues_in_use: Vec<QueueHandle>,
    /// The direct reply-to consumer, if any.
    pub reply: Option<reply_to::ReplyConsumer>,
}

impl Channel {
    pub fn new(number: u16, key: u64) -> Self {
        Channel {
            number,
            usage: None,
            key,
            closing: false,
            content: None,
            confirms: None,
            tx: None,
            consumers: FxHashMap::default(),
            unacked: Unacked::default(),
            next_tag: 1,
            prefetch: 0,
            credit: Arc::new(ChannelCredit::default()),
            last_queue: None,
            queues_in_use: Vec::new(),
            reply: None,
        }
    }

    /// Remember that `q` holds something of this channel's.
    pub fn use_queue(&mut self, q: &QueueHandle) {
        if !self.queues_in_use.iter().any(|t| t == q) {
            self.queues_in_use.push(q.clone());
        }
    }

    /// Take the next delivery tag.
    pub fn take_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// The per-message methods, without awaiting. Any other method comes
    /// back (`Some`) for [`Channel::on_method`].
    pub fn on_fast_method(&mut self, cx: &mut Ctx<'_>, m: Method) -> AmqpResult<Option<AMQPClass>> {
        match m {
            Method::Publish(p) => self.start_publish(p).map(|()| None),
            Method::Ack {
                delivery_tag,
                multiple,
            } => self.ack(cx, delivery_tag, multiple).map(|()| None),
            Method::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => self
                .reject(cx, delivery_tag, multiple, requeue)
                .map(|()| None),
            Method::Reject {
                delivery_tag,
                requeue,
            } => self.reject(cx, delivery_tag, false, requeue).map(|()| None),
            Method::Qos {
                prefetch_size,
                prefetch_count,
                global,
            } => self
                .qos(cx, prefetch_size, prefetch_count, global)
                .map(|()| None),
            Method::Other(class) => Ok(Some(class)),
        }
    }

    /// Every other channel method.
    pub async fn on_method(&mut self, cx: &mut Ctx<'_>, class: AMQPClass) -> AmqpResult<()> {
        match class {
            AMQPClass::Channel(chan::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "active=false"));
                }
                cx.out.send_method(
                    self.number,
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
                cx.out.send_method(
                    self.number,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
            }
            AMQPClass::Exchange(m) => self.on_exchange(cx, m).await?,
            AMQPClass::Queue(m) => self.on_queue(cx, m).await?,
            AMQPClass::Basic(m) => self.on_basic(cx, m).await?,
            AMQPClass::Tx(m) => self.on_tx(cx, m).await?,
            AMQPClass::Confirm(cf::AMQPMethod::Select(s)) => self.confirm_select(cx, s.nowait)?,
            _ => return Err(not_from_client()),
        }
        Ok(())
    }

    /// Give the channel's consumers and unacked messages back to their
    /// queues (the channel closed, or its connection). The caller flushes
    /// pending acks first: a queue must see them before this.
    pub fn release(&mut self, cx: &mut Ctx<'_>) {
        if let Some(r) = self.reply.take() {
            r.unregister(&cx.session.broker);
        }
        let mut queues = std::mem::take(&mut self.queues_in_use);
        for cons in self.consumers.values() {
            if !queues.iter().any(|q| q == &cons.queue) {
                queues.push(cons.queue.clone());
            }
        }
        for q in queues {
            q.tell(QueueCmd::ChannelClosed { chan_key: self.key });
        }
    }
}

/// A method that only a server sends.
pub fn not_from_client() -> AmqpError {
    AmqpError::new(reply::COMMAND_INVALID, "method not expected from a client")
}

/// A server-generated name: prefix + 22 URL-safe random characters.
pub fn generated_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
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
