//! `basic.publish`, top to bottom: the method frame starts a [`Content`];
//! header and body frames complete it ([`Channel::on_content`]); the
//! complete message is checked and built ([`Channel::publish`]), buffered by
//! an open transaction or routed ([`Channel::route`]): to a direct reply-to
//! consumer, or through the vhost to queues, which take it if each has room
//! now ([`hand_over`], the common case, with no await). Otherwise the routed
//! message comes back as a [`Pending`], and the connection awaits
//! [`Channel::finish_publish`], which waits for room (this is where a
//! publisher that outruns its queues waits, and its socket stops being read).
//! A transaction's commit goes through the same two steps.

use super::{reply_to, Channel, Ctx};
use crate::broker::Broker;
use crate::dedup::Admit;
use crate::error::{precondition, AmqpError, AmqpResult};
use crate::events::ConfirmTicket;
use crate::message::{Message, MessageRef};
use crate::queue::QueueHandle;
use crate::vhost::Routed;
use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use warren_protocol::amqp::{basic, AMQPClass};
use warren_protocol::content::{ContentError, ContentHeader};
use warren_protocol::frame;
use warren_protocol::method::{short, Publish};
use warren_protocol::reply;
use warren_storage::{EntryMeta, MessageOp};

/// A `basic.publish` waiting for its header and body frames.
pub struct Content {
    pub publish: Publish,
    pub header: Option<ContentHeader>,
    /// Single-frame bodies are kept as the frame's own bytes (no copy);
    /// multi-frame bodies are gathered here.
    pub body: Option<Bytes>,
    pub gathered: BytesMut,
    pub received: u64,
}

/// A routed message that must wait for room before it is handed over.
pub enum Pending {
    /// Room in one of its queues' mailboxes, or at the store writer.
    Queues {
        msg: MessageRef,
        routed: Routed,
        ticket: Option<Arc<ConfirmTicket>>,
        /// Store writes that go with the message (its deduplication key).
        extra: Vec<MessageOp>,
    },
    /// Room at the store writer for a delayed message to be stored.
    Delay {
        msg: MessageRef,
        due: u64,
        ticket: Option<Arc<ConfirmTicket>>,
        extra: Vec<MessageOp>,
    },
    /// Credit at a direct reply-to consumer that is behind.
    Reply {
        target: reply_to::Target,
        msg: MessageRef,
        mandatory: bool,
        confirm: Option<u64>,
    },
    /// A direct reply to a requester on another node of the cluster.
    RemoteReply {
        node: String,
        msg: MessageRef,
        mandatory: bool,
        confirm: Option<u64>,
    },
}

