//! The listener. Accepts connections (capped by a semaphore), spawns one
//! task per connection, and on shutdown tells every connection to close
//! (320 CONNECTION_FORCED) and waits for them briefly. Also builds the broker
//! at start-up: opens the store and recovers definitions and messages.

use crate::access::Access;
use crate::alarm::Alarms;
use crate::broker::Broker;
use crate::config::Config;
use crate::connection::admission::Admission;
use crate::connection::Stream;
use crate::persist::Persister;
use crate::queue::QueueCmd;
use crate::tls::Tls;
use crate::vhost::VHost;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;
use warren_storage::{Definitions, MessageOp, Store};
use warren_storage_rocksdb::RocksStore;

/// Tell every durable queue of `vhost` what it holds on disk (it reads its
/// messages back in order as consumers need them: no body is read here).
fn recover_messages(store: &dyn Store, vhost: &VHost, defs: &Definitions) -> Result<(), String> {
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
        tracing::info!(vhost = %vhost.name, queue = %q.name, messages = b.count, elapsed = ?started.elapsed(), "recovered queue");
    }
    if total > 0 {
        tracing::info!(vhost = %vhost.name, messages = total, elapsed = ?started.elapsed(), "recovered persistent messages");
    }
    Ok(())
}

/// Drop the index entries of queues, and the records of streams, that no
/// longer exist.
fn drop_orphans(
    store: &dyn Store,
    persister: &Persister,
    defs: &Definitions,
) -> Result<(), String> {
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
    // A stream deleted just before a crash may have kept its records.
    for id in store.stream_ids().map_err(|e| e.to_string())? {
        if !known.contains(&id) {
            tracing::info!(
                stream_id = id,
                "dropping the records of a stream that no longer exists"
            );
            persister.submit_nowait(crate::queue::stream::drop_ops(id));
        }
    }
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
    /// Plain AMQP (None: TLS only).
    listener: Option<TcpListener>,
    /// AMQPS, with its certificates.
    tls: Option<(TcpListener, Arc<Tls>)>,
    /// The management HTTP API.
    management: Option<TcpListener>,
    /// Prometheus metrics.
    prometheus: Option<TcpListener>,
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
        let store = Arc::new(store);
        Server::bind_with_stores(config, store.clone(), store).await
    }

    /// [`Server::bind_with_stores`], with a cluster's Raft state (if the
    /// config asks for a cluster) kept in memory.
    pub async fn bind_with_store(config: Config, store: Arc<dyn Store>) -> std::io::Result<Server> {
        let raft = Arc::new(warren_storage::mem::MemStore::new());
        Server::bind_with_stores(config, store, raft).await
    }

    /// Recover durable definitions and messages from `store`, bind the
    /// listener, and join the cluster (its Raft log, vote and snapshots in
    /// `raft`) if the config names one. The data directory still holds the
    /// alarms' disk check.
    pub async fn bind_with_stores(
        config: Config,
        store: Arc<dyn Store>,
        raft: Arc<dyn warren_storage::RaftLogStore>,
    ) -> std::io::Result<Server> {
        let err = |e: String| std::io::Error::other(e);
        crate::config::set_node_name(&config.node_name);
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
        let persister = Persister::start(
            store.clone(),
            max_message,
            cache_bytes,
            alarms.clone(),
            config.commit_wait,
        )?;
        let default_user = config
            .default_user
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()));
        let access = Access::load(
            store.clone(),
            config.loopback_users.clone(),
            default_user,
            config.definitions.is_none(),
        )
        .map_err(err)?;
        // Read the definitions file before anything starts: a missing or
        // unreadable file stops the start.
        let definitions = match &config.definitions {
            Some(path) => Some((
                path.clone(),
                std::fs::read(path).map_err(|e| {
                    err(format!(
                        "cannot read definitions file {}: {e}",
                        path.display()
                    ))
                })?,
            )),
            None => None,
        };
        // Every vhost access control knows, and any that stored definitions
        // name (so that nothing stored is ever out of reach).
        let mut names: std::collections::BTreeSet<String> =
            access.snapshot().vhosts.keys().cloned().collect();
        names.extend(defs.exchanges.iter().map(|e| e.vhost.clone()));
        names.extend(defs.queues.iter().map(|q| q.vhost.clone()));
        let churn: Arc<crate::metrics::Churn> = Default::default();
        for name in names {
            let vhost = VHost::new(
                &name,
                store.clone(),
                queue_ids.clone(),
                Some(persister.clone()),
                churn.clone(),
                config.consumer_timeout,
            );
            // Policies first: recovered queues and exchanges start with them.
            vhost.init_policies(access.snapshot().policies_of(&name));
            vhost
                .recover(&defs)
                .map_err(|e| err(format!("cannot recover definitions of vhost '{name}': {e}")))?;
            recover_messages(&*store, &vhost, &defs).map_err(err)?;
            vhosts.insert(name, vhost);
        }
        drop_orphans(&*store, &persister, &defs).map_err(err)?;
        tracing::info!(
            vhosts = vhosts.len(),
            exchanges = defs.exchanges.len(),
            queues = defs.queues.len(),
            bindings = defs.bindings.len(),
            "recovered durable definitions"
        );
        let listener = match config.plain {
            true => Some(TcpListener::bind(config.listen).await?),
            false => None,
        };
        let tls = match &config.tls {
            Some(t) => {
                let tls = Tls::load(t.settings.clone()).map_err(err)?;
                let l = TcpListener::bind(t.listen)
                    .await
                    .map_err(|e| err(format!("cannot listen for AMQPS on {}: {e}", t.listen)))?;
                Some((l, Arc::new(tls)))
            }
            None => None,
        };
        if config.management_tls && config.tls.is_none() {
            return Err(err(
                "the management API's TLS uses the AMQPS certificate: give --tls-cert and --tls-key"
                    .into(),
            ));
        }
        let management =
            match config.management {
                Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
                    err(format!("cannot listen for the management API on {a}: {e}"))
                })?),
                None => None,
            };
        let prometheus = match config.prometheus {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| err(format!("cannot listen for Prometheus on {a}: {e}")))?,
            ),
            None => None,
        };
        let listen_addrs = crate::broker::ListenAddrs {
            prometheus: prometheus.as_ref().and_then(|l| l.local_addr().ok()),
            amqp: listener.as_ref().and_then(|l| l.local_addr().ok()),
            amqps: tls.as_ref().and_then(|(l, _)| l.local_addr().ok()),
            http: management.as_ref().and_then(|l| l.local_addr().ok()),
        };
        if listener.is_none() && tls.is_none() {
            return Err(err(
                "no listener: plain AMQP is off and TLS is not configured".into(),
            ));
        }
        let cluster = match &config.cluster {
            Some(c) => {
                let app: Arc<crate::replicate::remote::Handler> = Default::default();
                let node =
                    Arc::new(start_cluster(&config.node_name, c, raft.clone(), app.clone()).await?);
                Some(crate::broker::Membership::new(node, c.clone(), raft, app))
            }
            None => None,
        };
        let max_connections = config.max_connections;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (delayed, delay_inbox) = crate::delayed::Delays::new();
        let broker = Arc::new(Broker {
            config,
            vhosts: RwLock::new(vhosts),
            access,
            meta: store.clone(),
            queue_ids,
            next_conn: AtomicU64::new(1),
            next_chan: AtomicU64::new(crate::message::fresh_ids_from()),
            persister,
            shutdown,
            reply_to: Mutex::new(HashMap::new()),
            alarms,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            login_failures: Default::default(),
            connections: Default::default(),
            listen_addrs,
            metrics: Default::default(),
            churn,
            delayed,
            cluster,
        });
        if let Some(m) = &broker.cluster {
            m.start_sync(&broker);
        }
        tokio::spawn(crate::delayed::run(Arc::downgrade(&broker), delay_inbox));
        if let Some((path, json)) = definitions {
            match crate::definitions::import(&broker, &json).await {
                Ok(report) => tracing::info!(
                    file = %path.display(),
                    created = report.created.len(),
                    skipped = report.skipped.len(),
                    "imported definitions"
                ),
                Err(problems) => {
                    return Err(err(format!(
                        "definitions file {} was not imported (nothing changed):\n  {}",
                        path.display(),
                        problems.join("\n  ")
                    )))
                }
            }
        }
        Ok(Server {
            listener,
            tls,
            management,
            prometheus,
            broker,
            shutdown_tx,
        })
    }

    /// The store's threads, to wait for at exit (see [`StoreThreads`]).
    pub fn store_threads(&self) -> crate::persist::StoreThreads {
        self.broker.persister.threads.clone()
    }

    /// The broker this server serves.
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// The plain AMQP listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("plain AMQP is off")),
        }
    }

    /// The management API's address, if it is on.
    pub fn management_local_addr(&self) -> Option<SocketAddr> {
        self.broker.listen_addrs.http
    }

    /// The Prometheus endpoint's address, if it is on.
    pub fn prometheus_local_addr(&self) -> Option<SocketAddr> {
        self.broker.listen_addrs.prometheus
    }

    /// The AMQPS listener's address, if TLS is configured.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn alarms(&self) -> Arc<Alarms> {
        self.broker.alarms.clone()
    }

    /// Serve until `stop` completes, then close every connection.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let Server {
            listener,
            tls,
            management,
            prometheus,
            broker,
            shutdown_tx,
        } = self;
        let api_tls = tls
            .as_ref()
            .filter(|_| broker.config.management_tls)
            .map(|(_, t)| t.clone());
        let api = management.map(|l| {
            tokio::spawn(crate::management::serve(
                l,
                api_tls,
                broker.clone(),
                broker.shutdown.clone(),
            ))
        });
        let metrics = prometheus.map(|l| {
            tokio::spawn(crate::prometheus::serve(
                l,
                broker.clone(),
                broker.shutdown.clone(),
            ))
        });
        // A clustered node takes AMQP connections once it knows the
        // cluster's queues (its first mirror pass), or after 30 s without a
        // majority: before, a publish to a queue it does not know yet would
        // be confirmed as unroutable.
        if let Some(sync) = broker.cluster.as_ref().and_then(|m| m.sync()) {
            if !sync.wait_mirrored(Duration::from_secs(30)).await {
                tracing::warn!("accepting AMQP connections before this node knows the cluster's queues (no metadata majority yet)");
            }
        }
        let admission = Admission::new(&broker.config);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        let (tls_listener, tls) = match tls {
            Some((l, t)) => (Some(l), Some(t)),
            None => (None, None),
        };
        let reload = tls.clone().map(|t| tokio::spawn(reload_on_sighup(t)));
        loop {
            let (accepted, is_tls) = tokio::select! {
                _ = &mut stop => break,
                r = accept(&listener) => (r, false),
                r = accept(&tls_listener) => (r, true),
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(handshake) = admission.admit(peer.ip()) else {
                // Over the handshake budget: closed at once (logged at most
                // once a second, so that a flood is not a log flood).
                admission.refused(peer);
                continue;
            };
            let id = broker.next_conn.fetch_add(1, Ordering::Relaxed);
            let span =
                tracing::info_span!("conn", id, %peer, connection_name = tracing::field::Empty);
            let b = broker.clone();
            let acceptor = tls.as_ref().filter(|_| is_tls).map(|t| t.acceptor());
            tasks.spawn(
                async move {
                    let stream = match acceptor {
                        None => Stream::Plain(stream),
                        Some(acceptor) => {
                            let timeout = b.config.handshake_timeout;
                            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                                Ok(Err(e)) => {
                                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::info!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            }
                        }
                    };
                    crate::connection::serve(id, stream, peer, b, handshake).await;
                }
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }
        tracing::info!("shutting down: closing {} connection(s)", tasks.len());
        broker.log_cache_stats();
        drop(listener);
        drop(tls_listener);
        if let Some(r) = reload {
            r.abort();
        }
        let _ = shutdown_tx.send(true);
        for task in [api, metrics].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if let Some(m) = &broker.cluster {
            if let Err(e) = m.node().shutdown().await {
                tracing::warn!(error = %e, "leaving the cluster");
            }
        }
    }
}

