//! The consistent-hash exchange (`x-consistent-hash`, the API of RabbitMQ's
//! bundled plugin): each binding's key is a weight; a message goes to one
//! destination, chosen by hashing its routing key, or the header named by
//! the exchange's `hash-header` argument, or the property named by
//! `hash-property` (`message_id`, `correlation_id`, `timestamp`). A
//! message without that header or property is not dropped: all of them go
//! to one and the same destination, as with the plugin.
//!
//! Placement is a hash ring: a destination of weight w owns `w ×
//! POINTS_PER_WEIGHT` points, placed by hashing its name (not its binding
//! order, as the plugin's buckets are), and a value goes to the owner of
//! the first point at or after its hash. So a key keeps its destination
//! while the bindings stay the same, across restarts too; binding a new
//! destination moves only the keys it takes, and unbinding any one (not
//! only the last bound, as with the plugin) moves only its own keys. The
//! hash (FNV-1a with a 64-bit finaliser) is written out here, so placement
//! never changes with a library or compiler version.

use super::{Binding, Dest, ExchangeType, Index, Msg};
use crate::error::{precondition, AmqpResult};
use warren_protocol::types::{AMQPValue, FieldTable};

pub static TYPE: ExchangeType = ExchangeType {
    name: "x-consistent-hash",
    uses_headers: false,
    new_index: |args| Box::new(Ring::new(args)),
    check_binding: check_weight,
    check_arguments,
};

/// Points on the ring per unit of weight.
const POINTS_PER_WEIGHT: u64 = 100;
/// The largest weight a binding may have (its points are kept in memory).
pub const MAX_WEIGHT: u64 = 1_000;

/// What a message is hashed on.
#[derive(Debug, Clone, PartialEq)]
enum HashOn {
    RoutingKey,
    Header(String),
    MessageId,
    CorrelationId,
    Timestamp,
}

