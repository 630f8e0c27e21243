//! The opening handshake: protocol header, `connection.start` /
//! `start-ok` (authentication with PLAIN or AMQPLAIN, the client's
//! capabilities), `tune` / `tune-ok` (limits checked as RabbitMQ checks
//! them), `open` / `open-ok` (the vhost). Frames are capped at
//! `PRE_TUNE_FRAME_MAX` until tune-ok, so an unauthenticated peer cannot make
//! Warren buffer much.

use super::{conn_error, AtMethod, Fault, Io};
use crate::broker::Broker;
use crate::channel::ClientCaps;
use crate::channel::Output;
use crate::error::AmqpError;
use crate::vhost::VHost;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_protocol::amqp::{connection as conn, AMQPClass};
use warren_protocol::frame;
use warren_protocol::method::{self, Method};
use warren_protocol::reply;
use warren_protocol::types::{AMQPValue, FieldTable, LongString};

/// What the handshake settled.
pub struct Opened {
    pub user: String,
    pub caps: ClientCaps,
    /// The client's `client_properties` (for operators).
    pub client_properties: FieldTable,
    /// The SASL mechanism it logged in with (PLAIN, AMQPLAIN, EXTERNAL).
    pub auth_mechanism: String,
    pub vhost: Arc<VHost>,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    /// The connection's slot under `max_connections`, held while it lives.
    pub slot: tokio::sync::OwnedSemaphorePermit,
    /// Its place under the user's and the vhost's connection limits.
    pub usage: crate::access::limits::Ticket,
}

