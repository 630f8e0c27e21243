//! A running cluster member: Raft + transport + bootstrap of the initial membership.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bootstrap::{bootstrap, HELLO_TIMEOUT};
use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::group::{Group, GroupMachine, GroupSm, Groups};
use crate::leader::{LeaderReply, LeaderRequest, RemoteError};
use crate::log::{LogStore, META_GROUP};
use crate::net::{
    serve, CallError, HelloReply, NetworkFactory, PeerPool, RequestBody, ResponseBody, ServerCtx,
};
use crate::sm::{MetaReader, SnapshotSlot, StateMachine};
use crate::types::{node_id, Applied, MetaCommand, MetaResponse, NodeId, NodeInfo, Raft};
use warren_storage::RaftGroup;

/// How long a request for the leader looks for one.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long the leader may take to answer one (a join waits for the new member to
/// catch up; a leader without a majority never answers).
const LEADER_CALL: Duration = Duration::from_secs(60);

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
    pub(crate) fn from_metrics(
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
    feed: Arc<tokio::sync::broadcast::Sender<Applied>>,
    pool: Arc<PeerPool>,
    /// Connections for application requests, apart from Raft's (a large request
    /// does not hold up heartbeats).
    app_pool: Arc<PeerPool>,
    /// Connections for application groups' Raft messages.
    group_pool: Arc<PeerPool>,
    groups: Groups,
    /// openraft's configuration for application groups.
    raft_config: Arc<openraft::Config>,
    log_store: Arc<dyn warren_storage::RaftLogStore>,
    local_addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
    bootstrap: Mutex<Option<JoinHandle<()>>>,
    bootstrap_error: Arc<Mutex<Option<String>>>,
    stopped: AtomicBool,
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
        let group_config = cfg.group_raft_config()?;
        let local_addr = listener.local_addr()?;
        let advertise = cfg.advertise_for(local_addr)?;
        let me = NodeInfo::new(cfg.name.clone(), advertise);
        let id = node_id(&me.name);
        let secret: Arc<[u8]> = cfg.secret.clone().into();

        let pool = PeerPool::new(me.clone(), secret.clone(), cfg.tls.clone());
        let app_pool = PeerPool::new(me.clone(), secret.clone(), cfg.tls.clone());
        let group_pool = PeerPool::new(me.clone(), secret.clone(), cfg.tls.clone());
        let groups = Groups::default();
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
        let feed = sm.feed();
        let raft = Raft::new(
            id,
            raft_config.clone(),
            NetworkFactory::new(pool.clone(), id, META_GROUP),
            log,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(format!("cannot start raft: {e}")))?;

        let server = tokio::spawn(serve(
            listener,
            ServerCtx {
                raft: raft.clone(),
                secret,
                me: me.clone(),
                tls: cfg.tls.clone(),
                app: cfg.app.clone(),
                groups: groups.clone(),
            },
        ));
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
            feed,
            pool,
            app_pool,
            group_pool,
            groups,
            raft_config: group_config,
            log_store: cfg.log_store.clone(),
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

    /// Replicates `cmd` and returns its result once committed and applied on the leader
    /// (this node may apply it a moment later). Any member may call it: a follower sends
    /// it to the leader. A write whose connection to the leader broke after it was sent
    /// fails even though it may have been applied: repeat only a command that may apply
    /// twice (puts, deletes).
    pub async fn write(&self, cmd: MetaCommand) -> Result<MetaResponse, ClusterError> {
        self.write_indexed(cmd).await.map(|(r, _)| r)
    }

    /// [`ClusterNode::write`], with the index of the command's log entry (this node has
    /// applied it once its subscribers hear of that index).
    pub async fn write_indexed(
        &self,
        cmd: MetaCommand,
    ) -> Result<(MetaResponse, u64), ClusterError> {
        match self.on_leader(LeaderRequest::Write(cmd)).await? {
            LeaderReply::Written(r, index) => Ok((r, index)),
            other => Err(ClusterError::Protocol(format!(
                "a write answered with {other:?}"
            ))),
        }
    }

    /// Adds the node listening at `addr` to the cluster (from any member): it is
    /// authenticated and asked who it is, replicated to as a learner until it has caught
    /// up (by log or snapshot), then made a voter. Returns the new member.
    pub async fn add_member(&self, addr: &str) -> Result<NodeInfo, ClusterError> {
        let node = self.probe(addr).await?.node;
        match self.on_leader(LeaderRequest::Join(node)).await? {
            LeaderReply::Member(n) => Ok(n),
            other => Err(ClusterError::Protocol(format!(
                "a join answered with {other:?}"
            ))),
        }
    }

    /// The log index this node must have applied to see every write committed before
    /// this call (Raft's read index, from the leader).
    pub async fn read_index(&self) -> Result<u64, ClusterError> {
        match self.on_leader(LeaderRequest::ReadIndex).await? {
            LeaderReply::ReadIndex(i) => Ok(i),
            other => Err(ClusterError::Protocol(format!(
                "a read index answered with {other:?}"
            ))),
        }
    }

    /// Removes the member named `name` (from any member; it need not be running).
    /// Returns it. The last member cannot be removed.
    pub async fn remove_member(&self, name: &str) -> Result<NodeInfo, ClusterError> {
        match self
            .on_leader(LeaderRequest::Remove(name.to_owned()))
            .await?
        {
            LeaderReply::Member(n) => Ok(n),
            other => Err(ClusterError::Protocol(format!(
                "a removal answered with {other:?}"
            ))),
        }
    }

    /// Runs `req` on the leader: here if this node leads, else over the transport. While
    /// there is no leader, or the one asked no longer leads (or cannot be reached), it
    /// looks again, up to [`LEADER_WAIT`].
    async fn on_leader(&self, req: LeaderRequest) -> Result<LeaderReply, ClusterError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut hint: Option<NodeInfo> = None;
        loop {
            let leader = hint.take().or_else(|| self.status().leader);
            let outcome = match &leader {
                // A leader cut off from its majority cannot commit: it gives up after
                // LEADER_CALL, as a remote caller would.
                Some(l) if l.id() == self.id() => {
                    match tokio::time::timeout(
                        LEADER_CALL,
                        crate::leader::handle(&self.raft, req.clone()),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            return Err(ClusterError::Timeout(
                                "this node leads but cannot reach a majority".into(),
                            ))
                        }
                    }
                }
                Some(l) => match self
                    .pool
                    .call(&l.addr, RequestBody::Leader(req.clone()), LEADER_CALL)
                    .await
                {
                    Ok(ResponseBody::Leader(r)) => r,
                    Ok(other) => {
                        return Err(ClusterError::Protocol(format!(
                            "expected a leader's reply from {l}, got {}",
                            other.kind()
                        )))
                    }
                    // Never sent: safe to look for the leader again.
                    Err(CallError::Connect(_)) => Err(RemoteError::NotLeader(None)),
                    Err(CallError::Rpc(e)) => return Err(e),
                },
                None => Err(RemoteError::NotLeader(None)),
            };
            match outcome {
                Ok(r) => return Ok(r),
                Err(RemoteError::Failed(why)) => return Err(ClusterError::Raft(why)),
                Err(RemoteError::NotLeader(next)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ClusterError::Timeout("no reachable metadata leader".into()));
                    }
                    hint = next.filter(|n| Some(n) != leader.as_ref());
                    if hint.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// The locally applied value of `key` (may lag the leader).
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        self.reader.get(key)
    }

    /// Hear of every change this node applies from now on (see
    /// [`StateMachine::subscribe`]: read the map after subscribing).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Applied> {
        self.feed.subscribe()
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

    /// Send an application request to the member called `node` (its handler answers:
    /// see [`crate::net::AppHandler`]); `ttl` bounds the whole call. `Err(Connect)`: it
    /// was never sent.
    pub async fn call_app(
        &self,
        node: &str,
        request: serde_json::Value,
        ttl: Duration,
    ) -> Result<Result<serde_json::Value, String>, crate::net::CallError> {
        let addr = self
            .status()
            .members
            .into_iter()
            .find(|m| m.name == node)
            .map(|m| m.addr)
            .ok_or_else(|| {
                crate::net::CallError::Connect(ClusterError::Config(format!(
                    "{node} is not a member of this cluster"
                )))
            })?;
        match self
            .app_pool
            .call(&addr, RequestBody::App(request), ttl)
            .await?
        {
            ResponseBody::App(r) => Ok(r),
            ResponseBody::Error(e) => Ok(Err(e)),
            other => Err(crate::net::CallError::Rpc(ClusterError::Protocol(format!(
                "expected an application reply from {node}, got {}",
                other.kind()
            )))),
        }
    }

    /// Opens this node's member of the application group `group`, with `machine` as its
    /// state machine: restores the group's last snapshot and starts its Raft, which
    /// applies the log after the snapshot. A new group has no members until one member
    /// calls [`Group::initialize`]. Fails if the group is open already.
    pub async fn open_group(
        &self,
        group: RaftGroup,
        machine: Arc<dyn GroupMachine>,
    ) -> Result<Group, ClusterError> {
        if group == META_GROUP {
            return Err(ClusterError::Config("group 0 is the metadata group".into()));
        }
        if self.groups.get(group).is_some() {
            return Err(ClusterError::Config(format!(
                "raft group {group} is open already"
            )));
        }
        let slot = SnapshotSlot {
            store: self.log_store.clone(),
            group,
        };
        let mut sm = GroupSm::open(machine.clone(), slot.clone()).await?;
        let log = LogStore::new(self.log_store.clone(), group);
        if log
            .forget_unreplayable(sm.snapshot_index().await)
            .await
            .map_err(|e| ClusterError::Raft(format!("cannot read the raft log: {e}")))?
        {
            machine.restore(&[]).map_err(ClusterError::Raft)?;
            sm = GroupSm::open(machine, slot).await?;
        }
        let raft = Raft::new(
            self.id(),
            self.raft_config.clone(),
            NetworkFactory::new(self.group_pool.clone(), self.id(), group),
            log,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(format!("cannot start raft group {group}: {e}")))?;
        if !self.groups.insert(group, raft.clone()) {
            let _ = raft.shutdown().await;
            return Err(ClusterError::Config(format!(
                "raft group {group} is open already"
            )));
        }
        Ok(Group::new(group, raft, self.me.clone()))
    }

    /// This node's member of `group`, if open.
    pub fn group(&self, group: RaftGroup) -> Option<Group> {
        self.groups
            .get(group)
            .map(|raft| Group::new(group, raft, self.me.clone()))
    }

    /// Stops this node's member of `group` (its log stays).
    pub async fn close_group(&self, group: RaftGroup) {
        if let Some(raft) = self.groups.remove(group) {
            let _ = raft.shutdown().await;
        }
    }

    /// Stops this node's member of `group` and removes its log, vote and snapshot (the
    /// group was deleted, or this node left it).
    pub async fn destroy_group(&self, group: RaftGroup) -> Result<(), ClusterError> {
        self.close_group(group).await;
        let store = self.log_store.clone();
        tokio::task::spawn_blocking(move || store.forget_group(group))
            .await
            .map_err(|e| ClusterError::Raft(format!("storage task: {e}")))?
            .map_err(|e| ClusterError::Raft(format!("cannot remove raft group {group}: {e}")))
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
        for raft in self.groups.drain() {
            let _ = raft.shutdown().await;
        }
        let raft_result = self.raft.shutdown().await;
        if let Some(task) = take(&self.server) {
            task.abort();
            // Wait for the task to be dropped, which closes the listener.
            let _ = task.await;
        }
        self.pool.close();
        self.app_pool.close();
        self.group_pool.close();
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
        self.app_pool.close();
        self.group_pool.close();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let raft = self.raft.clone();
            let groups = self.groups.drain();
            rt.spawn(async move {
                for g in groups {
                    let _ = g.shutdown().await;
                }
                let _ = raft.shutdown().await;
            });
        }
    }
}
