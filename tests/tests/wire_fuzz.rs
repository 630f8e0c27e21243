//! A structure-aware wire fuzzer: thousands of sessions that open a
//! connection properly, then send valid client frames (declares, binds,
//! publishes with content, consumes, acks, confirms, closes) mutated the
//! ways a broken or hostile client would: bytes flipped, frames cut short,
//! sizes forged, frames duplicated, dropped or swapped, garbage spliced in.
//! The broker may close any of those connections, but it must never crash
//! or hang, and afterwards it must still serve a real client.
//!
//! Deterministic (a fixed seed per case, printed on failure) and bounded:
//! `WARREN_WIRE_FUZZ_CASES` cases (default 3,000) or 60 s, whichever ends
//! first.

use bytes::{BufMut, BytesMut};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_protocol::client;
use warren_protocol::frame::{BODY, HEARTBEAT};
use warren_tests::lapin_util::assert_broker_healthy;
use warren_tests::raw::{frame, Raw};
use warren_tests::TestBroker;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// One valid client frame (or a frame group: a publish with its content).
fn valid_frame(r: &mut Rng, ch: u16) -> BytesMut {
    let q = ["fz-q", "fz-q2", "", "amq.gen-x"][r.below(4)];
    let x = ["fz-x", "amq.topic", "", "amq.headers"][r.below(4)];
    let mut b = BytesMut::new();
    match r.below(16) {
        0 => client::channel_open(&mut b, ch),
        1 => client::queue_declare(&mut b, ch, q, r.chance(2)),
        2 => client::exchange_declare(
            &mut b,
            ch,
            "fz-x",
            ["direct", "topic", "fanout", "headers"][r.below(4)],
            false,
        ),
        3 => client::queue_bind(&mut b, ch, q, x, "a.#"),
        4..=6 => {
            let size = [0usize, 1, 100, 5000][r.below(4)];
            client::publish(&mut b, ch, x, q);
            client::content_header(&mut b, ch, size as u64, r.chance(2));
            if size > 0 {
                b.put_slice(&frame(BODY, ch, &vec![b'z'; size]));
            }
        }
        7 => client::consume(&mut b, ch, q, "fz-tag", r.chance(2)),
        8 => client::qos(&mut b, ch, r.below(100) as u16),
        9 => warren_protocol::method::put_ack(&mut b, ch, r.below(5) as u64, r.chance(2)),
        10 => warren_protocol::method::put_nack(&mut b, ch, r.below(5) as u64, r.chance(2)),
        11 => client::confirm_select(&mut b, ch),
        12 => client::queue_delete(&mut b, ch, q),
        13 => client::exchange_delete(&mut b, ch, "fz-x"),
        14 => b.put_slice(&frame(HEARTBEAT, 0, &[])),
        _ => client::method(&mut b, ch, client::CHANNEL_CLOSE, |a| {
            a.put_u16(200);
            client::short(a, b"bye");
            a.put_u32(0);
        }),
    }
    b
}

/// Mutate a frame the way a broken client might.
fn mutate(r: &mut Rng, f: &mut BytesMut) {
    if f.is_empty() {
        return;
    }
    match r.below(8) {
        // Flip a few bytes anywhere (type, channel, size, ids, arguments).
        0 | 1 => {
            for _ in 0..1 + r.below(3) {
                let i = r.below(f.len());
                f[i] ^= 1 << r.below(8);
            }
        }
        // Cut short.
        2 => {
            let n = r.below(f.len());
            f.truncate(n);
        }
        // Forge the size field.
        3 if f.len() >= 7 => {
            let size = [0u32, 1, 3, 4095, 131_072, 1 << 31, u32::MAX][r.below(7)];
            f[3..7].copy_from_slice(&size.to_be_bytes());
        }
        // Splice garbage in.
        4 => {
            let at = r.below(f.len());
            let junk: Vec<u8> = (0..1 + r.below(16)).map(|_| r.next() as u8).collect();
            let tail = f.split_off(at);
            f.put_slice(&junk);
            f.put_slice(&tail);
        }
        // Another channel.
        5 if f.len() >= 3 => {
            let ch = [0u16, 1, 2, 2047, u16::MAX][r.below(5)];
            f[1..3].copy_from_slice(&ch.to_be_bytes());
        }
        // Left alone.
        _ => {}
    }
}

/// One session: a proper handshake, then a burst of (mostly mutated)
/// frames; read what comes back for a moment, then drop the socket.
async fn session(broker: &TestBroker, seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut raw = Raw::open(broker).await;
    raw.open_channel(1).await;
    let mut burst = BytesMut::new();
    let mut frames: Vec<BytesMut> = (0..1 + r.below(24))
        .map(|_| {
            let ch = if r.chance(8) { 2 } else { 1 };
            let mut f = valid_frame(&mut r, ch);
            if r.chance(2) {
                mutate(&mut r, &mut f);
            }
            f
        })
        .collect();
    // Duplicate, drop or swap whole frames now and then.
    if frames.len() > 1 && r.chance(4) {
        let i = r.below(frames.len());
        let j = r.below(frames.len());
        frames.swap(i, j);
    }
    if r.chance(6) {
        let i = r.below(frames.len());
        let dup = frames[i].clone();
        frames.insert(i, dup);
    }
    if frames.len() > 1 && r.chance(6) {
        let i = r.below(frames.len());
        frames.remove(i);
    }
    for f in &frames {
        burst.put_slice(f);
    }
    let _ = raw.sock.write_all(&burst).await;
    // Read for a moment (answers, closes, EOF), then leave.
    let mut sink = vec![0u8; 64 * 1024];
    let until = Instant::now() + Duration::from_millis(20);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until.into(), raw.sock.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_frames_never_take_the_broker_down() {
    let broker = TestBroker::start().await;
    let cases: u64 = std::env::var("WARREN_WIRE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    let mut done = 0u64;
    // Eight sessions at a time.
    let broker = std::sync::Arc::new(broker);
    let mut seed = 1u64;
    while seed <= cases && Instant::now() < deadline {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..8 {
            if seed > cases {
                break;
            }
            let b = broker.clone();
            let s = seed;
            batch.spawn(async move {
                if tokio::time::timeout(Duration::from_secs(10), session(&b, s))
                    .await
                    .is_err()
                {
                    panic!("session with seed {s} hung");
                }
            });
            seed += 1;
        }
        while let Some(r) = batch.join_next().await {
            r.expect("a session failed (its seed is in the message above)");
            done += 1;
        }
    }
    eprintln!(
        "wire fuzz: {done} sessions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(done >= 500, "only {done} sessions ran");
    assert_broker_healthy(&broker).await;
}
