//! Warren's RocksDB engine: implements `warren_storage`'s traits. The only
//! crate that depends on RocksDB; the broker opens it at start-up and
//! otherwise sees the traits.
//!
//! Column families:
//! - `meta`: durable definitions, keyed `kind ‖ part ‖ part ...` (each part
//!   length-prefixed, so names may hold any byte), plus the format version,
//!   and the broker's records (users, vhosts, permissions...) under `r`.
//! - `messages`: message id (big-endian) → the message, written once however
//!   many queues hold it.
//! - `index`: `queue id ‖ sequence` (big-endian, [`warren_storage::keys`]) → message
//!   id and the entry's meta (enqueue time, delivery count; stores written
//!   before it hold the id alone, and are read as they are), so a queue's
//!   entries iterate in order.
//! - `refs`: message id → remaining references, only for bodies held by more
//!   than one queue.
//! - `dedup`: `scope length ‖ scope ‖ key` → value (8 bytes): the
//!   deduplication keys of exchanges and queues.
//! - `delayed`: `due ‖ message id` (big-endian, so iteration is due order)
//!   → target: delayed messages (their bodies in `messages`).
//! - `stream`: `stream ‖ first offset` → a chunk: the records with
//!   consecutive offsets that one batch appended (`count`, then each
//!   record's `timestamp ‖ length ‖ message`), so a busy stream costs one
//!   put per batch, not per message. Retention that cuts a chunk rewrites
//!   its kept part under its new first offset, so a chunk key is always
//!   the offset of its first record.
//! - `stream-time`: `stream ‖ timestamp ‖ offset` → nothing: a sparse
//!   index from time to offset (one entry per second of appends).
//! - `raft`: the state of Raft groups, keyed `group ‖ kind` (vote,
//!   committed id, last purged id) or `group ‖ kind ‖ index` (log
//!   entries), big-endian, so a group's entries are contiguous and in index
//!   order and a range delete truncates or purges them.
//!
//! A body shared by several queues is freed with its last index entry. The
//! shared counts live in memory and in `refs`, written in the same batch as
//! the change, and read back at open: opening never reads a body or scans
//! the index. Every `apply` is one atomic `WriteBatch`, synced to the WAL
//! when `sync` is on.

use bytes::Bytes;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use warren_storage::chunk::{self, ChunkWriter};
use warren_storage::codec::{Reader, Writer};
use warren_storage::*;

/// RocksDB's memory budget unless told otherwise: 64 MiB of memtables and
/// a 32 MiB block cache.
pub const DEFAULT_MEMORY: u64 = 96 << 20;
/// The smallest budget it is given.
const MIN_MEMORY: u64 = 12 << 20;

const META: &str = "meta";
const MESSAGES: &str = "messages";
const INDEX: &str = "index";
const REFS: &str = "refs";
const DEDUP: &str = "dedup";
const DELAYED: &str = "delayed";
const STREAM: &str = "stream";
const STREAM_TIME: &str = "stream-time";
const RAFT: &str = "raft";
/// Present once the `refs` family holds every shared count.
const REFS_READY_KEY: &[u8] = b"\x00refs-ready";
const FORMAT_KEY: &[u8] = b"\x00format";
/// Bumped whenever the stored layout changes incompatibly.
pub const FORMAT: &str = "warren-store-1";

const EXCHANGE: u8 = b'x';
const QUEUE: u8 = b'q';
const BINDING: u8 = b'b';
const RECORD: u8 = b'r';

/// Kinds of keys in `raft`, after the group. Entries sort between the
/// single values, and `RAFT_ENTRY + 1` bounds them; the vote sorts last, so
/// `[RAFT_COMMITTED, RAFT_VOTE)` is everything but the vote.
const RAFT_COMMITTED: u8 = b'c';
const RAFT_ENTRY: u8 = b'e';
const RAFT_PURGED: u8 = b'p';
const RAFT_SNAPSHOT: u8 = b's';
const RAFT_VOTE: u8 = b'v';

/// `group ‖ kind`: a group's single value, or the end of its entries.
fn raft_key(group: RaftGroup, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(kind);
    k
}

/// `group ‖ RAFT_ENTRY ‖ index`.
fn raft_entry_key(group: RaftGroup, index: u64) -> Vec<u8> {
    let mut k = raft_key(group, RAFT_ENTRY);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The exclusive end of the entries with index <= `upto`.
fn raft_entries_end(group: RaftGroup, upto: u64) -> Vec<u8> {
    match upto.checked_add(1) {
        Some(next) => raft_entry_key(group, next),
        None => raft_key(group, RAFT_ENTRY + 1),
    }
}

fn parse_raft_entry_key(group: RaftGroup, k: &[u8]) -> Result<u64> {
    match k.split_at_checked(9) {
        Some((head, index)) if head == raft_key(group, RAFT_ENTRY).as_slice() => index
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("malformed raft entry key".into())),
        _ => Err(StoreError::Corrupt("malformed raft entry key".into())),
    }
}

pub struct RocksStore {
    db: DB,
    /// Sync the WAL on every write (off only for benchmarks).
    sync: bool,
    /// Remaining references of bodies held by more than one queue.
    shared: Mutex<HashMap<MessageId, u32>>,
    path: String,
}

fn io(e: rocksdb::Error) -> StoreError {
    StoreError::Io(e.into_string())
}

fn key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![kind];
    for p in parts {
        k.extend_from_slice(&(p.len() as u32).to_be_bytes());
        k.extend_from_slice(p);
    }
    k
}

fn binding_key(b: &BindingDef) -> Vec<u8> {
    key(
        BINDING,
        &[
            b.vhost.as_bytes(),
            b.source.as_bytes(),
            b.destination.as_bytes(),
            &[b.to_queue as u8],
            b.routing_key.as_bytes(),
            &b.arguments,
        ],
    )
}

fn encode_message(m: &StoredMessage) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(&m.exchange)
        .bytes(&m.routing_key)
        .bytes(&m.header)
        .bytes(&m.body);
    w.0
}

