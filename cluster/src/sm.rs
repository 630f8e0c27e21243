//! The replicated state machine: a key → JSON map plus the Raft bookkeeping openraft needs
//! (last applied log id, last membership), with JSON snapshots.
//!
//! The map lives in memory. Every snapshot, built here or received from the leader, is
//! saved in the node's store before openraft may purge the log it covers, so a restart
//! restores the last snapshot and openraft re-applies the log after it.

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

use warren_storage::{RaftGroup, RaftLogStore};

use crate::types::{
    Applied, LogId, MetaCommand, MetaResponse, NodeId, NodeInfo, StoredMembership, TypeConfig,
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
            MetaCommand::Batch(cmds) => {
                for c in cmds {
                    self.apply(c);
                }
                None
            }
            MetaCommand::IfAbsent { key, then } => {
                if let Some(v) = self.map.get(key) {
                    return MetaResponse {
                        previous: Some(v.clone()),
                        reply: None,
                    };
                }
                self.apply(then);
                None
            }
            MetaCommand::DeletePrefix { prefix } => {
                let keys: Vec<String> = self
                    .map
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    self.map.remove(&k);
                }
                None
            }
            MetaCommand::IfEquals { key, value, then } => {
                match self.map.get(key) {
                    Some(v) if v == value => {}
                    other => {
                        return MetaResponse {
                            previous: Some(other.cloned().unwrap_or(Value::Null)),
                            reply: None,
                        }
                    }
                }
                self.apply(then);
                None
            }
            // Never sent to the metadata group.
            MetaCommand::Group(_) => None,
        };
        MetaResponse {
            previous,
            reply: None,
        }
    }
}

/// How many applied changes a slow subscriber may fall behind by before it is told it
/// lagged (and must read the whole map again).
const FEED_CAPACITY: usize = 4096;

/// A built or received snapshot, kept so it can be served to lagging followers.
#[derive(Debug, Clone)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta<NodeId, NodeInfo>,
    pub(crate) data: Vec<u8>,
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

    /// A copy of the applied entries whose keys start with `prefix`.
    pub fn snapshot_of_prefix(&self, prefix: &str) -> BTreeMap<String, Value> {
        read(&self.state)
            .map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The id of the last log entry applied locally.
    pub fn last_applied(&self) -> Option<LogId> {
        read(&self.state).last_applied
    }
}

/// Where a state machine's snapshots are saved: one Raft group's slot in a store.
#[derive(Clone)]
pub(crate) struct SnapshotSlot {
    pub(crate) store: Arc<dyn RaftLogStore>,
    pub(crate) group: RaftGroup,
}

impl std::fmt::Debug for SnapshotSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSlot")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl SnapshotSlot {
    /// Save `snap` here, synced.
    pub(crate) async fn save(&self, snap: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let slot = self.clone();
        let sig = snap.meta.signature();
        let raw = encode_snapshot(snap)
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), &e))?;
        tokio::task::spawn_blocking(move || slot.store.save_snapshot(slot.group, &raw))
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(sig.clone()), openraft::AnyError::error(e))
            })?
            .map_err(|e| StorageIOError::write_snapshot(Some(sig), &e))?;
        Ok(())
    }
}

/// The meta of a snapshot built at `last_applied` (the `seq`-th this run).
pub(crate) fn snapshot_meta(
    last_applied: Option<LogId>,
    membership: StoredMembership,
    seq: u64,
) -> SnapshotMeta<NodeId, NodeInfo> {
    let snapshot_id = match last_applied {
        Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
        None => format!("none-{seq}"),
    };
    SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership,
        snapshot_id,
    }
}

/// A saved snapshot: the meta's JSON length (u32, big-endian), the meta's JSON, the data.
pub(crate) fn encode_snapshot(s: &StoredSnapshot) -> serde_json::Result<Vec<u8>> {
    let meta = serde_json::to_vec(&s.meta)?;
    let mut out = Vec::with_capacity(4 + meta.len() + s.data.len());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&s.data);
    Ok(out)
}

pub(crate) fn decode_snapshot(raw: &[u8]) -> Result<StoredSnapshot, String> {
    let len = raw
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .ok_or("a saved snapshot shorter than its header")?;
    let meta = raw
        .get(4..4 + len)
        .ok_or("a saved snapshot shorter than its meta")?;
    Ok(StoredSnapshot {
        meta: serde_json::from_slice(meta).map_err(|e| format!("a saved snapshot's meta: {e}"))?,
        data: raw[4 + len..].to_vec(),
    })
}

