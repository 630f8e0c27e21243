//! Users, vhosts, permissions, topic permissions and definitions, as
//! RabbitMQ's management API serves them (policies and limits are in
//! `policies`). Every change is stored (synced) before the answer.

use super::{
    body_object, created, listing, no_content, required, text_field, Api, ApiError, ApiResult,
    Auth, Paging, St,
};
use crate::access::{self, password::Algorithm, Limits};
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/api/users", get(list_users))
        .route(
            "/api/users/{user}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{user}/permissions", get(user_permissions))
        .route(
            "/api/users/{user}/topic-permissions",
            get(user_topic_permissions),
        )
        .route("/api/vhosts", get(list_vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(get_vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(vhost_topic_permissions),
        )
        .route("/api/permissions", get(list_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(get_permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/topic-permissions", get(list_topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(get_topic_permission)
                .put(put_topic_permission)
                .delete(delete_topic_permission),
        )
        .route(
            "/api/definitions",
            get(get_definitions).post(post_definitions),
        )
}

pub async fn whoami(auth: Auth) -> Json<Value> {
    Json(json!({"name": auth.user, "tags": auth.tags}))
}

/// A change to access control, stored before it returns; a refusal is 400
/// (503 when the cluster cannot take it now).
pub(super) async fn change<T: Send + 'static>(
    st: &St,
    f: impl FnOnce(&mut access::State, &mut Vec<warren_storage::RecordOp>) -> Result<T, String>
        + Send
        + 'static,
) -> ApiResult<T> {
    st.broker
        .change_access(f)
        .await
        .map_err(ApiError::refused_change)
}

/// `tags` as RabbitMQ takes them: a list, or a comma-separated string.
fn tags_of(body: &Map<String, Value>) -> ApiResult<Vec<String>> {
    match body.get("tags") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::bad_request(format!("a tag must be a string, not {t}"))
                })
            })
            .collect(),
        Some(other) => Err(ApiError::bad_request(format!(
            "tags must be a list or a string, not {other}"
        ))),
    }
}

// ------------------------------------------------------------------ users

fn user_json(u: &access::User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": u.algorithm.name(),
        "tags": u.tags,
        "limits": limits_json(&u.limits),
    })
}

pub(super) fn limits_json(l: &Limits) -> Value {
    Value::Object(
        l.pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect(),
    )
}

async fn list_users(auth: Auth, st: St, q: Query<Paging>) -> ApiResult {
    auth.require_admin()?;
    let s = st.broker.access.snapshot();
    listing(s.users.values().map(user_json).collect(), &q)
}

async fn get_user(auth: Auth, st: St, Path(user): Path<String>) -> ApiResult {
    auth.require_admin()?;
    let s = st.broker.access.snapshot();
    let u = s.users.get(&user).ok_or_else(ApiError::not_found)?;
    Ok(Json(user_json(u)).into_response())
}

async fn put_user(auth: Auth, st: St, Path(user): Path<String>, body: Bytes) -> ApiResult {
    auth.require_admin()?;
    let body = body_object(&body)?;
    let tags = tags_of(&body)?;
    let hash = match (
        text_field(&body, "password")?,
        text_field(&body, "password_hash")?,
    ) {
        (Some(p), _) => Some((
            access::password::hash(Algorithm::Sha256, &p),
            Algorithm::Sha256,
        )),
        (None, Some(h)) => {
            let alg = Algorithm::parse(text_field(&body, "hashing_algorithm")?.as_deref())
                .map_err(ApiError::bad_request)?;
            Some((h, alg))
        }
        (None, None) => None,
    };
    let new = change(&st, move |s, ops| {
        if s.users.contains_key(&user) {
            access::update_user(s, ops, &user, hash, tags)?;
            Ok(false)
        } else {
            let (h, alg) = hash.unwrap_or((String::new(), Algorithm::Sha256));
            access::add_user(s, ops, &user, h, alg, tags)?;
            Ok(true)
        }
    })
    .await?;
    Ok(created(new))
}

async fn delete_user(auth: Auth, st: St, Path(user): Path<String>) -> ApiResult {
    auth.require_admin()?;
    if !st.broker.access.snapshot().users.contains_key(&user) {
        return Err(ApiError::not_found());
    }
    change(&st, move |s, ops| access::delete_user(s, ops, &user)).await?;
    Ok(no_content())
}

