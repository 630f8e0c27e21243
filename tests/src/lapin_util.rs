//! Helpers for lapin clients: reply codes out of lapin errors, asynchronous
//! channel and connection errors, and short-hands for the common round trips.

use crate::{unique, within, TestBroker};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ErrorKind, Event};
use std::pin::Pin;
use std::time::Duration;

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Assert that `r` failed with the AMQP reply code `expected`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: lapin::Result<T>, expected: u16) {
    match r {
        Ok(v) => panic!("expected reply code {expected}, got success: {v:?}"),
        Err(e) => assert_eq!(
            code(&e),
            Some(expected),
            "expected reply code {expected}, got error: {e}"
        ),
    }
}

/// Errors (channel and connection closes) a connection reports asynchronously.
/// Subscribe *before* doing what should fail: lapin only emits events while a
/// listener exists.
pub struct Errors(Pin<Box<dyn futures_lite::Stream<Item = Event> + Send>>);

impl Errors {
    pub fn of(conn: &Connection) -> Errors {
        Errors(Box::pin(conn.events_listener()))
    }

    /// The reply code of the next error event.
    pub async fn next_code(&mut self) -> u16 {
        within("an error event", async {
            loop {
                match self.0.next().await {
                    Some(Event::Error(e)) => {
                        return code(&e)
                            .unwrap_or_else(|| panic!("error without a reply code: {e}"))
                    }
                    Some(_) => continue,
                    None => panic!("event stream ended without an error"),
                }
            }
        })
        .await
    }
}

/// `queue.declare passive=true`.
pub async fn passive_queue(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declare a plain (non-durable, not exclusive, not auto-delete) queue.
pub async fn declare_queue(ch: &Channel, name: &str) -> lapin::Queue {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.declare")
}

/// Publish and wait until the frames are written.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .expect("basic.publish");
}

/// Round trip on the channel: when it returns, the broker has processed
/// everything sent earlier on this channel (publishes included).
pub async fn sync(ch: &Channel) {
    ch.exchange_declare(
        "amq.direct".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("sync round trip");
}

/// Wait until the queue holds exactly `n` ready messages (publishes and
/// requeues are asynchronous; a passive declare reads the count).
pub async fn wait_count(ch: &Channel, queue: &str, n: u32) {
    within("the queue's message count", async {
        loop {
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("passive queue.declare");
            if q.message_count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// `basic.get` with auto-ack, returning the body (None when empty).
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data)
}

/// Bodies (as strings) currently in `queue`, drained with basic.get.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = get_body(ch, queue).await {
        out.push(String::from_utf8(b).expect("utf-8 body"));
    }
    out
}

/// The next delivery of a consumer, within the test timeout.
pub async fn next_delivery(c: &mut lapin::Consumer) -> lapin::message::Delivery {
    within("a delivery", c.next())
        .await
        .expect("consumer stream ended")
        .expect("delivery error")
}

/// Assert that a consumer gets nothing for a short while.
pub async fn assert_no_delivery(c: &mut lapin::Consumer, wait: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(wait, c.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            d.map(|d| String::from_utf8_lossy(&d.data).into_owned())
        );
    }
}

/// Check that an ordinary lapin client can still connect, declare, publish
/// and get: the broker is alive and well.
pub async fn assert_broker_healthy(broker: &TestBroker) {
    let (conn, ch) = within("lapin connect", broker.channel()).await;
    let q = unique("healthy");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"still alive").await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(
        get_body(&ch, &q).await.as_deref(),
        Some(&b"still alive"[..])
    );
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
    conn.close(200, "bye".into())
        .await
        .expect("connection.close");
}
