//! The overview, nodes, queues and exchanges, as RabbitMQ's management API
//! serves them (bindings and connections have files of their own). What a user may see and do follows its tags
//! and its permissions, as over AMQP: declaring needs configure on the
//! object, binding write on the destination and read on the source,
//! purging read, deleting configure; a refusal is 401 with RabbitMQ's
//! AMQP refusal text.

use super::{
    body_object, created, listing, no_content, Api, ApiError, ApiResult, Auth, Paging, St,
};
use crate::access::{Kind, Perm};
use crate::broker::{Broker, ConnInfo};
use crate::definitions::{json_table, table_json};
use crate::policy::Target;
use crate::queue::{QueueCmd, QueueHandle, QueueStats};
use crate::vhost::{ExchangeSpec, QueueSpec, VHost};
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use warren_protocol::types::FieldTable;

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/queues", get(|a, s, q| list_queues(a, s, q, None)))
        .route(
            "/api/queues/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_queues(a, s, q, Some(v))),
        )
        .route(
            "/api/queues/{vhost}/{name}",
            get(get_queue).put(put_queue).delete(delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/contents", delete(purge_queue))
        .route(
            "/api/exchanges",
            get(|a, s, q| list_exchanges(a, s, q, None)),
        )
        .route(
            "/api/exchanges/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_exchanges(a, s, q, Some(v))),
        )
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(get_exchange).put(put_exchange).delete(delete_exchange),
        )
}

/// The node's name, as RabbitMQ's `rabbit@host`.
pub fn node_name() -> String {
    crate::config::node_name().to_owned()
}

/// The vhost, after checking the user may see it.
pub(super) fn vhost_of(auth: &Auth, b: &Broker, name: &str) -> ApiResult<Arc<VHost>> {
    auth.vhost(b, name)?;
    b.vhost(name).ok_or_else(ApiError::not_found)
}

/// The vhosts a listing covers: one (checked), or every one the user sees.
pub(super) fn vhosts_for(auth: &Auth, b: &Broker, one: Option<&str>) -> ApiResult<Vec<Arc<VHost>>> {
    match one {
        Some(v) => Ok(vec![vhost_of(auth, b, v)?]),
        None => Ok(b
            .vhosts()
            .into_iter()
            .filter(|v| auth.sees_vhost(b, &v.name))
            .collect()),
    }
}

pub(super) fn check(
    b: &Broker,
    auth: &Auth,
    vhost: &str,
    kind: Kind,
    name: &str,
    perm: Perm,
) -> ApiResult<()> {
    b.access
        .check(&auth.user, vhost, kind, name, perm)
        .map_err(ApiError::from)
}

// --------------------------------------------------------------- overview

