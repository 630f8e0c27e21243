//! The broker handle: state shared by every connection (configuration,
//! virtual hosts, the store service, resource alarms, the direct reply-to
//! registry, id sources). Cheap to share through an `Arc`; it knows nothing
//! of connections or the listener, which sit above it.

use crate::access::Access;
use crate::alarm::Alarms;
use crate::config::Config;
use crate::events::ConnEvent;
use crate::persist::Persister;
use crate::vhost::VHost;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{mpsc, watch, Semaphore};

/// Broker-wide state shared by every connection (cheap to clone via `Arc`).
pub struct Broker {
    pub config: Config,
    /// Virtual hosts by name.
    pub(crate) vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    /// Users, vhosts and permissions.
    pub access: Access,
    /// Durable definitions and the source of queue ids, for vhosts made
    /// after start-up.
    pub(crate) meta: Arc<dyn warren_storage::MetaStore>,
    pub(crate) queue_ids: Arc<AtomicU64>,
    /// Source of connection ids.
    pub(crate) next_conn: AtomicU64,
    /// Source of channel keys (unique per channel incarnation).
    pub(crate) next_chan: AtomicU64,
    /// The group-commit writer of the message store.
    pub persister: Persister,
    /// Flips to true once, at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Direct reply-to consumers by their `amq.rabbitmq.reply-to.*` name.
    /// A std mutex held only for a map operation, never across `.await`.
    pub reply_to: Mutex<HashMap<String, ReplyTarget>>,
    /// Resource alarms (memory, disk): block publishers; paging signal.
    pub alarms: Arc<Alarms>,
    /// Open connections' slots (`max_connections`), taken at
    /// connection.open and held until the connection ends.
    pub connection_slots: Arc<Semaphore>,
    /// Refused logins by source: slows a source that keeps failing.
    pub login_failures: crate::logins::LoginFailures,
    /// Open connections by id, for operators (listing, closing). A std
    /// mutex held only for a map operation.
    pub(crate) connections: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    /// Where the listeners listen (for operators).
    pub listen_addrs: ListenAddrs,
    /// Message counters (RabbitMQ's global ones).
    pub metrics: crate::metrics::Global,
    /// Connection and queue churn.
    pub churn: Arc<crate::metrics::Churn>,
    /// Delayed messages (`x-delayed-message` exchanges).
    pub delayed: crate::delayed::Delays,
    /// This node's membership of a cluster (None: a node on its own).
    pub cluster: Option<Membership>,
}

/// A clustered node's membership: the running cluster node, its sharing of
/// users, vhosts and policies, and what it takes to start another (a node
/// that joins a cluster at run time leaves its own group for it).
pub struct Membership {
    node: RwLock<Arc<warren_cluster::ClusterNode>>,
    sync: crate::replicate::SyncSlot,
    /// Answers the other nodes' requests about this node's queues.
    pub(crate) app: Arc<crate::replicate::remote::Handler>,
    settings: crate::config::ClusterSettings,
    raft: Arc<dyn warren_storage::RaftLogStore>,
    /// One join at a time.
    joining: tokio::sync::Mutex<()>,
}

impl Membership {
    pub(crate) fn new(
        node: Arc<warren_cluster::ClusterNode>,
        settings: crate::config::ClusterSettings,
        raft: Arc<dyn warren_storage::RaftLogStore>,
        app: Arc<crate::replicate::remote::Handler>,
    ) -> Membership {
        Membership {
            node: RwLock::new(node),
            sync: Default::default(),
            app,
            settings,
            raft,
            joining: tokio::sync::Mutex::new(()),
        }
    }

    /// The running cluster node.
    pub fn node(&self) -> Arc<warren_cluster::ClusterNode> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn sync(&self) -> Option<Arc<crate::replicate::ClusterSync>> {
        self.sync.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Start sharing access control through the running node.
    pub(crate) fn start_sync(&self, broker: &Arc<Broker>) {
        let _ = self.app.broker.set(Arc::downgrade(broker));
        for v in broker.vhosts() {
            v.set_cluster(self.sync.clone());
        }
        crate::replicate::ClusterSync::start(broker, self.node(), self.sync.clone());
    }
}

/// The listeners' addresses.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenAddrs {
    pub amqp: Option<std::net::SocketAddr>,
    pub amqps: Option<std::net::SocketAddr>,
    pub http: Option<std::net::SocketAddr>,
    pub prometheus: Option<std::net::SocketAddr>,
}

