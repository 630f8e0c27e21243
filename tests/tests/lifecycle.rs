//! Connection lifecycle over TCP: graceful shutdown (320 to every client) and
//! heartbeats (sent by the broker; a silent client is dropped after two
//! intervals).

use futures_lite::StreamExt;
use lapin::{ErrorKind, Event};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::amqp::{connection as conn, AMQPClass};
use warren_protocol::frame;
use warren_protocol::method;
use warren_protocol::types::{FieldTable, LongString};
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
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = events.next().await {
                if let Event::Error(e) = ev {
                    if let ErrorKind::ProtocolError(amqp) = e.kind() {
                        return Some(amqp.get_id());
                    }
                    return None;
                }
            }
            None
        })
        .await
        .expect("the client hears about the shutdown");
        assert_eq!(code, Some(320));
    }
}

/// Read one frame: (type, channel, payload).
async fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, u16, Vec<u8>)> {
    let mut h = [0u8; 7];
    s.read_exact(&mut h).await?;
    let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload).await?;
    assert_eq!(payload.pop(), Some(frame::FRAME_END));
    Ok((h[0], u16::from_be_bytes([h[1], h[2]]), payload))
}

async fn send(s: &mut TcpStream, m: conn::AMQPMethod) {
    let mut b = bytes::BytesMut::new();
    method::put_method(&mut b, 0, &AMQPClass::Connection(m));
    s.write_all(&b).await.expect("write");
}

/// A raw client that completes the handshake asking for `heartbeat` seconds.
async fn handshake(addr: &str, heartbeat: u16) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(frame::PROTOCOL_HEADER).await.expect("header");
    let (kind, _, p) = read_frame(&mut s).await.expect("connection.start");
    assert_eq!((kind, &p[..4]), (frame::METHOD, &[0, 10, 0, 10][..]));
    send(
        &mut s,
        conn::AMQPMethod::StartOk(conn::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from(&b"\0guest\0guest"[..]),
            locale: "en_US".into(),
        }),
    )
    .await;
    let (_, _, p) = read_frame(&mut s).await.expect("connection.tune");
    assert_eq!(&p[..4], &[0, 10, 0, 30]);
    send(
        &mut s,
        conn::AMQPMethod::TuneOk(conn::TuneOk {
            channel_max: 16,
            frame_max: 131072,
            heartbeat,
        }),
    )
    .await;
    send(
        &mut s,
        conn::AMQPMethod::Open(conn::Open {
            virtual_host: "/".into(),
        }),
    )
    .await;
    let (_, _, p) = read_frame(&mut s).await.expect("connection.open-ok");
    assert_eq!(&p[..4], &[0, 10, 0, 41]);
    s
}

#[tokio::test]
async fn broker_sends_heartbeats_and_drops_a_silent_client() {
    let broker = TestBroker::start().await;
    let mut s = handshake(&broker.addr(), 1).await;
    let start = Instant::now();
    let mut heartbeats = 0;
    let closed_after = loop {
        match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s)).await {
            Ok(Ok((kind, channel, _))) => {
                if kind == frame::HEARTBEAT {
                    assert_eq!(channel, 0);
                    heartbeats += 1;
                }
            }
            Ok(Err(_)) => break start.elapsed(),
            Err(_) => panic!("a client silent for 10 s with heartbeat=1 was not disconnected"),
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
    let mut s = handshake(&broker.addr(), 1).await;
    let mut hb = bytes::BytesMut::new();
    frame::put_heartbeat(&mut hb);
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        s.write_all(&hb)
            .await
            .expect("the broker keeps the connection open");
        // Drain whatever the broker sent (its own heartbeats).
        let _ = tokio::time::timeout(Duration::from_millis(400), read_frame(&mut s)).await;
    }
    // Still open: a connection.close gets its close-ok.
    send(
        &mut s,
        conn::AMQPMethod::Close(conn::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        }),
    )
    .await;
    loop {
        let (kind, _, p) = read_frame(&mut s).await.expect("close-ok");
        if kind == frame::METHOD {
            assert_eq!(&p[..4], &[0, 10, 0, 51]);
            break;
        }
    }
    broker.stop().await;
}
