//! Streams with lapin: Warren's exact filtering (`x-stream-filter`,
//! `x-stream-match-unfiltered`), server-side offset tracking
//! (`x-stream-automatic-offset-tracking`), replay of more messages than a
//! stream keeps in memory (read back from the store, filtered there too),
//! and many consumers at the end of a live stream. RabbitMQ's behaviour is
//! covered by conformance/test_streams.py on both brokers; these are
//! Warren's own (RabbitMQ 3.10 has no filtering or tracking).

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;
use warren_tests::lapin_util::*;
use warren_tests::{unique, within, TestBroker};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_stream(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[("x-queue-type", text("stream"))]),
    )
    .await
    .expect("declare stream");
}

/// Publish `bodies` with confirms; `filter` sets `x-stream-filter-value`.
async fn append(ch: &Channel, stream: &str, bodies: &[(String, Option<&str>)]) {
    let mut pending = Vec::with_capacity(bodies.len());
    for (body, filter) in bodies {
        let mut props = BasicProperties::default();
        if let Some(f) = filter {
            props = props.with_headers(args(&[("x-stream-filter-value", text(f))]));
        }
        pending.push(
            ch.basic_publish(
                "".into(),
                stream.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(p.await.expect("confirm").is_ack());
    }
}

/// A consumer with prefetch `prefetch` on a fresh channel.
async fn consume(
    conn: &Connection,
    stream: &str,
    tag: &str,
    prefetch: u16,
    a: FieldTable,
) -> (Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_consume(stream.into(), tag.into(), BasicConsumeOptions::default(), a)
        .await
        .expect("consume");
    (ch, c)
}

/// The offset header of a delivery.
fn offset_of(d: &lapin::message::Delivery) -> i64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(o)) => o,
        other => panic!("no x-stream-offset header: {other:?}"),
    }
}

/// `n` deliveries (body, offset), each acked.
async fn take(c: &mut lapin::Consumer, n: usize) -> Vec<(String, i64)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = next_delivery(c).await;
        out.push((String::from_utf8_lossy(&d.data).into_owned(), offset_of(&d)));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

fn bodies(v: &[(String, i64)]) -> Vec<&str> {
    v.iter().map(|(b, _)| b.as_str()).collect()
}

#[tokio::test]
async fn filters_deliver_exactly_the_matching_messages() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let s = unique("stream-filter");
    declare_stream(&ch, &s).await;
    let regions = [Some("eu"), Some("us"), None, Some("apac")];
    let msgs: Vec<(String, Option<&str>)> =
        (0..40).map(|i| (format!("m{i}"), regions[i % 4])).collect();
    append(&ch, &s, &msgs).await;
    let want = |f: &dyn Fn(Option<&str>) -> bool| -> Vec<String> {
        msgs.iter()
            .filter(|(_, r)| f(*r))
            .map(|(m, _)| m.clone())
            .collect()
    };
    let first = ("x-stream-offset", text("first"));

    let (_c1, mut eu) = consume(
        &conn,
        &s,
        "eu",
        50,
        args(&[first.clone(), ("x-stream-filter", text("eu"))]),
    )
    .await;
    let got = take(&mut eu, 10).await;
    assert_eq!(bodies(&got), want(&|r| r == Some("eu")));
    // Filtered-out offsets are skipped, not renumbered.
    assert!(got.iter().all(|(b, o)| b == &format!("m{o}")));
    assert_no_delivery(&mut eu, Duration::from_millis(200)).await;

    let list = AMQPValue::FieldArray(FieldArray::from(vec![text("us"), text("apac")]));
    let (_c2, mut two) = consume(
        &conn,
        &s,
        "two",
        50,
        args(&[first.clone(), ("x-stream-filter", list)]),
    )
    .await;
    let got = take(&mut two, 20).await;
    assert_eq!(
        bodies(&got),
        want(&|r| r == Some("us") || r == Some("apac"))
    );
    assert_no_delivery(&mut two, Duration::from_millis(200)).await;

    let (_c3, mut unf) = consume(
        &conn,
        &s,
        "unfiltered",
        50,
        args(&[
            first.clone(),
            ("x-stream-filter", text("eu")),
            ("x-stream-match-unfiltered", AMQPValue::Boolean(true)),
        ]),
    )
    .await;
    let got = take(&mut unf, 20).await;
    assert_eq!(bodies(&got), want(&|r| r.is_none() || r == Some("eu")));

    // New messages are filtered as they arrive.
    append(
        &ch,
        &s,
        &[
            ("late-us".into(), Some("us")),
            ("late-eu".into(), Some("eu")),
        ],
    )
    .await;
    assert_eq!(bodies(&take(&mut eu, 1).await), ["late-eu"]);
    assert_no_delivery(&mut eu, Duration::from_millis(200)).await;

    // A bad filter is refused.
    let ch2 = conn.create_channel().await.unwrap();
    ch2.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let err = ch2
        .basic_consume(
            s.as_str().into(),
            "bad".into(),
            BasicConsumeOptions::default(),
            args(&[("x-stream-filter", AMQPValue::LongLongInt(3))]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406), "{err}");
}