pub async fn overview(auth: Auth, st: St) -> ApiResult {
    let b = &st.broker;
    let vhosts = vhosts_for(&auth, b, None)?;
    let (mut queues, mut exchanges) = (0usize, 0usize);
    let (mut ready, mut unacked, mut consumers) = (0u64, 0u64, 0u64);
    for v in &vhosts {
        exchanges += v.exchange_count();
        for q in v.queues() {
            queues += 1;
            let s = stats(&q).await;
            ready += s.ready;
            unacked += s.unacked;
            consumers += s.consumers as u64;
        }
    }
    let conns: Vec<Arc<ConnInfo>> = super::connections::visible_connections(&auth, b);
    let channels: u64 = conns
        .iter()
        .map(|c| c.channels.load(std::sync::atomic::Ordering::Relaxed) as u64)
        .sum();
    let node = node_name();
    let mut listeners = Vec::new();
    if let Some(a) = b.listen_addrs.amqp {
        listeners.push(json!({"node": node, "protocol": "amqp", "ip_address": a.ip().to_string(), "port": a.port()}));
    }
    if let Some(a) = b.listen_addrs.amqps {
        listeners.push(json!({"node": node, "protocol": "amqp/ssl", "ip_address": a.ip().to_string(), "port": a.port()}));
    }
    if let Some(a) = b.listen_addrs.http {
        listeners.push(json!({"node": node, "protocol": "http", "ip_address": a.ip().to_string(), "port": a.port()}));
    }
    let (message_stats, churn_rates) = st.rates.overview(b);
    Ok(Json(json!({
        "message_stats": message_stats,
        "churn_rates": churn_rates,
        "statistics_interval_ms": super::rates::INTERVAL.as_millis() as u64,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "rabbitmq_version": super::RABBITMQ_API_VERSION,
        "management_version": super::RABBITMQ_API_VERSION,
        "cluster_name": node,
        "node": node,
        "rates_mode": "basic",
        "exchange_types": crate::exchange::TYPES.iter().map(|t| json!({"name": t.name, "enabled": true})).collect::<Vec<_>>(),
        "listeners": listeners,
        "object_totals": {
            "connections": conns.len(), "channels": channels, "exchanges": exchanges,
            "queues": queues, "consumers": consumers,
        },
        "queue_totals": {
            "messages": ready + unacked, "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
    }))
    .into_response())
}

/// The nodes, as RabbitMQ's `/api/nodes`: this one with memory and disk
/// against their limits, alarms and file descriptors; in a cluster, every
/// member too, `running` if it answered an authenticated hello on its
/// cluster port just now. Warren adds `metadata_leader` (the member that
/// leads the metadata Raft group) and, for this node, its `raft` view.
pub async fn nodes(_auth: Auth, st: St) -> ApiResult {
    Ok(Json(Value::Array(nodes_json(&st.broker).await)).into_response())
}

/// The `/api/nodes` entries, this node first.
async fn nodes_json(b: &Broker) -> Vec<Value> {
    let a = &b.alarms;
    let alarms = a.state();
    let (fd_used, fd_total) = crate::prometheus::fds().unwrap_or((0, 0));
    let mut me = json!({
        "name": node_name(),
        "type": "disc",
        "running": true,
        "mem_used": a.rss(),
        "mem_limit": a.memory_limit(),
        "mem_alarm": alarms.memory,
        "disk_free": a.disk_free(),
        "disk_free_limit": a.disk_free_limit(),
        "disk_free_alarm": alarms.disk,
        "fd_used": fd_used,
        "fd_total": fd_total,
    });
    let Some(c) = b.cluster.as_ref().map(|m| m.node()) else {
        return vec![me];
    };
    let status = c.status();
    me["name"] = json!(status.me.name);
    me["cluster_address"] = json!(status.me.addr);
    me["metadata_leader"] = json!(status.leader_id == Some(status.id));
    me["raft"] = json!({
        "role": format!("{:?}", status.role).to_lowercase(),
        "term": status.term,
        "leader": status.leader.as_ref().map(|l| l.name.clone()),
        "last_log_index": status.last_log_index,
        "last_applied": status.last_applied,
        "snapshot_index": status.snapshot_index,
        "bootstrap_error": status.bootstrap_error,
    });
    // The other members, probed at once.
    let mut probes = tokio::task::JoinSet::new();
    for (i, m) in status.members.iter().enumerate() {
        if m.name != status.me.name {
            let (c, addr) = (c.clone(), m.addr.clone());
            probes.spawn(async move { (i, c.probe(&addr).await.is_ok()) });
        }
    }
    let mut running = vec![false; status.members.len()];
    while let Some(r) = probes.join_next().await {
        if let Ok((i, up)) = r {
            running[i] = up;
        }
    }
    let mut out = vec![me];
    for (m, up) in status.members.iter().zip(running) {
        if m.name == status.me.name {
            continue;
        }
        out.push(json!({
            "name": m.name,
            "type": "disc",
            "running": up,
            "cluster_address": m.addr,
            "metadata_leader": status.leader_id == Some(m.id()),
        }));
    }
    out
}

/// One node of `/api/nodes` (404 if it is not a member).
pub async fn node(_auth: Auth, st: St, Path(name): Path<String>) -> ApiResult {
    let all = nodes_json(&st.broker).await;
    match all.into_iter().find(|n| n["name"] == json!(name)) {
        Some(n) => Ok(Json(n).into_response()),
        None => Err(ApiError::not_found()),
    }
}

/// Remove a member from the cluster (`warrenctl forget_cluster_node`; Warren's,
/// RabbitMQ has it in its CLI only). As RabbitMQ, a node does not forget itself:
/// ask another member. 204; 404 for a name that is not a member; 400 when this
/// node is not clustered or it is the last member; 503 without a reachable leader.
pub async fn forget_node(auth: Auth, st: St, Path(name): Path<String>) -> ApiResult {
    auth.require_admin()?;
    let Some(c) = st.broker.cluster.as_ref().map(|m| m.node()) else {
        return Err(ApiError::bad_request("this node is not clustered"));
    };
    if name == c.info().name {
        return Err(ApiError::bad_request(format!(
            "{name} cannot forget itself: run forget_cluster_node on another member"
        )));
    }
    if !c.status().members.iter().any(|m| m.name == name) {
        return Err(ApiError::not_found());
    }
    match c.remove_member(&name).await {
        Ok(_) => Ok(axum::http::StatusCode::NO_CONTENT.into_response()),
        Err(e @ warren_cluster::ClusterError::Timeout(_)) => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// Join the cluster of the node at `peer` (its cluster address), at run
/// time: `warrenctl join_cluster HOST:PORT` (Warren's; RabbitMQ has it in
/// its CLI only). 204 once this node is a member; 400 when it cannot (not
/// clustered, in a cluster of several already, the peer in none); 503 when
/// the cluster did not take it in time.
pub async fn join_cluster(auth: Auth, st: St, body: Bytes) -> ApiResult {
    auth.require_admin()?;
    let body = super::body_object(&body)?;
    let peer = super::required(&body, "peer")?;
    st.broker
        .join_cluster(&peer)
        .await
        .map_err(ApiError::refused_change)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

// ----------------------------------------------------------------- queues

pub(super) async fn stats(q: &QueueHandle) -> QueueStats {
    q.ask(|reply| QueueCmd::Info { reply })
        .await
        .unwrap_or_default()
}

/// A quorum queue's group as this node sees it: leader, members, term
/// (None on a node outside the group).
fn quorum_view(
    b: &crate::broker::Broker,
    q: &QueueHandle,
) -> Option<warren_cluster::ClusterStatus> {
    let group = q.info.quorum?;
    b.cluster.as_ref()?.node().group(group).map(|g| g.status())
}

async fn queue_json(
    b: &crate::broker::Broker,
    rates: &super::rates::Rates,
    v: &VHost,
    q: &QueueHandle,
) -> Value {
    let got = q.ask(|reply| QueueCmd::Info { reply }).await;
    let group = quorum_view(b, q);
    // A queue on another node that cannot be asked is down, as RabbitMQ
    // shows a queue whose node is.
    let state = match (&got, q.home()) {
        (None, Some(_)) => "down",
        _ => "running",
    };
    let leader = group
        .as_ref()
        .and_then(|g| g.leader.as_ref().map(|l| l.name.clone()));
    let s = got.unwrap_or_default();
    let policies = v.policies();
    let applied = policies.applied(Target::queue(&q.info.arguments), q.name());
    let i = &q.info;
    json!({
        "name": q.name(),
        "vhost": v.name,
        "durable": i.durable,
        "auto_delete": i.auto_delete,
        "exclusive": i.exclusive_owner.is_some(),
        "arguments": table_json(&i.arguments),
        // A quorum queue's node is its leader's, as in RabbitMQ.
        // (null while it has no leader, or on a node outside its group).
        "node": match (&leader, q.info.quorum) {
            (Some(l), _) => Some(l.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(q.home().map_or_else(node_name, str::to_owned)),
        },
        // Quorum queues (RabbitMQ's fields; Warren adds the Raft term).
        "leader": leader,
        "members": group.as_ref().map(|g| g.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>()),
        "raft_term": group.as_ref().map(|g| g.term),
        "type": match Target::queue(&i.arguments) {
            Target::QuorumQueue => "quorum",
            Target::Stream => "stream",
            _ => "classic",
        },
        "state": state,
        "messages": s.ready + s.unacked,
        "messages_ready": s.ready,
        "messages_unacknowledged": s.unacked,
        "message_bytes_ready": s.ready_bytes,
        "consumers": s.consumers,
        "policy": applied.policy.map(|p| p.name.clone()),
        "operator_policy": applied.operator.map(|p| p.name.clone()),
        "effective_policy_definition": applied.effective_definition(),
        "message_stats": rates.queue(q.id(), &s),
        // Warren's: duplicates dropped (x-message-deduplication queues).
        "messages_deduplicated": s.deduplicated,
        // Streams (Warren's fields; RabbitMQ 3.10 shows none of these): the
        // last offset appended, the first kept, the segments kept.
        "committed_offset": s.stream.and_then(|t| t.last),
        "first_offset": s.stream.and_then(|t| t.first),
        "segments": s.stream.map(|t| t.segments),
    })
}

async fn list_queues(auth: Auth, st: St, q: Query<Paging>, vhost: Option<String>) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts_for(&auth, &st.broker, vhost.as_deref())? {
        for h in v.queues() {
            items.push(queue_json(&st.broker, &st.rates, &v, &h).await);
        }
    }
    listing(items, &q)
}

pub(super) fn find_queue(v: &VHost, name: &str) -> ApiResult<QueueHandle> {
    v.find_queue(name).ok_or_else(ApiError::not_found)
}

async fn get_queue(auth: Auth, st: St, Path((vhost, name)): Path<(String, String)>) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let q = find_queue(&v, &name)?;
    Ok(Json(queue_json(&st.broker, &st.rates, &v, &q).await).into_response())
}

pub(super) fn flag(body: &Map<String, Value>, key: &str, default: bool) -> ApiResult<bool> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        // rabbitmqadmin v1 sends "true" / "false" as strings.
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be true or false, not {other}"
        ))),
    }
}

