//! What only the metadata leader can do (replicate a command, change the membership),
//! asked of it by any member: [`ClusterNode`](crate::ClusterNode) runs it here when it
//! leads and otherwise sends it to the leader over the cluster transport, whose server
//! runs it here too.

use std::collections::BTreeSet;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::types::{MetaCommand, MetaResponse, NodeId, NodeInfo, Raft};

/// A request for the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderRequest {
    /// Replicate a command; answered once it is committed and applied on the leader.
    Write(MetaCommand),
    /// Make this node a voting member (it is replicated to as a learner until it has
    /// caught up). A node that is a member already is answered at once.
    Join(NodeInfo),
    /// Remove the member with this name.
    Remove(String),
    /// The index a read must wait for to see every write committed before it was asked
    /// (Raft's read index: the leader confirms with a majority that it still leads).
    ReadIndex,
}

/// The leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderReply {
    /// The command's result, and the index of its log entry.
    Written(MetaResponse, u64),
    Member(NodeInfo),
    ReadIndex(u64),
}

/// Why the leader did not do it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum RemoteError {
    /// The node asked is not the leader (any more); the leader it knows of, if any.
    NotLeader(Option<NodeInfo>),
    /// It failed; why.
    Failed(String),
}

fn from_raft(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> RemoteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            RemoteError::NotLeader(f.leader_node)
        }
        e => RemoteError::Failed(e.to_string()),
    }
}

/// Run `req` on this node, which must lead (else [`RemoteError::NotLeader`]).
pub(crate) async fn handle(raft: &Raft, req: LeaderRequest) -> Result<LeaderReply, RemoteError> {
    match req {
        LeaderRequest::Write(cmd) => raft
            .client_write(cmd)
            .await
            .map(|r| LeaderReply::Written(r.data, r.log_id.index))
            .map_err(from_raft),
        LeaderRequest::Join(node) => join(raft, node).await.map(LeaderReply::Member),
        LeaderRequest::Remove(name) => remove(raft, &name).await.map(LeaderReply::Member),
        LeaderRequest::ReadIndex => match raft.get_read_log_id().await {
            Ok((read, _)) => Ok(LeaderReply::ReadIndex(read.map_or(0, |l| l.index))),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(RemoteError::NotLeader(f.leader_node))
            }
            Err(e) => Err(RemoteError::Failed(e.to_string())),
        },
    }
}

/// The voting members, by id.
fn members(raft: &Raft) -> Vec<(NodeId, NodeInfo)> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
        .collect()
}

async fn join(raft: &Raft, node: NodeInfo) -> Result<NodeInfo, RemoteError> {
    let id = node.id();
    if let Some((_, m)) = members(raft).into_iter().find(|(mid, _)| *mid == id) {
        return if m.name == node.name {
            Ok(m)
        } else {
            Err(RemoteError::Failed(format!(
                "{:?} would collide with member {:?} (same id)",
                node.name, m.name
            )))
        };
    }
    raft.add_learner(id, node.clone(), true)
        .await
        .map_err(from_raft)?;
    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(from_raft)?;
    tracing::info!(added = %node, "added cluster member");
    Ok(node)
}

async fn remove(raft: &Raft, name: &str) -> Result<NodeInfo, RemoteError> {
    let all = members(raft);
    let Some((id, node)) = all.iter().find(|(_, n)| n.name == name).cloned() else {
        return Err(RemoteError::Failed(format!(
            "{name} is not a member of this cluster"
        )));
    };
    if all.len() == 1 {
        return Err(RemoteError::Failed(format!(
            "{name} is the cluster's only member"
        )));
    }
    // Not kept as a learner either: nothing is replicated to it any more.
    raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
        .await
        .map_err(from_raft)?;
    tracing::info!(removed = %node, "removed cluster member");
    Ok(node)
}