#[tokio::test]
async fn a_tracking_consumer_resumes_where_it_acknowledged() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let s = unique("stream-track");
    declare_stream(&ch, &s).await;
    let msgs: Vec<(String, Option<&str>)> = (0..20).map(|i| (format!("m{i}"), None)).collect();
    append(&ch, &s, &msgs).await;
    let track = (
        "x-stream-automatic-offset-tracking",
        AMQPValue::Boolean(true),
    );
    let first = ("x-stream-offset", text("first"));

    // Acks 0..=6, holds 7 unacked, then its channel closes.
    let (c1, mut c) = consume(
        &conn,
        &s,
        "ledger",
        8,
        args(&[first.clone(), track.clone()]),
    )
    .await;
    take(&mut c, 7).await;
    let held = next_delivery(&mut c).await;
    assert_eq!(offset_of(&held), 7);
    c1.close(200, "bye".into()).await.unwrap();

    // Same tag, no offset: starts at the first unacknowledged (7).
    let (c2, mut c) = consume(&conn, &s, "ledger", 8, args(std::slice::from_ref(&track))).await;
    let got = take(&mut c, 3).await;
    assert_eq!(bodies(&got), ["m7", "m8", "m9"]);
    c2.basic_cancel("ledger".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // An explicit offset wins over the tracked one.
    let (_c3, mut c) = consume(
        &conn,
        &s,
        "ledger",
        8,
        args(&[
            track.clone(),
            ("x-stream-offset", AMQPValue::LongLongInt(2)),
        ]),
    )
    .await;
    assert_eq!(bodies(&take(&mut c, 1).await), ["m2"]);

    // Another tag has no tracked offset: RabbitMQ's default, next.
    let (_c4, mut other) = consume(&conn, &s, "other", 8, args(std::slice::from_ref(&track))).await;
    assert_no_delivery(&mut other, Duration::from_millis(200)).await;
    append(&ch, &s, &[("new".into(), None)]).await;
    assert_eq!(bodies(&take(&mut other, 1).await), ["new"]);

    // Without tracking a consumer never stores anything.
    let (c5, mut plain) = consume(&conn, &s, "plain", 8, args(std::slice::from_ref(&first))).await;
    take(&mut plain, 5).await;
    c5.close(200, "bye".into()).await.unwrap();
    let (_c6, mut plain) = consume(&conn, &s, "plain", 8, args(&[track])).await;
    assert_no_delivery(&mut plain, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_memory_comes_back_from_the_store_in_order() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let s = unique("stream-replay");
    declare_stream(&ch, &s).await;
    // More than the in-memory tail keeps: the oldest are read back.
    let total = warren_broker::queue::stream::TAIL_MESSAGES + 4_000;
    let mut pending = Vec::new();
    for i in 0..total {
        let mut props = BasicProperties::default();
        if i % 10 == 0 {
            props = props.with_headers(args(&[("x-stream-filter-value", text("tenth"))]));
        }
        pending.push(
            ch.basic_publish(
                "".into(),
                s.as_str().into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
        if pending.len() >= 5_000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending.drain(..) {
        p.await.unwrap();
    }
    let (rch, mut all) = consume(
        &conn,
        &s,
        "all",
        1000,
        args(&[("x-stream-offset", text("first"))]),
    )
    .await;
    for i in 0..total {
        let d = within("a replayed delivery", all.next())
            .await
            .expect("stream")
            .expect("delivery");
        assert_eq!(offset_of(&d), i as i64);
        assert_eq!(d.data, i.to_string().as_bytes());
        if i % 500 == 499 {
            rch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    // Filtering applies to what is read back too.
    let (fch, mut tenth) = consume(
        &conn,
        &s,
        "tenth",
        1000,
        args(&[
            ("x-stream-offset", text("first")),
            ("x-stream-filter", text("tenth")),
        ]),
    )
    .await;
    for i in (0..total).step_by(10) {
        let d = next_delivery(&mut tenth).await;
        assert_eq!(offset_of(&d), i as i64);
        fch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
    }
    assert_no_delivery(&mut tenth, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_consumers_at_the_end_each_get_every_new_message() {
    let b = TestBroker::start().await;
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let s = unique("stream-live");
    declare_stream(&ch, &s).await;
    let mut consumers = Vec::new();
    for i in 0..10 {
        consumers.push(consume(&conn, &s, &format!("live{i}"), 100, FieldTable::default()).await);
    }
    let msgs: Vec<(String, Option<&str>)> = (0..300).map(|i| (format!("m{i}"), None)).collect();
    append(&ch, &s, &msgs).await;
    for (_ch, c) in &mut consumers {
        let got = take(c, 300).await;
        assert_eq!(
            bodies(&got),
            msgs.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>()
        );
        let offs: Vec<i64> = got.iter().map(|(_, o)| *o).collect();
        assert!(offs.windows(2).all(|w| w[1] == w[0] + 1), "dense offsets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_replay_in_order_through_a_bounded_read_ahead() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let s = unique("stream-large");
    declare_stream(&ch, &s).await;
    // 96 MiB: more than the in-memory tail's 64 MiB, so the oldest come
    // back from the store, a few at a time (a read is capped in bytes).
    let n = 96;
    let mut pending = Vec::new();
    for i in 0..n {
        let mut body = vec![b'.'; 1 << 20];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        pending.push(
            ch.basic_publish(
                "".into(),
                s.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    for p in pending {
        assert!(p.await.unwrap().is_ack());
    }
    let (_rch, mut c) = consume(
        &conn,
        &s,
        "big",
        4,
        args(&[("x-stream-offset", text("first"))]),
    )
    .await;
    for i in 0..n {
        let d = next_delivery(&mut c).await;
        assert_eq!(offset_of(&d), i as i64);
        assert_eq!(d.data.len(), 1 << 20);
        assert_eq!(&d.data[..8], &(i as u64).to_be_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test]
async fn a_stream_consumer_timeout_is_refused_not_ignored() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (conn, ch) = b.channel().await;
    let s = unique("stream-timeout");
    declare_stream(&ch, &s).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let err = ch
        .basic_consume(
            s.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            args(&[("x-consumer-timeout", AMQPValue::LongLongInt(1000))]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406), "{err}");
    assert!(
        err.to_string().contains("stream consumers have no timeout"),
        "{err}"
    );
}

/// A publish through the management API into a stream is answered once
/// the append is durable (the stream settles its confirms in batches, a
/// batch of one as a plain confirm), and lands in the stream in order with
/// the AMQP appends around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_publishes_into_a_stream() {
    let b = TestBroker::start_with(|c| c.management = Some("127.0.0.1:0".parse().unwrap())).await;
    let Some(broker) = b.broker() else {
        return;
    };
    let api = broker.listen_addrs.http.unwrap();
    let (conn, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let stream = unique("api-stream");
    declare_stream(&ch, &stream).await;
    append(&ch, &stream, &[("amqp-0".to_string(), None)]).await;
    let path = "/api/exchanges/%2F/amq.default/publish".to_string();
    for i in 0..3 {
        let body = serde_json::json!({
            "properties": {},
            "routing_key": stream,
            "payload": format!("api-{i}"),
            "payload_encoding": "string",
        });
        let r = tokio::task::block_in_place(|| {
            warren_tests::http::request(api, "POST", &path, ("guest", "guest"), Some(&body))
        });
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["routed"], true, "{r:?}");
    }
    append(&ch, &stream, &[("amqp-1".to_string(), None)]).await;
    let (_c, mut c) = consume(
        &conn,
        &stream,
        "api-reader",
        10,
        args(&[("x-stream-offset", text("first"))]),
    )
    .await;
    let got = within("the five messages", take(&mut c, 5)).await;
    assert_eq!(
        got,
        [
            ("amqp-0", 0),
            ("api-0", 1),
            ("api-1", 2),
            ("api-2", 3),
            ("amqp-1", 4)
        ]
        .map(|(b, o)| (b.to_string(), o))
    );
}
