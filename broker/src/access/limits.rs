//! Per-user and per-vhost limits, as RabbitMQ's `set_user_limits` and
//! `set_vhost_limits`: a user's `max-connections` and `max-channels` (all
//! its channels on the node), a vhost's `max-connections` and `max-queues`.
//! A negative value means no limit; 0 allows none. What is in use is
//! counted here; each admitted connection or channel holds a [`Ticket`]
//! that gives its place back when dropped.

use crate::error::{AmqpError, AmqpResult};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use warren_protocol::reply;

/// Limits of a user or a vhost (`None`: not set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(
        rename = "max-connections",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_connections: Option<i64>,
    #[serde(
        rename = "max-channels",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_channels: Option<i64>,
    #[serde(
        rename = "max-queues",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_queues: Option<i64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Build from `(name, value)` pairs; `allowed` lists the names that
    /// apply (users: connections and channels; vhosts: connections and
    /// queues).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, i64)>,
        allowed: &[&str],
    ) -> Result<Limits, String> {
        let mut l = Limits::default();
        for (name, value) in pairs {
            if !allowed.contains(&name) {
                return Err(format!(
                    "unknown limit '{name}' (known: {})",
                    allowed.join(", ")
                ));
            }
            match name {
                "max-connections" => l.max_connections = Some(value),
                "max-channels" => l.max_channels = Some(value),
                "max-queues" => l.max_queues = Some(value),
                _ => unreachable!("checked against allowed"),
            }
        }
        Ok(l)
    }

    /// As `(name, value)` pairs, set ones only.
    pub fn pairs(&self) -> Vec<(&'static str, i64)> {
        [
            ("max-connections", self.max_connections),
            ("max-channels", self.max_channels),
            ("max-queues", self.max_queues),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect()
    }
}

pub const USER_LIMITS: &[&str] = &["max-connections", "max-channels"];
pub const VHOST_LIMITS: &[&str] = &["max-connections", "max-queues"];

/// Whether `in_use` more would pass `limit` (negative: no limit).
fn reached(limit: Option<i64>, in_use: u64) -> Option<i64> {
    limit.filter(|&l| l >= 0 && in_use >= l as u64)
}

/// What is in use, by user and by vhost.
#[derive(Default)]
pub struct Usage {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    user_connections: HashMap<String, u64>,
    vhost_connections: HashMap<String, u64>,
    user_channels: HashMap<String, u64>,
}

/// A place taken; given back when dropped.
pub struct Ticket {
    usage: Arc<Usage>,
    what: Held,
}

enum Held {
    Connection { user: String, vhost: String },
    Channel { user: String },
}

fn dec(map: &mut HashMap<String, u64>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.usage.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &self.what {
            Held::Connection { user, vhost } => {
                dec(&mut c.user_connections, user);
                dec(&mut c.vhost_connections, vhost);
            }
            Held::Channel { user } => dec(&mut c.user_channels, user),
        }
    }
}

impl Usage {
    /// Admit a connection of `user` to `vhost`, or refuse it with 530 and
    /// RabbitMQ's text.
    pub fn connection(
        self: &Arc<Self>,
        user: &str,
        user_limits: Limits,
        vhost: &str,
        vhost_limits: Limits,
    ) -> AmqpResult<Ticket> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.vhost_connections.get(vhost).copied().unwrap_or(0);
        if let Some(l) = reached(vhost_limits.max_connections, n) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("access to vhost '{vhost}' refused for user '{user}': connection limit ({l}) is reached"),
            ));
        }
        let n = c.user_connections.get(user).copied().unwrap_or(0);
        if let Some(l) = reached(user_limits.max_connections, n) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!(
                    "connection refused for user '{user}': user connection limit ({l}) is reached"
                ),
            ));
        }
        *c.user_connections.entry(user.to_owned()).or_default() += 1;
        *c.vhost_connections.entry(vhost.to_owned()).or_default() += 1;
        Ok(Ticket {
            usage: self.clone(),
            what: Held::Connection {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
            },
        })
    }

    /// Admit a channel of `user`, or refuse it with 530 (a connection
    /// error, as RabbitMQ).
    pub fn channel(self: &Arc<Self>, user: &str, user_limits: Limits) -> AmqpResult<Ticket> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.user_channels.get(user).copied().unwrap_or(0);
        if let Some(l) = reached(user_limits.max_channels, n) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("number of channels opened for user '{user}' has reached the maximum allowed user limit of ({l})"),
            ));
        }
        *c.user_channels.entry(user.to_owned()).or_default() += 1;
        Ok(Ticket {
            usage: self.clone(),
            what: Held::Channel {
                user: user.to_owned(),
            },
        })
    }
}

/// The refusal of a new queue in a vhost at its `max-queues`.
pub fn queue_limit_reached(queue: &str, vhost: &str, limit: i64) -> AmqpError {
    AmqpError::new(
        reply::PRECONDITION_FAILED,
        format!(
            "cannot declare queue '{queue}': queue limit in vhost '{vhost}' ({limit}) is reached"
        ),
    )
}

/// Whether a vhost holding `queues` may take one more under `limits`.
pub fn queue_room(limits: Limits, queues: usize) -> Option<i64> {
    reached(limits.max_queues, queues as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_gives_back() {
        let u = Arc::new(Usage::default());
        let two = Limits {
            max_connections: Some(2),
            max_channels: Some(1),
            ..Default::default()
        };
        let none = Limits::default();
        let a = u.connection("u", two, "v", none).unwrap();
        let _b = u.connection("u", two, "v", none).unwrap();
        let e = u.connection("u", two, "v", none).err().unwrap();
        assert_eq!(e.code, 530);
        assert_eq!(
            e.text,
            "connection refused for user 'u': user connection limit (2) is reached"
        );
        drop(a);
        let _c = u.connection("u", two, "v", none).unwrap();
        // Two connections hold vhost v.
        let v1 = Limits {
            max_connections: Some(2),
            ..Default::default()
        };
        let e = u.connection("w", none, "v", v1).err().unwrap();
        assert_eq!(
            e.text,
            "access to vhost 'v' refused for user 'w': connection limit (2) is reached"
        );
        let ch = u.channel("u", two).unwrap();
        assert!(u.channel("u", two).is_err());
        drop(ch);
        u.channel("u", two).unwrap();
        // Negative: no limit; 0: none.
        let unlimited = Limits {
            max_channels: Some(-1),
            ..Default::default()
        };
        let _many: Vec<_> = (0..10)
            .map(|_| u.channel("x", unlimited).unwrap())
            .collect();
        let zero = Limits {
            max_channels: Some(0),
            ..Default::default()
        };
        assert!(u.channel("y", zero).is_err());
        assert_eq!(
            queue_room(
                Limits {
                    max_queues: Some(2),
                    ..Default::default()
                },
                2
            ),
            Some(2)
        );
        assert_eq!(
            queue_room(
                Limits {
                    max_queues: Some(2),
                    ..Default::default()
                },
                1
            ),
            None
        );
        assert!(Limits::from_pairs([("max-queues", 1)], USER_LIMITS).is_err());
    }
}
