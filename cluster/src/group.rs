//! Application groups: Raft groups besides the metadata group, each over some of the
//! members, whose state machine the application supplies ([`GroupMachine`]). The broker
//! runs one per quorum queue.
//!
//! A group's log, vote and snapshots live in the node's [`RaftLogStore`] under the
//! group's id, as the metadata group's do under [`crate::log::META_GROUP`]; its Raft
//! messages travel on connections of their own, so a busy queue does not hold up the
//! metadata group's heartbeats. The state machine is the application's and lives in
//! memory: opening a group restores its last snapshot, and openraft applies the log
//! after it again.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
};
use warren_storage::RaftGroup;

use crate::error::ClusterError;
use crate::node::ClusterStatus;
use crate::sm::{decode_snapshot, snapshot_meta, SnapshotSlot, StoredSnapshot};
use crate::types::{
    Blob, LogId, MetaCommand, MetaResponse, NodeId, NodeInfo, Raft, StoredMembership, TypeConfig,
};

/// The state machine of an application group. Calls never overlap: `apply` in log
/// order, `snapshot` between two of them.
pub trait GroupMachine: Send + Sync + 'static {
    /// Applies the committed command of the log entry at `index`; what it returns is
    /// the writer's answer (on the leader that wrote it).
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8>;
    /// The whole state, as [`GroupMachine::restore`] reads it.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole state with a snapshot's (a new member, or a lagging one,
    /// receives the leader's; a restarted one reads its own). Empty bytes: the empty
    /// state (a group whose log cannot rebuild its state starts over).
    fn restore(&self, state: &[u8]) -> Result<(), String>;
}

/// The groups a node is a member of, by id, for the cluster server to route their
/// messages to.
#[derive(Clone, Default)]
pub struct Groups(Arc<RwLock<HashMap<RaftGroup, Raft>>>);

impl Groups {
    pub(crate) fn get(&self, g: RaftGroup) -> Option<Raft> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .cloned()
    }
    pub(crate) fn insert(&self, g: RaftGroup, raft: Raft) -> bool {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&g) {
            return false;
        }
        map.insert(g, raft);
        true
    }
    pub(crate) fn remove(&self, g: RaftGroup) -> Option<Raft> {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(&g)
    }
    pub(crate) fn drain(&self) -> Vec<Raft> {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.drain().map(|(_, r)| r).collect()
    }
}

/// Why a write to a group failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupWriteError {
    /// This member does not lead the group; the leader it knows of, if any.
    #[error("not the leader of the group (leader: {0:?})")]
    NotLeader(Option<NodeInfo>),
    /// Raft failed (stopped, or a storage error).
    #[error("{0}")]
    Failed(String),
}

/// The answer to a [`Group::submit`]ted command.
pub type PendingWrite = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<u8>, GroupWriteError>> + Send + Sync + 'static>,
>;

/// A running member of an application group. Clones share it.
#[derive(Clone)]
pub struct Group {
    id: RaftGroup,
    raft: Raft,
    me: NodeInfo,
}

impl Group {
    pub(crate) fn new(id: RaftGroup, raft: Raft, me: NodeInfo) -> Self {
        Self { id, raft, me }
    }

    /// The group's id.
    pub fn id(&self) -> RaftGroup {
        self.id
    }

    /// Makes `members` the group's first members (this node among them). Call on one
    /// member only, once; the others need only have opened the group. Calling it on a
    /// group that already has members does nothing.
    pub async fn initialize(&self, members: &[NodeInfo]) -> Result<(), ClusterError> {
        let map: BTreeMap<NodeId, NodeInfo> = members.iter().map(|m| (m.id(), m.clone())).collect();
        match self.raft.initialize(map).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Raft(format!(
                "cannot initialize raft group {}: {e}",
                self.id
            ))),
        }
    }

    /// Replicates `command` and returns the state machine's answer once a majority has
    /// it and this node has applied it. Only the leader may write. It waits as long as
    /// the leader cannot reach a majority: bound it with a timeout.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, GroupWriteError> {
        match self
            .raft
            .client_write(MetaCommand::Group(Blob(command)))
            .await
        {
            Ok(r) => Ok(r.data.reply.unwrap_or_default().0),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(GroupWriteError::NotLeader(f.leader_node))
            }
            Err(e) => Err(GroupWriteError::Failed(e.to_string())),
        }
    }

    /// [`Group::write`] in two steps: returns once the command is queued in
    /// this member's Raft (so commands submitted one after the other are logged in that
    /// order), with a future of its answer. Answers come in log order.
    pub async fn submit(&self, command: Vec<u8>) -> Result<PendingWrite, GroupWriteError> {
        let rx = self
            .raft
            .client_write_ff(MetaCommand::Group(Blob(command)))
            .await
            .map_err(|e| GroupWriteError::Failed(e.to_string()))?;
        Ok(Box::pin(async move {
            match rx.await {
                Ok(Ok(r)) => Ok(r.data.reply.unwrap_or_default().0),
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                    Err(GroupWriteError::NotLeader(f.leader_node))
                }
                Ok(Err(e)) => Err(GroupWriteError::Failed(e.to_string())),
                Err(_) => Err(GroupWriteError::Failed("the group stopped".into())),
            }
        }))
    }

    /// The group as this member sees it.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        ClusterStatus::from_metrics(self.me.clone(), &m, None)
    }

    /// Hears of every change of the group's state (leader, term, members).
    pub fn watch(&self) -> GroupWatch {
        GroupWatch {
            rx: self.raft.metrics(),
            me: self.me.clone(),
        }
    }

    /// Stands for election now (moving the leadership here: it wins if its log is up to
    /// date with a majority's).
    pub async fn elect(&self) -> Result<(), ClusterError> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| ClusterError::Raft(format!("cannot stand for election: {e}")))
    }

    /// Makes `members` the group's voters (from the leader): new ones are replicated to
    /// until they have caught up, then the membership changes in one joint step.
    pub async fn change_members(&self, members: &[NodeInfo]) -> Result<(), ClusterError> {
        let current = self.status().members;
        for m in members {
            if !current.contains(m) {
                self.raft
                    .add_learner(m.id(), m.clone(), true)
                    .await
                    .map_err(|e| ClusterError::Raft(format!("cannot add {m}: {e}")))?;
            }
        }
        let ids: std::collections::BTreeSet<NodeId> = members.iter().map(NodeInfo::id).collect();
        self.raft
            .change_membership(ids, false)
            .await
            .map_err(|e| ClusterError::Raft(format!("cannot change the members: {e}")))?;
        Ok(())
    }
}

