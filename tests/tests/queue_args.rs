//! Queue arguments: message TTL and per-message expiration, x-expires,
//! length limits and overflow (drop-head, reject-publish with basic.nack,
//! reject-publish-dlx), dead-lettering with x-death, priority queues, and
//! the 406s for invalid values.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use std::time::Duration;
use warren_protocol::reply::{NOT_FOUND, PRECONDITION_FAILED};
use warren_tests::lapin_util::*;
use warren_tests::{unique, within, TestBroker};

// ------------------------------------------------------------------ helpers

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

fn int(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

async fn declare_with(ch: &Channel, name: &str, a: FieldTable) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), a)
        .await
}

/// Publish on a confirm channel and return the broker's verdict.
async fn publish_confirmed(
    ch: &Channel,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Confirmation {
    ch.basic_publish(
        "".into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("basic.publish")
    .await
    .expect("confirm")
}

/// A fanout dead-letter exchange with one queue bound to it.
async fn dead_letter_target(ch: &Channel) -> (String, String) {
    let dlx = unique("dlx");
    let dlq = unique("dlq");
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.declare");
    declare_queue(ch, &dlq).await;
    ch.queue_bind(
        dlq.as_str().into(),
        dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.bind");
    (dlx, dlq)
}

/// Wait for one message in `queue` and fetch it (auto-ack).
async fn get_one(ch: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    within("a dead-lettered message", async {
        loop {
            if let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn header<'a>(m: &'a lapin::message::BasicGetMessage, key: &str) -> Option<&'a AMQPValue> {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key))
}

/// The first x-death entry of a dead-lettered message.
fn first_death(m: &lapin::message::BasicGetMessage) -> FieldTable {
    match header(m, "x-death") {
        Some(AMQPValue::FieldArray(a)) => match a.as_slice().first() {
            Some(AMQPValue::FieldTable(t)) => t.clone(),
            other => panic!("x-death entry: {other:?}"),
        },
        other => panic!("x-death header: {other:?}"),
    }
}

fn field_text(t: &FieldTable, key: &str) -> String {
    match t.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("{key}: {other:?}"),
    }
}

// ---------------------------------------------------------------------- TTL

#[tokio::test]
async fn message_ttl_expires_without_consumers() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("ttl");
    declare_with(&ch, &q, args(&[("x-message-ttl", int(50))]))
        .await
        .unwrap();
    publish(&ch, "", &q, b"a").await;
    publish(&ch, "", &q, b"b").await;
    wait_count(&ch, &q, 2).await;
    // Dropped by the queue's own timer: the count goes to 0 without a get.
    wait_count(&ch, &q, 0).await;
    assert_eq!(get_body(&ch, &q).await, None);
    broker.stop().await;
}

#[tokio::test]
async fn per_message_expiration_and_requeue_keeps_expiry() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("expiration");
    declare_queue(&ch, &q).await;
    let short = BasicProperties::default().with_expiration("100".into());
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"short",
        short,
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"forever").await;
    // Take the short-lived one and requeue it: it keeps its expiry.
    let m = within("basic.get", async {
        loop {
            if let Some(m) = ch
                .basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                return m;
            }
        }
    })
    .await;
    assert_eq!(m.delivery.data, b"short");
    ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    )
    .await
    .unwrap();
    wait_count(&ch, &q, 1).await;
    assert_eq!(drain(&ch, &q).await, vec!["forever"]);
    broker.stop().await;
}

