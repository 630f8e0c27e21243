//! A running cluster member: Raft + transport + bootstrap of the initial membership.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bootstrap::{bootstrap, HELLO_TIMEOUT};
use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::log::{LogStore, META_GROUP};
use crate::net::{serve, HelloReply, NetworkFactory, PeerPool};
use crate::sm::{MetaReader, StateMachine};
use crate::types::{node_id, MetaCommand, MetaResponse, NodeId, NodeInfo, Raft};

/// Raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Learner,
    Follower,
    Candidate,
    Leader,
    Shutdown,
}

impl From<ServerState> for Role {
    fn from(s: ServerState) -> Self {
        match s {
            ServerState::Learner => Role::Learner,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Leader => Role::Leader,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// A point-in-time view of the node's cluster state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub me: NodeInfo,
    pub id: NodeId,
    pub role: Role,
    pub leader: Option<NodeInfo>,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    /// Voting members, ordered by id.
    pub members: Vec<NodeInfo>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Last log index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Why the initial membership could not be formed, if it could not.
    pub bootstrap_error: Option<String>,
}

impl ClusterStatus {
    fn from_metrics(
        me: NodeInfo,
        m: &RaftMetrics<NodeId, NodeInfo>,
        bootstrap_error: Option<String>,
    ) -> Self {
        let membership = m.membership_config.membership();
        let members = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).cloned())
            .collect();
        Self {
            id: m.id,
            me,
            role: m.state.into(),
            leader: m
                .current_leader
                .and_then(|id| membership.get_node(&id).cloned()),
            leader_id: m.current_leader,
            term: m.current_term,
            members,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            bootstrap_error,
        }
    }
}

/// A running member of the Warren cluster.
pub struct ClusterNode {
    me: NodeInfo,
    raft: Raft,
    reader: MetaReader,
    pool: Arc<PeerPool>,
    local_addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
    bootstrap: Mutex<Option<JoinHandle<()>>>,
    bootstrap_error: Arc<Mutex<Option<String>>>,
    stopped: AtomicBool,
}

/// Maps openraft's write errors, surfacing "not the leader" with the leader's address.
fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ClusterError::ForwardToLeader {
                leader_id: f.leader_id,
                leader: f.leader_node,
            }
        }
        RaftError::Fatal(Fatal::Stopped) => ClusterError::Shutdown,
        e => ClusterError::Raft(e.to_string()),
    }
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|p| p.into_inner()).take()
}

impl ClusterNode {
    /// Binds `cfg.listen` and starts the node (see [`ClusterNode::start_on`]).
    pub async fn start(cfg: ClusterConfig) -> Result<ClusterNode, ClusterError> {
        cfg.check()?;
        let listener = TcpListener::bind(cfg.listen).await?;
        Self::start_on(cfg, listener).await
    }

    /// Starts the node on an already bound listener (`cfg.listen` is then ignored):
    /// starts Raft and the cluster server, then discovers the initial peers in the
    /// background. Once all of them answered, the member with the lowest id initializes
    /// the group with every initial member.
    pub async fn start_on(
        cfg: ClusterConfig,
        listener: TcpListener,
    ) -> Result<ClusterNode, ClusterError> {
        cfg.check()?;
        let raft_config = cfg.raft_config()?;
        let local_addr = listener.local_addr()?;
        let advertise = cfg.advertise_for(local_addr)?;
        let me = NodeInfo::new(cfg.name.clone(), advertise);
        let id = node_id(&me.name);
        let secret: Arc<[u8]> = cfg.secret.clone().into();

        let pool = PeerPool::new(me.clone(), secret.clone());
        let open = || async {
            StateMachine::open(cfg.log_store.clone(), META_GROUP)
                .await
                .map_err(|e| ClusterError::Raft(format!("cannot read the raft snapshot: {e}")))
        };
        let mut sm = open().await?;
        let log = LogStore::new(cfg.log_store.clone(), META_GROUP);
        // The state is the saved snapshot plus the log after it: a log with a gap after
        // the snapshot cannot rebuild it and goes, with the snapshot.
        if log
            .forget_unreplayable(sm.snapshot_index().await)
            .await
            .map_err(|e| ClusterError::Raft(format!("cannot read the raft log: {e}")))?
        {
            sm = open().await?;
        }
        let reader = sm.reader();
        let raft = Raft::new(
            id,
            raft_config,
            NetworkFactory::new(pool.clone(), id),
            log,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(format!("cannot start raft: {e}")))?;

        let server = tokio::spawn(serve(listener, raft.clone(), secret, me.clone()));
        let bootstrap_error = Arc::new(Mutex::new(None));
        let bootstrap = tokio::spawn(bootstrap(
            raft.clone(),
            pool.clone(),
            me.clone(),
            cfg.peers.clone(),
            bootstrap_error.clone(),
        ));
        tracing::info!(node = %me, id, "cluster node started");
        Ok(ClusterNode {
            me,
            raft,
            reader,
            pool,
            local_addr,
            server: Mutex::new(Some(server)),
            bootstrap: Mutex::new(Some(bootstrap)),
            bootstrap_error,
            stopped: AtomicBool::new(false),
        })
    }

