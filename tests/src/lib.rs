//! Test harness: start a Warren broker on a free loopback port inside the
//! test's runtime, connect lapin clients to it, stop it at the end.
//!
//! Set `WARREN_TEST_AMQP_URL` to run the same tests against another broker
//! (for example a reference RabbitMQ) instead of an in-process Warren.
//!
//! - [`lapin_util`]: reply codes out of lapin errors, asynchronous errors,
//!   short-hands for the common round trips.
//! - [`raw`]: a raw AMQP client for what lapin cannot or will not send.
//! - [`daemon`]: the `warren` binary as a child process (crash and restart
//!   tests).
//! - [`http`]: a minimal HTTP client for the management API.

pub mod daemon;
pub mod http;
pub mod lapin_util;
pub mod raw;

use lapin::{Channel, Connection, ConnectionProperties};
use std::time::Duration;
use warren_broker::{Config, RunningBroker};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Run `fut` with the test timeout.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A broker under test: an in-process Warren, or an external URL.
pub struct TestBroker {
    pub url: String,
    running: Option<RunningBroker>,
    /// The broker's own data directory, removed when the test ends.
    data_dir: Option<std::path::PathBuf>,
}

impl TestBroker {
    /// Start Warren on 127.0.0.1:0 (or use `WARREN_TEST_AMQP_URL`).
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Start Warren with a tweaked configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        if let Ok(url) = std::env::var("WARREN_TEST_AMQP_URL") {
            return TestBroker {
                url,
                running: None,
                data_dir: None,
            };
        }
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            data_dir: std::env::temp_dir().join(unique("warren-test")),
            // Many brokers share this test process's RSS: keep the memory
            // alarm out of unrelated tests on small machines (the alarm
            // tests set their own limits).
            memory_limit: 1 << 60,
            ..Config::default()
        };
        tweak(&mut config);
        let data_dir = Some(config.data_dir.clone());
        let running = RunningBroker::start(config).await.expect("broker starts");
        TestBroker {
            url: running.url(),
            running: Some(running),
            data_dir,
        }
    }

    /// Whether this is the in-process Warren (tests of Warren-only knobs
    /// skip themselves otherwise).
    pub fn is_warren(&self) -> bool {
        self.running.is_some()
    }

    /// The in-process broker's shared state (None for an external broker).
    pub fn broker(&self) -> Option<std::sync::Arc<warren_broker::broker::Broker>> {
        self.running.as_ref().map(|r| r.broker.clone())
    }

    /// The in-process Warren's resource alarms (tests raise and lower the
    /// limits through it); `None` for an external broker.
    pub fn alarms(&self) -> Option<std::sync::Arc<warren_broker::alarm::Alarms>> {
        self.running.as_ref().map(|r| r.alarms.clone())
    }

    /// host:port of the broker.
    pub fn addr(&self) -> String {
        let rest = self.url.split('@').nth(1).unwrap_or("127.0.0.1:5672/");
        rest.split('/')
            .next()
            .unwrap_or("127.0.0.1:5672")
            .to_owned()
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("connect to broker")
    }

    /// A fresh connection and one channel on it.
    pub async fn channel(&self) -> (Connection, Channel) {
        let c = self.connect().await;
        let ch = c.create_channel().await.expect("open channel");
        (c, ch)
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let Some(d) = self.data_dir.take() else {
            return;
        };
        // The store is still open until the test's runtime drops the
        // broker's tasks: remove its directory once the store has closed.
        match &self.running {
            Some(r) => {
                let threads = r.broker.persister.threads.clone();
                std::thread::spawn(move || {
                    threads.join(std::time::Duration::from_secs(60));
                    let _ = std::fs::remove_dir_all(d);
                });
            }
            None => {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// A name unique to this test run.
/// Make `c` a clustered node on its own (a cluster of one: a secret, no
/// peers, the cluster port on a free loopback port).
pub fn cluster_of_one(c: &mut Config) {
    c.cluster = Some(warren_broker::config::ClusterSettings {
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        advertise: None,
        peers: Vec::new(),
        secret: b"secret".to_vec(),
        tls: None,
    });
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
