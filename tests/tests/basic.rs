//! The basic class: publish, consume, get, ack/nack/reject, qos, cancel,
//! recover, returns, and message contents (properties and bodies) end to end.

use bytes::{BufMut, BytesMut};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::time::Duration;
use warren_protocol::client::{
    self, BASIC_CANCEL, BASIC_CONSUME_OK, BASIC_DELIVER, BASIC_QOS, QUEUE_DECLARE_OK,
};
use warren_protocol::frame::{BODY, HEADER};
use warren_protocol::reply::{
    ACCESS_REFUSED, NOT_ALLOWED, NOT_FOUND, NOT_IMPLEMENTED, NO_ROUTE, PRECONDITION_FAILED,
};
use warren_tests::lapin_util::*;
use warren_tests::raw::{frame, Handshake, Raw};
use warren_tests::{unique, within, TestBroker, WAIT};

// ------------------------------------------------------------------ helpers

async fn consume(ch: &Channel, queue: &str, tag: &str, no_ack: bool) -> Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.consume {queue}: {e}"))
}

async fn publish_n(ch: &Channel, queue: &str, n: usize) {
    for i in 0..n {
        publish(ch, "", queue, format!("m{i}").as_bytes()).await;
    }
    wait_count(ch, queue, n as u32).await;
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).expect("utf-8 body")
}

async fn delete(ch: &Channel, q: &str) -> u32 {
    ch.queue_delete(q.into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete")
}

fn rich_headers() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
    nested.insert("n".into(), AMQPValue::LongInt(-7));
    let mut array = FieldArray::default();
    array.push(AMQPValue::LongInt(1));
    array.push(AMQPValue::LongString("two".into()));
    array.push(AMQPValue::Boolean(false));
    let mut t = FieldTable::default();
    t.insert("bool".into(), AMQPValue::Boolean(true));
    t.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    t.insert("u8".into(), AMQPValue::ShortShortUInt(200));
    t.insert("i16".into(), AMQPValue::ShortInt(-1600));
    t.insert("u16".into(), AMQPValue::ShortUInt(60000));
    t.insert("i32".into(), AMQPValue::LongInt(-320000));
    t.insert("u32".into(), AMQPValue::LongUInt(4_000_000_000));
    t.insert("i64".into(), AMQPValue::LongLongInt(-64_000_000_000));
    t.insert("f32".into(), AMQPValue::Float(1.5));
    t.insert("f64".into(), AMQPValue::Double(-2.25));
    t.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    t.insert(
        "string".into(),
        AMQPValue::LongString(LongString::from("héllo wörld")),
    );
    t.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
    );
    t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("void".into(), AMQPValue::Void);
    t.insert("array".into(), AMQPValue::FieldArray(array));
    t.insert("table".into(), AMQPValue::FieldTable(nested));
    t.insert("empty".into(), AMQPValue::LongString(LongString::from("")));
    t
}

fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(rich_headers())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-42".into())
        .with_timestamp(1_650_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
}

// ------------------------------------------------------------- contents

#[tokio::test]
async fn all_properties_round_trip_via_consume_and_get() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("props");
    declare_queue(&ch, &q).await;
    let props = all_properties();
    for _ in 0..2 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            props.clone(),
        )
        .await
        .unwrap();
    }
    wait_count(&ch, &q, 2).await;
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("message");
    assert_eq!(got.delivery.properties, props);
    assert_eq!(got.delivery.data, b"{}");
    let mut c = consume(&ch, &q, "props", true).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.properties, props);
    assert_eq!(d.data, b"{}");
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn no_properties_stay_absent() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("noprops");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"plain").await;
    wait_count(&ch, &q, 1).await;
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("message");
    assert_eq!(got.delivery.properties, BasicProperties::default());
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn content_header_bytes_are_forwarded_verbatim() {
    // Field-value tags that codecs tend to normalise ('s' short int,
    // 'l' long long, 'x' bytes, nested 'F' and 'A') must reach the consumer
    // exactly as published.
    let broker = TestBroker::start().await;
    let q = unique("verbatim");
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.declare_queue(1, &q).await;

    let mut table = BytesMut::new();
    client::short(&mut table, b"short");
    table.put_u8(b's');
    table.put_i16(-2);
    client::short(&mut table, b"longlong");
    table.put_u8(b'l');
    table.put_i64(-3);
    client::short(&mut table, b"bytes");
    table.put_u8(b'x');
    client::long(&mut table, &[1, 2, 3]);
    client::short(&mut table, b"nested");
    table.put_u8(b'F');
    table.put_u32(0);
    client::short(&mut table, b"array");
    table.put_u8(b'A');
    table.put_u32(5);
    table.put_u8(b'I');
    table.put_i32(9);
    client::short(&mut table, b"same-key-order-kept");
    table.put_u8(b't');
    table.put_u8(1);

    let mut header = BytesMut::new();
    header.put_u16(60);
    header.put_u16(0);
    header.put_u64(5);
    header.put_u16(0x8000 | 0x2000 | 0x0040); // content-type, headers, timestamp
    client::short(&mut header, b"text/plain");
    client::long(&mut header, &table);
    header.put_u64(1234567);

    raw.send_with(|b| client::publish(b, 1, "", &q)).await;
    raw.send(&frame(HEADER, 1, &header)).await;
    raw.send(&frame(BODY, 1, b"hello")).await;

    let (got_header, got_body) = raw.get_message(1, &q).await;
    assert_eq!(got_body, b"hello");
    assert_eq!(got_header, &header[..], "content header changed in transit");
    raw.delete_queue(1, &q).await;
    raw.close().await;
    broker.stop().await;
}

