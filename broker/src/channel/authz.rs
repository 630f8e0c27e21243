//! Permission checks for channel methods, as RabbitMQ's channel makes them
//! (see `access`): a refusal is a channel error 403 with RabbitMQ's text.
//!
//! `basic.publish` is checked on every message, so the last grant is
//! memoised per connection ([`PublishGrant`]) and reused while access
//! control has not changed (its generation) and the exchange is the same.
//! Routing keys through a topic exchange are checked per message, and only
//! for users that have topic permissions in the vhost.

use super::Session;
use crate::access::{Kind, Perm};
use crate::error::AmqpResult;
use warren_protocol::method::ShortStr;

/// The last `basic.publish` permission granted on a connection.
#[derive(Default)]
pub struct PublishGrant {
    generation: u64,
    exchange: bytes::Bytes,
    /// Routing keys must be checked (topic permissions apply).
    per_key: bool,
}

impl Session {
    /// Check `perm` on a resource of this session's vhost.
    pub fn check(&self, kind: Kind, name: &str, perm: Perm) -> AmqpResult<()> {
        self.broker
            .access
            .check(&self.user, &self.vhost.name, kind, name, perm)
    }

    /// Check a topic permission for a binding or publish through
    /// `exchange` (only topic exchanges have them).
    pub fn check_topic(&self, exchange: &str, routing_key: &str, perm: Perm) -> AmqpResult<()> {
        if self.vhost.exchange_kind(exchange) != Some("topic") {
            return Ok(());
        }
        self.broker
            .access
            .check_topic(&self.user, &self.vhost.name, exchange, routing_key, perm)
    }

    /// Check that a message may be published to `exchange` with
    /// `routing_key`, reusing `grant` while it holds.
    pub fn check_publish(
        &self,
        grant: &mut PublishGrant,
        exchange: &ShortStr,
        routing_key: &str,
    ) -> AmqpResult<()> {
        let access = &self.broker.access;
        let generation = access.generation();
        let exchange_name = exchange.as_str();
        if grant.generation != generation || grant.exchange.as_ref() != exchange.as_bytes() {
            *grant = PublishGrant::default();
            self.check(Kind::Exchange, exchange_name, Perm::Write)?;
            let per_key = access
                .snapshot()
                .has_topic_permissions(&self.vhost.name, &self.user);
            *grant = PublishGrant {
                generation,
                exchange: exchange.bytes(),
                per_key,
            };
        }
        if grant.per_key {
            self.check_topic(exchange_name, routing_key, Perm::Write)?;
        }
        Ok(())
    }
}
