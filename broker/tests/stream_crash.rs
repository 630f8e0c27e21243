//! Crash safety of streams: publishers send with confirms to a stream while
//! consumers read it, and the `warren` process is killed with SIGKILL at a
//! varying moment, several rounds on one data directory. After each restart
//! the whole stream is read from the first offset:
//! - every confirmed message is there;
//! - offsets run without a gap, in order;
//! - every message a consumer was given before the kill is at the offset it
//!   had (a consumer never sees what a crash then takes back);
//! - a tracking consumer resumes no later than just after its last ack.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warren_tests::daemon::{free_port, Daemon};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");
const STREAM: &str = "crash-stream";
const PUBLISHERS: usize = 3;
const READERS: usize = 2;
const ROUNDS: usize = 3;
const WINDOW: usize = 64;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare(ch: &Channel) {
    ch.queue_declare(
        STREAM.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[("x-queue-type", text("stream"))]),
    )
    .await
    .expect("declare stream");
}

fn offset_of(d: &lapin::message::Delivery) -> u64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(o)) => o as u64,
        other => panic!("no x-stream-offset header: {other:?}"),
    }
}

/// Publish until the connection dies; record every confirmed body.
async fn publisher(port: u16, round: usize, p: usize, confirmed: Arc<Mutex<HashSet<String>>>) {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
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
        // Transient and persistent alike: a stream stores both.
        let props = BasicProperties::default().with_delivery_mode(1 + (i % 2) as u8);
        let Ok(confirm) = ch
            .basic_publish(
                "".into(),
                STREAM.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
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

/// Read from `start` (tracking with `tag` if given), acking, until the
/// connection dies; record (offset, body) and the last offset acked.
async fn reader(
    port: u16,
    tag: String,
    args: FieldTable,
    seen: Arc<Mutex<Vec<(u64, String)>>>,
    acked: Arc<Mutex<Option<u64>>>,
) {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
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
            STREAM.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
    else {
        return;
    };
    while let Some(Ok(d)) = consumer.next().await {
        let o = offset_of(&d);
        seen.lock()
            .unwrap()
            .push((o, String::from_utf8_lossy(&d.data).into_owned()));
        if d.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
        *acked.lock().unwrap() = Some(o);
    }
}

/// The whole stream from the first offset, until it goes quiet.
async fn read_all(ch: &Channel) -> Vec<(u64, String)> {
    ch.basic_qos(2000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = ch
        .basic_consume(
            STREAM.into(),
            "check".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", text("first"))]),
        )
        .await
        .expect("consume");
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(1500), c.next()).await {
        out.push((offset_of(&d), String::from_utf8_lossy(&d.data).into_owned()));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    ch.basic_cancel("check".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    out
}

/// A pseudo-random kill delay: 200..900 ms.
fn delay(round: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(200 + (nanos.wrapping_mul(2654435761) + round as u64 * 131) % 700)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_stream_messages_survive_sigkill_at_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    {
        let d = Daemon::start(WARREN, dir.path(), port);
        let (_c, ch) = d.channel().await;
        declare(&ch).await;
    }
    let mut all_confirmed: HashSet<String> = HashSet::new();
    let mut all_seen: HashMap<u64, String> = HashMap::new();
    let mut tracked_acked: Option<u64> = None;
    for round in 0..ROUNDS {
        let d = Daemon::start(WARREN, dir.path(), port);
        let confirmed = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        let mut seen = Vec::new();
        for r in 0..READERS {
            let s = Arc::new(Mutex::new(Vec::new()));
            seen.push(s.clone());
            let args = table(&[("x-stream-offset", text("first"))]);
            tasks.push(tokio::spawn(reader(
                port,
                format!("reader{r}"),
                args,
                s,
                Arc::new(Mutex::new(None)),
            )));
        }
        // A tracking consumer: resumes by itself round after round.
        let tracked_seen = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(None));
        let args = table(&[(
            "x-stream-automatic-offset-tracking",
            AMQPValue::Boolean(true),
        )]);
        tasks.push(tokio::spawn(reader(
            port,
            "tracker".into(),
            args,
            tracked_seen.clone(),
            acked.clone(),
        )));
        for p in 0..PUBLISHERS {
            tasks.push(tokio::spawn(publisher(port, round, p, confirmed.clone())));
        }
        tokio::time::sleep(delay(round)).await;
        d.kill();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        // The tracker resumed no later than just after its last ack of the
        // previous round (it may repeat a few: at least once).
        if let (Some(prev), Some(&(resumed, _))) =
            (tracked_acked, tracked_seen.lock().unwrap().first())
        {
            assert!(
                resumed <= prev + 1,
                "round {round}: the tracker resumed at {resumed}, after its last ack {prev}"
            );
            eprintln!("round {round}: tracker acked up to {prev} before, resumed at {resumed}");
        }
        if let Some(a) = *acked.lock().unwrap() {
            tracked_acked = Some(a);
        }
        all_confirmed.extend(confirmed.lock().unwrap().iter().cloned());
        for s in seen.iter().chain(std::iter::once(&tracked_seen)) {
            for (o, b) in s.lock().unwrap().iter() {
                if let Some(prev) = all_seen.insert(*o, b.clone()) {
                    assert_eq!(&prev, b, "offset {o} was given out as two messages");
                }
            }
        }

        let d = Daemon::start(WARREN, dir.path(), port);
        let (_c, ch) = d.channel().await;
        let log = read_all(&ch).await;
        let offsets: Vec<u64> = log.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets.first().copied(),
            Some(0),
            "round {round}: starts at 0"
        );
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: offsets have a gap or are out of order"
        );
        let stored: HashMap<u64, &str> = log.iter().map(|(o, b)| (*o, b.as_str())).collect();
        let present: HashSet<&str> = log.iter().map(|(_, b)| b.as_str()).collect();
        let missing: Vec<&String> = all_confirmed
            .iter()
            .filter(|b| !present.contains(b.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} confirmed messages lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        for (o, b) in &all_seen {
            assert_eq!(
                stored.get(o).copied(),
                Some(b.as_str()),
                "round {round}: a consumer was given {b} at offset {o} before the crash"
            );
        }
        let confirmed_now = confirmed.lock().unwrap().len();
        assert!(
            confirmed_now > 0,
            "round {round}: nothing confirmed before the kill"
        );
        eprintln!(
            "round {round}: {confirmed_now} confirmed; stream holds {} (offsets 0..={}); {} deliveries checked",
            log.len(),
            offsets.last().unwrap_or(&0),
            all_seen.len()
        );
        d.kill();
    }
}
