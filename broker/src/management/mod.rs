//! The management HTTP API: a subset of RabbitMQ's, with its paths, JSON
//! field names, status codes and error bodies (`{"error": ..., "reason":
//! ...}`), so that tools written for RabbitMQ's API work against Warren.
//!
//! HTTP basic auth against Warren's users, with RabbitMQ's tags:
//! `management` sees the vhosts it has permissions on; `policymaker` may
//! also set and clear policies there; `monitoring` sees every vhost and
//! connection; `administrator` may do everything. A user with none of
//! these tags is refused (401).
//!
//! Files: this one (the listener, authentication, errors, the router);
//! [`admin`] (users, vhosts, permissions, policies, limits, definitions);
//! [`objects`] (overview, queues, exchanges, bindings, connections);
//! `channels` (channels and consumers); `rates` (message rates).

mod admin;
mod bindings;
mod channels;
mod connections;
mod health;
pub mod listener;
mod messages;
pub mod objects;
mod policies;
mod quorum;
pub mod rates;
mod ui;

use crate::broker::Broker;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The RabbitMQ version whose management API Warren follows.
pub const RABBITMQ_API_VERSION: &str = "3.10.8";

/// Shared by every request.
#[derive(Clone)]
pub struct Api {
    pub broker: Arc<Broker>,
    pub rates: Arc<rates::Rates>,
}

/// Serve the API on `listener` (over TLS when `tls` is given) until
/// `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::Tls>>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let rates = rates::Rates::start(&broker);
    let app = router(Api { broker, rates });
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let served = match tls {
        None => {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<listener::Peer>(),
            )
            .with_graceful_shutdown(stop)
            .await
        }
        Some(tls) => match listener::TlsListener::new(listener, tls) {
            Ok(l) => {
                axum::serve(
                    l,
                    app.into_make_service_with_connect_info::<listener::Peer>(),
                )
                .with_graceful_shutdown(stop)
                .await
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "management API stopped");
    }
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/api/overview", get(objects::overview))
        .route("/api/whoami", get(admin::whoami))
        .route("/api/nodes", get(objects::nodes))
        .route(
            "/api/nodes/{name}",
            get(objects::node).delete(objects::forget_node),
        )
        .route(
            "/api/join-cluster",
            axum::routing::post(objects::join_cluster),
        )
        .route("/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/style.css", get(ui::style_css))
        .merge(admin::routes())
        .merge(policies::routes())
        .merge(quorum::routes())
        .merge(objects::routes())
        .merge(bindings::routes())
        .merge(connections::routes())
        .merge(health::routes())
        .merge(channels::routes())
        .merge(messages::routes())
        .fallback(|| async { ApiError::not_found() })
        .with_state(api)
}

// ------------------------------------------------------------------ errors

/// An error answered as RabbitMQ answers it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
    /// A 401 carries the basic-auth challenge, unless the request came
    /// from a script (`X-Requested-With`), which would make a browser
    /// pop its own login dialog over the dashboard's.
    challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            reason: reason.into(),
            challenge: true,
        }
    }
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }
    /// A refused change (400), or 503 when the cluster cannot take changes
    /// now (see [`crate::replicate::UNAVAILABLE`]).
    pub fn refused_change(reason: String) -> ApiError {
        if reason.starts_with(crate::replicate::UNAVAILABLE) {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                reason,
            )
        } else {
            ApiError::bad_request(reason)
        }
    }
    pub fn not_authorised(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "not_authorised", reason)
    }
    pub fn internal(reason: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            reason,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": self.error, "reason": self.reason})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED && self.challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        r
    }
}

impl From<crate::error::AmqpError> for ApiError {
    fn from(e: crate::error::AmqpError) -> ApiError {
        use warren_protocol::reply;
        match e.code {
            reply::NOT_FOUND => ApiError::not_found(),
            reply::ACCESS_REFUSED => ApiError::not_authorised(e.text),
            reply::PRECONDITION_FAILED | reply::RESOURCE_LOCKED => ApiError::bad_request(e.text),
            _ => ApiError::internal(e.text),
        }
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

/// 201 Created or 204 No Content, as RabbitMQ answers a PUT.
pub fn created(was_new: bool) -> Response {
    if was_new {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// A request body as JSON (an object), or 400 naming the problem.
pub fn body_object(body: &[u8]) -> ApiResult<serde_json::Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Default::default());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("not valid JSON: {e}"))),
    }
}

/// A string field of a request body (absent or null: None).
pub fn text_field(body: &Map<String, Value>, key: &str) -> ApiResult<Option<String>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be a string, not {other}"
        ))),
    }
}

/// A string field that must be there.
pub fn required(body: &Map<String, Value>, key: &str) -> ApiResult<String> {
    text_field(body, key)?.ok_or_else(|| ApiError::bad_request(format!("{key} is missing")))
}