impl Channel {
    /// The `basic.publish` method frame: header and body frames follow.
    pub(super) fn start_publish(&mut self, p: Publish) -> AmqpResult<()> {
        if p.immediate {
            return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "immediate=true"));
        }
        self.content = Some(Content {
            publish: p,
            header: None,
            body: None,
            gathered: BytesMut::new(),
            received: 0,
        });
        Ok(())
    }

    /// A content frame (header or body). Once the message is complete it is
    /// published. `Some`: routed, but it must wait for room. Errors with a
    /// hard code close the connection.
    pub fn on_content(
        &mut self,
        cx: &mut Ctx<'_>,
        kind: u8,
        payload: Bytes,
    ) -> AmqpResult<Option<Pending>> {
        if self.closing {
            return Ok(None);
        }
        let max = cx.session.broker.config.max_message_size;
        let Some(content) = self.content.as_mut() else {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                "expected method frame, got non method frame instead",
            ));
        };
        if kind == frame::HEADER {
            if content.header.is_some() {
                return Err(AmqpError::new(
                    reply::UNEXPECTED_FRAME,
                    "expected content body, got content header instead",
                )
                .at(60, 40));
            }
            let h = ContentHeader::parse(payload).map_err(|e| match e {
                ContentError::WrongClass(c) => AmqpError::new(
                    reply::UNEXPECTED_FRAME,
                    format!("expected content header for class 60, got one for class {c} instead"),
                ),
                e => AmqpError::new(reply::FRAME_ERROR, e.to_string()),
            });
            let h = h.map_err(|e| e.at(60, 40))?;
            if h.body_size() > max {
                self.content = None;
                return Err(precondition(format!(
                    "message size {} is larger than configured max size {max}",
                    h.body_size()
                ))
                .at(60, 40));
            }
            content.header = Some(h);
        } else {
            let Some(h) = content.header.as_ref() else {
                return Err(AmqpError::new(
                    reply::UNEXPECTED_FRAME,
                    "expected content header for class 60, got non content header frame instead",
                )
                .at(60, 40));
            };
            let size = h.body_size();
            content.received += payload.len() as u64;
            if content.received > size {
                return Err(AmqpError::new(
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
        let Some(content) = self.content.take() else {
            return Ok(None);
        };
        let body = content.body.unwrap_or_else(|| content.gathered.freeze());
        let Some(header) = content.header else {
            return Ok(None);
        };
        self.publish(cx, content.publish, header, body)
            .map_err(|e| e.at(60, 40))
    }

    /// A complete message: checked (permissions, `user_id` unless the user
    /// is an impersonator), its direct reply-to address
    /// filled in, then buffered by the transaction or routed.
    fn publish(
        &mut self,
        cx: &mut Ctx<'_>,
        p: Publish,
        header: ContentHeader,
        body: Bytes,
    ) -> AmqpResult<Option<Pending>> {
        cx.session.check_publish(
            &mut cx.shared.publish_grant,
            &p.exchange,
            p.routing_key.as_str(),
        )?;
        let user = &cx.session.user;
        if let Some(uid) = header.user_id_bytes() {
            if uid != user.as_bytes() && !cx.session.impersonator {
                let uid = String::from_utf8_lossy(uid);
                return Err(precondition(format!(
                    "user_id property set to '{uid}' but authenticated user was '{user}'"
                )));
            }
        }
        let header = self.fill_reply_to(header)?;
        if let Some(e) = header.expiration() {
            check_expiration(e)
                .map_err(|why| precondition(format!("invalid expiration '{e}': {why}")))?;
        }
        let stored = header
            .is_persistent()
            .then(|| cx.session.broker.next_message_id());
        let msg = Arc::new(Message {
            exchange: p.exchange,
            routing_key: p.routing_key,
            header,
            body,
            stored,
        });
        cx.shared.stats.received += 1;
        cx.shared.stats.received_confirm += self.confirms.is_some() as u64;
        if let Some(t) = self.tx.as_mut() {
            // Check the exchange now (as RabbitMQ does), route at commit.
            cx.session
                .vhost
                .route(&msg.exchange, &msg.routing_key, &msg.header)?;
            t.publishes.push((p.mandatory, msg));
            return Ok(None);
        }
        self.route(cx, p.mandatory, msg)
    }

    /// Route a message and hand it over if there is room now; otherwise
    /// it comes back for [`Channel::finish_publish`]. The confirm sequence
    /// is assigned here, in publish order.
    pub(super) fn route(
        &mut self,
        cx: &mut Ctx<'_>,
        mandatory: bool,
        msg: MessageRef,
    ) -> AmqpResult<Option<Pending>> {
        if let Some(target) = reply_to::target_of(&cx.session.broker, &msg) {
            let confirm = self.confirms.as_mut().map(|c| c.assign());
            if target.is_none() {
                if let Some(node) =
                    reply_to::remote_node(&cx.session.broker, msg.routing_key.as_str())
                {
                    return Ok(Some(Pending::RemoteReply {
                        node,
                        msg,
                        mandatory,
                        confirm,
                    }));
                }
            }
            return Ok(self.send_reply(cx, target, msg, mandatory, confirm));
        }
        let vhost = &cx.session.vhost;
        let routed = vhost.route_memo(
            &mut cx.shared.route_memo,
            &msg.exchange,
            &msg.routing_key,
            &msg.header,
        )?;
        let ticket = self.confirms.as_mut().map(|cf| {
            let t = ConfirmTicket::new(cx.session.events.clone(), self.key, cf.assign());
            Arc::new(t)
        });
        let Some(extra) = admit(&cx.session.broker, &routed, &msg, ticket.as_ref()) else {
            // A duplicate: dropped as an idempotent success (acked, never
            // returned).
            cx.shared
                .exchange_stats
                .count(Some(routed.counters()), false);
            if let Some(t) = ticket {
                t.settle();
            }
            return Ok(None);
        };
        cx.shared
            .exchange_stats
            .count(Some(routed.counters()), !routed.queues().is_empty());
        let delayed = routed
            .delayed()
            .and_then(|durable| Some((durable, crate::delayed::delay_of(&msg)?)));
        if let Some((durable, ms)) = delayed {
            // A mandatory message is returned only if nothing would route
            // it now (the plugin returns every mandatory delayed publish).
            if !(mandatory && routed.queues().is_empty()) {
                cx.shared.stats.routed += 1;
                let broker = &cx.session.broker;
                let due = crate::message::unix_ms().saturating_add(ms);
                if !(durable && msg.stored.is_some()) {
                    delay(
                        broker,
                        &cx.session.vhost.name,
                        msg,
                        due,
                        None,
                        ticket,
                        extra,
                    );
                    return Ok(None);
                }
                // Stored: a slot at the store writer, as any persistent
                // publish takes (the publisher waits while it is behind).
                let Some(writer) = broker.persister.try_reserve() else {
                    return Ok(Some(Pending::Delay {
                        msg,
                        due,
                        ticket,
                        extra,
                    }));
                };
                delay(
                    broker,
                    &cx.session.vhost.name,
                    msg,
                    due,
                    Some(writer),
                    ticket,
                    extra,
                );
                return Ok(None);
            }
        }
        if routed.queues().is_empty() {
            if mandatory {
                cx.shared.stats.unroutable_returned += 1;
                self.send_return(cx, &msg);
            } else {
                cx.shared.stats.unroutable_dropped += 1;
            }
            // Unroutable: confirmed at once (after the return, as RabbitMQ).
            if let Some(t) = ticket {
                t.settle();
            }
            return Ok(None);
        }
        cx.shared.stats.routed += 1;
        if routed.queues().iter().any(|q| q.dedups()) {
            // An ack read before this publish must reach a deduplicating
            // queue first: it may free the key this message carries.
            cx.shared.acks.flush();
        }
        // Room in every queue and at the writer, taken without waiting; or
        // none of it (what was taken is given back) and the slow path.
        let broker = &cx.session.broker;
        let mut slots: SmallVec<[&QueueHandle; 4]> = SmallVec::new();
        let mut full = false;
        for q in routed.queues() {
            match q.try_reserve() {
                Some(true) => slots.push(q),
                Some(false) => {}
                None => {
                    full = true;
                    break;
                }
            }
        }
        let stored = msg
            .stored
            .filter(|_| slots.iter().any(|q| q.stored_by_publisher()));
        let writer = match (full, stored) {
            (true, _) => None,
            (false, None) => Some(None),
            (false, Some(_)) => broker.persister.try_reserve(),
        };
        let Some(writer) = writer else {
            slots.iter().for_each(|q| q.unreserve());
            drop(slots);
            return Ok(Some(Pending::Queues {
                msg,
                routed,
                ticket,
                extra,
            }));
        };
        hand_over(broker, msg, ticket, &slots, stored, writer, extra);
        Ok(None)
    }

    /// Hand over a routed message that had to wait: wait for room in its
    /// queues and at the store writer (or for reply-to credit), then hand it
    /// over as [`Channel::route`] would have.
    pub async fn finish_publish(&mut self, cx: &mut Ctx<'_>, p: Pending) -> AmqpResult<()> {
        match p {
            Pending::Queues {
                msg,
                routed,
                ticket,
                extra,
            } => {
                hand_over_waiting(&cx.session.broker, msg, &routed, ticket, extra).await;
            }
            Pending::Delay {
                msg,
                due,
                ticket,
                extra,
            } => {
                let broker = &cx.session.broker;
                let writer = broker.persister.reserve().await;
                let vhost = &cx.session.vhost.name;
                delay(broker, vhost, msg, due, Some(writer), ticket, extra);
            }
            Pending::Reply {
                target,
                msg,
                mandatory,
                confirm,
            } => {
                let delivered = target.send_waiting(msg.clone()).await;
                self.reply_sent(cx, delivered, &msg, mandatory, confirm);
            }
            Pending::RemoteReply {
                node,
                msg,
                mandatory,
                confirm,
            } => {
                let delivered =
                    crate::replicate::remote::send_reply(&cx.session.broker, &node, &msg).await;
                self.reply_sent(cx, delivered, &msg, mandatory, confirm);
            }
        }
        Ok(())
    }

    /// `basic.return` 312 NO_ROUTE with the message.
    pub(super) fn send_return(&mut self, cx: &mut Ctx<'_>, msg: &Message) {
        cx.out.send_method(
            self.number,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: reply::NO_ROUTE,
                reply_text: short("NO_ROUTE"),
                exchange: short(msg.exchange.as_str()),
                routing_key: short(msg.routing_key.as_str()),
            })),
        );
        cx.out.put_content(self.number, msg);
    }
}

