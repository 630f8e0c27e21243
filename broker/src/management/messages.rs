//! Publishing and getting messages over the API, as RabbitMQ's
//! `POST /api/exchanges/{vhost}/{name}/publish` and
//! `POST /api/queues/{vhost}/{name}/get` (for development and operations,
//! not for throughput). A publish goes the way a confirmed AMQP publish
//! goes (routed, stored if persistent, answered once confirmed); a get
//! takes messages as a channel would and then acknowledges, requeues or
//! rejects them all as `ackmode` says.

use super::{body_object, Api, ApiError, ApiResult, Auth, St};
use crate::access::{Kind, Perm};
use crate::channel::publish::{publish_direct, Published};
use crate::definitions::{json_table, table_json};
use crate::message::Message;
use crate::queue::{Got, QueueCmd, Seqs};
use axum::body::Bytes;
use axum::extract::Path;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use warren_protocol::amqp::basic::AMQPProperties;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;
use warren_protocol::types::ShortString;

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route("/api/queues/{vhost}/{name}/get", post(get))
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Message properties from RabbitMQ's JSON (`delivery_mode`, `headers`, ...).
fn properties(p: &Map<String, Value>) -> ApiResult<AMQPProperties> {
    let mut props = AMQPProperties::default();
    let text = |k: &str, v: &Value| -> ApiResult<ShortString> {
        v.as_str()
            .map(ShortString::from)
            .ok_or_else(|| ApiError::bad_request(format!("property {k} must be a string, not {v}")))
    };
    let int = |k: &str, v: &Value, max: u64| -> ApiResult<u64> {
        v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            ApiError::bad_request(format!(
                "property {k} must be an integer up to {max}, not {v}"
            ))
        })
    };
    for (k, v) in p {
        props = match k.as_str() {
            "content_type" => props.with_content_type(text(k, v)?),
            "content_encoding" => props.with_content_encoding(text(k, v)?),
            "headers" => match v {
                Value::Object(m) => {
                    props.with_headers(json_table(m).map_err(ApiError::bad_request)?)
                }
                _ => return Err(ApiError::bad_request("property headers must be an object")),
            },
            "delivery_mode" => props.with_delivery_mode(int(k, v, 2)? as u8),
            "priority" => props.with_priority(int(k, v, 255)? as u8),
            "correlation_id" => props.with_correlation_id(text(k, v)?),
            "reply_to" => props.with_reply_to(text(k, v)?),
            "expiration" => props.with_expiration(text(k, v)?),
            "message_id" => props.with_message_id(text(k, v)?),
            "timestamp" => props.with_timestamp(int(k, v, u64::MAX)?),
            "type" => props.with_type(text(k, v)?),
            "user_id" => props.with_user_id(text(k, v)?),
            "app_id" => props.with_app_id(text(k, v)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown message property '{other}'"
                )))
            }
        };
    }
    Ok(props)
}

/// RabbitMQ's JSON for a message's properties.
fn properties_json(h: &ContentHeader) -> Value {
    let Some(p) = h.properties() else {
        return json!({});
    };
    let mut m = Map::new();
    let mut s = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v.as_str()));
        }
    };
    s("content_type", p.content_type());
    s("content_encoding", p.content_encoding());
    s("correlation_id", p.correlation_id());
    s("reply_to", p.reply_to());
    s("expiration", p.expiration());
    s("message_id", p.message_id());
    s("type", p.kind());
    s("user_id", p.user_id());
    s("app_id", p.app_id());
    if let Some(v) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(v));
    }
    if let Some(v) = p.priority() {
        m.insert("priority".into(), json!(v));
    }
    if let Some(v) = p.timestamp() {
        m.insert("timestamp".into(), json!(v));
    }
    if let Some(t) = p.headers() {
        m.insert("headers".into(), table_json(t));
    }
    Value::Object(m)
}