// ----------------------------------------------------------------- vhosts

fn vhost_json(st: &St, v: &access::VhostMeta) -> Value {
    let stats = st
        .broker
        .vhost(&v.name)
        .map(|h| st.rates.vhost(&h))
        .unwrap_or_else(|| json!({}));
    json!({
        "message_stats": stats,
        "name": v.name,
        "description": v.description,
        "tags": v.tags,
        "default_queue_type": "classic",
        "metadata": {"description": v.description, "tags": v.tags},
        "tracing": false,
        "cluster_state": {crate::management::objects::node_name(): "running"},
    })
}

async fn list_vhosts(auth: Auth, st: St, q: Query<Paging>) -> ApiResult {
    let s = st.broker.access.snapshot();
    let items = s
        .vhosts
        .values()
        .filter(|v| auth.sees_vhost(&st.broker, &v.name))
        .map(|v| vhost_json(&st, v))
        .collect();
    listing(items, &q)
}

async fn get_vhost(auth: Auth, st: St, Path(vhost): Path<String>) -> ApiResult {
    auth.vhost(&st.broker, &vhost)?;
    let s = st.broker.access.snapshot();
    let v = s.vhosts.get(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(Json(vhost_json(&st, v)).into_response())
}

async fn put_vhost(auth: Auth, st: St, Path(vhost): Path<String>, body: Bytes) -> ApiResult {
    auth.require_admin()?;
    let body = body_object(&body)?;
    let tags = tags_of(&body)?;
    let description = text_field(&body, "description")?.unwrap_or_default();
    match text_field(&body, "default_queue_type")?.as_deref() {
        None | Some("classic") | Some("undefined") => {}
        Some(t) => {
            return Err(ApiError::bad_request(format!(
                "default queue type '{t}' is not supported by Warren yet"
            )))
        }
    }
    if body.get("tracing") == Some(&Value::Bool(true)) {
        return Err(ApiError::bad_request("Warren has no message tracing"));
    }
    let name = vhost.clone();
    let new = change(&st, move |s, ops| {
        if s.vhosts.contains_key(&name) {
            access::update_vhost(s, ops, &name, &description, tags)?;
            Ok(false)
        } else {
            access::add_vhost(s, ops, &name, &description, tags)?;
            Ok(true)
        }
    })
    .await?;
    st.broker.ensure_vhost(&vhost);
    Ok(created(new))
}

async fn delete_vhost(auth: Auth, st: St, Path(vhost): Path<String>) -> ApiResult {
    auth.require_admin()?;
    if !st.broker.access.snapshot().vhosts.contains_key(&vhost) {
        return Err(ApiError::not_found());
    }
    st.broker
        .delete_vhost(&vhost)
        .await
        .map_err(ApiError::refused_change)?;
    Ok(no_content())
}

// ------------------------------------------------------------ permissions

fn permission_json(vhost: &str, user: &str, p: &access::Permission) -> Value {
    json!({
        "user": user, "vhost": vhost,
        "configure": p.configure.source, "write": p.write.source, "read": p.read.source,
    })
}

fn permissions_where(st: &St, keep: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    let s = st.broker.access.snapshot();
    s.permissions
        .iter()
        .filter(|((v, u), _)| keep(v, u))
        .map(|((v, u), p)| permission_json(v, u, p))
        .collect()
}

async fn list_permissions(auth: Auth, st: St, q: Query<Paging>) -> ApiResult {
    auth.require_admin()?;
    listing(permissions_where(&st, |_, _| true), &q)
}

async fn user_permissions(auth: Auth, st: St, Path(user): Path<String>) -> ApiResult {
    auth.require_admin()?;
    if !st.broker.access.snapshot().users.contains_key(&user) {
        return Err(ApiError::not_found());
    }
    Ok(Json(permissions_where(&st, |_, u| u == user)).into_response())
}

async fn vhost_permissions(auth: Auth, st: St, Path(vhost): Path<String>) -> ApiResult {
    auth.require_admin()?;
    auth.vhost(&st.broker, &vhost)?;
    Ok(Json(permissions_where(&st, |v, _| v == vhost)).into_response())
}

async fn get_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    auth.require_admin()?;
    let s = st.broker.access.snapshot();
    let p = s
        .permissions
        .get(&(vhost.clone(), user.clone()))
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(permission_json(&vhost, &user, p)).into_response())
}

