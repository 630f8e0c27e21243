//! Direct reply-to under pressure: a replier that publishes faster than its
//! requester reads is held back (TCP back-pressure), so the broker does not
//! buffer replies without bound for a requester that stopped reading.
//! Warren-only: RabbitMQ has no such bound.

use bytes::{BufMut, BytesMut};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use warren_protocol::client::{self, BASIC_CONSUME_OK, BASIC_DELIVER};
use warren_protocol::method;
use warren_tests::raw::{Handshake, Raw};
use warren_tests::{unique, TestBroker};

/// A raw connection with channel 1 open, which reads frames only when asked
/// (so it can stop reading).
async fn open(broker: &TestBroker) -> Raw {
    let mut raw = Raw::open_with(
        broker,
        Handshake {
            channel_max: 16,
            ..Handshake::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    raw
}

/// A publish of `body` on channel 1 to the default exchange, with only the
/// `reply_to` property if given.
fn publish_frames(routing_key: &str, reply_to: Option<&str>, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    client::publish(&mut buf, 1, "", routing_key);
    let mut header = BytesMut::new();
    header.put_u16(60);
    header.put_u16(0);
    header.put_u64(body.len() as u64);
    match reply_to {
        Some(r) => {
            header.put_u16(1 << 9); // property flags: reply-to
            client::short(&mut header, r.as_bytes());
        }
        None => header.put_u16(0),
    }
    method::put_content(&mut buf, 1, &header, body, 131072);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_replier_is_held_back_by_a_requester_that_does_not_read() {
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return;
    }
    let rpc = unique("rpc");

    // The server side of the RPC: a queue the requests go to.
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        rpc.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut requests = ch
        .basic_consume(
            rpc.as_str().into(),
            "server".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The requester: consumes replies, sends one request, then stops reading.
    let mut requester = open(&broker).await;
    requester
        .send_with(|b| client::consume(b, 1, "amq.rabbitmq.reply-to", "replies", true))
        .await;
    requester
        .skip_to_method(1, BASIC_CONSUME_OK, Duration::from_secs(10))
        .await;
    let request = publish_frames(&rpc, Some("amq.rabbitmq.reply-to"), b"ping");
    requester.send(&request).await;
    let delivery = tokio::time::timeout(Duration::from_secs(10), async {
        use futures_lite::StreamExt;
        requests.next().await.unwrap().unwrap()
    })
    .await
    .expect("the request arrived");
    let address = delivery
        .properties
        .reply_to()
        .as_ref()
        .expect("reply_to rewritten")
        .to_string();
    assert!(address.starts_with("amq.rabbitmq.reply-to."), "{address}");

    // The replier writes 1 KiB replies as fast as the broker takes them.
    let mut replier = open(&broker).await;
    let reply = publish_frames(&address, None, &[7u8; 1024]);
    let mut batch = BytesMut::new();
    for _ in 0..64 {
        batch.extend_from_slice(&reply);
    }
    let batch = batch.freeze();
    let limit = 64u64 << 20;
    let started = Instant::now();
    let (mut written, mut last_progress) = (0u64, Instant::now());
    let stalled = loop {
        match tokio::time::timeout(Duration::from_millis(100), replier.sock.write_all(&batch)).await
        {
            Ok(r) => {
                r.unwrap();
                written += batch.len() as u64;
                last_progress = Instant::now();
            }
            // (A write that timed out may have written part of the batch:
            // the stream is not reused for publishing after a stall.)
            Err(_) if last_progress.elapsed() >= Duration::from_secs(1) => break true,
            Err(_) => {}
        }
        if written > limit || started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(
        stalled,
        "the broker kept reading replies for a requester that does not read: {} MiB taken in {:?}",
        written >> 20,
        started.elapsed()
    );
    assert!(written < limit, "{} MiB", written >> 20);

    // The requester reads again: its replies arrive, and the replier's
    // connection is still served afterwards.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut replies = 0u64;
    while replies < 2048 && Instant::now() < deadline {
        requester
            .skip_to_method(1, BASIC_DELIVER, Duration::from_secs(10))
            .await;
        replies += 1;
    }
    assert_eq!(replies, 2048, "replies flow again once the requester reads");
    drop(requester);
    drop(replier);
    // The broker still serves: the RPC queue is there.
    ch.queue_declare(
        rpc.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}
