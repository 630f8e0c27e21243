//! The direct exchange: a message goes to the bindings whose key equals its
//! routing key (a hash map from key to destinations).

use super::{any_arguments, any_binding, Binding, Dest, ExchangeType, Index, Msg};
use std::collections::HashMap;

pub static TYPE: ExchangeType = ExchangeType {
    name: "direct",
    uses_headers: false,
    new_index: |_| Box::<Direct>::default(),
    check_binding: any_binding,
    check_arguments: any_arguments,
};

#[derive(Debug, Default)]
struct Direct(HashMap<String, Vec<Dest>>);

impl Index for Direct {
    fn bind(&mut self, b: &Binding) {
        let dests = self.0.entry(b.key.clone()).or_default();
        // Bindings that differ only in arguments share one entry.
        if !dests.contains(&b.dest) {
            dests.push(b.dest.clone());
        }
    }

    fn unbind(&mut self, b: &Binding) {
        if let Some(v) = self.0.get_mut(&b.key) {
            v.retain(|d| d != &b.dest);
            if v.is_empty() {
                self.0.remove(&b.key);
            }
        }
    }

    fn route(&self, _: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>) {
        if let Some(v) = self.0.get(m.routing_key) {
            out.extend(v.iter().cloned());
        }
    }
}
