//! A virtual host: the registry of exchanges, queues and bindings, and
//! routing ([`routing`]).
//!
//! Topology is read-mostly: it sits behind a std `RwLock` that is never held
//! across an `.await`, nor across a store write. Definition changes
//! (declare, bind, unbind, delete, a queue deleting itself) run one at a time,
//! in arrival order, on the vhost's definitions thread ([`definitions`]):
//! each is checked against the topology under the read lock, written to the
//! store with no lock held (a durable change is synced before the client is
//! answered), then applied under the write lock, which is held only for the
//! in-memory update. Since nothing else changes the topology, what was
//! checked still holds when it is applied. Routing and lookups never wait
//! for a store write, and neither does any tokio worker.
//!
//! Routing results for `(exchange, routing key)` are cached in moka, stamped
//! with a generation counter that every topology change bumps, so a stale
//! entry is simply a miss. Routes through a headers exchange depend on
//! message headers and are never cached.

mod definitions;
mod routing;
mod shared;
#[cfg(test)]
mod tests;

pub use definitions::{ExchangeSpec, QueueSpec};
pub use routing::{Route, Routed};
pub(crate) use shared::{Mirror, NewShared};

use crate::error::{internal_error, not_found, AmqpError, AmqpResult};
use crate::exchange::{self, Binding, Dest, Exchange};
use crate::persist::Persister;
use crate::policy::{Policies, Target};
use crate::queue::args::QueueArgs;
use crate::queue::{self, QueueCmd, QueueHandle, QueueInfo};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use tokio::sync::oneshot;
use warren_protocol::reply;
use warren_protocol::types::FieldTable;
use warren_storage::{Definitions, MetaStore};

/// Topology: exchanges by name, queues by name.
#[derive(Default)]
struct Topology {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, QueueHandle>,
}

/// An exchange as operators see it (a copy).
pub struct ExchangeView {
    pub name: String,
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    pub bindings: Vec<exchange::Binding>,
    pub counters: Arc<crate::metrics::ExchangeCounters>,
    /// Duplicates dropped, for a deduplicating exchange.
    pub deduplicated: Option<u64>,
}

fn view(x: &Exchange) -> ExchangeView {
    ExchangeView {
        name: x.name.to_string(),
        kind: x.kind.name,
        durable: x.durable,
        auto_delete: x.auto_delete,
        internal: x.internal,
        arguments: x.arguments.clone(),
        bindings: x.bindings.clone(),
        counters: x.counters.clone(),
        deduplicated: x
            .dedup
            .as_ref()
            .map(|d| d.duplicates.load(Ordering::Relaxed)),
    }
}

/// A job for the definitions thread.
type Change = Box<dyn FnOnce() + Send>;

pub struct VHost {
    pub name: String,
    topology: RwLock<Topology>,
    /// Bumped on every topology change; cached routes from older generations
    /// are misses.
    generation: AtomicU64,
    routes: moka::sync::Cache<u64, Arc<Route>>,
    /// Route-cache hits and misses so far.
    pub route_stats: crate::persist::CacheStats,
    hasher: std::collections::hash_map::RandomState,
    /// Durable definitions.
    meta: Arc<dyn MetaStore>,
    /// Source of queue ids.
    next_queue_id: Arc<AtomicU64>,
    /// For jobs on the definitions thread and for queue actors (auto-delete,
    /// dead-letter routing), which hold it weakly.
    me: Weak<VHost>,
    /// The message store service, given to every queue (durable ones store
    /// persistent messages; any queue may page).
    persister: Option<Persister>,
    /// Queue churn counters (the broker's).
    churn: Arc<crate::metrics::Churn>,
    /// Message counters of this vhost's connections.
    pub metrics: crate::metrics::Global,
    /// The definitions thread's mailbox (see the module comment).
    changes: mpsc::Sender<Change>,
    /// The policies and operator policies in force, replaced whole (on the
    /// definitions thread) when one changes.
    policies: RwLock<Arc<Policies>>,
    /// The broker-wide consumer timeout (ms), for queues that set none.
    consumer_timeout: Option<u64>,
    /// On a clustered node: the cluster its definitions are shared through.
    cluster: std::sync::OnceLock<crate::replicate::SyncSlot>,
}

