//! The listener. Accepts connections (capped by a semaphore), spawns one
//! task per connection, and on shutdown tells every connection to close
//! (320 CONNECTION_FORCED) and waits for them briefly. Also builds the broker
//! at start-up: opens the store and recovers definitions and messages.

use crate::alarm::Alarms;
use crate::broker::Broker;
use crate::config::Config;
use crate::connection::admission::Admission;
use crate::persist::Persister;
use crate::queue::QueueCmd;
use crate::vhost::VHost;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;
use warren_storage::{Definitions, MessageOp, Store};
use warren_storage_rocksdb::RocksStore;

/// Tell every durable queue what it holds on disk (it reads its messages
/// back in order as consumers need them: no body is read here), and drop
/// index entries of queues that no longer exist.
fn recover_messages(
    store: &dyn Store,
    persister: &Persister,
    vhost: &VHost,
    defs: &Definitions,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut total = 0u64;
    for q in defs.queues.iter().filter(|q| q.vhost == vhost.name) {
        let handle = vhost.queue(&q.name, 0).map_err(|e| e.to_string())?;
        let Some(b) = store
            .bounds(q.id)
            .map_err(|e| format!("reading queue '{}': {e}", q.name))?
        else {
            continue;
        };
        handle.set_next_seq(b.last + 1);
        handle.tell(QueueCmd::Recovered {
            first: b.first,
            end: b.last + 1,
            count: b.count,
        });
        total += b.count;
        tracing::info!(queue = %q.name, messages = b.count, elapsed = ?started.elapsed(), "recovered queue");
    }
    let known: std::collections::HashSet<u64> = defs.queues.iter().map(|q| q.id).collect();
    for id in store.queue_ids().map_err(|e| e.to_string())? {
        if !known.contains(&id) {
            tracing::info!(
                queue_id = id,
                "dropping stored messages of a queue that no longer exists"
            );
            persister.submit_nowait(vec![MessageOp::DropQueue { queue: id }]);
        }
    }
    tracing::info!(messages = total, elapsed = ?started.elapsed(), "recovered persistent messages");
    Ok(())
}

/// A file in the data directory that holds disk space back for a start on a
/// full disk (see `Server::bind`).
const RESERVE_FILE: &str = "reserve";
const RESERVE_BYTES: u64 = 16 << 20;

/// Make sure the reserve file holds its space (allocated, not sparse); on a
/// disk too full for it, say so and go on without.
fn keep_reserve(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return;
    }
    let made = std::fs::File::create(path).and_then(|f| {
        // SAFETY: posix_fallocate on a file descriptor we own.
        match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) } {
            0 => f.sync_all(),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        tracing::warn!(path = %path.display(), error = %e, "cannot reserve disk space for a start on a full disk");
    }
}

/// A bound, not yet running, broker.
pub struct Server {
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown_tx: watch::Sender<bool>,
}

impl Server {
    /// Open the RocksDB store in the data directory, then
    /// [`Server::bind_with_store`].
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let err = |e: String| std::io::Error::other(e);
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            err(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let opening = std::time::Instant::now();
        let store_dir = config.data_dir.join("store");
        let reserve = config.data_dir.join(RESERVE_FILE);
        // RocksDB's memory counts against the memory limit: a quarter of it
        // at most (96 MiB from a 384 MiB limit up).
        let rocks_memory = config.memory_limit / 4;
        let open = || RocksStore::open_with_memory(&store_dir, config.fsync, rocks_memory);
        let store = match open() {
            Err(e) if e.to_string().contains("No space left") && reserve.exists() => {
                // Stopped on a full disk: give RocksDB the reserved space to
                // open in. The disk alarm then blocks publishers while
                // consumers drain.
                tracing::warn!(
                    error = %e,
                    "the disk is full: releasing the {} MiB reserve to start",
                    RESERVE_BYTES >> 20
                );
                std::fs::remove_file(&reserve)
                    .map_err(|e| err(format!("cannot release {}: {e}", reserve.display())))?;
                open()
            }
            r => r,
        }
        .map_err(|e| err(e.to_string()))?;
        keep_reserve(&reserve);
        tracing::info!(elapsed = ?opening.elapsed(), "opened the store");
        Server::bind_with_store(config, Arc::new(store)).await
    }

