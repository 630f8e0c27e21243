//! A virtual host: the registry of exchanges, queues and bindings, and routing.
//!
//! Topology is read-mostly: it sits behind a std `RwLock` that is never held
//! across an `.await`. Routing results for `(exchange, routing key)` are cached
//! in moka, stamped with a generation counter that every topology change bumps,
//! so a stale entry is simply a miss. Routes through a headers exchange depend
//! on message headers and are never cached.

use crate::error::{access_refused, not_found, precondition, AmqpError, AmqpResult};
use crate::exchange::{Binding, Dest, Exchange, Kind};
use crate::persist::Persister;
use crate::queue::{self, QueueHandle, QueueInfo};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;
use warren_protocol::reply;
use warren_protocol::types::{AMQPValue, FieldTable};
use warren_storage::{BindingDef, Definitions, ExchangeDef, MetaStore, QueueDef};

/// Topology: exchanges by name, queues by name.
#[derive(Default)]
struct Topology {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, QueueHandle>,
}

/// A cached routing result.
pub struct Route {
    exchange: ShortStr,
    routing_key: ShortStr,
    generation: u64,
    queues: Vec<QueueHandle>,
}

/// Queues a message goes to.
pub enum Routed {
    Cached(Arc<Route>),
    Fresh(Vec<QueueHandle>),
}

impl Routed {
    pub fn queues(&self) -> &[QueueHandle] {
        match self {
            Routed::Cached(r) => &r.queues,
            Routed::Fresh(v) => v,
        }
    }
}

/// What a queue.declare asks for.
pub struct QueueSpec<'a> {
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a FieldTable,
}

/// Queue arguments whose values must match on redeclaration (as RabbitMQ).
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
];

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
    /// For queue actors that delete themselves (auto-delete).
    me: Weak<VHost>,
    /// The message store service, given to every queue (durable ones store
    /// persistent messages; any queue may page).
    persister: Option<Persister>,
}

fn encode_table(t: &FieldTable) -> bytes::Bytes {
    cookie_factory::gen_simple(
        warren_protocol::types::generation::gen_field_table(t),
        Vec::new(),
    )
    .unwrap_or_default()
    .into()
}

/// A stored field table (validated before amq-protocol parses it).
fn decode_table(b: &[u8]) -> Result<FieldTable, String> {
    if b.is_empty() {
        return Ok(FieldTable::default());
    }
    warren_protocol::table::skip_table(b).map_err(|e| e.to_string())?;
    warren_protocol::types::parsing::parse_field_table(b)
        .map(|(_, t)| t)
        .map_err(|e| format!("bad arguments table: {e:?}"))
}

fn describe(v: Option<&AMQPValue>) -> String {
    match v {
        None => "none".into(),
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(v) => format!("{v:?}"),
    }
}

