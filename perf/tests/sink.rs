//! warren-perf against its own sink: the handshake and setup methods work end
//! to end, every publish reaches the sink and every confirm comes back.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use warren_perf::client::Target;
use warren_perf::run::{run, Config};
use warren_perf::sink::{serve, SinkStats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_consumer_against_the_sink() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let stats = Arc::new(SinkStats::default());
    tokio::spawn(serve(l, stats.clone()));
    let mut target = Target::parse("amqp://guest:guest@127.0.0.1/%2f").unwrap();
    target.port = port;
    let cfg = Config {
        target,
        others: Vec::new(),
        producers: 2,
        consumers: 1,
        queues: 2,
        size: 16,
        persistent: true,
        durable: true,
        queue_args: Vec::new(),
        consumer_args: Vec::new(),
        confirm: 64,
        prefetch: 100,
        ack_every: 1,
        multiple: false,
        no_ack: false,
        rate: 0,
        fanout: true,
        seconds: 1,
        warmup: 0,
        keep: false,
        progress: false,
    };
    let s = run(cfg).await.unwrap();
    assert_eq!(s.error, None);
    assert!(s.published > 1000, "{s:?}");
    // At most one window per producer is unconfirmed when the clock stops.
    assert!(s.confirmed + 2 * 64 >= s.published, "{s:?}");
    assert!(s.confirmed <= s.published + 2 * 64, "{s:?}");
    assert_eq!(s.nacked, 0);
    assert_eq!(s.consumed, 0, "the sink never delivers");
    assert_eq!(s.consume_per_second, vec![0], "one measured second");
    assert!(stats.published.load(Relaxed) >= s.published);
    // setup + 2 producers + 1 consumer + cleanup
    assert_eq!(stats.connections.load(Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_paces_publishing() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let stats = Arc::new(SinkStats::default());
    tokio::spawn(serve(l, stats.clone()));
    let mut target = Target::parse("amqp://127.0.0.1/").unwrap();
    target.port = port;
    let cfg = Config {
        target,
        others: Vec::new(),
        producers: 1,
        consumers: 0,
        queues: 1,
        size: 32,
        persistent: false,
        durable: false,
        queue_args: Vec::new(),
        consumer_args: Vec::new(),
        confirm: 0,
        prefetch: 0,
        ack_every: 1,
        multiple: false,
        no_ack: false,
        rate: 2000,
        fanout: false,
        seconds: 2,
        warmup: 0,
        keep: true,
        progress: false,
    };
    let s = run(cfg).await.unwrap();
    let rate = s.published as f64 / s.seconds;
    assert!((1800.0..2200.0).contains(&rate), "{s:?}");
}

/// With several brokers (`--uris`), producer and consumer i go to the
/// (i mod n)-th; the queues are set up and cleaned up through the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_brokers_share_the_clients() {
    let mut targets = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..2 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let stats = Arc::new(SinkStats::default());
        tokio::spawn(serve(l, stats.clone()));
        let mut t = Target::parse("amqp://guest:guest@127.0.0.1/%2f").unwrap();
        t.port = port;
        targets.push(t);
        sinks.push(stats);
    }
    let cfg = Config {
        target: targets.remove(0),
        others: targets,
        producers: 2,
        consumers: 1,
        queues: 1,
        size: 16,
        persistent: false,
        durable: false,
        queue_args: Vec::new(),
        consumer_args: Vec::new(),
        confirm: 16,
        prefetch: 100,
        ack_every: 1,
        multiple: false,
        no_ack: false,
        rate: 0,
        fanout: false,
        seconds: 1,
        warmup: 0,
        keep: false,
        progress: false,
    };
    let s = run(cfg).await.unwrap();
    assert_eq!(s.error, None);
    // First: setup, producer 0, consumer 0, cleanup; second: producer 1.
    assert_eq!(sinks[0].connections.load(Relaxed), 4);
    assert_eq!(sinks[1].connections.load(Relaxed), 1);
    assert!(sinks[0].published.load(Relaxed) > 0);
    assert!(sinks[1].published.load(Relaxed) > 0);
}