async fn put_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    auth.require_admin()?;
    let body = body_object(&body)?;
    let (c, w, r) = (
        required(&body, "configure")?,
        required(&body, "write")?,
        required(&body, "read")?,
    );
    let new = change(&st, move |s, ops| {
        let new = !s.permissions.contains_key(&(vhost.clone(), user.clone()));
        access::set_permissions(s, ops, &user, &vhost, &c, &w, &r)?;
        Ok(new)
    })
    .await?;
    Ok(created(new))
}

async fn delete_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    auth.require_admin()?;
    if !st
        .broker
        .access
        .snapshot()
        .permissions
        .contains_key(&(vhost.clone(), user.clone()))
    {
        return Err(ApiError::not_found());
    }
    change(&st, move |s, ops| {
        access::clear_permissions(s, ops, &user, &vhost)
    })
    .await?;
    Ok(no_content())
}

fn topic_where(st: &St, keep: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    let s = st.broker.access.snapshot();
    s.topic_permissions
        .iter()
        .filter(|((v, u, _), _)| keep(v, u))
        .map(|((v, u, x), t)| {
            json!({"user": u, "vhost": v, "exchange": x, "write": t.write, "read": t.read})
        })
        .collect()
}

async fn list_topic_permissions(auth: Auth, st: St, q: Query<Paging>) -> ApiResult {
    auth.require_admin()?;
    listing(topic_where(&st, |_, _| true), &q)
}

async fn user_topic_permissions(auth: Auth, st: St, Path(user): Path<String>) -> ApiResult {
    auth.require_admin()?;
    if !st.broker.access.snapshot().users.contains_key(&user) {
        return Err(ApiError::not_found());
    }
    Ok(Json(topic_where(&st, |_, u| u == user)).into_response())
}

async fn vhost_topic_permissions(auth: Auth, st: St, Path(vhost): Path<String>) -> ApiResult {
    auth.require_admin()?;
    auth.vhost(&st.broker, &vhost)?;
    Ok(Json(topic_where(&st, |v, _| v == vhost)).into_response())
}

async fn get_topic_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    auth.require_admin()?;
    let found = topic_where(&st, |v, u| v == vhost && u == user);
    if found.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Json(found).into_response())
}

async fn put_topic_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    auth.require_admin()?;
    let body = body_object(&body)?;
    let (x, w, r) = (
        required(&body, "exchange")?,
        required(&body, "write")?,
        required(&body, "read")?,
    );
    let new = change(&st, move |s, ops| {
        let new = !s
            .topic_permissions
            .contains_key(&(vhost.clone(), user.clone(), x.clone()));
        access::set_topic_permissions(s, ops, &user, &vhost, &x, &w, &r)?;
        Ok(new)
    })
    .await?;
    Ok(created(new))
}

async fn delete_topic_permission(
    auth: Auth,
    st: St,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    auth.require_admin()?;
    if topic_where(&st, |v, u| v == vhost && u == user).is_empty() {
        return Err(ApiError::not_found());
    }
    change(&st, move |s, ops| {
        access::clear_topic_permissions(s, ops, &user, &vhost)
    })
    .await?;
    Ok(no_content())
}

// ------------------------------------------------------------ definitions

async fn get_definitions(auth: Auth, st: St) -> ApiResult {
    auth.require_admin()?;
    let b = st.broker.clone();
    let defs = tokio::task::spawn_blocking(move || b.meta.load())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot read definitions: {e}")))?;
    let out = crate::definitions::export(&st.broker.access.snapshot(), &defs);
    Ok(Json(out).into_response())
}

async fn post_definitions(auth: Auth, st: St, body: Bytes) -> ApiResult {
    auth.require_admin()?;
    match crate::definitions::import(&st.broker, &body).await {
        Ok(report) => {
            tracing::info!(
                created = report.created.len(),
                skipped = report.skipped.len(),
                user = %auth.user,
                "imported definitions over the management API"
            );
            Ok(no_content())
        }
        Err(problems) => Err(ApiError::bad_request(problems.join("\n"))),
    }
}
