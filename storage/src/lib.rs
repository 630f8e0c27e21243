//! Storage behind traits, in the spirit of TiKV's `engine_traits`: the API has
//! no engine types, so the broker and its tests can run on any engine.
//!
//! - [`MetaStore`]: durable definitions (exchanges, queues, bindings).
//! - [`MessageStore`]: persistent messages and per-queue index entries, keyed
//!   big-endian `(queue id, sequence)` ([`keys`]) so iteration is queue order.
//!   A message routed to several queues is written once and referenced by id.
//! - [`mem`] — the in-memory engine (definitions and messages live as long as
//!   the process).
//! - The RocksDB engine is a crate of its own (`storage/rocksdb`,
//!   `warren-storage-rocksdb`), so that this one does not depend on it.
//! - [`RaftLogStore`]: the durable state of Raft groups (log, vote), as
//!   bytes, for the cluster crate.
//! - [`contract`] (feature `contract`) — the behaviour every engine must
//!   show, as functions each engine's tests call.

pub mod chunk;
pub mod codec;
pub mod elide;
pub mod keys;
pub mod mem;

use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("data directory {0} is in use by another process")]
    Locked(String),
    #[error("data directory {path} holds data of an incompatible format ({found}); this Warren reads {expected}")]
    Incompatible {
        path: String,
        found: String,
        expected: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Identifies a queue for the lifetime of the data directory.
pub type QueueId = u64;
/// Identifies a message body for the lifetime of the data directory.
pub type MessageId = u64;

/// A durable exchange as declared (arguments kept as encoded field-table bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDef {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: Bytes,
}

/// A durable queue as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueDef {
    pub vhost: String,
    pub name: String,
    pub id: QueueId,
    pub auto_delete: bool,
    pub arguments: Bytes,
}

/// A binding whose source and destination are both durable.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindingDef {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// true: destination is a queue; false: an exchange.
    pub to_queue: bool,
    pub routing_key: String,
    pub arguments: Bytes,
}

/// Everything needed to rebuild the topology at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Definitions {
    pub exchanges: Vec<ExchangeDef>,
    pub queues: Vec<QueueDef>,
    pub bindings: Vec<BindingDef>,
}

/// A record of the broker's own settings (users, vhosts, permissions,
/// policies, limits): an opaque value under `(kind, key)`. The broker
/// chooses kinds and encodes values; engines only keep them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: String,
    pub key: String,
    pub value: Bytes,
}

/// One change to the records; a batch of them is applied atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordOp {
    Put(Record),
    Delete { kind: String, key: String },
}

/// Durable definitions. Each call returns once the change is durable.
pub trait MetaStore: Send + Sync + 'static {
    /// Apply record changes in order, all or none, durably.
    fn apply_records(&self, ops: &[RecordOp]) -> Result<()>;
    /// Every record, ordered by kind then key.
    fn load_records(&self) -> Result<Vec<Record>>;
    fn put_exchange(&self, def: &ExchangeDef) -> Result<()>;
    fn delete_exchange(&self, vhost: &str, name: &str) -> Result<()>;
    fn put_queue(&self, def: &QueueDef) -> Result<()>;
    /// Removes the queue's definition and its bindings.
    fn delete_queue(&self, vhost: &str, name: &str) -> Result<()>;
    fn put_binding(&self, def: &BindingDef) -> Result<()>;
    fn delete_binding(&self, def: &BindingDef) -> Result<()>;
    fn load(&self) -> Result<Definitions>;
}

/// A message as stored: everything needed to deliver it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub exchange: Bytes,
    pub routing_key: Bytes,
    /// The raw content header payload.
    pub header: Bytes,
    pub body: Bytes,
}

/// What a queue keeps with each of its index entries besides the message
/// id: what must outlive a restart about the message's stay in that queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryMeta {
    /// When the message entered the queue, in Unix milliseconds (TTLs count
    /// from it); 0 for entries written before Warren recorded it.
    pub enqueued_at: u64,
    /// How often it was delivered from this queue and came back
    /// (`x-delivery-count`).
    pub deliveries: u32,
}

