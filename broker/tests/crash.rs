//! Crash safety of the `warren` process: publishers on several connections
//! send persistent messages with confirms; the broker is killed with SIGKILL
//! at a varying moment, several rounds on one data directory. Every message
//! whose confirm arrived must be there after the restart. Duplicates and
//! unconfirmed-but-present messages are allowed and reported separately.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warren_tests::daemon::{free_port, Daemon};

/// The daemon under test.
const WARREN: &str = env!("CARGO_BIN_EXE_warren");

const QUEUE: &str = "crash";
const PUBLISHERS: usize = 3;
const ROUNDS: usize = 4;
const WINDOW: usize = 64;

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn declare(ch: &Channel) {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), opts, FieldTable::default())
        .await
        .expect("declare");
}

/// Publish until the connection dies; record every confirmed body.
async fn publisher(d_port: u16, round: usize, p: usize, confirmed: Arc<Mutex<HashSet<String>>>) {
    publisher_with(d_port, round, p, WINDOW, confirmed).await
}

/// [`publisher`] with at most `window` unconfirmed messages.
async fn publisher_with(
    d_port: u16,
    round: usize,
    p: usize,
    window: usize,
    confirmed: Arc<Mutex<HashSet<String>>>,
) {
    let url = format!("amqp://guest:guest@127.0.0.1:{d_port}/%2f");
    let Ok(c) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(ch) = c.create_channel().await else {
        return;
    };
    if ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return;
    }
    let mut inflight = std::collections::VecDeque::new();
    for i in 0.. {
        let body = format!("r{round}-p{p}-{i}");
        let Ok(confirm) = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                persistent(),
            )
            .await
        else {
            return;
        };
        inflight.push_back((body, confirm));
        if inflight.len() >= window {
            let (body, confirm) = inflight.pop_front().expect("non-empty");
            match confirm.await {
                Ok(Confirmation::Ack(_)) => {
                    confirmed.lock().unwrap().insert(body);
                }
                _ => return,
            }
        }
    }
}

