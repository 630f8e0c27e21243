//! Defects that took a broker out of service, each reproduced here as it
//! was found: pipelined handshakes, a close pipelined ahead of publishes,
//! sockets that never authenticate.

use bytes::BufMut;
use std::time::Duration;
use tokio::net::TcpSocket;
use warren_protocol::client::{
    self, CHANNEL_OPEN_OK, CONNECTION_CLOSE, CONNECTION_CLOSE_OK, CONNECTION_OPEN_OK,
    CONNECTION_START, CONNECTION_TUNE,
};
use warren_protocol::frame::BODY;
use warren_protocol::reply;
use warren_tests::raw::{encode, frame, Handshake, Next, Raw};
use warren_tests::{within, TestBroker};

/// A client that sends its whole handshake and a channel.open in one write
/// (without waiting for connection.start) gets every answer, with no more
/// bytes from it: the frames behind connection.open are handled at once.
/// (Warren used to answer channel.open only when more bytes came.)
#[tokio::test]
async fn frames_pipelined_behind_connection_open_are_answered() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    let props = Handshake::default().client_properties;
    let all = encode(|b| {
        b.put_slice(client::PROTOCOL_HEADER);
        client::start_ok(b, &props, "guest", "guest");
        client::tune_ok(b, 2047, 131072, 0);
        client::open(b, "/");
        client::channel_open(b, 1);
    });
    raw.send(&all).await;
    raw.expect_method(0, CONNECTION_START).await;
    raw.expect_method(0, CONNECTION_TUNE).await;
    raw.expect_method(0, CONNECTION_OPEN_OK).await;
    raw.expect_method(1, CHANNEL_OPEN_OK).await;
    raw.close().await;
}

/// A client library may put connection.close on the wire ahead of
/// publishes it still had buffered. The broker answers close-ok and keeps
/// reading (and dropping) what follows until the client closes, so the
/// client reads its close-ok instead of a connection reset. (Warren used to
/// close the socket with input unread: the kernel reset the connection.)
#[tokio::test]
async fn a_close_pipelined_ahead_of_publishes_still_gets_close_ok() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    // 32 MB: more than the socket buffers hold, so the client is still
    // writing when the broker answers.
    let body = vec![b'x'; 16 * 1024];
    let all = encode(|b| {
        client::connection_close(b);
        for _ in 0..2_000 {
            client::publish(b, 1, "", "nowhere");
            client::content_header(b, 1, body.len() as u64, false);
            b.put_slice(&frame(BODY, 1, &body));
        }
    });
    // Every byte is taken: a broker that closed with input unread would
    // reset the connection, and the client's write would fail (EPIPE) before
    // it ever read close-ok, as pika's did.
    raw.try_send(&all)
        .await
        .expect("the broker keeps reading after close-ok");
    let close_ok = within("close-ok", async {
        loop {
            match raw.next(Duration::from_secs(5)).await {
                Next::Frame(f) if f.ids() == Some(CONNECTION_CLOSE_OK) => return true,
                Next::Frame(_) => continue,
                Next::Eof | Next::Timeout => return false,
            }
        }
    })
    .await;
    assert!(close_ok, "the client got no close-ok");
    // The client closes its end; the broker then closes the socket cleanly.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut raw.sock).await;
    assert!(raw.wait_eof(Duration::from_secs(5)).await);
}

/// A socket that connects from `source` and sends only the protocol header.
async fn silent_peer(broker: &TestBroker, source: &str) -> tokio::net::TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(format!("{source}:0").parse().expect("address"))
        .expect("bind source address");
    let mut stream = s
        .connect(broker.addr().parse().expect("broker address"))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut stream, client::PROTOCOL_HEADER)
        .await
        .expect("write header");
    stream
}

