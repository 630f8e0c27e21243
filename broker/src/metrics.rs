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

            /// Add the counts to the node's totals and the vhost's, and
            /// start again from zero.
            pub fn flush_into_both(&mut self, node: &Global, vhost: &Global) {
                $(if self.$name != 0 {
                    let n = std::mem::take(&mut self.$name);
                    node.$name.fetch_add(n, Relaxed);
                    vhost.$name.fetch_add(n, Relaxed);
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

/// An exchange's totals: messages published to it, and those it routed
/// to at least one queue.
#[derive(Debug, Default)]
pub struct ExchangeCounters {
    pub publish_in: AtomicU64,
    pub publish_out: AtomicU64,
}

/// A connection's counts for the exchange it last published to, added to
/// that exchange's totals when it publishes elsewhere or at its next
/// flush (publishers mostly keep to one exchange: no shared line per
/// message).
#[derive(Debug, Default)]
pub struct ExchangeTally {
    current: Option<std::sync::Arc<ExchangeCounters>>,
    publish_in: u64,
    publish_out: u64,
}

impl ExchangeTally {
    /// One message published to the exchange `c` counts (`routed`: it
    /// reached a queue).
    pub fn count(&mut self, c: Option<&std::sync::Arc<ExchangeCounters>>, routed: bool) {
        let Some(c) = c else { return };
        if !self
            .current
            .as_ref()
            .is_some_and(|cur| std::sync::Arc::ptr_eq(cur, c))
        {
            self.flush();
            self.current = Some(c.clone());
        }
        self.publish_in += 1;
        self.publish_out += routed as u64;
    }

    /// Add what was counted to the exchange's totals.
    pub fn flush(&mut self) {
        if let Some(c) = &self.current {
            if self.publish_in > 0 {
                c.publish_in
                    .fetch_add(std::mem::take(&mut self.publish_in), Relaxed);
            }
            if self.publish_out > 0 {
                c.publish_out
                    .fetch_add(std::mem::take(&mut self.publish_out), Relaxed);
            }
        }
    }
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

/// A histogram with fixed upper bounds (Prometheus' cumulative buckets
/// are computed when rendered). Observed from one thread at a time in
/// practice (the store's writer), but safe from any.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, ascending.
    pub bounds: &'static [f64],
    /// Observations per bucket (the last one: above every bound).
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6).max(0.0) as u64, Relaxed);
    }

    /// Cumulative counts per bound (then +Inf), and the sum.
    pub fn cumulative(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(self.bounds.len());
        for (i, &b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Relaxed);
            out.push((b, acc));
        }
        acc += self.counts[self.bounds.len()].load(Relaxed);
        (out, acc, self.sum_micros.load(Relaxed) as f64 / 1e6)
    }
}

/// Store write batch sizes (operations per batch).
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Store write times (with the WAL sync, if any), seconds.
pub const WRITE_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The store's figures: batch sizes and write (with WAL sync) latency on
/// the writer thread, pages read back on the reader thread.
#[derive(Debug)]
pub struct StoreStats {
    pub batch_ops: Histogram,
    pub write_seconds: Histogram,
    /// Operations dropped before a write because they cancelled out (a
    /// message acked before it was written).
    pub elided_ops: AtomicU64,
    /// Batches written without a WAL sync (nobody waited for them).
    pub unsynced_writes: AtomicU64,
    /// WAL syncs made for such batches alone, when no synced write
    /// followed them in time.
    pub deferred_syncs: AtomicU64,
    pub page_reads: AtomicU64,
    pub paged_messages: AtomicU64,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            batch_ops: Histogram::new(BATCH_BOUNDS),
            write_seconds: Histogram::new(WRITE_BOUNDS),
            elided_ops: AtomicU64::new(0),
            unsynced_writes: AtomicU64::new(0),
            deferred_syncs: AtomicU64::new(0),
            page_reads: AtomicU64::new(0),
            paged_messages: AtomicU64::new(0),
        }
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

    #[test]
    fn a_histogram_counts_cumulatively() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 20.0] {
            h.observe(v);
        }
        let (buckets, count, sum) = h.cumulative();
        assert_eq!(buckets, vec![(1.0, 2), (10.0, 3)]);
        assert_eq!(count, 4);
        assert!((sum - 24.5).abs() < 1e-6);
    }
}
