//! Storage behind traits, in the spirit of TiKV's `engine_traits`: the API has
//! no engine types, so the broker and its tests can run on any engine.
//!
//! - [`MetaStore`]: durable definitions (exchanges, queues, bindings).
//! - [`MessageStore`]: persistent messages and per-queue index entries, keyed
//!   big-endian `(queue id, sequence)` ([`keys`]) so iteration is queue order.
//!   A message routed to several queues is written once and referenced by id.
//! - [`mem`] — the in-memory engine (definitions and messages live as long as
//!   the process). The RocksDB engine implements the same traits.

pub mod keys;
pub mod mem;

use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
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

/// Durable definitions. Each call returns once the change is durable.
pub trait MetaStore: Send + Sync + 'static {
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

/// One change to the message store; a batch of them is applied atomically.
#[derive(Clone, Debug)]
pub enum MessageOp {
    /// Store a message body once.
    PutMessage {
        id: MessageId,
        message: StoredMessage,
    },
    /// Append a queue index entry referring to a stored message.
    Enqueue {
        queue: QueueId,
        seq: u64,
        id: MessageId,
    },
    /// Remove a queue index entry (ack, purge); the body goes with its last entry.
    Remove { queue: QueueId, seq: u64 },
    /// Remove every entry of a queue (queue deleted).
    DropQueue { queue: QueueId },
}

/// Persistent messages. `apply` returns once the batch is durable, so callers
/// group many operations per call (group commit).
pub trait MessageStore: Send + Sync + 'static {
    fn apply(&self, ops: &[MessageOp]) -> Result<()>;
    /// Up to `limit` entries of `queue` with sequence >= `from`, in order.
    fn read(
        &self,
        queue: QueueId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageId, StoredMessage)>>;
    /// Number of entries stored for `queue`.
    fn count(&self, queue: QueueId) -> Result<u64>;
}
