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
        if inflight.len() >= WINDOW {
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
