//! Definition changes: declare and delete exchanges and queues, bind and
//! unbind. Each public method does what needs no change at once (argument
//! checks, passive declares) and sends the rest to the definitions thread
//! (see the module comment of `vhost`), where it is checked under the read
//! lock, stored with no lock held, and applied under the write lock.

use super::{check_owner, encode_table, locked, Topology, VHost};
use crate::error::{access_refused, not_found, precondition, AmqpError, AmqpResult};
use crate::exchange::{self, Binding, Dest, Exchange};
use crate::queue::{QueueCmd, QueueHandle, QueueInfo};
use std::sync::atomic::Ordering;
use warren_protocol::reply;
use warren_protocol::types::{AMQPValue, FieldTable};
use warren_storage::{BindingDef, ExchangeDef, QueueDef};

/// What an exchange.declare asks for.
pub struct ExchangeSpec<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: &'a FieldTable,
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

/// A queue.declare taken to the definitions thread.
struct NewQueue {
    name: String,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: FieldTable,
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
    "x-delivery-limit",
    "x-consumer-timeout",
    "x-message-deduplication",
    "x-deduplication-header",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
];

/// Exchange arguments whose values must match on redeclaration: RabbitMQ's
/// `alternate-exchange`, and those that decide what an exchange of a
/// plugin's type does (a redeclaration that changed them would be accepted
/// and ignored).
const EQUIVALENT_EXCHANGE_ARGS: &[&str] = &[
    "alternate-exchange",
    "x-delayed-type",
    "hash-header",
    "hash-property",
    "x-message-deduplication",
    "x-cache-size",
    "x-cache-ttl",
    "x-cache-persistence",
    "x-deduplication-header",
];

/// A field value as RabbitMQ prints it in an inequivalence error.
fn describe(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        v => match crate::fields::as_int(v) {
            Some(n) => n.to_string(),
            None => format!("{v:?}"),
        },
    }
}

/// RabbitMQ's "inequivalent arg" reason: both values, or which side has none.
fn inequivalent(got: Option<&AMQPValue>, cur: Option<&AMQPValue>) -> String {
    let typed = |v: &AMQPValue| {
        format!(
            "the value '{}' of type '{}'",
            describe(v),
            crate::queue::args::type_name(v)
        )
    };
    match (got, cur) {
        (Some(g), Some(c)) => format!(
            "received '{}' but current is '{}'",
            describe(g),
            describe(c)
        ),
        (None, Some(c)) => format!("received none but current is {}", typed(c)),
        (Some(g), None) => format!("received {} but current is none", typed(g)),
        (None, None) => "received none but current is none".into(),
    }
}

fn default_exchange_refused() -> AmqpError {
    access_refused("operation not permitted on the default exchange")
}

impl VHost {
    // ------------------------------------------------------------ exchanges

    pub async fn declare_exchange(&self, s: ExchangeSpec<'_>) -> AmqpResult<()> {
        if s.name.is_empty() {
            return Err(default_exchange_refused());
        }
        if s.passive {
            return if self.read().exchanges.contains_key(s.name) {
                Ok(())
            } else {
                Err(not_found("exchange", s.name, &self.name))
            };
        }
        let x = self.build_exchange(
            s.name,
            s.kind,
            s.durable,
            s.auto_delete,
            s.internal,
            s.arguments,
        )?;
        if self.clustered() {
            return self.declare_shared_exchange(x).await;
        }
        self.change(move |v| v.add_exchange(x)).await
    }