/// One change to the message store; a batch of them is applied atomically.
#[derive(Clone, Debug)]
pub enum MessageOp {
    /// Store a message body once; `refs` is how many `Enqueue`s will refer
    /// to it (the body goes with the last of them).
    PutMessage {
        id: MessageId,
        refs: u32,
        message: StoredMessage,
    },
    /// Append a queue index entry referring to a stored message.
    Enqueue {
        queue: QueueId,
        seq: u64,
        id: MessageId,
        meta: EntryMeta,
    },
    /// Rewrite what an existing index entry keeps (a message came back
    /// from a consumer: its delivery count). The caller guarantees the entry
    /// exists (it holds the message); nothing is released or added.
    SetMeta {
        queue: QueueId,
        seq: u64,
        id: MessageId,
        meta: EntryMeta,
    },
    /// Remove a queue index entry (ack, purge); the body goes with its last entry.
    Remove {
        queue: QueueId,
        seq: u64,
        id: MessageId,
    },
    /// Remove a queue's entries with `from <= seq < to` (purge of the part
    /// of a queue that lives only on disk); bodies go with their last entry.
    RemoveRange { queue: QueueId, from: u64, to: u64 },
    /// Remove every entry of a queue (queue deleted).
    DropQueue { queue: QueueId },
    /// Remember a deduplication key in `scope` (an exchange's or a queue's
    /// cache) with a value (an expiry time, or the sequence of the message
    /// that holds the key).
    DedupPut {
        scope: Bytes,
        key: Bytes,
        value: u64,
    },
    /// Forget a deduplication key; with `if_value`, only while it still
    /// has that value (a later put of the same key stays).
    DedupDelete {
        scope: Bytes,
        key: Bytes,
        if_value: Option<u64>,
    },
    /// Forget every key of a scope (its exchange or queue was deleted).
    DedupDropScope { scope: Bytes },
    /// A delayed message (stored by `PutMessage` in the same batch, with
    /// one reference for this entry) due at `due` (Unix ms), for `target`
    /// (the broker's encoding of where it goes).
    PutDelayed {
        due: u64,
        id: MessageId,
        target: Bytes,
    },
    /// The delayed message went out (or was dropped): its entry goes, and
    /// its body with its last reference.
    RemoveDelayed { due: u64, id: MessageId },
    /// Append records to a stream (an append-only log keyed by offset):
    /// `records` is a chunk value ([`chunk`]) of records from offset
    /// `first` on, their timestamps (Unix ms) never less than the previous
    /// record's. `times`: time index entries `(timestamp, offset)`, each
    /// noting that records from that timestamp on start at that offset (the
    /// broker notes the first record of each second, so the index stays
    /// sparse).
    StreamChunk {
        stream: QueueId,
        first: u64,
        records: Bytes,
        times: Vec<(u64, u64)>,
    },
    /// Retention: remove a stream's records with offsets below `before`
    /// (and their time index entries). The record at `before` is stored
    /// already (not appended in the same batch).
    StreamTruncate { stream: QueueId, before: u64 },
    /// Remove every record of a stream (it was deleted).
    StreamDrop { stream: QueueId },
}

/// One record of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRecord {
    pub offset: u64,
    /// When it was appended, Unix ms.
    pub timestamp: u64,
    pub message: StoredMessage,
}

/// A delayed message's entry: due time (Unix ms), message id, target.
pub type DelayedEntry = (u64, MessageId, Bytes);

/// What a queue holds on disk, found without reading a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    pub first: u64,
    pub last: u64,
    pub count: u64,
}

/// Persistent messages. `apply` returns once the batch is durable, so callers
/// group many operations per call (group commit).
pub trait MessageStore: Send + Sync + 'static {
    fn apply(&self, ops: &[MessageOp]) -> Result<()>;
    /// Apply `ops` atomically without waiting for them to be durable: a
    /// crash may lose them, with every later write, until the next `apply`
    /// or `sync`. What survives a crash is always a prefix of the writes.
    /// For changes nobody was promised (acks, requeue counts).
    fn apply_unsynced(&self, ops: &[MessageOp]) -> Result<()> {
        self.apply(ops)
    }
    /// Make every earlier write durable.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Up to `limit` index entries `(seq, message id, meta)` of `queue`
    /// with `from <= seq < to`, in order. No body is read.
    fn read_index(
        &self,
        queue: QueueId,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageId, EntryMeta)>>;
    /// The stored messages with these ids (None where there is none).
    fn get_messages(&self, ids: &[MessageId]) -> Result<Vec<Option<StoredMessage>>>;
    /// First and last sequence and the number of entries of `queue`; None
    /// when it has none. Reads index keys only.
    fn bounds(&self, queue: QueueId) -> Result<Option<QueueBounds>>;
    /// The highest message id stored (0 when there is none).
    fn max_message_id(&self) -> Result<MessageId>;
    /// Every queue id that has at least one entry.
    fn queue_ids(&self) -> Result<Vec<QueueId>>;
    /// The deduplication keys of `scope` with their values.
    fn load_dedup(&self, scope: &[u8]) -> Result<Vec<(Bytes, u64)>>;
    /// Up to `limit` records of `stream` from offset `from` on, in order.
    fn read_stream(&self, stream: QueueId, from: u64, limit: usize) -> Result<Vec<StreamRecord>>;
    /// Every stream id that has at least one record.
    fn stream_ids(&self) -> Result<Vec<QueueId>>;
    /// The first and last offsets of `stream` (None when it is empty).
    fn stream_bounds(&self, stream: QueueId) -> Result<Option<(u64, u64)>>;
    /// Where to start reading for the records appended at `timestamp` or
    /// later: the offset of the latest time index entry at or before it
    /// (records before that offset are all older), else the stream's
    /// first offset. None when the stream is empty.
    fn stream_seek_time(&self, stream: QueueId, timestamp: u64) -> Result<Option<u64>>;
    /// Up to `limit` delayed entries after `(due, id)` (from the first
    /// with None), in due order. No body is read.
    fn read_delayed(
        &self,
        after: Option<(u64, MessageId)>,
        limit: usize,
    ) -> Result<Vec<DelayedEntry>>;

    /// Up to `limit` entries of `queue` with sequence >= `from`, in order,
    /// with their messages.
    fn read(
        &self,
        queue: QueueId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageId, StoredMessage)>> {
        let entries = self.read_index(queue, from, u64::MAX, limit)?;
        let ids: Vec<MessageId> = entries.iter().map(|e| e.1).collect();
        let bodies = self.get_messages(&ids)?;
        entries
            .into_iter()
            .zip(bodies)
            .map(|((seq, id, _), m)| {
                m.map(|m| (seq, id, m)).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "queue {queue} entry {seq} refers to missing message {id}"
                    ))
                })
            })
            .collect()
    }
    /// Number of entries stored for `queue`.
    fn count(&self, queue: QueueId) -> Result<u64> {
        Ok(self.bounds(queue)?.map_or(0, |b| b.count))
    }
}