/// Run the handshake. `Ok(None)`: the client spoke another protocol (it got
/// our header back).
pub async fn handshake(io: &mut Io, broker: &Broker) -> Result<Option<Opened>, Fault> {
    let mut header = [0u8; 8];
    io.stream.read_exact(&mut header).await?;
    if &header != frame::PROTOCOL_HEADER {
        io.stream.write_all(frame::PROTOCOL_HEADER).await?;
        return Ok(None);
    }
    io.out.send_method(
        0,
        AMQPClass::Connection(conn::AMQPMethod::Start(conn::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            // EXTERNAL only where a verified client certificate names the
            // user (as RabbitMQ's rabbitmq_auth_mechanism_ssl).
            mechanisms: LongString::from(if io.stream.peer_certificate().is_some() {
                "PLAIN AMQPLAIN EXTERNAL"
            } else {
                "PLAIN AMQPLAIN"
            }),
            locales: LongString::from("en_US"),
        })),
    );
    io.flush().await?;

    let start_ok = match read_method(io).await? {
        AMQPClass::Connection(conn::AMQPMethod::StartOk(s)) => s,
        _ => {
            return Err(
                conn_error(reply::COMMAND_INVALID, "expected connection.start-ok")
                    .at_method(10, 11),
            )
        }
    };
    let caps = read_client_properties(io, &start_ok.client_properties);
    let user = match authenticate(io, broker, &start_ok, caps) {
        Ok(u) => {
            broker.login_failures.succeeded(io.peer.ip());
            u
        }
        Err(Refused { fault, why }) => {
            let r = broker.login_failures.failed(io.peer.ip());
            if let Some(unlogged) = r.log {
                let mechanism = start_ok.mechanism.as_str();
                tracing::warn!(peer = %io.peer, mechanism, why, unlogged, "login refused");
            }
            // A source that keeps failing waits for its answer.
            tokio::time::sleep(r.delay).await;
            return Err(fault);
        }
    };

    let cfg = &broker.config;
    let (channel_max, frame_max, heartbeat) = (cfg.channel_max, cfg.frame_max, cfg.heartbeat);
    io.out.send_method(
        0,
        AMQPClass::Connection(conn::AMQPMethod::Tune(conn::Tune {
            channel_max,
            frame_max,
            heartbeat,
        })),
    );
    io.flush().await?;
    let tune_ok = match read_method(io).await? {
        AMQPClass::Connection(conn::AMQPMethod::TuneOk(t)) => t,
        _ => {
            return Err(
                conn_error(reply::COMMAND_INVALID, "expected connection.tune-ok").at_method(10, 31),
            )
        }
    };
    if tune_ok.frame_max < crate::config::FRAME_MIN || tune_ok.frame_max > frame_max {
        return Err(conn_error(
            reply::NOT_ALLOWED,
            format!(
                "negotiated frame_max = {} is outside the allowed range {}..{}",
                tune_ok.frame_max,
                crate::config::FRAME_MIN,
                frame_max
            ),
        )
        .at_method(10, 31));
    }
    // channel_max 0 means "no limit of the client's own": ours applies (as RabbitMQ).
    let client_channel_max = match tune_ok.channel_max {
        0 => channel_max,
        n => n,
    };
    if client_channel_max > channel_max {
        return Err(conn_error(
            reply::NOT_ALLOWED,
            format!(
                "negotiated channel_max = {client_channel_max} is outside the allowed range 1..{channel_max}"
            ),
        )
        .at_method(10, 31));
    }
    io.set_frame_max(tune_ok.frame_max);

    let open = match read_method(io).await? {
        AMQPClass::Connection(conn::AMQPMethod::Open(o)) => o,
        _ => {
            return Err(
                conn_error(reply::COMMAND_INVALID, "expected connection.open").at_method(10, 40),
            )
        }
    };
    let vh = open.virtual_host.as_str();
    broker
        .access
        .check_vhost(&user, vh)
        .map_err(|e| Fault::Connection(e.at(10, 40)))?;
    let usage = broker
        .access
        .admit_connection(&user, vh)
        .map_err(|e| Fault::Connection(e.at(10, 40)))?;
    let Some(vhost) = broker.vhost(vh) else {
        return Err(
            conn_error(reply::NOT_ALLOWED, format!("vhost {vh} not found")).at_method(10, 40),
        );
    };
    let Ok(slot) = broker.connection_slots.clone().try_acquire_owned() else {
        return Err(conn_error(
            reply::NOT_ALLOWED,
            format!(
                "connection refused: node connection limit ({}) is reached",
                cfg.max_connections
            ),
        )
        .at_method(10, 40));
    };
    io.out.send_method(
        0,
        AMQPClass::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})),
    );
    io.flush().await?;
    tracing::info!(peer = %io.peer, user = %user, vhost = vh, "connection opened");
    Ok(Some(Opened {
        user,
        caps,
        client_properties: start_ok.client_properties.clone(),
        auth_mechanism: start_ok.mechanism.as_str().to_owned(),
        vhost,
        channel_max: client_channel_max,
        frame_max: tune_ok.frame_max,
        heartbeat: tune_ok.heartbeat,
        slot,
        usage,
    }))
}

/// Check the credentials of `start-ok`; a refusal is 403 through
/// `connection.close` if the client announced `authentication_failure_close`,
/// else a dropped socket (as RabbitMQ).
/// A refused login: how to answer it, and why (for the log).
struct Refused {
    fault: Fault,
    why: String,
}

fn authenticate(
    io: &Io,
    broker: &Broker,
    start_ok: &conn::StartOk,
    caps: ClientCaps,
) -> Result<String, Refused> {
    let mechanism = start_ok.mechanism.as_str();
    let loopback = io.peer.ip().is_loopback();
    let creds = match mechanism {
        "PLAIN" => parse_plain(start_ok.response.as_bytes()),
        "AMQPLAIN" => parse_amqplain(start_ok.response.as_bytes()),
        "EXTERNAL" if io.stream.peer_certificate().is_some() => {
            let login_from = broker
                .config
                .tls
                .as_ref()
                .map(|t| t.settings.login_from)
                .unwrap_or_default();
            let who = io
                .stream
                .peer_certificate()
                .and_then(|der| crate::tls::peer_identity(der, login_from));
            let why = match who {
                None => "the client certificate names no user".to_owned(),
                Some(u) => match broker.access.login_external(&u, loopback) {
                    Ok(()) => return Ok(u),
                    Err(e) => e.to_string(),
                },
            };
            return Err(refusal(caps, mechanism, why));
        }
        other => {
            return Err(Refused {
                fault: conn_error(
                    reply::COMMAND_INVALID,
                    format!("unknown authentication mechanism '{other}'"),
                )
                .at_method(10, 11),
                why: format!("unknown mechanism '{other}'"),
            })
        }
    };
    let why = match creds {
        None => "malformed response".to_owned(),
        Some((u, p)) => match broker.access.login(&u, p.as_bytes(), loopback) {
            Ok(()) => return Ok(u),
            Err(e) => e.to_string(),
        },
    };
    Err(refusal(caps, mechanism, why))
}

