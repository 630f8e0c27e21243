//! A queue far larger than its in-memory window: persistent 1 KB messages
//! published with confirms, the broker killed with SIGKILL and restarted on
//! the same data directory; the messages come back in order, and the
//! process's peak RSS stays under its `--memory-limit` in both lives.
//!
//! The size is `WARREN_BIG_QUEUE_MESSAGES` (default 200,000, which CI runs);
//! BENCHMARKS.md records runs with 1M and 10M:
//!
//! ```text
//! WARREN_BIG_QUEUE_MESSAGES=10000000 cargo test --release -p warren-broker \
//!     --test big_queue -- --nocapture
//! ```

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use warren_tests::daemon::{free_port, Daemon};

/// The daemon under test.
const WARREN: &str = env!("CARGO_BIN_EXE_warren");

const QUEUE: &str = "big";
const BODY: usize = 1024;
const WINDOW: usize = 1024;
/// Peak RSS allowed, MiB (`WARREN_BIG_QUEUE_RSS_MB`).
const DEFAULT_RSS_MB: u64 = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Message `i`: its number, then filler that does not compress away.
fn body(i: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BODY);
    b.extend_from_slice(&i.to_be_bytes());
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while b.len() < BODY {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.truncate(BODY);
    b
}

fn number(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn count(d: &Daemon) -> u32 {
    let (_c, ch) = d.channel().await;
    let q = ch
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    q.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_far_larger_than_memory_survives_a_crash_in_order() {
    let n = env_u64("WARREN_BIG_QUEUE_MESSAGES", 200_000);
    let limit = env_u64("WARREN_BIG_QUEUE_RSS_MB", DEFAULT_RSS_MB) * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let limit_flag = format!("{}MiB", limit / (1024 * 1024));
    let flags = ["--log-level", "info", "--memory-limit", &limit_flag];

    // Life 1: fill the queue.
    let d = Daemon::start_with(WARREN, dir.path(), port, &flags);
    let (c, ch) = d.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut inflight = VecDeque::new();
    let mut peak = 0;
    for i in 0..n {
        let confirm = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                &body(i),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        inflight.push_back(confirm);
        if inflight.len() >= WINDOW {
            let c = inflight.pop_front().unwrap().await.expect("confirm");
            assert!(c.is_ack(), "message nacked");
        }
        if i % 100_000 == 0 {
            peak = peak.max(d.rss());
        }
    }
    for c in inflight {
        assert!(c.await.expect("confirm").is_ack(), "message nacked");
    }
    let publish_secs = started.elapsed().as_secs_f64();
    c.close(200, "done".into()).await.ok();
    assert_eq!(count(&d).await as u64, n, "every confirmed message queued");
    let peak1 = d.peak_rss().max(peak);
    d.kill();

    // Life 2: recover and drain in order.
    let restarted = Instant::now();
    let d = Daemon::start_with(WARREN, dir.path(), port, &flags);
    let listening = restarted.elapsed();
    assert_eq!(count(&d).await as u64, n, "every message recovered");
    let (_c, ch) = d.channel().await;
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut first_message = None;
    let drain = Instant::now();
    for expected in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("message {expected} of {n} did not arrive"))
            .expect("consumer open")
            .expect("delivery");
        first_message.get_or_insert_with(|| restarted.elapsed());
        let got = number(&delivery.data);
        assert_eq!(got, expected, "out of order");
        assert_eq!(delivery.data, body(got), "body intact");
        assert!(delivery.redelivered, "recovered messages are redelivered");
        if expected % 500 == 499 || expected + 1 == n {
            ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
        if expected % 100_000 == 0 {
            peak = peak.max(d.rss());
        }
    }
    let drain_secs = drain.elapsed().as_secs_f64();
    let peak2 = d.peak_rss().max(peak);
    assert_eq!(count(&d).await, 0, "drained");
    println!(
        "big queue: {n} x {BODY} B persistent; publish {:.0} msg/s; restart: listening after {:?}, first message after {:?}; drain {:.0} msg/s; peak RSS {:.1} MiB (fill), {:.1} MiB (drain); limit {:.0} MiB",
        n as f64 / publish_secs,
        listening,
        first_message.unwrap_or_default(),
        n as f64 / drain_secs,
        mib(peak1),
        mib(peak2),
        mib(limit),
    );
    assert!(
        peak1 < limit,
        "peak RSS while filling {:.1} MiB over {:.0} MiB",
        mib(peak1),
        mib(limit)
    );
    assert!(
        peak2 < limit,
        "peak RSS while draining {:.1} MiB over {:.0} MiB",
        mib(peak2),
        mib(limit)
    );
}
