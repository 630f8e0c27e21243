//! Policies, operator policies and limits, as RabbitMQ's management API
//! serves them. A policy is in force on the vhost's queues and exchanges
//! before the answer; limits are stored (synced) before it.

use super::admin::{change, limits_json};
use super::{
    body_object, created, listing, no_content, required, text_field, Api, ApiError, ApiResult,
    Auth, Paging, St,
};
use crate::access::{self, limits, Limits};
use crate::policy::Policy;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<Api> {
    Router::new()
        .route(
            "/api/policies",
            get(|a, s, q| list_policies(a, s, q, None, false)),
        )
        .route(
            "/api/policies/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_policies(a, s, q, Some(v), false)),
        )
        .route(
            "/api/policies/{vhost}/{name}",
            get(|a, s, p| get_policy(a, s, p, false))
                .put(|a, s, p, b| put_policy(a, s, p, b, false))
                .delete(|a, s, p| delete_policy(a, s, p, false)),
        )
        .route(
            "/api/operator-policies",
            get(|a, s, q| list_policies(a, s, q, None, true)),
        )
        .route(
            "/api/operator-policies/{vhost}",
            get(|a, s, q, Path(v): Path<String>| list_policies(a, s, q, Some(v), true)),
        )
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(|a, s, p| get_policy(a, s, p, true))
                .put(|a, s, p, b| put_policy(a, s, p, b, true))
                .delete(|a, s, p| delete_policy(a, s, p, true)),
        )
        .route(
            "/api/vhost-limits",
            get(|a, s| list_limits(a, s, None, false)),
        )
        .route(
            "/api/vhost-limits/{vhost}",
            get(|a, s, Path(v): Path<String>| list_limits(a, s, Some(v), false)),
        )
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            axum::routing::put(|a, s, p, b| put_limit(a, s, p, b, false))
                .delete(|a, s, p| delete_limit(a, s, p, false)),
        )
        .route(
            "/api/user-limits",
            get(|a, s| list_limits(a, s, None, true)),
        )
        .route(
            "/api/user-limits/{user}",
            get(|a, s, Path(u): Path<String>| list_limits(a, s, Some(u), true)),
        )
        .route(
            "/api/user-limits/{user}/{name}",
            axum::routing::put(|a, s, p, b| put_limit(a, s, p, b, true))
                .delete(|a, s, p| delete_limit(a, s, p, true)),
        )
}

// --------------------------------------------------------------- policies

fn policy_json(p: &Policy) -> Value {
    json!({
        "vhost": p.vhost, "name": p.name, "pattern": p.pattern,
        "apply-to": p.apply_to.name(), "definition": p.raw, "priority": p.priority,
    })
}

async fn list_policies(
    auth: Auth,
    st: St,
    q: Query<Paging>,
    vhost: Option<String>,
    operator: bool,
) -> ApiResult {
    if let Some(v) = &vhost {
        auth.vhost(&st.broker, v)?;
    }
    if operator && !auth.is_policymaker() {
        return Err(ApiError::not_authorised("Not policymaker user"));
    }
    let s = st.broker.access.snapshot();
    let map = if operator {
        &s.operator_policies
    } else {
        &s.policies
    };
    let items = map
        .values()
        .filter(|p| vhost.as_ref().is_none_or(|v| &p.vhost == v))
        .filter(|p| auth.sees_vhost(&st.broker, &p.vhost))
        .map(|p| policy_json(p))
        .collect();
    listing(items, &q)
}

async fn get_policy(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    operator: bool,
) -> ApiResult {
    auth.vhost(&st.broker, &vhost)?;
    let s = st.broker.access.snapshot();
    let map = if operator {
        &s.operator_policies
    } else {
        &s.policies
    };
    let p = map.get(&(vhost, name)).ok_or_else(ApiError::not_found)?;
    Ok(Json(policy_json(p)).into_response())
}

/// Policies need `policymaker` (with permissions on the vhost) or
/// `administrator`; operator policies `administrator`.
fn may_set_policy(auth: &Auth, st: &St, vhost: &str, operator: bool) -> ApiResult<()> {
    if operator {
        return auth.require_admin();
    }
    if !auth.is_policymaker() {
        return Err(ApiError::not_authorised("Not policymaker user"));
    }
    auth.vhost(&st.broker, vhost)
}

