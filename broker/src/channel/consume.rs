//! Consuming: `basic.consume`, `basic.cancel`, `basic.get`, `basic.recover`
//! and `basic.qos`, and the deliveries and cancellations queues send back
//! through the connection's mailbox.
//!
//! Credit: each consumer has an in-flight window ([`FLOW_WINDOW`]) of
//! deliveries sent to its connection and not yet written; writing one here
//! gives a unit back, and the queue is woken when the window reopens. The
//! prefetch (per consumer, or per channel with `global`) is counted by the
//! queue and the channel and comes back on settlement (`ack.rs`).

use super::ack::Delivery;
use super::reply_to::REPLY_TO;
use super::{generated_name, not_from_client, Channel, Ctx};
use crate::access::{Kind, Perm};
use crate::error::{not_found, precondition, AmqpError, AmqpResult};
use crate::message::Message;
use crate::queue::{Consumer, QueueCmd, QueueHandle, FLOW_WINDOW};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use warren_protocol::amqp::{basic, AMQPClass};
use warren_protocol::method::{self, short};
use warren_protocol::reply;

/// A consumer as its channel sees it.
pub struct ChanConsumer {
    pub queue: QueueHandle,
    pub no_ack: bool,
    /// `basic.cancel` sent to the queue; the reply is still to come.
    pub cancelling: bool,
    /// Whether the client asked for no cancel-ok.
    pub cancel_nowait: bool,
    /// Deliveries sent by the queue and not yet written here.
    pub in_flight: Arc<AtomicU32>,
}

/// A delivery from a queue to one of this channel's consumers.
pub struct Deliver<'m> {
    pub chan_key: u64,
    pub tag: &'m str,
    pub msg: &'m Message,
    pub redelivered: bool,
    pub seq: u64,
}

/// Take a delivery off its consumer's in-flight window (whether or not
/// its channel still exists); true if that reopens a full window.
pub fn took_in_flight(in_flight: &AtomicU32) -> bool {
    took_in_flight_n(in_flight, 1)
}

/// [`took_in_flight`] for `n` deliveries at once.
pub fn took_in_flight_n(in_flight: &AtomicU32, n: u32) -> bool {
    let before = in_flight.fetch_sub(n, Ordering::AcqRel);
    before >= FLOW_WINDOW && before.saturating_sub(n) < FLOW_WINDOW
}