#[tokio::test]
async fn expired_messages_are_dead_lettered() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = unique("ttl-dlx");
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-message-ttl", int(30)),
            ("x-dead-letter-exchange", text(&dlx)),
            ("x-dead-letter-routing-key", text("new-key")),
        ]),
    )
    .await
    .unwrap();
    let props = BasicProperties::default()
        .with_expiration("20".into())
        .with_content_type("text/plain".into());
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"old",
        props,
    )
    .await
    .unwrap();
    let m = get_one(&ch, &dlq).await;
    assert_eq!(m.delivery.data, b"old");
    assert_eq!(m.delivery.exchange.as_str(), dlx);
    assert_eq!(m.delivery.routing_key.as_str(), "new-key");
    // The expiration is removed (kept in x-death), other properties stay.
    assert_eq!(m.delivery.properties.expiration(), &None);
    assert_eq!(
        m.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain")
    );
    let d = first_death(&m);
    assert_eq!(field_text(&d, "reason"), "expired");
    assert_eq!(field_text(&d, "queue"), q);
    assert_eq!(field_text(&d, "exchange"), "");
    assert_eq!(field_text(&d, "original-expiration"), "20");
    assert_eq!(d.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert!(matches!(
        d.inner().get("time"),
        Some(AMQPValue::Timestamp(_))
    ));
    assert_eq!(
        d.inner().get("routing-keys"),
        Some(&AMQPValue::FieldArray(vec![text(&q)].into()))
    );
    assert_eq!(header(&m, "x-first-death-reason"), Some(&text("expired")));
    assert_eq!(header(&m, "x-first-death-queue"), Some(&text(&q)));
    assert_eq!(header(&m, "x-first-death-exchange"), Some(&text("")));
    broker.stop().await;
}

#[tokio::test]
async fn dead_letter_cycle_is_dropped() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("cycle");
    // Expired messages go back to the same queue: RabbitMQ drops them.
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-message-ttl", int(10)),
            ("x-dead-letter-exchange", text("")),
        ]),
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"loop").await;
    wait_count(&ch, &q, 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

// ----------------------------------------------------------------- x-expires

#[tokio::test]
async fn unused_queue_expires_and_consumers_keep_it() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("expires");
    declare_with(&ch, &q, args(&[("x-expires", int(100))]))
        .await
        .unwrap();
    let kept = unique("expires-kept");
    declare_with(&ch, &kept, args(&[("x-expires", int(100))]))
        .await
        .unwrap();
    let _consumer = ch
        .basic_consume(
            kept.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ch2 = conn.create_channel().await.unwrap();
    assert_code(passive_queue(&ch2, &q).await, NOT_FOUND);
    // Gone from the vhost: a new declare creates it afresh.
    let ch3 = conn.create_channel().await.unwrap();
    let again = declare_queue(&ch3, &q).await;
    assert_eq!(again.message_count(), 0);
    assert!(passive_queue(&ch3, &kept).await.is_ok());
    broker.stop().await;
}

// ------------------------------------------------------------ length limits

#[tokio::test]
async fn max_length_drop_head_dead_letters_maxlen() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = unique("maxlen");
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-max-length", int(2)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await
    .unwrap();
    for b in ["0", "1", "2", "3"] {
        publish(&ch, "", &q, b.as_bytes()).await;
    }
    wait_count(&ch, &dlq, 2).await;
    assert_eq!(drain(&ch, &q).await, vec!["2", "3"]);
    let m = get_one(&ch, &dlq).await;
    assert_eq!(m.delivery.data, b"0");
    assert_eq!(field_text(&first_death(&m), "reason"), "maxlen");
    assert_eq!(get_body(&ch, &dlq).await.as_deref(), Some(&b"1"[..]));
    broker.stop().await;
}

#[tokio::test]
async fn max_length_bytes_drops_head() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("maxbytes");
    declare_with(&ch, &q, args(&[("x-max-length-bytes", int(10))]))
        .await
        .unwrap();
    for b in ["aaaa", "bbbb", "cccc"] {
        publish(&ch, "", &q, b.as_bytes()).await;
    }
    wait_count(&ch, &q, 2).await;
    assert_eq!(drain(&ch, &q).await, vec!["bbbb", "cccc"]);
    broker.stop().await;
}