/// Sockets that never authenticate count against a handshake budget of
/// their own (in all, and per source address), not against
/// `max_connections`: real clients still get in, and the open-connection
/// limit is enforced at connection.open with 530, as RabbitMQ's. (Warren
/// used to count every accepted socket: 200 silent sockets locked a
/// `--max-connections 200` broker until the handshake timeout.)
#[tokio::test]
async fn sockets_that_never_authenticate_do_not_lock_out_real_clients() {
    let broker = TestBroker::start_with(|c| {
        c.max_connections = 3;
        c.max_handshakes = 8;
        c.max_handshakes_per_source = 4;
    })
    .await;
    if !broker.is_warren() {
        return; // Warren's own limits
    }
    // Twenty silent peers from another loopback address: four are let into
    // the handshake, the rest are closed at once.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(silent_peer(&broker, "127.0.0.2").await);
    }
    let mut closed = 0;
    for s in &mut silent {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        // Read connection.start (if admitted), then wait a little for EOF.
        while let Ok(r) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await
        {
            match r {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        closed += eof as usize;
    }
    assert_eq!(
        closed, 16,
        "all but the per-source budget are closed at once"
    );

    // Real clients from 127.0.0.1 get in, up to max_connections ...
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(within("a real client connects", Raw::open(&broker)).await);
    }
    // ... and one more is refused at connection.open with 530.
    let (mut raw, _) = Raw::start(&broker).await;
    let props = Handshake::default().client_properties;
    raw.send_with(|b| client::start_ok(b, &props, "guest", "guest"))
        .await;
    raw.expect_method(0, CONNECTION_TUNE).await;
    raw.send_with(|b| {
        client::tune_ok(b, 2047, 131072, 0);
        client::open(b, "/");
    })
    .await;
    let close = raw.expect_method(0, CONNECTION_CLOSE).await;
    let close = warren_tests::raw::Close::parse(&close.payload);
    assert_eq!(close.reply_code, reply::NOT_ALLOWED);
    assert!(
        close.reply_text.contains("node connection limit (3)"),
        "{}",
        close.reply_text
    );
    // A closed connection frees its slot.
    open.pop().expect("open").close().await;
    let b = broker.broker().expect("in-process broker");
    within("a slot is free again", async {
        while b.connection_slots.available_permits() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("a real client connects", Raw::open(&broker))
        .await
        .close()
        .await;
    drop(silent);
}

/// A source that keeps failing to log in is answered more and more slowly
/// (the first few failures are not). (Warren used to answer every failure
/// at once and log each one in full: a password guesser's flood was a log
/// flood.)
#[tokio::test]
async fn a_source_that_keeps_failing_to_log_in_is_slowed() {
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return; // Warren's own policy
    }
    let props = Handshake::default().client_properties;
    let mut took = Vec::new();
    for _ in 0..5 {
        let (mut raw, _) = Raw::start(&broker).await;
        let started = std::time::Instant::now();
        raw.send_with(|b| client::start_ok(b, &props, "guest", "wrong"))
            .await;
        assert!(raw.wait_eof(Duration::from_secs(10)).await, "refused");
        took.push(started.elapsed());
    }
    assert!(
        took[..3].iter().all(|t| *t < Duration::from_millis(400)),
        "{took:?}"
    );
    assert!(took[4] >= Duration::from_millis(900), "{took:?}");
    // The right password still gets in, and clears the record.
    within("a real client connects", Raw::open(&broker))
        .await
        .close()
        .await;
}

/// A consumer that stops reading its socket cannot hold its unacked
/// messages for ever: once the broker's writes to it make no progress for
/// the write timeout (two heartbeat intervals when heartbeats are on), the
/// connection is closed and the messages go back to the queue. (Warren's
/// writer used to wait on the socket with no limit, and the heartbeat check
/// never ran while it waited.)
#[tokio::test]
async fn a_consumer_that_stops_reading_gives_its_messages_back() {
    let broker = TestBroker::start_with(|c| c.write_timeout = Duration::from_secs(1)).await;
    if !broker.is_warren() {
        return; // RabbitMQ's send timeout is 15 s and not set per test
    }
    let (_conn, ch) = broker.channel().await;
    let q = warren_tests::unique("stuck");
    warren_tests::lapin_util::declare_queue(&ch, &q).await;
    // 400 × 64 KiB: far more than the socket buffers between the broker
    // and a client that does not read.
    let n = 400u32;
    let body = vec![7u8; 64 * 1024];
    for _ in 0..n {
        warren_tests::lapin_util::publish(&ch, "", &q, &body).await;
    }
    warren_tests::lapin_util::wait_count(&ch, &q, n).await;

    let mut stuck = Raw::open(&broker).await;
    stuck.open_channel(1).await;
    stuck
        .send_with(|b| {
            client::qos(b, 1, n as u16);
            client::consume(b, 1, &q, "stuck", false);
        })
        .await;
    // It never reads again. Its deliveries leave the queue ...
    within("the queue hands its messages to the consumer", async {
        while warren_tests::lapin_util::passive_queue(&ch, &q)
            .await
            .expect("queue")
            .message_count()
            > 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // ... and come back once the broker gives up on the stalled socket.
    within("the messages come back", async {
        while warren_tests::lapin_util::passive_queue(&ch, &q)
            .await
            .expect("queue")
            .message_count()
            < n
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    drop(stuck);
}