/// Drain the queue (acking everything) and return what it held.
async fn drain(ch: &Channel) -> Vec<String> {
    let mut got = Vec::new();
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(1500), consumer.next()).await
    {
        got.push(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    got
}

/// A pseudo-random kill delay (no rand dependency): 150..900 ms.
fn delay(round: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(
        150 + (nanos
            .wrapping_mul(2654435761)
            .wrapping_add(round as u64 * 97))
            % 750,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_message_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    {
        let d = Daemon::start(WARREN, dir.path(), port);
        let (_c, ch) = d.channel().await;
        declare(&ch).await;
    }
    let mut totals = (0usize, 0usize, 0usize); // confirmed, duplicates, unconfirmed present
    for round in 0..ROUNDS {
        let d = Daemon::start(WARREN, dir.path(), port);
        let confirmed = Arc::new(Mutex::new(HashSet::new()));
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|p| tokio::spawn(publisher(port, round, p, confirmed.clone())))
            .collect();
        tokio::time::sleep(delay(round)).await;
        d.kill();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let confirmed = confirmed.lock().unwrap().clone();

        let d = Daemon::start(WARREN, dir.path(), port);
        let (_c, ch) = d.channel().await;
        let got = drain(&ch).await;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for b in &got {
            *seen.entry(b.as_str()).or_default() += 1;
        }
        let missing: Vec<&String> = confirmed
            .iter()
            .filter(|b| !seen.contains_key(b.as_str()))
            .collect();
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        let unconfirmed = seen
            .keys()
            .filter(|b| !confirmed.contains(**b) && b.starts_with(&format!("r{round}-")))
            .count();
        eprintln!(
            "round {round}: {} confirmed, {} recovered, {duplicates} duplicates, {unconfirmed} unconfirmed but present",
            confirmed.len(),
            got.len()
        );
        assert!(
            missing.is_empty(),
            "round {round}: {} confirmed messages lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(
            !confirmed.is_empty(),
            "round {round}: nothing was confirmed before the kill"
        );
        totals.0 += confirmed.len();
        totals.1 += duplicates;
        totals.2 += unconfirmed;
        // Let the acks of the drain reach the store before the next round.
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.kill();
    }
    eprintln!(
        "total: {} confirmed, none lost; {} duplicates, {} unconfirmed but present",
        totals.0, totals.1, totals.2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_come_back_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start(WARREN, dir.path(), port);
    {
        let (_c, ch) = d.channel().await;
        declare(&ch).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..10 {
            let body = format!("m{i}");
            let c = ch
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            assert!(matches!(c.await.unwrap(), Confirmation::Ack(_)));
        }
        // Take five without acking them.
        for _ in 0..5 {
            let m = ch
                .basic_get(QUEUE.into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap();
            assert!(m.is_some());
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    }
    d.kill();
    let d = Daemon::start(WARREN, dir.path(), port);
    let (_c, ch) = d.channel().await;
    let mut bodies = Vec::new();
    while let Some(m) = ch
        .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert!(
            m.delivery.redelivered,
            "recovered messages are marked redelivered"
        );
        bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "all ten, in order");
    drop(d);
}

/// Consume and ack until the connection dies; record every acked body.
async fn acking_consumer(d_port: u16, acked: Arc<Mutex<HashSet<String>>>) {
    let url = format!("amqp://guest:guest@127.0.0.1:{d_port}/%2f");
    let Ok(c) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(ch) = c.create_channel().await else {
        return;
    };
    if ch.basic_qos(200, BasicQosOptions::default()).await.is_err() {
        return;
    }
    let Ok(mut consumer) = ch
        .basic_consume(
            QUEUE.into(),
            "acker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    else {
        return;
    };
    while let Some(Ok(d)) = consumer.next().await {
        if d.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
        acked
            .lock()
            .unwrap()
            .insert(String::from_utf8_lossy(&d.data).into_owned());
    }
}

/// A counter from the Prometheus endpoint (plain HTTP/1.0, no client crate).
fn metric(port: u16, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Messages acked before their write reached the store are never written
/// (`elide_consumed`), and their confirms go out without a sync: a crash
/// must still lose no confirmed message that was not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_sigkill_while_consumers_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (free_port(), free_port());
    let metrics_arg = metrics.to_string();
    // A long wait, so that acks overtake writes even on a slow machine.
    let flags = [
        "--log-level",
        "warn",
        "--commit-wait",
        "2000",
        "--prometheus-port",
        &metrics_arg,
    ];
    {
        let d = Daemon::start_with(WARREN, dir.path(), port, &flags);
        let (_c, ch) = d.channel().await;
        declare(&ch).await;
    }
    let mut elided = 0;
    for round in 0..ROUNDS {
        let d = Daemon::start_with(WARREN, dir.path(), port, &flags);
        let confirmed = Arc::new(Mutex::new(HashSet::new()));
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let consumer = tokio::spawn(acking_consumer(port, acked.clone()));
        // Publishers the consumer keeps up with (a small window each), so
        // that its acks reach messages still waiting for their write.
        let tasks: Vec<_> = (0..2)
            .map(|p| tokio::spawn(publisher_with(port, round, p, 4, confirmed.clone())))
            .collect();
        // Kill at a random moment once both sides are under way.
        let started = Instant::now();
        while confirmed.lock().unwrap().is_empty() || acked.lock().unwrap().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: nothing confirmed and acked in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(delay(round)).await;
        elided += metric(metrics, "warren_store_elided_operations_total").unwrap_or(0);
        d.kill();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
        let (confirmed, acked) = (
            confirmed.lock().unwrap().clone(),
            acked.lock().unwrap().clone(),
        );

        let d = Daemon::start_with(WARREN, dir.path(), port, &flags);
        let (_c, ch) = d.channel().await;
        let got: HashSet<String> = drain(&ch).await.into_iter().collect();
        let missing: Vec<&String> = confirmed
            .iter()
            .filter(|b| !got.contains(*b) && !acked.contains(*b))
            .collect();
        eprintln!(
            "round {round}: {} confirmed, {} acked before the kill, {} recovered",
            confirmed.len(),
            acked.len(),
            got.len()
        );
        assert!(
            missing.is_empty(),
            "round {round}: {} confirmed messages neither acked nor recovered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(
            !confirmed.is_empty() && !acked.is_empty(),
            "round {round}: nothing was confirmed or acked before the kill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.kill();
    }
    eprintln!("{elided} store operations elided over the rounds");
    assert!(
        elided > 0,
        "no write was elided: the test did not exercise acks overtaking writes"
    );
}
