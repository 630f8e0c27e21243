//! Raft log storage (openraft v2 `RaftLogStorage`) over the storage layer's
//! [`RaftLogStore`]: entries, vote, committed id and purge point are JSON bytes under one
//! Raft group id, so a restarted node remembers its vote and its log.
//!
//! The state machine lives in memory and its snapshots in the same store (see
//! [`crate::sm`]): on restart it is the saved snapshot, and openraft re-applies the log
//! after it up to the committed id.

use std::fmt::{self, Debug};
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use warren_storage::{RaftGroup, RaftLogStore, StoreError};

use crate::types::{LogId, NodeId, TypeConfig};

/// The Raft group of the cluster's metadata.
pub const META_GROUP: RaftGroup = 0;

/// Cheaply cloneable handle on one Raft group's log in a [`RaftLogStore`]; clones share
/// the backend, which is how openraft's separate log reader sees appends.
#[derive(Clone)]
pub struct LogStore {
    store: Arc<dyn RaftLogStore>,
    group: RaftGroup,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Which openraft error a failure becomes.
#[derive(Clone, Copy)]
enum What {
    ReadLogs,
    WriteLogs,
    ReadVote,
    WriteVote,
    Read,
    Write,
}

fn storage_error<E: std::error::Error + 'static>(what: What, e: &E) -> StorageError<NodeId> {
    let any = openraft::AnyError::new(e);
    match what {
        What::ReadLogs => StorageIOError::read_logs(any),
        What::WriteLogs => StorageIOError::write_logs(any),
        What::ReadVote => StorageIOError::read_vote(any),
        What::WriteVote => StorageIOError::write_vote(any),
        What::Read => StorageIOError::read(any),
        What::Write => StorageIOError::write(any),
    }
    .into()
}

/// Maps a JSON (en|de)coding failure.
fn json(what: What) -> impl Fn(serde_json::Error) -> StorageError<NodeId> {
    move |e| storage_error(what, &e)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice(bytes)
}