/// A refused login, answered as the client asked (`authentication_failure_close`).
fn refusal(caps: ClientCaps, mechanism: &str, why: String) -> Refused {
    let fault = if caps.authentication_failure_close {
        Fault::Connection(
            AmqpError::new(
                reply::ACCESS_REFUSED,
                format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
            )
            .at(10, 11),
        )
    } else {
        Fault::Drop("login refused".into())
    };
    Refused { fault, why }
}

/// Read the next method of the handshake on channel 0.
async fn read_method(io: &mut Io) -> Result<AMQPClass, Fault> {
    let (h, payload) = io.read_frame().await?;
    if h.kind != frame::METHOD || h.channel != 0 {
        return Err(conn_error(
            reply::UNEXPECTED_FRAME,
            "expected a connection method on channel 0",
        ));
    }
    match method::decode(&payload) {
        Ok(Method::Other(m)) => Ok(m),
        Ok(_) => Err(conn_error(
            reply::COMMAND_INVALID,
            "expected a connection method",
        )),
        Err(e) => Err(Fault::Connection(
            AmqpError::new(e.reply_code(), e.to_string()).at(e.ids().0, e.ids().1),
        )),
    }
}

/// The client's capabilities, and its name for the connection's log span.
fn read_client_properties(io: &Io, props: &FieldTable) -> ClientCaps {
    let mut caps = ClientCaps::default();
    if let Some(AMQPValue::FieldTable(t)) = props.inner().get("capabilities") {
        let on = |k: &str| matches!(t.inner().get(k), Some(AMQPValue::Boolean(true)));
        caps = ClientCaps {
            consumer_cancel_notify: on("consumer_cancel_notify"),
            connection_blocked: on("connection.blocked"),
            authentication_failure_close: on("authentication_failure_close"),
        };
    }
    let name = match props.inner().get("connection_name") {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    let product = match props.inner().get("product") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => String::new(),
    };
    tracing::debug!(peer = %io.peer, connection_name = ?name, %product, ?caps, "client properties");
    if let Some(n) = name {
        tracing::Span::current().record("connection_name", n.as_str());
    }
    caps
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let s = |v: &str| AMQPValue::LongString(v.into());
    let mut p = FieldTable::default();
    p.insert("product".into(), s("Warren"));
    p.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), s("Rust"));
    p.insert("cluster_name".into(), s("warren"));
    p.insert("copyright".into(), s("Copyright the Warren authors"));
    p.insert(
        "information".into(),
        s("Licensed under the Apache License 2.0"),
    );
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

/// PLAIN: "\0user\0password" (an authorization identity before the first NUL is ignored).
fn parse_plain(resp: &[u8]) -> Option<(String, String)> {
    let mut parts = resp.split(|b| *b == 0);
    let _authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let pass = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    if parts.next().is_some() {
        return None;
    }
    Some((user, pass))
}

/// AMQPLAIN: a field table body (no length prefix) with LOGIN and PASSWORD.
fn parse_amqplain(resp: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(resp.len() + 4);
    framed.extend_from_slice(&(resp.len() as u32).to_be_bytes());
    framed.extend_from_slice(resp);
    warren_protocol::table::skip_table(&framed).ok()?;
    let (_, t) = warren_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match t.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}