pub(super) fn arguments(body: &Map<String, Value>) -> ApiResult<FieldTable> {
    match body.get("arguments") {
        None | Some(Value::Null) => Ok(FieldTable::default()),
        Some(Value::Object(m)) => json_table(m).map_err(ApiError::bad_request),
        Some(other) => Err(ApiError::bad_request(format!(
            "arguments must be an object, not {other}"
        ))),
    }
}

async fn put_queue(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let body = body_object(&body)?;
    if flag(&body, "exclusive", false)? {
        return Err(ApiError::bad_request(
            "an exclusive queue belongs to a connection: declare it over AMQP",
        ));
    }
    if name.is_empty() || name.starts_with("amq.") {
        return Err(ApiError::bad_request(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    // Flags left out are false, as in RabbitMQ's API.
    let durable = flag(&body, "durable", false)?;
    let auto_delete = flag(&body, "auto_delete", false)?;
    let args = arguments(&body)?;
    let b = &st.broker;
    check(b, &auth, &vhost, Kind::Queue, &name, Perm::Configure)?;
    let new = find_queue(&v, &name).is_err();
    if new {
        let limits = b.access.vhost_limits(&vhost);
        if let Some(l) = crate::access::limits::queue_room(limits, v.queue_count()) {
            return Err(ApiError::bad_request(
                crate::access::limits::queue_limit_reached(&name, &vhost, l).text,
            ));
        }
    }
    if let Some(dlx) = args
        .inner()
        .get("x-dead-letter-exchange")
        .and_then(crate::fields::as_string)
    {
        check(b, &auth, &vhost, Kind::Queue, &name, Perm::Read)?;
        check(b, &auth, &vhost, Kind::Exchange, &dlx, Perm::Write)?;
    }
    v.declare_queue(
        QueueSpec {
            name: &name,
            passive: false,
            durable,
            exclusive: false,
            auto_delete,
            arguments: &args,
        },
        0,
    )
    .await?;
    Ok(created(new))
}

#[derive(serde::Deserialize, Default)]
struct DeleteQuery {
    #[serde(rename = "if-unused")]
    if_unused: Option<bool>,
    #[serde(rename = "if-empty")]
    if_empty: Option<bool>,
}

async fn delete_queue(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let q = find_queue(&v, &name)?;
    check(
        &st.broker,
        &auth,
        &vhost,
        Kind::Queue,
        &name,
        Perm::Configure,
    )?;
    v.delete_queue(
        &q,
        dq.if_unused.unwrap_or(false),
        dq.if_empty.unwrap_or(false),
    )
    .await?;
    Ok(no_content())
}

async fn purge_queue(auth: Auth, st: St, Path((vhost, name)): Path<(String, String)>) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let q = find_queue(&v, &name)?;
    check(&st.broker, &auth, &vhost, Kind::Queue, &name, Perm::Read)?;
    q.ask(|reply| QueueCmd::Purge { reply })
        .await
        .ok_or_else(ApiError::not_found)?;
    Ok(no_content())
}

// -------------------------------------------------------------- exchanges

fn exchange_json(
    rates: &super::rates::Rates,
    vhost: &str,
    x: &crate::vhost::ExchangeView,
    v: &VHost,
) -> Value {
    let policies = v.policies();
    let applied = policies.applied(Target::Exchange, &x.name);
    json!({
        "name": x.name,
        "vhost": vhost,
        "type": x.kind,
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_json(&x.arguments),
        "user_who_performed_action": "",
        "policy": applied.policy.map(|p| p.name.clone()),
        "message_stats": rates.exchange(vhost, x),
        // Warren's: duplicates dropped (deduplicating exchanges only).
        "messages_deduplicated": x.deduplicated,
    })
}

async fn list_exchanges(auth: Auth, st: St, q: Query<Paging>, vhost: Option<String>) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts_for(&auth, &st.broker, vhost.as_deref())? {
        for x in v.exchanges() {
            items.push(exchange_json(&st.rates, &v.name, &x, &v));
        }
    }
    listing(items, &q)
}

/// The default exchange is named `amq.default` in paths.
pub(super) fn exchange_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

async fn get_exchange(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let name = exchange_name(&name);
    let x = v.exchange(name).ok_or_else(ApiError::not_found)?;
    Ok(Json(exchange_json(&st.rates, &vhost, &x, &v)).into_response())
}

async fn put_exchange(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let body = body_object(&body)?;
    let kind = super::required(&body, "type")?;
    if crate::exchange::kind(&kind).is_none() {
        return Err(ApiError::bad_request(format!(
            "unknown exchange type '{kind}'"
        )));
    }
    let durable = flag(&body, "durable", false)?;
    let auto_delete = flag(&body, "auto_delete", false)?;
    let internal = flag(&body, "internal", false)?;
    let args = arguments(&body)?;
    let b = &st.broker;
    check(b, &auth, &vhost, Kind::Exchange, &name, Perm::Configure)?;
    if let Some(ae) = args
        .inner()
        .get("alternate-exchange")
        .and_then(crate::fields::as_string)
    {
        check(b, &auth, &vhost, Kind::Exchange, &name, Perm::Read)?;
        check(b, &auth, &vhost, Kind::Exchange, &ae, Perm::Write)?;
    }
    let new = v.exchange_kind(&name).is_none();
    v.declare_exchange(ExchangeSpec {
        name: &name,
        kind: &kind,
        passive: false,
        durable,
        auto_delete,
        internal,
        arguments: &args,
    })
    .await?;
    Ok(created(new))
}

async fn delete_exchange(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    if v.exchange_kind(&name).is_none() {
        return Err(ApiError::not_found());
    }
    check(
        &st.broker,
        &auth,
        &vhost,
        Kind::Exchange,
        &name,
        Perm::Configure,
    )?;
    v.delete_exchange(&name, dq.if_unused.unwrap_or(false))
        .await?;
    Ok(no_content())
}