#[tokio::test]
async fn large_and_empty_bodies() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("sizes");
    declare_queue(&ch, &q).await;
    let big: Vec<u8> = (0..(1024 * 1024 + 17))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let exact: Vec<u8> = vec![0xAB; 131072 - 8]; // exactly one full body frame
    let bodies: Vec<Vec<u8>> = vec![big.clone(), Vec::new(), exact.clone(), vec![1]];
    for b in &bodies {
        publish(&ch, "", &q, b).await;
    }
    wait_count(&ch, &q, bodies.len() as u32).await;
    // First two by get, the rest by consume.
    let g1 = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g1.delivery.data.len(), big.len());
    assert!(g1.delivery.data == big, "1 MiB body corrupted");
    let g2 = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g2.delivery.data, Vec::<u8>::new());
    let mut c = consume(&ch, &q, "", true).await;
    assert!(next_delivery(&mut c).await.data == exact);
    assert_eq!(next_delivery(&mut c).await.data, vec![1]);
    // An empty body through a consumer too.
    publish(&ch, "", &q, b"").await;
    assert_eq!(next_delivery(&mut c).await.data, Vec::<u8>::new());
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn small_frame_max_splits_bodies() {
    let broker = TestBroker::start().await;
    let url = format!("{}?frame_max=4096", broker.url);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    assert_eq!(conn.configuration().frame_max(), 4096);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("smallframes");
    declare_queue(&ch, &q).await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = consume(&ch, &q, "", true).await;
    publish(&ch, "", &q, &payload).await;
    let d = next_delivery(&mut c).await;
    assert!(d.data == payload, "body corrupted with frame_max 4096");
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

/// Bodies of every size around the ones Warren writes from the message
/// itself (4 KiB and up) and around a frame's payload (131,064 bytes),
/// mixed with small ones, arrive whole and in order through a consumer
/// and through basic.get.
#[tokio::test]
async fn bodies_of_every_size_arrive_whole_and_in_order() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("sizes");
    declare_queue(&ch, &q).await;
    let sizes = [
        0usize, 1, 16, 4095, 4096, 4097, 65536, 131_063, 131_064, 131_065, 262_128, 300_001, 7,
    ];
    let body =
        |n: usize, k: usize| -> Vec<u8> { (0..n).map(|i| ((i * 7 + k) % 251) as u8).collect() };
    let mut c = consume(&ch, &q, "", true).await;
    for round in 0..3 {
        for (k, &n) in sizes.iter().enumerate() {
            publish(&ch, "", &q, &body(n, k + round)).await;
        }
    }
    for round in 0..3 {
        for (k, &n) in sizes.iter().enumerate() {
            let d = next_delivery(&mut c).await;
            assert!(
                d.data == body(n, k + round),
                "body of {n} bytes (round {round})"
            );
        }
    }
    ch.basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    for (k, &n) in sizes.iter().enumerate() {
        publish(&ch, "", &q, &body(n, k)).await;
    }
    for (k, &n) in sizes.iter().enumerate() {
        let got = within("a message", async {
            loop {
                if let Some(b) = get_body(&ch, &q).await {
                    return b;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(got == body(n, k), "basic.get body of {n} bytes");
    }
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn max_message_size_is_406() {
    let broker = TestBroker::start_with(|c| c.max_message_size = 1024).await;
    if !broker.is_warren() {
        return;
    }
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("maxsize");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, &[7u8; 1024]).await;
    wait_count(&ch, &q, 1).await;
    publish(&ch, "", &q, &[7u8; 1025]).await;
    assert_eq!(errors.next_code().await, PRECONDITION_FAILED);
    let ch = conn.create_channel().await.unwrap();
    let decl = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        decl.message_count(),
        1,
        "the oversize message must not be enqueued"
    );
    assert!(conn.status().connected());
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn user_id_must_match_the_login() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("userid");
    declare_queue(&ch, &q).await;
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"spoofed",
        BasicProperties::default().with_user_id("someone-else".into()),
    )
    .await
    .unwrap();
    assert_eq!(errors.next_code().await, PRECONDITION_FAILED);
    let ch = conn.create_channel().await.unwrap();
    sync(&ch).await;
    assert_eq!(get_body(&ch, &q).await, None);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// ----------------------------------------------------------------- basic.get

#[tokio::test]
async fn get_and_get_empty() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("get");
    declare_queue(&ch, &q).await;
    assert!(ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .is_none());
    publish_n(&ch, &q, 3).await;
    for (i, left) in [(0, 2), (1, 1), (2, 0)] {
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("message");
        assert_eq!(m.delivery.data, format!("m{i}").as_bytes());
        assert_eq!(m.message_count, left);
        assert_eq!(m.delivery.exchange.as_str(), "");
        assert_eq!(m.delivery.routing_key.as_str(), q);
        assert!(!m.delivery.redelivered);
    }
    assert!(ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .is_none());
    // From a missing queue: 404.
    assert_code(
        ch.basic_get(unique("nope").as_str().into(), BasicGetOptions::default())
            .await,
        NOT_FOUND,
    );
    let ch = conn.create_channel().await.unwrap();
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn get_without_ack_holds_the_message_until_acked() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("getack");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 2).await;
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.delivery_tag, 1);
    let m2 = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m2.delivery.delivery_tag, 2);
    // Both unacked: none ready.
    wait_count(&ch, &q, 0).await;
    assert!(m
        .delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap());
    m2.delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_count(&ch, &q, 1).await;
    let again = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.delivery.data, b"m1");
    assert!(again.delivery.redelivered);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// ------------------------------------------------------------ consume/ack

