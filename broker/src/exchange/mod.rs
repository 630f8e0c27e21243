//! Exchanges: their bindings and, per exchange type, the index that routes
//! over them. Owned by the vhost's topology; routing appends destinations
//! to a caller's scratch vector.
//!
//! One file per exchange type, each exporting an [`ExchangeType`]: its name,
//! how to make its [`Index`], how to check a binding's arguments, and
//! whether its routes depend on message headers. [`TYPES`] lists them:
//! adding a type is a new file and one line there.

mod consistent_hash;
pub mod delayed;
mod direct;
mod fanout;
mod headers;
mod topic;

use crate::error::AmqpResult;
use std::sync::Arc;
use warren_protocol::types::FieldTable;

/// Every exchange type the broker knows, by name.
pub static TYPES: &[&ExchangeType] = &[
    &direct::TYPE,
    &fanout::TYPE,
    &topic::TYPE,
    &headers::TYPE,
    &consistent_hash::TYPE,
    &fanout::DEDUP_TYPE,
    &delayed::TYPE,
];

/// An exchange type.
pub struct ExchangeType {
    /// The name clients declare it by (`exchange.declare` `type`).
    pub name: &'static str,
    /// Routes depend on message headers: they are never cached.
    pub uses_headers: bool,
    /// A fresh, empty index for an exchange of this type with these
    /// arguments (checked by `check_arguments` first).
    pub new_index: fn(&FieldTable) -> Box<dyn Index>,
    /// Check a binding's key and arguments before it is made (406 if refused).
    pub check_binding: fn(&str, &FieldTable) -> AmqpResult<()>,
    /// Check an exchange's arguments at declaration (406 if refused).
    pub check_arguments: fn(&FieldTable) -> AmqpResult<()>,
}

impl PartialEq for ExchangeType {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for ExchangeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// An exchange's type, by reference into [`TYPES`].
pub type Kind = &'static ExchangeType;

/// The type called `name`, if there is one.
pub fn kind(name: &str) -> Option<Kind> {
    TYPES.iter().copied().find(|t| t.name == name)
}

/// Bindings accepted whatever their key and arguments.
fn any_binding(_: &str, _: &FieldTable) -> AmqpResult<()> {
    Ok(())
}

/// Exchanges accepted whatever their arguments.
fn any_arguments(_: &FieldTable) -> AmqpResult<()> {
    Ok(())
}

/// What routing looks at in a message.
#[derive(Clone, Copy)]
pub struct Msg<'a> {
    pub routing_key: &'a str,
    /// Its headers table, if it has one.
    pub headers: Option<&'a FieldTable>,
    /// Its content header (None only in tests).
    pub header: Option<&'a warren_protocol::content::ContentHeader>,
}

/// How an exchange type finds destinations: an index over the exchange's
/// bindings, kept up to date by [`Exchange::bind`] and
/// [`Exchange::unbind`].
pub trait Index: Send + Sync + std::fmt::Debug {
    /// A binding was added (not a duplicate).
    fn bind(&mut self, b: &Binding);
    /// The last binding with this key and destination went.
    fn unbind(&mut self, b: &Binding);
    /// A binding went; `bindings` are the ones left.
    fn after_unbind(&mut self, _bindings: &[Binding]) {}
    /// Routes depend on more than the routing key (the message's headers
    /// or properties): they are never cached.
    fn per_message(&self) -> bool {
        false
    }
    /// Append the destinations of a message to `out` (duplicates allowed).
    /// `bindings` are all of the exchange's bindings.
    fn route(&self, bindings: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>);
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub dest: Dest,
    pub key: String,
    pub args: FieldTable,
}

#[derive(Debug)]
pub struct Exchange {
    pub name: Arc<str>,
    pub kind: Kind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The alternate exchange in force: the `alternate-exchange` argument,
    /// else a policy's.
    pub alternate: Option<String>,
    /// Every binding with this exchange as source (the source of truth).
    pub bindings: Vec<Binding>,
    /// Messages published to it and routed on (for operators).
    pub counters: Arc<crate::metrics::ExchangeCounters>,
    /// Its deduplication cache, if it deduplicates (set by the vhost).
    pub dedup: Option<Arc<crate::dedup::ExchangeDedup>>,
    /// The type's routing index over `bindings`.
    index: Box<dyn Index>,
}

