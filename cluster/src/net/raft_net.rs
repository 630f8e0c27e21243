//! openraft's network traits on top of [`PeerPool`].

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};

use super::client::{CallError, PeerPool};
use super::{RequestBody, ResponseBody};
use crate::error::ClusterError;
use crate::log::META_GROUP;
use crate::types::{NodeId, NodeInfo, TypeConfig};
use warren_storage::RaftGroup;

/// Used when openraft passes a zero ttl (it never should).
const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(2);

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

/// Hands openraft a [`PeerNetwork`] per target; all of them share one [`PeerPool`].
pub struct NetworkFactory {
    pool: Arc<PeerPool>,
    my_id: NodeId,
    group: RaftGroup,
}

impl NetworkFactory {
    /// A factory for the node `my_id`'s member of `group`, sending through `pool`.
    pub fn new(pool: Arc<PeerPool>, my_id: NodeId, group: RaftGroup) -> Self {
        Self { pool, my_id, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        // Cheap: no connection is made until the first RPC.
        PeerNetwork {
            pool: self.pool.clone(),
            my_id: self.my_id,
            target,
            node: node.clone(),
            group: self.group,
        }
    }
}

/// openraft's view of one peer.
pub struct PeerNetwork {
    pool: Arc<PeerPool>,
    my_id: NodeId,
    target: NodeId,
    node: NodeInfo,
    group: RaftGroup,
}

impl PeerNetwork {
    /// Sends `body` and maps transport failures onto openraft's error kinds: no
    /// connection → `Unreachable` (openraft backs off), timeout → `Timeout`, a request
    /// over the frame cap with `entries > 1` → `PayloadTooLarge` (openraft retries with
    /// fewer entries), anything else mid-exchange → `Network`.
    async fn send<E: std::error::Error>(
        &self,
        action: RPCTypes,
        body: RequestBody,
        entries: u64,
        option: &RPCOption,
    ) -> Result<ResponseBody, RpcErr<E>> {
        let ttl = match option.hard_ttl() {
            d if d.is_zero() => DEFAULT_RPC_TIMEOUT,
            d => d,
        };
        match self.pool.call(&self.node.addr, body, ttl).await {
            Ok(ResponseBody::Error(msg)) => Err(RPCError::Network(NetworkError::new(
                &ClusterError::Protocol(format!("{} answered: {msg}", self.node)),
            ))),
            Ok(body) => Ok(body),
            Err(CallError::Connect(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(CallError::Rpc(ClusterError::Timeout(_))) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.my_id,
                target: self.target,
                timeout: ttl,
            })),
            Err(CallError::Rpc(ClusterError::FrameTooLarge { .. })) if entries > 1 => Err(
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)),
            ),
            Err(CallError::Rpc(e)) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, body: &ResponseBody) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&ClusterError::Protocol(format!(
            "unexpected {} response from {}",
            body.kind(),
            self.node
        ))))
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let entries = rpc.entries.len() as u64;
        let body = match self.group {
            META_GROUP => RequestBody::AppendEntries(rpc),
            g => RequestBody::GroupAppend(g, rpc),
        };
        match self
            .send(RPCTypes::AppendEntries, body, entries, &option)
            .await?
        {
            ResponseBody::AppendEntries(res) => res.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let body = match self.group {
            META_GROUP => RequestBody::InstallSnapshot(rpc),
            g => RequestBody::GroupSnapshot(g, rpc),
        };
        match self
            .send(RPCTypes::InstallSnapshot, body, 0, &option)
            .await?
        {
            ResponseBody::InstallSnapshot(res) => res.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let body = match self.group {
            META_GROUP => RequestBody::Vote(rpc),
            g => RequestBody::GroupVote(g, rpc),
        };
        match self.send(RPCTypes::Vote, body, 0, &option).await? {
            ResponseBody::Vote(res) => res.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }
}
