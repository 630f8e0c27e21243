//! `warren-perf idle`: open connections, channels and queues and hold them,
//! doing nothing, so the broker's memory per idle resource can be measured.
//!
//! - `connections` connections, each with `channels` channels (1..=channels).
//! - `queues` queues `perf-idle-q{i}`, declared (non-exclusive, not
//!   auto-delete; durable with `durable`) on channel 1 of connection
//!   `i % connections`, one declare at a time. With 0 connections the queues
//!   are declared through one short-lived connection and stay on the broker
//!   with no connection open.
//! - Held until `until` completes. While holding, every connection reads its
//!   socket: it answers heartbeats (it negotiates none, 0 in tune-ok, so a
//!   broker sends none) and notices a broker closing it.
//! - Then the queues are deleted (unless `keep`) through the connection that
//!   declared them (or a new one) and every connection is closed with
//!   `connection.close`, waiting for `close-ok`.

use crate::client::{Conn, Res, Target};
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use warren_protocol::client::{self as wire, Frame};

/// What to hold.
#[derive(Clone, Debug)]
pub struct IdleConfig {
    pub target: Target,
    pub connections: usize,
    /// Channels per connection (at least 1).
    pub channels: u16,
    pub queues: usize,
    pub durable: bool,
    /// Leave the queues on the broker at the end.
    pub keep: bool,
    /// Connections being opened at the same time.
    pub parallel: usize,
    /// Longest wait for one connection's TCP connect and AMQP handshake.
    pub connect_timeout: Duration,
}

pub fn idle_queue_name(i: usize) -> String {
    format!("perf-idle-q{i}")
}

/// What was held, and what went wrong while holding.
#[derive(Clone, Debug, Default)]
pub struct IdleSummary {
    pub connections: usize,
    pub channels: usize,
    pub queues: usize,
    /// Time from ready to the start of the teardown.
    pub held: Duration,
    /// Queues deleted at the end.
    pub deleted: usize,
    /// Connections closed with a close-ok from the broker.
    pub closed: usize,
    /// Connections lost while holding or errors in the teardown.
    pub errors: Vec<String>,
}

impl IdleSummary {
    pub fn ready_line(&self) -> String {
        format!(
            "ready connections={} channels={} queues={}",
            self.connections, self.channels, self.queues
        )
    }
}

/// The queues connection `j` of `n` owns (declares and deletes).
fn owned(j: usize, n: usize, queues: usize) -> Vec<usize> {
    (j..queues).step_by(n.max(1)).collect()
}

async fn open_one(cfg: &IdleConfig, queues: &[usize]) -> Res<Conn> {
    // A broker out of file descriptors may accept the TCP connection and
    // never start the handshake: fail then instead of waiting forever.
    let t = cfg.connect_timeout;
    let Ok(c) = tokio::time::timeout(t, Conn::connect(&cfg.target)).await else {
        let why = "is the broker out of file descriptors or connections?";
        return Err(format!("no AMQP handshake within {t:?} ({why})").into());
    };
    let mut c = c?;
    if c.channel_max != 0 && cfg.channels > c.channel_max {
        return Err(format!(
            "{} channels per connection asked, the broker allows {}",
            cfg.channels, c.channel_max
        )
        .into());
    }
    for ch in 1..=cfg.channels {
        c.channel(ch).await?;
    }
    for &i in queues {
        wire::queue_declare(&mut c.wbuf, 1, &idle_queue_name(i), cfg.durable);
        c.expect(1, wire::QUEUE_DECLARE_OK).await?;
    }
    // Held connections need no 64 KiB buffers.
    let mut rbuf = BytesMut::with_capacity(512);
    rbuf.extend_from_slice(&c.rbuf);
    c.rbuf = rbuf;
    c.wbuf = BytesMut::with_capacity(64);
    Ok(c)
}

/// Read the socket until `stop` changes: answer heartbeats, fail on a close.
async fn hold(c: &mut Conn, stop: &mut watch::Receiver<bool>) -> Res<()> {
    loop {
        let mut beat = false;
        while let Some((f, n)) = wire::parse(&c.rbuf, u32::MAX)? {
            let fatal = match f {
                Frame::Heartbeat => {
                    beat = true;
                    None
                }
                Frame::Method {
                    id: wire::CONNECTION_CLOSE,
                    args,
                    ..
                } => Some(format!(
                    "connection closed by broker: {}",
                    wire::close_reason(args)
                )),
                Frame::Method {
                    id: wire::CHANNEL_CLOSE,
                    ch,
                    args,
                } => Some(format!(
                    "channel {ch} closed by broker: {}",
                    wire::close_reason(args)
                )),
                _ => None,
            };
            c.rbuf.advance(n);
            if let Some(e) = fatal {
                return Err(e.into());
            }
        }
        if beat {
            warren_protocol::frame::put_heartbeat(&mut c.wbuf);
            c.flush().await?;
        }
        c.rbuf.reserve(512);
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            // read_buf is cancel safe: nothing is lost if `stop` wins.
            r = c.stream.read_buf(&mut c.rbuf) => {
                if r? == 0 {
                    return Err("connection closed by broker (end of stream)".into());
                }
            }
        }
    }
}

