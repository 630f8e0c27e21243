//! Hostile and broken peers over raw TCP: bad headers, malformed frames,
//! protocol violations, deep tables. The broker must answer with the right
//! connection.close (or close the socket) and keep serving everyone else.

use bytes::BufMut;
use std::time::Duration;
use warren_protocol::client::{
    self, BASIC_CONSUME_OK, CHANNEL_FLOW, CONNECTION_CLOSE, CONNECTION_TUNE, QUEUE_DECLARE,
    QUEUE_DECLARE_OK, QUEUE_DELETE_OK,
};
use warren_protocol::frame::{BODY, HEADER, HEARTBEAT, METHOD, PROTOCOL_HEADER};
use warren_protocol::reply::{
    CHANNEL_ERROR, COMMAND_INVALID, FRAME_ERROR, NOT_IMPLEMENTED, SYNTAX_ERROR, UNEXPECTED_FRAME,
};
use warren_tests::lapin_util::assert_broker_healthy;
use warren_tests::raw::{encode, frame, Close, Handshake, Next, Raw};
use warren_tests::{unique, TestBroker, WAIT};

/// Open a connection and channel 1, send `bytes`, and return the
/// connection.close the broker answers with.
async fn close_after(broker: &TestBroker, bytes: &[u8]) -> Close {
    let mut raw = Raw::open(broker).await;
    raw.open_channel(1).await;
    raw.send(bytes).await;
    let close = raw.expect_connection_close().await;
    // After close-ok the broker closes the socket.
    assert!(
        raw.wait_eof(WAIT).await,
        "socket still open after connection.close-ok"
    );
    close
}

// ------------------------------------------------------------ protocol header

#[tokio::test]
async fn wrong_protocol_header_gets_ours_back() {
    let broker = TestBroker::start().await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"AMQP\x00\x01\x00\x00"[..],
        &b"AMQP\x03\x01\x00\x00"[..],
        &b"XXXXXXXX"[..],
    ] {
        let mut raw = Raw::connect(&broker).await;
        raw.send(bad).await;
        let reply = raw.read_bytes(8, WAIT).await;
        assert_eq!(
            reply,
            PROTOCOL_HEADER,
            "reply to {:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(
            raw.wait_eof(WAIT).await,
            "socket left open after a bad header"
        );
    }
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn frame_before_protocol_header_is_refused() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send_with(|b| client::channel_open(b, 1)).await;
    let reply = raw.read_bytes(8, WAIT).await;
    assert_eq!(reply, PROTOCOL_HEADER);
    assert!(raw.wait_eof(WAIT).await);
    broker.stop().await;
}

