//! Topology methods: `exchange.declare/delete/bind/unbind` and
//! `queue.declare/bind/unbind/purge/delete`. The vhost checks and applies
//! them (durable ones are stored before the answer); this file maps the
//! methods onto it and writes the answers.

use super::{generated_name, not_from_client, Channel, Ctx, Session};
use crate::access::limits::{queue_limit_reached, queue_room};
use crate::access::{Kind, Perm};
use crate::error::{access_refused, precondition, AmqpError, AmqpResult};
use crate::exchange::Dest;
use crate::queue::QueueCmd;
use crate::vhost::{ExchangeSpec, QueueSpec};
use warren_protocol::amqp::{exchange as ex, queue as q, AMQPClass};
use warren_protocol::method::short;
use warren_protocol::reply;
use warren_protocol::types::{AMQPValue, FieldTable};

/// A binding (queue or exchange, made or removed) needs write on its
/// destination and read on its source, and, through a topic exchange,
/// topic read on its routing key.
fn check_bind(
    se: &Session,
    source: &str,
    dest_kind: Kind,
    dest: &str,
    routing_key: &str,
) -> AmqpResult<()> {
    se.check(dest_kind, dest, Perm::Write)?;
    se.check(Kind::Exchange, source, Perm::Read)?;
    se.check_topic(source, routing_key, Perm::Read)
}

