//! What clustered nodes share: users, vhosts, permissions, topic
//! permissions, policies, operator policies and limits (the access
//! records), through the cluster's metadata Raft group.
//!
//! The group's map holds each shared record under `access/KIND/KEY`, its
//! value the record's JSON. A change made on any node
//! ([`crate::broker::Broker::change_access`]) is checked against the node's
//! state, written to the group as one batch, and answered once this node
//! has applied it. Every node mirrors the map into its own store and state
//! ([`run`]): after each change that touches it, after a snapshot from the
//! leader, and at start; so a node that was down catches up. Once there is
//! a leader, every node offers its records as the map's seed; the first
//! offer to commit seeds it, the others change nothing. Before a node first mirrors a cluster's map it adds
//! its own records that the map lacks (a user, vhost or policy the cluster
//! has by the same name stays as the cluster has it): a node never loses a
//! vhost, and with it its queues and messages, for meeting a cluster that
//! did not know it. (RabbitMQ resets a node that joins a cluster.)
//!
//! Exchanges, queues and bindings are shared through the same map (see
//! [`topology`]): a queue lives on the node that declared it, and the
//! others reach it through a forwarding handle ([`remote`]). Messages stay
//! on their queue's node.

pub mod remote;
pub mod topology;

use crate::access::REPLICATED_KINDS;
use crate::broker::Broker;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use warren_cluster::{Applied, ClusterNode, MetaCommand};
use warren_storage::{Record, RecordOp};

/// Where a clustered node's vhosts find its current sync (a node that
/// joins another cluster replaces it).
pub type SyncSlot = Arc<std::sync::RwLock<Option<Arc<ClusterSync>>>>;

/// How an error that means "the cluster cannot take changes now" (no
/// reachable leader, a minority side of a partition) begins: the API
/// answers it with 503, other refusals with 400.
pub const UNAVAILABLE: &str = "cluster unavailable: ";

const PREFIX: &str = "access/";
/// Present once the map was seeded; its value names the node that did.
const SEEDED: &str = "seeded/access";
/// How long a change waits for the cluster to take it, and then for this
/// node to apply it.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a change waits for the leader's read index (a leader that
/// answers at all answers in milliseconds).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

fn map_key(kind: &str, key: &str) -> String {
    format!("{PREFIX}{kind}/{key}")
}

/// (kind, key) of a map key of a shared record.
fn record_of(map_key: &str) -> Option<(&str, &str)> {
    let rest = map_key.strip_prefix(PREFIX)?;
    let (kind, key) = rest.split_once('/')?;
    REPLICATED_KINDS.contains(&kind).then_some((kind, key))
}

