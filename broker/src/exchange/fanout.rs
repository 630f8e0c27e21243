//! The fanout exchange: a message goes to every bound destination, once,
//! whatever its routing key. No index: the bindings are the list.

use super::{any_arguments, any_binding, Binding, Dest, ExchangeType, Index, Msg};

pub static TYPE: ExchangeType = ExchangeType {
    name: "fanout",
    uses_headers: false,
    new_index: |_| Box::new(Fanout),
    check_binding: any_binding,
    check_arguments: any_arguments,
};

/// `x-message-deduplication` (the plugin's exchange type): a fanout that
/// deduplicates (see `crate::dedup`; its arguments are checked there).
pub static DEDUP_TYPE: ExchangeType = ExchangeType {
    name: crate::dedup::EXCHANGE_TYPE,
    uses_headers: false,
    new_index: |_| Box::new(Fanout),
    check_binding: any_binding,
    check_arguments: any_arguments,
};

#[derive(Debug)]
pub(super) struct Fanout;

impl Index for Fanout {
    fn bind(&mut self, _: &Binding) {}

    fn unbind(&mut self, _: &Binding) {}

    fn route(&self, bindings: &[Binding], _: &Msg<'_>, out: &mut Vec<Dest>) {
        let mut seen: Vec<&Dest> = Vec::with_capacity(bindings.len());
        for b in bindings {
            if !seen.contains(&&b.dest) {
                seen.push(&b.dest);
                out.push(b.dest.clone());
            }
        }
    }
}
