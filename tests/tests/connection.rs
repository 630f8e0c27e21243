//! Connection and channel lifecycle over TCP: handshake, server properties,
//! authentication, vhosts, channel_max / frame_max / heartbeat negotiation,
//! and channel-error isolation.

use bytes::BufMut;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use std::time::Duration;
use warren_protocol::client::{
    self, CHANNEL_CLOSE, CHANNEL_CLOSE_OK, CONNECTION_CLOSE, CONNECTION_TUNE,
};
use warren_protocol::frame::HEARTBEAT;
use warren_protocol::reply::{ACCESS_REFUSED, CHANNEL_ERROR, NOT_ALLOWED, NOT_FOUND};
use warren_tests::lapin_util::*;
use warren_tests::raw::{Close, Handshake, Next, Raw};
use warren_tests::{unique, TestBroker, WAIT};

fn url_with(broker: &TestBroker, query: &str) -> String {
    let sep = if broker.url.contains('?') { '&' } else { '?' };
    format!("{}{sep}{query}", broker.url)
}

#[tokio::test]
async fn connect_and_close() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    assert!(conn.status().connected());
    let ch = conn.create_channel().await.expect("channel");
    assert!(ch.status().connected());
    ch.close(200, "bye".into()).await.expect("channel.close");
    assert!(!ch.status().connected());
    conn.close(200, "bye".into())
        .await
        .expect("connection.close");
    assert!(!conn.status().connected());
    broker.stop().await;
}

#[tokio::test]
async fn server_properties_and_capabilities() {
    let broker = TestBroker::start().await;
    let (raw, start) = Raw::start(&broker).await;
    let (_, class) =
        lapin::protocol::parse_class(&start.payload[..]).expect("connection.start decodes");
    let lapin::protocol::AMQPClass::Connection(lapin::protocol::connection::AMQPMethod::Start(
        start,
    )) = class
    else {
        panic!("expected connection.start, got {class:?}");
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = start.mechanisms.to_string();
    let mechanisms: Vec<&str> = mechanisms.split_whitespace().collect();
    assert!(mechanisms.contains(&"PLAIN"), "mechanisms: {mechanisms:?}");
    assert!(
        mechanisms.contains(&"AMQPLAIN"),
        "mechanisms: {mechanisms:?}"
    );
    assert!(start
        .locales
        .to_string()
        .split_whitespace()
        .any(|l| l == "en_US"));

    let props = start.server_properties.inner();
    for key in [
        "product",
        "version",
        "platform",
        "copyright",
        "information",
        "cluster_name",
    ] {
        assert!(
            props.contains_key(key),
            "server-properties lacks {key}: {props:?}"
        );
    }
    if broker.is_warren() {
        match props.get("product") {
            Some(AMQPValue::LongString(s)) => assert_eq!(s.to_string(), "Warren"),
            other => panic!("product: {other:?}"),
        }
    }
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!("no capabilities table: {props:?}");
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }
    drop(raw);
    broker.stop().await;
}

