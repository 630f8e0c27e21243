//! Connections, as RabbitMQ's management API serves them: listed (a
//! monitor sees all, others their own), and closed with 320 and the
//! `X-Reason` header's text.

use super::objects::node_name;
use super::{listing, no_content, Api, ApiError, ApiResult, Auth, Paging, St};
use crate::broker::{Broker, ConnInfo};
use crate::definitions::table_json;
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/connections", get(list_connections))
        .route(
            "/api/connections/{name}",
            get(get_connection).delete(close_connection),
        )
}

pub(super) fn visible_connections(auth: &Auth, b: &Broker) -> Vec<Arc<ConnInfo>> {
    b.connections()
        .into_iter()
        .filter(|c| auth.is_monitor() || c.user == auth.user)
        .collect()
}

fn connection_json(c: &ConnInfo) -> Value {
    json!({
        "name": c.name(),
        "node": node_name(),
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "user": c.user,
        "vhost": c.vhost,
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "ssl": c.tls,
        "auth_mechanism": c.auth_mechanism,
        "connected_at": c.connected_at,
        "channels": c.channels.load(std::sync::atomic::Ordering::Relaxed),
        "channel_max": c.channel_max,
        "frame_max": c.frame_max,
        "timeout": c.heartbeat,
        "state": "running",
        "client_properties": table_json(&c.client_properties),
    })
}

async fn list_connections(auth: Auth, st: St, q: Query<Paging>) -> ApiResult {
    let items = visible_connections(&auth, &st.broker)
        .iter()
        .map(|c| connection_json(c))
        .collect();
    listing(items, &q)
}

fn find_connection(auth: &Auth, b: &Broker, name: &str) -> ApiResult<Arc<ConnInfo>> {
    visible_connections(auth, b)
        .into_iter()
        .find(|c| c.name() == name)
        .ok_or_else(ApiError::not_found)
}

async fn get_connection(auth: Auth, st: St, Path(name): Path<String>) -> ApiResult {
    let c = find_connection(&auth, &st.broker, &name)?;
    Ok(Json(connection_json(&c)).into_response())
}

/// Close a connection with 320 CONNECTION_FORCED; the `X-Reason` header's
/// text is the reason, as RabbitMQ.
async fn close_connection(
    auth: Auth,
    st: St,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let c = match find_connection(&auth, &st.broker, &name) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !auth.is_admin() && c.user != auth.user {
        return ApiError::not_authorised("Not administrator user").into_response();
    }
    let reason = headers
        .get("x-reason")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("Closed via management plugin");
    tracing::info!(connection = %name, by = %auth.user, reason, "closing connection");
    c.close(
        warren_protocol::reply::CONNECTION_FORCED,
        format!("CONNECTION_FORCED - {reason}"),
    );
    no_content()
}
