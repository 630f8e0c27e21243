//! The replicated state machine: a key → JSON map plus the Raft bookkeeping openraft needs
//! (last applied log id, last membership), with JSON snapshots.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{
    LogId, MetaCommand, MetaResponse, NodeId, NodeInfo, StoredMembership, TypeConfig,
};

/// Everything a snapshot must carry; serialized as-is (JSON) to form the snapshot body.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct SmData {
    map: BTreeMap<String, Value>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

impl SmData {
    fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        let previous = match cmd {
            MetaCommand::Put { key, value } => self.map.insert(key.clone(), value.clone()),
            MetaCommand::Delete { key } => self.map.remove(key),
        };
        MetaResponse { previous }
    }
}

/// A built or received snapshot, kept so it can be served to lagging followers.
#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// Shared state behind the read handle. A std lock: critical sections never await, and
/// readers (the broker) want a synchronous `get`.
type Shared = Arc<RwLock<SmData>>;

fn read(state: &Shared) -> RwLockReadGuard<'_, SmData> {
    // A panic while holding the lock cannot leave a half-applied command (each mutation
    // is a single map operation), so a poisoned lock is still consistent.
    state.read().unwrap_or_else(|p| p.into_inner())
}

fn write(state: &Shared) -> RwLockWriteGuard<'_, SmData> {
    state.write().unwrap_or_else(|p| p.into_inner())
}

/// Read-only view of the applied metadata, for serving local (possibly stale) reads.
#[derive(Debug, Clone)]
pub struct MetaReader {
    state: Shared,
}

impl MetaReader {
    /// The applied value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Value> {
        read(&self.state).map.get(key).cloned()
    }

    /// A copy of the whole applied map.
    pub fn snapshot_of_map(&self) -> BTreeMap<String, Value> {
        read(&self.state).map.clone()
    }

    /// The id of the last log entry applied locally.
    pub fn last_applied(&self) -> Option<LogId> {
        read(&self.state).last_applied
    }
}

/// openraft state machine over `SmData`; clones share state.
#[derive(Debug, Clone, Default)]
pub struct StateMachine {
    state: Shared,
    current: Arc<tokio::sync::Mutex<Option<StoredSnapshot>>>,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    /// An empty state machine.
    pub fn new() -> Self {
        Self::default()
    }

    /// A read handle sharing this state machine's data.
    pub fn reader(&self) -> MetaReader {
        MetaReader {
            state: self.state.clone(),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Serialize under the read lock so map, last_applied and membership agree.
        let (data, last_applied, membership) = {
            let sm = read(&self.state);
            let data =
                serde_json::to_vec(&*sm).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (data, sm.last_applied, sm.membership.clone())
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        *self.current.lock().await = Some(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let sm = read(&self.state);
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut sm = write(&self.state);
        let mut out = Vec::new();
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => MetaResponse::default(),
                EntryPayload::Normal(cmd) => sm.apply(&cmd),
                EntryPayload::Membership(m) => {
                    sm.membership = StoredMembership::new(Some(entry.log_id), m);
                    MetaResponse::default()
                }
            };
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
        let mut incoming: SmData = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // The meta is authoritative for the Raft bookkeeping.
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        *write(&self.state) = incoming;
        *self.current.lock().await = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};
    use serde_json::json;

    use super::*;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 7), index)
    }

    fn normal(index: u64, cmd: MetaCommand) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    #[tokio::test]
    async fn apply_snapshot_roundtrip() {
        let mut sm = StateMachine::new();
        let members = std::collections::BTreeMap::from([(7, NodeInfo::new("n7", "127.0.0.1:1"))]);
        let membership = Entry {
            log_id: log_id(1),
            payload: EntryPayload::Membership(Membership::new(vec![[7].into()], members)),
        };
        let put = |k: &str, v| MetaCommand::Put {
            key: k.into(),
            value: v,
        };
        let out = sm
            .apply(vec![
                membership,
                normal(2, put("a", json!(1))),
                normal(3, put("a", json!(2))),
                normal(4, MetaCommand::Delete { key: "b".into() }),
            ])
            .await
            .expect("apply");
        assert_eq!(out[2].previous, Some(json!(1)));
        assert_eq!(out[3].previous, None);

        let snap = sm.build_snapshot().await.expect("build");
        assert_eq!(snap.meta.last_log_id, Some(log_id(4)));

        let mut other = StateMachine::new();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        let reader = other.reader();
        assert_eq!(reader.get("a"), Some(json!(2)));
        assert_eq!(reader.last_applied(), Some(log_id(4)));
        let (applied, m) = other.applied_state().await.expect("state");
        assert_eq!(applied, Some(log_id(4)));
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![7]);
        assert!(other
            .get_current_snapshot()
            .await
            .expect("current")
            .is_some());
    }
}