/// Start this node's cluster membership: the cluster port, Raft with its
/// state in `raft`, and the discovery of the initial peers (in the
/// background: the broker serves while they come up).
pub(crate) async fn start_cluster(
    name: &str,
    c: &crate::config::ClusterSettings,
    raft: Arc<dyn warren_storage::RaftLogStore>,
    app: Arc<crate::replicate::remote::Handler>,
) -> std::io::Result<warren_cluster::ClusterNode> {
    let mut cfg = warren_cluster::ClusterConfig::new(name, c.listen, c.secret.clone());
    cfg.app = Some(app);
    cfg.advertise = c.advertise.clone();
    cfg.peers = c.peers.clone();
    cfg.log_store = raft;
    cfg.tls = match &c.tls {
        Some(t) => Some(crate::tls::cluster_tls(t).map_err(std::io::Error::other)?),
        None => None,
    };
    let listener = TcpListener::bind(c.listen).await.map_err(|e| {
        std::io::Error::other(format!(
            "cannot listen for cluster traffic on {}: {e}",
            c.listen
        ))
    })?;
    let node = warren_cluster::ClusterNode::start_on(cfg, listener)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot start clustering: {e}")))?;
    tracing::info!(node = %node.info(), peers = ?c.peers, "cluster port open");
    Ok(node)
}