#[tokio::test]
async fn consume_delivery_fields_and_tags() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("fields");
    declare_queue(&ch, &q).await;
    ch.queue_bind(
        q.as_str().into(),
        "amq.direct".into(),
        "rk".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut c = consume(&ch, &q, "my-tag", false).await;
    assert_eq!(c.tag().as_str(), "my-tag");
    publish(&ch, "amq.direct", "rk", b"one").await;
    publish(&ch, "", &q, b"two").await;
    let d1 = next_delivery(&mut c).await;
    let d2 = next_delivery(&mut c).await;
    assert_eq!(
        (
            d1.delivery_tag,
            d1.exchange.as_str(),
            d1.routing_key.as_str(),
            body(&d1)
        ),
        (1, "amq.direct", "rk", "one".into())
    );
    assert_eq!(
        (
            d2.delivery_tag,
            d2.exchange.as_str(),
            d2.routing_key.as_str(),
            body(&d2)
        ),
        (2, "", q.as_str(), "two".into())
    );
    assert!(!d1.redelivered && !d2.redelivered);
    d2.acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    sync(&ch).await;
    let decl = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((decl.message_count(), decl.consumer_count()), (0, 1));
    // A server-generated consumer tag.
    let c2 = consume(&ch, &q, "", false).await;
    assert!(c2.tag().as_str().starts_with("amq.ctag-"), "{}", c2.tag());
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn multiple_ack_and_requeue_on_channel_close() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("multi");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 5).await;
    let mut c = consume(&ch, &q, "", false).await;
    let mut ds = Vec::new();
    for _ in 0..5 {
        ds.push(next_delivery(&mut c).await);
    }
    assert_eq!(
        ds.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // Ack 1..=3 at once; 4 and 5 stay unacked and go back when the channel closes.
    ch.basic_ack(3, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    ch.close(200, "bye".into()).await.unwrap();

    let ch2 = conn.create_channel().await.unwrap();
    wait_count(&ch2, &q, 2).await;
    let mut c2 = consume(&ch2, &q, "", false).await;
    let a = next_delivery(&mut c2).await;
    let b = next_delivery(&mut c2).await;
    assert_eq!((body(&a), a.redelivered), ("m3".into(), true));
    assert_eq!((body(&b), b.redelivered), ("m4".into(), true));
    a.acker.ack(BasicAckOptions::default()).await.unwrap();
    b.acker.ack(BasicAckOptions::default()).await.unwrap();
    delete(&ch2, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn ack_all_with_tag_zero_multiple() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("ackall");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 3).await;
    let mut c = consume(&ch, &q, "", false).await;
    for _ in 0..3 {
        next_delivery(&mut c).await;
    }
    ch.basic_ack(0, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    ch.close(200, "bye".into()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    sync(&ch).await;
    wait_count(&ch, &q, 0).await;
    assert_eq!(delete(&ch, &q).await, 0);
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn reject_and_nack_with_and_without_requeue() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("rej");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 6).await;
    let mut c = consume(&ch, &q, "rej", false).await;
    let mut ds = Vec::new();
    for _ in 0..6 {
        ds.push(next_delivery(&mut c).await);
    }
    ch.basic_cancel("rej".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // m0: reject, requeue -> back.
    ds[0]
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    // m1: reject, drop.
    ds[1]
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // m2, m3: nack multiple requeue -> back.
    ch.basic_nack(
        4,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    // m4: nack drop; m5: ack.
    ds[4]
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        })
        .await
        .unwrap();
    ds[5].acker.ack(BasicAckOptions::default()).await.unwrap();
    sync(&ch).await;
    wait_count(&ch, &q, 3).await;
    let mut left = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert!(
            m.delivery.redelivered,
            "requeued message must be marked redelivered"
        );
        left.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(left, vec!["m0", "m2", "m3"]);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn double_ack_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("dblack");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 1).await;
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(errors.next_code().await, PRECONDITION_FAILED);
    let ch = conn.create_channel().await.unwrap();
    // The first ack stood: the message is gone.
    wait_count(&ch, &q, 0).await;
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn unknown_delivery_tag_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    for op in 0..3 {
        let ch = conn.create_channel().await.unwrap();
        match op {
            0 => ch.basic_ack(99, BasicAckOptions::default()).await.unwrap(),
            1 => ch
                .basic_nack(99, BasicNackOptions::default())
                .await
                .unwrap(),
            _ => ch
                .basic_reject(99, BasicRejectOptions::default())
                .await
                .unwrap(),
        }
        assert_eq!(errors.next_code().await, PRECONDITION_FAILED, "op {op}");
    }
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn redelivered_after_requeue_keeps_order() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("order");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 4).await;
    let mut c = consume(&ch, &q, "first", false).await;
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next_delivery(&mut c).await);
    }
    // Requeue everything, then consume again: same order, all redelivered.
    ch.basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    ch.basic_nack(
        0,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    wait_count(&ch, &q, 4).await;
    let mut c2 = consume(&ch, &q, "second", true).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = next_delivery(&mut c2).await;
        assert!(d.redelivered);
        got.push(body(&d));
    }
    assert_eq!(got, vec!["m0", "m1", "m2", "m3"]);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn unacked_go_back_in_order_when_connection_closes() {
    let broker = TestBroker::start().await;
    let q = unique("connclose");
    let (conn, ch) = broker.channel().await;
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 3).await;
    {
        let (c2, ch2) = broker.channel().await;
        let mut c = consume(&ch2, &q, "", false).await;
        for _ in 0..3 {
            next_delivery(&mut c).await;
        }
        wait_count(&ch, &q, 0).await;
        c2.close(200, "bye".into()).await.unwrap();
    }
    wait_count(&ch, &q, 3).await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert!(m.delivery.redelivered);
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(got, vec!["m0", "m1", "m2"]);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_between_consumers() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("rr");
    declare_queue(&ch, &q).await;
    let ch_a = conn.create_channel().await.unwrap();
    let ch_b = conn.create_channel().await.unwrap();
    let mut a = consume(&ch_a, &q, "a", true).await;
    let mut b = consume(&ch_b, &q, "b", true).await;
    for i in 0..10 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(body(&next_delivery(&mut a).await).parse::<u32>().unwrap());
        got_b.push(body(&next_delivery(&mut b).await).parse::<u32>().unwrap());
    }
    assert_no_delivery(&mut a, Duration::from_millis(100)).await;
    assert_no_delivery(&mut b, Duration::from_millis(10)).await;
    let mut all: Vec<u32> = got_a.iter().chain(got_b.iter()).copied().collect();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    // Each consumer sees its share in publish order.
    assert!(got_a.windows(2).all(|w| w[0] < w[1]), "{got_a:?}");
    assert!(got_b.windows(2).all(|w| w[0] < w[1]), "{got_b:?}");
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_count_limits_unacked() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("qos");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 5).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&cch, &q, "", false).await;
    let d0 = next_delivery(&mut c).await;
    let d1 = next_delivery(&mut c).await;
    assert_no_delivery(&mut c, Duration::from_millis(300)).await;
    wait_count(&ch, &q, 3).await;
    d0.acker.ack(BasicAckOptions::default()).await.unwrap();
    let d2 = next_delivery(&mut c).await;
    assert_eq!(body(&d2), "m2");
    assert_no_delivery(&mut c, Duration::from_millis(200)).await;
    // Acking both outstanding frees two slots.
    cch.basic_ack(d2.delivery_tag, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let d3 = next_delivery(&mut c).await;
    let d4 = next_delivery(&mut c).await;
    assert_eq!((body(&d3), body(&d4)), ("m3".into(), "m4".into()));
    let _ = d1;
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_applies_per_consumer() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q1 = unique("pc1");
    let q2 = unique("pc2");
    declare_queue(&ch, &q1).await;
    declare_queue(&ch, &q2).await;
    publish_n(&ch, &q1, 3).await;
    publish_n(&ch, &q2, 3).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions { global: false })
        .await
        .unwrap();
    let mut c1 = consume(&cch, &q1, "", false).await;
    let mut c2 = consume(&cch, &q2, "", false).await;
    next_delivery(&mut c1).await;
    next_delivery(&mut c2).await;
    assert_no_delivery(&mut c1, Duration::from_millis(200)).await;
    assert_no_delivery(&mut c2, Duration::from_millis(10)).await;
    delete(&ch, &q1).await;
    delete(&ch, &q2).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn prefetch_size_is_not_implemented() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| {
        client::method(b, 1, BASIC_QOS, |b| {
            b.put_u32(4096);
            b.put_u16(10);
            b.put_u8(0);
        })
    })
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, NOT_IMPLEMENTED, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 10), "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn no_ack_consumer_gets_everything() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("noack");
    declare_queue(&ch, &q).await;
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    publish_n(&ch, &q, 20).await;
    // prefetch does not apply to no-ack consumers.
    let mut c = consume(&ch, &q, "", true).await;
    for i in 0..20 {
        assert_eq!(body(&next_delivery(&mut c).await), format!("m{i}"));
    }
    wait_count(&ch, &q, 0).await;
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// ------------------------------------------------------------ consumers