    /// Recover durable definitions and messages from `store`, bind the
    /// listener. The data directory still holds the alarms' disk check.
    pub async fn bind_with_store(config: Config, store: Arc<dyn Store>) -> std::io::Result<Server> {
        let err = |e: String| std::io::Error::other(e);
        let defs = store
            .load()
            .map_err(|e| err(format!("cannot read stored definitions: {e}")))?;
        let queue_ids = Arc::new(AtomicU64::new(1));
        let mut vhosts = HashMap::new();
        let max_message = store
            .max_message_id()
            .map_err(|e| err(format!("cannot read the message store: {e}")))?;
        let alarms = Alarms::start(
            &config.data_dir,
            config.memory_limit,
            config.disk_free_limit,
        );
        // Hot bodies take at most an eighth of the memory limit.
        let cache_bytes = config.body_cache_bytes.min(config.memory_limit / 8);
        let persister = Persister::start(store.clone(), max_message, cache_bytes, alarms.clone())?;
        let root = VHost::new("/", store.clone(), queue_ids, Some(persister.clone()));
        root.recover(&defs)
            .map_err(|e| err(format!("cannot recover definitions: {e}")))?;
        recover_messages(&*store, &persister, &root, &defs).map_err(err)?;
        tracing::info!(
            exchanges = defs.exchanges.len(),
            queues = defs.queues.len(),
            bindings = defs.bindings.len(),
            "recovered durable definitions"
        );
        vhosts.insert("/".to_owned(), root);
        let listener = TcpListener::bind(config.listen).await?;
        let max_connections = config.max_connections;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let broker = Arc::new(Broker {
            config,
            vhosts,
            next_conn: AtomicU64::new(1),
            next_chan: AtomicU64::new(1),
            persister,
            shutdown,
            reply_to: Mutex::new(HashMap::new()),
            alarms,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            login_failures: Default::default(),
        });
        Ok(Server {
            listener,
            broker,
            shutdown_tx,
        })
    }

    /// The store's threads, to wait for at exit (see [`StoreThreads`]).
    pub fn store_threads(&self) -> crate::persist::StoreThreads {
        self.broker.persister.threads.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn alarms(&self) -> Arc<Alarms> {
        self.broker.alarms.clone()
    }

    /// Serve until `stop` completes, then close every connection.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let Server {
            listener,
            broker,
            shutdown_tx,
        } = self;
        let admission = Admission::new(&broker.config);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(handshake) = admission.admit(peer.ip()) else {
                // Over the handshake budget: closed at once (logged at most
                // once a second, so that a flood is not a log flood).
                admission.refused(peer);
                continue;
            };
            let id = broker.next_conn.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("conn", id, %peer, name = tracing::field::Empty);
            let b = broker.clone();
            tasks.spawn(
                async move {
                    crate::connection::serve(id, stream, peer, b, handshake).await;
                }
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }
        tracing::info!("shutting down: closing {} connection(s)", tasks.len());
        broker.log_cache_stats();
        drop(listener);
        let _ = shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// A broker running in the background of the current runtime (tests, tools).
pub struct RunningBroker {
    pub addr: SocketAddr,
    /// The broker's shared state (tests read its counters).
    pub broker: Arc<Broker>,
    pub alarms: Arc<Alarms>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl RunningBroker {
    /// Bind `config.listen` (use port 0 for a free port) and serve.
    pub async fn start(config: Config) -> std::io::Result<RunningBroker> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let broker = server.broker.clone();
        let alarms = server.alarms();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Ok(RunningBroker {
            addr,
            broker,
            alarms,
            stop: Some(tx),
            done: Some(done),
        })
    }

    /// `amqp://guest:guest@ADDR/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Close every connection and stop listening.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