#[tokio::test]
async fn reject_publish_nacks_the_publisher() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("reject-publish");
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let none = BasicProperties::default;
    assert_eq!(
        publish_confirmed(&ch, &q, b"fits", none()).await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        publish_confirmed(&ch, &q, b"no", none()).await,
        Confirmation::Nack(None)
    );
    // Pipelined: ack runs and nack runs come out in order.
    let other = unique("plain");
    declare_queue(&ch, &other).await;
    let mut pending = Vec::new();
    for key in [&other, &q, &q, &other] {
        pending.push(
            ch.basic_publish(
                "".into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                none(),
            )
            .await
            .unwrap(),
        );
    }
    let mut got = Vec::new();
    for p in pending {
        got.push(p.await.unwrap());
    }
    assert_eq!(
        got,
        vec![
            Confirmation::Ack(None),
            Confirmation::Nack(None),
            Confirmation::Nack(None),
            Confirmation::Ack(None)
        ]
    );
    assert_eq!(drain(&ch, &q).await, vec!["fits"]);
    broker.stop().await;
}

#[tokio::test]
async fn reject_publish_dlx_nacks_and_dead_letters() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = unique("reject-publish-dlx");
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let none = BasicProperties::default;
    assert_eq!(
        publish_confirmed(&ch, &q, b"fits", none()).await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        publish_confirmed(&ch, &q, b"over", none()).await,
        Confirmation::Nack(None)
    );
    let m = get_one(&ch, &dlq).await;
    assert_eq!(m.delivery.data, b"over");
    assert_eq!(field_text(&first_death(&m), "reason"), "maxlen");
    assert_eq!(drain(&ch, &q).await, vec!["fits"]);
    broker.stop().await;
}

// ------------------------------------------------------------ dead-lettering

#[tokio::test]
async fn rejected_and_nacked_messages_are_dead_lettered() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = unique("rejects");
    declare_with(&ch, &q, args(&[("x-dead-letter-exchange", text(&dlx))]))
        .await
        .unwrap();
    publish(&ch, "", &q, b"one").await;
    publish(&ch, "", &q, b"two").await;
    publish(&ch, "", &q, b"three").await;
    wait_count(&ch, &q, 3).await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d1 = next_delivery(&mut consumer).await;
    let d2 = next_delivery(&mut consumer).await;
    let d3 = next_delivery(&mut consumer).await;
    d1.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    d2.nack(BasicNackOptions {
        requeue: false,
        multiple: false,
    })
    .await
    .unwrap();
    // Requeued messages are not dead-lettered.
    d3.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    wait_count(&ch, &dlq, 2).await;
    let m = get_one(&ch, &dlq).await;
    assert_eq!(m.delivery.data, b"one");
    let d = first_death(&m);
    assert_eq!(field_text(&d, "reason"), "rejected");
    assert_eq!(field_text(&d, "queue"), q);
    assert_eq!(
        m.delivery.routing_key.as_str(),
        q,
        "original routing key kept"
    );
    assert_eq!(get_one(&ch, &dlq).await.delivery.data, b"two");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(again.data, b"three");
    assert!(again.redelivered);
    broker.stop().await;
}

// ---------------------------------------------------------------- priorities

#[tokio::test]
async fn priority_queue_orders_and_requeue_keeps_order() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let q = unique("prio");
    declare_with(&ch, &q, args(&[("x-max-priority", int(5))]))
        .await
        .unwrap();
    for (body, p) in [("a1", 1u8), ("b0", 0), ("c9", 9), ("d5", 5), ("e1", 1)] {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await
        .unwrap();
    }
    publish(&ch, "", &q, b"f-none").await;
    wait_count(&ch, &q, 6).await;
    // Take everything unacked, then requeue it all: same order again.
    let mut tags = Vec::new();
    let mut order = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        order.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        tags.push(m.delivery.delivery_tag);
    }
    // 9 is capped to 5 and is FIFO with d5 within level 5.
    let expected = vec!["c9", "d5", "a1", "e1", "b0", "f-none"];
    assert_eq!(order, expected);
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    assert_eq!(drain(&ch, &q).await, expected);
    broker.stop().await;
}

// ---------------------------------------------------------------- validation