    /// This node's name and advertised address.
    pub fn info(&self) -> &NodeInfo {
        &self.me
    }

    /// This node's Raft id.
    pub fn id(&self) -> NodeId {
        node_id(&self.me.name)
    }

    /// The address the cluster listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replicates `cmd` and returns its result once committed and applied. Must be called
    /// on the leader; elsewhere fails with [`ClusterError::ForwardToLeader`].
    pub async fn write(&self, cmd: MetaCommand) -> Result<MetaResponse, ClusterError> {
        let resp = self.raft.client_write(cmd).await.map_err(write_error)?;
        Ok(resp.data)
    }

    /// Adds the node listening at `addr` to a running cluster (leader only): it is
    /// authenticated and asked who it is, replicated to as a learner until it has caught
    /// up (by log or snapshot), then made a voter. Returns the new member.
    pub async fn add_member(&self, addr: &str) -> Result<NodeInfo, ClusterError> {
        let node = self.probe(addr).await?.node;
        let id = node.id();
        let known = self.status().members;
        if let Some(m) = known.iter().find(|m| m.id() == id) {
            return if m.name == node.name {
                Ok(node)
            } else {
                Err(ClusterError::Config(format!(
                    "{:?} would collide with member {:?} (same id)",
                    node.name, m.name
                )))
            };
        }
        self.raft
            .add_learner(id, node.clone(), true)
            .await
            .map_err(write_error)?;
        let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(write_error)?;
        tracing::info!(node = %self.me, added = %node, "added cluster member");
        Ok(node)
    }

    /// The locally applied value of `key` (may lag the leader).
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        self.reader.get(key)
    }

    /// A read handle on the applied metadata, usable after this node is moved elsewhere.
    pub fn reader(&self) -> MetaReader {
        self.reader.clone()
    }

    /// Current cluster state as seen by this node.
    pub fn status(&self) -> ClusterStatus {
        let err = self
            .bootstrap_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        ClusterStatus::from_metrics(self.me.clone(), &m, err)
    }

    /// Waits until this node knows a leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeInfo, ClusterError> {
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(leader) =
                    ClusterStatus::from_metrics(self.me.clone(), &rx.borrow_and_update(), None)
                        .leader
                {
                    return Ok::<_, ClusterError>(leader);
                }
                rx.changed().await.map_err(|_| ClusterError::Shutdown)?;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClusterError::Timeout("no leader elected".into()))?
    }

    /// Authenticates to the node at `addr` and asks who it is (diagnostics, discovery).
    pub async fn probe(&self, addr: &str) -> Result<HelloReply, ClusterError> {
        self.pool.hello(addr, HELLO_TIMEOUT).await
    }

    /// Stops Raft, the bootstrap task, outgoing connections and the cluster listener
    /// (the port stops accepting once this returns). Idempotent.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(task) = take(&self.bootstrap) {
            task.abort();
        }
        let raft_result = self.raft.shutdown().await;
        if let Some(task) = take(&self.server) {
            task.abort();
            // Wait for the task to be dropped, which closes the listener.
            let _ = task.await;
        }
        self.pool.close();
        tracing::info!(node = %self.me, "cluster node stopped");
        raft_result.map_err(|e| ClusterError::Raft(format!("raft did not stop cleanly: {e}")))
    }
}

impl Drop for ClusterNode {
    /// Without an explicit `shutdown`, still stop serving and stop Raft in the background.
    fn drop(&mut self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        for task in [take(&self.bootstrap), take(&self.server)]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        self.pool.close();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let raft = self.raft.clone();
            rt.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}