/// The group commands for record changes (only the shared kinds).
pub(crate) fn commands(ops: &[RecordOp]) -> Result<Vec<MetaCommand>, String> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            RecordOp::Put(r) if REPLICATED_KINDS.contains(&r.kind.as_str()) => {
                let value: Value = serde_json::from_slice(&r.value)
                    .map_err(|e| format!("record {} is not JSON: {e}", r.kind))?;
                out.push(MetaCommand::Put {
                    key: map_key(&r.kind, &r.key),
                    value,
                });
            }
            RecordOp::Delete { kind, key } if REPLICATED_KINDS.contains(&kind.as_str()) => {
                out.push(MetaCommand::Delete {
                    key: map_key(kind, key),
                });
                if kind == "vhost" {
                    // Its exchanges, queues and bindings go with it.
                    out.push(MetaCommand::DeletePrefix {
                        prefix: topology::vhost_prefix(key),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Whether a command touches the shared access records.
fn touches(c: &MetaCommand) -> bool {
    match c {
        MetaCommand::Put { key, .. } | MetaCommand::Delete { key } => {
            key.starts_with(PREFIX) || key == SEEDED
        }
        MetaCommand::DeletePrefix { prefix } => prefix.starts_with(PREFIX),
        MetaCommand::Batch(cs) => cs.iter().any(touches),
        MetaCommand::IfAbsent { key, then } => key == SEEDED || touches(then),
        MetaCommand::IfEquals { then, .. } => touches(then),
        MetaCommand::Group(_) => false,
    }
}

/// The vhosts whose exchanges, queues or bindings a command touches.
fn topology_touched(c: &MetaCommand, out: &mut BTreeSet<String>) {
    match c {
        MetaCommand::Put { key, .. } | MetaCommand::Delete { key } => {
            out.extend(topology::vhost_of(key));
        }
        MetaCommand::DeletePrefix { prefix } => {
            // A vhost's prefix, or that of the bindings to something in it.
            let closed = format!("{}]", prefix.trim_end_matches(','));
            out.extend(topology::vhost_of(&closed));
        }
        MetaCommand::Batch(cs) => cs.iter().for_each(|c| topology_touched(c, out)),
        MetaCommand::IfAbsent { then, .. } | MetaCommand::IfEquals { then, .. } => {
            topology_touched(then, out)
        }
        MetaCommand::Group(_) => {}
    }
}

/// What a store's records must do to match the map, and what that means
/// beyond the records.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Diff {
    pub ops: Vec<RecordOp>,
    pub vhosts_added: BTreeSet<String>,
    pub vhosts_removed: BTreeSet<String>,
    /// Vhosts whose policies or operator policies changed.
    pub policies_changed: BTreeSet<String>,
}

pub(crate) fn diff(local: Vec<Record>, map: &BTreeMap<String, Value>) -> Diff {
    let mut d = Diff::default();
    let mut local: BTreeMap<(String, String), Value> = local
        .into_iter()
        .map(|r| {
            // A record that does not parse is replaced by the map's.
            let v = serde_json::from_slice(&r.value).unwrap_or(Value::Null);
            ((r.kind, r.key), v)
        })
        .collect();
    let note = |d: &mut Diff, kind: &str, key: &str, removed: bool| match kind {
        "vhost" if removed => {
            d.vhosts_removed.insert(key.to_owned());
        }
        "vhost" => {
            d.vhosts_added.insert(key.to_owned());
        }
        "policy" | "operator_policy" => {
            if let Some((vhost, _)) = key.split_once('\0') {
                d.policies_changed.insert(vhost.to_owned());
            }
        }
        _ => {}
    };
    for (k, v) in map {
        let Some((kind, key)) = record_of(k) else {
            continue;
        };
        let same = local
            .remove(&(kind.to_owned(), key.to_owned()))
            .is_some_and(|old| old == *v);
        if !same {
            d.ops.push(RecordOp::Put(Record {
                kind: kind.to_owned(),
                key: key.to_owned(),
                value: serde_json::to_vec(v).unwrap_or_default().into(),
            }));
            note(&mut d, kind, key, false);
        }
    }
    // What is left is not in the map.
    for (kind, key) in local.into_keys() {
        note(&mut d, &kind, &key, true);
        d.ops.push(RecordOp::Delete { kind, key });
    }
    d
}

/// A clustered node's side of sharing: how far it has mirrored the map.
pub struct ClusterSync {
    pub(crate) cluster: Arc<ClusterNode>,
    applied: watch::Receiver<u64>,
    /// True once the first mirror pass is done: this node knows the
    /// cluster's queues (as applied here).
    mirrored: watch::Receiver<bool>,
    /// Dropping the sync stops its tasks (a node leaving its cluster).
    stop: watch::Sender<bool>,
}

impl Drop for ClusterSync {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl ClusterSync {
    /// Start mirroring the cluster's map into `broker` (call once, right
    /// after the broker is made), and put the sync in `slot`: before the
    /// first mirror pass, which needs it (a quorum queue's front reaches its
    /// group through it; before, a node's first pass after a restart could
    /// run without it and leave the node without its quorum queues).
    pub(crate) fn start(broker: &Arc<Broker>, cluster: Arc<ClusterNode>, slot: SyncSlot) {
        // Subscribed before the map is first read: nothing falls between.
        let feed = cluster.subscribe();
        let (tx, applied) = watch::channel(0);
        let (stop, stopped) = watch::channel(false);
        let (first, mirrored) = watch::channel(false);
        let sync = Arc::new(ClusterSync {
            cluster: cluster.clone(),
            applied,
            mirrored,
            stop,
        });
        *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(sync);
        tokio::spawn(run(
            Arc::downgrade(broker),
            cluster.clone(),
            slot,
            feed,
            (tx, first),
            stopped.clone(),
        ));
        tokio::spawn(seed(Arc::downgrade(broker), cluster, stopped));
    }

    /// Wait (up to `limit`) for the first mirror pass: until then this node
    /// does not know the cluster's queues, and a publish to one of them
    /// would be dropped as unroutable (and confirmed). A restarted node
    /// takes AMQP connections only after it.
    pub(crate) async fn wait_mirrored(&self, limit: Duration) -> bool {
        let mut m = self.mirrored.clone();
        let done =
            tokio::time::timeout(limit, async move { m.wait_for(|done| *done).await.is_ok() })
                .await;
        done.unwrap_or(false)
    }

    /// Wait until this node has applied every change the cluster committed
    /// before this call (so a change is checked against the latest state).
    pub(crate) async fn catch_up(&self) -> Result<(), String> {
        let index = tokio::time::timeout(READ_TIMEOUT, self.cluster.read_index())
            .await
            .map_err(|_| format!("{UNAVAILABLE}no metadata leader confirmed its lead in time"))?
            .map_err(|e| format!("{UNAVAILABLE}cannot reach the metadata leader: {e}"))?;
        self.wait_applied(index).await
    }

    async fn wait_applied(&self, index: u64) -> Result<(), String> {
        let mut applied = self.applied.clone();
        tokio::time::timeout(CHANGE_TIMEOUT, applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| {
                format!("{UNAVAILABLE}this node has not applied the cluster's changes in time")
            })?
            .map_err(|_| "the node is shutting down".to_string())?;
        Ok(())
    }

    /// This node's name in the cluster.
    pub(crate) fn me(&self) -> &str {
        &self.cluster.info().name
    }

    /// Replicate record changes and wait until this node has applied them.
    pub(crate) async fn write(&self, ops: &[RecordOp]) -> Result<(), String> {
        let cmds = commands(ops)?;
        if cmds.is_empty() {
            return Ok(());
        }
        self.write_command(MetaCommand::Batch(cmds))
            .await
            .map(|_| ())
    }

    /// Replicate a change and wait until this node has applied it.
    pub(crate) async fn write_command(
        &self,
        cmd: MetaCommand,
    ) -> Result<warren_cluster::MetaResponse, String> {
        // A node that is starting with its cluster waits a moment for it.
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while self.cluster.get(SEEDED).is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.cluster.get(SEEDED).is_none() {
            return Err(format!(
                "{UNAVAILABLE}the cluster has not shared its users and vhosts yet (no metadata \
                 leader has seeded them); try again"
            ));
        }
        // A change that times out may still be committed later (as with any
        // lost reply); one refused outright was not.
        let (r, index) = tokio::time::timeout(CHANGE_TIMEOUT, self.cluster.write_indexed(cmd))
            .await
            .map_err(|_| format!("{UNAVAILABLE}the change was not committed in time"))?
            .map_err(|e| format!("{UNAVAILABLE}the change was not committed: {e}"))?;
        self.wait_applied(index).await?;
        Ok(r)
    }
}

/// Seed the map with this node's records, once a leader is there, unless
/// another node did first.
async fn seed(broker: Weak<Broker>, cluster: Arc<ClusterNode>, stopped: watch::Receiver<bool>) {
    loop {
        if cluster.get(SEEDED).is_some() || *stopped.borrow() {
            return;
        }
        if cluster.status().leader.is_some() {
            let Some(b) = broker.upgrade() else { return };
            let records = b.access.shared_records();
            drop(b);
            let cmd = records.and_then(|rs| {
                let ops: Vec<RecordOp> = rs.into_iter().map(RecordOp::Put).collect();
                let mut cmds = commands(&ops)?;
                cmds.push(MetaCommand::Put {
                    key: SEEDED.into(),
                    value: Value::String(cluster.info().name.clone()),
                });
                Ok(MetaCommand::IfAbsent {
                    key: SEEDED.into(),
                    then: Box::new(MetaCommand::Batch(cmds)),
                })
            });
            match cmd {
                Ok(cmd) => match cluster.write(cmd).await {
                    Ok(r) if r.previous.is_none() => {
                        tracing::info!(
                            "seeded the cluster's users, vhosts and policies with this node's"
                        );
                        return;
                    }
                    Ok(_) => return,
                    Err(e) => tracing::debug!(error = %e, "seeding the cluster's users and vhosts"),
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot seed the cluster's users and vhosts");
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Mirror the map: at start, after each change that touches it, after a
/// snapshot or a lag; `applied` says up to which log index.
async fn run(
    broker: Weak<Broker>,
    cluster: Arc<ClusterNode>,
    slot: SyncSlot,
    mut feed: broadcast::Receiver<Applied>,
    (applied, first): (watch::Sender<u64>, watch::Sender<bool>),
    mut stopped: watch::Receiver<bool>,
) {
    let advance = |index: u64| {
        applied.send_if_modified(|a| {
            let moved = index > *a;
            *a = (*a).max(index);
            moved
        });
    };
    let link: Arc<dyn crate::queue::remote::Link> = Arc::new(remote::ClusterLink(slot));
    let mut state = topology::MirrorState::default();
    let (mut access, mut all, mut vhosts) = (true, true, BTreeSet::new());
    loop {
        if access || all || !vhosts.is_empty() {
            // The map as applied now (perhaps ahead of the feed: fine, the
            // same changes come again and change nothing).
            let upto = cluster.reader().last_applied().map_or(0, |l| l.index);
            let Some(b) = broker.upgrade() else { return };
            if access {
                if let Err(e) = mirror(&b, &cluster).await {
                    tracing::error!(error = %e, "cannot apply the cluster's users and vhosts");
                }
            }
            if all || !vhosts.is_empty() {
                let only = (!all).then_some(&vhosts);
                if let Err(e) = mirror_topology(&b, &cluster, only, &link, &mut state).await {
                    tracing::error!(error = %e, "cannot apply the cluster's exchanges and queues");
                }
            }
            drop(b);
            advance(upto);
            // (Only once the topology was mirrored: before the group is
            // seeded or this node adopted, there is nothing to wait for yet.)
            if !*first.borrow() && cluster.get(SEEDED).is_some() {
                let _ = first.send(true);
            }
            (access, all) = (false, false);
            vhosts.clear();
        }
        let first = tokio::select! {
            next = feed.recv() => next,
            _ = stopped.changed() => return,
        };
        // Take what else is there already: one mirror pass for all of it.
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ok(Applied::Command { index, command }) => {
                    let before = vhosts.len();
                    topology_touched(&command, &mut vhosts);
                    access |= touches(&command);
                    if !access && !all && vhosts.is_empty() && before == 0 {
                        advance(index);
                    }
                }
                Ok(Applied::Entry { index }) => {
                    if !access && !all && vhosts.is_empty() {
                        advance(index);
                    }
                }
                Ok(Applied::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    (access, all) = (true, true);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            next = match feed.try_recv() {
                Ok(a) => Some(Ok(a)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Some(Err(broadcast::error::RecvError::Lagged(n)))
                }
                Err(_) => None,
            };
        }
    }
}

/// Make this node's exchanges, queues and bindings match the map: in
/// `only` these vhosts, else in all. The first time, this node's own are
/// added to the map (each only if the map has none by its name).
async fn mirror_topology(
    b: &Arc<Broker>,
    cluster: &Arc<ClusterNode>,
    only: Option<&BTreeSet<String>>,
    link: &Arc<dyn crate::queue::remote::Link>,
    state: &mut topology::MirrorState,
) -> Result<(), String> {
    if cluster.get(SEEDED).is_none() || !b.access.adopted()? {
        return Ok(()); // users and vhosts first
    }
    let me = cluster.info().name.clone();
    let mut only = only;
    if !b.access.topology_adopted()? {
        adopt_topology(b, cluster, &me).await?;
        only = None;
    }
    let names: Vec<String> = match only {
        Some(v) => v.iter().cloned().collect(),
        None => b.vhosts().iter().map(|v| v.name.clone()).collect(),
    };
    for name in names {
        let Some(v) = b.vhost(&name) else { continue };
        let map = cluster
            .reader()
            .snapshot_of_prefix(&topology::vhost_prefix(&name));
        let r = topology::reconcile(&v, &map, &me, link, state).await?;
        let d = topology::VhostDefs::of(&map);
        for q in r.lost_queues {
            // Transient queues of this node did not survive its restart.
            let Some(cmd) = d.removal(&name, "queue", &q) else {
                continue;
            };
            // Not awaited here: this loop is what applies it.
            let c = cluster.clone();
            tokio::spawn(async move {
                if let Err(e) = c.write(cmd).await {
                    tracing::warn!(queue = %q, error = %e, "cannot remove a transient queue lost in a restart");
                }
            });
        }
    }
    Ok(())
}

/// Add this node's exchanges, queues and bindings to the map (each only
/// where the map has none by its name), wait until this node has applied
/// that, and remember it was done.
async fn adopt_topology(b: &Arc<Broker>, cluster: &ClusterNode, me: &str) -> Result<(), String> {
    let mut cmds = Vec::new();
    for v in b.vhosts() {
        cmds.extend(topology::adoption(&v, me));
    }
    if !cmds.is_empty() {
        let n = cmds.len();
        let (_, index) = tokio::time::timeout(
            CHANGE_TIMEOUT,
            cluster.write_indexed(MetaCommand::Batch(cmds)),
        )
        .await
        .map_err(|_| {
            "adding this node's queues and exchanges to the cluster's timed out".to_string()
        })?
        .map_err(|e| {
            format!("cannot add this node's queues and exchanges to the cluster's: {e}")
        })?;
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        while cluster.reader().last_applied().map_or(0, |l| l.index) < index {
            if tokio::time::Instant::now() >= deadline {
                return Err("this node did not apply its own queues in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            entries = n,
            "offered this node's exchanges, queues and bindings to the cluster"
        );
    }
    let me = b.clone();
    tokio::task::spawn_blocking(move || me.access.set_topology_adopted(true))
        .await
        .map_err(|e| e.to_string())?
}

/// Make this node's records match the map (once seeded), and put what
/// changed in force: vhosts made or removed, policies.
async fn mirror(b: &Arc<Broker>, cluster: &ClusterNode) -> Result<(), String> {
    let snapshot = || {
        let mut m = cluster.reader().snapshot_of_prefix(PREFIX);
        if let Some(v) = cluster.get(SEEDED) {
            m.insert(SEEDED.to_owned(), v);
        }
        m
    };
    let mut map = snapshot();
    if !map.contains_key(SEEDED) {
        return Ok(());
    }
    if !b.access.adopted()? {
        // Nothing is removed before this node's records are in the map.
        adopt(b, cluster, &map).await?;
        map = snapshot();
    }
    let local = b.access.shared_records()?;
    let d = diff(local, &map);
    if d.ops.is_empty() {
        return Ok(());
    }
    let (me, ops) = (b.clone(), d.ops);
    tokio::task::spawn_blocking(move || me.access.apply_shared(&ops))
        .await
        .map_err(|e| format!("the change failed: {e}"))??;
    for v in &d.vhosts_removed {
        b.remove_vhost_objects(v).await?;
    }
    for v in &d.vhosts_added {
        b.ensure_vhost(v);
    }
    for v in d.policies_changed.union(&d.vhosts_added) {
        if !d.vhosts_removed.contains(v) {
            b.apply_policies(v).await?;
        }
    }
    tracing::debug!(
        added = ?d.vhosts_added,
        removed = ?d.vhosts_removed,
        "applied the cluster's users and vhosts"
    );
    Ok(())
}

/// Add this node's records that `map` lacks to the cluster's (each only if
/// still absent when applied), wait until this node has applied them, and
/// remember that it was done. A node whose access control is as its first
/// start made it brings only its vhosts.
async fn adopt(
    b: &Arc<Broker>,
    cluster: &ClusterNode,
    map: &BTreeMap<String, Value>,
) -> Result<(), String> {
    // Vhosts always (they hold queues and messages); users, permissions and
    // policies unless they are only what a first start made.
    let default_user = b
        .config
        .default_user
        .as_ref()
        .map(|(u, p)| (u.as_str(), p.as_str()));
    let pristine = b.access.is_pristine(default_user);
    let ops: Vec<RecordOp> = b
        .access
        .shared_records()?
        .into_iter()
        .filter(|r| !map.contains_key(&map_key(&r.kind, &r.key)))
        .filter(|r| !pristine || r.kind == "vhost")
        .map(RecordOp::Put)
        .collect();
    if !ops.is_empty() {
        let cmds: Vec<MetaCommand> = commands(&ops)?
            .into_iter()
            .map(|c| match c {
                MetaCommand::Put { key, value } => MetaCommand::IfAbsent {
                    key: key.clone(),
                    then: Box::new(MetaCommand::Put { key, value }),
                },
                other => other,
            })
            .collect();
        let (_, index) = tokio::time::timeout(
            CHANGE_TIMEOUT,
            cluster.write_indexed(MetaCommand::Batch(cmds)),
        )
        .await
        .map_err(|_| "adding this node's users and vhosts to the cluster's timed out".to_string())?
        .map_err(|e| format!("cannot add this node's users and vhosts to the cluster's: {e}"))?;
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        while cluster.reader().last_applied().map_or(0, |l| l.index) < index {
            if tokio::time::Instant::now() >= deadline {
                return Err("this node did not apply its own records in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            records = ops.len(),
            "added this node's users, vhosts and policies to the cluster's"
        );
    }
    let me = b.clone();
    tokio::task::spawn_blocking(move || me.access.set_adopted(true))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(kind: &str, key: &str, v: Value) -> Record {
        Record {
            kind: kind.into(),
            key: key.into(),
            value: serde_json::to_vec(&v).unwrap().into(),
        }
    }

    #[test]
    fn records_and_map_keys_round_trip_and_node_records_stay_home() {
        let ops = vec![
            RecordOp::Put(rec("user", "ann", json!({"tags": []}))),
            RecordOp::Put(rec("node", "initialized", json!(true))),
            RecordOp::Delete {
                kind: "permission".into(),
                key: "/\0ann".into(),
            },
        ];
        let cmds = commands(&ops).unwrap();
        assert_eq!(
            cmds,
            vec![
                MetaCommand::Put {
                    key: "access/user/ann".into(),
                    value: json!({"tags": []})
                },
                MetaCommand::Delete {
                    key: "access/permission//\0ann".into()
                },
            ]
        );
        assert_eq!(
            record_of("access/permission//\0ann"),
            Some(("permission", "/\0ann"))
        );
        assert_eq!(record_of("access/node/initialized"), None);
        assert_eq!(record_of("queue/x"), None);
        assert!(touches(&MetaCommand::Batch(cmds)));
        assert!(!touches(&MetaCommand::Put {
            key: "queue/x".into(),
            value: json!(1)
        }));
    }

    #[test]
    fn the_diff_puts_what_differs_and_deletes_what_the_map_lacks() {
        let local = vec![
            rec("user", "ann", json!({"a": 1, "b": 2})),
            rec("user", "bob", json!({"a": 1})),
            rec("vhost", "old", json!({})),
            rec("policy", "keep\0p", json!({"x": 1})),
        ];
        let map = BTreeMap::from([
            // Same value, keys in another order: unchanged.
            ("access/user/ann".to_string(), json!({"b": 2, "a": 1})),
            ("access/user/bob".to_string(), json!({"a": 2})),
            ("access/vhost/new".to_string(), json!({})),
            ("access/policy/keep\0p".to_string(), json!({"x": 1})),
            ("access/policy/new\0q".to_string(), json!({"y": 1})),
            (SEEDED.to_string(), json!("n1")),
        ]);
        let d = diff(local, &map);
        let kinds: Vec<(bool, String)> = d
            .ops
            .iter()
            .map(|op| match op {
                RecordOp::Put(r) => (true, format!("{}/{}", r.kind, r.key)),
                RecordOp::Delete { kind, key } => (false, format!("{kind}/{key}")),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (true, "policy/new\0q".to_string()),
                (true, "user/bob".to_string()),
                (true, "vhost/new".to_string()),
                (false, "vhost/old".to_string()),
            ]
        );
        assert_eq!(d.vhosts_added, BTreeSet::from(["new".to_string()]));
        assert_eq!(d.vhosts_removed, BTreeSet::from(["old".to_string()]));
        assert_eq!(d.policies_changed, BTreeSet::from(["new".to_string()]));
    }
}
