//! What a queue's arguments make it do to its messages (see `args`):
//! expiry (`x-message-ttl` and the per-message `expiration`), length limits
//! with `x-overflow drop-head`, and dead-lettering: a message that dies here
//! is republished to the `x-dead-letter-exchange`, through the router the
//! queue was given at spawn (its vhost), without waiting.

use super::actor::Actor;
use super::dead_letter::{self, Reason};
use super::ready::{Entry, NEVER};
use super::QueueHandle;
use crate::message::MessageRef;

impl Actor {
    pub(super) fn unused_too_long(&self) -> bool {
        match self.args.expires {
            Some(ms) => self.consumers.is_empty() && self.now >= self.last_used.saturating_add(ms),
            None => false,
        }
    }

    pub(super) fn is_expired(&self, e: &Entry) -> bool {
        e.expires < self.now
    }

    /// Drop (dead-letter, reason `expired`) the expired messages at the head
    /// of every level.
    pub(super) fn expire_heads(&mut self) {
        for l in 0..self.ready.levels.len() {
            while self.ready.front_of(l).is_some_and(|e| e.expires < self.now) {
                if let Some(e) = self.ready.pop_level(l) {
                    self.dead_letter(&e.msg, Reason::Expired);
                    self.unstore(&e);
                }
            }
        }
    }

    /// The next message to hand out, skipping (and dead-lettering) expired ones.
    pub(super) fn pop_live(&mut self) -> Option<Entry> {
        while let Some(e) = self.ready.pop_front() {
            if !self.is_expired(&e) {
                return Some(e);
            }
            self.dead_letter(&e.msg, Reason::Expired);
            self.unstore(&e);
        }
        None
    }

    /// Whether a live message is ready (expired heads are dropped on the way).
    pub(super) fn has_live(&mut self) -> bool {
        while let Some(top) = self.ready.top() {
            if !self.ready.front_of(top).is_some_and(|e| self.is_expired(e)) {
                return true;
            }
            if let Some(e) = self.ready.pop_level(top) {
                self.dead_letter(&e.msg, Reason::Expired);
                self.unstore(&e);
            }
        }
        false
    }

    /// When a message that entered the queue at `enqueued_at` (Unix ms)
    /// expires, on the actor's clock: the queue TTL or its own
    /// `expiration`, whichever is sooner, counted from its enqueue (also
    /// across restarts and paging: the enqueue time is stored with it).
    pub(super) fn expiry_for(&self, msg: &MessageRef, enqueued_at: u64) -> u64 {
        let ttl = match (self.args.message_ttl, per_message_ttl(msg)) {
            (Some(q), Some(m)) => Some(q.min(m)),
            (q, m) => q.or(m),
        };
        ttl.map_or(NEVER, |t| {
            enqueued_at
                .saturating_add(t)
                .saturating_sub(self.wall_epoch)
        })
    }

    /// `x-overflow: drop-head`: drop (dead-letter, reason `maxlen`) from the
    /// head until within the length limits.
    pub(super) fn drop_heads_over_limit(&mut self) {
        loop {
            let over = self
                .args
                .max_length
                .is_some_and(|m| self.ready.len() as u64 > m)
                || self
                    .args
                    .max_length_bytes
                    .is_some_and(|m| self.ready.bytes > m);
            if !over {
                return;
            }
            match self.ready.pop_front() {
                Some(e) => {
                    self.dead_letter(&e.msg, Reason::MaxLen);
                    self.unstore(&e);
                }
                None => return,
            }
        }
    }

    /// Republish a message that died here to the dead-letter exchange, if
    /// the queue has one. Never waits: target queues take it without a
    /// permit. Automatic cycles back to a queue are dropped, as RabbitMQ does.
    /// A persistent dead letter is stored for its durable targets before
    /// they see it (the original's removal follows in a later write, so a
    /// crash in between leaves a duplicate, never a loss).
    pub(super) fn dead_letter(&mut self, msg: &MessageRef, reason: Reason) {
        dead_letter::count(reason, self.args.dead_letter_exchange.is_some());
        let Some(dlx) = self.args.dead_letter_exchange.as_deref() else {
            return;
        };
        let Some(router) = self.router.upgrade() else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let rk = self.args.dead_letter_routing_key.as_deref();
        let Some(dead) = dead_letter::make(msg, reason, &self.info.name, dlx, rk, now) else {
            // Never silently: counted, and logged.
            dead_letter::DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                reason = reason.as_str(),
                dead_letter_exchange = dlx,
                "dead letter dropped: its header could not be rebuilt"
            );
            return;
        };
        let routed = match router.route_dead_letter(&dead) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dead letter dropped");
                return;
            }
        };
        let targets: Vec<&QueueHandle> = routed
            .iter()
            .filter(|q| {
                let cycle = dead_letter::is_cycle(&dead, reason, q.name());
                if cycle {
                    tracing::debug!(target = q.name(), "dead-letter cycle: dropped");
                }
                !cycle
            })
            .collect();
        super::send_unreserved(self.persister.as_ref(), dead, &targets, Vec::new());
    }
}

/// The per-message TTL: the `expiration` property, a string of milliseconds
/// (anything else is ignored).
fn per_message_ttl(msg: &MessageRef) -> Option<u64> {
    msg.header.expiration()?.trim().parse().ok()
}