#[tokio::test]
async fn silent_peer_is_dropped_after_handshake_timeout() {
    let broker = TestBroker::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    if !broker.is_warren() {
        return;
    }
    // Nothing at all.
    let mut raw = Raw::connect(&broker).await;
    assert!(
        raw.wait_eof(Duration::from_secs(3)).await,
        "idle socket kept open"
    );
    // Header, then silence after connection.start.
    let (mut raw, _) = Raw::start(&broker).await;
    assert!(
        raw.wait_eof(Duration::from_secs(3)).await,
        "half-done handshake kept open"
    );
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

// ------------------------------------------------------------------- frames

#[tokio::test]
async fn bad_frame_end_is_501() {
    let broker = TestBroker::start().await;
    let mut f = encode(|b| client::channel_open(b, 1));
    *f.last_mut().unwrap() = 0x00;
    let mut raw = Raw::open(&broker).await;
    raw.send(&f).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn oversize_frame_is_501() {
    let broker = TestBroker::start().await;
    // Negotiated frame_max is 131072: a method frame 1000 bytes too large.
    let payload = vec![0u8; 131072 - 8 + 1000];
    let close = close_after(&broker, &frame(METHOD, 1, &payload)).await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");

    // A forged 4 GiB size is refused from the 7-byte header alone.
    let mut raw = Raw::open(&broker).await;
    let mut hdr = vec![METHOD, 0, 1];
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    raw.send(&hdr).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn frame_one_byte_over_frame_max_is_501() {
    // RabbitMQ 3.10 tolerates a few bytes over frame_max (FRAME_SIZE_FUDGE);
    // Warren enforces the limit exactly.
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return;
    }
    let payload = vec![0u8; 131072 - 8 + 1];
    let close = close_after(&broker, &frame(BODY, 1, &payload)).await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn frame_at_exactly_frame_max_is_fine() {
    let broker = TestBroker::start().await;
    let q = unique("exact");
    let mut raw = Raw::open_with(
        &broker,
        Handshake {
            frame_max: 4096,
            ..Handshake::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    raw.declare_queue(1, &q).await;
    let body: Vec<u8> = (0..4096 - 8).map(|i| i as u8).collect();
    raw.send_with(|b| client::publish(b, 1, "", &q)).await;
    raw.send_with(|b| client::content_header(b, 1, body.len() as u64, false))
        .await;
    raw.send(&frame(BODY, 1, &body)).await;
    let (_, got) = raw.get_message(1, &q).await;
    assert!(got == body, "body changed");
    raw.delete_queue(1, &q).await;
    raw.close().await;
    broker.stop().await;
}

#[tokio::test]
async fn unknown_frame_type_is_501() {
    let broker = TestBroker::start().await;
    let close = close_after(&broker, &frame(9, 1, b"xx")).await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn method_on_unopened_channel_is_504() {
    let broker = TestBroker::start().await;
    let close = close_after(
        &broker,
        &encode(|b| client::queue_declare(b, 7, "x", false)),
    )
    .await;
    assert_eq!(close.reply_code, CHANNEL_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn content_header_without_publish_is_505() {
    let broker = TestBroker::start().await;
    let close = close_after(&broker, &encode(|b| client::content_header(b, 1, 3, false))).await;
    assert_eq!(close.reply_code, UNEXPECTED_FRAME, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn body_without_header_is_505() {
    let broker = TestBroker::start().await;
    let close = close_after(&broker, &frame(BODY, 1, b"orphan")).await;
    assert_eq!(close.reply_code, UNEXPECTED_FRAME, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn method_in_the_middle_of_content_is_505() {
    let broker = TestBroker::start().await;
    let bytes = encode(|b| {
        client::publish(b, 1, "", "nowhere");
        client::content_header(b, 1, 10, false);
        b.put_slice(&frame(BODY, 1, b"12345"));
        client::qos(b, 1, 1);
    });
    let close = close_after(&broker, &bytes).await;
    assert_eq!(close.reply_code, UNEXPECTED_FRAME, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn body_longer_than_declared_is_an_error() {
    let broker = TestBroker::start().await;
    // RabbitMQ 3.10 never completes such a message: the channel just stalls,
    // waiting for a body that can never add up. Warren refuses it.
    if !broker.is_warren() {
        return;
    }
    let bytes = encode(|b| {
        client::publish(b, 1, "", "nowhere");
        client::content_header(b, 1, 3, false);
        b.put_slice(&frame(BODY, 1, b"123456"));
    });
    let close = close_after(&broker, &bytes).await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn heartbeat_on_a_channel_is_505() {
    let broker = TestBroker::start().await;
    let close = close_after(&broker, &frame(HEARTBEAT, 1, &[])).await;
    assert_eq!(close.reply_code, UNEXPECTED_FRAME, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn garbage_after_handshake_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let _ = raw.try_send(&junk).await;
    // Either an explicit connection.close or a dropped socket, within the timeout.
    assert!(
        raw.wait_eof(WAIT).await,
        "broker kept a connection that sent garbage"
    );
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

// ------------------------------------------------------------------ methods

#[tokio::test]
async fn unknown_class_or_method_is_540() {
    // RabbitMQ 3.10's connection process crashes on these and drops the
    // socket without a close; Warren must answer 540 NOT_IMPLEMENTED.
    let broker = TestBroker::start().await;
    let lenient = !broker.is_warren();
    for (channel, class, method) in [(1, 50, 99), (1, 999, 1), (0, 999, 1)] {
        let mut raw = Raw::open(&broker).await;
        if channel != 0 {
            raw.open_channel(channel).await;
        }
        raw.send_with(|b| client::method(b, channel, (class, method), |_| {}))
            .await;
        if let Some(close) = raw.expect_close_or_drop(NOT_IMPLEMENTED, lenient).await {
            assert_eq!(
                (close.class_id, close.method_id),
                (class, method),
                "{close:?}"
            );
        }
    }
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

#[tokio::test]
async fn server_only_method_from_client_is_503() {
    let broker = TestBroker::start().await;
    // basic.consume-ok sent by a client.
    let consume_ok =
        encode(|b| client::method(b, 1, BASIC_CONSUME_OK, |b| client::short(b, b"ctag")));
    let close = close_after(&broker, &consume_ok).await;
    assert_eq!(close.reply_code, COMMAND_INVALID, "{close:?}");
    // queue.declare-ok sent by a client.
    let declare_ok = encode(|b| {
        client::method(b, 1, QUEUE_DECLARE_OK, |b| {
            client::short(b, b"q");
            b.put_slice(&[0; 8]);
        })
    });
    let close = close_after(&broker, &declare_ok).await;
    assert_eq!(close.reply_code, COMMAND_INVALID, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn channel_methods_on_channel_zero_are_504() {
    let broker = TestBroker::start().await;
    for ((class, method), bytes) in [
        (client::CHANNEL_OPEN, encode(|b| client::channel_open(b, 0))),
        (
            QUEUE_DECLARE,
            encode(|b| client::queue_declare(b, 0, "x", false)),
        ),
    ] {
        let mut raw = Raw::open(&broker).await;
        raw.send(&bytes).await;
        let close = raw.expect_connection_close().await;
        assert_eq!(
            close.reply_code, CHANNEL_ERROR,
            "{class}/{method}: {close:?}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn truncated_method_is_501() {
    let broker = TestBroker::start().await;
    // queue.declare cut short: the queue name claims 200 bytes.
    let mut a = vec![0, 0, 200];
    a.extend_from_slice(b"short");
    let close = close_after(
        &broker,
        &encode(|b| client::method(b, 1, QUEUE_DECLARE, |b| b.put_slice(&a))),
    )
    .await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (50, 10), "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn malformed_utf8_in_short_string_is_501() {
    let broker = TestBroker::start().await;
    let mut a = vec![0, 0, 2, 0xff, 0xfe, 0];
    a.extend_from_slice(&0u32.to_be_bytes());
    let close = close_after(
        &broker,
        &encode(|b| client::method(b, 1, QUEUE_DECLARE, |b| b.put_slice(&a))),
    )
    .await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn method_before_connection_open_is_505() {
    let broker = TestBroker::start().await;
    let (mut raw, _) = Raw::start(&broker).await;
    let props = Handshake::default().client_properties;
    raw.send_with(|b| client::start_ok(b, &props, "guest", "guest"))
        .await;
    raw.expect_method(0, CONNECTION_TUNE).await;
    raw.send_with(|b| client::tune_ok(b, 2047, 131072, 0)).await;
    raw.send_with(|b| client::channel_open(b, 1)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, UNEXPECTED_FRAME, "{close:?}");
    broker.stop().await;
}

#[tokio::test]
async fn client_flow_inactive_is_540() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| client::method(b, 1, CHANNEL_FLOW, |b| b.put_u8(0)))
        .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, NOT_IMPLEMENTED, "{close:?}");
    broker.stop().await;
}

// ------------------------------------------------------------- deep tables

/// A field table nested `depth` levels deep, with empty keys, length-prefixed.
fn nested_table(depth: usize) -> Vec<u8> {
    let mut t = 0u32.to_be_bytes().to_vec(); // innermost: empty table
    for _ in 0..depth {
        let mut outer = Vec::with_capacity(t.len() + 6);
        let inner_len = 1 + 1 + t.len(); // key len 0, 'F', table
        outer.extend_from_slice(&(inner_len as u32).to_be_bytes());
        outer.push(0);
        outer.push(b'F');
        outer.extend_from_slice(&t);
        t = outer;
    }
    t
}

/// A field table holding an array nested `depth` levels deep.
fn nested_array_table(depth: usize) -> Vec<u8> {
    let mut arr = 0u32.to_be_bytes().to_vec();
    for _ in 0..depth {
        let mut outer = Vec::with_capacity(arr.len() + 5);
        outer.extend_from_slice(&((1 + arr.len()) as u32).to_be_bytes());
        outer.push(b'A');
        outer.extend_from_slice(&arr);
        arr = outer;
    }
    let mut t = bytes::BytesMut::new();
    client::short(&mut t, b"a");
    t.put_u8(b'A');
    t.put_slice(&arr);
    let mut out = bytes::BytesMut::new();
    client::long(&mut out, &t);
    out.to_vec()
}

/// What the broker did with a hostile start-ok.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// connection.close with this code.
    Closed(u16),
    /// The socket was closed without a word.
    Dropped,
    /// connection.tune: the broker parsed the table and carried on.
    Tuned,
}

/// Send a start-ok with these client-properties and report what happened.
/// Hanging (no answer within the timeout) fails the test.
async fn hostile_start_ok(broker: &TestBroker, props: &[u8]) -> Outcome {
    let (mut raw, _) = Raw::start(broker).await;
    let _ = raw
        .try_send(&encode(|b| client::start_ok(b, props, "guest", "guest")))
        .await;
    loop {
        match raw.next(WAIT).await {
            Next::Eof => return Outcome::Dropped,
            Next::Timeout => panic!("no answer to a hostile start-ok"),
            Next::Frame(f) if f.ids() == Some(CONNECTION_CLOSE) => {
                return Outcome::Closed(Close::parse(&f.payload).reply_code)
            }
            Next::Frame(f) if f.ids() == Some(CONNECTION_TUNE) => return Outcome::Tuned,
            Next::Frame(f) if f.kind == HEARTBEAT => continue,
            Next::Frame(f) => panic!("unexpected frame {f:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_client_properties_do_not_crash_the_broker() {
    let broker = TestBroker::start().await;
    let cases = [
        // 5000 levels: larger than any pre-tune frame limit.
        ("table x5000", nested_table(5000)),
        // As deep as fits in a 4 KiB frame (~680 levels).
        ("table x670", nested_table(670)),
        ("array x780", nested_array_table(780)),
    ];
    for (what, props) in &cases {
        let outcome = hostile_start_ok(&broker, props).await;
        eprintln!("{what}: {outcome:?}");
        if broker.is_warren() {
            // Warren bounds table depth: it must refuse, not carry on.
            assert!(
                matches!(
                    outcome,
                    Outcome::Closed(FRAME_ERROR) | Outcome::Closed(SYNTAX_ERROR) | Outcome::Dropped
                ),
                "{what}: {outcome:?}"
            );
        }
    }
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

/// A content header (no other properties) whose headers table is `table`.
fn header_with_table(table: &[u8], body_size: u64) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&body_size.to_be_bytes());
    header.extend_from_slice(&0x2000u16.to_be_bytes());
    header.extend_from_slice(table);
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_queue_arguments_do_not_crash_the_broker() {
    let broker = TestBroker::start().await;
    let q = unique("deep-args");
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    // queue.declare arguments nested 20000 levels (about 120 KB).
    raw.send_with(|b| client::queue_declare_with(b, 1, &q, 0, &nested_table(20000)))
        .await;
    // declare-ok (RabbitMQ copes with it), a close, or a dropped socket.
    if let Next::Frame(f) = raw.next(WAIT).await {
        if f.ids() == Some(QUEUE_DECLARE_OK) {
            raw.send_with(|b| client::queue_delete(b, 1, &q)).await;
            raw.expect_method(1, QUEUE_DELETE_OK).await;
        }
    }
    assert_broker_healthy(&broker).await;
    broker.stop().await;
}

/// Publish a message whose headers nest 20000 levels to `exchange` (routing
/// key `q`), then check the broker is still up.
async fn publish_deep_headers(exchange: &str) {
    let broker = TestBroker::start().await;
    let q = unique("deep-headers");
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| client::queue_declare(b, 1, &q, false))
        .await;
    raw.expect_method(1, QUEUE_DECLARE_OK).await;
    let header = header_with_table(&nested_table(20000), 1);
    let _ = raw
        .try_send(&encode(|b| client::publish(b, 1, exchange, &q)))
        .await;
    let _ = raw.try_send(&frame(HEADER, 1, &header)).await;
    let _ = raw.try_send(&frame(BODY, 1, b"x")).await;
    // A round trip (or the broker's refusal).
    let passive =
        encode(|b| client::queue_declare_with(b, 1, &q, client::PASSIVE, &0u32.to_be_bytes()));
    let _ = raw.try_send(&passive).await;
    let _ = raw.next(WAIT).await;
    drop(raw);
    assert_broker_healthy(&broker).await;
    let (conn, ch) = broker.channel().await;
    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_to_default_exchange_do_not_crash_the_broker() {
    publish_deep_headers("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_to_headers_exchange_do_not_crash_the_broker() {
    publish_deep_headers("amq.headers").await;
}

#[tokio::test]
async fn many_half_open_connections_do_not_block_others() {
    let broker = TestBroker::start().await;
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut raw = Raw::connect(&broker).await;
        raw.send(b"AMQP").await; // half a header
        held.push(raw);
    }
    assert_broker_healthy(&broker).await;
    drop(held);
    broker.stop().await;
}