#[tokio::test]
async fn invalid_arguments_are_refused_with_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let bad = [
        ("x-message-ttl", int(-1)),
        ("x-message-ttl", text("10")),
        ("x-expires", int(0)),
        ("x-max-length", int(-2)),
        ("x-max-length-bytes", AMQPValue::Boolean(true)),
        ("x-max-priority", int(256)),
        ("x-overflow", text("drop-everything")),
        ("x-dead-letter-routing-key", text("no-dlx")),
    ];
    for (k, v) in bad {
        let ch = conn.create_channel().await.unwrap();
        let r = declare_with(&ch, &unique("bad"), args(&[(k, v.clone())])).await;
        assert_code(r, PRECONDITION_FAILED);
    }
    let ch = conn.create_channel().await.unwrap();
    let q = unique("bad");
    let e = declare_with(&ch, &q, args(&[("x-message-ttl", int(-1))]))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': {{value_negative,-1}}"
        )),
        "{e}"
    );
    broker.stop().await;
}

/// `x-single-active-consumer`: the active consumer keeps its turn while it
/// lives (a higher-priority consumer arriving later waits); when it goes,
/// the highest priority takes over, then the earliest registered. Warren's
/// documented order (RabbitMQ 3.10's classic queues take registration
/// order only).
#[tokio::test]
async fn single_active_consumer_hands_over_by_priority_then_registration() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let (c, ch) = b.channel().await;
    let q = unique("sac");
    declare_with(
        &ch,
        &q,
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    let consume = |tag: &'static str, prio: i64| {
        let c = &c;
        let q = q.clone();
        async move {
            let ch = c.create_channel().await.unwrap();
            let consumer = ch
                .basic_consume(
                    q.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    args(&[("x-priority", int(prio))]),
                )
                .await
                .unwrap();
            (ch, consumer)
        }
    };
    let (ch_a, mut a) = consume("a", 0).await;
    let (_ch_b, mut b_c) = consume("b", 0).await;
    let (ch_c, mut c_c) = consume("c", 5).await;
    publish(&ch, "", &q, b"1").await;
    assert_eq!(next_delivery(&mut a).await.data, b"1");
    // A leaves: C (the highest priority) is next, not B.
    ch_a.basic_cancel("a".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish(&ch, "", &q, b"2").await;
    assert_eq!(next_delivery(&mut c_c).await.data, b"2");
    assert_no_delivery(&mut b_c, Duration::from_millis(100)).await;
    // C's channel closes: B.
    ch_c.close(200, "bye".into()).await.unwrap();
    publish(&ch, "", &q, b"3").await;
    assert_eq!(next_delivery(&mut b_c).await.data, b"3");
}