impl VHost {
    pub fn new(
        name: &str,
        meta: Arc<dyn MetaStore>,
        next_queue_id: Arc<AtomicU64>,
        persister: Option<Persister>,
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
        });
        {
            let mut t = v.write();
            for (n, k) in [
                ("", Kind::Direct),
                ("amq.direct", Kind::Direct),
                ("amq.fanout", Kind::Fanout),
                ("amq.topic", Kind::Topic),
                ("amq.headers", Kind::Headers),
                ("amq.match", Kind::Headers),
            ] {
                t.exchanges.insert(
                    n.into(),
                    Exchange::new(n, k, true, false, false, FieldTable::default()),
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
            AmqpError::new(reply::INTERNAL_ERROR, format!("storage failure: {e}"))
        })
    }

    // ------------------------------------------------------------ exchanges

    #[allow(clippy::too_many_arguments)]
    pub fn declare_exchange(
        &self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        let vh = &self.name;
        if name.is_empty() {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if passive {
            return if self.read().exchanges.contains_key(name) {
                Ok(())
            } else {
                Err(not_found("exchange", name, vh))
            };
        }
        let Some(k) = Kind::parse(kind) else {
            return Err(AmqpError::new(
                reply::COMMAND_INVALID,
                format!("invalid exchange type '{kind}'"),
            ));
        };
        let mut t = self.write();
        if let Some(e) = t.exchanges.get(name) {
            let ineq = |arg: &str, got: &str, cur: &str| {
                precondition(format!(
                    "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vh}': received '{got}' but current is '{cur}'"
                ))
            };
            if e.kind != k {
                return Err(ineq("type", k.as_str(), e.kind.as_str()));
            }
            if e.durable != durable {
                return Err(ineq(
                    "durable",
                    &durable.to_string(),
                    &e.durable.to_string(),
                ));
            }
            if e.auto_delete != auto_delete {
                return Err(ineq(
                    "auto_delete",
                    &auto_delete.to_string(),
                    &e.auto_delete.to_string(),
                ));
            }
            if e.internal != internal {
                return Err(ineq(
                    "internal",
                    &internal.to_string(),
                    &e.internal.to_string(),
                ));
            }
            return Ok(());
        }
        if name.starts_with("amq.") {
            return Err(access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        if durable {
            self.store(self.meta.put_exchange(&ExchangeDef {
                vhost: vh.clone(),
                name: name.into(),
                kind: k.as_str().into(),
                auto_delete,
                internal,
                arguments: encode_table(arguments),
            }))?;
        }
        t.exchanges.insert(
            name.into(),
            Exchange::new(name, k, durable, auto_delete, internal, arguments.clone()),
        );
        drop(t);
        self.changed();
        Ok(())
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        let vh = &self.name;
        if name.is_empty() || name.starts_with("amq.") {
            return Err(access_refused(
                format!("operation not permitted on exchange '{name}'")
                    .replace("exchange ''", "the default exchange"),
            ));
        }
        let mut t = self.write();
        let Some(e) = t.exchanges.get(name) else {
            return Ok(());
        };
        if if_unused && !e.bindings.is_empty() {
            return Err(precondition(format!(
                "exchange '{name}' in vhost '{vh}' in use"
            )));
        }
        let durable = e.durable;
        if durable {
            self.store(self.meta.delete_exchange(vh, name))?;
        }
        t.exchanges.remove(name);
        let dest = Dest::Exchange(name.into());
        let mut emptied = Vec::new();
        for (n, x) in t.exchanges.iter_mut() {
            if x.unbind_dest(&dest) > 0 && x.auto_delete && x.bindings.is_empty() {
                emptied.push(n.clone());
            }
        }
        self.remove_auto_delete_exchanges(&mut t, emptied);
        drop(t);
        self.changed();
        Ok(())
    }

    fn remove_auto_delete_exchanges(&self, t: &mut Topology, mut names: Vec<String>) {
        while let Some(n) = names.pop() {
            if let Some(x) = t.exchanges.remove(&n) {
                if x.durable {
                    let _ = self.store(self.meta.delete_exchange(&self.name, &n));
                }
                let dest = Dest::Exchange(n.as_str().into());
                for (m, y) in t.exchanges.iter_mut() {
                    if y.unbind_dest(&dest) > 0 && y.auto_delete && y.bindings.is_empty() {
                        names.push(m.clone());
                    }
                }
            }
        }
    }

    // --------------------------------------------------------------- queues

    /// Find a queue usable by connection `conn` (404 missing, 405 exclusive).
    pub fn queue(&self, name: &str, conn: u64) -> AmqpResult<QueueHandle> {
        let q = self
            .read()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("queue", name, &self.name))?;
        check_owner(&q, conn, &self.name)?;
        Ok(q)
    }

    /// Declare (or find, or check) a queue.
    pub fn declare_queue(&self, s: &QueueSpec<'_>, conn: u64) -> AmqpResult<QueueHandle> {
        let vh = &self.name;
        let name = s.name;
        if s.passive {
            return self.queue(name, conn).inspect(|q| {
                q.control(queue::QueueCmd::Touch);
            });
        }
        crate::queue_args::validate(name, vh, s.arguments)?;
        let mut t = self.write();
        if let Some(q) = t.queues.get(name) {
            check_owner(q, conn, vh)?;
            let i = &q.info;
            let ineq = |arg: &str, got: String, cur: String| {
                precondition(format!(
                    "inequivalent arg '{arg}' for queue '{name}' in vhost '{vh}': received '{got}' but current is '{cur}'"
                ))
            };
            if i.durable != s.durable {
                return Err(ineq(
                    "durable",
                    s.durable.to_string(),
                    i.durable.to_string(),
                ));
            }
            if i.exclusive_owner.is_some() != s.exclusive {
                // RabbitMQ answers an exclusive mismatch, even from the owner, with 405.
                return Err(locked(q, vh));
            }
            if i.auto_delete != s.auto_delete {
                return Err(ineq(
                    "auto_delete",
                    s.auto_delete.to_string(),
                    i.auto_delete.to_string(),
                ));
            }
            for arg in EQUIVALENT_QUEUE_ARGS {
                let got = s.arguments.inner().get(*arg);
                let cur = i.arguments.inner().get(*arg);
                let same = match (got, cur) {
                    (None, None) => true,
                    (Some(a), Some(b)) => crate::exchange::values_equal(a, b),
                    _ => false,
                };
                if !same {
                    return Err(ineq(arg, describe(got), describe(cur)));
                }
            }
            q.control(queue::QueueCmd::Touch);
            return Ok(q.clone());
        }
        let id = self.next_queue_id.fetch_add(1, Ordering::AcqRel);
        if s.durable && !s.exclusive {
            self.store(self.meta.put_queue(&QueueDef {
                vhost: vh.clone(),
                name: name.into(),
                id,
                auto_delete: s.auto_delete,
                arguments: encode_table(s.arguments),
            }))?;
        }
        let q = self.spawn_queue(QueueInfo {
            name: name.into(),
            id,
            vhost: vh.clone(),
            durable: s.durable,
            exclusive_owner: s.exclusive.then_some(conn),
            auto_delete: s.auto_delete,
            arguments: s.arguments.clone(),
        });
        t.queues.insert(name.into(), q.clone());
        drop(t);
        self.changed();
        Ok(q)
    }

    /// Start a queue actor that forgets itself here when it auto-deletes.
    fn spawn_queue(&self, info: QueueInfo) -> QueueHandle {
        let me = self.me.clone();
        queue::spawn(
            info,
            self.me.clone(),
            self.persister.clone(),
            Box::new(move |info: &QueueInfo| {
                if let Some(v) = me.upgrade() {
                    v.forget_queue(&info.name, info.id);
                }
            }),
        )
    }

    /// Rebuild this vhost's durable exchanges, queues and bindings from
    /// stored definitions (at start-up, before any client connects). Nothing
    /// is written back. Returns the highest queue id seen.
    pub fn recover(&self, defs: &Definitions) -> Result<u64, String> {
        let mine = |v: &str| v == self.name;
        let mut t = self.write();
        let mut max_id = 0;
        for e in defs.exchanges.iter().filter(|e| mine(&e.vhost)) {
            let kind = Kind::parse(&e.kind)
                .ok_or_else(|| format!("exchange '{}' has unknown type '{}'", e.name, e.kind))?;
            let args = decode_table(&e.arguments)
                .map_err(|why| format!("exchange '{}': {why}", e.name))?;
            t.exchanges.insert(
                e.name.clone(),
                Exchange::new(&e.name, kind, true, e.auto_delete, e.internal, args),
            );
        }
        for q in defs.queues.iter().filter(|q| mine(&q.vhost)) {
            let arguments =
                decode_table(&q.arguments).map_err(|why| format!("queue '{}': {why}", q.name))?;
            max_id = max_id.max(q.id);
            let handle = self.spawn_queue(QueueInfo {
                name: q.name.as_str().into(),
                id: q.id,
                vhost: self.name.clone(),
                durable: true,
                exclusive_owner: None,
                auto_delete: q.auto_delete,
                arguments,
            });
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

    /// Delete a queue through its actor (which checks the conditions), then
    /// forget it. Returns the number of ready messages it held.
    pub async fn delete_queue(
        &self,
        q: &QueueHandle,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let n = q
            .ask(|reply| queue::QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            })
            .await
            .unwrap_or(Ok(0))?;
        self.forget_queue(q.name(), q.id());
        Ok(n)
    }

    /// Remove a queue (already stopped) and its bindings from the topology.
    pub fn forget_queue(&self, name: &str, id: u64) {
        let mut t = self.write();
        match t.queues.get(name) {
            Some(q) if q.id() == id => {}
            _ => return,
        }
        let q = t.queues.remove(name);
        if q.as_ref()
            .is_some_and(|q| q.info.durable && q.info.exclusive_owner.is_none())
        {
            let _ = self.store(self.meta.delete_queue(&self.name, name));
        }
        let dest = Dest::Queue(name.into());
        let mut emptied = Vec::new();
        for (n, x) in t.exchanges.iter_mut() {
            if x.unbind_dest(&dest) > 0 && x.auto_delete && x.bindings.is_empty() {
                emptied.push(n.clone());
            }
        }
        self.remove_auto_delete_exchanges(&mut t, emptied);
        drop(t);
        self.changed();
    }

    // ------------------------------------------------------------- bindings

    /// Bind or unbind `dest` to `source`.
    pub fn set_binding(
        &self,
        bind: bool,
        source: &str,
        dest: Dest,
        key: &str,
        args: &FieldTable,
        conn: u64,
    ) -> AmqpResult<()> {
        let vh = &self.name;
        if source.is_empty() {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let mut t = self.write();
        let dest_durable = match &dest {
            Dest::Queue(n) => {
                let q = t
                    .queues
                    .get(&**n)
                    .ok_or_else(|| not_found("queue", n, vh))?;
                check_owner(q, conn, vh)?;
                q.info.durable && q.info.exclusive_owner.is_none()
            }
            Dest::Exchange(n) => {
                if n.is_empty() {
                    return Err(access_refused(
                        "operation not permitted on the default exchange",
                    ));
                }
                t.exchanges
                    .get(&**n)
                    .ok_or_else(|| not_found("exchange", n, vh))?
                    .durable
            }
        };
        let src = t
            .exchanges
            .get_mut(source)
            .ok_or_else(|| not_found("exchange", source, vh))?;
        if bind && src.kind == Kind::Headers {
            crate::exchange::check_x_match(args)?;
        }
        let b = Binding {
            dest: dest.clone(),
            key: key.to_owned(),
            args: args.clone(),
        };
        let durable = src.durable && dest_durable;
        let def = || BindingDef {
            vhost: vh.clone(),
            source: source.into(),
            destination: match &dest {
                Dest::Queue(n) | Dest::Exchange(n) => n.to_string(),
            },
            to_queue: matches!(dest, Dest::Queue(_)),
            routing_key: key.into(),
            arguments: encode_table(args),
        };
        if bind {
            if src.bindings.contains(&b) {
                return Ok(());
            }
            if durable {
                self.store(self.meta.put_binding(&def()))?;
            }
            src.bind(b);
        } else {
            if !src.bindings.contains(&b) {
                return Ok(());
            }
            if durable {
                self.store(self.meta.delete_binding(&def()))?;
            }
            src.unbind(&b);
            if src.auto_delete && src.bindings.is_empty() {
                self.remove_auto_delete_exchanges(&mut t, vec![source.to_owned()]);
            }
        }
        drop(t);
        self.changed();
        Ok(())
    }

    // -------------------------------------------------------------- routing

    fn route_key(&self, exchange: &str, routing_key: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        exchange.hash(&mut h);
        routing_key.hash(&mut h);
        h.finish()
    }

    /// [`VHost::route`] through a one-entry memo the caller keeps (a
    /// connection's last route): a publisher that keeps to one exchange and
    /// routing key skips the shared cache's hashing and bookkeeping. The memo
    /// is only trusted while the topology generation is unchanged.
    pub fn route_memo(
        &self,
        memo: &mut Option<Arc<Route>>,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        header: &ContentHeader,
    ) -> AmqpResult<Routed> {
        if let Some(r) = memo.as_ref() {
            if r.generation == self.generation.load(Ordering::Acquire)
                && &r.exchange == exchange
                && &r.routing_key == routing_key
            {
                self.route_stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Routed::Cached(r.clone()));
            }
        }
        let routed = self.route(exchange, routing_key, header)?;
        if let Routed::Cached(r) = &routed {
            *memo = Some(r.clone());
        }
        Ok(routed)
    }

    /// The queues a message published to `exchange` goes to.
    pub fn route(
        &self,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        header: &ContentHeader,
    ) -> AmqpResult<Routed> {
        let key = self.route_key(exchange.as_str(), routing_key.as_str());
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(r) = self.routes.get(&key) {
            if r.generation == generation
                && &r.exchange == exchange
                && &r.routing_key == routing_key
            {
                self.route_stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Routed::Cached(r));
            }
        }
        self.route_stats.misses.fetch_add(1, Ordering::Relaxed);
        let t = self.read();
        let ex = exchange.as_str();
        let e = t
            .exchanges
            .get(ex)
            .ok_or_else(|| not_found("exchange", ex, &self.name))?;
        if e.internal {
            return Err(access_refused(format!(
                "cannot publish to internal exchange '{ex}' in vhost '{}'",
                self.name
            )));
        }
        let mut queues = Vec::new();
        let mut cacheable = true;
        if ex.is_empty() {
            if let Some(q) = t.queues.get(routing_key.as_str()) {
                queues.push(q.clone());
            }
        } else {
            let headers = if header.has_headers() {
                header.headers()
            } else {
                None
            };
            let mut names: Vec<Arc<str>> = Vec::new();
            let mut visited: Vec<&str> = Vec::new();
            resolve(
                &t,
                e,
                routing_key.as_str(),
                headers.as_ref(),
                &mut names,
                &mut visited,
                &mut cacheable,
            );
            names.sort();
            names.dedup();
            queues.extend(names.iter().filter_map(|n| t.queues.get(&**n).cloned()));
        }
        drop(t);
        if !cacheable {
            return Ok(Routed::Fresh(queues));
        }
        let r = Arc::new(Route {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            generation,
            queues,
        });
        self.routes.insert(key, r.clone());
        Ok(Routed::Cached(r))
    }

    /// Route-cache hit/miss figures (for operators and tests).
    pub fn route_cache_len(&self) -> u64 {
        self.routes.entry_count()
    }
}

/// Follow an exchange's bindings (and exchange-to-exchange bindings, and the
/// alternate exchange when nothing matched) down to queue names.
fn resolve<'t>(
    t: &'t Topology,
    e: &'t Exchange,
    routing_key: &str,
    headers: Option<&FieldTable>,
    out: &mut Vec<Arc<str>>,
    visited: &mut Vec<&'t str>,
    cacheable: &mut bool,
) -> bool {
    if visited.contains(&&*e.name) {
        return false;
    }
    visited.push(&e.name);
    if e.kind == Kind::Headers {
        *cacheable = false;
    }
    let mut dests = Vec::new();
    e.route(routing_key, headers, &mut dests);
    let mut routed = false;
    for d in dests {
        match d {
            Dest::Queue(n) => {
                if t.queues.contains_key(&*n) {
                    routed = true;
                    out.push(n);
                }
            }
            Dest::Exchange(n) => {
                if let Some(x) = t.exchanges.get(&*n) {
                    routed |= resolve(t, x, routing_key, headers, out, visited, cacheable);
                }
            }
        }
    }
    if !routed {
        if let Some(ae) = e.alternate.as_deref().and_then(|a| t.exchanges.get(a)) {
            routed = resolve(t, ae, routing_key, headers, out, visited, cacheable);
        }
    }
    routed
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
