//! Resource alarms: while the memory or disk alarm is on, connections that
//! publish are blocked (`connection.blocked` with RabbitMQ's reason text,
//! input suspended), connections that only consume keep working, and when
//! the alarm clears `connection.unblocked` arrives and the held publishes go
//! through, none lost. The limits are changed at run time through the
//! in-process broker's `Alarms` (these tests skip themselves against an
//! external broker).

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Event};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::alarm::Alarms;
use warren_protocol::client;
use warren_protocol::frame::BODY;
use warren_tests::lapin_util::*;
use warren_tests::raw::{encode, frame, Raw};
use warren_tests::{unique, within, TestBroker};

/// A limit so high that no alarm is on.
const HIGH: u64 = 1 << 60;

type Events = Pin<Box<dyn futures_lite::Stream<Item = Event> + Send>>;

fn events(conn: &Connection) -> Events {
    Box::pin(conn.events_listener())
}

/// The next `connection.blocked` reason on `ev` (other events skipped).
async fn next_blocked(ev: &mut Events) -> String {
    within("connection.blocked", async {
        loop {
            match ev.next().await {
                Some(Event::ConnectionBlocked(r)) => return r,
                Some(Event::ConnectionUnblocked) => panic!("unblocked before blocked"),
                Some(Event::Error(e)) => panic!("connection error: {e}"),
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
}

/// Wait for `connection.unblocked` on `ev`.
async fn next_unblocked(ev: &mut Events) {
    within("connection.unblocked", async {
        loop {
            match ev.next().await {
                Some(Event::ConnectionUnblocked) => return,
                Some(Event::ConnectionBlocked(r)) => panic!("blocked again: {r}"),
                Some(Event::Error(e)) => panic!("connection error: {e}"),
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
}

async fn publish_confirmed(ch: &Channel, queue: &str, body: &str) {
    let c = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("basic.publish")
        .await
        .expect("confirm");
    assert!(c.is_ack(), "{body}: {c:?}");
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

/// The whole cycle: messages queued before the alarm, the alarm goes on
/// (`raise`), a publisher is blocked with `reason`, a consumer on another
/// connection drains what was queued, the alarm clears (`clear`), the held
/// publishes arrive.
async fn blocked_cycle(
    broker: &TestBroker,
    alarms: &Arc<Alarms>,
    raise: impl Fn(),
    clear: impl Fn(),
    reason: &str,
) {
    let q = unique("alarm");
    let (pconn, pch) = broker.channel().await;
    let mut pev = events(&pconn);
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    declare_queue(&pch, &q).await;
    for i in 0..5 {
        publish_confirmed(&pch, &q, &format!("before-{i}")).await;
    }

    raise();
    assert_eq!(alarms.state().reason(), Some(reason));

    // The publisher keeps publishing; nothing of it may be lost.
    let held = {
        let (pch, q) = (pch.clone(), q.clone());
        tokio::spawn(async move {
            let mut confirms = Vec::new();
            for i in 0..10 {
                let body = format!("held-{i}");
                let c = pch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("basic.publish");
                confirms.push(c);
            }
            for c in confirms {
                let c = c.await.expect("confirm");
                assert!(c.is_ack(), "{c:?}");
            }
        })
    };
    assert_eq!(next_blocked(&mut pev).await, reason);
    assert!(pconn.status().blocked());

    // Another connection that only consumes is not blocked, and the
    // publishes held above have not reached the queue.
    let (cconn, cch) = broker.channel().await;
    let q_state = passive_queue(&cch, &q).await.expect("passive declare");
    assert_eq!(
        q_state.message_count(),
        5,
        "held publishes reached the queue"
    );
    cch.basic_qos(3, BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    for i in 0..5 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(body(&d), format!("before-{i}"));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "publishes were confirmed while blocked"
    );
    assert!(
        !cconn.status().blocked(),
        "a consumer connection was blocked"
    );

    clear();
    assert_eq!(alarms.state().reason(), None);
    next_unblocked(&mut pev).await;
    for i in 0..10 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(body(&d), format!("held-{i}"));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    within("the held publishes' confirms", held)
        .await
        .expect("publisher task");
    assert_no_delivery(&mut consumer, Duration::from_millis(100)).await;
    assert!(!pconn.status().blocked());

    // Publishing works as before.
    publish_confirmed(&pch, &q, "after").await;
    assert_eq!(body(&next_delivery(&mut consumer).await), "after");
    pconn.close(200, "bye".into()).await.expect("close");
    cconn.close(200, "bye".into()).await.expect("close");
}

#[tokio::test]
async fn memory_alarm_blocks_publishers_but_not_consumers() {
    let broker = TestBroker::start().await;
    let Some(alarms) = broker.alarms() else {
        return;
    };
    assert_eq!(alarms.state().reason(), None);
    blocked_cycle(
        &broker,
        &alarms,
        || alarms.set_memory_limit(1),
        || alarms.set_memory_limit(HIGH),
        "low on memory",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn disk_alarm_blocks_publishers_but_not_consumers() {
    let broker = TestBroker::start().await;
    let Some(alarms) = broker.alarms() else {
        return;
    };
    // More free space demanded than any disk has.
    blocked_cycle(
        &broker,
        &alarms,
        || alarms.set_disk_free_limit(HIGH),
        || alarms.set_disk_free_limit(0),
        "low on disk",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn alarm_on_at_start_blocks_the_first_publish() {
    // A memory limit of 1 byte: the alarm is on from the start.
    let broker = TestBroker::start_with(|c| c.memory_limit = 1).await;
    let Some(alarms) = broker.alarms() else {
        return;
    };
    assert_eq!(alarms.state().reason(), Some("low on memory"));
    assert!(alarms.paging());
    let q = unique("alarm-start");
    let (pconn, pch) = broker.channel().await;
    let mut pev = events(&pconn);
    // Methods without content are not publishes: they still work.
    declare_queue(&pch, &q).await;
    sync(&pch).await;
    assert!(!pconn.status().blocked());
    publish(&pch, "", &q, b"m").await;
    assert_eq!(next_blocked(&mut pev).await, "low on memory");
    let (_cconn, cch) = broker.channel().await;
    assert_eq!(passive_queue(&cch, &q).await.unwrap().message_count(), 0);

    // Both alarms: still one connection.blocked, and unblocked only when
    // both have cleared.
    alarms.set_disk_free_limit(HIGH);
    assert_eq!(alarms.state().reason(), Some("low on memory & disk"));
    alarms.set_memory_limit(HIGH);
    assert!(!alarms.paging());
    assert_eq!(alarms.state().reason(), Some("low on disk"));
    assert_no_delivery_count(&cch, &q, 0).await;
    alarms.set_disk_free_limit(0);
    next_unblocked(&mut pev).await;
    wait_count(&cch, &q, 1).await;
    assert_eq!(drain(&cch, &q).await, vec!["m".to_owned()]);
    broker.stop().await;
}

/// The queue still holds `n` messages after a short wait (nothing arrives
/// while the publisher is blocked).
async fn assert_no_delivery_count(ch: &Channel, q: &str, n: u32) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(passive_queue(ch, q).await.unwrap().message_count(), n);
}

#[tokio::test]
async fn a_blocked_connection_is_not_dropped_for_missing_heartbeats() {
    // Heartbeat 1 s: a client that stops writing while blocked (lapin does)
    // would be dropped after 2 s if Warren kept checking.
    let broker = TestBroker::start_with(|c| c.heartbeat = 1).await;
    let Some(alarms) = broker.alarms() else {
        return;
    };
    let q = unique("alarm-hb");
    let (pconn, pch) = broker.channel().await;
    let mut pev = events(&pconn);
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    declare_queue(&pch, &q).await;
    alarms.set_memory_limit(1);
    let held = {
        let (pch, q) = (pch.clone(), q.clone());
        tokio::spawn(async move { publish_confirmed(&pch, &q, "held").await })
    };
    assert_eq!(next_blocked(&mut pev).await, "low on memory");
    // Stay blocked for several heartbeat timeouts.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(pconn.status().connected(), "blocked connection was closed");
    alarms.set_memory_limit(HIGH);
    next_unblocked(&mut pev).await;
    within("the held publish's confirm", held)
        .await
        .expect("publisher task");
    let (_c, cch) = broker.channel().await;
    assert_eq!(drain(&cch, &q).await, vec!["held".to_owned()]);
    assert!(pconn.status().connected());
    broker.stop().await;
}

#[tokio::test]
async fn without_the_capability_a_publisher_is_blocked_silently() {
    let broker = TestBroker::start().await;
    let Some(alarms) = broker.alarms() else {
        return;
    };
    let q = unique("alarm-raw");
    // The raw client's client-properties announce no capabilities.
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.declare_queue(1, &q).await;
    alarms.set_memory_limit(1);
    let p = encode(|b| {
        client::publish(b, 1, "", &q);
        client::content_header(b, 1, 2, false);
        b.extend_from_slice(&frame(BODY, 1, b"hi"));
    });
    raw.send(&p).await;
    let (_c, cch) = broker.channel().await;
    assert_no_delivery_count(&cch, &q, 0).await;
    alarms.set_memory_limit(HIGH);
    wait_count(&cch, &q, 1).await;
    // No connection.blocked or unblocked came: the next method is the
    // answer to this declare.
    raw.declare_queue(1, &q).await;
    assert_eq!(drain(&cch, &q).await, vec!["hi".to_owned()]);
}