#[tokio::test]
async fn exclusive_consumer_refuses_others() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("exclc");
    declare_queue(&ch, &q).await;
    let _owner = ch
        .basic_consume(
            q.as_str().into(),
            "owner".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    assert_code(
        ch2.basic_consume(
            q.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        ACCESS_REFUSED,
    );
    // And an exclusive consume on a queue that already has a consumer.
    let q2 = unique("exclc2");
    declare_queue(&ch, &q2).await;
    let _plain = consume(&ch, &q2, "plain", false).await;
    let ch3 = conn.create_channel().await.unwrap();
    assert_code(
        ch3.basic_consume(
            q2.as_str().into(),
            "excl".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        ACCESS_REFUSED,
    );
    delete(&ch, &q).await;
    delete(&ch, &q2).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn reused_consumer_tag_is_530() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("tag");
    declare_queue(&ch, &q).await;
    let _c = consume(&ch, &q, "dup", false).await;
    let r = ch
        .basic_consume(
            q.as_str().into(),
            "dup".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r.map(|_| ()), NOT_ALLOWED);
    assert_eq!(errors.next_code().await, NOT_ALLOWED);
    // 530 is a connection error.
    within("the connection to close", async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (c2, ch2) = broker.channel().await;
    delete(&ch2, &q).await;
    c2.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn consume_from_missing_queue_is_404() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    assert_code(
        ch.basic_consume(
            unique("missing").as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        NOT_FOUND,
    );
    broker.stop().await;
}

#[tokio::test]
async fn cancel_stops_deliveries() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("cancel");
    declare_queue(&ch, &q).await;
    let mut c = consume(&ch, &q, "c", true).await;
    publish(&ch, "", &q, b"before").await;
    assert_eq!(body(&next_delivery(&mut c).await), "before");
    ch.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert!(within("the consumer stream to end", c.next())
        .await
        .is_none());
    publish(&ch, "", &q, b"after").await;
    wait_count(&ch, &q, 1).await;
    // Cancelling an unknown tag is fine.
    ch.basic_cancel("never-was".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    sync(&ch).await;
    // The tag can be reused after cancel.
    let mut c = consume(&ch, &q, "c", true).await;
    assert_eq!(body(&next_delivery(&mut c).await), "after");
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn server_cancels_consumer_when_queue_is_deleted() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("srvcancel");
    declare_queue(&ch, &q).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "watcher", false).await;
    publish(&ch, "", &q, b"one").await;
    let d = next_delivery(&mut c).await;
    assert_eq!(body(&d), "one");
    // Delete from another connection.
    let (other, och) = broker.channel().await;
    assert_eq!(delete(&och, &q).await, 0);
    assert!(
        within("the server-sent cancel", c.next()).await.is_none(),
        "consumer stream should end"
    );
    // The consuming channel stays open and usable.
    assert!(cch.status().connected());
    sync(&cch).await;
    other.close(200, "bye".into()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn server_cancel_on_raw_connection_with_capability() {
    // A raw client that announced consumer_cancel_notify gets basic.cancel
    // (with the consumer tag) when its queue is deleted.
    let broker = TestBroker::start().await;
    let q = unique("rawcancel");
    let mut caps = BytesMut::new();
    client::short(&mut caps, b"consumer_cancel_notify");
    caps.put_u8(b't');
    caps.put_u8(1);
    let mut t = BytesMut::new();
    client::short(&mut t, b"capabilities");
    t.put_u8(b'F');
    client::long(&mut t, &caps);
    let mut props = BytesMut::new();
    client::long(&mut props, &t);
    let mut raw = Raw::open_with(
        &broker,
        Handshake {
            client_properties: props.to_vec(),
            ..Handshake::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    raw.send_with(|b| client::queue_declare(b, 1, &q, false))
        .await;
    raw.expect_method(1, QUEUE_DECLARE_OK).await;
    raw.send_with(|b| client::consume(b, 1, &q, "raw-tag", false))
        .await;
    raw.expect_method(1, BASIC_CONSUME_OK).await;

    let (conn, ch) = broker.channel().await;
    delete(&ch, &q).await;
    let cancel = raw.expect_method(1, BASIC_CANCEL).await;
    let p = &cancel.payload[4..];
    let n = p[0] as usize;
    assert_eq!(&p[1..1 + n], b"raw-tag");
    raw.close().await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// --------------------------------------------------------- publish flags

#[tokio::test]
async fn immediate_is_not_implemented() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("imm");
    declare_queue(&ch, &q).await;
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        b"now",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(errors.next_code().await, NOT_IMPLEMENTED);
    within("the connection to close", async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (c2, ch2) = broker.channel().await;
    assert_eq!(delete(&ch2, &q).await, 0);
    c2.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn mandatory_unroutable_is_returned_312() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let key = unique("nowhere");
    let props = BasicProperties::default()
        .with_message_id("ret-1".into())
        .with_content_type("text/plain".into());
    // Without confirms: the return arrives before a later round trip completes.
    ch.basic_publish(
        "amq.direct".into(),
        key.as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"bounce",
        props.clone(),
    )
    .await
    .unwrap();
    // Not mandatory: dropped silently.
    ch.basic_publish(
        "amq.direct".into(),
        key.as_str().into(),
        BasicPublishOptions::default(),
        b"dropped",
        props.clone(),
    )
    .await
    .unwrap();
    sync(&ch).await;
    let returned = ch.wait_for_confirms().await.unwrap();
    assert_eq!(returned.len(), 1, "{returned:?}");
    let r = &returned[0];
    assert_eq!(
        (r.reply_code, r.reply_text.as_str()),
        (NO_ROUTE, "NO_ROUTE")
    );
    assert_eq!(
        (
            r.delivery.exchange.as_str(),
            r.delivery.routing_key.as_str()
        ),
        ("amq.direct", key.as_str())
    );
    assert_eq!(r.delivery.data, b"bounce");
    assert_eq!(r.delivery.properties, props);

    // With confirms: the return, then the ack, which carries it.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"bounce2",
            props.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match confirm {
        Confirmation::Ack(Some(r)) => {
            assert_eq!(r.reply_code, NO_ROUTE);
            assert_eq!(r.delivery.data, b"bounce2");
        }
        other => panic!("expected an ack carrying the returned message, got {other:?}"),
    }
    // A routable mandatory publish is simply acked.
    let q = unique("routable");
    declare_queue(&ch, &q).await;
    let confirm = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"ok",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None));
    // Default exchange with no such queue: returned too.
    let confirm = ch
        .basic_publish(
            "".into(),
            unique("noqueue").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, Confirmation::Ack(Some(ref r)) if r.reply_code == NO_ROUTE),
        "{confirm:?}"
    );
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// -------------------------------------------------------------- recover

#[tokio::test]
async fn recover_requeue_redelivers() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("recover");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 3).await;
    let mut c = consume(&ch, &q, "", false).await;
    for i in 0..3 {
        let d = next_delivery(&mut c).await;
        assert_eq!((body(&d), d.redelivered), (format!("m{i}"), false));
    }
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = next_delivery(&mut c).await;
        assert!(d.redelivered, "recovered message must be redelivered=true");
        again.push(body(&d));
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(again, vec!["m0", "m1", "m2"]);
    sync(&ch).await;
    wait_count(&ch, &q, 0).await;
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn recover_without_requeue_is_not_implemented() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.basic_recover(BasicRecoverOptions { requeue: false })
            .await,
        NOT_IMPLEMENTED,
    );
    broker.stop().await;
}

#[tokio::test]
async fn channel_flow_inactive_is_not_implemented() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert!(ch
        .channel_flow(ChannelFlowOptions { active: true })
        .await
        .unwrap());
    assert_code(
        ch.channel_flow(ChannelFlowOptions { active: false }).await,
        NOT_IMPLEMENTED,
    );
    broker.stop().await;
}

// ------------------------------------------------- requeue position, qos, etc.

#[tokio::test]
async fn requeued_messages_return_to_their_original_position() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let q = unique("position");
    declare_queue(&observer, &q).await;
    publish_n(&observer, &q, 6).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(4, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&ch, &q, "pos", false).await;
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next_delivery(&mut c).await);
    }
    // m4, m5 are still ready. Requeue m2 first, then m0: they go back in
    // front of m4, in publish order.
    ch.basic_cancel("pos".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    ds[2]
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    ds[0]
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    ds[1].acker.ack(BasicAckOptions::default()).await.unwrap();
    // m3 goes back when the channel closes.
    ch.close(200, "bye".into()).await.unwrap();
    wait_count(&observer, &q, 5).await;
    let mut got = Vec::new();
    while let Some(m) = observer
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8(m.delivery.data.clone()).unwrap(),
            m.delivery.redelivered,
        ));
    }
    let expected: Vec<(String, bool)> = [
        ("m0", true),
        ("m2", true),
        ("m3", true),
        ("m4", false),
        ("m5", false),
    ]
    .iter()
    .map(|(b, r)| (b.to_string(), *r))
    .collect();
    assert_eq!(got, expected);
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_limits_the_whole_channel() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q1 = unique("g1");
    let q2 = unique("g2");
    declare_queue(&ch, &q1).await;
    declare_queue(&ch, &q2).await;
    publish_n(&ch, &q1, 3).await;
    publish_n(&ch, &q2, 3).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(2, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut c1 = consume(&cch, &q1, "c1", false).await;
    let mut c2 = consume(&cch, &q2, "c2", false).await;
    // Two unacked deliveries for the whole channel, however they split.
    let mut got = Vec::new();
    for _ in 0..2 {
        tokio::select! {
            d = c1.next() => got.push(d.unwrap().unwrap()),
            d = c2.next() => got.push(d.unwrap().unwrap()),
            _ = tokio::time::sleep(WAIT) => panic!("timed out waiting for deliveries"),
        }
    }
    assert_no_delivery(&mut c1, Duration::from_millis(200)).await;
    assert_no_delivery(&mut c2, Duration::from_millis(10)).await;
    // Freeing one slot lets exactly one more through.
    got[0].acker.ack(BasicAckOptions::default()).await.unwrap();
    tokio::select! {
        d = c1.next() => assert!(d.unwrap().is_ok()),
        d = c2.next() => assert!(d.unwrap().is_ok()),
        _ = tokio::time::sleep(WAIT) => panic!("no delivery after an ack"),
    }
    assert_no_delivery(&mut c1, Duration::from_millis(200)).await;
    assert_no_delivery(&mut c2, Duration::from_millis(10)).await;
    delete(&ch, &q1).await;
    delete(&ch, &q2).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn acking_after_cancel_or_queue_deletion_is_fine() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    let q = unique("lateack");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 2).await;
    let mut c = consume(&ch, &q, "late", false).await;
    let d0 = next_delivery(&mut c).await;
    let d1 = next_delivery(&mut c).await;
    // Cancel keeps the unacked deliveries ackable.
    ch.basic_cancel("late".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    d0.acker.ack(BasicAckOptions::default()).await.unwrap();
    sync(&ch).await;
    // Deleting the queue does not make its delivery tags unknown.
    let other = conn.create_channel().await.unwrap();
    assert_eq!(delete(&other, &q).await, 0);
    d1.acker.ack(BasicAckOptions::default()).await.unwrap();
    sync(&ch).await;
    assert!(ch.status().connected(), "channel closed by a late ack");
    if let Ok(code) = tokio::time::timeout(Duration::from_millis(200), errors.next_code()).await {
        panic!("unexpected channel error {code}");
    }
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn consumer_priorities() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("prio-consumers");
    declare_queue(&ch, &q).await;
    let low_ch = conn.create_channel().await.unwrap();
    let high_ch = conn.create_channel().await.unwrap();
    let mut low = consume(&low_ch, &q, "low", true).await;
    let mut args = FieldTable::default();
    args.insert("x-priority".into(), AMQPValue::LongInt(10));
    let mut high = high_ch
        .basic_consume(
            q.as_str().into(),
            "high".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    for i in 0..6 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    for i in 0..6 {
        assert_eq!(body(&next_delivery(&mut high).await), format!("{i}"));
    }
    assert_no_delivery(&mut low, Duration::from_millis(200)).await;
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn direct_reply_to() {
    let broker = TestBroker::start().await;
    let (conn, client) = broker.channel().await;
    let server = conn.create_channel().await.unwrap();
    let rpc_q = unique("rpc");
    declare_queue(&server, &rpc_q).await;
    let mut replies = consume(&client, "amq.rabbitmq.reply-to", "", true).await;
    let mut requests = consume(&server, &rpc_q, "", true).await;
    client
        .basic_publish(
            "".into(),
            rpc_q.as_str().into(),
            BasicPublishOptions::default(),
            b"ping",
            BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id("c-1".into()),
        )
        .await
        .unwrap();
    let req = next_delivery(&mut requests).await;
    let reply_to = req
        .properties
        .reply_to()
        .clone()
        .expect("reply_to")
        .to_string();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    server
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            b"pong",
            BasicProperties::default().with_correlation_id("c-1".into()),
        )
        .await
        .unwrap();
    let rep = next_delivery(&mut replies).await;
    assert_eq!(rep.data, b"pong");
    assert_eq!(
        rep.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("c-1")
    );
    delete(&server, &rpc_q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn reply_to_pseudo_queue_needs_a_no_ack_consumer_first() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    // Publishing with reply_to amq.rabbitmq.reply-to without consuming from
    // it first: 406.
    let ch = conn.create_channel().await.unwrap();
    let mut errors = Errors::of(&conn);
    ch.basic_publish(
        "".into(),
        "nowhere".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    assert_eq!(errors.next_code().await, PRECONDITION_FAILED);
    // Consuming from it with manual acks: 406.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        PRECONDITION_FAILED,
    );
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_mid_stream_loses_nothing() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let q = unique("midstream");
    declare_queue(&observer, &q).await;
    const N: u32 = 1000;
    for i in 0..N {
        publish(&observer, "", &q, format!("{i}").as_bytes()).await;
    }
    wait_count(&observer, &q, N).await;
    let ch = conn.create_channel().await.unwrap();
    let mut c = consume(&ch, &q, "", false).await;
    // Ack the first 10, then close while deliveries are still streaming in.
    for _ in 0..10 {
        let d = next_delivery(&mut c).await;
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    ch.close(200, "bye".into()).await.unwrap();
    wait_count(&observer, &q, N - 10).await;
    // Order is preserved: 10..N.
    let rest = drain(&observer, &q).await;
    let expected: Vec<String> = (10..N).map(|i| i.to_string()).collect();
    assert_eq!(rest, expected);
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn unacked_go_back_when_the_tcp_connection_drops() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("tcpdrop");
    declare_queue(&ch, &q).await;
    publish_n(&ch, &q, 3).await;
    {
        let mut raw = Raw::open(&broker).await;
        raw.open_channel(1).await;
        raw.send_with(|b| client::consume(b, 1, &q, "raw", false)) // manual ack
            .await;
        raw.expect_method(1, BASIC_CONSUME_OK).await;
        for _ in 0..3 {
            raw.expect_method(1, BASIC_DELIVER).await;
            assert_eq!(raw.frame().await.kind, HEADER);
            assert_eq!(raw.frame().await.kind, BODY);
        }
        // Gone without a word.
    }
    wait_count(&ch, &q, 3).await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert!(m.delivery.redelivered);
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(got, vec!["m0", "m1", "m2"]);
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
