//! The headers exchange: a message goes to the bindings whose arguments
//! match its headers (`x-match` all / any / all-with-x / any-with-x, values
//! compared as RabbitMQ does). No index: every binding is tried, and routes
//! are never cached (they depend on the message).

use super::{Binding, Dest, ExchangeType, Index, Msg};
use crate::error::{precondition, AmqpResult};
use crate::fields::{as_string, values_equal};
use warren_protocol::types::{AMQPValue, FieldTable};

pub static TYPE: ExchangeType = ExchangeType {
    name: "headers",
    uses_headers: true,
    new_index: |_| Box::new(Headers),
    check_binding: check_x_match,
    check_arguments: super::any_arguments,
};

#[derive(Debug)]
struct Headers;

impl Index for Headers {
    fn bind(&mut self, _: &Binding) {}

    fn unbind(&mut self, _: &Binding) {}

    fn route(&self, bindings: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>) {
        let empty = FieldTable::default();
        let h = m.headers.unwrap_or(&empty);
        for b in bindings {
            if headers_match(&b.args, h) {
                out.push(b.dest.clone());
            }
        }
    }
}

/// A headers binding's `x-match` must be one RabbitMQ knows (406 otherwise).
fn check_x_match(_key: &str, args: &FieldTable) -> AmqpResult<()> {
    let v = match args.inner().get("x-match") {
        None => return Ok(()),
        Some(v) => as_string(v).unwrap_or_else(|| format!("{v:?}")),
    };
    match v.as_str() {
        "all" | "any" | "all-with-x" | "any-with-x" => Ok(()),
        _ => Err(precondition(format!(
            "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
        ))),
    }
}

/// Headers-exchange matching of a binding's arguments against message headers.
fn headers_match(args: &FieldTable, headers: &FieldTable) -> bool {
    let mode = args.inner().get("x-match").and_then(as_string);
    let (any, with_x) = match mode.as_deref() {
        Some("any") => (true, false),
        Some("any-with-x") => (true, true),
        Some("all-with-x") => (false, true),
        _ => (false, false),
    };
    for (k, v) in args.inner() {
        let key = k.as_str();
        if key == "x-match" || (!with_x && key.starts_with("x-")) {
            continue;
        }
        let hit = match headers.inner().get(key) {
            None => false,
            // A void binding value matches on presence alone.
            Some(_) if matches!(v, AMQPValue::Void) => true,
            Some(h) => values_equal(v, h),
        };
        if any && hit {
            return true;
        }
        if !any && !hit {
            return false;
        }
    }
    // "all" with nothing to compare matches; "any" with nothing does not.
    !any
}

#[cfg(test)]
mod tests {
    use super::*;
    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn x_match_must_be_known() {
        let s = |x: &str| AMQPValue::LongString(x.into());
        assert!(check_x_match("", &table(&[("x-match", s("any"))])).is_ok());
        assert!(check_x_match("", &FieldTable::default()).is_ok());
        assert!(check_x_match("", &table(&[("x-match", s("some"))])).is_err());
    }

    #[test]
    fn headers_modes() {
        let s = |x: &str| AMQPValue::LongString(x.into());
        let h = table(&[("a", s("1")), ("b", AMQPValue::LongInt(2)), ("x-k", s("v"))]);
        assert!(headers_match(
            &table(&[("a", s("1")), ("b", AMQPValue::LongLongInt(2))]),
            &h
        ));
        assert!(!headers_match(&table(&[("a", s("1")), ("c", s("3"))]), &h));
        assert!(headers_match(
            &table(&[
                ("x-match", s("any")),
                ("a", s("9")),
                ("b", AMQPValue::ShortInt(2))
            ]),
            &h
        ));
        assert!(!headers_match(
            &table(&[("x-match", s("any")), ("a", s("9"))]),
            &h
        ));
        assert!(
            headers_match(&table(&[("x-k", s("other"))]), &h),
            "x- keys ignored by all"
        );
        assert!(!headers_match(
            &table(&[("x-match", s("all-with-x")), ("x-k", s("other"))]),
            &h
        ));
        assert!(headers_match(
            &table(&[("x-match", s("any-with-x")), ("x-k", s("v"))]),
            &h
        ));
        assert!(headers_match(&table(&[("a", AMQPValue::Void)]), &h));
        assert!(
            headers_match(&FieldTable::default(), &h),
            "empty all matches"
        );
        assert!(
            !headers_match(&table(&[("x-match", s("any"))]), &h),
            "empty any does not"
        );
    }
}
