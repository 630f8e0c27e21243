//! `warren-perf idle` against the sink: connections, channels and queues are
//! opened as asked, held, then the queues deleted and every connection closed
//! with connection.close; the CLI prints its ready line and stops on end of
//! stdin or SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use warren_perf::client::Target;
use warren_perf::idle::{idle, IdleConfig};
use warren_perf::sink::{serve, SinkStats};

async fn sink() -> (u16, Arc<SinkStats>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let stats = Arc::new(SinkStats::default());
    tokio::spawn(serve(l, stats.clone()));
    (port, stats)
}

fn config(port: u16, connections: usize, channels: u16, queues: usize) -> IdleConfig {
    let mut target = Target::parse("amqp://guest:guest@127.0.0.1/%2f").unwrap();
    target.port = port;
    IdleConfig {
        target,
        connections,
        channels,
        queues,
        durable: false,
        keep: false,
        parallel: 4,
        connect_timeout: Duration::from_secs(10),
    }
}

/// The sink counts a close when it reads it; the client may return first.
async fn settle(stats: &SinkStats, closes: u64) {
    for _ in 0..100 {
        if stats.closes.load(Relaxed) >= closes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_connections_channels_and_queues_then_cleans_up() {
    let (port, stats) = sink().await;
    let mut seen = None;
    let st = stats.clone();
    let s = idle(
        config(port, 3, 2, 7),
        |s| {
            // Everything is established before ready.
            seen = Some((
                s.ready_line(),
                st.connections.load(Relaxed),
                st.channels.load(Relaxed),
                st.queues_declared.load(Relaxed),
            ))
        },
        // (An async block: the sleep starts when the hold does, not when
        // this future is built before the connections are opened.)
        async { tokio::time::sleep(Duration::from_millis(200)).await },
    )
    .await
    .unwrap();
    assert_eq!(
        seen,
        Some(("ready connections=3 channels=6 queues=7".into(), 3, 6, 7))
    );
    assert!(s.held >= Duration::from_millis(200), "{s:?}");
    assert_eq!((s.deleted, s.closed), (7, 3), "{s:?}");
    assert!(s.errors.is_empty(), "{s:?}");
    settle(&stats, 3).await;
    assert_eq!(stats.queues_deleted.load(Relaxed), 7);
    assert_eq!(stats.closes.load(Relaxed), 3);
    assert_eq!(stats.connections.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_without_connections_use_a_passing_one() {
    let (port, stats) = sink().await;
    let s = idle(
        config(port, 0, 1, 5),
        |s| assert_eq!(s.ready_line(), "ready connections=0 channels=0 queues=5"),
        async {},
    )
    .await
    .unwrap();
    assert_eq!((s.deleted, s.closed, s.connections), (5, 0, 0), "{s:?}");
    settle(&stats, 2).await;
    // One connection declares, another deletes.
    assert_eq!(stats.connections.load(Relaxed), 2);
    assert_eq!(stats.closes.load(Relaxed), 2);
    assert_eq!(stats.queues_declared.load(Relaxed), 5);
    assert_eq!(stats.queues_deleted.load(Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_channels_than_the_broker_allows_fails_before_ready() {
    let (port, _stats) = sink().await;
    let mut ready = false;
    let e = idle(config(port, 2, 3000, 0), |_| ready = true, async {})
        .await
        .unwrap_err();
    assert!(!ready);
    assert!(e.to_string().contains("allows 2047"), "{e}");
}

fn cli(port: u16, args: &[&str], stdin: Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_warren-perf"))
        .args(["idle", "--port", &port.to_string()])
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn ready_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_holds_until_stdin_closes() {
    let (port, stats) = sink().await;
    let status = tokio::task::spawn_blocking(move || {
        let mut child = cli(
            port,
            &["--connections", "20", "--queues", "10"],
            Stdio::piped(),
        );
        let line = ready_line(&mut child);
        assert_eq!(line, "ready connections=20 channels=20 queues=10\n");
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "still holding");
        drop(child.stdin.take());
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(stats.connections.load(Relaxed), 20);
    assert_eq!(stats.closes.load(Relaxed), 20);
    assert_eq!(stats.queues_declared.load(Relaxed), 10);
    assert_eq!(stats.queues_deleted.load(Relaxed), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_with_stdin_from_dev_null_holds_until_sigterm() {
    let (port, stats) = sink().await;
    let status = tokio::task::spawn_blocking(move || {
        let mut child = cli(port, &["--connections", "2"], Stdio::null());
        let line = ready_line(&mut child);
        assert_eq!(line, "ready connections=2 channels=2 queues=0\n");
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "still holding");
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(stats.closes.load(Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_timed_hold_ends_by_itself() {
    let (port, stats) = sink().await;
    let status = tokio::task::spawn_blocking(move || {
        let mut child = cli(
            port,
            &["--connections", "1", "--queues", "3", "--seconds", "1"],
            Stdio::piped(),
        );
        let line = ready_line(&mut child);
        assert_eq!(line, "ready connections=1 channels=1 queues=3\n");
        // Stdin stays open: only the timer ends the hold.
        let t = std::time::Instant::now();
        let status = child.wait().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(800));
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(stats.queues_deleted.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_handshakes_fails_fast() {
    // Accepts and stays silent, as a broker out of file descriptors can.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(port, 20, 1, 0);
    cfg.connect_timeout = Duration::from_millis(300);
    let t = std::time::Instant::now();
    let e = idle(cfg, |_| panic!("not ready"), async {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no AMQP handshake"), "{e}");
    // The first timeout stops the remaining connections from being tried.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
