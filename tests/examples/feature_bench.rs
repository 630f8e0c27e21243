//! Benchmarks of issue 13's features, against a running broker (lapin, in
//! release: `cargo run --release -p warren-tests --example feature_bench --`).
//!
//! - `delayed N SECONDS`: publish N persistent messages with confirms to a
//!   durable `x-delayed-message` exchange, due (in a scrambled order) over
//!   the SECONDS after the first publish plus 5 s; one consumer (no-ack)
//!   takes them. Prints the publish rate, how late each arrived against its
//!   due time (p50 / p99 / max; the body carries the due time, or the send
//!   time for one sent after it was due), and the broker's peak RSS (with
//!   --pid).
//! - `dedup N`: publish N persistent messages with confirms (1,000 in
//!   flight) to a durable fanout exchange, then to a durable deduplicating
//!   one (unique keys, cache of 100,000), each bound to one durable queue;
//!   prints both rates.
//!
//! Arguments after the mode: `--url URL` (default amqp://guest:guest@127.0.0.1:5672/%2f),
//! `--pid PID` (the broker's, for its RSS).

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn setup(ch: &Channel, x: &str, kind: &str, args: FieldTable, q: &str) -> Res<()> {
    let _ = ch
        .exchange_delete(x.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(q.into(), QueueDeleteOptions::default())
        .await;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(x.into(), ExchangeKind::Custom(kind.into()), durable, args)
        .await?;
    let qd = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(q.into(), qd, FieldTable::default())
        .await?;
    ch.queue_bind(
        q.into(),
        x.into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Publish `n` messages made by `make` with at most `window` unconfirmed;
/// returns messages per second.
async fn publish(
    ch: &Channel,
    x: &str,
    n: u64,
    window: usize,
    make: impl Fn(u64) -> (Vec<u8>, BasicProperties),
) -> Res<f64> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let mut inflight: VecDeque<lapin::PublisherConfirm> = VecDeque::with_capacity(window);
    for i in 0..n {
        if inflight.len() >= window {
            let c = inflight.pop_front().expect("non-empty");
            if !c.await?.is_ack() {
                return Err("a publish was nacked".into());
            }
        }
        let (body, props) = make(i);
        let c = ch
            .basic_publish(
                x.into(),
                "k".into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        inflight.push_back(c);
    }
    for c in inflight {
        if !c.await?.is_ack() {
            return Err("a publish was nacked".into());
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn delayed(url: &str, pid: Option<u32>, n: u64, seconds: u64) -> Res<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let (x, q) = ("bench-delayed", "bench-delayed-q");
    setup(
        &ch,
        x,
        "x-delayed-message",
        table(&[("x-delayed-type", AMQPValue::LongString("direct".into()))]),
        q,
    )
    .await?;
    // Peak RSS, sampled every 100 ms.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(pid) = pid {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(k) = rss_kib(pid) {
                    peak.fetch_max(k, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    // The consumer, on its own connection.
    let cconn = Connection::connect(url, ConnectionProperties::default()).await?;
    let cch = cconn.create_channel().await?;
    let mut consumer = cch
        .basic_consume(
            q.into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let collect = tokio::spawn(async move {
        use futures_lite::StreamExt;
        let mut late: Vec<i64> = Vec::with_capacity(n as usize);
        while (late.len() as u64) < n {
            let next = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await;
            let Ok(Some(Ok(d))) = next else { break };
            let due = u64::from_be_bytes(d.data[..8].try_into().unwrap_or([0; 8]));
            late.push(unix_ms() as i64 - due as i64);
        }
        late
    });
    let t0 = unix_ms() + 5_000;
    let span = seconds * 1_000;
    let rate = publish(&ch, x, n, 1_000, |i| {
        // Scrambled: publish order is not due order.
        let due = t0 + (i.wrapping_mul(7_919) % n) * span / n;
        let delay = due.saturating_sub(unix_ms()).max(1);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(table(&[("x-delay", AMQPValue::LongLongInt(delay as i64))]));
        // A message published after its due time is due at once: it is
        // measured against the time it was sent.
        let mut body = due.max(unix_ms()).to_be_bytes().to_vec();
        body.resize(16, 0);
        (body, props)
    })
    .await?;
    let published_at = unix_ms();
    let mut late = collect.await?;
    late.sort_unstable();
    let early = late.iter().filter(|&&l| l < 0).count();
    println!(
        "{{\"mode\":\"delayed\",\"messages\":{n},\"due_over_s\":{seconds},\"publish_per_s\":{rate:.0},\"publish_done_after_first_due_ms\":{},\"received\":{},\"early\":{early},\"late_p50_ms\":{},\"late_p99_ms\":{},\"late_max_ms\":{},\"broker_rss_peak_kib\":{}}}",
        published_at as i64 - t0 as i64,
        late.len(),
        pct(&late, 0.5),
        pct(&late, 0.99),
        late.last().copied().unwrap_or(0),
        peak.load(std::sync::atomic::Ordering::Relaxed),
    );
    let _ = ch
        .exchange_delete(x.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(q.into(), QueueDeleteOptions::default())
        .await;
    Ok(())
}

async fn dedup(url: &str, n: u64) -> Res<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut rates = Vec::new();
    for (x, kind, args) in [
        ("bench-plain", "fanout", FieldTable::default()),
        (
            "bench-dedup",
            "x-message-deduplication",
            table(&[("x-cache-size", AMQPValue::LongInt(100_000))]),
        ),
    ] {
        let ch = conn.create_channel().await?;
        let q = format!("{x}-q");
        setup(&ch, x, kind, args, &q).await?;
        let rate = publish(&ch, x, n, 1_000, |i| {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(table(&[(
                    "x-deduplication-header",
                    AMQPValue::LongString(format!("payment-{i}").into()),
                )]));
            (vec![0u8; 16], props)
        })
        .await?;
        rates.push(rate);
        let _ = ch
            .exchange_delete(x.into(), ExchangeDeleteOptions::default())
            .await;
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    println!(
        "{{\"mode\":\"dedup\",\"messages\":{n},\"fanout_publish_per_s\":{:.0},\"dedup_publish_per_s\":{:.0}}}",
        rates[0], rates[1]
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let url = flag("--url").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let pid = flag("--pid").and_then(|p| p.parse().ok());
    let num =
        |i: usize| -> Res<u64> { Ok(args.get(i).ok_or("missing a number argument")?.parse()?) };
    match args.first().map(String::as_str) {
        Some("delayed") => delayed(&url, pid, num(1)?, num(2)?).await,
        Some("dedup") => dedup(&url, num(1)?).await,
        _ => Err("usage: feature_bench delayed N SECONDS | dedup N [--url URL] [--pid PID]".into()),
    }
}