pub(crate) fn encode_table(t: &FieldTable) -> bytes::Bytes {
    cookie_factory::gen_simple(
        warren_protocol::types::generation::gen_field_table(t),
        Vec::new(),
    )
    .unwrap_or_default()
    .into()
}

/// A stored field table (validated before amq-protocol parses it).
pub fn decode_table(b: &[u8]) -> Result<FieldTable, String> {
    if b.is_empty() {
        return Ok(FieldTable::default());
    }
    warren_protocol::table::skip_table(b).map_err(|e| e.to_string())?;
    warren_protocol::types::parsing::parse_field_table(b)
        .map(|(_, t)| t)
        .map_err(|e| format!("bad arguments table: {e:?}"))
}

/// Start the thread that applies definition changes in order. It may block
/// on store writes; it runs inside the tokio runtime's context (if any), so
/// that it can spawn queue actors. It ends when its vhost is dropped.
fn start_definitions_thread(vhost: &str) -> mpsc::Sender<Change> {
    let (tx, rx) = mpsc::channel::<Change>();
    let runtime = tokio::runtime::Handle::try_current().ok();
    let span = tracing::info_span!("definitions", vhost);
    std::thread::Builder::new()
        .name("warren-defs".into())
        .spawn(move || {
            let _rt = runtime.as_ref().map(|h| h.enter());
            let _span = span.enter();
            for job in rx {
                job();
            }
        })
        .expect("cannot start the definitions thread");
    tx
}

impl VHost {
    pub fn new(
        name: &str,
        meta: Arc<dyn MetaStore>,
        next_queue_id: Arc<AtomicU64>,
        persister: Option<Persister>,
        churn: Arc<crate::metrics::Churn>,
        consumer_timeout: Option<u64>,
    ) -> Arc<VHost> {
        let v = Arc::new_cyclic(|me| VHost {
            name: name.to_owned(),
            topology: RwLock::new(Topology::default()),
            generation: AtomicU64::new(1),
            routes: moka::sync::Cache::new(10_000),
            route_stats: Default::default(),
            hasher: Default::default(),
            meta,
            next_queue_id,
            me: me.clone(),
            persister,
            churn,
            metrics: Default::default(),
            changes: start_definitions_thread(name),
            policies: RwLock::default(),
            consumer_timeout,
            cluster: Default::default(),
        });
        {
            let mut t = v.write();
            for (n, k) in [
                ("", "direct"),
                ("amq.direct", "direct"),
                ("amq.fanout", "fanout"),
                ("amq.topic", "topic"),
                ("amq.headers", "headers"),
                ("amq.match", "headers"),
            ] {
                let Some(kind) = exchange::kind(k) else {
                    continue;
                };
                t.exchanges.insert(
                    n.into(),
                    Exchange::new(n, kind, true, false, false, FieldTable::default()),
                );
            }
        }
        v
    }

