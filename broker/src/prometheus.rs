//! Prometheus metrics on `--prometheus-port` (15692), with RabbitMQ's metric
//! names, types and labels (its `rabbitmq_prometheus` plugin), so that
//! dashboards built for RabbitMQ read Warren unchanged: `/metrics` holds the
//! node's totals, `/metrics/per-object` adds one series per queue.
//! Warren's own figures are under `warren_`.
//!
//! Values are read when scraped: gauges from the broker's state, counters
//! from its totals (see `metrics`). The text format is written here: each
//! family is a `# HELP`, a `# TYPE` and its samples.

use crate::broker::Broker;
use crate::management::objects::node_name;
use crate::queue::{QueueCmd, QueueStats};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serve `/metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(|s| scrape(s, false)))
        .route("/metrics/per-object", get(|s| scrape(s, true)))
        .with_state(broker);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "Prometheus endpoint stopped");
    }
}

async fn scrape(State(b): State<Arc<Broker>>, per_object: bool) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&b, per_object).await,
    )
}

/// The exposition text.
/// The quorum queues whose Raft groups this node is a member of: how many,
/// how many it leads (Warren's names), and per queue (per-object only,
/// RabbitMQ's names and labels) the Raft term, log indexes and, Warren's,
/// whether this node leads it and how many written entries it has yet to
/// apply.
fn quorum_groups(b: &Broker, c: &warren_cluster::ClusterNode, per_object: bool, out: &mut Text) {
    let mut groups = Vec::new();
    for v in b.vhosts() {
        for q in v.queues() {
            if let Some(st) = q.info.quorum.and_then(|g| c.group(g)).map(|g| g.status()) {
                groups.push((v.name.clone(), q.name().to_owned(), st));
            }
        }
    }
    let led = groups
        .iter()
        .filter(|(_, _, s)| s.leader_id == Some(s.id))
        .count();
    for (name, help, v) in [
        (
            "warren_quorum_queue_members",
            "Quorum queues whose Raft group this node is a member of",
            groups.len(),
        ),
        (
            "warren_quorum_queue_leaders",
            "Quorum queues this node leads",
            led,
        ),
    ] {
        out.family(name, "gauge", help);
        out.sample(name, &[], v as u64);
    }
    if !per_object {
        return;
    }
    type Pick = fn(&warren_cluster::ClusterStatus) -> Option<u64>;
    let per: [(&str, &str, &str, Pick); 6] = [
        (
            "rabbitmq_raft_term_total",
            "counter",
            "Current Raft term number",
            |s| Some(s.term),
        ),
        (
            "rabbitmq_raft_log_last_written_index",
            "gauge",
            "Raft log last written index",
            |s| s.last_log_index,
        ),
        (
            "rabbitmq_raft_log_last_applied_index",
            "gauge",
            "Raft log last applied index",
            |s| s.last_applied,
        ),
        (
            "rabbitmq_raft_log_snapshot_index",
            "gauge",
            "Raft log snapshot index",
            |s| s.snapshot_index,
        ),
        (
            "warren_quorum_queue_leader",
            "gauge",
            "Whether this node leads the quorum queue (1) or not (0)",
            |s| Some(u64::from(s.leader_id == Some(s.id))),
        ),
        (
            "warren_quorum_queue_apply_lag",
            "gauge",
            "Entries in this member's log it has not applied yet",
            |s| {
                Some(
                    s.last_log_index
                        .unwrap_or(0)
                        .saturating_sub(s.last_applied.unwrap_or(0)),
                )
            },
        ),
    ];
    for (name, kind, help, f) in per {
        out.family(name, kind, help);
        for (vhost, queue, st) in &groups {
            if let Some(v) = f(st) {
                out.sample(name, &[("vhost", vhost), ("queue", queue)], v);
            }
        }
    }
}

pub async fn render(b: &Broker, per_object: bool) -> String {
    let mut out = Text::default();
    let node = node_name();
    out.family(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
    );
    out.sample(
        "rabbitmq_identity_info",
        &[
            ("rabbitmq_node", &node),
            ("rabbitmq_cluster", &node),
            ("rabbitmq_cluster_permanent_id", &node),
        ],
        1,
    );
    out.family("rabbitmq_build_info", "untyped", "Version info");
    out.sample(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", crate::management::RABBITMQ_API_VERSION),
            ("product_name", "Warren"),
            ("product_version", env!("CARGO_PKG_VERSION")),
        ],
        1,
    );

    // Topology and queue depths.
    let mut queues: Vec<(String, String, QueueStats)> = Vec::new();
    // Stream consumers' lag (per-object only): vhost, stream, tag, lag.
    let mut lags: Vec<(String, String, String, u64)> = Vec::new();
    for v in b.vhosts() {
        for q in v.queues() {
            let s = q
                .ask(|reply| QueueCmd::Info { reply })
                .await
                .unwrap_or_default();
            queues.push((v.name.clone(), q.name().to_owned(), s));
            if per_object && q.is_stream() {
                for c in q
                    .ask(|reply| QueueCmd::Consumers { reply })
                    .await
                    .unwrap_or_default()
                {
                    if let Some((_, lag)) = c.stream {
                        lags.push((v.name.clone(), q.name().to_owned(), c.tag.to_string(), lag));
                    }
                }
            }
        }
    }
    let conns = b.connections();
    let channels: u64 = conns.iter().map(|c| c.channels.load(Relaxed) as u64).sum();
    let sum = |f: fn(&QueueStats) -> u64| queues.iter().map(|(_, _, s)| f(s)).sum::<u64>();
    let gauges: [(&str, &str, u64); 7] = [
        (
            "rabbitmq_connections",
            "Connections currently open",
            conns.len() as u64,
        ),
        ("rabbitmq_channels", "Channels currently open", channels),
        (
            "rabbitmq_consumers",
            "Consumers currently connected",
            sum(|s| s.consumers as u64),
        ),
        ("rabbitmq_queues", "Queues available", queues.len() as u64),
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            sum(|s| s.ready),
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            sum(|s| s.unacked),
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            sum(|s| s.ready + s.unacked),
        ),
    ];
    for (name, help, v) in gauges {
        if per_object && name.starts_with("rabbitmq_queue_") {
            continue; // one series per queue below instead
        }
        out.family(name, "gauge", help);
        out.sample(name, &[], v);
    }
    let churn = &b.churn;
    let g = &b.metrics;
    let counters: [(&str, &str, u64); 7] = [
        (
            "rabbitmq_connections_opened_total",
            "Total number of connections opened",
            churn.connections_opened.load(Relaxed),
        ),
        (
            "rabbitmq_connections_closed_total",
            "Total number of connections closed or terminated",
            churn.connections_closed.load(Relaxed),
        ),
        (
            "rabbitmq_channels_opened_total",
            "Total number of channels opened",
            g.channels_opened.load(Relaxed),
        ),
        (
            "rabbitmq_channels_closed_total",
            "Total number of channels closed",
            g.channels_closed.load(Relaxed),
        ),
        (
            "rabbitmq_queues_declared_total",
            "Total number of queues declared",
            churn.queues_declared.load(Relaxed),
        ),
        (
            "rabbitmq_queues_created_total",
            "Total number of queues created",
            churn.queues_created.load(Relaxed),
        ),
        (
            "rabbitmq_queues_deleted_total",
            "Total number of queues deleted",
            churn.queues_deleted.load(Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        out.family(name, "counter", help);
        out.sample(name, &[], v);
    }

    // RabbitMQ's global message counters, labelled by protocol.
    let amqp = [("protocol", "amqp091")];
    let delivered = g.delivered_consume_auto_ack.load(Relaxed)
        + g.delivered_consume_manual_ack.load(Relaxed)
        + g.delivered_get_auto_ack.load(Relaxed)
        + g.delivered_get_manual_ack.load(Relaxed);
    let global: [(&str, &str, u64); 14] = [
        ("received", "Total number of messages received from publishers", g.received.load(Relaxed)),
        ("received_confirm", "Total number of messages received from publishers expecting confirmations", g.received_confirm.load(Relaxed)),
        ("routed", "Total number of messages routed to queues or streams", g.routed.load(Relaxed)),
        ("unroutable_dropped", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable", g.unroutable_dropped.load(Relaxed)),
        ("unroutable_returned", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable", g.unroutable_returned.load(Relaxed)),
        ("confirmed", "Total number of messages confirmed to publishers", g.confirmed.load(Relaxed)),
        ("delivered", "Total number of messages delivered to consumers", delivered),
        ("delivered_consume_manual_ack", "Total number of messages delivered to consumers using basic.consume with manual acknowledgment", g.delivered_consume_manual_ack.load(Relaxed)),
        ("delivered_consume_auto_ack", "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment", g.delivered_consume_auto_ack.load(Relaxed)),
        ("delivered_get_manual_ack", "Total number of messages delivered to consumers using basic.get with manual acknowledgment", g.delivered_get_manual_ack.load(Relaxed)),
        ("delivered_get_auto_ack", "Total number of messages delivered to consumers using basic.get with automatic acknowledgment", g.delivered_get_auto_ack.load(Relaxed)),
        ("get_empty", "Total number of times basic.get operations fetched no message", g.get_empty.load(Relaxed)),
        ("redelivered", "Total number of messages redelivered to consumers", g.redelivered.load(Relaxed)),
        ("acknowledged", "Total number of messages acknowledged by consumers", g.acknowledged.load(Relaxed)),
    ];
    for (short, help, v) in global {
        let name = format!("rabbitmq_global_messages_{short}_total");
        out.family(&name, "counter", help);
        out.sample(&name, &amqp, v);
    }
    // Dead letters by reason, labelled as RabbitMQ's classic queues are:
    // with a dead-letter exchange "at_most_once", without one "disabled".
    use crate::queue::dead_letter::{Reason, DEAD};
    for (reason, short, help) in [
        (Reason::Expired, "expired", "Total number of messages dead-lettered due to message TTL exceeded"),
        (Reason::MaxLen, "maxlen", "Total number of messages dead-lettered due to overflow drop-head or reject-publish-dlx"),
        (Reason::Rejected, "rejected", "Total number of messages dead-lettered due to basic.reject or basic.nack"),
        (Reason::DeliveryLimit, "delivery_limit", "Total number of messages dead-lettered due to delivery-limit exceeded"),
    ] {
        let name = format!("rabbitmq_global_messages_dead_lettered_{short}_total");
        out.family(&name, "counter", help);
        for (strategy, i) in [("at_most_once", 1), ("disabled", 0)] {
            out.sample(
                &name,
                &[("queue_type", "rabbit_classic_queue"), ("dead_letter_strategy", strategy)],
                DEAD[reason as usize][i].load(Relaxed),
            );
        }
    }
    out.family(
        "rabbitmq_global_consumers",
        "gauge",
        "Current number of consumers",
    );
    out.sample(
        "rabbitmq_global_consumers",
        &amqp,
        sum(|s| s.consumers as u64),
    );

    // Resources and alarms.
    let a = &b.alarms;
    let state = a.state();
    let resources: [(&str, &str, &str, Option<u64>); 4] = [
        (
            "rabbitmq_process_resident_memory_bytes",
            "gauge",
            "Memory used in bytes",
            a.rss(),
        ),
        (
            "rabbitmq_resident_memory_limit_bytes",
            "gauge",
            "Memory high watermark in bytes",
            Some(a.memory_limit()),
        ),
        (
            "rabbitmq_disk_space_available_bytes",
            "gauge",
            "Disk space available in bytes",
            a.disk_free(),
        ),
        (
            "rabbitmq_disk_space_available_limit_bytes",
            "gauge",
            "Free disk space low watermark in bytes",
            Some(a.disk_free_limit()),
        ),
    ];
    for (name, kind, help, v) in resources {
        if let Some(v) = v {
            out.family(name, kind, help);
            out.sample(name, &[], v);
        }
    }
    if let Some((open, max)) = fds() {
        out.family(
            "rabbitmq_process_open_fds",
            "gauge",
            "Open file descriptors",
        );
        out.sample("rabbitmq_process_open_fds", &[], open);
        out.family(
            "rabbitmq_process_max_fds",
            "gauge",
            "Open file descriptors limit",
        );
        out.sample("rabbitmq_process_max_fds", &[], max);
    }
    let alarms: [(&str, &str, bool); 3] = [
        (
            "rabbitmq_alarms_memory_used_watermark",
            "is 1 if VM memory watermark alarm is in effect",
            state.memory,
        ),
        (
            "rabbitmq_alarms_free_disk_space_watermark",
            "is 1 if free disk space watermark alarm is in effect",
            state.disk,
        ),
        (
            "rabbitmq_alarms_file_descriptor_limit",
            "is 1 if file descriptor limit alarm is in effect",
            false,
        ),
    ];
    for (name, help, on) in alarms {
        out.family(name, "untyped", help);
        out.sample(name, &[], on as u64);
    }

    // Warren's own.
    let body = &b.persister.body_stats;
    let (mut route_hits, mut route_misses) = (0, 0);
    for v in b.vhosts() {
        route_hits += v.route_stats.hits.load(Relaxed);
        route_misses += v.route_stats.misses.load(Relaxed);
    }
    let own: [(&str, &str, u64); 9] = [
        (
            "warren_delayed_messages_total",
            "Messages held by delayed-message exchanges",
            crate::delayed::DELAYED.load(Relaxed),
        ),
        (
            "warren_delayed_sent_total",
            "Delayed messages sent on at their due time",
            crate::delayed::SENT.load(Relaxed),
        ),
        (
            "warren_delayed_unroutable_total",
            "Delayed messages that routed nowhere at their due time (dropped)",
            crate::delayed::UNROUTABLE.load(Relaxed),
        ),
        (
            "warren_body_cache_hits_total",
            "Message bodies read back from the hot-body cache instead of the store",
            body.hits.load(Relaxed),
        ),
        (
            "warren_body_cache_misses_total",
            "Message bodies read back from the store",
            body.misses.load(Relaxed),
        ),
        (
            "warren_route_cache_hits_total",
            "Routings answered by the route cache",
            route_hits,
        ),
        (
            "warren_route_cache_misses_total",
            "Routings computed from the exchanges' bindings",
            route_misses,
        ),
        (
            "warren_messages_deduplicated_total",
            "Duplicates dropped by deduplicating exchanges and queues",
            crate::dedup::DROPPED.load(Relaxed),
        ),
        (
            "warren_dead_letters_dropped_total",
            "Dead letters that could not be made (and were dropped)",
            crate::queue::dead_letter::DROPPED.load(Relaxed),
        ),
    ];
    for (name, help, v) in own {
        out.family(name, "counter", help);
        out.sample(name, &[], v);
    }
    if let Some(c) = b.cluster.as_ref().map(|m| m.node()) {
        // The metadata Raft group, as this node sees it (Warren's names).
        let st = c.status();
        let leads = u64::from(st.leader_id == Some(st.id));
        let gauges = [
            (
                "warren_cluster_members",
                "Voting members of the cluster",
                Some(st.members.len() as u64),
            ),
            (
                "warren_cluster_metadata_leader",
                "Whether this node leads the metadata Raft group (1) or not (0)",
                Some(leads),
            ),
            ("warren_raft_term", "This node's Raft term", Some(st.term)),
            (
                "warren_raft_last_log_index",
                "Index of the last entry in this node's Raft log",
                st.last_log_index,
            ),
            (
                "warren_raft_last_applied_index",
                "Index of the last Raft entry this node applied",
                st.last_applied,
            ),
            (
                "warren_raft_snapshot_index",
                "Last Raft index in this node's snapshot",
                st.snapshot_index,
            ),
        ];
        for (name, help, v) in gauges {
            if let Some(v) = v {
                out.family(name, "gauge", help);
                out.sample(name, &[], v);
            }
        }
        quorum_groups(b, &c, per_object, &mut out);
    }
    let st = &b.persister.store_stats;
    out.histogram(
        "warren_store_batch_operations",
        "Operations per store write batch (one atomic write)",
        &st.batch_ops,
    );
    out.histogram(
        "warren_store_write_seconds",
        "Time to write a store batch, its WAL sync (if any) included",
        &st.write_seconds,
    );
    for (name, help, v) in [
        (
            "warren_store_elided_operations_total",
            "Store operations cancelled before they were written (messages acked before their write)",
            st.elided_ops.load(Relaxed),
        ),
        (
            "warren_store_unsynced_writes_total",
            "Store batches written without a WAL sync (acks and other changes no client waits for)",
            st.unsynced_writes.load(Relaxed),
        ),
        (
            "warren_store_deferred_syncs_total",
            "WAL syncs made for unsynced batches alone, at most 20 ms after them",
            st.deferred_syncs.load(Relaxed),
        ),
        (
            "warren_paging_reads_total",
            "Pages of messages read back from the store",
            st.page_reads.load(Relaxed),
        ),
        (
            "warren_paging_messages_total",
            "Messages read back from the store in pages",
            st.paged_messages.load(Relaxed),
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, &[], v);
    }

    if per_object {
        let per: [(&str, &str, Pick); 5] = [
            (
                "rabbitmq_queue_messages_ready",
                "Messages ready to be delivered to consumers",
                |s| s.ready,
            ),
            (
                "rabbitmq_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
                |s| s.unacked,
            ),
            (
                "rabbitmq_queue_messages",
                "Sum of ready and unacknowledged messages - total queue depth",
                |s| s.ready + s.unacked,
            ),
            (
                "rabbitmq_queue_messages_ready_bytes",
                "Size in bytes of ready messages",
                |s| s.ready_bytes,
            ),
            ("rabbitmq_queue_consumers", "Consumers on a queue", |s| {
                s.consumers as u64
            }),
        ];
        for (name, help, f) in per {
            out.family(name, "gauge", help);
            for (vhost, queue, s) in &queues {
                out.sample(name, &[("vhost", vhost), ("queue", queue)], f(s));
            }
        }
        // Streams (Warren's names): offsets kept, segments, consumer lag.
        type StreamPick = fn(&crate::queue::StreamStats) -> Option<u64>;
        let per_stream: [(&str, &str, StreamPick); 3] = [
            (
                "warren_stream_first_offset",
                "First offset a stream keeps",
                |t| t.first,
            ),
            (
                "warren_stream_last_offset",
                "Last offset appended to a stream",
                |t| t.last,
            ),
            ("warren_stream_segments", "Segments a stream keeps", |t| {
                Some(t.segments)
            }),
        ];
        for (name, help, f) in per_stream {
            out.family(name, "gauge", help);
            for (vhost, queue, s) in &queues {
                if let Some(v) = s.stream.as_ref().and_then(f) {
                    out.sample(name, &[("vhost", vhost), ("queue", queue)], v);
                }
            }
        }
        let name = "warren_stream_consumer_offset_lag";
        out.family(
            name,
            "gauge",
            "Messages appended to a stream that its consumer has not reached",
        );
        for (vhost, queue, tag, lag) in &lags {
            out.sample(
                name,
                &[("vhost", vhost), ("queue", queue), ("consumer_tag", tag)],
                *lag,
            );
        }
    }
    out.0
}

/// Picks one figure out of a queue's numbers.
type Pick = fn(&QueueStats) -> u64;

/// Open file descriptors and the soft limit.
pub fn fds() -> Option<(u64, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some((open, lim.rlim_cur))
}

/// The exposition text being written.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}\n# HELP {name} {help}");
    }

    fn histogram(&mut self, name: &str, help: &str, h: &crate::metrics::Histogram) {
        self.family(name, "histogram", help);
        let (buckets, count, sum) = h.cumulative();
        for (bound, n) in buckets {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.0, "{name}_sum {sum}");
        let _ = writeln!(self.0, "{name}_count {count}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value escaped as the text format wants (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