/// A string argument (short or long string), as RabbitMQ's `r_arg` reads
/// exchange names from arguments.
pub(crate) fn string_arg(args: &FieldTable, key: &str) -> Option<String> {
    match args.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

impl Channel {
    pub(super) async fn on_exchange(
        &mut self,
        cx: &mut Ctx<'_>,
        m: ex::AMQPMethod,
    ) -> AmqpResult<()> {
        let v = &cx.session.vhost;
        let se = cx.session;
        let (ok, nowait) = match m {
            ex::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                if !d.passive {
                    se.check(Kind::Exchange, name, Perm::Configure)?;
                    if let Some(ae) = string_arg(&d.arguments, "alternate-exchange") {
                        if v.exchange_kind(name).is_none() {
                            se.check(Kind::Exchange, name, Perm::Read)?;
                            se.check(Kind::Exchange, &ae, Perm::Write)?;
                        }
                    }
                }
                v.declare_exchange(ExchangeSpec {
                    name: d.exchange.as_str(),
                    kind: d.kind.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: &d.arguments,
                })
                .await?;
                (ex::AMQPMethod::DeclareOk(ex::DeclareOk {}), d.nowait)
            }
            ex::AMQPMethod::Delete(d) => {
                se.check(Kind::Exchange, d.exchange.as_str(), Perm::Configure)?;
                v.delete_exchange(d.exchange.as_str(), d.if_unused).await?;
                (ex::AMQPMethod::DeleteOk(ex::DeleteOk {}), d.nowait)
            }
            ex::AMQPMethod::Bind(b) => {
                check_bind(
                    se,
                    b.source.as_str(),
                    Kind::Exchange,
                    b.destination.as_str(),
                    b.routing_key.as_str(),
                )?;
                v.set_binding(
                    true,
                    b.source.as_str(),
                    Dest::Exchange(b.destination.as_str().into()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    cx.session.conn_id,
                )
                .await?;
                (ex::AMQPMethod::BindOk(ex::BindOk {}), b.nowait)
            }
            ex::AMQPMethod::Unbind(b) => {
                check_bind(
                    se,
                    b.source.as_str(),
                    Kind::Exchange,
                    b.destination.as_str(),
                    b.routing_key.as_str(),
                )?;
                v.set_binding(
                    false,
                    b.source.as_str(),
                    Dest::Exchange(b.destination.as_str().into()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    cx.session.conn_id,
                )
                .await?;
                (ex::AMQPMethod::UnbindOk(ex::UnbindOk {}), b.nowait)
            }
            _ => return Err(not_from_client()),
        };
        if !nowait {
            cx.out.send_method(self.number, AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    /// An empty queue name means the channel's last declared queue.
    pub(super) fn queue_name(&self, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::new(reply::NOT_FOUND, "no previously declared queue"))
    }

    pub(super) async fn on_queue(&mut self, cx: &mut Ctx<'_>, m: q::AMQPMethod) -> AmqpResult<()> {
        let v = &cx.session.vhost;
        let conn = cx.session.conn_id;
        match m {
            q::AMQPMethod::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if name.is_empty() && d.passive {
                    name = self.queue_name("")?;
                }
                if name.starts_with("amq.") && !d.passive && v.queue(&name, conn).is_err() {
                    return Err(access_refused(format!(
                        "queue name '{name}' contains reserved prefix 'amq.*'"
                    )));
                }
                if name.is_empty() {
                    match string_arg(&d.arguments, "x-queue-type").as_deref() {
                        Some("quorum") => {
                            return Err(precondition(
                                "Cannot declare a server-named queue for type rabbit_quorum_queue",
                            ))
                        }
                        Some("stream") => {
                            return Err(precondition(
                                "Cannot declare a server-named queue for type rabbit_stream_queue",
                            ))
                        }
                        _ => {}
                    }
                    name = generated_name("amq.gen-");
                }
                if !d.passive {
                    let se = cx.session;
                    se.check(Kind::Queue, &name, Perm::Configure)?;
                    let limits = se.broker.access.vhost_limits(&v.name);
                    if limits.max_queues.is_some() && v.queue(&name, conn).is_err() {
                        if let Some(l) = queue_room(limits, v.queue_count()) {
                            return Err(queue_limit_reached(&name, &v.name, l));
                        }
                    }
                    if let Some(dlx) = string_arg(&d.arguments, "x-dead-letter-exchange") {
                        se.check(Kind::Queue, &name, Perm::Read)?;
                        se.check(Kind::Exchange, &dlx, Perm::Write)?;
                    }
                }
                let handle = v
                    .declare_queue(
                        QueueSpec {
                            name: &name,
                            passive: d.passive,
                            durable: d.durable,
                            exclusive: d.exclusive,
                            auto_delete: d.auto_delete,
                            arguments: &d.arguments,
                        },
                        conn,
                    )
                    .await?;
                let exclusive = &mut cx.shared.exclusive;
                if handle.info.exclusive_owner == Some(conn) && !exclusive.contains(&handle) {
                    exclusive.push(handle.clone());
                }
                self.last_queue = Some(name.clone());
                if !d.nowait {
                    let stats = handle.ask(|reply| QueueCmd::Stats { reply }).await;
                    if stats.is_none() && handle.home().is_some() {
                        return Err(crate::queue::remote::home_down(&handle.info));
                    }
                    let (messages, consumers) = stats.unwrap_or((0, 0));
                    cx.out.send_method(
                        self.number,
                        AMQPClass::Queue(q::AMQPMethod::DeclareOk(q::DeclareOk {
                            queue: short(&name),
                            message_count: messages,
                            consumer_count: consumers,
                        })),
                    );
                }
            }
            q::AMQPMethod::Bind(b) => {
                let name = self.queue_name(b.queue.as_str())?;
                let key = if b.routing_key.as_str().is_empty() && b.queue.as_str().is_empty() {
                    name.clone()
                } else {
                    b.routing_key.as_str().to_owned()
                };
                check_bind(cx.session, b.exchange.as_str(), Kind::Queue, &name, &key)?;
                let dest = Dest::Queue(name.as_str().into());
                v.set_binding(true, b.exchange.as_str(), dest, &key, &b.arguments, conn)
                    .await?;
                if !b.nowait {
                    cx.out.send_method(
                        self.number,
                        AMQPClass::Queue(q::AMQPMethod::BindOk(q::BindOk {})),
                    );
                }
            }
            q::AMQPMethod::Unbind(b) => {
                let name = self.queue_name(b.queue.as_str())?;
                let key = b.routing_key.as_str();
                check_bind(cx.session, b.exchange.as_str(), Kind::Queue, &name, key)?;
                let dest = Dest::Queue(name.as_str().into());
                v.set_binding(false, b.exchange.as_str(), dest, key, &b.arguments, conn)
                    .await?;
                cx.out.send_method(
                    self.number,
                    AMQPClass::Queue(q::AMQPMethod::UnbindOk(q::UnbindOk {})),
                );
            }
            q::AMQPMethod::Purge(p) => {
                let name = self.queue_name(p.queue.as_str())?;
                cx.session.check(Kind::Queue, &name, Perm::Read)?;
                let handle = v.queue(&name, conn)?;
                if handle.is_stream() {
                    return Err(crate::queue::stream::not_supported("queue.purge", &handle));
                }
                let n = handle
                    .ask(|reply| QueueCmd::Purge { reply })
                    .await
                    .unwrap_or(0);
                if !p.nowait {
                    cx.out.send_method(
                        self.number,
                        AMQPClass::Queue(q::AMQPMethod::PurgeOk(q::PurgeOk { message_count: n })),
                    );
                }
            }
            q::AMQPMethod::Delete(d) => {
                let name = self.queue_name(d.queue.as_str())?;
                cx.session.check(Kind::Queue, &name, Perm::Configure)?;
                let n = match v.queue(&name, conn) {
                    Ok(handle) => {
                        let n = v.delete_queue(&handle, d.if_unused, d.if_empty).await?;
                        cx.shared.exclusive.retain(|q| q != &handle);
                        n
                    }
                    Err(e) if e.code == reply::NOT_FOUND => 0,
                    Err(e) => return Err(e),
                };
                if !d.nowait {
                    cx.out.send_method(
                        self.number,
                        AMQPClass::Queue(q::AMQPMethod::DeleteOk(q::DeleteOk { message_count: n })),
                    );
                }
            }
            _ => return Err(not_from_client()),
        }
        Ok(())
    }
}