fn text(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// `hash-header` / `hash-property`, as the plugin checks them (406); a
/// value that is not a string is 406 too (the plugin fails with 541).
fn check_arguments(args: &FieldTable) -> AmqpResult<()> {
    hash_on(args).map(|_| ())
}

fn hash_on(args: &FieldTable) -> AmqpResult<HashOn> {
    let t = args.inner();
    let header = t.get("hash-header");
    let property = t.get("hash-property");
    if header.is_some() && property.is_some() {
        return Err(precondition(
            "hash-header and hash-property are mutually exclusive",
        ));
    }
    if let Some(h) = header {
        let name = text(h)
            .ok_or_else(|| precondition(format!("hash-header must be a string, not {h:?}")))?;
        return Ok(HashOn::Header(String::from_utf8_lossy(name).into_owned()));
    }
    if let Some(p) = property {
        let name = text(p)
            .ok_or_else(|| precondition(format!("hash-property must be a string, not {p:?}")))?;
        return match name {
            b"message_id" => Ok(HashOn::MessageId),
            b"correlation_id" => Ok(HashOn::CorrelationId),
            b"timestamp" => Ok(HashOn::Timestamp),
            other => Err(precondition(format!(
                "Unsupported property: {}",
                String::from_utf8_lossy(other)
            ))),
        };
    }
    Ok(HashOn::RoutingKey)
}

/// The binding key is the weight: an integer from 1 to [`MAX_WEIGHT`]
/// (the plugin's texts for the first two cases).
fn check_weight(key: &str, _: &FieldTable) -> AmqpResult<()> {
    weight(key).map(|_| ())
}

fn weight(key: &str) -> AmqpResult<u64> {
    let show = if key.is_empty() {
        "<<>>".to_owned()
    } else {
        format!("<<\"{key}\">>")
    };
    let n: i128 = key
        .parse()
        .map_err(|_| precondition(format!("The binding key must be an integer: {show}")))?;
    if n <= 0 {
        return Err(precondition("The binding key must be greater than 0"));
    }
    if n > MAX_WEIGHT as i128 {
        return Err(precondition(format!(
            "The binding key must be at most {MAX_WEIGHT} (Warren's largest weight)"
        )));
    }
    Ok(n as u64)
}

/// FNV-1a over the parts (each followed by a separator), then the
/// splitmix64 finaliser to spread the bits.
fn hash64(parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[derive(Debug)]
struct Ring {
    on: HashOn,
    /// (point, index into `dests`), sorted by point.
    points: Vec<(u64, u32)>,
    /// Destinations with their weight, in binding order (a second binding
    /// of a destination does not add to its weight, as with the plugin).
    dests: Vec<(Dest, u64)>,
}

impl Ring {
    fn new(args: &FieldTable) -> Ring {
        Ring {
            // Checked at declaration; a stored exchange was checked then.
            on: hash_on(args).unwrap_or(HashOn::RoutingKey),
            points: Vec::new(),
            dests: Vec::new(),
        }
    }

    fn rebuild(&mut self) {
        self.points.clear();
        for (i, (d, w)) in self.dests.iter().enumerate() {
            let (tag, name): (&[u8], &str) = match d {
                Dest::Queue(n) => (b"q", n),
                Dest::Exchange(n) => (b"x", n),
            };
            for p in 0..w * POINTS_PER_WEIGHT {
                let point = hash64(&[tag, name.as_bytes(), &p.to_be_bytes()]);
                self.points.push((point, i as u32));
            }
        }
        self.points.sort_unstable();
    }

    /// The bytes a message is hashed on; None when it lacks them.
    fn value(&self, m: &Msg<'_>) -> Option<Vec<u8>> {
        match &self.on {
            HashOn::RoutingKey => Some(m.routing_key.as_bytes().to_vec()),
            HashOn::Header(name) => m.headers?.inner().get(name.as_str()).map(value_bytes),
            HashOn::MessageId => {
                let p = m.header?.properties()?;
                p.message_id()
                    .as_ref()
                    .map(|s| s.as_str().as_bytes().to_vec())
            }
            HashOn::CorrelationId => {
                let p = m.header?.properties()?;
                p.correlation_id()
                    .as_ref()
                    .map(|s| s.as_str().as_bytes().to_vec())
            }
            HashOn::Timestamp => {
                let p = m.header?.properties()?;
                p.timestamp().map(|t| t.to_string().into_bytes())
            }
        }
    }
}

/// A header value as hashed: a string's bytes, a number in decimal,
/// anything else its debug form.
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    if let Some(t) = text(v) {
        return t.to_vec();
    }
    match crate::fields::as_int(v) {
        Some(n) => n.to_string().into_bytes(),
        None => match v {
            AMQPValue::Timestamp(t) => t.to_string().into_bytes(),
            AMQPValue::Boolean(b) => b.to_string().into_bytes(),
            other => format!("{other:?}").into_bytes(),
        },
    }
}

impl Index for Ring {
    fn bind(&mut self, b: &Binding) {
        if self.dests.iter().any(|(d, _)| *d == b.dest) {
            return;
        }
        // Checked when the binding was made.
        let w = weight(&b.key).unwrap_or(1);
        self.dests.push((b.dest.clone(), w));
        self.rebuild();
    }

    /// (The destination may still have a binding under another key:
    /// `after_unbind` decides.)
    fn unbind(&mut self, _: &Binding) {}

    fn after_unbind(&mut self, bindings: &[Binding]) {
        let before = self.dests.len();
        self.dests
            .retain(|(d, _)| bindings.iter().any(|b| b.dest == *d));
        // A destination bound again under another key takes that weight.
        for b in bindings {
            if !self.dests.iter().any(|(d, _)| *d == b.dest) {
                self.dests
                    .push((b.dest.clone(), weight(&b.key).unwrap_or(1)));
            }
        }
        if self.dests.len() != before {
            self.rebuild();
        }
    }

    fn per_message(&self) -> bool {
        self.on != HashOn::RoutingKey
    }

    fn route(&self, _: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>) {
        if self.points.is_empty() {
            return;
        }
        let h = match self.value(m) {
            Some(v) => hash64(&[b"v", &v]),
            // The plugin sends every message without the value to one
            // queue (the hash of `undefined`); so does Warren.
            None => hash64(&[b"none"]),
        };
        let i = self.points.partition_point(|(p, _)| *p < h);
        let (_, d) = self.points[if i == self.points.len() { 0 } else { i }];
        out.push(self.dests[d as usize].0.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(q: &str, w: u64) -> Binding {
        Binding {
            dest: Dest::Queue(q.into()),
            key: w.to_string(),
            args: FieldTable::default(),
        }
    }

    fn place(r: &Ring, keys: &[String]) -> Vec<Dest> {
        keys.iter()
            .map(|k| {
                let mut out = Vec::new();
                let m = Msg {
                    routing_key: k,
                    headers: None,
                    header: None,
                };
                r.route(&[], &m, &mut out);
                assert_eq!(out.len(), 1, "exactly one destination");
                out.pop().unwrap()
            })
            .collect()
    }

    #[test]
    fn any_destination_added_or_removed_moves_only_its_own_keys() {
        let keys: Vec<String> = (0..3000).map(|i| format!("account-{i}")).collect();
        let mut r = Ring::new(&FieldTable::default());
        let (a, b, c) = (binding("a", 1), binding("b", 1), binding("c", 1));
        r.bind(&a);
        r.bind(&b);
        r.bind(&c);
        let three = place(&r, &keys);
        // Remove the middle one (the plugin's buckets would shift here).
        let left = [a.clone(), c.clone()];
        r.after_unbind(&left);
        let two = place(&r, &keys);
        let mut moved = 0;
        for (before, after) in three.iter().zip(&two) {
            if *before != b.dest {
                assert_eq!(before, after, "a key not on b stays put");
            } else {
                moved += 1;
            }
        }
        assert!((700..1300).contains(&moved), "b had about a third: {moved}");
        // Bound again: exactly the old placement.
        r.bind(&b);
        assert_eq!(place(&r, &keys), three);
    }

    #[test]
    fn weights_split_the_keys() {
        let keys: Vec<String> = (0..8000).map(|i| format!("k{i}")).collect();
        let mut r = Ring::new(&FieldTable::default());
        r.bind(&binding("light", 1));
        r.bind(&binding("heavy", 3));
        let light = place(&r, &keys)
            .iter()
            .filter(|d| **d == Dest::Queue("light".into()))
            .count();
        assert!((1500..2500).contains(&light), "{light} of 8000");
    }

    #[test]
    fn weights_and_arguments_are_checked_as_the_plugin_does() {
        assert!(weight("+5").is_ok_and(|w| w == 5));
        for bad in ["", "abc", "1.5", " 5", "0", "-1", "1001"] {
            assert!(weight(bad).is_err(), "{bad:?}");
        }
        let mut t = FieldTable::default();
        t.insert(
            "hash-property".into(),
            AMQPValue::LongString("app_id".into()),
        );
        assert_eq!(
            hash_on(&t).unwrap_err().text,
            "Unsupported property: app_id"
        );
        t.insert("hash-header".into(), AMQPValue::LongString("h".into()));
        assert!(hash_on(&t).is_err());
    }
}
