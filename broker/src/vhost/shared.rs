//! Definition changes on a clustered node: exchanges, queues and bindings
//! are shared through the cluster's metadata group (see
//! `crate::replicate::topology`). A change is checked here against this
//! node's topology, written to the group (conditionally, so that racing
//! changes from other nodes cannot undo each other), and answered once
//! this node has applied it: every node, this one included, changes its
//! topology only by mirroring the group ([`VHost::mirror`]).

use super::VHost;
use crate::error::{internal_error, AmqpError, AmqpResult};
use crate::exchange::{Binding, Exchange};
use crate::queue::{QueueHandle, QueueInfo};
use crate::replicate::topology::{
    self, builtin, dest_parts, exchange_key, put_if_absent, queue_key, table_text, BDef, QDef,
    VhostDefs, XDef,
};
use crate::replicate::{ClusterSync, SyncSlot, UNAVAILABLE};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use warren_cluster::MetaCommand;
use warren_protocol::reply;
use warren_protocol::types::FieldTable;

pub(crate) use crate::replicate::topology::{local_only, shares_binding};

/// A shared queue to add to this node's topology.
pub(crate) struct NewShared {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// Its home node and the way to it, if it is not this node.
    pub home: Option<(Arc<str>, Arc<dyn crate::queue::remote::Link>)>,
    /// A quorum queue: its group, first members, and the way to the others.
    pub quorum: Option<(u64, Vec<String>, Arc<dyn crate::queue::remote::Link>)>,
}

/// One change the mirror makes to this node's topology.
pub(crate) enum Mirror {
    AddExchange(String, XDef),
    RemoveExchange(String),
    AddQueue(NewShared),
    RemoveQueue(String, u64),
    Bind(String, Binding),
    Unbind(String, Binding),
}

/// A cluster's refusal as a channel error: 541 when the cluster cannot
/// take changes now (as RabbitMQ answers a declare that timed out).
fn refused(why: String) -> AmqpError {
    match why.starts_with(UNAVAILABLE) {
        true => AmqpError::new(reply::INTERNAL_ERROR, why),
        false => internal_error(why),
    }
}

impl VHost {
    /// Share this vhost's definitions through the cluster of `slot`.
    pub(crate) fn set_cluster(&self, slot: SyncSlot) {
        let _ = self.cluster.set(slot);
    }

    /// Whether definitions are shared (a clustered node).
    pub(crate) fn clustered(&self) -> bool {
        self.cluster.get().is_some()
    }

    fn sync(&self) -> AmqpResult<Arc<ClusterSync>> {
        self.cluster
            .get()
            .and_then(|s| s.read().unwrap_or_else(|e| e.into_inner()).clone())
            .ok_or_else(|| {
                AmqpError::new(
                    reply::INTERNAL_ERROR,
                    format!("{UNAVAILABLE}this node is joining a cluster"),
                )
            })
    }

    /// This vhost's entries in the map, as this node has applied them.
    fn defs(&self, sync: &ClusterSync) -> VhostDefs {
        VhostDefs::of(
            &sync
                .cluster
                .reader()
                .snapshot_of_prefix(&topology::vhost_prefix(&self.name)),
        )
    }

    async fn commit(&self, sync: &ClusterSync, cmd: MetaCommand) -> AmqpResult<Option<Value>> {
        sync.write_command(cmd)
            .await
            .map(|r| r.previous)
            .map_err(refused)
    }

    // ------------------------------------------------------------ exchanges