/// Changes of a group's state, as [`Group::watch`] gives them.
pub struct GroupWatch {
    rx: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
    me: NodeInfo,
}

impl GroupWatch {
    /// The state now.
    pub fn now(&mut self) -> ClusterStatus {
        ClusterStatus::from_metrics(self.me.clone(), &self.rx.borrow_and_update(), None)
    }
    /// Waits for the next change; None once the group stopped.
    pub async fn changed(&mut self) -> Option<ClusterStatus> {
        self.rx.changed().await.ok()?;
        Some(self.now())
    }
}

/// Raft's bookkeeping beside the application's state.
#[derive(Default)]
struct Book {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// openraft's state machine for an application group; clones share it.
#[derive(Clone)]
pub(crate) struct GroupSm {
    machine: Arc<dyn GroupMachine>,
    /// Held while applying and while taking a snapshot, so the application's state and
    /// the bookkeeping agree.
    book: Arc<Mutex<Book>>,
    current: Arc<tokio::sync::Mutex<Option<StoredSnapshot>>>,
    slot: SnapshotSlot,
    seq: Arc<AtomicU64>,
}

impl GroupSm {
    /// The state machine of `slot`'s group, as its last saved snapshot left it.
    pub(crate) async fn open(
        machine: Arc<dyn GroupMachine>,
        slot: SnapshotSlot,
    ) -> Result<Self, ClusterError> {
        let s = slot.clone();
        let raw = tokio::task::spawn_blocking(move || s.store.read_snapshot(s.group))
            .await
            .map_err(|e| ClusterError::Raft(format!("storage task: {e}")))?
            .map_err(|e| ClusterError::Raft(format!("cannot read a group's snapshot: {e}")))?;
        let sm = GroupSm {
            machine,
            book: Arc::default(),
            current: Arc::default(),
            slot,
            seq: Arc::default(),
        };
        if let Some(raw) = raw {
            let saved = decode_snapshot(&raw).map_err(ClusterError::Raft)?;
            sm.machine
                .restore(&saved.data)
                .map_err(ClusterError::Raft)?;
            *sm.book.lock().unwrap_or_else(|p| p.into_inner()) = Book {
                last_applied: saved.meta.last_log_id,
                membership: saved.meta.last_membership.clone(),
            };
            *sm.current.lock().await = Some(saved);
        }
        Ok(sm)
    }

    pub(crate) async fn snapshot_index(&self) -> Option<u64> {
        let current = self.current.lock().await;
        current.as_ref()?.meta.last_log_id.map(|l| l.index)
    }

    async fn save(&self, snap: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        self.slot.save(snap).await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, last_applied, membership) = {
            let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            (
                self.machine.snapshot(),
                book.last_applied,
                book.membership.clone(),
            )
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let meta = snapshot_meta(last_applied, membership, seq);
        let built = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        // Saved before openraft may purge the log it covers.
        self.save(&built).await?;
        *self.current.lock().await = Some(built);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for GroupSm {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        Ok((book.last_applied, book.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for entry in entries {
            book.last_applied = Some(entry.log_id);
            let mut resp = MetaResponse::default();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(MetaCommand::Group(b)) => {
                    resp.reply = Some(Blob(self.machine.apply(entry.log_id.index, &b.0)));
                }
                // Only group commands are written to a group.
                EntryPayload::Normal(_) => {}
                EntryPayload::Membership(m) => {
                    book.membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
            out.push(resp);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let received = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Saved before it replaces the state: a restart finds either the old state with
        // its log, or this one.
        self.save(&received).await?;
        {
            let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            self.machine.restore(&received.data).map_err(|e| {
                StorageIOError::read_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
            })?;
            *book = Book {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
        }
        *self.current.lock().await = Some(received);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.current.lock().await.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
