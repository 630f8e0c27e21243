//! Message counters, as RabbitMQ's `rabbitmq_global_*` metrics count them.
//! A connection counts into its own plain [`Local`] counters on the hot
//! path and adds them to the broker's shared atomics ([`Global`]) once per
//! wake-up, so that publishing and consuming pay no shared cache line per
//! message.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)+) => {
        /// The broker's totals since start.
        #[derive(Debug, Default)]
        pub struct Global {
            $($(#[$doc])* pub $name: AtomicU64,)+
        }

        /// One connection's counts since its last flush.
        #[derive(Debug, Default)]
        pub struct Local {
            $($(#[$doc])* pub $name: u64,)+
        }

        impl Local {
            /// Add the counts to `g` and start again from zero.
            pub fn flush_into(&mut self, g: &Global) {
                $(if self.$name != 0 {
                    g.$name.fetch_add(std::mem::take(&mut self.$name), Relaxed);
                })+
            }
        }

        impl Global {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)+]
            }
        }
    };
}

counters! {
    /// Messages published (`rabbitmq_global_messages_received_total`).
    received,
    /// ... of them on channels in confirm mode.
    received_confirm,
    /// Published messages routed to at least one queue.
    routed,
    /// Unroutable messages dropped (not mandatory).
    unroutable_dropped,
    /// Unroutable mandatory messages returned to the publisher.
    unroutable_returned,
    /// Publishes confirmed (basic.ack) to the publisher.
    confirmed,
    /// Deliveries to consumers with automatic acknowledgement.
    delivered_consume_auto_ack,
    /// Deliveries to consumers that acknowledge.
    delivered_consume_manual_ack,
    /// basic.get answers with automatic acknowledgement.
    delivered_get_auto_ack,
    /// basic.get answers that need an acknowledgement.
    delivered_get_manual_ack,
    /// basic.get on an empty queue.
    get_empty,
    /// Deliveries (and gets) of messages delivered before.
    redelivered,
    /// Messages acknowledged by consumers.
    acknowledged,
    /// Channels opened.
    channels_opened,
    /// Channels closed.
    channels_closed,
}

/// Counts kept off the connections' hot path (at most a few per
/// connection's life), straight on atomics.
#[derive(Debug, Default)]
pub struct Churn {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub queues_declared: AtomicU64,
    pub queues_created: AtomicU64,
    pub queues_deleted: AtomicU64,
}

impl Churn {
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_counts_reach_the_totals_once() {
        let g = Global::default();
        let mut l = Local {
            received: 3,
            acknowledged: 2,
            ..Default::default()
        };
        l.flush_into(&g);
        l.flush_into(&g);
        l.received += 1;
        l.flush_into(&g);
        assert_eq!(g.received.load(Relaxed), 4);
        assert_eq!(g.acknowledged.load(Relaxed), 2);
        assert_eq!(l.received, 0);
        assert!(g.snapshot().contains(&("received", 4)));
    }
}