    /// An exchange as declared (checked, not yet added).
    pub(crate) fn build_exchange(
        &self,
        name: &str,
        kind: &str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> AmqpResult<Exchange> {
        let Some(kind) = exchange::kind(kind) else {
            return Err(AmqpError::new(
                reply::COMMAND_INVALID,
                format!("invalid exchange type '{kind}'"),
            ));
        };
        (kind.check_arguments)(arguments)?;
        let dedup = crate::dedup::exchange_settings(kind.name, durable, arguments)?;
        let mut x = Exchange::new(
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments.clone(),
        );
        x.dedup = dedup
            .map(|d| std::sync::Arc::new(crate::dedup::ExchangeDedup::new(d, &self.name, name)));
        Ok(x)
    }

    /// Add a declared exchange, or check it against the one there is.
    fn add_exchange(&self, x: Exchange) -> AmqpResult<()> {
        let name = x.name.to_string();
        let name = name.as_str();
        if let Some(e) = self.read().exchanges.get(name) {
            return self.check_exchange(e, &x);
        }
        if name.starts_with("amq.") {
            return Err(access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        self.insert_exchange(x)
    }

    /// Add an exchange (stored first if durable), replacing any by its name.
    pub(super) fn insert_exchange(&self, x: Exchange) -> AmqpResult<()> {
        let vh = &self.name;
        let name = x.name.to_string();
        let name = name.as_str();
        if x.durable {
            self.store(self.meta.put_exchange(&ExchangeDef {
                vhost: vh.clone(),
                name: name.into(),
                kind: x.kind.name.into(),
                auto_delete: x.auto_delete,
                internal: x.internal,
                arguments: encode_table(&x.arguments),
            }))?;
        }
        let mut x = x;
        self.apply_exchange_policy(&self.policies(), &mut x);
        self.write().exchanges.insert(name.into(), x);
        self.changed();
        Ok(())
    }

    /// A redeclaration must match the exchange's type, flags and arguments.
    pub(super) fn check_exchange(&self, e: &Exchange, x: &Exchange) -> AmqpResult<()> {
        let vh = &self.name;
        let name = &*x.name;
        {
            let ineq = |arg: &str, got: &str, cur: &str| {
                precondition(format!(
                    "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vh}': received '{got}' but current is '{cur}'"
                ))
            };
            let flag = |b: bool| b.to_string();
            if e.kind != x.kind {
                return Err(ineq("type", x.kind.name, e.kind.name));
            }
            if e.durable != x.durable {
                return Err(ineq("durable", &flag(x.durable), &flag(e.durable)));
            }
            if e.auto_delete != x.auto_delete {
                return Err(ineq(
                    "auto_delete",
                    &flag(x.auto_delete),
                    &flag(e.auto_delete),
                ));
            }
            if e.internal != x.internal {
                return Err(ineq("internal", &flag(x.internal), &flag(e.internal)));
            }
            for arg in EQUIVALENT_EXCHANGE_ARGS {
                let got = x.arguments.inner().get(*arg);
                let cur = e.arguments.inner().get(*arg);
                let same = match (got, cur) {
                    (None, None) => true,
                    (Some(a), Some(b)) => crate::fields::values_equal(a, b),
                    _ => false,
                };
                if !same {
                    return Err(precondition(format!(
                        "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vh}': {}",
                        inequivalent(got, cur)
                    )));
                }
            }
            Ok(())
        }
    }

    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(access_refused(
                format!("operation not permitted on exchange '{name}'")
                    .replace("exchange ''", "the default exchange"),
            ));
        }
        if self.clustered() {
            return self.delete_shared_exchange(name, if_unused).await;
        }
        let name = name.to_owned();
        self.change(move |v| v.remove_exchange(&name, if_unused))
            .await
    }

    pub(super) fn remove_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        let durable = match self.read().exchanges.get(name) {
            None => return Ok(()),
            Some(e) if if_unused && !e.bindings.is_empty() => {
                return Err(precondition(format!(
                    "exchange '{name}' in vhost '{}' in use",
                    self.name
                )))
            }
            Some(e) => e.durable,
        };
        if durable {
            self.store(self.meta.delete_exchange(&self.name, name))?;
            self.forget_dedup_keys(name);
        }
        let gone = {
            let mut t = self.write();
            t.exchanges.remove(name);
            unbind_everywhere(&mut t, Dest::Exchange(name.into()))
        };
        self.changed();
        self.forget_stored_exchanges(gone);
        Ok(())
    }

