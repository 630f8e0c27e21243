//! End-to-end tests: real nodes over loopback TCP (127.0.0.1, ephemeral ports only).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use warren_cluster::{
    Applied, ClusterConfig, ClusterError, ClusterNode, MetaCommand, NodeId, Role,
};
use warren_storage::mem::MemStore;

const SECRET: &[u8] = b"test-cluster-secret";

/// Logs go to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=warren_cluster=debug`).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Binds every listener first so each node's peer list can name the others.
async fn start_nodes(specs: &[(&str, &[u8], &[usize])]) -> Vec<ClusterNode> {
    init_logs();
    let mut listeners = Vec::new();
    for _ in specs {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let mut nodes = Vec::new();
    for ((name, secret, peers), listener) in specs.iter().zip(listeners) {
        let peers = peers.iter().map(|&i| addrs[i].clone()).collect();
        let cfg = config(name, secret, &listener, peers);
        nodes.push(ClusterNode::start_on(cfg, listener).await.expect("start"));
    }
    nodes
}

fn config(name: &str, secret: &[u8], listener: &TcpListener, peers: Vec<String>) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(name, listener.local_addr().expect("addr"), secret.to_vec());
    cfg.peers = peers;
    cfg
}

/// Three nodes named `{prefix}-{i}` on fresh loopback ports, each with the other two as
/// peers and its own in-memory store kept by the test; `tweak` adjusts each config.
/// Returns the configs (to start a node again with), the running nodes and their
/// addresses.
async fn start_three(
    prefix: &str,
    tweak: impl Fn(&mut ClusterConfig),
) -> (Vec<ClusterConfig>, Vec<ClusterNode>, Vec<String>) {
    init_logs();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let mut cfgs = Vec::new();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let peers = (0..3)
            .filter(|&j| j != i)
            .map(|j| addrs[j].clone())
            .collect();
        let mut cfg = config(&format!("{prefix}-{i}"), SECRET, &listener, peers);
        cfg.log_store = Arc::new(MemStore::new());
        tweak(&mut cfg);
        cfgs.push(cfg.clone());
        nodes.push(ClusterNode::start_on(cfg, listener).await.expect("start"));
    }
    (cfgs, nodes, addrs)
}

/// Polls `check` every 50 ms until it holds or `timeout` elapses.
async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until all `nodes` report the same leader and `members` voters; returns the
/// leader's id.
async fn agreed_leader(nodes: &[&ClusterNode], members: usize, timeout: Duration) -> NodeId {
    eventually("one agreed leader", timeout, || {
        let st: Vec<_> = nodes.iter().map(|n| n.status()).collect();
        st[0].leader_id.is_some()
            && st
                .iter()
                .all(|s| s.leader_id == st[0].leader_id && s.members.len() == members)
    })
    .await;
    nodes[0].status().leader_id.expect("leader")
}

fn put(key: &str, value: serde_json::Value) -> MetaCommand {
    MetaCommand::Put {
        key: key.into(),
        value,
    }
}