/// Decode a stored message; its parts are slices of the one value buffer.
fn decode_message(v: Vec<u8>) -> Result<StoredMessage> {
    chunk::decode_message(Bytes::from(v))
}

/// Stream chunks of one stream with consecutive offsets, joined into one
/// value while they stay within the chunk limits.
#[derive(Default)]
struct ChunkRun {
    stream: QueueId,
    first: u64,
    next: u64,
    records: u64,
    bytes: usize,
    parts: Vec<Bytes>,
}

impl ChunkRun {
    /// Add a chunk; returns the run it ends, if it cannot join it.
    fn add(&mut self, stream: QueueId, first: u64, v: &Bytes) -> Option<([u8; 16], Bytes)> {
        let n = chunk::count(v);
        let joins = !self.parts.is_empty()
            && self.stream == stream
            && self.next == first
            && self.records + n <= chunk::CHUNK_RECORDS as u64
            && self.bytes + v.len() <= chunk::CHUNK_BYTES;
        let ended = match joins {
            true => None,
            false => self.take(),
        };
        if self.parts.is_empty() {
            (self.stream, self.first, self.records, self.bytes) = (stream, first, 0, 0);
        }
        self.next = first + n;
        self.records += n;
        self.bytes += v.len();
        self.parts.push(v.clone());
        ended
    }

    /// The run's key and value, if it has any records (a chunk alone is
    /// written as it is, without a copy).
    fn take(&mut self) -> Option<([u8; 16], Bytes)> {
        let v = match self.parts.len() {
            0 => return None,
            1 => self.parts[0].clone(),
            _ => {
                let parts: Vec<&[u8]> = self.parts.iter().map(|p| &p[..]).collect();
                Bytes::from(chunk::join(&parts))
            }
        };
        self.parts.clear();
        Some((keys::queue_entry(self.stream, self.first), v))
    }
}

/// A stream's time index key: `stream ‖ timestamp ‖ offset`.
fn stream_time_key(stream: QueueId, timestamp: u64, offset: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&stream.to_be_bytes());
    k[8..16].copy_from_slice(&timestamp.to_be_bytes());
    k[16..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// A delayed message's key: `due ‖ id`, big-endian (due order).
fn delayed_key(due: u64, id: MessageId) -> [u8; 16] {
    keys::queue_entry(due, id)
}

/// A deduplication key: `scope length ‖ scope ‖ key`, so one scope's keys
/// are contiguous and no scope is a prefix of another's.
fn dedup_key(scope: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + scope.len() + key.len());
    k.extend_from_slice(&(scope.len() as u32).to_be_bytes());
    k.extend_from_slice(scope);
    k.extend_from_slice(key);
    k
}

/// The smallest byte string greater than every string starting with
/// `prefix` (None if there is none: all 0xff).
fn next_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

fn id_value(v: &[u8]) -> Result<MessageId> {
    let a: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("key is not a message id".into()))?;
    Ok(u64::from_be_bytes(a))
}

fn entry_value(v: &[u8]) -> Result<(MessageId, EntryMeta)> {
    keys::parse_entry_value(v)
        .ok_or_else(|| StoreError::Corrupt("index value is not a message id and meta".into()))
}

/// Index entries changed by the batch being built (see `apply`).
#[derive(Default)]
struct BatchIndex {
    /// The batch has a range removal: entries are tracked.
    track: bool,
    /// `(queue, seq)` written (`Some(id)`) or removed (`None`) in the batch.
    entries: HashMap<(QueueId, u64), Option<MessageId>>,
    /// `(queue, first, end)` ranges removed in the batch, `end` exclusive
    /// (`u64::MAX`: the whole queue).
    ranges: Vec<(QueueId, u64, u64)>,
}

impl BatchIndex {
    fn removed_by_range(&self, queue: QueueId, seq: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(q, first, end)| q == queue && seq >= first && (seq < end || end == u64::MAX))
    }
}

impl RocksStore {
    /// Open (or create) the store in `dir`. Fails clearly if another process
    /// holds it, if it is unreadable, or if it was written by an incompatible
    /// version.
    pub fn open(dir: &Path, sync: bool) -> Result<RocksStore> {
        RocksStore::open_with_memory(dir, sync, DEFAULT_MEMORY)
    }