/// Hold a message published to a delayed exchange until `due` (see
/// `crate::delayed`). `writer`: a store slot, for a persistent message on
/// a durable exchange: it is stored first (with `extra` writes) and
/// confirmed after the sync. Anything else is confirmed at once and lives
/// in memory.
fn delay(
    broker: &Broker,
    vhost: &str,
    msg: MessageRef,
    due: u64,
    writer: Option<Option<OwnedSemaphorePermit>>,
    ticket: Option<Arc<ConfirmTicket>>,
    extra: Vec<MessageOp>,
) {
    if let Some(writer) = writer {
        let mut ops = crate::delayed::Delays::store_ops(&msg, due, vhost);
        ops.extend(extra);
        let done: crate::persist::Done = Box::new(move |synced| {
            if let Some(t) = ticket {
                if !synced {
                    t.nack();
                }
                t.settle();
            }
        });
        broker.persister.submit_reserved(writer, ops, done);
        broker.delayed.add(vhost, msg, due, true);
    } else {
        if !extra.is_empty() {
            broker.persister.submit_nowait(extra);
        }
        broker.delayed.add(vhost, msg, due, false);
        if let Some(t) = ticket {
            t.settle();
        }
    }
}

/// [`hand_over`] once there is room in every queue the message routes to
/// and, for a persistent one, at the store writer (waiting for it).
async fn hand_over_waiting(
    broker: &Broker,
    msg: MessageRef,
    routed: &Routed,
    ticket: Option<Arc<ConfirmTicket>>,
    extra: Vec<MessageOp>,
) {
    let mut slots: SmallVec<[&QueueHandle; 4]> = SmallVec::new();
    for q in routed.queues() {
        if q.reserve().await {
            slots.push(q);
        }
    }
    let stored = msg
        .stored
        .filter(|_| slots.iter().any(|q| q.stored_by_publisher()));
    let writer = match stored {
        Some(_) => broker.persister.reserve().await,
        None => None,
    };
    hand_over(broker, msg, ticket, &slots, stored, writer, extra);
}

