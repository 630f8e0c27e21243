//! Health checks, as RabbitMQ's `/api/health/checks/*` (what load
//! balancers and Kubernetes probes call): 200 `{"status": "ok"}` when the
//! check passes, 503 `{"status": "failed", "reason": ...}` when it fails.

use super::objects::node_name;
use super::{Api, ApiResult, Auth, St};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<Api> {
    Router::new()
        .route(
            "/api/health/checks/alarms",
            get(|a, s| alarms(a, s, "in the cluster")),
        )
        .route(
            "/api/health/checks/local-alarms",
            get(|a, s| alarms(a, s, "on the node")),
        )
        .route("/api/health/checks/virtual-hosts", get(virtual_hosts))
        .route(
            "/api/health/checks/port-listener/{port}",
            get(port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(protocol_listener),
        )
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(|_a: Auth| async {
                // One node, no quorum queues: never critical.
                Json(json!({"status": "ok", "reason": "single node cluster"}))
            }),
        )
}

fn answer(ok: bool, body: Value) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn alarms(_auth: Auth, st: St, scope: &'static str) -> ApiResult {
    let a = st.broker.alarms.state();
    let node = node_name();
    let on: Vec<Value> = [("memory", a.memory), ("disk", a.disk)]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(r, _)| json!({"node": node, "resource": r}))
        .collect();
    Ok(if on.is_empty() {
        answer(true, json!({"status": "ok"}))
    } else {
        answer(
            false,
            json!({"status": "failed", "reason": format!("There are alarms in effect {scope}"), "alarms": on}),
        )
    })
}

async fn virtual_hosts(_auth: Auth, st: St) -> ApiResult {
    // A vhost access control knows but the broker does not serve is down.
    let known: Vec<String> = st.broker.access.snapshot().vhosts.keys().cloned().collect();
    let down: Vec<&String> = known
        .iter()
        .filter(|v| st.broker.vhost(v).is_none())
        .collect();
    Ok(if down.is_empty() {
        answer(true, json!({"status": "ok"}))
    } else {
        answer(
            false,
            json!({"status": "failed", "reason": "Some virtual hosts are down", "virtual-hosts": down}),
        )
    })
}

/// The listeners as (protocol, port).
fn listeners(st: &St) -> Vec<(&'static str, u16)> {
    let l = &st.broker.listen_addrs;
    [
        ("amqp", l.amqp),
        ("amqp/ssl", l.amqps),
        ("http", l.http),
        ("http/prometheus", l.prometheus),
    ]
    .into_iter()
    .filter_map(|(p, a)| a.map(|a| (p, a.port())))
    .collect()
}

async fn port_listener(_auth: Auth, st: St, Path(port): Path<String>) -> ApiResult {
    let Ok(port) = port.parse::<u16>() else {
        return Err(super::ApiError::bad_request(format!(
            "'{port}' is not a port number"
        )));
    };
    let all = listeners(&st);
    Ok(if all.iter().any(|(_, p)| *p == port) {
        answer(true, json!({"status": "ok", "port": port}))
    } else {
        let ports: Vec<u16> = all.iter().map(|(_, p)| *p).collect();
        answer(
            false,
            json!({"status": "failed", "reason": "No active listener", "missing": port, "ports": ports}),
        )
    })
}

async fn protocol_listener(_auth: Auth, st: St, Path(protocol): Path<String>) -> ApiResult {
    let all = listeners(&st);
    Ok(if all.iter().any(|(p, _)| *p == protocol) {
        answer(true, json!({"status": "ok", "protocol": protocol}))
    } else {
        let protocols: Vec<&str> = all.iter().map(|(p, _)| *p).collect();
        answer(
            false,
            json!({"status": "failed", "reason": "No active listener", "missing": protocol, "protocols": protocols}),
        )
    })
}