    /// [`RocksStore::open`] with RocksDB's memory held to about `memory`
    /// bytes: two thirds for memtables (shared by the families in
    /// proportion), one third for the block cache.
    pub fn open_with_memory(dir: &Path, sync: bool, memory: u64) -> Result<RocksStore> {
        let memory = memory.clamp(MIN_MEMORY, DEFAULT_MEMORY) as usize;
        let memtables = memory / 3 * 2;
        let path = dir.display().to_string();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Bounded memory: memtables of all families together stay under
        // two thirds of the budget (64 MiB by default), and one block cache
        // of the rest (32 MiB) serves every family.
        opts.set_db_write_buffer_size(memtables);
        // Rarely written families (definitions, shared counts) would keep
        // old WAL files alive, and a restart after a crash would replay them
        // all: past this size, the families holding the oldest WAL flush.
        opts.set_max_total_wal_size(128 << 20);
        // Write-ahead log files are reused once their memtables are
        // flushed: a write into blocks a file already has needs less
        // metadata than one that grows it, so its sync is shorter. Recovery
        // stops at the first record of an earlier use of a file (RocksDB
        // marks the records of each use).
        opts.set_recycle_log_file_num(4);
        // Recovery replays the WAL into memtables and writes no table file:
        // a broker that stopped on a full disk can start again (and drain).
        // (The Rust binding has no setter for it: an options string.)
        let opts = opts
            .get_options_from_string("avoid_flush_during_recovery=true")
            .map_err(|e| StoreError::Io(format!("rocksdb options: {e}")))?;
        let cache = rocksdb::Cache::new_lru_cache(memory - memtables);
        let family = |write_buffer: usize| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_write_buffer_size(write_buffer);
            let mut t = rocksdb::BlockBasedOptions::default();
            t.set_block_cache(&cache);
            o.set_block_based_table_factory(&t);
            o
        };
        // Per family, in proportion: 4, 32, 16 and 4 MiB of 64 by default.
        let share = |parts: usize| (memtables / 16 * parts).max(1 << 20);
        let cfs = [
            (META, share(1)),
            (MESSAGES, share(8)),
            (INDEX, share(4)),
            (REFS, share(1)),
            (DEDUP, share(1)),
            (DELAYED, share(1)),
            (STREAM, share(4)),
            (STREAM_TIME, share(1)),
            (RAFT, share(1)),
        ]
        .map(|(n, wb)| ColumnFamilyDescriptor::new(n, family(wb)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            let text = e.into_string();
            if text.contains("lock") || text.contains("LOCK") {
                StoreError::Locked(path.clone())
            } else {
                StoreError::Io(format!("cannot open {path}: {text}"))
            }
        })?;
        let store = RocksStore {
            db,
            sync,
            shared: Mutex::new(HashMap::new()),
            path,
        };
        store.check_format()?;
        store.rebuild_shared()?;
        Ok(store)
    }

    fn raft_get(&self, k: Vec<u8>) -> Result<Option<Bytes>> {
        Ok(self
            .db
            .get_cf(self.cf(RAFT), k)
            .map_err(io)?
            .map(Bytes::from))
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // The three families are created at open; their absence is impossible.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The chunk of `stream` that holds `offset` (its first offset and
    /// value), if any.
    fn stream_chunk_at(&self, stream: QueueId, offset: u64) -> Result<Option<(u64, Bytes)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::queue_entry(stream, 0));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(STREAM), ro);
        it.seek_for_prev(keys::queue_entry(stream, offset));
        let found = match (it.key().and_then(keys::parse_queue_entry), it.value()) {
            (Some((s, first)), Some(v)) if s == stream && offset < first + chunk::count(v) => {
                Some((first, Bytes::copy_from_slice(v)))
            }
            _ => None,
        };
        it.status().map_err(io)?;
        Ok(found)
    }

    /// Write `batch`, its WAL synced when the store syncs.
    fn write(&self, batch: WriteBatch) -> Result<()> {
        self.write_synced(batch, true)
    }

    /// `write`, without the WAL sync when `sync` is false.
    fn write_synced(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut w = WriteOptions::default();
        w.set_sync(sync && self.sync);
        self.db.write_opt(batch, &w).map_err(io)
    }

    fn check_format(&self) -> Result<()> {
        let meta = self.cf(META);
        match self.db.get_cf(meta, FORMAT_KEY).map_err(io)? {
            Some(v) if v == FORMAT.as_bytes() => Ok(()),
            Some(v) => Err(StoreError::Incompatible {
                path: self.path.clone(),
                found: String::from_utf8_lossy(&v).into_owned(),
                expected: FORMAT.into(),
            }),
            None => {
                let mut b = WriteBatch::default();
                b.put_cf(meta, FORMAT_KEY, FORMAT.as_bytes());
                self.write(b)
            }
        }
    }

    /// Load the remaining references of shared bodies from the `refs`
    /// family (one small entry per body held by more than one queue). A
    /// store written before that family existed is counted once from the
    /// index, and the counts are written down.
    fn rebuild_shared(&self) -> Result<()> {
        let meta = self.cf(META);
        let mut counts: HashMap<MessageId, u32> = HashMap::new();
        if self.db.get_cf(meta, REFS_READY_KEY).map_err(io)?.is_some() {
            for item in self.db.iterator_cf(self.cf(REFS), IteratorMode::Start) {
                let (k, v) = item.map_err(io)?;
                let n: [u8; 4] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a shared count is not 4 bytes".into()))?;
                counts.insert(id_value(&k)?, u32::from_be_bytes(n));
            }
        } else {
            for item in self.db.iterator_cf(self.cf(INDEX), IteratorMode::Start) {
                let (_, v) = item.map_err(io)?;
                *counts.entry(entry_value(&v)?.0).or_default() += 1;
            }
            counts.retain(|_, n| *n > 1);
            let mut b = WriteBatch::default();
            for (id, n) in &counts {
                b.put_cf(self.cf(REFS), id.to_be_bytes(), n.to_be_bytes());
            }
            b.put_cf(meta, REFS_READY_KEY, b"1");
            self.write(b)?;
        }
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = counts;
        Ok(())
    }

    fn put_meta(&self, k: Vec<u8>, v: Vec<u8>) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(META), k, v);
        self.write(b)
    }

    /// Delete the bindings of `vhost` for which `doomed` holds.
    fn delete_bindings_where(
        &self,
        b: &mut WriteBatch,
        vhost: &str,
        doomed: impl Fn(&BindingDef) -> bool,
    ) -> Result<()> {
        let prefix = key(BINDING, &[vhost.as_bytes()]);
        let meta = self.cf(META);
        for item in self
            .db
            .iterator_cf(meta, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(io)?;
            if !k.starts_with(&prefix) {
                break;
            }
            if doomed(&decode_binding(&v)?) {
                b.delete_cf(meta, k);
            }
        }
        Ok(())
    }

    /// Stored message bodies (tests and diagnostics).
    pub fn body_count(&self) -> usize {
        self.db
            .iterator_cf(self.cf(MESSAGES), IteratorMode::Start)
            .count()
    }
}

fn encode_binding(b: &BindingDef) -> Vec<u8> {
    let mut w = Writer::default();
    w.str(&b.vhost)
        .str(&b.source)
        .str(&b.destination)
        .u8(b.to_queue as u8)
        .str(&b.routing_key)
        .bytes(&b.arguments);
    w.0
}

fn decode_binding(v: &[u8]) -> Result<BindingDef> {
    let mut r = Reader(v);
    Ok(BindingDef {
        vhost: r.string()?,
        source: r.string()?,
        destination: r.string()?,
        to_queue: r.u8()? != 0,
        routing_key: r.string()?,
        arguments: Bytes::copy_from_slice(r.bytes()?),
    })
}

