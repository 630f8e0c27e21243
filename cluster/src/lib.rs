//! Clustering for Warren: a Raft group (openraft) of broker nodes that replicates
//! metadata (vhosts, users, queues...) as a key → JSON map.
//!
//! - [`types`]: the openraft type configuration and the replicated command.
//! - [`log`] / [`sm`]: log storage and state machine. The log, the vote and the state
//!   machine's snapshots are kept in `warren_storage`'s `RaftLogStore` (durable with a
//!   durable engine); the state machine itself is in memory, rebuilt at start from its
//!   last snapshot and the log after it.
//! - [`net`]: authenticated, framed TCP transport and openraft's network traits.
//! - [`node`]: [`ClusterNode`], which ties them together; [`config`]: its settings.
//!
//! Current limits, to lift before production use:
//! - without [`ClusterConfig::tls`], only the handshake is authenticated: frames after it
//!   carry no MAC and no encryption, so plain TCP must run on a trusted network;
//! - a node joins by being started with members of the cluster as its peers (or by
//!   [`ClusterNode::add_member`]); a node that formed a cluster of its own cannot move
//!   into another one.

mod bootstrap;
pub mod config;
pub mod error;
pub mod group;
mod leader;
pub mod log;
pub mod net;
pub mod node;
pub mod sm;
pub mod types;

pub use config::ClusterConfig;
pub use error::ClusterError;
pub use group::{Group, GroupMachine, GroupWatch, GroupWriteError, PendingWrite};
pub use net::{AppHandler, CallError, ClusterTls, HelloReply};
pub use node::{ClusterNode, ClusterStatus, Role};
pub use sm::MetaReader;
pub use types::{node_id, Applied, Blob, MetaCommand, MetaResponse, NodeId, NodeInfo, TypeConfig};