#[tokio::test]
async fn wrong_password_is_refused_with_403() {
    let broker = TestBroker::start().await;
    let url = broker
        .url
        .replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, broker.url, "URL has guest:guest credentials");
    let r = Connection::connect(&url, ConnectionProperties::default()).await;
    // lapin announces authentication_failure_close, so the broker must say why.
    assert_code(r.map(|_| ()), ACCESS_REFUSED);
    // Unknown user too.
    let url = broker.url.replacen("guest:guest@", "nobody:guest@", 1);
    let r = Connection::connect(&url, ConnectionProperties::default()).await;
    assert_code(r.map(|_| ()), ACCESS_REFUSED);
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn login_failure_without_capability_just_drops_the_socket() {
    // A client that did not set authentication_failure_close gets no
    // connection.close: the socket is simply closed.
    let broker = TestBroker::start().await;
    let (mut raw, _) = Raw::start(&broker).await;
    let props = Handshake::default().client_properties;
    raw.send_with(|b| client::start_ok(b, &props, "guest", "wrong"))
        .await;
    match raw.next(WAIT).await {
        Next::Eof => {}
        other => panic!("expected the socket to close, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test]
async fn unknown_vhost_is_530() {
    let broker = TestBroker::start().await;
    let base = broker.url.rsplit_once('/').expect("url has a vhost").0;
    let url = format!("{base}/{}", unique("no-such-vhost"));
    let r = Connection::connect(&url, ConnectionProperties::default()).await;
    assert_code(r.map(|_| ()), NOT_ALLOWED);
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn channel_max_is_negotiated_down_by_the_client() {
    let broker = TestBroker::start().await;
    let conn = Connection::connect(
        &url_with(&broker, "channel_max=3"),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    assert_eq!(conn.configuration().channel_max(), 3);
    let mut chans = Vec::new();
    for _ in 0..3 {
        chans.push(
            conn.create_channel()
                .await
                .expect("channel within channel_max"),
        );
    }
    let ids: Vec<u16> = chans.iter().map(|c| c.id()).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    match conn.create_channel().await {
        Err(e) => assert!(matches!(e.kind(), ErrorKind::ChannelsLimitReached), "{e}"),
        Ok(c) => panic!("opened channel {} beyond channel_max", c.id()),
    }
    // The channels we have all work.
    for ch in &chans {
        sync(ch).await;
    }
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn default_negotiation_takes_the_server_proposal() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let cfg = conn.configuration();
    assert_eq!(cfg.channel_max(), 2047);
    assert_eq!(cfg.frame_max(), 131072);
    assert_eq!(cfg.heartbeat(), 60);
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn server_tune_proposal() {
    let broker = TestBroker::start().await;
    let (mut raw, _) = Raw::start(&broker).await;
    let props = Handshake::default().client_properties;
    raw.send_with(|b| client::start_ok(b, &props, "guest", "guest"))
        .await;
    let tune = raw.expect_method(0, CONNECTION_TUNE).await;
    let a = &tune.payload[4..];
    assert_eq!(u16::from_be_bytes([a[0], a[1]]), 2047, "channel_max");
    assert_eq!(
        u32::from_be_bytes([a[2], a[3], a[4], a[5]]),
        131072,
        "frame_max"
    );
    assert_eq!(u16::from_be_bytes([a[6], a[7]]), 60, "heartbeat");
    broker.stop().await;
}

#[tokio::test]
async fn broker_enforces_negotiated_channel_max() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open_with(
        &broker,
        Handshake {
            channel_max: 2,
            ..Handshake::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send_with(|b| client::channel_open(b, 3)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, NOT_ALLOWED, "{close:?}");
    if broker.is_warren() {
        // RabbitMQ 3.10 sends 0/0 here; Warren names the offending method.
        assert_eq!((close.class_id, close.method_id), (20, 10), "{close:?}");
    }
    broker.stop().await;
}

/// A refused tune-ok: Warren answers connection.close 530. RabbitMQ 3.10
/// treats it as a handshake error: it waits 3 s and resets the socket, so
/// against another broker a plain close is accepted too.
async fn expect_tune_refused(broker: &TestBroker, raw: &mut Raw, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match raw.next(left).await {
            Next::Frame(f) if f.ids() == Some(CONNECTION_CLOSE) => {
                let close = Close::parse(&f.payload);
                assert_eq!(close.reply_code, NOT_ALLOWED, "{what}: {close:?}");
                assert_eq!(
                    (close.class_id, close.method_id),
                    (10, 31),
                    "{what}: {close:?}"
                );
                return;
            }
            Next::Frame(f) if f.kind == HEARTBEAT => continue,
            Next::Eof if !broker.is_warren() => return,
            other => panic!("{what}: expected connection.close 530, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn tune_ok_frame_max_out_of_bounds_is_530() {
    let broker = TestBroker::start().await;
    for frame_max in [1024u32, 0, 131072 * 2] {
        let (mut raw, _) = Raw::start(&broker).await;
        let props = Handshake::default().client_properties;
        raw.send_with(|b| client::start_ok(b, &props, "guest", "guest"))
            .await;
        raw.expect_method(0, CONNECTION_TUNE).await;
        raw.send_with(|b| client::tune_ok(b, 2047, frame_max, 0))
            .await;
        expect_tune_refused(&broker, &mut raw, &format!("frame_max {frame_max}")).await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn tune_ok_channel_max_above_server_is_530() {
    let broker = TestBroker::start().await;
    let (mut raw, _) = Raw::start(&broker).await;
    let props = Handshake::default().client_properties;
    raw.send_with(|b| client::start_ok(b, &props, "guest", "guest"))
        .await;
    raw.expect_method(0, CONNECTION_TUNE).await;
    raw.send_with(|b| client::tune_ok(b, 4000, 131072, 0)).await;
    expect_tune_refused(&broker, &mut raw, "channel_max 4000").await;
    broker.stop().await;
}

#[tokio::test]
async fn heartbeat_is_negotiated() {
    let broker = TestBroker::start().await;
    let conn = Connection::connect(
        &url_with(&broker, "heartbeat=5"),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    assert_eq!(conn.configuration().heartbeat(), 5);
    let ch = conn.create_channel().await.expect("channel");
    sync(&ch).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

// Heartbeats actually sent by the broker and a silent client being dropped
// are covered by lifecycle.rs.

#[tokio::test]
async fn heartbeat_zero_disables_it() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open_with(
        &broker,
        Handshake {
            heartbeat: 0,
            ..Handshake::default()
        },
    )
    .await;
    match raw.next(Duration::from_millis(2500)).await {
        Next::Timeout => {}
        other => panic!("expected silence, got {other:?}"),
    }
    raw.close().await;
    broker.stop().await;
}

#[tokio::test]
async fn channel_error_closes_only_that_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let bad = conn.create_channel().await.expect("channel");
    let good = conn.create_channel().await.expect("channel");
    let q = unique("iso");
    declare_queue(&good, &q).await;

    let r = bad
        .queue_declare(
            unique("missing").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, NOT_FOUND);
    assert_eq!(errors.next_code().await, NOT_FOUND);
    assert!(!bad.status().connected());
    // Anything further on the closed channel fails locally.
    assert!(bad.basic_qos(1, BasicQosOptions::default()).await.is_err());

    // The connection and the other channel are unaffected.
    assert!(conn.status().connected());
    publish(&good, "", &q, b"after the error").await;
    wait_count(&good, &q, 1).await;
    assert_eq!(
        get_body(&good, &q).await.as_deref(),
        Some(&b"after the error"[..])
    );
    // And new channels still open.
    let third = conn
        .create_channel()
        .await
        .expect("new channel after a channel error");
    sync(&third).await;

    good.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn many_connections_and_channels() {
    let broker = TestBroker::start().await;
    let mut conns = Vec::new();
    for _ in 0..10 {
        let c = broker.connect().await;
        for _ in 0..5 {
            let ch = c.create_channel().await.expect("channel");
            sync(&ch).await;
        }
        conns.push(c);
    }
    for c in conns {
        c.close(200, "bye".into()).await.expect("close");
    }
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn second_channel_open_on_same_id_is_504() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| client::channel_open(b, 1)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, CHANNEL_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn channel_close_then_reopen_same_id() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| {
        client::method(b, 1, CHANNEL_CLOSE, |b| {
            b.put_u16(200);
            client::short(b, b"bye");
            b.put_slice(&[0, 0, 0, 0]);
        })
    })
    .await;
    raw.expect_method(1, CHANNEL_CLOSE_OK).await;
    raw.open_channel(1).await;
    raw.close().await;
    broker.stop().await;
}