impl MetaStore for RocksStore {
    fn apply_records(&self, ops: &[RecordOp]) -> Result<()> {
        let meta = self.cf(META);
        let mut b = WriteBatch::default();
        for op in ops {
            match op {
                RecordOp::Put(r) => {
                    let mut w = Writer::default();
                    w.str(&r.kind).str(&r.key).bytes(&r.value);
                    b.put_cf(
                        meta,
                        key(RECORD, &[r.kind.as_bytes(), r.key.as_bytes()]),
                        w.0,
                    );
                }
                RecordOp::Delete { kind, key: k } => {
                    b.delete_cf(meta, key(RECORD, &[kind.as_bytes(), k.as_bytes()]));
                }
            }
        }
        self.write(b)
    }

    fn load_records(&self) -> Result<Vec<Record>> {
        let meta = self.cf(META);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(meta, IteratorMode::From(&[RECORD], Direction::Forward))
        {
            let (k, v) = item.map_err(io)?;
            if k.first() != Some(&RECORD) {
                break;
            }
            let mut r = Reader(&v);
            out.push(Record {
                kind: r.string()?,
                key: r.string()?,
                value: Bytes::copy_from_slice(r.bytes()?),
            });
        }
        // Keys are length-prefixed: put them in name order.
        out.sort_by(|a, b| (&a.kind, &a.key).cmp(&(&b.kind, &b.key)));
        Ok(out)
    }

    fn put_exchange(&self, d: &ExchangeDef) -> Result<()> {
        let mut w = Writer::default();
        w.str(&d.vhost)
            .str(&d.name)
            .str(&d.kind)
            .u8(d.auto_delete as u8)
            .u8(d.internal as u8)
            .bytes(&d.arguments);
        self.put_meta(key(EXCHANGE, &[d.vhost.as_bytes(), d.name.as_bytes()]), w.0)
    }

    fn delete_exchange(&self, vhost: &str, name: &str) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(
            self.cf(META),
            key(EXCHANGE, &[vhost.as_bytes(), name.as_bytes()]),
        );
        self.delete_bindings_where(&mut b, vhost, |x| {
            x.source == name || (!x.to_queue && x.destination == name)
        })?;
        self.write(b)
    }

    fn put_queue(&self, d: &QueueDef) -> Result<()> {
        let mut w = Writer::default();
        w.str(&d.vhost)
            .str(&d.name)
            .u64(d.id)
            .u8(d.auto_delete as u8)
            .bytes(&d.arguments);
        self.put_meta(key(QUEUE, &[d.vhost.as_bytes(), d.name.as_bytes()]), w.0)
    }

    fn delete_queue(&self, vhost: &str, name: &str) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(
            self.cf(META),
            key(QUEUE, &[vhost.as_bytes(), name.as_bytes()]),
        );
        self.delete_bindings_where(&mut b, vhost, |x| x.to_queue && x.destination == name)?;
        self.write(b)
    }

    fn put_binding(&self, d: &BindingDef) -> Result<()> {
        self.put_meta(binding_key(d), encode_binding(d))
    }

    fn delete_binding(&self, d: &BindingDef) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(META), binding_key(d));
        self.write(b)
    }

    fn load(&self) -> Result<Definitions> {
        let mut d = Definitions::default();
        for item in self.db.iterator_cf(self.cf(META), IteratorMode::Start) {
            let (k, v) = item.map_err(io)?;
            let mut r = Reader(&v);
            match k.first() {
                Some(&EXCHANGE) => d.exchanges.push(ExchangeDef {
                    vhost: r.string()?,
                    name: r.string()?,
                    kind: r.string()?,
                    auto_delete: r.u8()? != 0,
                    internal: r.u8()? != 0,
                    arguments: Bytes::copy_from_slice(r.bytes()?),
                }),
                Some(&QUEUE) => d.queues.push(QueueDef {
                    vhost: r.string()?,
                    name: r.string()?,
                    id: r.u64()?,
                    auto_delete: r.u8()? != 0,
                    arguments: Bytes::copy_from_slice(r.bytes()?),
                }),
                Some(&BINDING) => d.bindings.push(decode_binding(&v)?),
                _ => {}
            }
        }
        Ok(d)
    }
}