/// The state `data` of a snapshot described by `meta` (whose Raft bookkeeping wins).
fn restore(meta: &SnapshotMeta<NodeId, NodeInfo>, data: &[u8]) -> serde_json::Result<SmData> {
    let mut sm: SmData = serde_json::from_slice(data)?;
    sm.last_applied = meta.last_log_id;
    sm.membership = meta.last_membership.clone();
    Ok(sm)
}

/// openraft state machine over `SmData`; clones share state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    state: Shared,
    current: Arc<tokio::sync::Mutex<Option<StoredSnapshot>>>,
    snapshot_seq: Arc<AtomicU64>,
    /// Where snapshots are saved; None: they live in memory only (tests).
    slot: Option<SnapshotSlot>,
    /// What was applied, for subscribers.
    feed: Arc<tokio::sync::broadcast::Sender<Applied>>,
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine {
            state: Shared::default(),
            current: Arc::default(),
            snapshot_seq: Arc::default(),
            slot: None,
            feed: Arc::new(tokio::sync::broadcast::channel(FEED_CAPACITY).0),
        }
    }
}

impl StateMachine {
    /// An empty state machine whose snapshots are not saved.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state machine of `group`, as its last saved snapshot left it; its snapshots
    /// are saved in `store`.
    pub async fn open(
        store: Arc<dyn RaftLogStore>,
        group: RaftGroup,
    ) -> Result<Self, StorageError<NodeId>> {
        let slot = SnapshotSlot { store, group };
        let s = slot.clone();
        let raw = tokio::task::spawn_blocking(move || s.store.read_snapshot(s.group))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, openraft::AnyError::error(e)))?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let sm = StateMachine {
            slot: Some(slot),
            ..Self::default()
        };
        if let Some(raw) = raw {
            let saved = decode_snapshot(&raw)
                .map_err(|e| StorageIOError::read_snapshot(None, openraft::AnyError::error(e)))?;
            let data = restore(&saved.meta, &saved.data)
                .map_err(|e| StorageIOError::read_snapshot(Some(saved.meta.signature()), &e))?;
            *write(&sm.state) = data;
            *sm.current.lock().await = Some(saved);
        }
        Ok(sm)
    }

    /// The index of the last log entry the saved snapshot covers, if there is one.
    pub async fn snapshot_index(&self) -> Option<u64> {
        let current = self.current.lock().await;
        current.as_ref()?.meta.last_log_id.map(|l| l.index)
    }

    /// Save `snap` (synced) where this state machine's snapshots live, if anywhere.
    async fn save(&self, snap: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        match &self.slot {
            Some(slot) => slot.save(snap).await,
            None => Ok(()),
        }
    }

    /// Hear of every change applied from now on. Read the map (with a
    /// [`MetaReader`]) after subscribing: the changes that follow may repeat some of it,
    /// and applying a put or a delete twice does no harm. A subscriber that falls more
    /// than a few thousand changes behind gets `Lagged` and must read the map again.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Applied> {
        self.feed.subscribe()
    }

    /// The sender subscribers are made from, kept by whoever hands out subscriptions.
    pub(crate) fn feed(&self) -> Arc<tokio::sync::broadcast::Sender<Applied>> {
        self.feed.clone()
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
                EntryPayload::Blank => {
                    let _ = self.feed.send(Applied::Entry {
                        index: entry.log_id.index,
                    });
                    MetaResponse::default()
                }
                EntryPayload::Normal(cmd) => {
                    let r = sm.apply(&cmd);
                    // No subscriber: nobody to tell.
                    let _ = self.feed.send(Applied::Command {
                        index: entry.log_id.index,
                        command: cmd,
                    });
                    r
                }
                EntryPayload::Membership(m) => {
                    let _ = self.feed.send(Applied::Entry {
                        index: entry.log_id.index,
                    });
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
        // The meta is authoritative for the Raft bookkeeping.
        let incoming = restore(meta, &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let received = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Saved before it replaces the state: a restart finds either the old state with
        // its log, or this one.
        self.save(&received).await?;
        let map = incoming.map.clone();
        *write(&self.state) = incoming;
        let _ = self.feed.send(Applied::Reset(map));
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

    #[tokio::test]
    async fn snapshots_are_saved_and_restored() {
        let store: Arc<dyn RaftLogStore> = Arc::new(warren_storage::mem::MemStore::new());
        let mut sm = StateMachine::open(store.clone(), 3).await.expect("open");
        assert_eq!(sm.snapshot_index().await, None);
        let put = |k: &str, v| MetaCommand::Put {
            key: k.into(),
            value: v,
        };
        sm.apply(vec![normal(1, put("a", json!(1)))])
            .await
            .expect("apply");
        // Applied but not in a snapshot: a restart replays it from the log.
        let again = StateMachine::open(store.clone(), 3).await.expect("open");
        assert_eq!(again.reader().get("a"), None);
        let snap = sm.build_snapshot().await.expect("build");
        let again = StateMachine::open(store.clone(), 3).await.expect("open");
        assert_eq!(again.reader().get("a"), Some(json!(1)));
        assert_eq!(again.reader().last_applied(), Some(log_id(1)));
        assert_eq!(again.snapshot_index().await, Some(1));
        // Other groups are apart.
        let other = StateMachine::open(store.clone(), 4).await.expect("open");
        assert_eq!(other.reader().get("a"), None);
        // A snapshot received from a leader is saved too.
        let mut follower = StateMachine::open(store.clone(), 5).await.expect("open");
        follower
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        let again = StateMachine::open(store, 5).await.expect("open");
        assert_eq!(again.reader().get("a"), Some(json!(1)));
        let current = again
            .clone()
            .get_current_snapshot()
            .await
            .expect("current")
            .expect("a snapshot");
        assert_eq!(current.meta.snapshot_id, snap.meta.snapshot_id);
    }

    #[test]
    fn conditional_and_prefix_commands() {
        let mut d = SmData::default();
        let put = |k: &str, v| MetaCommand::Put {
            key: k.into(),
            value: v,
        };
        for (k, v) in [("p/a", 1), ("p/b", 2), ("pz", 3), ("q", 4)] {
            d.apply(&put(k, json!(v)));
        }
        // Only the keys under the prefix go.
        d.apply(&MetaCommand::DeletePrefix {
            prefix: "p/".into(),
        });
        let keys: Vec<&String> = d.map.keys().collect();
        assert_eq!(keys, ["pz", "q"]);
        // IfEquals applies only on an exact match; else it reports the value.
        let cond = |v| MetaCommand::IfEquals {
            key: "q".into(),
            value: v,
            then: Box::new(put("r", json!(5))),
        };
        assert_eq!(d.apply(&cond(json!(9))).previous, Some(json!(4)));
        assert_eq!(d.map.get("r"), None);
        assert_eq!(d.apply(&cond(json!(4))).previous, None);
        assert_eq!(d.map.get("r"), Some(&json!(5)));
        let absent = MetaCommand::IfEquals {
            key: "nope".into(),
            value: json!(1),
            then: Box::new(put("s", json!(1))),
        };
        assert_eq!(d.apply(&absent).previous, Some(Value::Null));
        assert_eq!(d.map.get("s"), None);
    }

    #[tokio::test]
    async fn a_batch_applies_whole_and_subscribers_hear_of_it() {
        let mut sm = StateMachine::new();
        let mut feed = sm.subscribe();
        let put = |k: &str, v| MetaCommand::Put {
            key: k.into(),
            value: v,
        };
        let batch = MetaCommand::Batch(vec![
            put("a", json!(1)),
            put("b", json!(2)),
            MetaCommand::Delete { key: "a".into() },
        ]);
        let out = sm
            .apply(vec![
                normal(1, put("a", json!(0))),
                normal(2, batch.clone()),
            ])
            .await
            .expect("apply");
        assert_eq!(out[1].previous, None);
        let r = sm.reader();
        assert_eq!((r.get("a"), r.get("b")), (None, Some(json!(2))));
        assert_eq!(
            feed.recv().await.expect("first"),
            Applied::Command {
                index: 1,
                command: put("a", json!(0))
            }
        );
        assert_eq!(
            feed.recv().await.expect("second"),
            Applied::Command {
                index: 2,
                command: batch
            }
        );
        // A conditional command: the first applies, the second does not.
        let seed = |v: serde_json::Value| MetaCommand::IfAbsent {
            key: "seed".into(),
            then: Box::new(MetaCommand::Batch(vec![
                put("seed", v.clone()),
                put("c", v),
            ])),
        };
        let out = sm
            .apply(vec![normal(3, seed(json!(1))), normal(4, seed(json!(2)))])
            .await
            .expect("apply");
        assert_eq!(
            (out[0].previous.clone(), out[1].previous.clone()),
            (None, Some(json!(1)))
        );
        assert_eq!(
            (r.get("seed"), r.get("c")),
            (Some(json!(1)), Some(json!(1)))
        );
        for _ in 0..2 {
            feed.recv().await.expect("the seeds");
        }
        // A snapshot from the leader replaces the map: subscribers get all of it.
        let snap = sm.build_snapshot().await.expect("build");
        let mut other = StateMachine::new();
        let mut other_feed = other.subscribe();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        let all = std::collections::BTreeMap::from([
            ("b".to_string(), json!(2)),
            ("c".to_string(), json!(1)),
            ("seed".to_string(), json!(1)),
        ]);
        assert_eq!(other_feed.recv().await.expect("reset"), Applied::Reset(all));
    }
}
