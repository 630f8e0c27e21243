//! The delayed-message exchange (`x-delayed-message`, the API of
//! `rabbitmq-delayed-message-exchange`): it routes as the exchange type its
//! `x-delayed-type` argument names (required; an existing type other than
//! itself, else 406) and holds messages with an `x-delay` header until they
//! are due (see `crate::delayed`).

use super::{any_binding, kind, Binding, Dest, ExchangeType, Index, Kind, Msg};
use crate::error::{precondition, AmqpResult};
use warren_protocol::types::FieldTable;

pub const NAME: &str = "x-delayed-message";

pub static TYPE: ExchangeType = ExchangeType {
    name: NAME,
    uses_headers: false,
    new_index: |args| match underlying(args) {
        Ok(k) => Box::new(Delayed {
            kind: k,
            inner: (k.new_index)(args),
        }),
        // Checked at declaration; a stored one was checked then.
        Err(_) => (super::fanout::TYPE.new_index)(args),
    },
    // (Checked by `Exchange::check_binding` against the underlying type.)
    check_binding: any_binding,
    check_arguments: |args| underlying(args).map(|_| ()),
};

/// The type named by `x-delayed-type`.
pub(super) fn underlying(args: &FieldTable) -> AmqpResult<Kind> {
    match args
        .inner()
        .get("x-delayed-type")
        .and_then(crate::fields::as_string)
    {
        Some(t) if t != NAME => kind(&t),
        _ => None,
    }
    .ok_or_else(|| {
        precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type")
    })
}

#[derive(Debug)]
struct Delayed {
    kind: Kind,
    inner: Box<dyn Index>,
}

impl Index for Delayed {
    fn bind(&mut self, b: &Binding) {
        self.inner.bind(b)
    }
    fn unbind(&mut self, b: &Binding) {
        self.inner.unbind(b)
    }
    fn after_unbind(&mut self, bindings: &[Binding]) {
        self.inner.after_unbind(bindings)
    }
    fn per_message(&self) -> bool {
        self.kind.uses_headers || self.inner.per_message()
    }
    fn route(&self, bindings: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>) {
        self.inner.route(bindings, m, out)
    }
}