impl RocksStore {
    /// `apply`, with the WAL synced or not.
    fn apply_ops(&self, ops: &[MessageOp], sync: bool) -> Result<()> {
        let (messages, index, refs) = (self.cf(MESSAGES), self.cf(INDEX), self.cf(REFS));
        let dedup = self.cf(DEDUP);
        // Deduplication keys this batch has written (Some) or deleted
        // (None): a conditional delete looks here before the database.
        let mut dedup_batch: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut b = WriteBatch::default();
        // Shared-count changes take effect only once the batch is written.
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts: HashMap<MessageId, u32> = HashMap::new();
        // One reference of `id` is gone: the body goes with its last one.
        let release = |b: &mut WriteBatch, counts: &mut HashMap<MessageId, u32>, id: MessageId| {
            let n = counts
                .entry(id)
                .or_insert_with(|| shared.get(&id).copied().unwrap_or(1));
            if *n <= 1 {
                b.delete_cf(messages, id.to_be_bytes());
                *n = 0;
            } else {
                *n -= 1;
            }
        };
        // What this batch has done to index entries so far: a range removal
        // iterates the database, which does not see the batch yet, so it
        // must skip entries the batch already removed (or they would be
        // released twice, and a body another queue holds deleted) and
        // release the ones the batch added.
        // (Only a batch with a range removal needs it: the common batch of
        // enqueues and removals skips the bookkeeping.)
        let mut batch = BatchIndex {
            track: ops.iter().any(|op| {
                matches!(
                    op,
                    MessageOp::RemoveRange { .. } | MessageOp::DropQueue { .. }
                )
            }),
            ..BatchIndex::default()
        };
        // Chunks of one stream with consecutive offsets are joined into one
        // value (up to the chunk limits), written when anything else comes
        // between: the broker writes a chunk per wake-up of a stream.
        let mut run = ChunkRun::default();
        let stream_cf = self.cf(STREAM);
        for op in ops {
            if let MessageOp::StreamChunk {
                stream,
                first,
                records,
                times,
            } = op
            {
                if let Some((k, v)) = run.add(*stream, *first, records) {
                    b.put_cf(stream_cf, k, v);
                }
                for &(ts, offset) in times {
                    b.put_cf(
                        self.cf(STREAM_TIME),
                        stream_time_key(*stream, ts, offset),
                        [],
                    );
                }
                continue;
            }
            if let Some((k, v)) = run.take() {
                b.put_cf(stream_cf, k, v);
            }
            match op {
                MessageOp::PutMessage { id, refs, message } => {
                    b.put_cf(messages, id.to_be_bytes(), encode_message(message));
                    counts.insert(*id, (*refs).max(1));
                }
                MessageOp::Enqueue {
                    queue,
                    seq,
                    id,
                    meta,
                } => {
                    b.put_cf(
                        index,
                        keys::queue_entry(*queue, *seq),
                        keys::entry_value(*id, *meta),
                    );
                    if batch.track {
                        batch.entries.insert((*queue, *seq), Some(*id));
                    }
                }
                MessageOp::SetMeta {
                    queue,
                    seq,
                    id,
                    meta,
                } => {
                    // Not over an entry this batch removed (the caller's
                    // guarantee, kept here where it can be checked).
                    let gone = batch.track
                        && match batch.entries.get(&(*queue, *seq)) {
                            Some(state) => state.is_none(),
                            None => batch.removed_by_range(*queue, *seq),
                        };
                    if !gone {
                        b.put_cf(
                            index,
                            keys::queue_entry(*queue, *seq),
                            keys::entry_value(*id, *meta),
                        );
                    }
                }
                MessageOp::DedupPut { scope, key, value } => {
                    let k = dedup_key(scope, key);
                    b.put_cf(dedup, &k, value.to_be_bytes());
                    dedup_batch.insert(k, Some(*value));
                }
                MessageOp::DedupDelete {
                    scope,
                    key,
                    if_value,
                } => {
                    let k = dedup_key(scope, key);
                    let current = match dedup_batch.get(&k) {
                        Some(v) => *v,
                        None => self
                            .db
                            .get_cf(dedup, &k)
                            .map_err(io)?
                            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)),
                    };
                    if if_value.is_none() || current == *if_value {
                        b.delete_cf(dedup, &k);
                        dedup_batch.insert(k, None);
                    }
                }
                MessageOp::PutDelayed { due, id, target } => {
                    b.put_cf(self.cf(DELAYED), delayed_key(*due, *id), target);
                }
                MessageOp::StreamChunk { .. } => unreachable!("handled above"),
                MessageOp::StreamTruncate { stream, before } => {
                    // The chunk holding `before`: if it starts earlier, its
                    // kept part is written again under `before`.
                    let mut kept_ts = None;
                    let mut rewrite = None;
                    if let Some((first, v)) = self.stream_chunk_at(*stream, *before)? {
                        let v_len = v.len();
                        let recs = chunk::decode_range(first, &v, first, usize::MAX)?;
                        kept_ts = recs
                            .iter()
                            .find(|r| r.offset == *before)
                            .map(|r| r.timestamp);
                        if first < *before {
                            let mut c = ChunkWriter::new(*before, v_len);
                            for r in recs.iter().filter(|r| r.offset >= *before) {
                                c.push(r.timestamp, &r.message);
                            }
                            rewrite = Some((keys::queue_entry(*stream, *before), c.finish()));
                        }
                    }
                    // The records' timestamps grow with their offsets: the
                    // index entries before the first kept record's time go
                    // (and those at that time for lower offsets).
                    let until = match kept_ts {
                        Some(ts) => stream_time_key(*stream, ts, *before),
                        // Nothing kept at `before`: the whole index goes.
                        None => stream_time_key(stream.wrapping_add(1), 0, 0),
                    };
                    b.delete_range_cf(
                        stream_cf,
                        keys::queue_entry(*stream, 0),
                        keys::queue_entry(*stream, *before),
                    );
                    if let Some((k, v)) = rewrite {
                        b.put_cf(stream_cf, k, v);
                    }
                    b.delete_range_cf(self.cf(STREAM_TIME), stream_time_key(*stream, 0, 0), until);
                }
                MessageOp::StreamDrop { stream } => {
                    let next = stream.wrapping_add(1);
                    b.delete_range_cf(
                        self.cf(STREAM),
                        keys::queue_entry(*stream, 0),
                        keys::queue_entry(next, 0),
                    );
                    b.delete_range_cf(
                        self.cf(STREAM_TIME),
                        stream_time_key(*stream, 0, 0),
                        stream_time_key(next, 0, 0),
                    );
                }
                MessageOp::RemoveDelayed { due, id } => {
                    b.delete_cf(self.cf(DELAYED), delayed_key(*due, *id));
                    release(&mut b, &mut counts, *id);
                }
                MessageOp::DedupDropScope { scope } => {
                    let from = dedup_key(scope, b"");
                    // (A prefix is never all 0xff: its length comes first.)
                    if let Some(to) = next_prefix(&from) {
                        b.delete_range_cf(dedup, &from, &to);
                    }
                    dedup_batch.retain(|k, _| !k.starts_with(&from));
                }
                MessageOp::Remove { queue, seq, id } => {
                    b.delete_cf(index, keys::queue_entry(*queue, *seq));
                    let gone = batch.track
                        && match batch.entries.insert((*queue, *seq), None) {
                            Some(state) => state.is_none(),
                            None => batch.removed_by_range(*queue, *seq),
                        };
                    if !gone {
                        release(&mut b, &mut counts, *id);
                    }
                }
                MessageOp::RemoveRange { .. } | MessageOp::DropQueue { .. } => {
                    let (queue, first, end) = match *op {
                        MessageOp::RemoveRange { queue, from, to } if from < to => {
                            (queue, from, to)
                        }
                        MessageOp::DropQueue { queue } => (queue, 0, u64::MAX),
                        _ => continue,
                    };
                    let from = keys::queue_entry(queue, first);
                    let to = if end == u64::MAX {
                        keys::queue_entry(queue.wrapping_add(1), 0)
                    } else {
                        keys::queue_entry(queue, end)
                    };
                    let mut ro = ReadOptions::default();
                    ro.set_iterate_upper_bound(to);
                    for item in self.db.iterator_cf_opt(
                        index,
                        ro,
                        IteratorMode::From(&from, Direction::Forward),
                    ) {
                        let (k, v) = item.map_err(io)?;
                        let Some(entry) = keys::parse_queue_entry(&k) else {
                            continue;
                        };
                        if batch.entries.contains_key(&entry)
                            || batch.removed_by_range(entry.0, entry.1)
                        {
                            continue; // decided by this batch already
                        }
                        release(&mut b, &mut counts, entry_value(&v)?.0);
                    }
                    for (&(q, seq), state) in batch.entries.iter_mut() {
                        if q == queue && seq >= first && seq < end {
                            if let Some(id) = state.take() {
                                release(&mut b, &mut counts, id);
                            }
                        }
                    }
                    b.delete_range_cf(index, from, to);
                    batch.ranges.push((queue, first, end));
                }
            }
        }
        if let Some((k, v)) = run.take() {
            b.put_cf(stream_cf, k, v);
        }
        // Shared counts are written down with the batch, so opening the
        // store never has to count the whole index.
        for (id, &n) in &counts {
            if n > 1 {
                b.put_cf(refs, id.to_be_bytes(), n.to_be_bytes());
            } else if shared.contains_key(id) {
                b.delete_cf(refs, id.to_be_bytes());
            }
        }
        self.write_synced(b, sync)?;
        for (id, n) in counts {
            if n > 1 {
                shared.insert(id, n);
            } else {
                shared.remove(&id);
            }
        }
        Ok(())
    }
}