/// An open connection, as operators see it.
pub struct ConnInfo {
    pub id: u64,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub tls: bool,
    pub user: String,
    pub vhost: String,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub client_properties: warren_protocol::types::FieldTable,
    pub auth_mechanism: String,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    /// Open channels.
    pub channels: std::sync::atomic::AtomicU32,
    /// The connection's mailbox (to close it).
    pub events: mpsc::UnboundedSender<ConnEvent>,
}

impl ConnInfo {
    /// RabbitMQ's connection name: "peer -> local".
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }

    /// Ask the connection to close with connection.close `code` / `text`.
    pub fn close(&self, code: u16, text: String) {
        let _ = self.events.send(ConnEvent::Close { code, text });
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a direct reply goes: a reply consumer on some connection's
/// channel (see `channel::reply_to`).
#[derive(Clone)]
pub struct ReplyTarget {
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub chan_key: u64,
    pub channel: u16,
    pub tag: Arc<str>,
    /// Replies the consumer may still take before its connection has
    /// written the earlier ones.
    pub credit: Arc<Semaphore>,
}

impl Broker {
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The vhost called `name`, made (empty, with the `amq.*` exchanges)
    /// if there is none yet.
    pub fn ensure_vhost(&self, name: &str) -> Arc<VHost> {
        let mut map = self.vhosts.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned())
            .or_insert_with(|| {
                let v = VHost::new(
                    name,
                    self.meta.clone(),
                    self.queue_ids.clone(),
                    Some(self.persister.clone()),
                    self.churn.clone(),
                    self.config.consumer_timeout,
                );
                if let Some(m) = &self.cluster {
                    v.set_cluster(m.sync.clone());
                }
                v
            })
            .clone()
    }

    /// Make a change to users, vhosts, permissions or policies (stored and
    /// synced before it returns), off the async workers. On a clustered
    /// node the change is checked here, made through the cluster, and
    /// returns once this node has applied it (see [`crate::replicate`]).
    pub async fn change_access<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(
                &mut crate::access::State,
                &mut Vec<warren_storage::RecordOp>,
            ) -> Result<T, String>
            + Send
            + 'static,
    ) -> Result<T, String> {
        let me = self.clone();
        if let Some(sync) = self.cluster.as_ref().and_then(Membership::sync) {
            sync.catch_up().await?;
            let (out, ops) = tokio::task::spawn_blocking(move || me.access.prepare(f))
                .await
                .map_err(|e| format!("the change failed: {e}"))??;
            sync.write(&ops).await?;
            return Ok(out);
        }
        tokio::task::spawn_blocking(move || me.access.change(f))
            .await
            .map_err(|e| format!("the change failed: {e}"))?
    }

    /// Set a policy (or an operator policy) and put it in force on the
    /// vhost's queues and exchanges.
    pub async fn set_policy(
        self: &Arc<Self>,
        policy: crate::policy::Policy,
        operator: bool,
    ) -> Result<(), String> {
        let vhost = policy.vhost.clone();
        self.change_access(move |s, ops| crate::access::set_policy(s, ops, policy, operator))
            .await?;
        self.apply_policies(&vhost).await
    }

    /// Clear a policy (or an operator policy) and put the change in force.
    pub async fn clear_policy(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        operator: bool,
    ) -> Result<(), String> {
        let (v, n) = (vhost.to_owned(), name.to_owned());
        self.change_access(move |s, ops| crate::access::clear_policy(s, ops, &v, &n, operator))
            .await?;
        self.apply_policies(vhost).await
    }

    /// Put the stored policies of `vhost` in force.
    pub async fn apply_policies(&self, vhost: &str) -> Result<(), String> {
        let policies = self.access.snapshot().policies_of(vhost);
        self.ensure_vhost(vhost)
            .set_policies(policies)
            .await
            .map_err(|e| e.text)
    }

    pub(crate) fn register_connection(&self, c: ConnInfo) -> Arc<ConnInfo> {
        let c = Arc::new(c);
        self.conns().insert(c.id, c.clone());
        c
    }

    pub(crate) fn unregister_connection(&self, id: u64) {
        self.conns().remove(&id);
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnInfo>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections, oldest first.
    pub fn connections(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self.conns().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Delete a vhost: its users' permissions, its policies and limits
    /// (stored, synced), then every queue (with its messages), exchange and
    /// binding in it, and its connections are closed with 320, as RabbitMQ.
    pub async fn delete_vhost(self: &Arc<Self>, name: &str) -> Result<(), String> {
        let n = name.to_owned();
        self.change_access(move |s, ops| crate::access::delete_vhost(s, ops, &n))
            .await?;
        self.remove_vhost_objects(name).await?;
        tracing::info!(vhost = name, "deleted vhost");
        Ok(())
    }

    /// What goes with a deleted vhost besides its records: its connections
    /// are closed with 320, and every queue (with its messages), exchange
    /// and binding in it is removed.
    pub(crate) async fn remove_vhost_objects(&self, name: &str) -> Result<(), String> {
        for c in self.connections().iter().filter(|c| c.vhost == name) {
            c.close(
                warren_protocol::reply::CONNECTION_FORCED,
                format!("CONNECTION_FORCED - vhost '{name}' is deleted"),
            );
        }
        let vhost = self
            .vhosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(v) = vhost {
            v.destroy().await.map_err(|e| e.text)?;
        }
        Ok(())
    }

    /// Join the cluster that the node at `peer` (its cluster address)
    /// belongs to, at run time (`warrenctl join_cluster`). This node must be
    /// in no cluster but its own: it leaves it (its Raft state is
    /// forgotten), starts again with `peer` as its only initial peer, and so
    /// asks that cluster to take it in. Its users, vhosts and policies are
    /// added to the cluster's (where the cluster has none by the same name),
    /// then it follows the cluster's; its queues and messages stay (RabbitMQ
    /// resets a node that joins). Returns the node it joined through.
    pub async fn join_cluster(self: &Arc<Self>, peer: &str) -> Result<String, String> {
        let m = self
            .cluster
            .as_ref()
            .ok_or("this node is not clustered: start it with a cluster secret")?;
        let _one = m.joining.lock().await;
        let old = m.node();
        let st = old.status();
        if st.members.iter().any(|x| x.name != st.me.name) {
            return Err(format!(
                "this node is a member of a cluster of {} nodes: forget it there \
                 (forget_cluster_node) before it joins another",
                st.members.len()
            ));
        }
        let hello = old.probe(peer).await.map_err(|e| format!("{peer}: {e}"))?;
        if hello.node.name == st.me.name {
            return Err(format!("{peer} is this node"));
        }
        if !hello.initialized {
            return Err(format!("{peer} ({}) is not in a cluster", hello.node.name));
        }
        // Leave: stop sharing, stop the node, forget its group.
        *m.sync.write().unwrap_or_else(|e| e.into_inner()) = None;
        old.shutdown().await.map_err(|e| e.to_string())?;
        let raft = m.raft.clone();
        tokio::task::spawn_blocking(move || raft.forget_group(warren_cluster::log::META_GROUP))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot forget this node's cluster state: {e}"))?;
        // Its users and vhosts are added to the new cluster's, as at a start.
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.access.set_adopted(false))
            .await
            .map_err(|e| e.to_string())??;
        let mut settings = m.settings.clone();
        settings.peers = vec![peer.to_owned()];
        let node = crate::server::start_cluster(
            &self.config.node_name,
            &settings,
            m.raft.clone(),
            m.app.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        *m.node.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(node);
        m.start_sync(self);
        let node = m.node();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let st = node.status();
            if st.members.len() > 1 && st.members.iter().any(|x| x.name == st.me.name) {
                tracing::info!(via = %hello.node, "joined the cluster");
                return Ok(hello.node.name);
            }
            if let Some(e) = st.bootstrap_error {
                return Err(format!("the cluster refused this node: {e}"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{UNAVAILABLE}asked {peer} to take this node in; not a member after 30 s",
                    UNAVAILABLE = crate::replicate::UNAVAILABLE
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Every vhost, in name order.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let mut v: Vec<_> = self
            .vhosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    pub fn next_message_id(&self) -> u64 {
        self.persister.next_id()
    }
    pub fn next_chan_key(&self) -> u64 {
        self.next_chan.fetch_add(1, Ordering::Relaxed)
    }
    /// Log the caches' hit and miss counts.
    pub fn log_cache_stats(&self) {
        let b = &self.persister.body_stats;
        for v in self.vhosts() {
            tracing::info!(
                vhost = %v.name,
                hits = v.route_stats.hits.load(Ordering::Relaxed),
                misses = v.route_stats.misses.load(Ordering::Relaxed),
                "route cache"
            );
        }
        tracing::info!(
            hits = b.hits.load(Ordering::Relaxed),
            misses = b.misses.load(Ordering::Relaxed),
            "message body cache (page reads)"
        );
    }

    pub fn replies(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplyTarget>> {
        // Map operations never panic half-way: a poisoned lock is consistent.
        self.reply_to.lock().unwrap_or_else(|e| e.into_inner())
    }
}