    /// Delete the stored definitions of exchanges that went with the last
    /// of their bindings (best effort: a failure is logged).
    fn forget_stored_exchanges(&self, names: Vec<String>) {
        for n in names {
            let _ = self.store(self.meta.delete_exchange(&self.name, &n));
            self.forget_dedup_keys(&n);
        }
    }

    /// Drop a deleted durable exchange's stored deduplication keys (a
    /// range delete: nothing to do if it had none).
    fn forget_dedup_keys(&self, exchange: &str) {
        if let Some(p) = &self.persister {
            p.submit_nowait(vec![warren_storage::MessageOp::DedupDropScope {
                scope: crate::dedup::exchange_scope(&self.name, exchange),
            }]);
        }
    }

    // --------------------------------------------------------------- queues

    /// Declare (or find, or check) a queue.
    pub async fn declare_queue(&self, s: QueueSpec<'_>, conn: u64) -> AmqpResult<QueueHandle> {
        crate::metrics::Churn::add(&self.churn.queues_declared);
        if s.passive {
            return self.queue(s.name, conn).inspect(|q| {
                q.tell(QueueCmd::Touch);
            });
        }
        crate::queue::args::validate(s.name, &self.name, s.arguments)?;
        // A redeclaration (the common case) changes nothing.
        let existing = self.read().queues.get(s.name).cloned();
        if let Some(q) = existing {
            self.check_equivalent(&q, &s, conn)?;
            q.tell(QueueCmd::Touch);
            return Ok(q);
        }
        crate::queue::args::validate_type(
            s.name,
            &self.name,
            s.durable,
            s.exclusive,
            s.auto_delete,
            s.arguments,
        )?;
        if self.clustered() && !s.exclusive {
            return self.declare_shared_queue(&s, conn).await;
        }
        let q = NewQueue {
            name: s.name.to_owned(),
            durable: s.durable,
            exclusive: s.exclusive,
            auto_delete: s.auto_delete,
            arguments: s.arguments.clone(),
        };
        self.change(move |v| v.add_queue(q, conn)).await
    }

    fn add_queue(&self, s: NewQueue, conn: u64) -> AmqpResult<QueueHandle> {
        let existing = self.read().queues.get(&s.name).cloned();
        if let Some(q) = existing {
            // Declared meanwhile by someone else.
            let spec = QueueSpec {
                name: &s.name,
                passive: false,
                durable: s.durable,
                exclusive: s.exclusive,
                auto_delete: s.auto_delete,
                arguments: &s.arguments,
            };
            self.check_equivalent(&q, &spec, conn)?;
            q.tell(QueueCmd::Touch);
            return Ok(q);
        }
        let id = self.next_queue_id.fetch_add(1, Ordering::AcqRel);
        // Started first: a stream reads the store as it starts, and one
        // that cannot is not declared (nothing stored yet).
        let q = self
            .spawn_queue(QueueInfo {
                name: s.name.as_str().into(),
                id,
                vhost: self.name.clone(),
                durable: s.durable,
                exclusive_owner: s.exclusive.then_some(conn),
                auto_delete: s.auto_delete,
                arguments: s.arguments.clone(),
                home: None,
                quorum: None,
            })
            .map_err(|why| AmqpError::new(reply::INTERNAL_ERROR, why))?;
        if s.durable && !s.exclusive {
            self.store(self.meta.put_queue(&QueueDef {
                vhost: self.name.clone(),
                name: s.name.clone(),
                id,
                auto_delete: s.auto_delete,
                arguments: encode_table(&s.arguments),
            }))?;
        }
        self.write().queues.insert(s.name, q.clone());
        self.changed();
        crate::metrics::Churn::add(&self.churn.queues_created);
        Ok(q)
    }