impl MessageStore for RocksStore {
    fn apply(&self, ops: &[MessageOp]) -> Result<()> {
        self.apply_ops(ops, true)
    }

    fn apply_unsynced(&self, ops: &[MessageOp]) -> Result<()> {
        self.apply_ops(ops, false)
    }

    /// A sync of the WAL covers every earlier write, in older WAL files
    /// too (RocksDB's SyncWAL).
    fn sync(&self) -> Result<()> {
        if self.sync {
            self.db.flush_wal(true).map_err(io)?;
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
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::queue_entry(queue, to));
        let start = keys::queue_entry(queue, from);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(INDEX),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            match keys::parse_queue_entry(&k) {
                Some((q, seq)) if q == queue => {
                    let (id, meta) = entry_value(&v)?;
                    out.push((seq, id, meta));
                }
                _ => break,
            }
        }
        Ok(out)
    }

    fn get_messages(&self, ids: &[MessageId]) -> Result<Vec<Option<StoredMessage>>> {
        let messages = self.cf(MESSAGES);
        let keys: Vec<_> = ids.iter().map(|id| (messages, id.to_be_bytes())).collect();
        self.db
            .multi_get_cf(keys)
            .into_iter()
            .map(|r| match r.map_err(io)? {
                Some(v) => decode_message(v).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    fn bounds(&self, queue: QueueId) -> Result<Option<QueueBounds>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::queue_entry(queue.wrapping_add(1), 0));
        let start = keys::queue_entry(queue, 0);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(INDEX), ro);
        it.seek(start);
        let mut found: Option<QueueBounds> = None;
        while let Some(k) = it.key() {
            match keys::parse_queue_entry(k) {
                Some((q, seq)) if q == queue => {
                    let b = found.get_or_insert(QueueBounds {
                        first: seq,
                        last: seq,
                        count: 0,
                    });
                    b.last = seq;
                    b.count += 1;
                }
                _ => break,
            }
            it.next();
        }
        it.status().map_err(io)?;
        Ok(found)
    }

    fn read_stream(&self, stream: QueueId, from: u64, limit: usize) -> Result<Vec<StreamRecord>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::queue_entry(stream.wrapping_add(1), 0));
        ro.set_iterate_lower_bound(keys::queue_entry(stream, 0));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(STREAM), ro);
        // The chunk holding `from` starts at or before it.
        it.seek_for_prev(keys::queue_entry(stream, from));
        if !it.valid() {
            it.seek(keys::queue_entry(stream, from));
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let Some((s, first)) = keys::parse_queue_entry(k) else {
                break;
            };
            if s != stream {
                break;
            }
            out.extend(chunk::decode_range(first, v, from, limit - out.len())?);
            it.next();
        }
        it.status().map_err(io)?;
        Ok(out)
    }

    fn stream_ids(&self) -> Result<Vec<QueueId>> {
        let mut ids = Vec::new();
        let mut from = keys::queue_entry(0, 0);
        loop {
            let mut it = self.db.iterator_cf(
                self.cf(STREAM),
                IteratorMode::From(&from, Direction::Forward),
            );
            let Some(item) = it.next() else { break };
            let (k, _) = item.map_err(io)?;
            let Some((s, _)) = keys::parse_queue_entry(&k) else {
                return Err(StoreError::Corrupt("malformed stream key".into()));
            };
            ids.push(s);
            match s.checked_add(1) {
                Some(next) => from = keys::queue_entry(next, 0),
                None => break,
            }
        }
        Ok(ids)
    }

    fn stream_bounds(&self, stream: QueueId) -> Result<Option<(u64, u64)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::queue_entry(stream.wrapping_add(1), 0));
        ro.set_iterate_lower_bound(keys::queue_entry(stream, 0));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(STREAM), ro);
        it.seek_to_first();
        let first = it.key().and_then(keys::parse_queue_entry);
        it.seek_to_last();
        let last = it
            .key()
            .and_then(keys::parse_queue_entry)
            .map(|(_, f)| f + it.value().map_or(1, chunk::count).max(1) - 1);
        it.status().map_err(io)?;
        Ok(match (first, last) {
            (Some((_, a)), Some(b)) => Some((a, b)),
            _ => None,
        })
    }

    fn stream_seek_time(&self, stream: QueueId, timestamp: u64) -> Result<Option<u64>> {
        let Some((first, _)) = self.stream_bounds(stream)? else {
            return Ok(None);
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(stream_time_key(stream, 0, 0));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(STREAM_TIME), ro);
        it.seek_for_prev(stream_time_key(stream, timestamp, u64::MAX));
        let at = it.key().and_then(|k| {
            let s = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
            let o = u64::from_be_bytes(k.get(16..24)?.try_into().ok()?);
            (s == stream).then_some(o)
        });
        it.status().map_err(io)?;
        Ok(Some(at.map_or(first, |o| o.max(first))))
    }

    fn read_delayed(
        &self,
        after: Option<(u64, MessageId)>,
        limit: usize,
    ) -> Result<Vec<DelayedEntry>> {
        let start = after.map_or([0u8; 16], |(d, i)| delayed_key(d, i));
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(DELAYED),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            let Some((due, id)) = keys::parse_queue_entry(&k) else {
                return Err(StoreError::Corrupt("a delayed key is not 16 bytes".into()));
            };
            if after == Some((due, id)) {
                continue;
            }
            out.push((due, id, Bytes::copy_from_slice(&v)));
        }
        Ok(out)
    }

    fn load_dedup(&self, scope: &[u8]) -> Result<Vec<(Bytes, u64)>> {
        let prefix = dedup_key(scope, b"");
        let mut ro = ReadOptions::default();
        if let Some(end) = next_prefix(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(DEDUP),
            ro,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(io)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let v: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("a deduplication value is not 8 bytes".into()))?;
            out.push((
                Bytes::copy_from_slice(&k[prefix.len()..]),
                u64::from_be_bytes(v),
            ));
        }
        Ok(out)
    }

    fn max_message_id(&self) -> Result<MessageId> {
        let mut it = self.db.raw_iterator_cf(self.cf(MESSAGES));
        it.seek_to_last();
        let id = match it.key() {
            Some(k) => id_value(k)?,
            None => 0,
        };
        it.status().map_err(io)?;
        Ok(id)
    }

    fn queue_ids(&self) -> Result<Vec<QueueId>> {
        let index = self.cf(INDEX);
        let mut ids = Vec::new();
        let mut from = keys::queue_entry(0, 0);
        loop {
            let mut it = self
                .db
                .iterator_cf(index, IteratorMode::From(&from, Direction::Forward));
            let Some(item) = it.next() else { break };
            let (k, _) = item.map_err(io)?;
            let Some((q, _)) = keys::parse_queue_entry(&k) else {
                return Err(StoreError::Corrupt("malformed index key".into()));
            };
            ids.push(q);
            match q.checked_add(1) {
                Some(next) => from = keys::queue_entry(next, 0),
                None => break,
            }
        }
        Ok(ids)
    }
}

