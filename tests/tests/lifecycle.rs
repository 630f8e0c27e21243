//! Connection lifecycle over TCP: graceful shutdown (320 to every client) and
//! heartbeats (sent by the broker; a silent client is dropped after two
//! intervals).

use futures_lite::StreamExt;
use lapin::Event;
use std::time::{Duration, Instant};
use warren_protocol::client::{self, CONNECTION_CLOSE_OK};
use warren_protocol::frame::{self, HEARTBEAT, METHOD};
use warren_tests::lapin_util::code;
use warren_tests::raw::{Handshake, Next, Raw};
use warren_tests::TestBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_connection_with_320() {
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return; // needs to stop the broker it started
    }
    let c1 = broker.connect().await;
    let c2 = broker.connect().await;
    let mut e1 = c1.events_listener();
    let mut e2 = c2.events_listener();
    broker.stop().await;
    for events in [&mut e1, &mut e2] {
        let reply_code = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = events.next().await {
                if let Event::Error(e) = ev {
                    return code(&e);
                }
            }
            None
        })
        .await
        .expect("the client hears about the shutdown");
        assert_eq!(reply_code, Some(320));
    }
}

/// A raw client that completes the handshake asking for `heartbeat` seconds.
async fn handshake(broker: &TestBroker, heartbeat: u16) -> Raw {
    Raw::open_with(
        broker,
        Handshake {
            channel_max: 16,
            heartbeat,
            ..Handshake::default()
        },
    )
    .await
}

#[tokio::test]
async fn broker_sends_heartbeats_and_drops_a_silent_client() {
    let broker = TestBroker::start().await;
    let mut raw = handshake(&broker, 1).await;
    let start = Instant::now();
    let mut heartbeats = 0;
    let closed_after = loop {
        match raw.next(Duration::from_secs(10)).await {
            Next::Frame(f) => {
                if f.kind == HEARTBEAT {
                    assert_eq!(f.channel, 0);
                    heartbeats += 1;
                }
            }
            Next::Eof => break start.elapsed(),
            Next::Timeout => {
                panic!("a client silent for 10 s with heartbeat=1 was not disconnected")
            }
        }
    };
    assert!(heartbeats >= 1, "no heartbeat sent in {closed_after:?}");
    // Two missed intervals of 1 s: never before 2 s.
    assert!(
        closed_after >= Duration::from_secs(2),
        "dropped too early: {closed_after:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_heartbeats_stays_connected() {
    let broker = TestBroker::start().await;
    let mut raw = handshake(&broker, 1).await;
    let mut hb = bytes::BytesMut::new();
    frame::put_heartbeat(&mut hb);
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        raw.try_send(&hb)
            .await
            .expect("the broker keeps the connection open");
        // Drain whatever the broker sent (its own heartbeats).
        let _ = raw.next(Duration::from_millis(400)).await;
    }
    // Still open: a connection.close gets its close-ok.
    raw.send_with(client::connection_close).await;
    loop {
        let f = raw.frame().await;
        if f.kind == METHOD {
            assert_eq!(f.ids(), Some(CONNECTION_CLOSE_OK));
            break;
        }
    }
    broker.stop().await;
}
