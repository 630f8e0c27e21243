//! A cluster's quorum queues, as RabbitMQ 4's API manages them
//! (administrators): add and remove a queue's members
//! (`POST /api/queues/quorum/{vhost}/{name}/replicas/add` and `/delete`
//! with `{"node": …}`, as `rabbitmq-queues add_member` / `delete_member`),
//! and move leaders so every node leads its share (`POST
//! /api/rebalance/queues`, as `rabbitmq-queues rebalance quorum`).

use super::objects::{find_queue, vhost_of};
use super::{body_object, required, Api, ApiError, ApiResult, Auth, St};
use crate::broker::Broker;
use axum::body::Bytes;
use axum::extract::Path;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn routes() -> Router<Api> {
    Router::new()
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/add",
            post(|a, s, p, b| member(a, s, p, b, true)),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/delete",
            post(|a, s, p, b| member(a, s, p, b, false)),
        )
        .route("/api/rebalance/queues", post(rebalance))
}

/// This node's Raft id, on a clustered node.
fn me(b: &Broker) -> ApiResult<u64> {
    b.cluster.as_ref().map(|m| m.node().id()).ok_or_else(|| {
        ApiError::bad_request(
            "this node is not clustered: its quorum queues have no members to change",
        )
    })
}

async fn member(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
    add: bool,
) -> ApiResult {
    auth.require_admin()?;
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let q = find_queue(&v, &name)?;
    let node = required(&body_object(&body)?, "node")?;
    let me = me(&st.broker)?;
    let Some(group) = q.info.quorum else {
        return Err(ApiError::bad_request(format!(
            "queue '{name}' in vhost '{vhost}' is not a quorum queue"
        )));
    };
    crate::queue::quorum::change_members(me, group, add, node)
        .await
        .map_err(ApiError::refused_change)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// One quorum queue as the rebalance sees it.
struct Led {
    vhost: String,
    name: String,
    leader: String,
    members: Vec<String>,
}

/// The leader and members of quorum queue `name`: this node's front knows
/// them if it is a member, else the queue's first listed member is asked.
async fn led(b: &Broker, me: u64, vhost: &str, name: &str, group: u64) -> Option<Led> {
    let mut st = crate::queue::quorum::status(me, group).await.map(|s| {
        (
            s.leader.map(|l| l.name),
            s.members.into_iter().map(|m| m.name).collect::<Vec<_>>(),
        )
    });
    if st.is_none() {
        let node = b.cluster.as_ref()?.node();
        let def = node.get(&crate::replicate::topology::queue_key(vhost, name))?;
        let first = def["quorum"]["members"][0].as_str()?.to_owned();
        let req = json!({"op": "quorum_status", "vhost": vhost, "queue": name});
        let v = crate::replicate::remote::call_from(b, &first, req)
            .await
            .ok()?;
        st = Some((
            v["leader"].as_str().map(str::to_owned),
            serde_json::from_value(v["members"].clone()).unwrap_or_default(),
        ));
    }
    let (leader, members) = st?;
    Some(Led {
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        leader: leader?,
        members,
    })
}

/// Move quorum queue leaders so no node leads more than its share: a queue
/// led by a node over its share asks the member that leads the fewest to
/// stand for election. Answers the moves asked for (each takes effect
/// within moments; one whose member's log lags does not happen).
async fn rebalance(auth: Auth, st: St) -> ApiResult {
    auth.require_admin()?;
    let b = &st.broker;
    let me = me(b)?;
    let mut queues = Vec::new();
    for v in b.vhosts() {
        for q in v.queues() {
            if let Some(group) = q.info.quorum {
                if let Some(l) = led(b, me, &v.name, q.name(), group).await {
                    queues.push((l, group));
                }
            }
        }
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (l, _) in &queues {
        for m in &l.members {
            counts.entry(m.clone()).or_default();
        }
        *counts.entry(l.leader.clone()).or_default() += 1;
    }
    let nodes = counts.len().max(1);
    let share = queues.len().div_ceil(nodes);
    let mut moves = Vec::new();
    queues.sort_by(|a, b| (&a.0.vhost, &a.0.name).cmp(&(&b.0.vhost, &b.0.name)));
    for (l, _) in &queues {
        let from = counts.get(&l.leader).copied().unwrap_or(0);
        if from <= share {
            continue;
        }
        let Some(to) = l
            .members
            .iter()
            .filter(|m| **m != l.leader)
            .min_by_key(|m| counts.get(*m).copied().unwrap_or(0))
            .cloned()
        else {
            continue;
        };
        if counts.get(&to).copied().unwrap_or(0) + 1 >= from {
            continue;
        }
        let req = json!({"op": "quorum_elect", "vhost": l.vhost, "queue": l.name});
        if crate::replicate::remote::call_from(b, &to, req)
            .await
            .is_err()
        {
            continue;
        }
        *counts.entry(l.leader.clone()).or_default() -= 1;
        *counts.entry(to.clone()).or_default() += 1;
        moves.push(json!({"vhost": l.vhost, "name": l.name, "from": l.leader, "to": to}));
    }
    Ok(Json(Value::Array(moves)).into_response())
}