async fn shutdown_all(nodes: &[ClusterNode]) {
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_replicate() {
    let nodes = start_nodes(&[
        ("node-a", SECRET, &[1, 2]),
        ("node-b", SECRET, &[0, 2]),
        ("node-c", SECRET, &[0, 1]),
    ])
    .await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    let first_seen = nodes[2]
        .wait_for_leader(Duration::from_secs(15))
        .await
        .expect("a leader");
    let leader_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;

    let leader = nodes
        .iter()
        .find(|n| n.id() == leader_id)
        .expect("leader is a node");
    assert_eq!(&first_seen, leader.info());
    let st = leader.status();
    assert_eq!(st.role, Role::Leader);
    assert_eq!(st.leader.as_ref(), Some(leader.info()));
    let mut names: Vec<_> = st.members.iter().map(|m| m.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["node-a", "node-b", "node-c"]);

    let resp = leader
        .write(put("vhost/prod", json!({"tracing": false})))
        .await
        .expect("write");
    assert_eq!(resp.previous, None);
    eventually("replication to all nodes", Duration::from_secs(5), || {
        nodes
            .iter()
            .all(|n| n.get("vhost/prod") == Some(json!({"tracing": false})))
    })
    .await;

    // A follower's write goes to the leader; every node's subscribers hear of it.
    let follower = nodes
        .iter()
        .find(|n| n.id() != leader_id)
        .expect("follower");
    let mut feeds: Vec<_> = nodes.iter().map(|n| n.subscribe()).collect();
    let batch = MetaCommand::Batch(vec![put("x", json!(1)), put("y", json!(2))]);
    follower
        .write(batch.clone())
        .await
        .expect("a follower's write");
    for feed in &mut feeds {
        let heard = tokio::time::timeout(Duration::from_secs(5), feed.recv())
            .await
            .expect("in time")
            .expect("a change");
        assert!(
            matches!(&heard, Applied::Command { command, .. } if *command == batch),
            "{heard:?}"
        );
    }
    eventually(
        "a follower's write everywhere",
        Duration::from_secs(5),
        || nodes.iter().all(|n| n.get("x") == Some(json!(1))),
    )
    .await;

    shutdown_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_elect_a_new_leader_after_leader_shutdown() {
    let nodes = start_nodes(&[
        ("node-a", SECRET, &[1, 2]),
        ("node-b", SECRET, &[0, 2]),
        ("node-c", SECRET, &[0, 1]),
    ])
    .await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    let old_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;
    let old = nodes.iter().find(|n| n.id() == old_id).expect("leader");
    old.write(put("before", json!(1)))
        .await
        .expect("first write");

    let old_addr = old.local_addr();
    old.shutdown().await.expect("shutdown leader");
    assert!(
        tokio::net::TcpStream::connect(old_addr).await.is_err(),
        "the stopped node's port must not accept connections"
    );

    let survivors: Vec<&ClusterNode> = nodes.iter().filter(|n| n.id() != old_id).collect();
    let started = tokio::time::Instant::now();
    eventually("a new leader", Duration::from_secs(10), || {
        let st: Vec<_> = survivors.iter().map(|n| n.status()).collect();
        st[0].leader_id.is_some_and(|l| l != old_id) && st[1].leader_id == st[0].leader_id
    })
    .await;
    let new_id = survivors[0].status().leader_id.expect("leader");
    eprintln!("new leader elected after {:?}", started.elapsed());

    let new_leader = survivors
        .iter()
        .find(|n| n.id() == new_id)
        .expect("new leader");
    let resp = new_leader
        .write(put("before", json!(2)))
        .await
        .expect("write after failover");
    assert_eq!(resp.previous, Some(json!(1)));
    eventually("replication to survivors", Duration::from_secs(5), || {
        survivors.iter().all(|n| n.get("before") == Some(json!(2)))
    })
    .await;

    shutdown_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_wrong_secret_is_locked_out() {
    // The good nodes only list each other; the intruder lists both of them.
    let nodes = start_nodes(&[
        ("good-1", SECRET, &[1]),
        ("good-2", SECRET, &[0]),
        ("intruder", b"wrong-secret", &[0, 1]),
    ])
    .await;
    let (good, intruder) = (&nodes[..2], &nodes[2]);
    let good_addr = good[0].info().addr.clone();

    // Intruder → good node: the server rejects the client proof.
    match intruder.probe(&good_addr).await {
        Err(ClusterError::AuthFailed { peer }) => assert_eq!(peer, good_addr),
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    // Good node → intruder: the client rejects the server proof.
    match good[0].probe(&intruder.info().addr).await {
        Err(ClusterError::AuthFailed { .. }) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    // Good nodes authenticate each other.
    let reply = good[0]
        .probe(&good[1].info().addr)
        .await
        .expect("good probe");
    assert_eq!(reply.node.name, "good-2");

    let good_refs: Vec<&ClusterNode> = good.iter().collect();
    let leader_id = agreed_leader(&good_refs, 2, Duration::from_secs(15)).await;
    let leader = good.iter().find(|n| n.id() == leader_id).expect("leader");
    leader.write(put("k", json!("v"))).await.expect("write");
    eventually("replication to good nodes", Duration::from_secs(5), || {
        good.iter().all(|n| n.get("k") == Some(json!("v")))
    })
    .await;

    let st = intruder.status();
    assert_eq!(st.leader_id, None);
    assert!(st.members.is_empty(), "intruder joined: {st:?}");
    assert_eq!(intruder.get("k"), None);

    shutdown_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_catches_up_from_a_snapshot() {
    init_logs();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    // Snapshot every 5 entries and keep no log behind it, so a newcomer can only catch
    // up through InstallSnapshot.
    let snapshotting = |mut cfg: ClusterConfig| {
        cfg.snapshot_after_logs = 5;
        cfg.logs_kept_after_snapshot = 0;
        cfg
    };
    let mut listeners = listeners.into_iter();
    let (la, lb, lc) = (
        listeners.next().expect("a"),
        listeners.next().expect("b"),
        listeners.next().expect("c"),
    );
    let a_cfg = snapshotting(config("join-a", SECRET, &la, vec![addrs[1].clone()]));
    let b_cfg = snapshotting(config("join-b", SECRET, &lb, vec![addrs[0].clone()]));
    let a = ClusterNode::start_on(a_cfg, la).await.expect("start a");
    let b = ClusterNode::start_on(b_cfg, lb).await.expect("start b");
    let leader_id = agreed_leader(&[&a, &b], 2, Duration::from_secs(15)).await;
    let leader = if a.id() == leader_id { &a } else { &b };
    for i in 0..20 {
        leader
            .write(put(&format!("queue/{i}"), json!(i)))
            .await
            .expect("write");
    }
    // Large values make the snapshot span several InstallSnapshot chunks.
    let blob = "x".repeat(256 * 1024);
    for i in 0..8 {
        leader
            .write(put(&format!("blob/{i}"), json!(blob)))
            .await
            .expect("write blob");
    }
    eventually("a snapshot on the leader", Duration::from_secs(10), || {
        leader.status().snapshot_index >= Some(25)
    })
    .await;

    // The newcomer lists the existing members; they report being initialized, so it
    // asks them to take it in instead of creating a cluster of its own.
    // The newcomer never builds snapshots itself: one on it must have been received.
    let mut c_cfg = config("join-c", SECRET, &lc, addrs[..2].to_vec());
    c_cfg.snapshot_after_logs = 1_000_000;
    let c = ClusterNode::start_on(c_cfg, lc).await.expect("start c");
    eventually(
        "the newcomer to become a member",
        Duration::from_secs(20),
        || leader.status().members.iter().any(|m| m.name == "join-c"),
    )
    .await;
    // Adding a member again changes nothing.
    let added = leader.add_member(&addrs[2]).await.expect("add member");
    assert_eq!(added.name, "join-c");

    eventually("the newcomer to catch up", Duration::from_secs(10), || {
        c.get("queue/0") == Some(json!(0))
            && c.get("queue/19") == Some(json!(19))
            && c.get("blob/7") == Some(json!(blob))
    })
    .await;
    assert!(
        c.status().snapshot_index >= Some(25),
        "the newcomer did not receive the leader's snapshot"
    );
    let new_leader = agreed_leader(&[&a, &b, &c], 3, Duration::from_secs(10)).await;
    assert_eq!(new_leader, leader_id);
    assert_eq!(c.status().bootstrap_error, None);

    leader
        .write(put("after-join", json!(true)))
        .await
        .expect("write");
    eventually(
        "replication to the newcomer",
        Duration::from_secs(5),
        || c.get("after-join") == Some(json!(true)),
    )
    .await;

    for n in [&a, &b, &c] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rejects_bad_config() {
    let listen = "127.0.0.1:0".parse().expect("addr");
    let err = ClusterNode::start(ClusterConfig::new("n", listen, Vec::new()))
        .await
        .err()
        .expect("empty secret must be refused");
    assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
}

/// Three nodes, each with its own in-memory log store kept by the test; one follower is
/// shut down, misses writes, and is started again on the same address with the same
/// store. `compact`: snapshot (and purge the log) every few entries.
/// Shut down a follower (or the leader), write through the majority, and
/// start it again on the same store and address.
async fn restart_a_node(compact: bool, the_leader: bool) {
    let (cfgs, nodes, addrs) = start_three("restart", |cfg| {
        if compact {
            cfg.snapshot_after_logs = 3;
            cfg.logs_kept_after_snapshot = 0;
        }
    })
    .await;
    let mut nodes: Vec<Option<ClusterNode>> = nodes.into_iter().map(Some).collect();
    let live = |nodes: &[Option<ClusterNode>]| -> Vec<NodeId> {
        nodes.iter().flatten().map(|n| n.id()).collect()
    };
    let all: Vec<&ClusterNode> = nodes.iter().flatten().collect();
    let leader_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;
    assert_eq!(live(&nodes).len(), 3);
    let li = nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.id() == leader_id))
        .expect("leader");
    let fi = if the_leader { li } else { (li + 1) % 3 };
    let leader = nodes[li].as_ref().expect("leader");
    for i in 0..5 {
        leader
            .write(put(&format!("before/{i}"), json!(i)))
            .await
            .expect("write");
    }
    let follower = nodes[fi].as_ref().expect("follower");
    eventually("replication before restart", Duration::from_secs(5), || {
        follower.get("before/4") == Some(json!(4))
    })
    .await;
    if compact {
        eventually("a snapshot on the follower", Duration::from_secs(5), || {
            follower.status().snapshot_index.is_some()
        })
        .await;
    }
    let before = follower.status();
    let mut member_names: Vec<_> = before.members.iter().map(|m| m.name.clone()).collect();
    member_names.sort();
    follower.shutdown().await.expect("shutdown follower");
    nodes[fi] = None;

    // The majority goes on without it (under a new leader if it led).
    let survivors: Vec<&ClusterNode> = nodes.iter().flatten().collect();
    // The survivors may still name the node that was shut down for a while.
    eventually(
        "a leader among the survivors",
        Duration::from_secs(15),
        || {
            let ids: Vec<_> = survivors.iter().map(|n| n.status().leader_id).collect();
            ids.iter().all(|&l| l == ids[0])
                && ids[0].is_some_and(|l| survivors.iter().any(|n| n.id() == l))
        },
    )
    .await;
    let leader_id = agreed_leader(&survivors, 3, Duration::from_secs(15)).await;
    if the_leader {
        assert_ne!(leader_id, before.id, "a new leader, not the one shut down");
    }
    let leader = *survivors
        .iter()
        .find(|n| n.id() == leader_id)
        .expect("leader");
    for i in 0..5 {
        leader
            .write(put(&format!("while-down/{i}"), json!(i)))
            .await
            .expect("write while down");
    }

    // The vote is in the store.
    let vote = cfgs[fi]
        .log_store
        .read_vote(0)
        .expect("read vote")
        .expect("a stored vote");
    let vote: serde_json::Value = serde_json::from_slice(&vote).expect("vote json");
    assert!(
        vote["leader_id"]["term"].as_u64() >= Some(before.term),
        "{vote}"
    );

    // Same store, same address.
    let follower = ClusterNode::start(cfgs[fi].clone()).await.expect("restart");
    assert_eq!(follower.local_addr().to_string(), addrs[fi]);
    eventually(
        "the restarted node to load its state",
        Duration::from_secs(5),
        || {
            let st = follower.status();
            st.term >= before.term && (compact || st.members == before.members)
        },
    )
    .await;
    eventually(
        "the restarted node catches up",
        Duration::from_secs(10),
        || {
            follower.get("while-down/4") == Some(json!(4))
                && follower.get("before/0") == Some(json!(0))
        },
    )
    .await;
    nodes[fi] = Some(follower);
    let all: Vec<&ClusterNode> = nodes.iter().flatten().collect();
    agreed_leader(&all, 3, Duration::from_secs(10)).await;
    let follower = nodes[fi].as_ref().expect("follower");
    let st = follower.status();
    assert!(st.term >= before.term);
    let mut names: Vec<_> = st.members.iter().map(|m| m.name.clone()).collect();
    names.sort();
    assert_eq!(names, member_names);
    assert_eq!(st.bootstrap_error, None);
    if compact {
        // Its log went with the snapshot it was compacted into: it got the leader's.
        assert!(st.snapshot_index.is_some(), "{st:?}");
    }

    // And it keeps taking part.
    let leader_id = all[0].status().leader_id.expect("leader");
    let leader = all.iter().find(|n| n.id() == leader_id).expect("leader");
    leader
        .write(put("after", json!(true)))
        .await
        .expect("write");
    eventually("replication after restart", Duration::from_secs(5), || {
        follower.get("after") == Some(json!(true))
    })
    .await;
    for n in nodes.iter().flatten() {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_remembers_its_vote_and_log() {
    restart_a_node(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_leader_rejoins_as_a_member_and_catches_up() {
    restart_a_node(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_with_a_compacted_log_catches_up_from_a_snapshot() {
    restart_a_node(true, false).await;
}

/// Every node stops after its log was compacted into snapshots, and the whole cluster
/// starts again from its stores: nothing committed is lost, on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restarts_from_its_snapshots_and_logs() {
    let (cfgs, nodes, _) = start_three("whole", |cfg| {
        cfg.snapshot_after_logs = 4;
        cfg.logs_kept_after_snapshot = 0;
    })
    .await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;
    let leader = all.iter().find(|n| n.id() == leader_id).expect("leader");
    for i in 0..10 {
        leader
            .write(put(&format!("k/{i}"), json!(i)))
            .await
            .expect("write");
    }
    eventually(
        "snapshots and replication everywhere",
        Duration::from_secs(10),
        || {
            all.iter()
                .all(|n| n.get("k/9") == Some(json!(9)) && n.status().snapshot_index.is_some())
        },
    )
    .await;
    // Some entries were purged into the snapshots on every node.
    for c in &cfgs {
        assert!(c.log_store.read_last_purged(0).expect("read").is_some());
        assert!(c.log_store.read_snapshot(0).expect("read").is_some());
    }
    shutdown_all(&nodes).await;
    drop(nodes);

    let mut nodes = Vec::new();
    for c in &cfgs {
        nodes.push(ClusterNode::start(c.clone()).await.expect("restart"));
    }
    // Each node has it back from its own store: its snapshot at once, the log after
    // it as openraft re-applies it.
    for n in &nodes {
        assert!(
            n.get("k/0").is_some(),
            "{}: the snapshot restored",
            n.info()
        );
    }
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    eventually("every node has every key", Duration::from_secs(5), || {
        all.iter()
            .all(|n| (0..10).all(|i| n.get(&format!("k/{i}")) == Some(json!(i))))
    })
    .await;
    let leader_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;
    let leader = all.iter().find(|n| n.id() == leader_id).expect("leader");
    leader.write(put("after", json!(1))).await.expect("write");
    eventually("a write after the restart", Duration::from_secs(5), || {
        all.iter().all(|n| n.get("after") == Some(json!(1)))
    })
    .await;
    for n in &nodes {
        assert_eq!(n.status().bootstrap_error, None);
    }
    shutdown_all(&nodes).await;
}

/// A member is removed through a follower (the leader does it); the rest go on as a
/// smaller cluster; a name that is not a member, or the last member, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_removed_through_any_node() {
    let nodes = start_nodes(&[
        ("rm-a", SECRET, &[1, 2]),
        ("rm-b", SECRET, &[0, 2]),
        ("rm-c", SECRET, &[0, 1]),
    ])
    .await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    let leader_id = agreed_leader(&all, 3, Duration::from_secs(15)).await;
    let follower = *all
        .iter()
        .find(|n| n.id() != leader_id)
        .expect("a follower");
    // Remove one that is not the leader and not the follower asked.
    let gone = *all
        .iter()
        .find(|n| n.id() != leader_id && n.id() != follower.id())
        .expect("a third");
    let removed = follower
        .remove_member(&gone.info().name)
        .await
        .expect("remove");
    assert_eq!(&removed, gone.info());
    gone.shutdown().await.expect("shutdown");
    let rest: Vec<&ClusterNode> = all
        .iter()
        .copied()
        .filter(|n| n.id() != gone.id())
        .collect();
    agreed_leader(&rest, 2, Duration::from_secs(10)).await;
    follower.write(put("two", json!(2))).await.expect("write");
    eventually("the write on both", Duration::from_secs(5), || {
        rest.iter().all(|n| n.get("two") == Some(json!(2)))
    })
    .await;
    match follower.remove_member("nobody").await {
        Err(ClusterError::Raft(why)) => assert!(why.contains("not a member"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Down to one; then the last one stays.
    let other = *rest
        .iter()
        .find(|n| n.id() != follower.id())
        .expect("the other");
    follower
        .remove_member(&other.info().name)
        .await
        .expect("remove the other");
    eventually("a cluster of one", Duration::from_secs(10), || {
        let st = follower.status();
        st.members.len() == 1 && st.leader_id == Some(follower.id())
    })
    .await;
    match follower.remove_member(&follower.info().name).await {
        Err(ClusterError::Raft(why)) => assert!(why.contains("only member"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    shutdown_all(&nodes).await;
}

/// TLS between nodes: a CA, and one certificate per node for 127.0.0.1 (server and
/// client use); both sides verify.
mod tls {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
    use warren_cluster::ClusterTls;

    pub struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        /// A node's TLS, trusting `trust`'s certificates.
        pub fn node(&self, trust: &Ca) -> ClusterTls {
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, "node");
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
            let chain = vec![CertificateDer::from(cert.der().to_vec())];
            let der = || PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from(trust.cert.der().to_vec()))
                .unwrap();
            let roots = Arc::new(roots);
            let verifier = WebPkiClientVerifier::builder(roots.clone())
                .build()
                .unwrap();
            let server = ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), der())
                .unwrap();
            let client = ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, der())
                .unwrap();
            ClusterTls {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
                connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            }
        }
    }
}

/// Three nodes over TLS form a cluster and replicate; a node whose certificate comes
/// from another CA (right secret or not) cannot take part, nor can one without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_tls_and_refuse_strangers() {
    let ca = tls::Ca::new("cluster CA");
    let (_, nodes, addrs) = start_three("tls", |cfg| cfg.tls = Some(ca.node(&ca))).await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    agreed_leader(&all, 3, Duration::from_secs(15)).await;
    nodes[1]
        .write(put("over", json!("tls")))
        .await
        .expect("write");
    eventually("replication over TLS", Duration::from_secs(5), || {
        nodes.iter().all(|n| n.get("over") == Some(json!("tls")))
    })
    .await;

    // A stranger: another CA's certificate, the right secret.
    let other = tls::Ca::new("another CA");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut cfg = config("stranger", SECRET, &l, vec![addrs[0].clone()]);
    cfg.tls = Some(other.node(&ca));
    let stranger = ClusterNode::start_on(cfg, l).await.expect("start");
    assert!(stranger.probe(&addrs[0]).await.is_err());
    // Without TLS.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain = ClusterNode::start_on(config("plain", SECRET, &l, Vec::new()), l)
        .await
        .expect("start");
    assert!(plain.probe(&addrs[0]).await.is_err());
    // A member dialling a node whose certificate it does not trust refuses it.
    assert!(nodes[0]
        .probe(&stranger.local_addr().to_string())
        .await
        .is_err());
    assert!(nodes[0].probe(&addrs[1]).await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &nodes {
        assert_eq!(n.status().members.len(), 3);
    }
    stranger.shutdown().await.expect("shutdown");
    plain.shutdown().await.expect("shutdown");
    shutdown_all(&nodes).await;
}

/// A group state machine that keeps every command it applied, in order.
#[derive(Default)]
struct Journal(std::sync::Mutex<Vec<Vec<u8>>>);

impl Journal {
    fn items(&self) -> Vec<Vec<u8>> {
        self.0.lock().expect("journal").clone()
    }
}

impl warren_cluster::GroupMachine for Journal {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        let mut j = self.0.lock().expect("journal");
        j.push(command.to_vec());
        (j.len() as u64).to_be_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.0.lock().expect("journal")).expect("encode")
    }
    fn restore(&self, state: &[u8]) -> Result<(), String> {
        *self.0.lock().expect("journal") = if state.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(state).map_err(|e| e.to_string())?
        };
        Ok(())
    }
}

/// Waits until the open members of a group agree on a leader among them; returns its
/// index in `groups`.
async fn group_leader(groups: &[Option<warren_cluster::Group>]) -> usize {
    let mut found = None;
    eventually("one group leader", Duration::from_secs(15), || {
        let ids: Vec<_> = groups
            .iter()
            .flatten()
            .map(|g| g.status().leader_id)
            .collect();
        found = ids[0].and_then(|l| {
            groups
                .iter()
                .position(|g| g.as_ref().is_some_and(|g| g.status().id == l))
        });
        found.is_some() && ids.iter().all(|&l| l == ids[0])
    })
    .await;
    found.expect("leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_group_replicates_fails_over_and_restores() {
    let (_cfgs, nodes, _) = start_three("group", |cfg| {
        cfg.snapshot_after_logs = 5;
        cfg.logs_kept_after_snapshot = 0;
    })
    .await;
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    agreed_leader(&all, 3, Duration::from_secs(15)).await;
    let members: Vec<_> = nodes.iter().map(|n| n.info().clone()).collect();
    let journals: Vec<Arc<Journal>> = (0..3).map(|_| Arc::default()).collect();
    let mut groups = Vec::new();
    for (n, j) in nodes.iter().zip(&journals) {
        groups.push(Some(n.open_group(7, j.clone()).await.expect("open")));
    }
    assert!(nodes[0]
        .open_group(7, Arc::new(Journal::default()))
        .await
        .is_err());
    assert!(nodes[0]
        .open_group(0, Arc::new(Journal::default()))
        .await
        .is_err());
    groups[1]
        .as_ref()
        .expect("g")
        .initialize(&members)
        .await
        .expect("init");
    let li = group_leader(&groups).await;
    let leader = groups[li].clone().expect("leader");
    for i in 0u8..8 {
        let n = leader.write(vec![i]).await.expect("write");
        assert_eq!(
            u64::from_be_bytes(n.try_into().expect("8 bytes")),
            i as u64 + 1
        );
    }
    let fi = (li + 1) % 3;
    let follower = groups[fi].clone().expect("follower");
    assert!(matches!(
        follower.write(vec![99]).await,
        Err(warren_cluster::GroupWriteError::NotLeader(Some(_)))
    ));
    let want: Vec<Vec<u8>> = (0u8..8).map(|i| vec![i]).collect();
    eventually("every member applied", Duration::from_secs(5), || {
        journals.iter().all(|j| j.items() == want)
    })
    .await;
    // The metadata group is untouched by the group's traffic.
    assert!(nodes[0].get("anything").is_none());

    // The leader's member stops: the others elect one and go on.
    nodes[li].close_group(7).await;
    groups[li] = None;
    let ni = group_leader(&groups).await;
    assert_ne!(ni, li);
    let leader = groups[ni].clone().expect("new leader");
    for i in 8u8..12 {
        leader.write(vec![i]).await.expect("write after failover");
    }
    // It comes back, from its snapshot and log, and catches up.
    warren_cluster::GroupMachine::restore(&*journals[li], &[]).expect("clear");
    eventually("a snapshot", Duration::from_secs(5), || {
        groups[ni]
            .as_ref()
            .expect("g")
            .status()
            .snapshot_index
            .is_some()
    })
    .await;
    groups[li] = Some(
        nodes[li]
            .open_group(7, journals[li].clone())
            .await
            .expect("reopen"),
    );
    let want: Vec<Vec<u8>> = (0u8..12).map(|i| vec![i]).collect();
    eventually(
        "the returned member caught up",
        Duration::from_secs(10),
        || journals.iter().all(|j| j.items() == want),
    )
    .await;
    // Destroyed on one node, the group's data goes with it there.
    nodes[li].destroy_group(7).await.expect("destroy");
    assert!(nodes[li].group(7).is_none());
    let fresh = Arc::new(Journal::default());
    let g = nodes[li]
        .open_group(7, fresh.clone())
        .await
        .expect("open again");
    assert_eq!(g.status().last_applied, None);
    assert!(fresh.items().is_empty());
    shutdown_all(&nodes).await;
}
