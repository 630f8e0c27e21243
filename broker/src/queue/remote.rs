//! A queue of a cluster that lives on another node, as this node holds it:
//! a [`QueueHandle`] like any other, whose mailbox is read by a forwarding
//! actor instead of a queue. Publishes routed to it go to its home node in
//! batches (their confirms wait for the home node's); what operators and
//! declares ask (counts, purge, delete) is asked there. Consuming and
//! `basic.get` through another node are refused by the channel before they
//! get here (see `refused_here`).
//!
//! The requests are JSON, sent with the cluster's application requests
//! (`warren_cluster::ClusterNode::call_app`); the home node answers them in
//! `crate::replicate::remote`.

use super::handle::{QueueCmd, QueueStats};
use super::{QueueHandle, QueueInfo};
use crate::error::{AmqpError, AmqpResult};
use crate::events::ConfirmTicket;
use crate::message::MessageRef;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};
use warren_protocol::reply;

/// Publishes forwarded in one request, at most.
const BATCH: usize = 512;
/// Mailbox slots of a forwarding actor (as a queue's).
const PERMITS: usize = 4096;

/// Why a request to a queue's home node failed.
#[derive(Debug)]
pub enum LinkError {
    /// The home node could not be reached (down, or cut off from this one).
    Down(String),
    /// It answered with a refusal, or the exchange broke half-way.
    Failed(String),
}

/// How this node reaches the other members (the broker's cluster node).
pub trait Link: Send + Sync + 'static {
    fn call(
        &self,
        node: &str,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, LinkError>> + Send>>;
}

/// The handle of a queue that lives on node `info.home`, reached through
/// `link`.
pub fn spawn(info: QueueInfo, link: Arc<dyn Link>) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    tokio::spawn(run(info.clone(), link, mailbox, permits.clone()));
    QueueHandle::new(info, permits, tx)
}

/// "home node … is down or inaccessible", as RabbitMQ words it (404).
pub fn home_down(info: &QueueInfo) -> AmqpError {
    AmqpError::new(
        reply::NOT_FOUND,
        format!(
            "home node '{}' of {}queue '{}' in vhost '{}' is down or inaccessible",
            info.home.as_deref().unwrap_or("?"),
            if info.durable { "durable " } else { "" },
            info.name,
            info.vhost
        ),
    )
}

/// What a channel may not do with a queue that lives on another node (yet).
pub fn refused_here(q: &QueueHandle, what: &str) -> AmqpResult<()> {
    match q.home() {
        None => Ok(()),
        Some(home) => Err(AmqpError::new(
            reply::PRECONDITION_FAILED,
            format!(
                "queue '{}' in vhost '{}' lives on node '{home}': {what} through another node \
                 is not supported yet; connect to '{home}' for it",
                q.name(),
                q.info.vhost
            ),
        )),
    }
}

/// A message as a forwarded publish carries it.
pub fn message_json(m: &crate::message::Message) -> Value {
    json!({
        "x": B64.encode(m.exchange.as_str()),
        "k": B64.encode(m.routing_key.as_str()),
        "h": B64.encode(m.header.raw()),
        "b": B64.encode(&m.body),
    })
}

/// The message a forwarded publish carries (not stored yet: no store id).
pub fn message_of(v: &Value) -> Result<crate::message::Message, String> {
    let field = |k: &str| -> Result<bytes::Bytes, String> {
        let s = v
            .get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a forwarded message lacks '{k}'"))?;
        B64.decode(s)
            .map(Into::into)
            .map_err(|e| format!("a forwarded message's '{k}' is not base64: {e}"))
    };
    let stored = warren_storage::StoredMessage {
        exchange: field("x")?,
        routing_key: field("k")?,
        header: field("h")?,
        body: field("b")?,
    };
    let mut m = crate::message::Message::from_stored(0, stored)
        .ok_or("a forwarded message is not a valid message")?;
    m.stored = None;
    Ok(m)
}

/// A request about queue `info` for its home node.
fn request(info: &QueueInfo, op: &str, mut extra: Value) -> Value {
    let mut r = json!({"op": op, "vhost": info.vhost, "queue": &*info.name});
    if let (Some(o), Some(e)) = (r.as_object_mut(), extra.as_object_mut()) {
        o.append(e);
    }
    r
}

async fn run(
    info: Arc<QueueInfo>,
    link: Arc<dyn Link>,
    mut mailbox: mpsc::UnboundedReceiver<QueueCmd>,
    permits: Arc<Semaphore>,
) {
    let home: Arc<str> = info.home.clone().unwrap_or_else(|| "".into());
    let mut batch: Vec<(MessageRef, Option<Arc<ConfirmTicket>>)> = Vec::new();
    while let Some(first) = mailbox.recv().await {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                QueueCmd::Publish(p) => {
                    if p.permit {
                        permits.add_permits(1);
                    }
                    batch.push((p.msg, p.confirm));
                    if batch.len() >= BATCH {
                        forward(&info, &home, &*link, &mut batch).await;
                    }
                }
                other => {
                    // Publishes before a command reach the home node first.
                    forward(&info, &home, &*link, &mut batch).await;
                    answer(&info, &home, &link, other).await;
                }
            }
            next = mailbox.try_recv().ok();
        }
        forward(&info, &home, &*link, &mut batch).await;
    }
    // The queue was dropped here: what is left is not confirmed.
    for (_, t) in batch.drain(..) {
        if let Some(t) = t {
            t.nack();
            t.settle();
        }
    }
}