    /// A redeclaration must match the queue's flags and arguments (406, or
    /// 405 for exclusivity, as RabbitMQ).
    pub(super) fn check_equivalent(
        &self,
        q: &QueueHandle,
        s: &QueueSpec<'_>,
        conn: u64,
    ) -> AmqpResult<()> {
        let (vh, name) = (&self.name, s.name);
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
                (Some(a), Some(b)) => crate::fields::values_equal(a, b),
                // A classic queue is one without a type.
                (Some(v), None) | (None, Some(v)) if *arg == "x-queue-type" => {
                    matches!(v, AMQPValue::LongString(t) if t.as_bytes() == b"classic")
                }
                _ => false,
            };
            if !same {
                return Err(precondition(format!(
                    "inequivalent arg '{arg}' for queue '{name}' in vhost '{vh}': {}",
                    inequivalent(got, cur)
                )));
            }
        }
        Ok(())
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
            .ask(|reply| QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            })
            .await
            .unwrap_or(Ok(0))?;
        if self.clustered() && !super::shared::local_only(q) {
            self.delete_shared_queue(q).await?;
            return Ok(n);
        }
        let (name, id) = (q.name().to_owned(), q.id());
        self.change(move |v| {
            v.remove_queue(&name, id);
            Ok(())
        })
        .await?;
        Ok(n)
    }

    /// Delete everything in the vhost (the vhost is being deleted): every
    /// queue with its messages, then every exchange but the built-in ones,
    /// with their bindings, from memory and the store.
    pub async fn destroy(&self) -> AmqpResult<()> {
        let queues: Vec<QueueHandle> = self.read().queues.values().cloned().collect();
        for q in queues {
            if q.home().is_none() {
                q.ask(|reply| QueueCmd::Delete {
                    if_unused: false,
                    if_empty: false,
                    reply,
                })
                .await
                .unwrap_or(Ok(0))?;
            }
            let (name, id) = (q.name().to_owned(), q.id());
            self.change(move |v| {
                v.remove_queue(&name, id);
                Ok(())
            })
            .await?;
        }
        let exchanges: Vec<String> = self
            .read()
            .exchanges
            .keys()
            .filter(|n| !n.is_empty() && !n.starts_with("amq."))
            .cloned()
            .collect();
        for x in exchanges {
            match self.change(move |v| v.remove_exchange(&x, false)).await {
                Ok(()) => {}
                // Gone meanwhile (auto-delete).
                Err(e) if e.code == warren_protocol::reply::NOT_FOUND => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A queue stopped by itself (auto-delete, `x-expires`): remove it and
    /// its bindings, on the definitions thread, without waiting.
    pub fn forget_queue(&self, name: &str, id: u64) {
        if self.clustered() {
            let shared = self
                .read()
                .queues
                .get(name)
                .filter(|q| q.id() == id)
                .cloned();
            if let Some(q) = shared.filter(|q| !super::shared::local_only(q)) {
                self.forget_shared_queue(q);
                return;
            }
        }
        let name = name.to_owned();
        self.change_later(move |v| v.remove_queue(&name, id));
    }

    /// Remove a queue (already stopped) and its bindings.
    pub(super) fn remove_queue(&self, name: &str, id: u64) {
        let stored = match self.read().queues.get(name) {
            Some(q) if q.id() == id => q.persisted(),
            _ => return,
        };
        if stored {
            let _ = self.store(self.meta.delete_queue(&self.name, name));
        }
        let gone = {
            let mut t = self.write();
            t.queues.remove(name);
            unbind_everywhere(&mut t, Dest::Queue(name.into()))
        };
        crate::metrics::Churn::add(&self.churn.queues_deleted);
        self.changed();
        self.forget_stored_exchanges(gone);
    }

    // ------------------------------------------------------------- bindings

    /// Bind or unbind `dest` to `source`.
    pub async fn set_binding(
        &self,
        bind: bool,
        source: &str,
        dest: Dest,
        key: &str,
        args: &FieldTable,
        conn: u64,
    ) -> AmqpResult<()> {
        if source.is_empty() || matches!(&dest, Dest::Exchange(n) if n.is_empty()) {
            return Err(default_exchange_refused());
        }
        let source = source.to_owned();
        let b = Binding {
            dest,
            key: key.to_owned(),
            args: args.clone(),
        };
        if self.clustered() && super::shared::shares_binding(self, &b) {
            return self.set_shared_binding(bind, &source, b, conn).await;
        }
        self.change(move |v| v.apply_binding(bind, &source, b, conn))
            .await
    }

    /// Check binding or unbinding `source` → `b`: Some(whether the binding
    /// is durable) if there is a change to make, None if it is made already
    /// (bound, or not bound). Unbinding from or to something that is gone
    /// is done already: unbind-ok, as RabbitMQ answers (an RPC client's
    /// reply queue may auto-delete before it unbinds it). Binding needs
    /// both.
    pub(super) fn binding_change(
        &self,
        bind: bool,
        source: &str,
        b: &Binding,
        conn: u64,
    ) -> AmqpResult<Option<bool>> {
        let vh = &self.name;
        let t = self.read();
        let dest_durable = match &b.dest {
            Dest::Queue(n) => match t.queues.get(&**n) {
                Some(q) => {
                    check_owner(q, conn, vh)?;
                    q.persisted()
                }
                None if bind => return Err(not_found("queue", n, vh)),
                None => return Ok(None),
            },
            Dest::Exchange(n) => match t.exchanges.get(&**n) {
                Some(x) => x.durable,
                None if bind => return Err(not_found("exchange", n, vh)),
                None => return Ok(None),
            },
        };
        let src = match t.exchanges.get(source) {
            Some(x) => x,
            None if bind => return Err(not_found("exchange", source, vh)),
            None => return Ok(None),
        };
        if bind {
            src.check_binding(&b.key, &b.args)?;
        }
        if src.bindings.contains(b) == bind {
            return Ok(None);
        }
        Ok(Some(src.durable && dest_durable))
    }

    pub(super) fn apply_binding(
        &self,
        bind: bool,
        source: &str,
        b: Binding,
        conn: u64,
    ) -> AmqpResult<()> {
        let vh = &self.name;
        let Some(durable) = self.binding_change(bind, source, &b, conn)? else {
            return Ok(());
        };
        if durable {
            let def = BindingDef {
                vhost: vh.clone(),
                source: source.into(),
                destination: match &b.dest {
                    Dest::Queue(n) | Dest::Exchange(n) => n.to_string(),
                },
                to_queue: matches!(b.dest, Dest::Queue(_)),
                routing_key: b.key.clone(),
                arguments: encode_table(&b.args),
            };
            let r = if bind {
                self.meta.put_binding(&def)
            } else {
                self.meta.delete_binding(&def)
            };
            self.store(r)?;
        }
        let gone = {
            let mut t = self.write();
            let Some(src) = t.exchanges.get_mut(source) else {
                return Ok(());
            };
            if bind {
                src.bind(b);
                Vec::new()
            } else {
                src.unbind(&b);
                if src.auto_delete && src.bindings.is_empty() {
                    let durable = src.durable;
                    t.exchanges.remove(source);
                    let mut gone = unbind_everywhere(&mut t, Dest::Exchange(source.into()));
                    if durable {
                        gone.push(source.to_owned());
                    }
                    gone
                } else {
                    Vec::new()
                }
            }
        };
        self.changed();
        self.forget_stored_exchanges(gone);
        Ok(())
    }
}

/// Remove every binding to `dest`. An auto-delete exchange this leaves
/// without bindings goes too, and the bindings to it, and so on. Returns the
/// durable exchanges removed (their stored definitions are to be deleted).
fn unbind_everywhere(t: &mut Topology, dest: Dest) -> Vec<String> {
    let mut durable_gone = Vec::new();
    let mut dests = vec![dest];
    while let Some(d) = dests.pop() {
        let mut emptied = Vec::new();
        for (n, x) in t.exchanges.iter_mut() {
            if x.unbind_dest(&d) > 0 && x.auto_delete && x.bindings.is_empty() {
                emptied.push(n.clone());
            }
        }
        for n in emptied {
            if let Some(x) = t.exchanges.remove(&n) {
                if x.durable {
                    durable_gone.push(n.clone());
                }
                dests.push(Dest::Exchange(n.as_str().into()));
            }
        }
    }
    durable_gone
}