async fn publish(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let b = &st.broker;
    auth.vhost(b, &vhost)?;
    let v = b.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let exchange = if name == "amq.default" {
        ""
    } else {
        name.as_str()
    };
    if v.exchange_kind(exchange).is_none() {
        return Err(ApiError::not_found());
    }
    b.access
        .check(&auth.user, &vhost, Kind::Exchange, exchange, Perm::Write)?;
    let body = body_object(&body)?;
    let routing_key = super::text_field(&body, "routing_key")?.unwrap_or_default();
    let payload = super::required(&body, "payload")?;
    let payload = match super::text_field(&body, "payload_encoding")?.as_deref() {
        None | Some("string") => payload.into_bytes(),
        Some("base64") => B64
            .decode(payload.as_bytes())
            .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be string or base64, not '{other}'"
            )))
        }
    };
    if payload.len() as u64 > b.config.max_message_size {
        return Err(ApiError::bad_request(format!(
            "message size {} is larger than the configured maximum {}",
            payload.len(),
            b.config.max_message_size
        )));
    }
    let props = match body.get("properties") {
        None | Some(Value::Null) => AMQPProperties::default(),
        Some(Value::Object(p)) => properties(p)?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "properties must be an object, not {other}"
            )))
        }
    };
    if let Some(u) = props.user_id() {
        let impersonator = b
            .access
            .snapshot()
            .users
            .get(&auth.user)
            .is_some_and(|x| x.has_tag("impersonator"));
        if u.as_str() != auth.user && !impersonator {
            return Err(ApiError::bad_request(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                u.as_str(),
                auth.user
            )));
        }
    }
    if let Some(e) = props.expiration() {
        crate::channel::publish::check_expiration(e.as_str()).map_err(|why| {
            ApiError::bad_request(format!("invalid expiration '{}': {why}", e.as_str()))
        })?;
    }
    let header = ContentHeader::from_properties(props, payload.len() as u64)
        .map_err(|e| ApiError::bad_request(format!("bad properties: {e}")))?;
    let short = |s: &str| {
        ShortStr::from_bytes(bytes::Bytes::copy_from_slice(s.as_bytes()))
            .ok_or_else(|| ApiError::bad_request(format!("'{s}' is longer than 255 bytes")))
    };
    let stored = header.is_persistent().then(|| b.next_message_id());
    let msg = Arc::new(Message {
        exchange: short(exchange)?,
        routing_key: short(&routing_key)?,
        header,
        body: payload.into(),
        stored,
    });
    let outcome = publish_direct(b, &v, msg).await?;
    if outcome == Published::Refused {
        return Err(ApiError::bad_request(
            "the message was refused (a queue is full, or the store failed)",
        ));
    }
    b.metrics
        .received
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({"routed": outcome == Published::Routed})).into_response())
}

async fn get(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let b = &st.broker;
    auth.vhost(b, &vhost)?;
    let v = b.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let q = v.find_queue(&name).ok_or_else(ApiError::not_found)?;
    b.access
        .check(&auth.user, &vhost, Kind::Queue, &name, Perm::Read)?;
    let body = body_object(&body)?;
    let count = match body.get("count") {
        None => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("count must be 1 to 1000, not {v}")))?,
    };
    let ackmode = super::required(&body, "ackmode")?;
    let (ack, requeue) = match ackmode.as_str() {
        "ack_requeue_true" | "reject_requeue_true" => (false, true),
        "ack_requeue_false" => (true, false),
        "reject_requeue_false" => (false, false),
        other => return Err(ApiError::bad_request(format!("unknown ackmode '{other}'"))),
    };
    let base64_only = match super::text_field(&body, "encoding")?.as_deref() {
        None | Some("auto") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding must be auto or base64, not '{other}'"
            )))
        }
    };
    let truncate = body
        .get("truncate")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    // Taken as by a channel of our own, then settled all at once.
    let chan_key = b.next_chan_key();
    let mut got: Vec<Got> = Vec::new();
    for _ in 0..count {
        match q
            .ask(|reply| QueueCmd::Get {
                chan_key,
                no_ack: false,
                conn: None,
                reply,
            })
            .await
            .flatten()
        {
            Some(g) => got.push(g),
            None => break,
        }
    }
    let seqs: Seqs = got.iter().map(|g| g.seq).collect();
    if !seqs.is_empty() {
        q.tell(if ack {
            QueueCmd::Ack { chan_key, seqs }
        } else {
            QueueCmd::Reject {
                chan_key,
                seqs,
                requeue,
            }
        });
    }
    // This "channel" is done (a queue on another node forgets it).
    q.tell(QueueCmd::ChannelClosed { chan_key });
    let items: Vec<Value> = got
        .iter()
        .map(|g| {
            let body = &g.msg.body[..truncate.unwrap_or(g.msg.body.len()).min(g.msg.body.len())];
            let (payload, encoding) = match (base64_only, std::str::from_utf8(body)) {
                (false, Ok(s)) => (s.to_owned(), "string"),
                _ => (B64.encode(body), "base64"),
            };
            json!({
                "payload_bytes": g.msg.body.len(),
                "redelivered": g.redelivered,
                "exchange": g.msg.exchange.as_str(),
                "routing_key": g.msg.routing_key.as_str(),
                "message_count": g.remaining,
                "properties": properties_json(&g.msg.header),
                "payload": payload,
                "payload_encoding": encoding,
            })
        })
        .collect();
    Ok(Json(items).into_response())
}