/// The `alternate-exchange` argument, if any.
pub fn declared_alternate(arguments: &FieldTable) -> Option<String> {
    arguments
        .inner()
        .get("alternate-exchange")
        .and_then(crate::fields::as_string)
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: Kind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate = declared_alternate(&arguments);
        Exchange {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            alternate,
            bindings: Vec::new(),
            counters: Default::default(),
            dedup: None,
            index: (kind.new_index)(&arguments),
            arguments,
        }
    }

    /// Add a binding; false if it already existed.
    pub fn bind(&mut self, b: Binding) -> bool {
        if self.bindings.contains(&b) {
            return false;
        }
        self.index.bind(&b);
        self.bindings.push(b);
        true
    }

    /// Remove a binding; false if there was none.
    pub fn unbind(&mut self, b: &Binding) -> bool {
        let Some(pos) = self.bindings.iter().position(|x| x == b) else {
            return false;
        };
        self.bindings.remove(pos);
        // Another binding with the same key and destination but other
        // arguments keeps the index entry.
        let still = self
            .bindings
            .iter()
            .any(|x| x.dest == b.dest && x.key == b.key);
        if !still {
            self.index.unbind(b);
        }
        self.index.after_unbind(&self.bindings);
        true
    }

    /// Remove every binding to `dest`; returns how many went.
    pub fn unbind_dest(&mut self, dest: &Dest) -> usize {
        let gone: Vec<Binding> = self
            .bindings
            .iter()
            .filter(|b| &b.dest == dest)
            .cloned()
            .collect();
        for b in &gone {
            self.unbind(b);
        }
        gone.len()
    }

    /// Append the destinations for a message to `out` (may contain duplicates).
    pub fn route(&self, m: &Msg<'_>, out: &mut Vec<Dest>) {
        self.index.route(&self.bindings, m, out);
    }

    /// Check a binding's key and arguments before it is made (406 if
    /// refused): as its type checks them, or for a delayed exchange as the
    /// type it routes as.
    pub fn check_binding(&self, key: &str, args: &FieldTable) -> AmqpResult<()> {
        let kind = match self.delays() {
            true => delayed::underlying(&self.arguments).unwrap_or(self.kind),
            false => self.kind,
        };
        (kind.check_binding)(key, args)
    }

    /// Whether it holds messages with `x-delay` until due.
    pub fn delays(&self) -> bool {
        self.kind.name == delayed::NAME
    }

    /// Whether its routes depend on more than the routing key.
    pub fn per_message(&self) -> bool {
        self.kind.uses_headers || self.index.per_message()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_found_by_its_name() {
        for t in TYPES {
            assert!(std::ptr::eq(kind(t.name).unwrap(), *t));
        }
        assert!(kind("x-unknown").is_none());
    }

    #[test]
    fn a_binding_with_other_arguments_keeps_the_index_entry() {
        let mut e = Exchange::new("d", &direct::TYPE, false, false, false, Default::default());
        let mut args = FieldTable::default();
        args.insert("k".into(), warren_protocol::types::AMQPValue::LongInt(1));
        let a = Binding {
            dest: Dest::Queue("q".into()),
            key: "k".into(),
            args: FieldTable::default(),
        };
        let b = Binding { args, ..a.clone() };
        assert!(e.bind(a.clone()));
        assert!(!e.bind(a.clone()), "a duplicate is not added");
        assert!(e.bind(b));
        assert!(e.unbind(&a));
        let mut out = vec![];
        let m = Msg {
            routing_key: "k",
            headers: None,
            header: None,
        };
        e.route(&m, &mut out);
        assert_eq!(out, vec![Dest::Queue("q".into())]);
    }
}