/// Hand a message another node forwarded (see `queue::remote`) to queue
/// `q` of this node, as a publisher would: stored first if persistent and
/// the queue is durable; `ticket` settles once it is enqueued (a nack if
/// the queue is gone or refuses it).
pub(crate) async fn hand_to_queue(
    broker: &Broker,
    q: &QueueHandle,
    mut msg: crate::message::Message,
    ticket: Arc<ConfirmTicket>,
) {
    if !q.reserve().await {
        ticket.nack();
        ticket.settle();
        return;
    }
    let stored = (msg.persistent() && q.stored_by_publisher()).then(|| broker.next_message_id());
    msg.stored = stored;
    let writer = match stored {
        Some(_) => broker.persister.reserve().await,
        None => None,
    };
    hand_over(
        broker,
        Arc::new(msg),
        Some(ticket),
        &[q],
        stored,
        writer,
        Vec::new(),
    );
}

/// Deduplication at the exchange a message was published to: None for a
/// duplicate (to be dropped as an idempotent success); else the store
/// writes of its recorded key, if any, and the ticket is told to forget
/// the key should the publish be nacked (so the publisher's retry is not a
/// duplicate of a message that never made it).
fn admit(
    broker: &Broker,
    routed: &Routed,
    msg: &Message,
    ticket: Option<&Arc<ConfirmTicket>>,
) -> Option<Vec<MessageOp>> {
    let Some(d) = routed.dedup() else {
        return Some(Vec::new());
    };
    match d.admit(
        &msg.header,
        !routed.queues().is_empty(),
        crate::message::unix_ms(),
    ) {
        Admit::Duplicate => None,
        Admit::Pass => Some(Vec::new()),
        Admit::New { ops, forget } => {
            if let Some(t) = ticket {
                let (d, p) = (d.clone(), broker.persister.clone());
                *t.on_nack.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(move || {
                    if let Some(op) = d.forget(forget) {
                        p.submit_nowait(vec![op]);
                    }
                }));
            }
            Some(ops)
        }
    }
}