/// Arguments that would change what happens to messages and that Warren
/// does not implement yet are refused with 406, never accepted and ignored.
#[tokio::test]
async fn unimplemented_arguments_are_refused_not_ignored() {
    let b = TestBroker::start().await;
    if !b.is_warren() {
        return;
    }
    let c = b.connect().await;
    for (k, v) in [("x-dead-letter-strategy", text("at-least-once"))] {
        let ch = c.create_channel().await.unwrap();
        let err = declare_with(&ch, &unique("unimpl"), args(&[(k, v)]))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(PRECONDITION_FAILED), "{k}: {err}");
        assert!(
            err.to_string().contains("not supported by Warren yet"),
            "{err}"
        );
    }
    // A stream's retention on a classic queue would do nothing: refused.
    let ch = c.create_channel().await.unwrap();
    let err = declare_with(&ch, &unique("unimpl"), args(&[("x-max-age", text("1D"))]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(PRECONDITION_FAILED), "{err}");
    assert!(
        err.to_string()
            .contains("of queue type rabbit_classic_queue"),
        "{err}"
    );
    // A consumer timeout that is not a number of milliseconds.
    let ch = c.create_channel().await.unwrap();
    let q = unique("bad-timeout");
    declare_queue(&ch, &q).await;
    let err = ch
        .basic_consume(
            q.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            args(&[("x-consumer-timeout", int(0))]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(PRECONDITION_FAILED), "{err}");
}

// ----------------------------------------------------------- delivery limits

/// A poison message on a quorum queue with `x-delivery-limit: 1`: its
/// redelivery carries `x-delivery-count: 1`; the next return dead-letters
/// it (reason `delivery_limit`), without the count header. RabbitMQ's
/// quorum queues do the same.
#[tokio::test]
async fn a_poison_message_is_dead_lettered_past_its_delivery_limit() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = unique("poison");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[
            ("x-queue-type", text("quorum")),
            ("x-delivery-limit", int(1)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"poison").await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let count = |d: &lapin::message::Delivery| {
        d.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
    };
    let first = next_delivery(&mut consumer).await;
    assert!(!first.redelivered);
    assert_eq!(count(&first), None);
    first
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let second = next_delivery(&mut consumer).await;
    assert!(second.redelivered);
    assert_eq!(count(&second), Some(AMQPValue::LongLongInt(1)));
    second
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let m = get_one(&ch, &dlq).await;
    assert_eq!(m.delivery.data, b"poison");
    assert_eq!(field_text(&first_death(&m), "reason"), "delivery_limit");
    assert_eq!(header(&m, "x-delivery-count"), None);
    assert_no_delivery(&mut consumer, Duration::from_millis(200)).await;
    broker.stop().await;
}

// ---------------------------------------------------------- consumer timeout

/// The broker-wide consumer timeout: a consumer that holds a delivery
/// longer is cancelled (lapin announces consumer_cancel_notify, so it hears
/// basic.cancel and its stream ends), and the message goes to the next
/// consumer, redelivered.
#[tokio::test]
async fn a_consumer_that_holds_a_delivery_too_long_is_cancelled() {
    let broker = TestBroker::start_with(|c| c.consumer_timeout = Some(300)).await;
    if !broker.is_warren() {
        return;
    }
    let (_conn, ch) = broker.channel().await;
    let q = unique("timeout");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"held").await;
    let mut slow = ch
        .basic_consume(
            q.as_str().into(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let held = next_delivery(&mut slow).await;
    assert_eq!(held.data, b"held");
    // Cancelled: the stream ends.
    within("the cancel", async {
        use futures_lite::StreamExt;
        while slow.next().await.is_some() {}
    })
    .await;
    let (_c2, ch2) = broker.channel().await;
    let mut next = ch2
        .basic_consume(
            q.as_str().into(),
            "next".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let again = next_delivery(&mut next).await;
    assert_eq!(again.data, b"held");
    assert!(again.redelivered);
    broker.stop().await;
}

// ------------------------------------------------------------ deduplication

/// A deduplicating exchange (the plugin's `x-message-deduplication` type):
/// a duplicate under confirms is acked (an idempotent success, where the
/// plugin nacks), and a publish a queue refused (nack) forgets its key, so
/// the publisher's retry is delivered, not taken for a duplicate.
#[tokio::test]
async fn a_duplicate_is_acked_and_a_refused_publish_can_be_retried() {
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return;
    }
    let (_conn, ch) = broker.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let x = unique("dedup-x");
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Custom("x-message-deduplication".into()),
        ExchangeDeclareOptions::default(),
        args(&[("x-cache-size", int(100))]),
    )
    .await
    .unwrap();
    let q = unique("dedup-q");
    declare_with(
        &ch,
        &q,
        args(&[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let keyed = |k: &str| {
        let mut h = FieldTable::default();
        h.insert("x-deduplication-header".into(), text(k));
        BasicProperties::default().with_headers(h)
    };
    let send = |k: &'static str, body: &'static [u8]| {
        let ch = ch.clone();
        let x = x.clone();
        let props = keyed(k);
        async move {
            ch.basic_publish(
                x.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    assert!(send("pay-1", b"one").await.is_ack());
    assert!(
        send("pay-1", b"one again").await.is_ack(),
        "duplicate: acked"
    );
    // The queue is full: refused, and the key forgotten.
    assert!(send("pay-2", b"two").await.is_nack());
    assert_eq!(get_one(&ch, &q).await.delivery.data, b"one");
    assert!(send("pay-2", b"two, retried").await.is_ack());
    assert_eq!(get_one(&ch, &q).await.delivery.data, b"two, retried");
    broker.stop().await;
}