/// Accept on `l`, or never if there is no such listener.
async fn accept(l: &Option<TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Re-read the TLS files on every SIGHUP: new connections get them, open
/// ones keep theirs; files that do not load leave the old ones in use.
async fn reload_on_sighup(tls: Arc<Tls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot watch SIGHUP: TLS certificates reload only at restart");
            return;
        };
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate and key"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; the old ones stay in use")
                }
            }
        }
    }
}

/// A broker running in the background of the current runtime (tests, tools).
pub struct RunningBroker {
    pub addr: SocketAddr,
    /// The AMQPS listener's address, if TLS is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The management API's address, if it is on.
    pub management_addr: Option<SocketAddr>,
    /// The Prometheus endpoint's address, if it is on.
    pub prometheus_addr: Option<SocketAddr>,
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
        let tls_addr = server.tls_local_addr();
        let management_addr = server.management_local_addr();
        let prometheus_addr = server.prometheus_local_addr();
        let broker = server.broker.clone();
        let alarms = server.alarms();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Ok(RunningBroker {
            addr,
            tls_addr,
            management_addr,
            prometheus_addr,
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::sync::Arc;
    use warren_storage::mem::MemStore;
    use warren_storage::{MessageOp, MessageStore, StoredMessage};

    /// A stream deleted just before a crash kept its records: the next
    /// start drops them (and keeps the streams that exist).
    #[tokio::test]
    async fn records_of_a_stream_that_no_longer_exists_are_dropped_at_start() {
        let store = Arc::new(MemStore::new());
        let message = StoredMessage {
            exchange: bytes::Bytes::new(),
            routing_key: bytes::Bytes::from_static(b"s"),
            header: bytes::Bytes::new(),
            body: bytes::Bytes::from_static(b"left behind"),
        };
        let mut chunk = warren_storage::chunk::ChunkWriter::new(0, 0);
        chunk.push(1, &message);
        store
            .apply(&[MessageOp::StreamChunk {
                stream: 4242,
                first: 0,
                records: bytes::Bytes::from(chunk.finish()),
                times: vec![(1, 0)],
            }])
            .unwrap();
        assert_eq!(store.stream_ids().unwrap(), vec![4242]);
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            memory_limit: u64::MAX >> 2,
            ..Config::default()
        };
        let b = super::Server::bind_with_store(config, store.clone())
            .await
            .unwrap()
            .broker();
        assert!(b.persister.barrier().await);
        assert_eq!(store.stream_ids().unwrap(), Vec::<u64>::new());
    }
}