/// Hand a routed message to the queues that gave it a slot (and `writer`,
/// the store's slot, for a persistent one). `extra` store writes (a
/// deduplication key) go in the message's batch, or alone for a message
/// that is not stored. Each queue's sequence is taken
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
    extra: Vec<MessageOp>,
) {
    let seqs: SmallVec<[u64; 4]> = slots.iter().map(|q| q.take_seq()).collect();
    if stored.is_none() && !extra.is_empty() {
        broker.persister.submit_nowait(extra);
    } else if let Some(id) = stored {
        // Persistent: written once for every durable queue it reached; the
        // confirm waits for the sync too.
        let refs = slots.iter().filter(|q| q.stored_by_publisher()).count() as u32;
        let mut ops = Vec::with_capacity(refs as usize + 1);
        let meta = EntryMeta {
            enqueued_at: crate::message::unix_ms(),
            deliveries: 0,
        };
        ops.push(MessageOp::PutMessage {
            id,
            refs,
            message: msg.to_stored(),
        });
        for (q, &seq) in slots.iter().zip(&seqs) {
            if q.stored_by_publisher() {
                ops.push(MessageOp::Enqueue {
                    queue: q.id(),
                    seq,
                    id,
                    meta,
                });
                ops.extend(q.dedup_put(&msg, seq));
            }
        }
        ops.extend(extra);
        let t = ticket.clone();
        let done: crate::persist::Done = Box::new(move |synced| {
            if let Some(t) = t {
                if !synced {
                    t.nack();
                }
                t.settle();
            }
        });
        broker.persister.submit_reserved(writer, ops, done);
    }
    if slots.is_empty() {
        // Every queue it was routed to went away meanwhile.
        if let Some(t) = ticket {
            t.settle();
        }
        return;
    }
    // (The last queue takes the message and ticket without a clone.)
    let last = slots.len() - 1;
    for (i, (q, seq)) in slots.iter().zip(seqs).enumerate() {
        if i == last {
            q.send(seq, msg, ticket, true);
            break;
        }
        q.send(seq, msg.clone(), ticket.clone(), true);
    }
}

/// Largest per-message TTL RabbitMQ accepts (its timer limit, in ms).
const MAX_EXPIRY: u128 = 4_294_967_295;

