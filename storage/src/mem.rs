//! The in-memory engine: the same contracts as the durable one, kept in
//! process memory (nothing survives a restart; a Raft log survives a
//! cluster node's restart within the process when the same `MemStore` is
//! handed to it again). Locks are std mutexes held
//! only for the duration of a map operation.

use crate::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemStore {
    meta: Mutex<Definitions>,
    records: Mutex<BTreeMap<(String, String), Bytes>>,
    messages: Mutex<Messages>,
    raft: Mutex<BTreeMap<RaftGroup, RaftState>>,
}

/// One Raft group's state.
#[derive(Default)]
struct RaftState {
    vote: Option<Bytes>,
    committed: Option<Bytes>,
    last_purged: Option<Bytes>,
    snapshot: Option<Bytes>,
    entries: BTreeMap<u64, Bytes>,
}

#[derive(Default)]
struct Messages {
    bodies: HashMap<MessageId, (StoredMessage, usize)>,
    index: BTreeMap<(QueueId, u64), (MessageId, EntryMeta)>,
    dedup: BTreeMap<(Bytes, Bytes), u64>,
    delayed: BTreeMap<(u64, MessageId), Bytes>,
    streams: BTreeMap<(QueueId, u64), (u64, StoredMessage)>,
    stream_times: BTreeMap<(QueueId, u64, u64), ()>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything the message store holds, in a comparable form (tests).
    #[cfg(test)]
    pub(crate) fn state(&self) -> String {
        let m = lock(&self.messages);
        let mut bodies: Vec<_> = m
            .bodies
            .iter()
            .map(|(id, (_, refs))| (*id, *refs))
            .collect();
        bodies.sort();
        format!(
            "bodies {bodies:?}\nindex {:?}\ndedup {:?}",
            m.index, m.dedup
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere never leaves these maps half-updated (each operation
    // is a single map call), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MetaStore for MemStore {
    fn apply_records(&self, ops: &[RecordOp]) -> Result<()> {
        let mut r = lock(&self.records);
        for op in ops {
            match op {
                RecordOp::Put(rec) => {
                    r.insert((rec.kind.clone(), rec.key.clone()), rec.value.clone());
                }
                RecordOp::Delete { kind, key } => {
                    r.remove(&(kind.clone(), key.clone()));
                }
            }
        }
        Ok(())
    }
    fn load_records(&self) -> Result<Vec<Record>> {
        Ok(lock(&self.records)
            .iter()
            .map(|((kind, key), value)| Record {
                kind: kind.clone(),
                key: key.clone(),
                value: value.clone(),
            })
            .collect())
    }
    fn put_exchange(&self, def: &ExchangeDef) -> Result<()> {
        let mut m = lock(&self.meta);
        m.exchanges
            .retain(|e| !(e.vhost == def.vhost && e.name == def.name));
        m.exchanges.push(def.clone());
        Ok(())
    }
    fn delete_exchange(&self, vhost: &str, name: &str) -> Result<()> {
        let mut m = lock(&self.meta);
        m.exchanges
            .retain(|e| !(e.vhost == vhost && e.name == name));
        m.bindings.retain(|b| {
            !(b.vhost == vhost && (b.source == name || (!b.to_queue && b.destination == name)))
        });
        Ok(())
    }
    fn put_queue(&self, def: &QueueDef) -> Result<()> {
        let mut m = lock(&self.meta);
        m.queues
            .retain(|q| !(q.vhost == def.vhost && q.name == def.name));
        m.queues.push(def.clone());
        Ok(())
    }
    fn delete_queue(&self, vhost: &str, name: &str) -> Result<()> {
        let mut m = lock(&self.meta);
        m.queues.retain(|q| !(q.vhost == vhost && q.name == name));
        m.bindings
            .retain(|b| !(b.vhost == vhost && b.to_queue && b.destination == name));
        Ok(())
    }
    fn put_binding(&self, def: &BindingDef) -> Result<()> {
        let mut m = lock(&self.meta);
        if !m.bindings.contains(def) {
            m.bindings.push(def.clone());
        }
        Ok(())
    }
    fn delete_binding(&self, def: &BindingDef) -> Result<()> {
        lock(&self.meta).bindings.retain(|b| b != def);
        Ok(())
    }
    fn load(&self) -> Result<Definitions> {
        Ok(lock(&self.meta).clone())
    }
}

impl MessageStore for MemStore {
    fn apply(&self, ops: &[MessageOp]) -> Result<()> {
        let mut m = lock(&self.messages);
        let release = |m: &mut Messages, id: MessageId| {
            if let Some(entry) = m.bodies.get_mut(&id) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    m.bodies.remove(&id);
                }
            }
        };
        for op in ops {
            match op {
                MessageOp::PutMessage { id, message, .. } => {
                    m.bodies.entry(*id).or_insert_with(|| (message.clone(), 0));
                }
                MessageOp::Enqueue {
                    queue,
                    seq,
                    id,
                    meta,
                } => {
                    if let Some(entry) = m.bodies.get_mut(id) {
                        entry.1 += 1;
                        m.index.insert((*queue, *seq), (*id, *meta));
                    } else {
                        return Err(StoreError::Corrupt(format!(
                            "enqueue of unknown message {id}"
                        )));
                    }
                }
                MessageOp::SetMeta {
                    queue, seq, meta, ..
                } => {
                    if let Some(e) = m.index.get_mut(&(*queue, *seq)) {
                        e.1 = *meta;
                    }
                }
                MessageOp::DedupPut { scope, key, value } => {
                    m.dedup.insert((scope.clone(), key.clone()), *value);
                }
                MessageOp::DedupDelete {
                    scope,
                    key,
                    if_value,
                } => {
                    let k = (scope.clone(), key.clone());
                    if if_value.is_none() || m.dedup.get(&k) == if_value.as_ref() {
                        m.dedup.remove(&k);
                    }
                }
                MessageOp::DedupDropScope { scope } => {
                    m.dedup.retain(|(s, _), _| s != scope);
                }
                MessageOp::PutDelayed { due, id, target } => {
                    if let Some(entry) = m.bodies.get_mut(id) {
                        entry.1 += 1;
                        m.delayed.insert((*due, *id), target.clone());
                    } else {
                        return Err(StoreError::Corrupt(format!(
                            "delayed entry of unknown message {id}"
                        )));
                    }
                }
                MessageOp::StreamChunk {
                    stream,
                    first,
                    records,
                    times,
                } => {
                    for r in crate::chunk::decode_range(*first, records, 0, usize::MAX)? {
                        m.streams
                            .insert((*stream, r.offset), (r.timestamp, r.message));
                    }
                    for &(ts, offset) in times {
                        m.stream_times.insert((*stream, ts, offset), ());
                    }
                }
                MessageOp::StreamTruncate { stream, before } => {
                    m.streams.retain(|(s, o), _| s != stream || o >= before);
                    m.stream_times
                        .retain(|(s, _, o), _| s != stream || o >= before);
                }
                MessageOp::StreamDrop { stream } => {
                    m.streams.retain(|(s, _), _| s != stream);
                    m.stream_times.retain(|(s, _, _), _| s != stream);
                }
                MessageOp::RemoveDelayed { due, id } => {
                    if m.delayed.remove(&(*due, *id)).is_some() {
                        release(&mut m, *id);
                    }
                }
                MessageOp::Remove { queue, seq, .. } => {
                    if let Some((id, _)) = m.index.remove(&(*queue, *seq)) {
                        release(&mut m, id);
                    }
                }
                MessageOp::RemoveRange { .. } | MessageOp::DropQueue { .. } => {
                    let (queue, from, to) = match op {
                        MessageOp::RemoveRange { queue, from, to } => (*queue, *from, *to),
                        MessageOp::DropQueue { queue } => (*queue, 0, u64::MAX),
                        _ => unreachable!("matched above"),
                    };
                    if from >= to {
                        continue;
                    }
                    let keys: BTreeSet<_> = m
                        .index
                        .range((queue, from)..(queue, to))
                        .map(|(k, _)| *k)
                        .collect();
                    for k in keys {
                        if let Some((id, _)) = m.index.remove(&k) {
                            release(&mut m, id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn read_index(
        &self,
        queue: QueueId,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageId, EntryMeta)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let m = lock(&self.messages);
        Ok(m.index
            .range((queue, from)..(queue, to))
            .take(limit)
            .map(|(&(_, seq), &(id, meta))| (seq, id, meta))
            .collect())
    }

    fn get_messages(&self, ids: &[MessageId]) -> Result<Vec<Option<StoredMessage>>> {
        let m = lock(&self.messages);
        Ok(ids
            .iter()
            .map(|id| m.bodies.get(id).map(|(msg, _)| msg.clone()))
            .collect())
    }

    fn bounds(&self, queue: QueueId) -> Result<Option<QueueBounds>> {
        let m = lock(&self.messages);
        let mut r = m.index.range((queue, 0)..=(queue, u64::MAX));
        let Some((&(_, first), _)) = r.next() else {
            return Ok(None);
        };
        let (last, count) = r.fold((first, 1), |(_, n), (&(_, s), _)| (s, n + 1));
        Ok(Some(QueueBounds { first, last, count }))
    }

    fn max_message_id(&self) -> Result<MessageId> {
        Ok(lock(&self.messages)
            .bodies
            .keys()
            .copied()
            .max()
            .unwrap_or(0))
    }

    fn load_dedup(&self, scope: &[u8]) -> Result<Vec<(Bytes, u64)>> {
        Ok(lock(&self.messages)
            .dedup
            .iter()
            .filter(|((s, _), _)| s == scope)
            .map(|((_, k), v)| (k.clone(), *v))
            .collect())
    }

    fn read_stream(&self, stream: QueueId, from: u64, limit: usize) -> Result<Vec<StreamRecord>> {
        let m = lock(&self.messages);
        Ok(m.streams
            .range((stream, from)..=(stream, u64::MAX))
            .take(limit)
            .map(|(&(_, offset), (timestamp, message))| StreamRecord {
                offset,
                timestamp: *timestamp,
                message: message.clone(),
            })
            .collect())
    }

    fn stream_ids(&self) -> Result<Vec<QueueId>> {
        let m = lock(&self.messages);
        let mut ids: Vec<QueueId> = m.streams.keys().map(|(s, _)| *s).collect();
        ids.dedup();
        Ok(ids)
    }

    fn stream_bounds(&self, stream: QueueId) -> Result<Option<(u64, u64)>> {
        let m = lock(&self.messages);
        let mut r = m.streams.range((stream, 0)..=(stream, u64::MAX));
        Ok(match (r.next(), r.next_back()) {
            (Some((&(_, a), _)), Some((&(_, b), _))) => Some((a, b)),
            (Some((&(_, a), _)), None) => Some((a, a)),
            _ => None,
        })
    }

    fn stream_seek_time(&self, stream: QueueId, timestamp: u64) -> Result<Option<u64>> {
        let first = match self.stream_bounds(stream)? {
            Some((first, _)) => first,
            None => return Ok(None),
        };
        let m = lock(&self.messages);
        Ok(Some(
            m.stream_times
                .range((stream, 0, 0)..=(stream, timestamp, u64::MAX))
                .next_back()
                .map_or(first, |(&(_, _, o), _)| o.max(first)),
        ))
    }

    fn read_delayed(
        &self,
        after: Option<(u64, MessageId)>,
        limit: usize,
    ) -> Result<Vec<DelayedEntry>> {
        use std::ops::Bound;
        let m = lock(&self.messages);
        let from = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        Ok(m.delayed
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(&(due, id), t)| (due, id, t.clone()))
            .collect())
    }

    fn queue_ids(&self) -> Result<Vec<QueueId>> {
        let m = lock(&self.messages);
        let mut ids: Vec<QueueId> = m.index.keys().map(|(q, _)| *q).collect();
        ids.dedup();
        Ok(ids)
    }
}

impl RaftLogStore for MemStore {
    fn save_vote(&self, group: RaftGroup, vote: &[u8]) -> Result<()> {
        lock(&self.raft).entry(group).or_default().vote = Some(Bytes::copy_from_slice(vote));
        Ok(())
    }
    fn read_vote(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        Ok(lock(&self.raft).get(&group).and_then(|g| g.vote.clone()))
    }
    fn save_committed(&self, group: RaftGroup, committed: Option<&[u8]>) -> Result<()> {
        lock(&self.raft).entry(group).or_default().committed =
            committed.map(Bytes::copy_from_slice);
        Ok(())
    }
    fn read_committed(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        Ok(lock(&self.raft)
            .get(&group)
            .and_then(|g| g.committed.clone()))
    }
    fn append(&self, group: RaftGroup, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut r = lock(&self.raft);
        let g = r.entry(group).or_default();
        for (index, entry) in entries {
            g.entries.insert(*index, Bytes::copy_from_slice(entry));
        }
        Ok(())
    }
    fn truncate(&self, group: RaftGroup, from: u64) -> Result<()> {
        if let Some(g) = lock(&self.raft).get_mut(&group) {
            g.entries.split_off(&from);
        }
        Ok(())
    }
    fn purge(&self, group: RaftGroup, upto: u64, last_purged: &[u8]) -> Result<()> {
        let mut r = lock(&self.raft);
        let g = r.entry(group).or_default();
        g.entries = match upto.checked_add(1) {
            Some(next) => g.entries.split_off(&next),
            None => BTreeMap::new(),
        };
        g.last_purged = Some(Bytes::copy_from_slice(last_purged));
        Ok(())
    }
    fn read_last_purged(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        Ok(lock(&self.raft)
            .get(&group)
            .and_then(|g| g.last_purged.clone()))
    }
    fn reset_log(&self, group: RaftGroup) -> Result<()> {
        if let Some(g) = lock(&self.raft).get_mut(&group) {
            *g = RaftState {
                vote: g.vote.take(),
                ..RaftState::default()
            };
        }
        Ok(())
    }
    fn forget_group(&self, group: RaftGroup) -> Result<()> {
        lock(&self.raft).remove(&group);
        Ok(())
    }
    fn save_snapshot(&self, group: RaftGroup, snapshot: &[u8]) -> Result<()> {
        lock(&self.raft).entry(group).or_default().snapshot =
            Some(Bytes::copy_from_slice(snapshot));
        Ok(())
    }
    fn read_snapshot(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        Ok(lock(&self.raft)
            .get(&group)
            .and_then(|g| g.snapshot.clone()))
    }
    fn entries(&self, group: RaftGroup, from: u64, to: u64) -> Result<Vec<(u64, Bytes)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(lock(&self.raft).get(&group).map_or_else(Vec::new, |g| {
            g.entries
                .range(from..to)
                .map(|(i, e)| (*i, e.clone()))
                .collect()
        }))
    }
    fn last_entry(&self, group: RaftGroup) -> Result<Option<(u64, Bytes)>> {
        Ok(lock(&self.raft)
            .get(&group)
            .and_then(|g| g.entries.last_key_value().map(|(i, e)| (*i, e.clone()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_contract() {
        let s = MemStore::new();
        crate::contract::messages(&s, &|| lock(&s.messages).bodies.len());
        let s = MemStore::new();
        crate::contract::batch_order(&s, &|| lock(&s.messages).bodies.len());
        let s = MemStore::new();
        crate::contract::entry_meta(&s, &|| lock(&s.messages).bodies.len());
        crate::contract::dedup(&MemStore::new());
        let s = MemStore::new();
        crate::contract::delayed(&s, &|| lock(&s.messages).bodies.len());
        crate::contract::streams(&MemStore::new());
    }

    #[test]
    fn definitions_contract() {
        crate::contract::definitions(&MemStore::new());
    }

    #[test]
    fn raft_log_contract() {
        crate::contract::raft_log(&MemStore::new());
    }

    #[test]
    fn records_contract() {
        crate::contract::records(&MemStore::new());
    }
}
