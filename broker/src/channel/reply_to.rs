//! Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to`): a requester
//! consumes from the pseudo-queue `amq.rabbitmq.reply-to` (no-ack), which
//! registers its channel under a generated name `amq.rabbitmq.reply-to.*`;
//! its requests carry `reply_to: amq.rabbitmq.reply-to`, rewritten to that
//! name; a replier publishes to the default exchange with that name as the
//! routing key, and the reply goes straight to the requester's connection,
//! with no queue in between.
//!
//! On a clustered node the address names the node (`…reply-to.NODE.…`,
//! NODE the hex of its cluster id, as RabbitMQ's names encode the node), so
//! a replier on another node sends the reply there.
//!
//! Credit: a reply consumer takes at most [`REPLY_WINDOW`] replies into its
//! connection's mailbox before it has written them; a replier that is
//! further ahead waits (its socket stops being read, as for a full queue),
//! so a requester that stops reading cannot make the broker's memory grow.
//! RabbitMQ has no such bound.

use super::{Channel, Ctx};
use crate::broker::{Broker, ReplyTarget};
use crate::error::{precondition, AmqpError, AmqpResult};
use crate::events::ConnEvent;
use crate::message::{Message, MessageRef};
use std::sync::Arc;
use tokio::sync::{Semaphore, TryAcquireError};
use warren_protocol::amqp::{basic, AMQPClass};
use warren_protocol::content::ContentHeader;
use warren_protocol::method::{self, short};
use warren_protocol::reply;

/// The pseudo-queue of direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Prefix of the per-channel reply addresses.
pub const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// Replies a reply consumer's connection may hold unwritten.
pub const REPLY_WINDOW: usize = 1024;

pub use crate::broker::ReplyTarget as Target;

/// A channel's reply consumer.
pub struct ReplyConsumer {
    pub tag: Arc<str>,
    /// Its `amq.rabbitmq.reply-to.*` address.
    pub name: String,
    /// Replies it may still take (shared with its registry entry).
    credit: Arc<Semaphore>,
}

impl ReplyConsumer {
    /// Forget the consumer: later replies to it are unroutable, and
    /// repliers waiting for its credit give up.
    pub fn unregister(&self, broker: &Broker) {
        broker.replies().remove(&self.name);
        self.credit.close();
    }
}

/// Whether `msg` is a direct reply; then where it goes (None: to a reply
/// consumer that no longer exists).
pub fn target_of(broker: &Broker, msg: &Message) -> Option<Option<Target>> {
    if !msg.exchange.is_empty() || !msg.routing_key.as_str().starts_with(REPLY_TO_PREFIX) {
        return None;
    }
    Some(broker.replies().get(msg.routing_key.as_str()).cloned())
}

/// The other member of this node's cluster a reply address names, if it
/// names one.
pub fn remote_node(broker: &Broker, name: &str) -> Option<String> {
    let m = broker.cluster.as_ref()?;
    let rest = name.strip_prefix(REPLY_TO_PREFIX)?;
    let (hex, _) = rest.split_once('.')?;
    let id = u64::from_str_radix(hex, 16).ok()?;
    let node = m.node();
    if id == node.id() {
        return None;
    }
    node.status()
        .members
        .into_iter()
        .find(|n| n.id() == id)
        .map(|n| n.name)
}

impl ReplyTarget {
    /// Send a reply if the consumer has credit now: `None` if it has none.
    fn try_send(&self, msg: &MessageRef) -> Option<bool> {
        match self.credit.try_acquire() {
            Ok(p) => p.forget(),
            Err(TryAcquireError::NoPermits) => return None,
            Err(TryAcquireError::Closed) => return Some(false),
        }
        Some(self.deliver(msg.clone()))
    }

    /// Send a reply, waiting for credit; false if the consumer went away.
    pub async fn send_waiting(&self, msg: MessageRef) -> bool {
        match self.credit.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.deliver(msg)
    }

    fn deliver(&self, msg: MessageRef) -> bool {
        self.events
            .send(ConnEvent::Reply {
                chan_key: self.chan_key,
                channel: self.channel,
                tag: self.tag.clone(),
                msg,
            })
            .is_ok()
    }
}