/// Check an `expiration` property as RabbitMQ does (Erlang's
/// `string:to_integer`, then the timer's range), with its reasons:
/// `no_integer`, `{leftover_string,"..."}`, `{value_negative,N}`,
/// `{value_too_large,N}`.
pub(crate) fn check_expiration(e: &str) -> Result<(), String> {
    let (negative, rest) = match e.as_bytes().first() {
        Some(b'-') => (true, &e[1..]),
        Some(b'+') => (false, &e[1..]),
        _ => (false, e),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("no_integer".into());
    }
    let (number, leftover) = rest.split_at(digits);
    if !leftover.is_empty() {
        return Err(format!("{{leftover_string,\"{leftover}\"}}"));
    }
    let shown = number.trim_start_matches('0');
    let shown = if shown.is_empty() { "0" } else { shown };
    if negative && shown != "0" {
        return Err(format!("{{value_negative,-{shown}}}"));
    }
    if number.len() > 30 || number.parse::<u128>().map_or(true, |n| n > MAX_EXPIRY) {
        return Err(format!("{{value_too_large,{shown}}}"));
    }
    Ok(())
}

#[cfg(test)]
mod expiration_tests {
    use super::check_expiration;

    #[test]
    fn expirations_are_checked_as_rabbitmq_checks_them() {
        for ok in ["0", "1000", "+5", "4294967295", "007"] {
            assert_eq!(check_expiration(ok), Ok(()), "{ok}");
        }
        let err = |s: &str| check_expiration(s).unwrap_err();
        assert_eq!(err("abc"), "no_integer");
        assert_eq!(err(" 10"), "no_integer");
        assert_eq!(err(""), "no_integer");
        assert_eq!(err("-5"), "{value_negative,-5}");
        assert_eq!(err("1.5"), "{leftover_string,\".5\"}");
        assert_eq!(err("4294967296"), "{value_too_large,4294967296}");
        assert_eq!(
            err("99999999999999999999999999999999999"),
            "{value_too_large,99999999999999999999999999999999999}"
        );
    }
}

/// What [`publish_direct`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// No queue was bound to take it (dropped, as a non-mandatory publish).
    Unroutable,
    /// Every queue it was routed to has it (and, if persistent and routed
    /// to a durable queue, it is synced to disk).
    Routed,
    /// A queue refused it (`x-overflow: reject-publish`) or the store failed.
    Refused,
}

/// Publish a message made inside the broker (the management API's
/// publish), exactly as a channel in confirm mode would: routed, handed to
/// its queues, stored if persistent; returns once it is confirmed.
pub async fn publish_direct(
    broker: &Broker,
    vhost: &crate::vhost::VHost,
    msg: MessageRef,
) -> AmqpResult<Published> {
    let routed = vhost.route(&msg.exchange, &msg.routing_key, &msg.header)?;
    let c = routed.counters();
    c.publish_in
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (events, mut confirms) = tokio::sync::mpsc::unbounded_channel();
    let ticket = Arc::new(ConfirmTicket::new(events, 0, 1));
    let Some(extra) = admit(broker, &routed, &msg, Some(&ticket)) else {
        return Ok(Published::Routed); // a duplicate: an idempotent success
    };
    let delayed = routed
        .delayed()
        .and_then(|durable| Some((durable, crate::delayed::delay_of(&msg)?)));
    if let Some((durable, ms)) = delayed {
        let due = crate::message::unix_ms().saturating_add(ms);
        let writer = match durable && msg.stored.is_some() {
            true => Some(broker.persister.reserve().await),
            false => None,
        };
        delay(broker, &vhost.name, msg, due, writer, Some(ticket), extra);
    } else {
        if routed.queues().is_empty() {
            return Ok(Published::Unroutable);
        }
        c.publish_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        hand_over_waiting(broker, msg, &routed, Some(ticket), extra).await;
    }
    match confirms.recv().await {
        Some(crate::events::ConnEvent::Confirm { nack: false, .. }) => Ok(Published::Routed),
        _ => Ok(Published::Refused),
    }
}