/// Send the publishes gathered so far; each confirm waits for the home
/// node's (a nack if it refused the message or could not be reached).
async fn forward(
    info: &QueueInfo,
    home: &str,
    link: &dyn Link,
    batch: &mut Vec<(MessageRef, Option<Arc<ConfirmTicket>>)>,
) {
    if batch.is_empty() {
        return;
    }
    let msgs: Vec<Value> = batch.iter().map(|(m, _)| message_json(m)).collect();
    let r = link
        .call(home, request(info, "publish", json!({"messages": msgs})))
        .await;
    let nacked: Vec<bool> = match &r {
        Ok(v) => {
            let mut n = vec![false; batch.len()];
            for i in v
                .get("nacked")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
            {
                if let Some(x) = n.get_mut(i as usize) {
                    *x = true;
                }
            }
            n
        }
        Err(e) => {
            tracing::warn!(queue = %info.name, home, error = ?e, "forwarded publishes not confirmed");
            vec![true; batch.len()]
        }
    };
    for ((_, t), nack) in batch.drain(..).zip(nacked) {
        if let Some(t) = t {
            if nack {
                t.nack();
            }
            t.settle();
        }
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Answer a command other than a publish: ask the home node what it must,
/// refuse what cannot be done through this node, ignore what concerns only
/// consumers here (there are none).
async fn answer(info: &Arc<QueueInfo>, home: &str, link: &Arc<dyn Link>, cmd: QueueCmd) {
    let ask = |op: &str, extra: Value| link.call(home, request(info, op, extra));
    match cmd {
        QueueCmd::Stats { reply } => {
            if let Ok(v) = ask("stats", json!({})).await {
                let _ = reply.send((u(&v, "messages") as u32, u(&v, "consumers") as u32));
            }
        }
        QueueCmd::Info { reply } => {
            if let Ok(v) = ask("info", json!({})).await {
                let _ = reply.send(QueueStats {
                    ready: u(&v, "ready"),
                    ready_bytes: u(&v, "ready_bytes"),
                    unacked: u(&v, "unacked"),
                    consumers: u(&v, "consumers") as u32,
                    published: u(&v, "published"),
                    delivered: u(&v, "delivered"),
                    acked: u(&v, "acked"),
                    redelivered: u(&v, "redelivered"),
                    deduplicated: v.get("deduplicated").and_then(Value::as_u64),
                    stream: None,
                });
            }
        }
        QueueCmd::Purge { reply } => {
            if let Ok(v) = ask("purge", json!({})).await {
                let _ = reply.send(u(&v, "count") as u32);
            }
        }
        QueueCmd::Delete {
            if_unused,
            if_empty,
            reply,
        } => {
            let r = match ask(
                "delete",
                json!({"if_unused": if_unused, "if_empty": if_empty}),
            )
            .await
            {
                Ok(v) => match v.get("error") {
                    Some(e) => Err(AmqpError::new(
                        u(e, "code") as u16,
                        e.get("text").and_then(Value::as_str).unwrap_or("refused"),
                    )),
                    None => Ok(u(&v, "count") as u32),
                },
                Err(LinkError::Down(_)) => Err(home_down(info)),
                Err(LinkError::Failed(why)) => Err(AmqpError::new(reply::INTERNAL_ERROR, why)),
            };
            let _ = reply.send(r);
        }
        QueueCmd::Touch => {
            let call = ask("touch", json!({}));
            tokio::spawn(async move {
                let _ = call.await;
            });
        }
        QueueCmd::Consume { reply, .. } => {
            let _ = reply.send(Err(AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!(
                    "queue '{}' in vhost '{}' lives on node '{home}': consuming through another \
                     node is not supported yet",
                    info.name, info.vhost
                ),
            )));
        }
        QueueCmd::Consumers { reply } => {
            let _ = reply.send(Vec::new());
        }
        // No consumer and no message is here: nothing to do.
        QueueCmd::Get { .. }
        | QueueCmd::Cancel { .. }
        | QueueCmd::Ack { .. }
        | QueueCmd::Reject { .. }
        | QueueCmd::ChannelClosed { .. }
        | QueueCmd::Recover { .. }
        | QueueCmd::Wake
        | QueueCmd::Reconfigure(_)
        | QueueCmd::Recovered { .. }
        | QueueCmd::StreamCommitted { .. }
        | QueueCmd::StreamRead(_)
        | QueueCmd::Paged { .. }
        | QueueCmd::Publish(_) => {}
    }
}