impl Channel {
    /// `basic.consume` on `amq.rabbitmq.reply-to`: register this channel as
    /// the destination of replies to its requests.
    pub(super) fn consume_replies(
        &mut self,
        cx: &mut Ctx<'_>,
        tag: Arc<str>,
        no_ack: bool,
        nowait: bool,
    ) -> AmqpResult<()> {
        if !no_ack {
            return Err(precondition("reply consumer cannot acknowledge"));
        }
        if self.reply.is_some() {
            return Err(precondition("reply consumer already set"));
        }
        let name = match &cx.session.broker.cluster {
            Some(m) => super::generated_name(&format!(
                "{REPLY_TO_PREFIX}{:016x}.",
                warren_cluster::node_id(&m.node().info().name)
            )),
            None => super::generated_name(REPLY_TO_PREFIX),
        };
        let credit = Arc::new(Semaphore::new(REPLY_WINDOW));
        let target = ReplyTarget {
            events: cx.session.events.clone(),
            chan_key: self.key,
            channel: self.number,
            tag: tag.clone(),
            credit: credit.clone(),
        };
        self.reply = Some(ReplyConsumer {
            tag: tag.clone(),
            name: name.clone(),
            credit,
        });
        cx.session.broker.replies().insert(name, target);
        if !nowait {
            cx.out.send_method(
                self.number,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    /// A request's `reply_to: amq.rabbitmq.reply-to` becomes this channel's
    /// reply address (406 without a reply consumer, as RabbitMQ).
    pub(super) fn fill_reply_to(&self, header: ContentHeader) -> AmqpResult<ContentHeader> {
        if header.reply_to() != Some(REPLY_TO) {
            return Ok(header);
        }
        let Some(r) = self.reply.as_ref() else {
            return Err(precondition("fast reply consumer does not exist"));
        };
        header
            .with_reply_to(&r.name)
            .ok_or_else(|| AmqpError::new(reply::INTERNAL_ERROR, "cannot rewrite reply_to"))
    }

    /// Send a reply now if its consumer has credit, else leave it pending.
    pub(super) fn send_reply(
        &mut self,
        cx: &mut Ctx<'_>,
        target: Option<Target>,
        msg: MessageRef,
        mandatory: bool,
        confirm: Option<u64>,
    ) -> Option<super::publish::Pending> {
        let delivered = match target.as_ref().map(|t| t.try_send(&msg)) {
            None => false, // no such reply consumer
            Some(Some(delivered)) => delivered,
            Some(None) => {
                return target.map(|target| super::publish::Pending::Reply {
                    target,
                    msg,
                    mandatory,
                    confirm,
                })
            }
        };
        self.reply_sent(cx, delivered, &msg, mandatory, confirm);
        None
    }

    /// A reply went out (or could not): confirm it; return it if it was
    /// mandatory and undeliverable.
    pub(super) fn reply_sent(
        &mut self,
        cx: &mut Ctx<'_>,
        delivered: bool,
        msg: &Message,
        mandatory: bool,
        confirm: Option<u64>,
    ) {
        if let (Some(cf), Some(seq)) = (self.confirms.as_mut(), confirm) {
            cf.confirm(seq);
        }
        if !delivered && mandatory {
            self.send_return(cx, msg);
        }
    }

    /// A reply for this channel's reply consumer: write it and give the
    /// credit back.
    pub fn deliver_reply(&mut self, cx: &mut Ctx<'_>, chan_key: u64, tag: &str, msg: &Message) {
        if self.key != chan_key || self.closing {
            return;
        }
        let Some(r) = self.reply.as_ref().filter(|r| &*r.tag == tag) else {
            return; // cancelled meanwhile: the reply is dropped
        };
        r.credit.add_permits(1);
        let dtag = self.take_tag();
        method::put_deliver(
            cx.out.buf(),
            self.number,
            tag.as_bytes(),
            dtag,
            false,
            msg.exchange.as_bytes(),
            msg.routing_key.as_bytes(),
        );
        cx.out.put_content(self.number, msg);
    }
}
