//! Bindings, as RabbitMQ's management API serves them: listed (with the
//! default exchange's implicit ones), created and deleted by
//! `properties_key`, with write permission on the destination and read on
//! the source.

use super::objects::{arguments, check, exchange_name, find_queue, vhost_of, vhosts_for};
use super::{body_object, listing, no_content, Api, ApiError, ApiResult, Auth, Paging, St};
use crate::access::{Kind, Perm};
use crate::definitions::table_json;
use crate::exchange::{Binding, Dest};
use crate::vhost::VHost;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use warren_protocol::types::FieldTable;

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(|a, s, q| list_bindings(a, s, q, None)))
        .route(
            "/api/bindings/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_bindings(a, s, q, Some(v))),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}",
            post(post_binding).get(bindings_between),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}/{props}",
            get(get_binding).delete(delete_binding),
        )
}

/// RabbitMQ's `properties_key`: the routing key (`~` for an empty one),
/// and with arguments a digest of them after a `~`.
fn props_key(b: &Binding) -> String {
    let key = if b.key.is_empty() && b.args.inner().is_empty() {
        "~".to_owned()
    } else {
        b.key.clone()
    };
    if b.args.inner().is_empty() {
        return key;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(table_json(&b.args).to_string().as_bytes());
    let short: String = digest.iter().take(8).map(|x| format!("{x:02x}")).collect();
    format!("{key}~{short}")
}

fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (dest, kind) = match &b.dest {
        Dest::Queue(q) => (q.to_string(), "queue"),
        Dest::Exchange(x) => (x.to_string(), "exchange"),
    };
    json!({
        "source": source, "vhost": vhost, "destination": dest, "destination_type": kind,
        "routing_key": b.key, "arguments": table_json(&b.args), "properties_key": props_key(b),
    })
}

/// Every binding of a vhost, RabbitMQ's implicit default-exchange bindings
/// (one per queue) first.
fn bindings_of(v: &VHost) -> Vec<Value> {
    let mut out: Vec<Value> = v
        .queues()
        .iter()
        .map(|q| {
            binding_json(
                &v.name,
                "",
                &Binding {
                    dest: Dest::Queue(q.name().into()),
                    key: q.name().to_owned(),
                    args: FieldTable::default(),
                },
            )
        })
        .collect();
    for x in v.exchanges() {
        for b in &x.bindings {
            out.push(binding_json(&v.name, &x.name, b));
        }
    }
    out
}

async fn list_bindings(auth: Auth, st: St, q: Query<Paging>, vhost: Option<String>) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts_for(&auth, &st.broker, vhost.as_deref())? {
        items.extend(bindings_of(&v));
    }
    listing(items, &q)
}

async fn queue_bindings(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    find_queue(&v, &name)?;
    let items: Vec<Value> = bindings_of(&v)
        .into_iter()
        .filter(|b| b["destination_type"] == "queue" && b["destination"] == name.as_str())
        .collect();
    Ok(Json(items).into_response())
}

fn dest_kind(kind: &str) -> ApiResult<&'static str> {
    match kind {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(ApiError::not_found()),
    }
}

async fn bindings_between(
    auth: Auth,
    st: St,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let kind = dest_kind(&kind)?;
    let source = exchange_name(&source).to_owned();
    let items: Vec<Value> = bindings_of(&v)
        .into_iter()
        .filter(|b| {
            b["source"] == source.as_str()
                && b["destination_type"] == kind
                && b["destination"] == dest.as_str()
        })
        .collect();
    Ok(Json(items).into_response())
}

async fn post_binding(
    auth: Auth,
    st: St,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let kind = dest_kind(&kind)?;
    let body = body_object(&body)?;
    let key = super::text_field(&body, "routing_key")?.unwrap_or_default();
    let args = arguments(&body)?;
    let b = &st.broker;
    let dest_res = if kind == "queue" {
        Kind::Queue
    } else {
        Kind::Exchange
    };
    check(b, &auth, &vhost, dest_res, &dest, Perm::Write)?;
    check(b, &auth, &vhost, Kind::Exchange, &source, Perm::Read)?;
    let d = if kind == "queue" {
        Dest::Queue(dest.as_str().into())
    } else {
        Dest::Exchange(dest.as_str().into())
    };
    let binding = Binding {
        dest: d.clone(),
        key: key.clone(),
        args: args.clone(),
    };
    v.set_binding(true, exchange_name(&source), d, &key, &args, 0)
        .await?;
    let location = format!(
        "/api/bindings/{}/e/{}/{}/{}/{}",
        enc(&vhost),
        enc(&source),
        if kind == "queue" { "q" } else { "e" },
        enc(&dest),
        enc(&props_key(&binding))
    );
    let mut r = axum::http::StatusCode::CREATED.into_response();
    if let Ok(h) = axum::http::HeaderValue::from_str(&location) {
        r.headers_mut().insert(axum::http::header::LOCATION, h);
    }
    Ok(r)
}

/// Percent-encode a path segment.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn get_binding(
    auth: Auth,
    st: St,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let kind = dest_kind(&kind)?;
    let source = exchange_name(&source).to_owned();
    bindings_of(&v)
        .into_iter()
        .find(|b| {
            b["source"] == source.as_str()
                && b["destination_type"] == kind
                && b["destination"] == dest.as_str()
                && b["properties_key"] == props.as_str()
        })
        .map(|b| Json(b).into_response())
        .ok_or_else(ApiError::not_found)
}

async fn delete_binding(
    auth: Auth,
    st: St,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = vhost_of(&auth, &st.broker, &vhost)?;
    let kind = dest_kind(&kind)?;
    let source = exchange_name(&source).to_owned();
    let x = v.exchange(&source).ok_or_else(ApiError::not_found)?;
    let b = x
        .bindings
        .iter()
        .find(|b| {
            let (name, k) = match &b.dest {
                Dest::Queue(q) => (q.as_ref(), "queue"),
                Dest::Exchange(e) => (e.as_ref(), "exchange"),
            };
            name == dest && k == kind && props_key(b) == props
        })
        .cloned()
        .ok_or_else(ApiError::not_found)?;
    let br = &st.broker;
    let dest_res = if kind == "queue" {
        Kind::Queue
    } else {
        Kind::Exchange
    };
    check(br, &auth, &vhost, dest_res, &dest, Perm::Write)?;
    check(br, &auth, &vhost, Kind::Exchange, &source, Perm::Read)?;
    v.set_binding(false, &source, b.dest, &b.key, &b.args, 0)
        .await?;
    Ok(no_content())
}