impl Channel {
    pub(super) async fn on_basic(
        &mut self,
        cx: &mut Ctx<'_>,
        m: basic::AMQPMethod,
    ) -> AmqpResult<()> {
        match m {
            basic::AMQPMethod::Consume(cm) => self.consume(cx, cm).await,
            basic::AMQPMethod::Cancel(cm) => {
                self.cancel(cx, cm.consumer_tag.as_str().into(), cm.nowait);
                Ok(())
            }
            basic::AMQPMethod::Get(g) => self.get(cx, g.queue.as_str(), g.no_ack).await,
            basic::AMQPMethod::Recover(basic::Recover { requeue }) => {
                self.recover(requeue)?;
                cx.out.send_method(
                    self.number,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                self.recover(requeue)
            }
            basic::AMQPMethod::CancelOk(_) => Ok(()),
            _ => Err(not_from_client()),
        }
    }

    /// `basic.qos`: prefetch per consumer (for consumers created from now
    /// on) or, with `global`, for the whole channel.
    pub(super) fn qos(
        &mut self,
        cx: &mut Ctx<'_>,
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    ) -> AmqpResult<()> {
        if prefetch_size != 0 {
            return Err(AmqpError::new(
                reply::NOT_IMPLEMENTED,
                format!("prefetch_size!=0 ({prefetch_size})"),
            ));
        }
        if global {
            self.credit
                .limit
                .store(prefetch_count as u32, Ordering::Release);
            self.wake_consumers();
        } else {
            self.prefetch = prefetch_count;
        }
        cx.out.send_method(
            self.number,
            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        );
        Ok(())
    }

    async fn consume(&mut self, cx: &mut Ctx<'_>, cm: basic::Consume) -> AmqpResult<()> {
        let name = self.queue_name(cm.queue.as_str())?;
        let tag: Arc<str> = if cm.consumer_tag.as_str().is_empty() {
            generated_name("amq.ctag-").into()
        } else {
            cm.consumer_tag.as_str().into()
        };
        if self.consumers.contains_key(&tag) || self.reply.as_ref().is_some_and(|r| r.tag == tag) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        if name == REPLY_TO {
            return self.consume_replies(cx, tag, cm.no_ack, cm.nowait);
        }
        cx.session.check(Kind::Queue, &name, Perm::Read)?;
        let vhost = &cx.session.vhost;
        let handle = vhost.queue(&name, cx.session.conn_id)?;
        let timeout = match cm.arguments.inner().get("x-consumer-timeout") {
            None => None,
            Some(v) => match crate::fields::as_int(v) {
                Some(ms) if ms > 0 && ms <= u32::MAX as i128 => Some(ms as u64),
                _ => {
                    return Err(precondition(format!(
                        "invalid arg 'x-consumer-timeout' for consumer: {v:?} is not a timeout in milliseconds (1 to 4294967295)"
                    )))
                }
            },
        };
        let priority = match cm.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => match crate::fields::as_int(v).and_then(|p| i32::try_from(p).ok()) {
                Some(p) => p,
                None => {
                    return Err(precondition(format!(
                        "invalid arg 'x-priority' for consumer: {v:?}"
                    )))
                }
            },
        };
        let stream = if handle.is_stream() {
            if cm.no_ack {
                return Err(crate::queue::stream::not_supported(
                    "automatic acknowledgement",
                    &handle,
                ));
            }
            if self.prefetch == 0 {
                return Err(precondition(format!(
                    "consumer prefetch count is not set for 'queue '{name}' in vhost '{}''",
                    vhost.name
                )));
            }
            if timeout.is_some() {
                return Err(precondition(format!(
                    "invalid arg 'x-consumer-timeout' for queue '{name}' in vhost '{}': stream consumers have no timeout (acknowledgements only return credit)",
                    vhost.name
                )));
            }
            Some(Box::new(crate::queue::stream::parse_consume(
                &name,
                &vhost.name,
                &cm.arguments,
                crate::message::unix_ms(),
            )?))
        } else {
            let args = cm.arguments.inner();
            if let Some(arg) = crate::queue::stream::STREAM_CONSUMER_ARGS
                .iter()
                .find(|a| args.contains_key(**a))
            {
                let kind = match crate::queue::args::QueueArgs::parse(&handle.info.arguments).quorum
                {
                    true => "rabbit_quorum_queue",
                    false => "rabbit_classic_queue",
                };
                return Err(precondition(format!(
                    "invalid arg '{arg}' for queue '{name}' in vhost '{}' of queue type {kind}",
                    vhost.name
                )));
            }
            None
        };
        let in_flight = Arc::new(AtomicU32::new(0));
        let consumer = Consumer {
            tag: tag.clone(),
            conn_id: cx.session.conn_id,
            chan_key: self.key,
            channel: self.number,
            no_ack: cm.no_ack,
            exclusive: cm.exclusive,
            prefetch: self.prefetch as u32,
            channel_credit: self.credit.clone(),
            in_flight: in_flight.clone(),
            conn: cx.session.events.clone(),
            priority,
            unacked: 0,
            order: 0,
            timeout,
            cancel_notify: cx.session.caps.consumer_cancel_notify,
            stream,
        };
        match handle
            .ask(|reply| QueueCmd::Consume {
                consumer: Box::new(consumer),
                reply,
            })
            .await
        {
            Some(r) => r?,
            None => return Err(not_found("queue", &name, &vhost.name)),
        }
        self.use_queue(&handle);
        self.consumers.insert(
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
            cx.out.send_method(
                self.number,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    /// `basic.cancel`: the queue removes the consumer and answers with
    /// `CancelOk` after its last delivery to it; cancel-ok goes out then.
    fn cancel(&mut self, cx: &mut Ctx<'_>, tag: Arc<str>, nowait: bool) {
        if self.reply.as_ref().is_some_and(|r| r.tag == tag) {
            if let Some(r) = self.reply.take() {
                r.unregister(&cx.session.broker);
            }
            self.send_cancel_ok(cx, &tag, nowait);
            return;
        }
        match self.consumers.get_mut(&tag) {
            Some(cons) if !cons.cancelling => {
                cons.cancelling = true;
                cons.cancel_nowait = nowait;
                let asked = cons.queue.tell(QueueCmd::Cancel {
                    chan_key: self.key,
                    tag: tag.clone(),
                });
                if !asked {
                    // The queue is gone: nothing more will come for it.
                    self.consumers.remove(&tag);
                    self.send_cancel_ok(cx, &tag, nowait);
                }
            }
            Some(_) => {}
            None => self.send_cancel_ok(cx, &tag, nowait),
        }
    }

    fn send_cancel_ok(&self, cx: &mut Ctx<'_>, tag: &str, nowait: bool) {
        if !nowait {
            cx.out.send_method(
                self.number,
                AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                    consumer_tag: short(tag),
                })),
            );
        }
    }

    /// The queue removed a consumer this channel cancelled.
    pub fn cancel_done(&mut self, cx: &mut Ctx<'_>, tag: &str) {
        if let Some(cons) = self.consumers.remove(tag) {
            self.send_cancel_ok(cx, tag, cons.cancel_nowait);
        }
    }

