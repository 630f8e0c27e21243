//! Raft log storage (openraft v2 `RaftLogStorage`), held in memory.
//!
//! All state lives in `LogData`; a durable backend replaces that struct and keeps the trait impls.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogState, RaftLogReader, StorageError, Vote};
use tokio::sync::Mutex;

use crate::types::{LogId, NodeId, TypeConfig};

/// The persistent part of a Raft node: log entries, vote, committed id, purge point.
#[derive(Debug, Default)]
struct LogData {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

impl LogData {
    fn range<R: RangeBounds<u64>>(&self, range: R) -> Vec<Entry<TypeConfig>> {
        self.entries.range(range).map(|(_, e)| e.clone()).collect()
    }

    fn state(&self) -> LogState<TypeConfig> {
        let last = self
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.last_purged);
        LogState {
            last_purged_log_id: self.last_purged,
            last_log_id: last,
        }
    }

    fn append(&mut self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) {
        for entry in entries {
            self.entries.insert(entry.log_id.index, entry);
        }
    }

    /// Removes entries at and after `log_id` (conflicting suffix).
    fn truncate(&mut self, log_id: LogId) {
        self.entries.split_off(&log_id.index);
    }

    /// Removes entries up to and including `log_id` (already in a snapshot).
    fn purge(&mut self, log_id: LogId) {
        if self.last_purged.is_some_and(|p| p >= log_id) {
            return;
        }
        self.last_purged = Some(log_id);
        self.entries = self.entries.split_off(&(log_id.index + 1));
    }
}

/// Cheaply cloneable handle on the node's Raft log; clones share the same data, which is
/// how openraft's separate log reader sees appends.
#[derive(Debug, Clone, Default)]
pub struct LogStore {
    data: Arc<Mutex<LogData>>,
}

impl LogStore {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.data.lock().await.range(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        Ok(self.data.lock().await.state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.data.lock().await.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.data.lock().await.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        self.data.lock().await.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        Ok(self.data.lock().await.committed)
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
        self.data.lock().await.append(entries);
        // Memory is our "disk": the entries are durable as soon as they are inserted.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.data.lock().await.truncate(log_id);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.data.lock().await.purge(log_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn truncate_and_purge() {
        let mut d = LogData::default();
        d.append((1..=5).map(entry));
        assert_eq!(d.state().last_log_id.map(|l| l.index), Some(5));

        d.truncate(entry(4).log_id);
        assert_eq!(d.range(..).len(), 3);

        d.purge(entry(2).log_id);
        let st = d.state();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(d.range(..).len(), 1);

        // Purging everything keeps the last log id known through the purge point.
        d.purge(entry(3).log_id);
        assert_eq!(d.state().last_log_id.map(|l| l.index), Some(3));
    }
}