/// Delete `queues` on channel 1, then close the connection. Returns how many
/// queues were deleted and whether close-ok came back.
async fn teardown(mut c: Conn, queues: &[usize], keep: bool) -> (usize, bool, Option<String>) {
    let mut deleted = 0;
    let mut err = None;
    if !keep {
        for &i in queues {
            wire::queue_delete(&mut c.wbuf, 1, &idle_queue_name(i));
            match c.expect(1, wire::QUEUE_DELETE_OK).await {
                Ok(_) => deleted += 1,
                Err(e) => {
                    err = Some(format!("deleting {}: {e}", idle_queue_name(i)));
                    break;
                }
            }
        }
    }
    wire::connection_close(&mut c.wbuf);
    let ok = matches!(
        tokio::time::timeout(
            Duration::from_secs(5),
            c.expect(0, wire::CONNECTION_CLOSE_OK)
        )
        .await,
        Ok(Ok(_))
    );
    let _ = c.stream.shutdown().await;
    (deleted, ok, err)
}

/// Open everything, call `ready` once all of it is established, hold until
/// `until` completes, then tear down. An error while opening closes what was
/// opened (deleting its queues) and is returned; `ready` is not called then.
pub async fn idle(
    cfg: IdleConfig,
    ready: impl FnOnce(&IdleSummary),
    until: impl Future<Output = ()>,
) -> Res<IdleSummary> {
    let cfg = Arc::new(cfg);
    let n = cfg.connections;
    let mut sum = IdleSummary::default();

    // With no connection to hold, declare the queues through a passing one.
    if n == 0 && cfg.queues > 0 {
        let all: Vec<usize> = (0..cfg.queues).collect();
        let c = open_one(&cfg, &all).await?;
        let _ = teardown(c, &[], true).await;
    }

    let gate = Arc::new(Semaphore::new(cfg.parallel.max(1)));
    // Once one connection fails the rest are not opened.
    let failed = Arc::new(AtomicBool::new(false));
    let mut opening = Vec::with_capacity(n);
    for j in 0..n {
        let (cfg, gate, failed) = (cfg.clone(), gate.clone(), failed.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("semaphore");
            if failed.load(Relaxed) {
                return Err(String::new());
            }
            let qs = owned(j, n, cfg.queues);
            let r = open_one(&cfg, &qs).await;
            if r.is_err() {
                failed.store(true, Relaxed);
            }
            r.map(|c| (c, qs))
                .map_err(|e| format!("connection {j}: {e}"))
        }));
    }
    let mut conns = Vec::with_capacity(n);
    let mut first_err = None;
    for t in opening {
        match t.await {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) if e.is_empty() => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(format!("task: {e}"));
            }
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holding = Vec::with_capacity(conns.len());
    for (mut c, qs) in conns {
        let mut stop = stop_rx.clone();
        let keep = cfg.keep;
        holding.push(tokio::spawn(async move {
            match hold(&mut c, &mut stop).await {
                Ok(()) => {
                    let (d, ok, e) = teardown(c, &qs, keep).await;
                    (d, ok, e)
                }
                Err(e) => (0, false, Some(e.to_string())),
            }
        }));
    }

    let started = Instant::now();
    if first_err.is_none() {
        sum.connections = n;
        sum.channels = n * cfg.channels as usize;
        sum.queues = cfg.queues;
        ready(&sum);
        until.await;
    }
    sum.held = started.elapsed();
    let _ = stop_tx.send(true);
    for t in holding {
        match t.await {
            Ok((d, ok, e)) => {
                sum.deleted += d;
                sum.closed += ok as usize;
                if let Some(e) = e {
                    sum.errors.push(e);
                }
            }
            Err(e) => sum.errors.push(format!("task: {e}")),
        }
    }
    if n == 0 && cfg.queues > 0 && !cfg.keep {
        let all: Vec<usize> = (0..cfg.queues).collect();
        let mut c = Conn::connect(&cfg.target).await?;
        c.channel(1).await?;
        let (d, _, e) = teardown(c, &all, false).await;
        sum.deleted += d;
        if let Some(e) = e {
            sum.errors.push(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_spread_over_connections() {
        assert_eq!(owned(0, 3, 7), vec![0, 3, 6]);
        assert_eq!(owned(2, 3, 7), vec![2, 5]);
        assert_eq!(owned(0, 1, 3), vec![0, 1, 2]);
        assert!(owned(4, 5, 3).is_empty());
        let total: usize = (0..1000).map(|j| owned(j, 1000, 1000).len()).sum();
        assert_eq!(total, 1000);
    }
}