    pub(super) async fn declare_shared_exchange(&self, x: Exchange) -> AmqpResult<()> {
        let name = x.name.to_string();
        let check = |v: &VHost| -> Option<AmqpResult<()>> {
            let t = v.read();
            t.exchanges.get(&name).map(|e| v.check_exchange(e, &x))
        };
        if let Some(r) = check(self) {
            return r;
        }
        if name.starts_with("amq.") {
            return Err(crate::error::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let sync = self.sync()?;
        let def = XDef {
            kind: x.kind.name.to_owned(),
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: table_text(&x.arguments),
            inc: topology::new_inc(),
        };
        let value = serde_json::to_value(def).unwrap_or_default();
        self.commit(&sync, put_if_absent(exchange_key(&self.name, &name), value))
            .await?;
        // Ours, or another node's declared first: checked as a redeclaration.
        check(self).unwrap_or(Ok(()))
    }

    pub(super) async fn delete_shared_exchange(
        &self,
        name: &str,
        if_unused: bool,
    ) -> AmqpResult<()> {
        match self.read().exchanges.get(name) {
            None => return Ok(()),
            Some(e) if if_unused && !e.bindings.is_empty() => {
                return Err(crate::error::precondition(format!(
                    "exchange '{name}' in vhost '{}' in use",
                    self.name
                )))
            }
            Some(_) => {}
        }
        let sync = self.sync()?;
        sync.catch_up().await.map_err(refused)?;
        // None: deleted meanwhile.
        if let Some(cmd) = self.defs(&sync).removal(&self.name, "exchange", name) {
            self.commit(&sync, cmd).await?;
        }
        Ok(())
    }

    // --------------------------------------------------------------- queues

    pub(super) async fn declare_shared_queue(
        &self,
        s: &super::QueueSpec<'_>,
        conn: u64,
    ) -> AmqpResult<QueueHandle> {
        let sync = self.sync()?;
        let inc = topology::new_inc();
        let quorum = (crate::channel::topology::string_arg(s.arguments, "x-queue-type").as_deref()
            == Some("quorum"))
        .then(|| self.quorum_members(&sync, s, inc));
        let def = QDef {
            node: sync.me().to_owned(),
            durable: s.durable,
            auto_delete: s.auto_delete,
            arguments: table_text(s.arguments),
            inc,
            quorum,
        };
        let value = serde_json::to_value(def).unwrap_or_default();
        self.commit(&sync, put_if_absent(queue_key(&self.name, s.name), value))
            .await?;
        // Ours, or another node's declared first: checked as a redeclaration.
        let q = self.find_queue(s.name).ok_or_else(|| {
            internal_error(format!(
                "queue '{}' in vhost '{}' was declared but is gone (deleted meanwhile)",
                s.name, self.name
            ))
        })?;
        self.check_equivalent(&q, s, conn)?;
        q.tell(crate::queue::QueueCmd::Touch);
        Ok(q)
    }

    /// A new quorum queue's group: its id (the queue's incarnation, unique in
    /// the cluster) and `x-quorum-initial-group-size` members (3 by default,
    /// or every node if there are fewer), the first of which leads first:
    /// this node (`x-queue-leader-locator: client-local`, the default), or
    /// (`balanced`) the member that leads the fewest quorum queues so far.
    fn quorum_members(
        &self,
        sync: &ClusterSync,
        s: &super::QueueSpec<'_>,
        inc: u64,
    ) -> topology::QuorumDef {
        let me = sync.me().to_owned();
        let size = match s.arguments.inner().get("x-quorum-initial-group-size") {
            Some(v) => {
                crate::queue::args::int_value(v).map_or(3, |(_, n)| n.clamp(1, 1 << 16) as usize)
            }
            None => 3,
        };
        let mut others: Vec<String> = sync
            .cluster
            .status()
            .members
            .into_iter()
            .map(|m| m.name)
            .filter(|n| *n != me)
            .collect();
        // Spread groups over the nodes: each queue starts at its own place.
        others.sort_by_key(|n| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
            h.write(s.name.as_bytes());
            h.write(n.as_bytes());
            h.finish()
        });
        let mut members = vec![me];
        members.extend(others.into_iter().take(size.saturating_sub(1)));
        if crate::channel::topology::string_arg(s.arguments, "x-queue-leader-locator").as_deref()
            == Some("balanced")
        {
            let all = sync.cluster.reader().snapshot_of_prefix(topology::PREFIX);
            let mut led: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            for v in all.values() {
                if let Some(first) = v
                    .get("quorum")
                    .and_then(|q| q.get("members"))
                    .and_then(|m| m.get(0))
                    .and_then(Value::as_str)
                {
                    *led.entry(first).or_default() += 1;
                }
            }
            let fewest = (0..members.len())
                .min_by_key(|&i| led.get(members[i].as_str()).copied().unwrap_or(0))
                .unwrap_or(0);
            members.swap(0, fewest);
        }
        topology::QuorumDef {
            group: inc,
            members,
        }
    }

    /// Remove a deleted queue (its actor stopped already) from the map,
    /// with every binding to it.
    pub(super) async fn delete_shared_queue(&self, q: &QueueHandle) -> AmqpResult<()> {
        let sync = self.sync()?;
        sync.catch_up().await.map_err(refused)?;
        if let Some(cmd) = self.defs(&sync).removal(&self.name, "queue", q.name()) {
            self.commit(&sync, cmd).await?;
        }
        Ok(())
    }

    /// A queue of this node deleted itself (auto-delete, `x-expires`):
    /// remove it from the map, trying again while the cluster cannot take
    /// the change (every node then drops it, this one too).
    pub(super) fn forget_shared_queue(&self, q: QueueHandle) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            for attempt in 0..120u32 {
                if attempt > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let Ok(sync) = me.sync() else { continue };
                if me.find_queue(q.name()).is_none_or(|cur| cur != q) {
                    return;
                }
                let Some(cmd) = me.defs(&sync).removal(&me.name, "queue", q.name()) else {
                    return;
                };
                match me.commit(&sync, cmd).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(queue = %q.name(), error = %e.text, "cannot remove a deleted queue from the cluster yet")
                    }
                }
            }
        });
    }

    // ------------------------------------------------------------- bindings

    pub(super) async fn set_shared_binding(
        &self,
        bind: bool,
        source: &str,
        b: Binding,
        conn: u64,
    ) -> AmqpResult<()> {
        let vh = &self.name;
        if self.binding_change(bind, source, &b, conn)?.is_none() {
            return Ok(());
        }
        let sync = self.sync()?;
        let d = self.defs(&sync);
        let (dt, dest) = dest_parts(&b.dest);
        let gone = |what: &str, name: &str| {
            AmqpError::new(
                reply::NOT_FOUND,
                format!("no {what} '{name}' in vhost '{vh}' (deleted meanwhile)"),
            )
        };
        let source_inc = d
            .inc_of("exchange", source)
            .ok_or_else(|| gone("exchange", source))?;
        let dest_inc = d.inc_of(dt, dest).ok_or_else(|| gone(dt, dest))?;
        let def = BDef {
            source: source.to_owned(),
            source_inc,
            destination_type: dt.to_owned(),
            destination: dest.to_owned(),
            dest_inc,
            routing_key: b.key.clone(),
            arguments: table_text(&b.args),
        };
        let key = topology::binding_key(vh, &def);
        let cmd = if bind {
            let mut cmd = MetaCommand::Put {
                key,
                value: serde_json::to_value(&def).unwrap_or_default(),
            };
            // Only while both ends are the ones checked here.
            let mut ends = vec![(dt, dest)];
            if !builtin(source) {
                ends.push(("exchange", source));
            }
            for (t, n) in ends {
                let (k, v) = match t {
                    "queue" => (
                        queue_key(vh, n),
                        d.queues.get(n).and_then(|q| serde_json::to_value(q).ok()),
                    ),
                    _ => (
                        exchange_key(vh, n),
                        d.exchanges
                            .get(n)
                            .and_then(|x| serde_json::to_value(x).ok()),
                    ),
                };
                cmd = MetaCommand::IfEquals {
                    key: k,
                    value: v.unwrap_or_default(),
                    then: Box::new(cmd),
                };
            }
            cmd
        } else {
            // Every entry of this binding (one per incarnation of its ends).
            let removed: BTreeSet<String> = d
                .bindings
                .iter()
                .filter(|(_, x)| {
                    x.source == def.source
                        && x.destination_type == def.destination_type
                        && x.destination == def.destination
                        && x.routing_key == def.routing_key
                        && x.arguments == def.arguments
                })
                .map(|(k, _)| k.clone())
                .collect();
            MetaCommand::Batch(d.cascade(vh, removed, Vec::new()))
        };
        if self.commit(&sync, cmd).await?.is_some() && bind {
            return Err(gone("queue or exchange", &format!("{source} -> {dest}")));
        }
        Ok(())
    }

    // --------------------------------------------------------------- mirror

    /// The front of a quorum queue on this node (see `crate::queue::quorum`).
    fn spawn_front(
        &self,
        info: QueueInfo,
        members: Vec<String>,
        link: Arc<dyn crate::queue::remote::Link>,
    ) -> AmqpResult<QueueHandle> {
        let sync = self.sync()?;
        let args = self.queue_args(&self.policies(), &info);
        let me = self.me.clone();
        let router: std::sync::Weak<dyn crate::queue::DeadLetterRouter> = self.me.clone();
        let env = crate::queue::quorum::Env {
            cluster: sync.cluster.clone(),
            link,
            persister: self.persister.clone(),
            router,
            on_auto_delete: Arc::new(move || {
                let me = me.clone();
                Box::new(move |info: &QueueInfo| {
                    if let Some(v) = me.upgrade() {
                        v.forget_queue(&info.name, info.id);
                    }
                })
            }),
        };
        crate::metrics::Churn::add(&self.churn.queues_created);
        Ok(crate::queue::quorum::spawn(info, args, members, env))
    }

    /// Apply changes mirrored from the map, on the definitions thread. A
    /// change that cannot be made is logged (the topology then differs
    /// from the map's until the next change).
    pub(crate) async fn mirror(&self, ops: Vec<Mirror>) -> AmqpResult<()> {
        self.change(move |v| {
            for op in ops {
                if let Err(e) = v.mirror_one(op) {
                    tracing::error!(vhost = %v.name, error = %e.text, "cannot apply a change from the cluster");
                }
            }
            Ok(())
        })
        .await
    }

    fn mirror_one(&self, op: Mirror) -> AmqpResult<()> {
        match op {
            Mirror::AddExchange(name, def) => {
                let args = topology::table_of(&def.arguments).map_err(internal_error)?;
                let x = self.build_exchange(
                    &name,
                    &def.kind,
                    def.durable,
                    def.auto_delete,
                    def.internal,
                    &args,
                )?;
                self.insert_exchange(x)
            }
            Mirror::RemoveExchange(name) => self.remove_exchange(&name, false),
            Mirror::AddQueue(s) => {
                if self.read().queues.contains_key(&s.name) {
                    return Ok(());
                }
                let id = self.next_queue_id.fetch_add(1, Ordering::AcqRel);
                let info = QueueInfo {
                    name: s.name.as_str().into(),
                    id,
                    vhost: self.name.clone(),
                    durable: s.durable,
                    exclusive_owner: None,
                    auto_delete: s.auto_delete,
                    arguments: s.arguments.clone(),
                    home: s.home.as_ref().map(|(h, _)| h.clone()),
                    quorum: s.quorum.as_ref().map(|(g, _, _)| *g),
                };
                let q = match (s.home, s.quorum) {
                    (_, Some((_, members, link))) => self.spawn_front(info, members, link)?,
                    (Some((_, link)), None) => crate::queue::remote::spawn(info, link),
                    (None, None) => {
                        let q = self
                            .spawn_queue(info)
                            .map_err(|why| AmqpError::new(reply::INTERNAL_ERROR, why))?;
                        if s.durable {
                            self.store(self.meta.put_queue(&warren_storage::QueueDef {
                                vhost: self.name.clone(),
                                name: s.name.clone(),
                                id,
                                auto_delete: s.auto_delete,
                                arguments: super::encode_table(&s.arguments),
                            }))?;
                        }
                        crate::metrics::Churn::add(&self.churn.queues_created);
                        q
                    }
                };
                self.write().queues.insert(s.name, q);
                self.changed();
                Ok(())
            }
            Mirror::RemoveQueue(name, id) => {
                self.remove_queue(&name, id);
                Ok(())
            }
            Mirror::Bind(source, b) => self.apply_binding(true, &source, b, 0),
            Mirror::Unbind(source, b) => self.apply_binding(false, &source, b, 0),
        }
    }
}