/// Every write is one batch synced with the store's `sync` setting, but
/// the committed id's (openraft may lose it).
impl RaftLogStore for RocksStore {
    fn save_vote(&self, group: RaftGroup, vote: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(RAFT), raft_key(group, RAFT_VOTE), vote);
        self.write(b)
    }
    fn read_vote(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        self.raft_get(raft_key(group, RAFT_VOTE))
    }
    fn save_committed(&self, group: RaftGroup, committed: Option<&[u8]>) -> Result<()> {
        let mut b = WriteBatch::default();
        let k = raft_key(group, RAFT_COMMITTED);
        match committed {
            Some(v) => b.put_cf(self.cf(RAFT), k, v),
            None => b.delete_cf(self.cf(RAFT), k),
        }
        self.write_synced(b, false)
    }
    fn read_committed(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        self.raft_get(raft_key(group, RAFT_COMMITTED))
    }
    fn append(&self, group: RaftGroup, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let raft = self.cf(RAFT);
        let mut b = WriteBatch::default();
        for (index, entry) in entries {
            b.put_cf(raft, raft_entry_key(group, *index), entry);
        }
        self.write(b)
    }
    fn truncate(&self, group: RaftGroup, from: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            self.cf(RAFT),
            raft_entry_key(group, from),
            raft_key(group, RAFT_ENTRY + 1),
        );
        self.write(b)
    }
    fn purge(&self, group: RaftGroup, upto: u64, last_purged: &[u8]) -> Result<()> {
        let raft = self.cf(RAFT);
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            raft,
            raft_entry_key(group, 0),
            raft_entries_end(group, upto),
        );
        b.put_cf(raft, raft_key(group, RAFT_PURGED), last_purged);
        self.write(b)
    }
    fn read_last_purged(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        self.raft_get(raft_key(group, RAFT_PURGED))
    }
    fn reset_log(&self, group: RaftGroup) -> Result<()> {
        let raft = self.cf(RAFT);
        let mut b = WriteBatch::default();
        // Committed, entries, purge point and snapshot sort together,
        // before the vote.
        b.delete_range_cf(
            raft,
            raft_key(group, RAFT_COMMITTED),
            raft_key(group, RAFT_VOTE),
        );
        self.write(b)
    }
    fn forget_group(&self, group: RaftGroup) -> Result<()> {
        let mut b = WriteBatch::default();
        let mut end = group.to_be_bytes().to_vec();
        end.push(0xff);
        b.delete_range_cf(self.cf(RAFT), group.to_be_bytes().to_vec(), end);
        self.write(b)
    }
    fn save_snapshot(&self, group: RaftGroup, snapshot: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(RAFT), raft_key(group, RAFT_SNAPSHOT), snapshot);
        self.write(b)
    }
    fn read_snapshot(&self, group: RaftGroup) -> Result<Option<Bytes>> {
        self.raft_get(raft_key(group, RAFT_SNAPSHOT))
    }
    fn entries(&self, group: RaftGroup, from: u64, to: u64) -> Result<Vec<(u64, Bytes)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(raft_entry_key(group, from));
        ro.set_iterate_upper_bound(raft_entry_key(group, to));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(RAFT), ro);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.push((parse_raft_entry_key(group, k)?, Bytes::copy_from_slice(v)));
            it.next();
        }
        it.status().map_err(io)?;
        Ok(out)
    }
    fn last_entry(&self, group: RaftGroup) -> Result<Option<(u64, Bytes)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(raft_entry_key(group, 0));
        ro.set_iterate_upper_bound(raft_key(group, RAFT_ENTRY + 1));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(RAFT), ro);
        it.seek_to_last();
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => {
                Some((parse_raft_entry_key(group, k)?, Bytes::copy_from_slice(v)))
            }
            _ => None,
        };
        it.status().map_err(io)?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_join_while_consecutive_and_within_the_limits() {
        let chunk = |first: u64, n: u64| {
            let mut c = ChunkWriter::new(first, 0);
            for i in 0..n {
                c.push(
                    i,
                    &StoredMessage {
                        exchange: Bytes::new(),
                        routing_key: Bytes::from(format!("k{}", first + i)),
                        header: Bytes::new(),
                        body: Bytes::new(),
                    },
                );
            }
            Bytes::from(c.finish())
        };
        let mut run = ChunkRun::default();
        assert!(run.add(1, 0, &chunk(0, 3)).is_none());
        assert!(run.add(1, 3, &chunk(3, 2)).is_none());
        // Another stream ends the run: one value of 5 records.
        let (k, v) = run.add(2, 0, &chunk(0, 1)).expect("ended");
        assert_eq!(k, keys::queue_entry(1, 0));
        let recs = chunk::decode_range(0, &v, 0, usize::MAX).unwrap();
        let keys: Vec<_> = recs.iter().map(|r| r.message.routing_key.clone()).collect();
        assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
        // A gap ends it too; a chunk alone is written as it is.
        let alone = chunk(5, 1);
        let (k, v) = run.add(2, 5, &alone).expect("ended");
        assert_eq!((k, chunk::count(&v)), (keys::queue_entry(2, 0), 1));
        // Up to the record limit they join; past it, the next chunk starts
        // a value of its own.
        let limit = chunk::CHUNK_RECORDS as u64;
        assert!(
            run.add(2, 6, &chunk(6, limit - 1)).is_none(),
            "5..=4100 join"
        );
        let (k, v) = run
            .add(2, 5 + limit, &chunk(5 + limit, 2))
            .expect("over the limit");
        assert_eq!((k, chunk::count(&v)), (keys::queue_entry(2, 5), limit));
        let (k, v) = run.take().expect("the last run");
        assert_eq!((k, chunk::count(&v)), (keys::queue_entry(2, 5 + limit), 2));
        assert!(run.take().is_none());
    }

    #[test]
    fn message_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::messages(&s, &|| s.body_count());
    }

    #[test]
    fn entry_meta_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::entry_meta(&s, &|| s.body_count());
    }

    #[test]
    fn raft_log_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::raft_log(&s);
    }

    #[test]
    fn raft_log_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), true).unwrap();
            s.append(
                3,
                &[(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())],
            )
            .unwrap();
            s.purge(3, 1, b"p1").unwrap();
            s.save_vote(3, b"v").unwrap();
            s.save_snapshot(3, b"snap").unwrap();
        }
        let s = RocksStore::open(dir.path(), true).unwrap();
        assert_eq!(s.read_vote(3).unwrap(), Some(Bytes::from_static(b"v")));
        assert_eq!(
            s.read_snapshot(3).unwrap(),
            Some(Bytes::from_static(b"snap"))
        );
        assert_eq!(
            s.read_last_purged(3).unwrap(),
            Some(Bytes::from_static(b"p1"))
        );
        assert_eq!(
            s.entries(3, 0, u64::MAX).unwrap(),
            vec![(2, Bytes::from_static(b"b")), (3, Bytes::from_static(b"c"))]
        );
    }

    #[test]
    fn streams_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::streams(&s);
    }

    #[test]
    fn delayed_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::delayed(&s, &|| s.body_count());
    }

    #[test]
    fn dedup_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::dedup(&s);
    }

    #[test]
    fn batch_order_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::batch_order(&s, &|| s.body_count());
    }

    #[test]
    fn definitions_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::definitions(&s);
    }

    #[test]
    fn records_contract() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::records(&s);
        drop(s);
        // And they survive a reopen.
        let s = RocksStore::open(dir.path(), true).unwrap();
        assert_eq!(s.load_records().unwrap().len(), 3);
    }

    #[test]
    fn everything_survives_reopen_and_shared_counts_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), true).unwrap();
            warren_storage::contract::fill(&s);
        }
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::check_filled(&s, &|| s.body_count());
    }

    #[test]
    fn a_store_without_written_down_counts_is_counted_once_from_the_index() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), true).unwrap();
            warren_storage::contract::fill(&s);
            // As a store from before the `refs` family: no counts, no flag.
            let mut b = WriteBatch::default();
            b.delete_cf(s.cf(META), REFS_READY_KEY);
            b.delete_range_cf(s.cf(REFS), [0u8; 8], [0xffu8; 8]);
            s.write(b).unwrap();
        }
        let s = RocksStore::open(dir.path(), true).unwrap();
        warren_storage::contract::check_filled(&s, &|| s.body_count());
    }

    #[test]
    fn a_second_opener_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RocksStore::open(dir.path(), true).unwrap();
        match RocksStore::open(dir.path(), true) {
            Err(StoreError::Locked(p)) => assert!(p.contains(&dir.path().display().to_string())),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("opened twice"),
        }
    }

    #[test]
    fn an_incompatible_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), true).unwrap();
            s.put_meta(FORMAT_KEY.to_vec(), b"warren-store-999".to_vec())
                .unwrap();
        }
        let err = RocksStore::open(dir.path(), true).err().expect("refused");
        assert!(err.to_string().contains("warren-store-999"), "{err}");
    }
}
