//! Channels and consumers, as RabbitMQ's management API lists them. A
//! connection describes its own channels when asked (a message to its
//! mailbox, answered between two batches of its work); a queue lists its
//! consumers the same way. Nothing is locked for a listing.

use super::objects::node_name;
use super::{listing, Api, ApiError, ApiResult, Auth, Paging, St};
use crate::broker::{Broker, ConnInfo};
use crate::events::{ChannelInfo, ConnEvent};
use crate::queue::QueueCmd;
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/channels", get(|a, s, q| list_channels(a, s, q, None)))
        .route(
            "/api/vhosts/{vhost}/channels",
            get(|a, s, q, Path(v): Path<String>| list_channels(a, s, q, Some(v))),
        )
        .route("/api/channels/{name}", get(get_channel))
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route(
            "/api/consumers",
            get(|a, s, q| list_consumers(a, s, q, None)),
        )
        .route(
            "/api/consumers/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_consumers(a, s, q, Some(v))),
        )
}

/// How long a busy connection has to describe its channels.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The channels of `c` (none if it does not answer in time).
async fn channels_of(c: &ConnInfo) -> Vec<ChannelInfo> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if c.events.send(ConnEvent::Describe { reply: tx }).is_err() {
        return vec![];
    }
    tokio::time::timeout(ASK_TIMEOUT, rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

fn visible(auth: &Auth, b: &Broker, vhost: Option<&str>) -> ApiResult<Vec<Arc<ConnInfo>>> {
    if let Some(v) = vhost {
        auth.vhost(b, v)?;
    }
    Ok(b.connections()
        .into_iter()
        .filter(|c| auth.is_monitor() || c.user == auth.user)
        .filter(|c| vhost.is_none_or(|v| c.vhost == v))
        .collect())
}

fn channel_json(c: &ConnInfo, ch: &ChannelInfo) -> Value {
    json!({
        "name": format!("{} ({})", c.name(), ch.number),
        "number": ch.number,
        "node": node_name(),
        "user": c.user,
        "vhost": c.vhost,
        "state": "running",
        "consumer_count": ch.consumers,
        "messages_unacknowledged": ch.unacked,
        "prefetch_count": ch.prefetch,
        "global_prefetch_count": ch.global_prefetch,
        "confirm": ch.confirm,
        "transactional": ch.transactional,
        "connection_details": {
            "name": c.name(),
            "peer_host": c.peer.ip().to_string(),
            "peer_port": c.peer.port(),
        },
    })
}

async fn all_channels(conns: &[Arc<ConnInfo>]) -> Vec<Value> {
    let mut out = Vec::new();
    for c in conns {
        for ch in channels_of(c).await {
            out.push(channel_json(c, &ch));
        }
    }
    out
}

async fn list_channels(auth: Auth, st: St, q: Query<Paging>, vhost: Option<String>) -> ApiResult {
    let conns = visible(&auth, &st.broker, vhost.as_deref())?;
    listing(all_channels(&conns).await, &q)
}

async fn get_channel(auth: Auth, st: St, Path(name): Path<String>) -> ApiResult {
    let conns = visible(&auth, &st.broker, None)?;
    all_channels(&conns)
        .await
        .into_iter()
        .find(|c| c["name"] == name.as_str())
        .map(|c| Json(c).into_response())
        .ok_or_else(ApiError::not_found)
}

async fn connection_channels(auth: Auth, st: St, Path(name): Path<String>) -> ApiResult {
    let conns: Vec<Arc<ConnInfo>> = visible(&auth, &st.broker, None)?
        .into_iter()
        .filter(|c| c.name() == name)
        .collect();
    if conns.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Json(all_channels(&conns).await).into_response())
}

async fn list_consumers(auth: Auth, st: St, q: Query<Paging>, vhost: Option<String>) -> ApiResult {
    let b = &st.broker;
    if let Some(v) = &vhost {
        auth.vhost(b, v)?;
    }
    let conns: HashMap<u64, Arc<ConnInfo>> =
        b.connections().into_iter().map(|c| (c.id, c)).collect();
    let mut items = Vec::new();
    for v in b.vhosts() {
        if vhost.as_ref().is_some_and(|w| w != &v.name) || !auth.sees_vhost(b, &v.name) {
            continue;
        }
        for queue in v.queues() {
            let cs = queue
                .ask(|reply| QueueCmd::Consumers { reply })
                .await
                .unwrap_or_default();
            for c in cs {
                let Some(conn) = conns.get(&c.conn_id) else {
                    continue; // its connection is closing
                };
                if !auth.is_monitor() && conn.user != auth.user {
                    continue;
                }
                items.push(json!({
                    "consumer_tag": &*c.tag,
                    "queue": {"name": queue.name(), "vhost": v.name},
                    "channel_details": {
                        "name": format!("{} ({})", conn.name(), c.channel),
                        "number": c.channel,
                        "connection_name": conn.name(),
                        "peer_host": conn.peer.ip().to_string(),
                        "peer_port": conn.peer.port(),
                        "user": conn.user,
                        "node": node_name(),
                    },
                    "ack_required": c.ack_required,
                    "exclusive": c.exclusive,
                    "prefetch_count": c.prefetch,
                    "arguments": if c.priority != 0 { json!({"x-priority": c.priority}) } else { json!({}) },
                    "active": c.active,
                    "activity_status": if c.active { "up" } else { "waiting" },
                    // The timeout in force (consumer's, queue's, policy's
                    // or the broker's), null for none.
                    "consumer_timeout": c.timeout,
                    // Stream consumers: the next offset and how far
                    // behind the end it is (the names RabbitMQ's stream
                    // plugin lists its own consumers with).
                    "offset": c.stream.map(|(o, _)| o),
                    "offset_lag": c.stream.map(|(_, l)| l),
                }));
            }
        }
    }
    listing(items, &q)
}
