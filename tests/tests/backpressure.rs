//! Publishers that outrun a queue's consumers: the queue holds them back
//! (TCP back-pressure) once its in-memory backlog reaches its bound, so
//! memory stays flat and the consumers set the pace; a stalled consumer
//! does not hold anybody. Warren's own policy (RabbitMQ lets the queue grow
//! until its memory alarm), so these tests skip themselves elsewhere.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warren_tests::lapin_util::*;
use warren_tests::{unique, within, TestBroker};

/// The queue's bound (4 page windows) plus a mailbox's worth of publishes
/// that may already be on their way in.
const HOLD: u32 = 4 * 4096;
const SLACK: u32 = 1024 + 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_sets_the_pace_and_the_backlog_stays_bounded() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let q = unique("bp");
    let (_c, ch) = b.channel().await;
    declare_queue(&ch, &q).await;

    // A consumer that takes one message at a time, slowly, until told to
    // hurry; it checks the order.
    let fast = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let (cc, cch) = b.channel().await;
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let total: u64 = 30_000;
    let consuming = {
        let (fast, got) = (fast.clone(), got.clone());
        tokio::spawn(async move {
            while got.load(Ordering::Relaxed) < total {
                let d = consumer.next().await.expect("a delivery").expect("ok");
                let n = got.load(Ordering::Relaxed);
                assert_eq!(d.data, n.to_string().as_bytes(), "in order");
                d.ack(BasicAckOptions::default()).await.unwrap();
                got.store(n + 1, Ordering::Relaxed);
                if !fast.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            drop(cc);
        })
    };

    // A publisher as fast as it can go.
    let (pc, pch) = b.channel().await;
    let publishing = {
        let q = q.clone();
        tokio::spawn(async move {
            for i in 0..total {
                pch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    i.to_string().as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
            }
            drop(pc);
        })
    };

    // The backlog reaches the bound and stays there (without the hold it
    // would grow to nearly all 30,000: the consumer takes 500 a second).
    let (_oc, och) = b.channel().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut peak = 0;
    let mut held_since: Option<Instant> = None;
    loop {
        let n = passive_queue(&och, &q).await.unwrap().message_count();
        peak = peak.max(n);
        assert!(
            n <= HOLD + SLACK,
            "backlog {n} over the bound {HOLD} (+{SLACK})"
        );
        if n >= HOLD {
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "backlog never reached the bound (peak {peak})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (The publisher may well have handed everything to its socket: what
    // the queue holds back waits in socket buffers and the client.)

    // Once the consumer hurries, everything arrives, in order.
    fast.store(true, Ordering::Relaxed);
    let minute = Duration::from_secs(60);
    tokio::time::timeout(minute, publishing)
        .await
        .expect("the publisher finishes")
        .unwrap();
    tokio::time::timeout(minute, consuming)
        .await
        .expect("the consumer gets everything")
        .unwrap();
    assert_eq!(got.load(Ordering::Relaxed), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_does_not_hold_publishers() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let q = unique("bp-stalled");
    let (_c, ch) = b.channel().await;
    declare_queue(&ch, &q).await;
    // Takes 10 messages and never acks them.
    let (_cc, cch) = b.channel().await;
    cch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let _consumer = cch
        .basic_consume(
            q.as_str().into(),
            "stalled".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Well over the bound, every one confirmed (enqueued).
    let total = 2 * HOLD;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = std::collections::VecDeque::new();
    for i in 0..total {
        let c = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        confirms.push_back(c);
        if confirms.len() >= 1024 {
            let c = within("a confirm", confirms.pop_front().unwrap()).await;
            assert!(c.unwrap().is_ack());
        }
    }
    for c in confirms {
        assert!(within("a confirm", c).await.unwrap().is_ack());
    }
    wait_count(&ch, &q, total - 10).await;
}
