//! A fake broker that does the least a broker can: completes the handshake,
//! answers setup methods, counts and discards publishes, and acks confirms
//! with one `multiple` ack per read. It never delivers. Point warren-perf at it
//! to see what the client alone can push.

use crate::client::Res;
use bytes::{Buf, BufMut, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren_protocol::client::{self as wire, Args, Frame};

const FRAME_MAX: u32 = 131072;

#[derive(Default)]
pub struct SinkStats {
    pub published: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// `connection.close` received (clean closes).
    pub closes: AtomicU64,
    pub channels: AtomicU64,
    pub queues_declared: AtomicU64,
    pub queues_deleted: AtomicU64,
}

/// Accept connections forever.
pub async fn serve(listener: TcpListener, stats: Arc<SinkStats>) -> Res<()> {
    loop {
        let (sock, _) = listener.accept().await?;
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.connections.fetch_add(1, Relaxed);
            let _ = connection(sock, &stats).await;
        });
    }
}

/// `serve`, plus one line a second with the publish rate.
pub async fn serve_and_report(listener: TcpListener) -> Res<()> {
    let stats = Arc::new(SinkStats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.tick().await;
        let mut prev = 0;
        loop {
            tick.tick().await;
            let cur = st.published.load(Relaxed);
            if cur != prev {
                eprintln!(
                    "sink: {} msg/s received ({} connections so far)",
                    cur - prev,
                    st.connections.load(Relaxed)
                );
            }
            prev = cur;
        }
    });
    serve(listener, stats).await
}

