//! TCP transport between cluster members.
//!
//! Each connection starts with a mutual HMAC handshake ([`auth`]), then carries
//! length-prefixed JSON frames ([`frame`]). Requests carry an id and get exactly one
//! response with the same id, so several RPCs can share one connection and a late reply
//! to a timed-out request is simply discarded.

pub mod auth;
mod client;
pub mod frame;
mod raft_net;
mod server;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

pub use client::{CallError, PeerPool};

/// TLS for cluster connections: what a node accepts with and what it dials with. Both
/// sides present a certificate and verify the other's (the client checks the server's
/// against the address it dials). The secret's handshake still runs, inside TLS.
#[derive(Clone)]
pub struct ClusterTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls")
    }
}

/// A cluster connection's byte stream: plain TCP or TLS over it.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
pub(crate) type BoxStream = Box<dyn Stream>;
pub use raft_net::{NetworkFactory, PeerNetwork};
pub use server::{serve, ServerCtx};

use crate::leader::{LeaderReply, LeaderRequest, RemoteError};
use crate::types::{NodeId, NodeInfo, TypeConfig};
use warren_storage::RaftGroup;

/// What a node's application (the broker) answers other members with: the
/// requests they send with [`crate::ClusterNode::call_app`], each handled in its own
/// task, so a handler may wait.
pub trait AppHandler: Send + Sync + 'static {
    fn handle(
        &self,
        from: NodeInfo,
        request: serde_json::Value,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send>,
    >;
}

/// A request frame.
#[derive(Serialize, Deserialize)]
pub(crate) struct RpcRequest {
    pub id: u64,
    pub body: RequestBody,
}

/// The operations a member can ask of another.
#[derive(Serialize, Deserialize)]
pub(crate) enum RequestBody {
    /// Who are you? Used for discovery before Raft knows the peer.
    Hello,
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Something only the leader does (see [`crate::leader`]).
    Leader(LeaderRequest),
    /// A request for the application running on the node (see [`AppHandler`]).
    App(serde_json::Value),
    /// Raft messages of an application group (see [`crate::group`]); the metadata
    /// group's go without a group id, as above.
    GroupAppend(RaftGroup, AppendEntriesRequest<TypeConfig>),
    GroupVote(RaftGroup, VoteRequest<NodeId>),
    GroupSnapshot(RaftGroup, InstallSnapshotRequest<TypeConfig>),
}

/// A response frame, matched to its request by `id`.
#[derive(Serialize, Deserialize)]
pub(crate) struct RpcResponse {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum ResponseBody {
    Hello(HelloReply),
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Leader(Result<LeaderReply, RemoteError>),
    App(Result<serde_json::Value, String>),
    /// The server could not produce a response (e.g. it would not fit in a frame).
    Error(String),
}

impl ResponseBody {
    /// Name of the variant, for "unexpected response" errors.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ResponseBody::Hello(_) => "Hello",
            ResponseBody::AppendEntries(_) => "AppendEntries",
            ResponseBody::Vote(_) => "Vote",
            ResponseBody::InstallSnapshot(_) => "InstallSnapshot",
            ResponseBody::Leader(_) => "Leader",
            ResponseBody::App(_) => "App",
            ResponseBody::Error(_) => "Error",
        }
    }
}

/// Answer to a Hello request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The answering node.
    pub node: NodeInfo,
    /// Whether it already belongs to an initialized Raft group; a bootstrapping node must
    /// not initialize a second group next to an existing one.
    pub initialized: bool,
}