/// Identifies a Raft group: 0 is the cluster's metadata group; quorum
/// queues get groups of their own.
pub type RaftGroup = u64;

/// The durable state of Raft groups (log entries, vote, committed and
/// last purged log ids) as opaque bytes the caller encodes, so engines need
/// no Raft types. Each call is atomic and durable when it returns, except
/// [`RaftLogStore::save_committed`]: a node that forgets its vote or an
/// acknowledged entry voids Raft's safety, so these are synced.
pub trait RaftLogStore: Send + Sync + 'static {
    /// Replace the group's vote.
    fn save_vote(&self, group: RaftGroup, vote: &[u8]) -> Result<()>;
    fn read_vote(&self, group: RaftGroup) -> Result<Option<Bytes>>;
    /// Replace (or with None, forget) the group's committed log id. Not
    /// synced: Raft may lose it (it is learned again from the leader), so
    /// it rides along with the next synced write.
    fn save_committed(&self, group: RaftGroup, committed: Option<&[u8]>) -> Result<()>;
    fn read_committed(&self, group: RaftGroup) -> Result<Option<Bytes>>;
    /// Store `(index, entry)` pairs, replacing any at the same index, all
    /// in one synced write.
    fn append(&self, group: RaftGroup, entries: &[(u64, Vec<u8>)]) -> Result<()>;
    /// Remove the entries with index >= `from` (a conflicting suffix).
    fn truncate(&self, group: RaftGroup, from: u64) -> Result<()>;
    /// Remove the entries with index <= `upto` (now in a snapshot) and
    /// remember `last_purged` (the last purged log id), in one write.
    fn purge(&self, group: RaftGroup, upto: u64, last_purged: &[u8]) -> Result<()>;
    fn read_last_purged(&self, group: RaftGroup) -> Result<Option<Bytes>>;
    /// Forget the group's entries, committed id, purge point and snapshot,
    /// keeping its vote, in one write (a log that can no longer be
    /// replayed).
    fn reset_log(&self, group: RaftGroup) -> Result<()>;
    /// Forget everything of the group, its vote included, in one synced
    /// write (a node leaving its group to join another).
    fn forget_group(&self, group: RaftGroup) -> Result<()>;
    /// Replace the group's snapshot (the state machine's image up to some
    /// log id, which the log may then be purged to), in one synced write.
    fn save_snapshot(&self, group: RaftGroup, snapshot: &[u8]) -> Result<()>;
    fn read_snapshot(&self, group: RaftGroup) -> Result<Option<Bytes>>;
    /// The entries with `from <= index < to`, in index order.
    fn entries(&self, group: RaftGroup, from: u64, to: u64) -> Result<Vec<(u64, Bytes)>>;
    /// The entry with the highest index, if the group has any.
    fn last_entry(&self, group: RaftGroup) -> Result<Option<(u64, Bytes)>>;
}

/// A store that keeps both definitions and messages: what the broker runs
/// on, as a trait object.
pub trait Store: MetaStore + MessageStore {}

impl<T: MetaStore + MessageStore> Store for T {}

/// The contract every engine keeps, checked against each of them (this
/// crate's tests for [`mem`], the RocksDB crate's for its engine).
#[cfg(any(test, feature = "contract"))]
pub mod contract {
    use super::*;

