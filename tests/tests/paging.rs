//! Queues longer than their in-memory window: the part beyond the window
//! lives only on disk and is read back in order. Clients see none of it:
//! order, counts, `basic.get`, purge and concurrent publishers behave as for
//! a short queue. (These tests pass against RabbitMQ too.)

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use warren_tests::lapin_util::*;
use warren_tests::{unique, within, TestBroker};

/// Well beyond a paging queue's window of 4,096 messages.
const N: usize = 10_000;

async fn durable_queue(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
}

/// Publish `bodies` persistent (or not) on a confirming channel; every one
/// must be acked.
async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    bodies: impl Iterator<Item = String>,
    persistent: bool,
) {
    let props = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let mut inflight = VecDeque::new();
    for b in bodies {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                props.clone(),
            )
            .await
            .expect("publish");
        inflight.push_back(c);
        if inflight.len() >= 512 {
            let c = within("a confirm", inflight.pop_front().unwrap()).await;
            assert!(c.expect("confirm").is_ack());
        }
    }
    for c in inflight {
        assert!(within("a confirm", c).await.expect("confirm").is_ack());
    }
}

async fn confirming(b: &TestBroker) -> (lapin::Connection, Channel) {
    let (c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (c, ch)
}

/// Consume `n` messages (prefetch 500, acked in batches) and return bodies.
async fn consume(ch: &Channel, queue: &str, n: usize) -> Vec<String> {
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = next_delivery(&mut consumer).await;
        out.push(String::from_utf8(d.data.clone()).unwrap());
        if out.len() % 250 == 0 || out.len() == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    out
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn a_persistent_backlog_beyond_the_window_comes_back_in_order() {
    let b = TestBroker::start().await;
    let (_c, ch) = confirming(&b).await;
    let q = unique("paging");
    durable_queue(&ch, &q, FieldTable::default()).await;
    let want = numbered("m", N);
    publish_confirmed(&ch, &q, want.iter().cloned(), true).await;
    assert_eq!(
        passive_queue(&ch, &q).await.unwrap().message_count(),
        N as u32
    );
    // basic.get first, then a consumer for the rest.
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(String::from_utf8(get_body(&ch, &q).await.expect("a message")).unwrap());
    }
    got.extend(consume(&ch, &q, N - 10).await);
    assert!(
        got == want,
        "order differs (first difference at {:?})",
        got.iter().zip(&want).position(|(a, b)| a != b)
    );
    wait_count(&ch, &q, 0).await;
    assert_eq!(get_body(&ch, &q).await, None);
    if let Some(broker) = b.broker() {
        // The paged-out bodies were still hot: read back from the cache.
        let hits = broker.persister.body_stats.hits.load(Relaxed);
        assert!(hits > 0, "body cache hits: {hits}");
        let routes = &broker.vhost("/").expect("vhost").route_stats;
        assert!(
            routes.hits.load(Relaxed) >= N as u64 - 1,
            "route cache hits"
        );
        assert!(routes.misses.load(Relaxed) >= 1, "route cache misses");
    }
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lazy_queue_pages_transient_messages_and_keeps_their_order() {
    let b = TestBroker::start().await;
    let (_c, ch) = confirming(&b).await;
    let q = unique("lazy");
    let mut args = FieldTable::default();
    args.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let want = numbered("t", N);
    publish_confirmed(&ch, &q, want.iter().cloned(), false).await;
    assert_eq!(
        passive_queue(&ch, &q).await.unwrap().message_count(),
        N as u32
    );
    let got = consume(&ch, &q, N).await;
    assert!(got == want, "order differs");
    wait_count(&ch, &q, 0).await;
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_publishers_into_a_paging_queue_lose_and_duplicate_nothing() {
    let b = TestBroker::start().await;
    let (_c, ch) = confirming(&b).await;
    let q = unique("paging2");
    durable_queue(&ch, &q, FieldTable::default()).await;
    let per = 6_000;
    let mut tasks = Vec::new();
    for p in 0..3 {
        let (c, ch) = confirming(&b).await;
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            publish_confirmed(
                &ch,
                &q,
                numbered(&format!("p{p}-"), per).into_iter(),
                p != 2,
            )
            .await;
            drop(c);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = consume(&ch, &q, 3 * per).await;
    for p in 0..3 {
        let prefix = format!("p{p}-");
        let mine: Vec<&String> = got.iter().filter(|b| b.starts_with(&prefix)).collect();
        let want = numbered(&prefix, per);
        assert_eq!(mine.len(), per, "publisher {p}: every message exactly once");
        assert!(
            mine.iter().zip(&want).all(|(a, b)| *a == b),
            "publisher {p}: in its order"
        );
    }
    wait_count(&ch, &q, 0).await;
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn purging_a_paging_queue_removes_what_is_on_disk_too() {
    let b = TestBroker::start().await;
    let (_c, ch) = confirming(&b).await;
    let q = unique("purge");
    durable_queue(&ch, &q, FieldTable::default()).await;
    publish_confirmed(&ch, &q, numbered("old", N).into_iter(), true).await;
    let purged = ch
        .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, N as u32);
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);
    publish_confirmed(&ch, &q, numbered("new", 5).into_iter(), true).await;
    assert_eq!(drain(&ch, &q).await, numbered("new", 5));
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