async fn put_policy(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
    operator: bool,
) -> ApiResult {
    may_set_policy(&auth, &st, &vhost, operator)?;
    let body = body_object(&body)?;
    let pattern = required(&body, "pattern")?;
    let apply_to = text_field(&body, "apply-to")?.unwrap_or_else(|| "all".into());
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("priority must be an integer, not {v}"))
        })?,
    };
    let definition = match body.get("definition") {
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "definition must be an object, not {other}"
            )))
        }
        None => return Err(ApiError::bad_request("definition is missing")),
    };
    let p = Policy::new(
        &vhost, &name, &pattern, &apply_to, priority, definition, operator,
    )
    .map_err(ApiError::bad_request)?;
    let s = st.broker.access.snapshot();
    let map = if operator {
        &s.operator_policies
    } else {
        &s.policies
    };
    let new = !map.contains_key(&(vhost.clone(), name.clone()));
    st.broker
        .set_policy(p, operator)
        .await
        .map_err(ApiError::refused_change)?;
    Ok(created(new))
}

async fn delete_policy(
    auth: Auth,
    st: St,
    Path((vhost, name)): Path<(String, String)>,
    operator: bool,
) -> ApiResult {
    may_set_policy(&auth, &st, &vhost, operator)?;
    let s = st.broker.access.snapshot();
    let map = if operator {
        &s.operator_policies
    } else {
        &s.policies
    };
    if !map.contains_key(&(vhost.clone(), name.clone())) {
        return Err(ApiError::not_found());
    }
    st.broker
        .clear_policy(&vhost, &name, operator)
        .await
        .map_err(ApiError::refused_change)?;
    Ok(no_content())
}

// ----------------------------------------------------------------- limits

async fn list_limits(auth: Auth, st: St, of: Option<String>, users: bool) -> ApiResult {
    let s = st.broker.access.snapshot();
    let items: Vec<Value> = if users {
        auth.require_admin()?;
        if let Some(u) = &of {
            if !s.users.contains_key(u) {
                return Err(ApiError::not_found());
            }
        }
        s.users
            .values()
            .filter(|u| of.as_ref().is_none_or(|o| o == &u.name) && !u.limits.is_empty())
            .map(|u| json!({"user": u.name, "value": limits_json(&u.limits)}))
            .collect()
    } else {
        if let Some(v) = &of {
            auth.vhost(&st.broker, v)?;
        }
        s.vhosts
            .values()
            .filter(|v| of.as_ref().is_none_or(|o| o == &v.name) && !v.limits.is_empty())
            .filter(|v| auth.sees_vhost(&st.broker, &v.name))
            .map(|v| json!({"vhost": v.name, "value": limits_json(&v.limits)}))
            .collect()
    };
    Ok(Json(items).into_response())
}

/// Set one limit (`name`) to `value` (None: clear it) on a user or vhost.
fn with_limit(current: Limits, name: &str, value: Option<i64>, users: bool) -> ApiResult<Limits> {
    let allowed = if users {
        limits::USER_LIMITS
    } else {
        limits::VHOST_LIMITS
    };
    let mut pairs: Vec<(&str, i64)> = current
        .pairs()
        .into_iter()
        .filter(|(k, _)| *k != name)
        .collect();
    if let Some(v) = value {
        pairs.push((name, v));
    } else if !allowed.contains(&name) {
        return Err(ApiError::bad_request(format!("unknown limit '{name}'")));
    }
    Limits::from_pairs(pairs, allowed).map_err(ApiError::bad_request)
}

async fn put_limit(
    auth: Auth,
    st: St,
    Path((of, name)): Path<(String, String)>,
    body: Bytes,
    users: bool,
) -> ApiResult {
    auth.require_admin()?;
    let body = body_object(&body)?;
    let value = match body.get("value") {
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("the limit's value must be an integer, not {v}"))
        })?,
        None => return Err(ApiError::bad_request("value is missing")),
    };
    set_limit(&st, of, name, Some(value), users).await?;
    Ok(no_content())
}

async fn delete_limit(
    auth: Auth,
    st: St,
    Path((of, name)): Path<(String, String)>,
    users: bool,
) -> ApiResult {
    auth.require_admin()?;
    set_limit(&st, of, name, None, users).await?;
    Ok(no_content())
}

async fn set_limit(
    st: &St,
    of: String,
    name: String,
    value: Option<i64>,
    users: bool,
) -> ApiResult<()> {
    let s = st.broker.access.snapshot();
    let current = if users {
        s.users.get(&of).map(|u| u.limits)
    } else {
        s.vhosts.get(&of).map(|v| v.limits)
    }
    .ok_or_else(ApiError::not_found)?;
    let next = with_limit(current, &name, value, users)?;
    change(st, move |s, ops| {
        if users {
            access::set_user_limits(s, ops, &of, next)
        } else {
            access::set_vhost_limits(s, ops, &of, next)
        }
    })
    .await
}