async fn connection(mut sock: TcpStream, stats: &SinkStats) -> Res<()> {
    sock.set_nodelay(true)?;
    let mut hdr = [0u8; 8];
    sock.read_exact(&mut hdr).await?;
    if &hdr != wire::PROTOCOL_HEADER {
        sock.write_all(wire::PROTOCOL_HEADER).await?;
        return Ok(());
    }
    let mut rbuf = BytesMut::with_capacity(1 << 17);
    let mut wbuf = BytesMut::with_capacity(1 << 12);
    start(&mut wbuf);
    sock.write_all(&wbuf).await?;
    wbuf.clear();
    // Per channel: next confirm tag (0 = not in confirm mode) and last acked.
    let mut confirms: Vec<(u64, u64)> = vec![(0, 0); 8];
    loop {
        let mut published = 0u64;
        let mut closing = false;
        while let Some((f, n)) = wire::parse(&rbuf, FRAME_MAX)? {
            if let Frame::Method { ch, id, args } = f {
                let chi = ch as usize;
                if chi >= confirms.len() {
                    confirms.resize(chi + 1, (0, 0));
                }
                match id {
                    wire::BASIC_PUBLISH => {
                        published += 1;
                        if confirms[chi].0 > 0 {
                            confirms[chi].0 += 1;
                        }
                    }
                    wire::CONNECTION_START_OK => tune(&mut wbuf, 2047, FRAME_MAX, 0),
                    wire::CONNECTION_OPEN => {
                        wire::method(&mut wbuf, 0, wire::CONNECTION_OPEN_OK, |b| {
                            wire::short(b, b"")
                        })
                    }
                    wire::CONNECTION_CLOSE => {
                        stats.closes.fetch_add(1, Relaxed);
                        wire::method(&mut wbuf, 0, wire::CONNECTION_CLOSE_OK, |_| {});
                        closing = true;
                    }
                    wire::CHANNEL_OPEN => {
                        confirms[chi] = (0, 0);
                        stats.channels.fetch_add(1, Relaxed);
                        wire::method(&mut wbuf, ch, wire::CHANNEL_OPEN_OK, |b| wire::long(b, b""))
                    }
                    wire::CHANNEL_CLOSE => {
                        wire::method(&mut wbuf, ch, wire::CHANNEL_CLOSE_OK, |_| {})
                    }
                    wire::EXCHANGE_DECLARE => {
                        wire::method(&mut wbuf, ch, wire::EXCHANGE_DECLARE_OK, |_| {})
                    }
                    wire::EXCHANGE_DELETE => {
                        wire::method(&mut wbuf, ch, wire::EXCHANGE_DELETE_OK, |_| {})
                    }
                    wire::QUEUE_DECLARE => {
                        stats.queues_declared.fetch_add(1, Relaxed);
                        let mut a = Args(args);
                        a.u16();
                        let name = a.short().unwrap_or_default();
                        let name = if name.is_empty() {
                            b"amq.gen-sink".as_slice()
                        } else {
                            name
                        };
                        wire::method(&mut wbuf, ch, wire::QUEUE_DECLARE_OK, |b| {
                            wire::short(b, name);
                            b.extend_from_slice(&[0; 8]);
                        })
                    }
                    wire::QUEUE_BIND => wire::method(&mut wbuf, ch, wire::QUEUE_BIND_OK, |_| {}),
                    wire::QUEUE_DELETE => {
                        stats.queues_deleted.fetch_add(1, Relaxed);
                        wire::method(&mut wbuf, ch, wire::QUEUE_DELETE_OK, |b| {
                            b.extend_from_slice(&[0; 4])
                        })
                    }
                    wire::BASIC_QOS => wire::method(&mut wbuf, ch, wire::BASIC_QOS_OK, |_| {}),
                    wire::BASIC_CONSUME => {
                        let mut a = Args(args);
                        a.u16();
                        a.short();
                        let tag = a.short().unwrap_or_default();
                        let tag = if tag.is_empty() {
                            b"ctag-sink".as_slice()
                        } else {
                            tag
                        };
                        wire::method(&mut wbuf, ch, wire::BASIC_CONSUME_OK, |b| {
                            wire::short(b, tag)
                        })
                    }
                    wire::CONFIRM_SELECT => {
                        if confirms[chi].0 == 0 {
                            confirms[chi] = (1, 0);
                        }
                        wire::method(&mut wbuf, ch, wire::CONFIRM_SELECT_OK, |_| {})
                    }
                    _ => {}
                }
            }
            rbuf.advance(n);
        }
        if published > 0 {
            stats.published.fetch_add(published, Relaxed);
            for (ch, (next, acked)) in confirms.iter_mut().enumerate() {
                if *next > 0 && *next - 1 > *acked {
                    *acked = *next - 1;
                    wire::put_ack(&mut wbuf, ch as u16, *acked, true);
                }
            }
        }
        if !wbuf.is_empty() {
            sock.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if closing {
            return Ok(());
        }
        rbuf.reserve(1 << 17);
        if sock.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    }
}

// ---- server → client ----

fn start(buf: &mut BytesMut) {
    wire::method(buf, 0, wire::CONNECTION_START, |b| {
        b.put_u8(0);
        b.put_u8(9);
        wire::table(b, &[("product", "warren-perf sink")]);
        wire::long(b, b"PLAIN");
        wire::long(b, b"en_US");
    });
}

fn tune(buf: &mut BytesMut, channel_max: u16, frame_max: u32, heartbeat: u16) {
    wire::method(buf, 0, wire::CONNECTION_TUNE, |b| {
        b.put_u16(channel_max);
        b.put_u32(frame_max);
        b.put_u16(heartbeat);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::amqp::{channel, connection, queue, AMQPClass};
    use warren_protocol::method::put_method;
    use wire::{long, method, short, CHANNEL_OPEN_OK, CONNECTION_OPEN_OK, QUEUE_DECLARE_OK};

    #[test]
    fn server_methods_match_amq_protocol() {
        let theirs = |class: AMQPClass| {
            let mut b = BytesMut::new();
            put_method(&mut b, 1, &class);
            b
        };
        let mut b = BytesMut::new();
        tune(&mut b, 2047, 131072, 0);
        b[1..3].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            b,
            theirs(AMQPClass::Connection(connection::AMQPMethod::Tune(
                connection::Tune {
                    channel_max: 2047,
                    frame_max: 131072,
                    heartbeat: 0
                }
            )))
        );
        let mut b = BytesMut::new();
        method(&mut b, 1, QUEUE_DECLARE_OK, |b| {
            short(b, b"perf-q0");
            b.extend_from_slice(&[0; 8]);
        });
        assert_eq!(
            b,
            theirs(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(
                queue::DeclareOk {
                    queue: "perf-q0".into(),
                    message_count: 0,
                    consumer_count: 0
                }
            )))
        );
        let mut b = BytesMut::new();
        method(&mut b, 1, CHANNEL_OPEN_OK, |b| long(b, b""));
        assert_eq!(
            b,
            theirs(AMQPClass::Channel(channel::AMQPMethod::OpenOk(
                channel::OpenOk {}
            )))
        );
        let mut b = BytesMut::new();
        method(&mut b, 1, CONNECTION_OPEN_OK, |b| short(b, b""));
        assert_eq!(
            b,
            theirs(AMQPClass::Connection(connection::AMQPMethod::OpenOk(
                connection::OpenOk {}
            )))
        );
    }
}
