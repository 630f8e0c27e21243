//! The home node's side of queues reached through other nodes (see
//! `crate::queue::remote`): it answers their forwarded publishes and
//! questions with its own queues, and it is how this node's forwarding
//! actors reach the others.

use super::SyncSlot;
use crate::broker::Broker;
use crate::events::{ConfirmTicket, ConnEvent};
use crate::queue::remote::{message_of, Link, LinkError};
use crate::queue::{QueueCmd, QueueHandle};
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// How long a forwarded request may take (a publish waits for the home
/// node's store sync, as a local confirm does).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// This node's link to the others, through whichever cluster node it runs
/// now (a node that joins another cluster starts a new one).
pub(crate) struct ClusterLink(pub(crate) SyncSlot);

impl Link for ClusterLink {
    fn call(
        &self,
        node: &str,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, LinkError>> + Send>> {
        let sync = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        let node = node.to_owned();
        Box::pin(async move {
            let sync =
                sync.ok_or_else(|| LinkError::Down("this node is joining a cluster".into()))?;
            match sync.cluster.call_app(&node, request, CALL_TIMEOUT).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(why)) => Err(LinkError::Failed(why)),
                Err(warren_cluster::CallError::Connect(e)) => Err(LinkError::Down(e.to_string())),
                Err(warren_cluster::CallError::Rpc(e)) => Err(LinkError::Failed(e.to_string())),
            }
        })
    }
}

/// Answers other members' requests about this node's queues. Set up before
/// the broker exists (the cluster node starts first), so it finds the
/// broker through `broker` once that is made.
#[derive(Default)]
pub struct Handler {
    pub(crate) broker: OnceLock<Weak<Broker>>,
}

impl warren_cluster::AppHandler for Handler {
    fn handle(
        &self,
        _from: warren_cluster::NodeInfo,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>> {
        let broker = self.broker.get().and_then(Weak::upgrade);
        Box::pin(async move {
            let b = broker.ok_or("this node is starting or stopping")?;
            handle(&b, request).await
        })
    }
}

/// The local (not forwarded) queue a request names.
fn local_queue(b: &Broker, r: &Value) -> Result<QueueHandle, String> {
    let s = |k: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the request lacks '{k}'"))
    };
    let (vhost, name) = (s("vhost")?, s("queue")?);
    b.vhost(vhost)
        .and_then(|v| v.find_queue(name))
        .filter(|q| q.home().is_none())
        .ok_or_else(|| format!("no queue '{name}' in vhost '{vhost}' on this node"))
}

async fn handle(b: &Arc<Broker>, r: Value) -> Result<Value, String> {
    let op = r.get("op").and_then(Value::as_str).unwrap_or_default();
    let q = local_queue(b, &r);
    match op {
        "publish" => {
            let msgs = r
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("a publish without messages")?;
            let Ok(q) = q else {
                // Deleted meanwhile: every message is refused (the
                // publisher's confirm is a nack, so it may route again).
                return Ok(json!({"nacked": (0..msgs.len()).collect::<Vec<_>>()}));
            };
            let (events, mut confirms) = tokio::sync::mpsc::unbounded_channel();
            for (i, m) in msgs.iter().enumerate() {
                let ticket = Arc::new(ConfirmTicket::new(events.clone(), 0, i as u64));
                match message_of(m) {
                    Ok(msg) => {
                        crate::channel::publish::hand_to_queue(b, &q, msg, ticket).await;
                    }
                    Err(why) => {
                        tracing::warn!(error = %why, "refused a forwarded message");
                        ticket.nack();
                        ticket.settle();
                    }
                }
            }
            drop(events);
            let mut nacked = Vec::new();
            while let Some(ev) = confirms.recv().await {
                match ev {
                    ConnEvent::Confirm {
                        seq, nack: true, ..
                    } => nacked.push(seq),
                    ConnEvent::Confirms { seqs, .. } => {
                        nacked.extend(seqs.into_iter().filter(|(_, n)| *n).map(|(s, _)| s));
                    }
                    _ => {}
                }
            }
            Ok(json!({ "nacked": nacked }))
        }
        "stats" => {
            let (m, c) = q?
                .ask(|reply| QueueCmd::Stats { reply })
                .await
                .ok_or("the queue is gone")?;
            Ok(json!({"messages": m, "consumers": c}))
        }
        "info" => {
            let s = q?
                .ask(|reply| QueueCmd::Info { reply })
                .await
                .ok_or("the queue is gone")?;
            Ok(json!({
                "ready": s.ready, "ready_bytes": s.ready_bytes, "unacked": s.unacked,
                "consumers": s.consumers, "published": s.published, "delivered": s.delivered,
                "acked": s.acked, "redelivered": s.redelivered, "deduplicated": s.deduplicated,
            }))
        }
        "purge" => {
            let n = q?.ask(|reply| QueueCmd::Purge { reply }).await.unwrap_or(0);
            Ok(json!({ "count": n }))
        }
        "delete" => {
            let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(false);
            let Ok(q) = q else {
                return Ok(json!({"count": 0}));
            };
            let r = q
                .ask(|reply| QueueCmd::Delete {
                    if_unused: flag("if_unused"),
                    if_empty: flag("if_empty"),
                    reply,
                })
                .await
                .unwrap_or(Ok(0));
            Ok(match r {
                Ok(n) => json!({ "count": n }),
                Err(e) => json!({"error": {"code": e.code, "text": e.text}}),
            })
        }
        "touch" => {
            if let Ok(q) = q {
                q.tell(QueueCmd::Touch);
            }
            Ok(json!({}))
        }
        other => Err(format!("unknown request '{other}'")),
    }
}