    /// The queue went away under a consumer: a cancel-ok if the client was
    /// cancelling anyway, else a server-sent `basic.cancel` if the client
    /// announced `consumer_cancel_notify`.
    pub fn cancelled_by_queue(&mut self, cx: &mut Ctx<'_>, tag: &str) {
        let Some(cons) = self.consumers.remove(tag) else {
            return;
        };
        if cons.cancelling {
            self.send_cancel_ok(cx, tag, cons.cancel_nowait);
        } else if cx.session.caps.consumer_cancel_notify {
            cx.out.send_method(
                self.number,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: short(tag),
                    nowait: true,
                })),
            );
        }
    }

    /// The queue cancelled a consumer whose delivery timed out and took its
    /// unacked messages back (`returned`, sequences in queue `queue`): they
    /// leave this channel's unacked set (their prefetch credit comes back;
    /// a late ack of one is an unknown delivery tag), and the client hears
    /// basic.cancel.
    pub fn timed_out(&mut self, cx: &mut Ctx<'_>, tag: &str, queue: u64, returned: &[u64]) {
        let gone = self
            .unacked
            .remove_where(|d| d.queue.id() == queue && returned.contains(&d.seq));
        let credit = gone.iter().filter(|d| d.holds_credit).count() as u32;
        if self.credit.release(credit) {
            self.wake_consumers();
        }
        self.cancelled_by_queue(cx, tag);
    }

    /// Write a delivery to one of this channel's consumers. `reopened`: the
    /// consumer's in-flight window was full before this one was taken off
    /// (see [`took_in_flight`]): its queue is woken.
    pub fn deliver(&mut self, cx: &mut Ctx<'_>, d: Deliver<'_>, reopened: bool) {
        if self.key != d.chan_key || self.closing {
            return;
        }
        let Some(cons) = self.consumers.get(d.tag) else {
            return;
        };
        let (queue, no_ack) = (cons.queue.clone(), cons.no_ack);
        let stats = &mut cx.shared.stats;
        if no_ack {
            stats.delivered_consume_auto_ack += 1;
        } else {
            stats.delivered_consume_manual_ack += 1;
        }
        stats.redelivered += d.redelivered as u64;
        if reopened {
            queue.tell(QueueCmd::Wake);
        }
        let dtag = self.take_tag();
        if !no_ack {
            self.unacked.insert(
                dtag,
                Delivery {
                    queue,
                    seq: d.seq,
                    holds_credit: true,
                },
            );
        }
        method::put_deliver(
            cx.out.buf(),
            self.number,
            d.tag.as_bytes(),
            dtag,
            d.redelivered,
            d.msg.exchange.as_bytes(),
            d.msg.routing_key.as_bytes(),
        );
        cx.out.put_content(self.number, d.msg);
    }

    /// `basic.get`: one message, or get-empty.
    async fn get(&mut self, cx: &mut Ctx<'_>, queue: &str, no_ack: bool) -> AmqpResult<()> {
        let name = self.queue_name(queue)?;
        cx.session.check(Kind::Queue, &name, Perm::Read)?;
        let handle = cx.session.vhost.queue(&name, cx.session.conn_id)?;
        if handle.is_stream() {
            return Err(crate::queue::stream::not_supported("basic.get", &handle));
        }
        let chan_key = self.key;
        let got = handle
            .ask(|reply| QueueCmd::Get {
                chan_key,
                no_ack,
                conn: Some(cx.session.events.clone()),
                reply,
            })
            .await
            .flatten();
        let Some(got) = got else {
            cx.shared.stats.get_empty += 1;
            cx.out.send_method(
                self.number,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let stats = &mut cx.shared.stats;
        if no_ack {
            stats.delivered_get_auto_ack += 1;
        } else {
            stats.delivered_get_manual_ack += 1;
        }
        stats.redelivered += got.redelivered as u64;
        let tag = self.take_tag();
        if !no_ack {
            self.use_queue(&handle);
            self.unacked.insert(
                tag,
                Delivery {
                    queue: handle,
                    seq: got.seq,
                    holds_credit: false,
                },
            );
        }
        let msg = &got.msg;
        method::put_get_ok(
            cx.out.buf(),
            self.number,
            tag,
            got.redelivered,
            msg.exchange.as_bytes(),
            msg.routing_key.as_bytes(),
            got.remaining,
        );
        cx.out.put_content(self.number, msg);
        Ok(())
    }

    /// `basic.recover requeue=true`: every unacked message of the channel
    /// goes back to its queue, to be redelivered.
    fn recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "requeue=false"));
        }
        let unacked = self.unacked.take_all();
        let credit = unacked.iter().filter(|(_, d)| d.holds_credit).count() as u32;
        self.credit.release(credit);
        let mut queues: Vec<QueueHandle> = Vec::new();
        for (_, d) in unacked {
            if !queues.iter().any(|q| q == &d.queue) {
                queues.push(d.queue);
            }
        }
        for q in queues {
            q.tell(QueueCmd::Recover { chan_key: self.key });
        }
        self.wake_consumers();
        Ok(())
    }
}
