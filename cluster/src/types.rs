//! Raft type configuration shared by every part of the cluster: node identity, the
//! replicated command and its response.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Raft node id. Derived from the node name with [`node_id`], so a node keeps its id
/// across restarts without having to persist it separately.
pub type NodeId = u64;

/// What the cluster knows about a member: its stable name and its cluster address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Stable, unique node name (the id is derived from it).
    pub name: String,
    /// Cluster address as `HOST:PORT`, as other members should dial it.
    pub addr: String,
}

impl NodeInfo {
    /// Builds a node description.
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
        }
    }

    /// The Raft id of this node.
    pub fn id(&self) -> NodeId {
        node_id(&self.name)
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// A change to the replicated metadata map. Kept generic (key/JSON value) so the broker
/// can layer vhosts, users, queues... on top without changing the Raft log format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Sets `key` to `value`.
    Put {
        key: String,
        value: serde_json::Value,
    },
    /// Removes `key` (a no-op when absent).
    Delete { key: String },
    /// Applies these commands in order, all in one step: a reader never sees some of
    /// them without the others.
    Batch(Vec<MetaCommand>),
    /// Applies `then` only if `key` is absent (a first writer wins: seeding).
    IfAbsent { key: String, then: Box<MetaCommand> },
    /// Removes every key that starts with `prefix`.
    DeletePrefix { prefix: String },
    /// Applies `then` only if `key` holds exactly `value` (what the writer checked
    /// still holds); the response's `previous` is the key's value, if `then` did
    /// not apply.
    IfEquals {
        key: String,
        value: serde_json::Value,
        then: Box<MetaCommand>,
    },
    /// A command of an application group (see [`crate::group`]), opaque to the cluster;
    /// the metadata group never carries one.
    Group(Blob),
}

/// Opaque bytes that travel and are logged as one base64 string (JSON would make each
/// byte a number).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Blob)
            .map_err(serde::de::Error::custom)
    }
}

/// Result of applying a [`MetaCommand`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaResponse {
    /// The value the key had before the command, if any (None for a batch).
    pub previous: Option<serde_json::Value>,
    /// What an application group's state machine answered a [`MetaCommand::Group`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Blob>,
}

/// What a node has applied, as its subscribers hear it ([`crate::ClusterNode::subscribe`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The command of the log entry at `index`, applied.
    Command { index: u64, command: MetaCommand },
    /// The log entry at `index` was applied and carried no command (a new leader's
    /// blank entry, a membership change): subscribers that count applied indexes see it.
    Entry { index: u64 },
    /// The whole map was replaced by a snapshot from the leader: this is all of it.
    Reset(std::collections::BTreeMap<String, serde_json::Value>),
}

openraft::declare_raft_types!(
    /// openraft type configuration for Warren's metadata group.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaResponse,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle for [`TypeConfig`].
pub type Raft = openraft::Raft<TypeConfig>;
/// Log id for [`TypeConfig`].
pub type LogId = openraft::LogId<NodeId>;
/// Stored membership for [`TypeConfig`].
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;

/// Derives a node id from a node name: the first 8 bytes of SHA-256(name), big-endian.
///
/// Stable across processes and versions. Id 0 is reserved (openraft treats the default
/// id specially in places), so a name hashing to 0 maps to 1.
pub fn node_id(name: &str) -> NodeId {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    match u64::from_be_bytes(first) {
        0 => 1,
        id => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_stable_and_distinct() {
        assert_eq!(node_id("rabbit-1"), node_id("rabbit-1"));
        assert_ne!(node_id("rabbit-1"), node_id("rabbit-2"));
        assert_ne!(node_id(""), 0);
        // SHA-256("abc") starts with ba7816bf8f01cfea.
        assert_eq!(node_id("abc"), 0xba78_16bf_8f01_cfea);
    }

    #[test]
    fn command_json_shape() {
        let cmd = MetaCommand::Put {
            key: "vhost/a".into(),
            value: serde_json::json!({"x": 1}),
        };
        let json = serde_json::to_string(&cmd).expect("serialize");
        assert_eq!(json, r#"{"Put":{"key":"vhost/a","value":{"x":1}}}"#);
        let back: MetaCommand = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, cmd);
        let batch = MetaCommand::Batch(vec![cmd, MetaCommand::Delete { key: "k".into() }]);
        let json = serde_json::to_string(&batch).expect("serialize");
        assert_eq!(
            json,
            r#"{"Batch":[{"Put":{"key":"vhost/a","value":{"x":1}}},{"Delete":{"key":"k"}}]}"#
        );
        assert_eq!(
            serde_json::from_str::<MetaCommand>(&json).expect("deserialize"),
            batch
        );
    }
}