    pub fn msg(body: &'static str) -> StoredMessage {
        StoredMessage {
            exchange: Bytes::from_static(b"ex"),
            routing_key: Bytes::from_static(b"rk"),
            header: Bytes::from_static(b"\x00\x3c\x00\x00"),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    /// One batch is applied in order: a message removed from a queue and the
    /// queue then dropped in the same batch is released once, not twice (a
    /// body shared with another queue stays); entries written and dropped in
    /// the same batch free their body; a removal after a drop in the same
    /// batch releases nothing more.
    pub fn batch_order(s: &dyn MessageStore, bodies: &dyn Fn() -> usize) {
        let put = |id, refs| MessageOp::PutMessage {
            id,
            refs,
            message: msg("b"),
        };
        let enq = |queue, seq, id| MessageOp::Enqueue {
            queue,
            seq,
            id,
            meta: EntryMeta::default(),
        };
        s.apply(&[put(20, 2), enq(21, 1, 20), enq(22, 1, 20)])
            .unwrap();
        // Removed from 21, then 21 dropped: 22 still holds the body.
        s.apply(&[
            MessageOp::Remove {
                queue: 21,
                seq: 1,
                id: 20,
            },
            MessageOp::DropQueue { queue: 21 },
        ])
        .unwrap();
        assert_eq!(bodies(), 1, "the body 22 holds is kept");
        let r = s.read(22, 0, 10).unwrap();
        assert_eq!(r.len(), 1, "queue 22's message is readable");
        // The same with a range removal (a purge).
        s.apply(&[put(30, 2), enq(31, 1, 30), enq(32, 1, 30)])
            .unwrap();
        s.apply(&[
            MessageOp::Remove {
                queue: 31,
                seq: 1,
                id: 30,
            },
            MessageOp::RemoveRange {
                queue: 31,
                from: 0,
                to: 10,
            },
        ])
        .unwrap();
        assert_eq!(bodies(), 2);
        assert_eq!(s.read(32, 0, 10).unwrap().len(), 1);
        // Written and dropped in one batch: freed; a later removal of the
        // same entry in that batch releases nothing more.
        s.apply(&[
            put(40, 1),
            enq(41, 1, 40),
            MessageOp::DropQueue { queue: 41 },
            MessageOp::Remove {
                queue: 41,
                seq: 1,
                id: 40,
            },
        ])
        .unwrap();
        assert_eq!(bodies(), 2, "the dropped queue's body is freed");
        s.apply(&[
            MessageOp::DropQueue { queue: 22 },
            MessageOp::DropQueue { queue: 32 },
        ])
        .unwrap();
        assert_eq!(bodies(), 0);
    }

    /// Messages: written once, read in queue order, freed with their last entry.
    pub fn messages(s: &dyn MessageStore, bodies: &dyn Fn() -> usize) {
        s.apply(&[
            MessageOp::PutMessage {
                id: 10,
                refs: 2,
                message: msg("shared"),
            },
            MessageOp::Enqueue {
                queue: 1,
                seq: 10,
                id: 10,
                meta: EntryMeta::default(),
            },
            MessageOp::Enqueue {
                queue: 2,
                seq: 10,
                id: 10,
                meta: EntryMeta::default(),
            },
            MessageOp::PutMessage {
                id: 11,
                refs: 1,
                message: msg("one"),
            },
            MessageOp::Enqueue {
                queue: 1,
                seq: 11,
                id: 11,
                meta: EntryMeta::default(),
            },
        ])
        .unwrap();
        assert_eq!(bodies(), 2);
        assert_eq!(s.queue_ids().unwrap(), vec![1, 2]);
        assert_eq!(s.count(1).unwrap(), 2);
        assert_eq!(s.count(2).unwrap(), 1);
        assert_eq!(s.count(3).unwrap(), 0);
        let r = s.read(1, 0, 10).unwrap();
        assert_eq!(
            r.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            vec![(10, 10), (11, 11)]
        );
        assert_eq!(r[0].2, msg("shared"));
        assert_eq!(r[1].2, msg("one"));
        assert_eq!(s.read(1, 11, 10).unwrap().len(), 1);
        assert_eq!(s.read(1, 0, 1).unwrap().len(), 1);
        let m0 = EntryMeta::default();
        assert_eq!(s.read_index(1, 0, 11, 10).unwrap(), vec![(10, 10, m0)]);
        assert_eq!(
            s.read_index(1, 11, u64::MAX, 10).unwrap(),
            vec![(11, 11, m0)]
        );
        assert_eq!(
            s.bounds(1).unwrap(),
            Some(QueueBounds {
                first: 10,
                last: 11,
                count: 2
            })
        );
        assert_eq!(s.bounds(3).unwrap(), None);
        assert_eq!(s.max_message_id().unwrap(), 11);
        assert_eq!(
            s.get_messages(&[11, 99, 10]).unwrap(),
            vec![Some(msg("one")), None, Some(msg("shared"))]
        );
        s.apply(&[MessageOp::Remove {
            queue: 1,
            seq: 10,
            id: 10,
        }])
        .unwrap();
        assert_eq!(bodies(), 2, "still held by queue 2");
        s.apply(&[MessageOp::DropQueue { queue: 2 }]).unwrap();
        assert_eq!(bodies(), 1);
        assert_eq!(s.count(2).unwrap(), 0);
        s.apply(&[MessageOp::Remove {
            queue: 1,
            seq: 11,
            id: 11,
        }])
        .unwrap();
        assert_eq!(bodies(), 0);
        // Published and acked within one batch: nothing stays.
        s.apply(&[
            MessageOp::PutMessage {
                id: 12,
                refs: 1,
                message: msg("brief"),
            },
            MessageOp::Enqueue {
                queue: 1,
                seq: 12,
                id: 12,
                meta: EntryMeta::default(),
            },
            MessageOp::Remove {
                queue: 1,
                seq: 12,
                id: 12,
            },
        ])
        .unwrap();
        assert_eq!(bodies(), 0);
        assert_eq!(s.count(1).unwrap(), 0);
        // A range removal takes only its range, and frees unshared bodies.
        let mut ops = Vec::new();
        for id in 20..25 {
            ops.push(MessageOp::PutMessage {
                id,
                refs: 1,
                message: msg("r"),
            });
            ops.push(MessageOp::Enqueue {
                queue: 4,
                seq: id - 19,
                id,
                meta: EntryMeta::default(),
            });
        }
        s.apply(&ops).unwrap();
        s.apply(&[MessageOp::RemoveRange {
            queue: 4,
            from: 2,
            to: 4,
        }])
        .unwrap();
        assert_eq!(
            s.read_index(4, 0, u64::MAX, 10).unwrap(),
            vec![(1, 20, m0), (4, 23, m0), (5, 24, m0)]
        );
        assert_eq!(bodies(), 3);
        s.apply(&[MessageOp::DropQueue { queue: 4 }]).unwrap();
        assert_eq!(bodies(), 0);
    }

    /// An entry keeps its meta (enqueue time, delivery count); `SetMeta`
    /// rewrites it without touching the body's references.
    pub fn entry_meta(s: &dyn MessageStore, bodies: &dyn Fn() -> usize) {
        let meta = |deliveries| EntryMeta {
            enqueued_at: 1_765_000_000_000,
            deliveries,
        };
        s.apply(&[
            MessageOp::PutMessage {
                id: 50,
                refs: 2,
                message: msg("m"),
            },
            MessageOp::Enqueue {
                queue: 51,
                seq: 1,
                id: 50,
                meta: meta(0),
            },
            MessageOp::Enqueue {
                queue: 52,
                seq: 1,
                id: 50,
                meta: meta(0),
            },
        ])
        .unwrap();
        s.apply(&[MessageOp::SetMeta {
            queue: 51,
            seq: 1,
            id: 50,
            meta: meta(3),
        }])
        .unwrap();
        assert_eq!(s.read_index(51, 0, 9, 9).unwrap(), vec![(1, 50, meta(3))]);
        assert_eq!(s.read_index(52, 0, 9, 9).unwrap(), vec![(1, 50, meta(0))]);
        s.apply(&[MessageOp::DropQueue { queue: 51 }]).unwrap();
        assert_eq!(bodies(), 1, "the set did not add a reference");
        s.apply(&[MessageOp::DropQueue { queue: 52 }]).unwrap();
        assert_eq!(bodies(), 0);
    }

    /// Deduplication keys: put, overwritten, deleted (also only while they
    /// hold a value), scopes apart and dropped whole.
    pub fn dedup(s: &dyn MessageStore) {
        let b = |v: &'static str| Bytes::from_static(v.as_bytes());
        let put = |scope, key, value| MessageOp::DedupPut {
            scope: b(scope),
            key: b(key),
            value,
        };
        s.apply(&[put("x", "k1", 1), put("x", "k2", 2), put("xy", "k1", 3)])
            .unwrap();
        s.apply(&[
            put("x", "k1", 4),
            MessageOp::DedupDelete {
                scope: b("x"),
                key: b("k1"),
                if_value: Some(1),
            },
        ])
        .unwrap();
        let mut got = s.load_dedup(b"x").unwrap();
        got.sort();
        assert_eq!(got, vec![(b("k1"), 4), (b("k2"), 2)], "the later put stays");
        s.apply(&[
            put("x", "k3", 5),
            MessageOp::DedupDelete {
                scope: b("x"),
                key: b("k3"),
                if_value: Some(5),
            },
            MessageOp::DedupDelete {
                scope: b("x"),
                key: b("k2"),
                if_value: None,
            },
        ])
        .unwrap();
        assert_eq!(s.load_dedup(b"x").unwrap(), vec![(b("k1"), 4)]);
        assert_eq!(s.load_dedup(b"xy").unwrap(), vec![(b("k1"), 3)]);
        s.apply(&[MessageOp::DedupDropScope { scope: b("x") }])
            .unwrap();
        assert!(s.load_dedup(b"x").unwrap().is_empty());
        assert_eq!(s.load_dedup(b"xy").unwrap().len(), 1, "another scope stays");
    }

    /// Delayed entries: read in due order (then id) whatever the write
    /// order, from a cursor; a removal frees the body.
    pub fn delayed(s: &dyn MessageStore, bodies: &dyn Fn() -> usize) {
        let t = |v: &'static str| Bytes::from_static(v.as_bytes());
        let mut ops = Vec::new();
        for (due, id) in [(300u64, 61u64), (100, 62), (200, 63), (100, 60)] {
            ops.push(MessageOp::PutMessage {
                id,
                refs: 1,
                message: msg("d"),
            });
            ops.push(MessageOp::PutDelayed {
                due,
                id,
                target: t("x"),
            });
        }
        s.apply(&ops).unwrap();
        let all = s.read_delayed(None, 10).unwrap();
        let keys: Vec<(u64, u64)> = all.iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(keys, vec![(100, 60), (100, 62), (200, 63), (300, 61)]);
        assert_eq!(all[0].2, t("x"));
        let next: Vec<(u64, u64)> = s
            .read_delayed(Some((100, 62)), 1)
            .unwrap()
            .iter()
            .map(|e| (e.0, e.1))
            .collect();
        assert_eq!(next, vec![(200, 63)]);
        assert_eq!(bodies(), 4);
        s.apply(&[
            MessageOp::RemoveDelayed { due: 100, id: 60 },
            MessageOp::RemoveDelayed { due: 300, id: 61 },
        ])
        .unwrap();
        assert_eq!(bodies(), 2, "bodies go with their entries");
        assert_eq!(s.read_delayed(None, 10).unwrap().len(), 2);
        s.apply(&[
            MessageOp::RemoveDelayed { due: 100, id: 62 },
            MessageOp::RemoveDelayed { due: 200, id: 63 },
        ])
        .unwrap();
        assert_eq!(bodies(), 0);
    }

    /// Streams: appended records read back from any offset; bounds; the
    /// sparse time index gives a start at or before a timestamp; retention
    /// removes a prefix (and its index entries); streams are apart.
    pub fn streams(s: &dyn MessageStore) {
        // A chunk of records from `first` on, at these timestamps; an
        // index entry for each record whose flag is set.
        let append = |stream, first: u64, recs: &[(u64, bool)]| {
            let mut c = chunk::ChunkWriter::new(first, 0);
            let mut times = Vec::new();
            for (i, &(ts, index_time)) in recs.iter().enumerate() {
                c.push(ts, &msg("s"));
                if index_time {
                    times.push((ts, first + i as u64));
                }
            }
            MessageOp::StreamChunk {
                stream,
                first,
                records: Bytes::from(c.finish()),
                times,
            }
        };
        assert_eq!(s.stream_bounds(7).unwrap(), None);
        assert_eq!(s.stream_seek_time(7, 0).unwrap(), None);
        // Offsets 0..10 at 1000, 1000, 1000, 2000, 2000, ... (index entry at
        // the first record of each second).
        // Two chunks of stream 7 in one batch (an engine may join them),
        // then one of stream 8.
        let recs: Vec<(u64, bool)> = (0..10u64)
            .map(|o| (1000 * (1 + o / 3), o % 3 == 0))
            .collect();
        s.apply(&[
            append(7, 0, &recs[..4]),
            append(7, 4, &recs[4..]),
            append(8, 0, &[(5000, true)]),
        ])
        .unwrap();
        assert_eq!(s.stream_bounds(7).unwrap(), Some((0, 9)));
        let r = s.read_stream(7, 4, 3).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.offset, r.timestamp))
                .collect::<Vec<_>>(),
            vec![(4, 2000), (5, 2000), (6, 3000)]
        );
        assert_eq!(r[0].message, msg("s"));
        assert_eq!(
            s.read_stream(7, 9, 10).unwrap().len(),
            1,
            "not into stream 8"
        );
        assert_eq!(s.stream_seek_time(7, 2500).unwrap(), Some(3));
        assert_eq!(s.stream_seek_time(7, 3000).unwrap(), Some(6));
        assert_eq!(s.stream_seek_time(7, 999_999).unwrap(), Some(9));
        assert_eq!(
            s.stream_seek_time(7, 10).unwrap(),
            Some(0),
            "before all: the first"
        );
        // Retention: offsets below 5 go, with the index entries before them.
        s.apply(&[MessageOp::StreamTruncate {
            stream: 7,
            before: 5,
        }])
        .unwrap();
        assert_eq!(s.stream_bounds(7).unwrap(), Some((5, 9)));
        assert_eq!(s.stream_seek_time(7, 1500).unwrap(), Some(5));
        assert_eq!(s.read_stream(7, 0, 2).unwrap()[0].offset, 5);
        // Appends in several batches (an engine may keep each batch's run
        // together): reads cross them, a cut inside one keeps the rest.
        for batch in 0..4u64 {
            let recs: Vec<(u64, bool)> = (0..5u64).map(|i| (9000 + batch, i == 0)).collect();
            s.apply(&[append(7, 10 + batch * 5, &recs)]).unwrap();
        }
        assert_eq!(s.stream_bounds(7).unwrap(), Some((5, 29)));
        let offsets = |from, limit| -> Vec<u64> {
            s.read_stream(7, from, limit)
                .unwrap()
                .iter()
                .map(|r| r.offset)
                .collect()
        };
        assert_eq!(offsets(12, 6), (12..18).collect::<Vec<_>>());
        assert_eq!(offsets(28, 10), vec![28, 29]);
        assert_eq!(offsets(30, 10), Vec::<u64>::new());
        s.apply(&[MessageOp::StreamTruncate {
            stream: 7,
            before: 17,
        }])
        .unwrap();
        assert_eq!(s.stream_bounds(7).unwrap(), Some((17, 29)));
        assert_eq!(offsets(0, 4), vec![17, 18, 19, 20]);
        assert_eq!(s.read_stream(7, 17, 1).unwrap()[0].timestamp, 9001);
        assert_eq!(s.stream_seek_time(7, 9002).unwrap(), Some(20));
        assert_eq!(s.stream_seek_time(7, 0).unwrap(), Some(17));
        // A later append continues after a cut.
        s.apply(&[append(7, 30, &[(9999, false)])]).unwrap();
        assert_eq!(s.stream_bounds(7).unwrap(), Some((17, 30)));
        assert_eq!(s.stream_ids().unwrap(), vec![7, 8]);
        s.apply(&[MessageOp::StreamDrop { stream: 7 }]).unwrap();
        assert_eq!(s.stream_bounds(7).unwrap(), None);
        assert_eq!(s.stream_ids().unwrap(), vec![8]);
        assert_eq!(
            s.stream_bounds(8).unwrap(),
            Some((0, 0)),
            "another stream stays"
        );
    }

    /// Raft logs: empty state; entries appended (and replaced), read by
    /// range; truncation of a suffix, purge of a prefix with its marker;
    /// vote and committed id replaced and read; two groups apart.
    pub fn raft_log(s: &dyn RaftLogStore) {
        let b = |v: &str| Bytes::copy_from_slice(v.as_bytes());
        let entry = |g: u64, i: u64| (i, format!("g{g}e{i}").into_bytes());
        for g in [0, 1] {
            assert_eq!(s.read_vote(g).unwrap(), None);
            assert_eq!(s.read_committed(g).unwrap(), None);
            assert_eq!(s.read_last_purged(g).unwrap(), None);
            assert_eq!(s.last_entry(g).unwrap(), None);
            assert!(s.entries(g, 0, u64::MAX).unwrap().is_empty());
        }
        // Group 1 sits between entries of group 0 and of group 2 in any
        // ordered layout: its operations must not reach them.
        for g in [0, 1, 2] {
            let es: Vec<_> = (1..=5).map(|i| entry(g, i)).collect();
            s.append(g, &es).unwrap();
        }
        let indexes = |g, from, to| -> Vec<u64> {
            s.entries(g, from, to)
                .unwrap()
                .into_iter()
                .map(|e| e.0)
                .collect()
        };
        assert_eq!(indexes(1, 0, u64::MAX), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            s.entries(1, 2, 4).unwrap(),
            vec![(2, b("g1e2")), (3, b("g1e3"))]
        );
        assert!(s.entries(1, 4, 4).unwrap().is_empty());
        assert_eq!(s.last_entry(1).unwrap(), Some((5, b("g1e5"))));
        // A replacement at an existing index, and appends continuing.
        s.append(1, &[(5, b"new5".to_vec()), (6, b"new6".to_vec())])
            .unwrap();
        assert_eq!(
            s.entries(1, 5, 7).unwrap(),
            vec![(5, b("new5")), (6, b("new6"))]
        );
        // Truncate a suffix.
        s.truncate(1, 4).unwrap();
        assert_eq!(indexes(1, 0, u64::MAX), vec![1, 2, 3]);
        assert_eq!(s.last_entry(1).unwrap(), Some((3, b("g1e3"))));
        // Purge a prefix; the marker is kept.
        s.purge(1, 2, b"purged-2").unwrap();
        assert_eq!(indexes(1, 0, u64::MAX), vec![3]);
        assert_eq!(s.read_last_purged(1).unwrap(), Some(b("purged-2")));
        // Purge everything: no entry left, the marker stays.
        s.purge(1, 3, b"purged-3").unwrap();
        assert_eq!(s.last_entry(1).unwrap(), None);
        assert_eq!(s.read_last_purged(1).unwrap(), Some(b("purged-3")));
        s.append(1, &[entry(1, 4)]).unwrap();
        assert_eq!(s.last_entry(1).unwrap(), Some((4, b("g1e4"))));
        s.truncate(1, 0).unwrap();
        assert_eq!(s.last_entry(1).unwrap(), None);
        // Vote and committed; a reset keeps the vote alone.
        s.append(1, &[entry(1, 7)]).unwrap();
        s.save_vote(1, b"vote-a").unwrap();
        s.save_committed(1, Some(b"c-0")).unwrap();
        // A snapshot is replaced whole, and goes with a reset.
        assert_eq!(s.read_snapshot(1).unwrap(), None);
        s.save_snapshot(1, b"snap-a").unwrap();
        s.save_snapshot(1, b"snap-b").unwrap();
        assert_eq!(s.read_snapshot(1).unwrap(), Some(b("snap-b")));
        s.purge(1, 7, b"purged-7").unwrap();
        assert_eq!(s.read_snapshot(1).unwrap(), Some(b("snap-b")));
        s.reset_log(1).unwrap();
        assert_eq!(s.read_snapshot(1).unwrap(), None);
        assert_eq!(s.last_entry(1).unwrap(), None);
        assert_eq!(s.read_last_purged(1).unwrap(), None);
        assert_eq!(s.read_committed(1).unwrap(), None);
        assert_eq!(s.read_vote(1).unwrap(), Some(b("vote-a")));
        s.save_vote(1, b"vote-b").unwrap();
        assert_eq!(s.read_vote(1).unwrap(), Some(b("vote-b")));
        s.save_committed(1, Some(b"c-1")).unwrap();
        assert_eq!(s.read_committed(1).unwrap(), Some(b("c-1")));
        s.save_committed(1, None).unwrap();
        assert_eq!(s.read_committed(1).unwrap(), None);
        s.save_committed(1, Some(b"c-2")).unwrap();
        // Forgetting the group takes everything, the vote too.
        s.append(1, &[entry(1, 9)]).unwrap();
        s.save_snapshot(1, b"snap").unwrap();
        s.forget_group(1).unwrap();
        assert_eq!(s.read_vote(1).unwrap(), None);
        assert_eq!(s.read_committed(1).unwrap(), None);
        assert_eq!(s.read_snapshot(1).unwrap(), None);
        assert_eq!(s.last_entry(1).unwrap(), None);
        // The neighbours kept everything.
        for g in [0, 2] {
            assert_eq!(indexes(g, 0, u64::MAX), vec![1, 2, 3, 4, 5], "group {g}");
            assert_eq!(s.last_entry(g).unwrap(), Some((5, b(&format!("g{g}e5")))));
            assert_eq!(s.read_vote(g).unwrap(), None);
            assert_eq!(s.read_committed(g).unwrap(), None);
            assert_eq!(s.read_last_purged(g).unwrap(), None);
            assert_eq!(s.read_snapshot(g).unwrap(), None);
        }
        // The largest group and index are usable.
        s.append(u64::MAX, &[(u64::MAX, b"last".to_vec())]).unwrap();
        assert_eq!(s.last_entry(u64::MAX).unwrap(), Some((u64::MAX, b("last"))));
        s.purge(u64::MAX, u64::MAX, b"all").unwrap();
        assert_eq!(s.last_entry(u64::MAX).unwrap(), None);
        assert_eq!(s.last_entry(2).unwrap(), Some((5, b("g2e5"))));
    }

    fn binding(source: &str, dest: &str, to_queue: bool) -> BindingDef {
        BindingDef {
            vhost: "/".into(),
            source: source.into(),
            destination: dest.into(),
            to_queue,
            routing_key: "k".into(),
            arguments: Bytes::from_static(b"\x00\x00\x00\x00"),
        }
    }

    fn exchange(name: &str) -> ExchangeDef {
        ExchangeDef {
            vhost: "/".into(),
            name: name.into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: true,
            arguments: Bytes::new(),
        }
    }

    fn queue(name: &str, id: QueueId) -> QueueDef {
        QueueDef {
            vhost: "/".into(),
            name: name.into(),
            id,
            auto_delete: false,
            arguments: Bytes::from_static(b"x"),
        }
    }

    fn sorted(mut d: Definitions) -> Definitions {
        d.exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        d.queues.sort_by(|a, b| a.name.cmp(&b.name));
        d.bindings.sort();
        d
    }

    /// Definitions: stored, replaced, and deleted with their bindings.
    pub fn definitions(s: &dyn MetaStore) {
        s.put_exchange(&exchange("e1")).unwrap();
        s.put_exchange(&exchange("e2")).unwrap();
        s.put_queue(&queue("q1", 1)).unwrap();
        s.put_queue(&queue("q\0odd", 2)).unwrap();
        for b in [
            binding("e1", "q1", true),
            binding("e1", "e2", false),
            binding("e2", "q\0odd", true),
        ] {
            s.put_binding(&b).unwrap();
            s.put_binding(&b).unwrap();
        }
        let d = sorted(s.load().unwrap());
        assert_eq!(d.exchanges, vec![exchange("e1"), exchange("e2")]);
        assert_eq!(d.queues, vec![queue("q\0odd", 2), queue("q1", 1)]);
        assert_eq!(d.bindings.len(), 3);
        s.delete_queue("/", "q1").unwrap();
        let d = sorted(s.load().unwrap());
        assert_eq!(d.queues, vec![queue("q\0odd", 2)]);
        assert_eq!(
            d.bindings,
            sorted(Definitions {
                bindings: vec![binding("e1", "e2", false), binding("e2", "q\0odd", true)],
                ..Default::default()
            })
            .bindings
        );
        s.delete_exchange("/", "e2").unwrap();
        let d = s.load().unwrap();
        assert_eq!(d.exchanges, vec![exchange("e1")]);
        assert!(
            d.bindings.is_empty(),
            "bindings from and to e2 went with it: {:?}",
            d.bindings
        );
        s.delete_binding(&binding("e1", "q1", true)).unwrap();
    }

    /// Records: put, overwrite, delete, in batches applied in order; keys
    /// of different kinds do not collide, and any byte may be in a key.
    pub fn records(s: &dyn MetaStore) {
        let put = |kind: &str, key: &str, v: &'static str| {
            RecordOp::Put(Record {
                kind: kind.into(),
                key: key.into(),
                value: Bytes::from_static(v.as_bytes()),
            })
        };
        let del = |kind: &str, key: &str| RecordOp::Delete {
            kind: kind.into(),
            key: key.into(),
        };
        assert!(s.load_records().unwrap().is_empty());
        s.apply_records(&[put("user", "a", "1"), put("user", "b\0x", "2")])
            .unwrap();
        s.apply_records(&[put("vhost", "a", "3"), put("user", "a", "4")])
            .unwrap();
        // In order within a batch: the put after the delete stays.
        s.apply_records(&[
            put("perm", "k", "5"),
            del("perm", "k"),
            put("perm", "k", "6"),
        ])
        .unwrap();
        s.apply_records(&[del("user", "b\0x"), del("user", "missing")])
            .unwrap();
        let got: Vec<(String, String, Bytes)> = s
            .load_records()
            .unwrap()
            .into_iter()
            .map(|r| (r.kind, r.key, r.value))
            .collect();
        let want = |k: &str, key: &str, v: &'static str| {
            (
                k.to_owned(),
                key.to_owned(),
                Bytes::from_static(v.as_bytes()),
            )
        };
        assert_eq!(
            got,
            vec![
                want("perm", "k", "6"),
                want("user", "a", "4"),
                want("vhost", "a", "3")
            ]
        );
    }

    /// State for a reopen test: definitions and a body shared by two queues.
    pub fn fill<S: MetaStore + MessageStore>(s: &S) {
        s.put_exchange(&exchange("e1")).unwrap();
        s.put_queue(&queue("q1", 1)).unwrap();
        s.put_binding(&binding("e1", "q1", true)).unwrap();
        s.apply(&[
            MessageOp::PutMessage {
                id: 5,
                refs: 2,
                message: msg("shared"),
            },
            MessageOp::Enqueue {
                queue: 1,
                seq: 5,
                id: 5,
                meta: EntryMeta::default(),
            },
            MessageOp::Enqueue {
                queue: 2,
                seq: 5,
                id: 5,
                meta: EntryMeta::default(),
            },
        ])
        .unwrap();
    }

    pub fn check_filled<S: MetaStore + MessageStore>(s: &S, bodies: &dyn Fn() -> usize) {
        let d = s.load().unwrap();
        assert_eq!(d.exchanges, vec![exchange("e1")]);
        assert_eq!(d.queues, vec![queue("q1", 1)]);
        assert_eq!(d.bindings, vec![binding("e1", "q1", true)]);
        assert_eq!(s.read(1, 0, 10).unwrap()[0].2, msg("shared"));
        s.apply(&[MessageOp::Remove {
            queue: 1,
            seq: 5,
            id: 5,
        }])
        .unwrap();
        assert_eq!(bodies(), 1, "the shared count survived the reopen");
        s.apply(&[MessageOp::Remove {
            queue: 2,
            seq: 5,
            id: 5,
        }])
        .unwrap();
        assert_eq!(bodies(), 0);
    }
}