    fn read(&self) -> RwLockReadGuard<'_, Topology> {
        // Topology updates never panic half-way, so a poisoned lock is consistent.
        self.topology.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Topology> {
        self.topology.write().unwrap_or_else(|e| e.into_inner())
    }
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.routes.invalidate_all();
    }
    fn store<T>(&self, r: warren_storage::Result<T>) -> AmqpResult<T> {
        r.map_err(|e| {
            tracing::error!(error = %e, "definition store failed");
            internal_error(format!("storage failure: {e}"))
        })
    }

    /// Run a definition change on the definitions thread and wait for it.
    async fn change<T: Send + 'static>(
        &self,
        f: impl FnOnce(&VHost) -> AmqpResult<T> + Send + 'static,
    ) -> AmqpResult<T> {
        let gone = || internal_error("the definitions thread has stopped");
        let me = self.me.upgrade().ok_or_else(gone)?;
        let (tx, rx) = oneshot::channel();
        let job: Change = Box::new(move || {
            let _ = tx.send(f(&me));
        });
        self.changes.send(job).map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Queue a definition change without waiting for it (queue actors,
    /// which never wait).
    fn change_later(&self, f: impl FnOnce(&VHost) + Send + 'static) {
        let Some(me) = self.me.upgrade() else { return };
        let _ = self.changes.send(Box::new(move || f(&me)));
    }

    /// Find a queue usable by connection `conn` (404 missing, 405 exclusive).
    pub fn queue(&self, name: &str, conn: u64) -> AmqpResult<QueueHandle> {
        let q = self
            .find_queue(name)
            .ok_or_else(|| not_found("queue", name, &self.name))?;
        check_owner(&q, conn, &self.name)?;
        Ok(q)
    }

    /// Every queue, in name order.
    pub fn queues(&self) -> Vec<QueueHandle> {
        let mut v: Vec<QueueHandle> = self.read().queues.values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// The queue called `name`, whoever owns it (for operators).
    pub fn find_queue(&self, name: &str) -> Option<QueueHandle> {
        self.read().queues.get(name).cloned()
    }

    /// Every exchange as operators see it, in name order.
    pub fn exchanges(&self) -> Vec<ExchangeView> {
        let mut v: Vec<ExchangeView> = self.read().exchanges.values().map(view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The exchange called `name` as operators see it.
    pub fn exchange(&self, name: &str) -> Option<ExchangeView> {
        self.read().exchanges.get(name).map(view)
    }

    /// How many exchanges the vhost holds.
    pub fn exchange_count(&self) -> usize {
        self.read().exchanges.len()
    }

    /// How many queues the vhost holds.
    pub fn queue_count(&self) -> usize {
        self.read().queues.len()
    }

    /// The type name of exchange `name` (`None`: no such exchange).
    pub fn exchange_kind(&self, name: &str) -> Option<&'static str> {
        self.read().exchanges.get(name).map(|x| x.kind.name)
    }

    /// The policies in force.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The policies in force before anything is declared or recovered.
    pub fn init_policies(&self, policies: Policies) {
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policies);
    }

    /// Put new policies in force: every queue and exchange they (or the
    /// ones they replace) match gets its new settings at once. Runs after
    /// every definition change already queued, so no declare sees the old
    /// policies once this has returned.
    pub async fn set_policies(&self, policies: Policies) -> AmqpResult<()> {
        let policies = Arc::new(policies);
        self.change(move |v| {
            *v.policies.write().unwrap_or_else(|e| e.into_inner()) = policies.clone();
            let queues: Vec<QueueHandle> = v.read().queues.values().cloned().collect();
            for q in queues {
                let args = v.queue_args(&policies, &q.info);
                q.tell(QueueCmd::Reconfigure(Box::new(args)));
            }
            {
                let mut t = v.write();
                for x in t.exchanges.values_mut() {
                    v.apply_exchange_policy(&policies, x);
                }
            }
            v.changed();
            Ok(())
        })
        .await
    }

    /// Set an exchange's alternate exchange from its argument and `policies`.
    fn apply_exchange_policy(&self, policies: &Policies, x: &mut Exchange) {
        x.alternate = policies
            .applied(Target::Exchange, &x.name)
            .alternate_exchange(exchange::declared_alternate(&x.arguments));
    }

    /// The settings a queue acts on: its arguments under `policies`, and
    /// the broker's consumer timeout where neither sets one.
    fn queue_args(&self, policies: &Policies, info: &QueueInfo) -> QueueArgs {
        let mut args = QueueArgs::effective(
            &info.arguments,
            policies.applied(Target::queue(&info.arguments), &info.name),
        );
        args.consumer_timeout = args.consumer_timeout.or(self.consumer_timeout);
        args
    }

    /// Start a queue actor that forgets itself here when it auto-deletes
    /// (a stream's actor, for a stream: it needs the store).
    fn spawn_queue(&self, info: QueueInfo) -> Result<QueueHandle, String> {
        let me = self.me.clone();
        let router: Weak<dyn queue::DeadLetterRouter> = self.me.clone();
        let args = self.queue_args(&self.policies(), &info);
        if args.stream {
            let Some(p) = self.persister.clone() else {
                return Err("streams need the message store".into());
            };
            return queue::stream::spawn(info, args, p);
        }
        Ok(queue::spawn(
            info,
            args,
            router,
            self.persister.clone(),
            Box::new(move |info: &QueueInfo| {
                if let Some(v) = me.upgrade() {
                    v.forget_queue(&info.name, info.id);
                }
            }),
        ))
    }

    /// Rebuild this vhost's durable exchanges, queues and bindings from
    /// stored definitions (at start-up, before any client connects). Nothing
    /// is written back. Returns the highest queue id seen.
    pub fn recover(&self, defs: &Definitions) -> Result<u64, String> {
        let mine = |v: &str| v == self.name;
        let policies = self.policies();
        let mut t = self.write();
        let mut max_id = 0;
        for e in defs.exchanges.iter().filter(|e| mine(&e.vhost)) {
            let kind = exchange::kind(&e.kind)
                .ok_or_else(|| format!("exchange '{}' has unknown type '{}'", e.name, e.kind))?;
            let args = decode_table(&e.arguments)
                .map_err(|why| format!("exchange '{}': {why}", e.name))?;
            let dedup = crate::dedup::exchange_settings(kind.name, true, &args)
                .map_err(|err| format!("exchange '{}': {}", e.name, err.text))?;
            let mut x = Exchange::new(&e.name, kind, true, e.auto_delete, e.internal, args);
            if let Some(d) = dedup {
                let d = Arc::new(crate::dedup::ExchangeDedup::new(d, &self.name, &e.name));
                if let (true, Some(p)) = (d.settings.persist, &self.persister) {
                    let keys = p
                        .load_dedup(&d.scope)
                        .map_err(|why| format!("exchange '{}': {why}", e.name))?;
                    let ops = d.restore(keys, crate::message::unix_ms());
                    if !ops.is_empty() {
                        p.submit_nowait(ops);
                    }
                }
                x.dedup = Some(d);
            }
            self.apply_exchange_policy(&policies, &mut x);
            t.exchanges.insert(e.name.clone(), x);
        }
        for q in defs.queues.iter().filter(|q| mine(&q.vhost)) {
            let arguments =
                decode_table(&q.arguments).map_err(|why| format!("queue '{}': {why}", q.name))?;
            max_id = max_id.max(q.id);
            let handle = self
                .spawn_queue(QueueInfo {
                    name: q.name.as_str().into(),
                    id: q.id,
                    vhost: self.name.clone(),
                    durable: true,
                    exclusive_owner: None,
                    auto_delete: q.auto_delete,
                    arguments,
                    home: None,
                    quorum: None,
                })
                .map_err(|why| format!("queue '{}': {why}", q.name))?;
            t.queues.insert(q.name.clone(), handle);
        }
        for b in defs.bindings.iter().filter(|b| mine(&b.vhost)) {
            let args = decode_table(&b.arguments)
                .map_err(|why| format!("binding from '{}': {why}", b.source))?;
            let dest = if b.to_queue {
                Dest::Queue(b.destination.as_str().into())
            } else {
                Dest::Exchange(b.destination.as_str().into())
            };
            if let Some(x) = t.exchanges.get_mut(&b.source) {
                x.bind(Binding {
                    dest,
                    key: b.routing_key.clone(),
                    args,
                });
            }
        }
        drop(t);
        self.changed();
        self.next_queue_id.fetch_max(max_id + 1, Ordering::AcqRel);
        Ok(max_id)
    }

    /// Entries in the route cache (for operators and tests).
    pub fn route_cache_len(&self) -> u64 {
        self.routes.entry_count()
    }
}

fn locked(q: &QueueHandle, vhost: &str) -> AmqpError {
    AmqpError::new(
        reply::RESOURCE_LOCKED,
        format!(
            "cannot obtain exclusive access to locked queue '{}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            q.name()
        ),
    )
}

fn check_owner(q: &QueueHandle, conn: u64, vhost: &str) -> AmqpResult<()> {
    match q.info.exclusive_owner {
        Some(owner) if owner != conn => Err(locked(q, vhost)),
        _ => Ok(()),
    }
}
