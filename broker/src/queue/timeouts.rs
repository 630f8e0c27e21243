//! Consumer timeouts (`x-consumer-timeout` of the consumer, else of the
//! queue or its policy, else the broker's `--consumer-timeout`): a delivery
//! left unacknowledged for longer times out. A consumer whose client takes
//! `basic.cancel` (`consumer_cancel_notify`) is cancelled and its unacked
//! messages come back at once (counted as deliveries); otherwise, and for
//! `basic.get` deliveries, the channel is closed with 406 and its messages
//! come back with the close, as RabbitMQ does.
//!
//! Checked by the actor's timer, at a quarter of the shortest timeout in
//! force (at most once a second), only while something is unacked: no cost
//! per delivery beyond noting when it went out.

use super::actor::Actor;
use crate::events::ConnEvent;
use rustc_hash::FxHashMap;
use std::sync::Arc;

impl Actor {
    /// The shortest timeout in force (queue's, or any consumer's), while
    /// something is unacked.
    fn shortest_timeout(&self) -> Option<u64> {
        if self.unacked.is_empty() {
            return None;
        }
        self.consumers
            .iter()
            .filter_map(|c| c.timeout)
            .chain(self.args.consumer_timeout)
            .min()
    }

    /// When to look for timed-out deliveries next (the actor's clock).
    pub(super) fn next_timeout_check(&self) -> Option<u64> {
        let shortest = self.shortest_timeout()?;
        Some(self.timeouts_checked + (shortest / 4).clamp(10, 1000))
    }

    /// Time out late deliveries if a check is due. True when the queue
    /// deleted itself (auto-delete: its last consumer was cancelled).
    pub(super) fn check_timeouts(&mut self) -> bool {
        match self.next_timeout_check() {
            Some(at) if self.now >= at => {}
            Some(_) => return false,
            None => {
                self.timeouts_checked = self.now;
                return false;
            }
        }
        self.timeouts_checked = self.now;
        let queue_timeout = self.args.consumer_timeout;
        let per_consumer: FxHashMap<(u64, Arc<str>), Option<u64>> = self
            .consumers
            .iter()
            .map(|c| ((c.chan_key, c.tag.clone()), c.timeout))
            .collect();
        // (channel, consumer tag or None for basic.get, timeout used)
        let mut late: Vec<(u64, Option<Arc<str>>, u64)> = Vec::new();
        for u in self.unacked.values() {
            let timeout = match &u.tag {
                Some(tag) => per_consumer
                    .get(&(u.chan_key, tag.clone()))
                    .copied()
                    .flatten()
                    .or(queue_timeout),
                None => queue_timeout,
            };
            let Some(t) = timeout else { continue };
            if self.now.saturating_sub(u.delivered_at) > t
                && !late
                    .iter()
                    .any(|(k, tag, _)| *k == u.chan_key && *tag == u.tag)
            {
                late.push((u.chan_key, u.tag.clone(), t));
            }
        }
        for (chan_key, tag, timeout) in late {
            tracing::info!(
                consumer = tag.as_deref().unwrap_or("(basic.get)"),
                timeout_ms = timeout,
                "delivery acknowledgement timed out"
            );
            let consumer = tag.as_ref().and_then(|t| {
                self.consumers
                    .iter()
                    .position(|c| c.chan_key == chan_key && c.tag == *t && c.cancel_notify)
            });
            match (consumer, tag) {
                (Some(i), Some(tag)) => {
                    let c = self.consumers.remove(i);
                    let seqs: Vec<u64> = self
                        .unacked
                        .iter()
                        .filter(|(_, u)| u.chan_key == chan_key && u.tag.as_ref() == Some(&tag))
                        .map(|(s, _)| *s)
                        .collect();
                    let back: Vec<_> = seqs
                        .iter()
                        .filter_map(|&s| self.settle(chan_key, s))
                        .collect();
                    let _ = c.conn.send(ConnEvent::TimedOut {
                        chan_key,
                        tag: Some(tag),
                        timeout,
                        queue: self.info.id,
                        returned: seqs.into_boxed_slice(),
                    });
                    self.requeue(back);
                    self.consumer_left();
                    if self.maybe_auto_delete() {
                        return true;
                    }
                }
                (_, tag) => {
                    // No cancel possible: the channel is closed, and its
                    // unacked messages come back with the close.
                    let conn = self
                        .consumers
                        .iter()
                        .find(|c| c.chan_key == chan_key)
                        .map(|c| c.conn.clone())
                        .or_else(|| {
                            self.unacked
                                .values()
                                .find(|u| u.chan_key == chan_key && u.get_conn.is_some())
                                .and_then(|u| u.get_conn.clone())
                        });
                    if let Some(conn) = conn {
                        let _ = conn.send(ConnEvent::TimedOut {
                            chan_key,
                            tag: None,
                            timeout,
                            queue: self.info.id,
                            returned: Box::default(),
                        });
                    }
                    let _ = tag;
                }
            }
        }
        false
    }
}