/// `[from, to)` of a range of log indexes.
fn index_range<R: RangeBounds<u64>>(range: &R) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl LogStore {
    /// The log of `group` in `store`, as left by earlier runs.
    pub fn new(store: Arc<dyn RaftLogStore>, group: RaftGroup) -> Self {
        Self { store, group }
    }

    /// Runs a storage call off the async workers: a synced write may wait on the disk.
    async fn run<T: Send + 'static>(
        &self,
        what: What,
        f: impl FnOnce(&dyn RaftLogStore, RaftGroup) -> warren_storage::Result<T> + Send + 'static,
    ) -> Result<T, StorageError<NodeId>> {
        let (store, group) = (self.store.clone(), self.group);
        tokio::task::spawn_blocking(move || f(&*store, group))
            .await
            .map_err(|e| storage_error(what, &StoreError::Io(format!("storage task: {e}"))))?
            .map_err(|e| storage_error(what, &e))
    }

    async fn last_purged(&self) -> Result<Option<LogId>, StorageError<NodeId>> {
        match self
            .run(What::ReadLogs, |s, g| s.read_last_purged(g))
            .await?
        {
            Some(b) => Ok(Some(decode(&b).map_err(json(What::ReadLogs))?)),
            None => Ok(None),
        }
    }

    /// Drops the log, purge point, committed id and snapshot (keeping the vote) when the
    /// saved snapshot (up to index `covered`, if any) and the log after it cannot rebuild
    /// the state machine: entries were purged past the snapshot, or, without one, the
    /// log does not start at index 0. Returns whether it did. Call before Raft starts.
    ///
    /// Snapshots are saved before the log they cover is purged, so this happens only to
    /// a store written before snapshots were saved (or damaged): it warns, and the
    /// leader sends a snapshot.
    pub async fn forget_unreplayable(
        &self,
        covered: Option<u64>,
    ) -> Result<bool, StorageError<NodeId>> {
        let purged = self.last_purged().await?.map(|l| l.index);
        let replayable = match (purged, covered) {
            (Some(p), Some(c)) => p <= c,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (None, None) => {
                let first = self
                    .run(What::ReadLogs, |s, g| s.entries(g, 0, 1))
                    .await?
                    .into_iter()
                    .next();
                let last = self.run(What::ReadLogs, |s, g| s.last_entry(g)).await?;
                first.is_some() || last.is_none()
            }
        };
        if replayable {
            return Ok(false);
        }
        tracing::warn!(
            group = self.group,
            "the Raft log was compacted past the saved snapshot: dropping the log (the vote \
             is kept); the leader will send a snapshot"
        );
        self.run(What::WriteLogs, |s, g| s.reset_log(g)).await?;
        Ok(true)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (from, to) = index_range(&range);
        let raw = self
            .run(What::ReadLogs, move |s, g| s.entries(g, from, to))
            .await?;
        raw.iter()
            .map(|(_, b)| decode(b))
            .collect::<serde_json::Result<_>>()
            .map_err(json(What::ReadLogs))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged = self.last_purged().await?;
        let last = match self.run(What::ReadLogs, |s, g| s.last_entry(g)).await? {
            Some((_, b)) => Some(
                decode::<Entry<TypeConfig>>(&b)
                    .map_err(json(What::ReadLogs))?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            // Purging everything keeps the last log id known through the purge point.
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(vote).map_err(json(What::WriteVote))?;
        self.run(What::WriteVote, move |s, g| s.save_vote(g, &bytes))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        match self.run(What::ReadVote, |s, g| s.read_vote(g)).await? {
            Some(b) => Ok(Some(decode(&b).map_err(json(What::ReadVote))?)),
            None => Ok(None),
        }
    }

    /// Not synced (see [`RaftLogStore::save_committed`]): openraft allows losing it.
    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = committed
            .map(|c| serde_json::to_vec(&c))
            .transpose()
            .map_err(json(What::Write))?;
        self.run(What::Write, move |s, g| {
            s.save_committed(g, bytes.as_deref())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        match self.run(What::Read, |s, g| s.read_committed(g)).await? {
            Some(b) => Ok(Some(decode(&b).map_err(json(What::Read))?)),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, serde_json::to_vec(&e)?)))
            .collect::<serde_json::Result<Vec<_>>>()
            .map_err(json(What::WriteLogs))?;
        let result = self
            .run(What::WriteLogs, move |s, g| s.append(g, &encoded))
            .await;
        // Synced when `append` returns: the entries are on disk.
        callback.log_io_completed(match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.run(What::WriteLogs, move |s, g| s.truncate(g, log_id.index))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        if self.last_purged().await?.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        let marker = serde_json::to_vec(&log_id).map_err(json(What::WriteLogs))?;
        self.run(What::WriteLogs, move |s, g| {
            s.purge(g, log_id.index, &marker)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};
    use warren_storage::mem::MemStore;

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    async fn append(log: &mut LogStore, entries: impl IntoIterator<Item = u64>) {
        let encoded: Vec<_> = entries
            .into_iter()
            .map(|i| (i, serde_json::to_vec(&entry(i)).expect("encode")))
            .collect();
        log.store.append(log.group, &encoded).expect("append");
    }

    async fn indexes(log: &mut LogStore) -> Vec<u64> {
        log.try_get_log_entries(..)
            .await
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn truncate_and_purge() {
        let mut d = LogStore::new(Arc::new(MemStore::new()), META_GROUP);
        append(&mut d, 1..=5).await;
        let st = d.get_log_state().await.expect("state");
        assert_eq!(st.last_log_id.map(|l| l.index), Some(5));

        d.truncate(entry(4).log_id).await.expect("truncate");
        assert_eq!(indexes(&mut d).await, [1, 2, 3]);

        d.purge(entry(2).log_id).await.expect("purge");
        let st = d.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(indexes(&mut d).await, [3]);
        assert_eq!(d.try_get_log_entries(2..=3).await.expect("read").len(), 1);

        // Purging everything keeps the last log id known through the purge point.
        d.purge(entry(3).log_id).await.expect("purge");
        assert_eq!(
            d.get_log_state()
                .await
                .expect("state")
                .last_log_id
                .map(|l| l.index),
            Some(3)
        );
        // An older purge point does not replace a newer one.
        d.purge(entry(1).log_id).await.expect("purge");
        assert_eq!(
            d.get_log_state()
                .await
                .expect("state")
                .last_purged_log_id
                .map(|l| l.index),
            Some(3)
        );
    }

    #[tokio::test]
    async fn reopened_log_remembers_vote_entries_and_purge_point() {
        let backend: Arc<dyn RaftLogStore> = Arc::new(MemStore::new());
        let vote = Vote::new_committed(3, 42);
        let committed = entry(4).log_id;
        {
            let mut log = LogStore::new(backend.clone(), META_GROUP);
            log.save_vote(&vote).await.expect("vote");
            append(&mut log, 1..=6).await;
            log.purge(entry(2).log_id).await.expect("purge");
            log.save_committed(Some(committed)).await.expect("commit");
            // Another group in the same backend stays apart.
            let mut other = LogStore::new(backend.clone(), 7);
            append(&mut other, 1..=2).await;
        }
        let mut log = LogStore::new(backend.clone(), META_GROUP);
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
        assert_eq!(log.read_committed().await.expect("commit"), Some(committed));
        let st = log.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id, Some(entry(2).log_id));
        assert_eq!(st.last_log_id, Some(entry(6).log_id));
        assert_eq!(indexes(&mut log).await, [3, 4, 5, 6]);
        let mut other = LogStore::new(backend, 7);
        assert_eq!(indexes(&mut other).await, [1, 2]);
        assert_eq!(other.read_vote().await.expect("vote"), None);
    }

    #[tokio::test]
    async fn an_unreplayable_log_is_dropped_but_the_vote_kept() {
        let backend: Arc<dyn RaftLogStore> = Arc::new(MemStore::new());
        let mut log = LogStore::new(backend.clone(), META_GROUP);
        assert!(!log.forget_unreplayable(None).await.expect("empty"));
        append(&mut log, 0..=3).await;
        assert!(!log.forget_unreplayable(None).await.expect("from 0"));
        assert_eq!(indexes(&mut log).await, [0, 1, 2, 3]);

        let vote = Vote::new_committed(2, 9);
        log.save_vote(&vote).await.expect("vote");
        log.save_committed(Some(entry(3).log_id))
            .await
            .expect("commit");
        log.purge(entry(1).log_id).await.expect("purge");
        let mut log = LogStore::new(backend, META_GROUP);
        // A snapshot that covers the purged entries keeps the log; one that does
        // not, or none, drops it.
        assert!(!log.forget_unreplayable(Some(1)).await.expect("covered"));
        assert!(!log.forget_unreplayable(Some(3)).await.expect("covered"));
        assert_eq!(indexes(&mut log).await, [2, 3]);
        assert!(log.forget_unreplayable(Some(0)).await.expect("a gap"));
        let st = log.get_log_state().await.expect("state");
        assert_eq!((st.last_purged_log_id, st.last_log_id), (None, None));
        log.purge(entry(1).log_id).await.expect("purge");
        assert!(log.forget_unreplayable(None).await.expect("purged"));
        let st = log.get_log_state().await.expect("state");
        assert_eq!((st.last_purged_log_id, st.last_log_id), (None, None));
        assert_eq!(log.read_committed().await.expect("commit"), None);
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    }
}