// ----------------------------------------------------------- authentication

/// The authenticated user of a request and what its tags allow.
pub struct Auth {
    pub user: String,
    pub tags: Vec<String>,
}

impl Auth {
    pub fn is_admin(&self) -> bool {
        self.has("administrator")
    }
    /// Sees every vhost and connection.
    pub fn is_monitor(&self) -> bool {
        self.is_admin() || self.has("monitoring")
    }
    pub fn is_policymaker(&self) -> bool {
        self.is_admin() || self.has("policymaker")
    }
    fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not administrator user"))
        }
    }

    /// Whether the user may see `vhost` (a monitor sees them all; others
    /// those they have permissions on).
    pub fn sees_vhost(&self, broker: &Broker, vhost: &str) -> bool {
        self.is_monitor()
            || broker
                .access
                .snapshot()
                .permissions
                .contains_key(&(vhost.to_owned(), self.user.clone()))
    }

    /// 404 for a vhost that does not exist, 401 for one the user may not see.
    pub fn vhost(&self, broker: &Broker, vhost: &str) -> ApiResult<()> {
        if !broker.access.snapshot().vhosts.contains_key(vhost) {
            return Err(ApiError::not_found());
        }
        if !self.sees_vhost(broker, vhost) {
            return Err(ApiError::not_authorised(
                "User not authorised to access virtual host",
            ));
        }
        Ok(())
    }
}

const MANAGEMENT_TAGS: [&str; 4] = ["management", "policymaker", "monitoring", "administrator"];

impl FromRequestParts<Api> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Auth, ApiError> {
        let scripted = parts.headers.contains_key("x-requested-with");
        let failed = || ApiError {
            challenge: !scripted,
            ..ApiError::new(StatusCode::UNAUTHORIZED, "not_authorized", "Login failed")
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(failed)?;
        let encoded = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
            .ok_or_else(failed)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| failed())?;
        let text = String::from_utf8(decoded).map_err(|_| failed())?;
        let (user, pass) = text.split_once(':').ok_or_else(failed)?;
        let loopback = parts
            .extensions
            .get::<ConnectInfo<listener::Peer>>()
            .is_some_and(|ConnectInfo(listener::Peer(a))| a.ip().is_loopback());
        if let Err(e) = api.broker.access.login(user, pass.as_bytes(), loopback) {
            tracing::info!(user, error = %e, "management API login refused");
            return Err(failed());
        }
        let tags = api
            .broker
            .access
            .snapshot()
            .users
            .get(user)
            .map(|u| u.tags.clone())
            .unwrap_or_default();
        if !tags.iter().any(|t| MANAGEMENT_TAGS.contains(&t.as_str())) {
            return Err(ApiError::not_authorised("Not management user"));
        }
        Ok(Auth {
            user: user.to_owned(),
            tags,
        })
    }
}

// --------------------------------------------------------------- listings

/// `?page=&page_size=&name=&use_regex=` as RabbitMQ takes them.
#[derive(serde::Deserialize, Default)]
pub struct Paging {
    page: Option<usize>,
    page_size: Option<usize>,
    name: Option<String>,
    use_regex: Option<bool>,
}

/// A list, or with `page` given, RabbitMQ's page object.
pub fn listing(items: Vec<Value>, q: &Query<Paging>) -> ApiResult<Response> {
    let Some(page) = q.page else {
        return Ok(axum::Json(Value::Array(items)).into_response());
    };
    let total = items.len();
    let filtered: Vec<Value> = match &q.name {
        None => items,
        Some(n) if q.use_regex == Some(true) => {
            let re = regex::Regex::new(n)
                .map_err(|e| ApiError::bad_request(format!("invalid regex: {e}")))?;
            items
                .into_iter()
                .filter(|i| i["name"].as_str().is_some_and(|s| re.is_match(s)))
                .collect()
        }
        Some(n) => items
            .into_iter()
            .filter(|i| i["name"].as_str().is_some_and(|s| s.contains(n.as_str())))
            .collect(),
    };
    let size = q.page_size.unwrap_or(100);
    if page == 0 || size == 0 || size > 500 {
        return Err(ApiError::bad_request(
            "page and page_size must be positive, page_size at most 500",
        ));
    }
    let filtered_count = filtered.len();
    let page_count = filtered_count.div_ceil(size).max(1);
    if page > page_count {
        return Err(ApiError::bad_request(format!(
            "page number {page} is out of range (1..{page_count})"
        )));
    }
    let slice: Vec<Value> = filtered
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .collect();
    Ok(axum::Json(json!({
        "filtered_count": filtered_count,
        "item_count": slice.len(),
        "items": slice,
        "page": page,
        "page_count": page_count,
        "page_size": size,
        "total_count": total,
    }))
    .into_response())
}

/// The API's shared state, for handlers.
pub type St = State<Api>;
