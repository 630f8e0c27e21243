//! Formation of the initial membership: discover the configured peers, then let the
//! lowest-id member initialize the Raft group with all of them; or, when the peers are a
//! cluster already, ask it to take this node in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};

use crate::error::ClusterError;
use crate::leader::{LeaderRequest, RemoteError};
use crate::net::{HelloReply, PeerPool, RequestBody, ResponseBody};
use crate::types::{NodeId, NodeInfo, Raft};

/// Timeout of one discovery Hello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a join may take: the cluster replicates to the new member until it has
/// caught up before it answers.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Discovery retry delays grow from the first to the second value.
const DISCOVERY_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

/// Learns who the initial peers are and, on the lowest-id member, initializes the group.
pub(crate) async fn bootstrap(
    raft: Raft,
    pool: Arc<PeerPool>,
    me: NodeInfo,
    peers: Vec<String>,
    error: Arc<Mutex<Option<String>>>,
) {
    if is_member(&raft) {
        // A restart: this node is in a group already (its log says so).
        return;
    }
    let mut members = BTreeMap::from([(me.id(), me.clone())]);
    let mut existing: Vec<String> = Vec::new();
    let mut seen_addrs = Vec::new();
    for addr in peers {
        if addr == me.addr || seen_addrs.contains(&addr) {
            continue;
        }
        seen_addrs.push(addr.clone());
        let reply = discover(&pool, &addr).await;
        if reply.initialized {
            existing.push(addr.clone());
        }
        if let Err(msg) = add_member(&mut members, &me, reply.node, &addr) {
            tracing::error!(node = %me, "cannot form the cluster: {msg}");
            *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            return;
        }
    }
    if !existing.is_empty() {
        // The peers are a cluster already: ask it to take this node in.
        join(&raft, &pool, &me, &existing, &error).await;
        return;
    }
    let lowest = members.keys().next().copied();
    if lowest != Some(me.id()) {
        tracing::info!(node = %me, "all initial peers answered; waiting for the lowest-id member to initialize");
        return;
    }
    let names: Vec<String> = members.values().map(|n| n.to_string()).collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(node = %me, members = ?names, "initialized cluster"),
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
            tracing::debug!(node = %me, "cluster already initialized")
        }
        Err(e) => {
            tracing::error!(node = %me, "cluster initialization failed: {e}");
            *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }
}

/// Whether this node belongs to an initialized group.
fn is_member(raft: &Raft) -> bool {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .next()
        .is_some()
}

/// Asks the cluster that the peers at `addrs` belong to to make this node a member,
/// through whichever of them answers (a follower names its leader), until one says yes
/// or no, or this node has become a member (its log says so).
async fn join(
    raft: &Raft,
    pool: &PeerPool,
    me: &NodeInfo,
    addrs: &[String],
    error: &Mutex<Option<String>>,
) {
    let mut delay = DISCOVERY_BACKOFF.0;
    loop {
        for addr in addrs {
            let mut target = addr.clone();
            // The node asked, then at most the leader it names.
            for _ in 0..2 {
                let req = RequestBody::Leader(LeaderRequest::Join(me.clone()));
                match pool.call(&target, req, JOIN_TIMEOUT).await {
                    Ok(ResponseBody::Leader(Ok(_))) => {
                        tracing::info!(node = %me, via = %target, "joined the cluster");
                        return;
                    }
                    Ok(ResponseBody::Leader(Err(RemoteError::NotLeader(Some(l))))) => {
                        target = l.addr;
                        continue;
                    }
                    Ok(ResponseBody::Leader(Err(RemoteError::Failed(why)))) => {
                        tracing::error!(node = %me, "the cluster refused this node: {why}");
                        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                        return;
                    }
                    Ok(_) | Err(_) => {}
                }
                break;
            }
        }
        if is_member(raft) {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(DISCOVERY_BACKOFF.1);
    }
}

/// Retries Hello until the peer at `addr` answers. Authentication failures are logged
/// once: a misconfigured peer is worth one warning, not one per retry.
async fn discover(pool: &PeerPool, addr: &str) -> HelloReply {
    let mut delay = DISCOVERY_BACKOFF.0;
    let mut warned = false;
    loop {
        match pool.hello(addr, HELLO_TIMEOUT).await {
            Ok(reply) => return reply,
            Err(e @ ClusterError::AuthFailed { .. }) if !warned => {
                tracing::warn!(
                    "initial peer {addr} did not authenticate: {e}; check the cluster secret"
                );
                warned = true;
            }
            Err(e) => tracing::debug!("initial peer {addr} not reachable yet: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(DISCOVERY_BACKOFF.1);
    }
}

/// Adds a discovered peer, refusing duplicate names and id collisions.
fn add_member(
    members: &mut BTreeMap<NodeId, NodeInfo>,
    me: &NodeInfo,
    peer: NodeInfo,
    dialed: &str,
) -> Result<(), String> {
    if peer.name == me.name {
        return Err(format!("peer at {dialed} uses our own name {:?}", me.name));
    }
    match members.get(&peer.id()) {
        Some(known) if known.name == peer.name => Err(format!(
            "two initial peers are named {:?} ({} and {})",
            peer.name, known.addr, peer.addr
        )),
        Some(known) => Err(format!(
            "node names {:?} and {:?} hash to the same id; rename one",
            known.name, peer.name
        )),
        None => {
            members.insert(peer.id(), peer);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_members_are_refused() {
        let me = NodeInfo::new("a", "h:1");
        let mut members = BTreeMap::from([(me.id(), me.clone())]);
        add_member(&mut members, &me, NodeInfo::new("b", "h:2"), "h:2").expect("b");
        assert!(add_member(&mut members, &me, NodeInfo::new("b", "h:3"), "h:3").is_err());
        assert!(add_member(&mut members, &me, NodeInfo::new("a", "h:4"), "h:4").is_err());
        assert_eq!(members.len(), 2);
    }
}
