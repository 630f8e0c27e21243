//! Policies and operator policies, as RabbitMQ has them: a name, a regular
//! expression matched against queue and exchange names in one vhost, what it
//! applies to, a priority and a definition (keys like `message-ttl`). Of the
//! policies matching an object, the one with the highest priority applies
//! (ties: the name that sorts first); likewise, separately, of the operator
//! policies.
//!
//! How a key's value is chosen for a queue (`queue::args` does the merge):
//! - `message-ttl`, `expires`, `max-length`, `max-length-bytes`: the
//!   smallest of the queue argument, the policy and the operator policy;
//! - `overflow`, `dead-letter-exchange`, `dead-letter-routing-key`,
//!   `queue-mode`: the queue argument if there is one, else the policy;
//! - `alternate-exchange` (exchanges): the argument, else the policy.
//!
//! Keys RabbitMQ knows that Warren does not implement (mirroring,
//! federation, stream retention, ...) are refused with a reason, never
//! accepted and ignored. Validation messages are RabbitMQ's. No broker
//! state here: parsing, validation and selection only.

use regex::Regex;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Largest TTL / expiry RabbitMQ accepts (its timer limit, in ms).
const MAX_EXPIRY: u64 = 4_294_967_295;

/// What a policy applies to (`apply-to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    All,
    ClassicQueues,
    QuorumQueues,
    Streams,
}

impl ApplyTo {
    pub fn parse(s: &str) -> Result<ApplyTo, String> {
        Ok(match s {
            "queues" => ApplyTo::Queues,
            "exchanges" => ApplyTo::Exchanges,
            "all" => ApplyTo::All,
            "classic_queues" => ApplyTo::ClassicQueues,
            "quorum_queues" => ApplyTo::QuorumQueues,
            "streams" => ApplyTo::Streams,
            other => return Err(format!("\"{other}\" is not a valid apply-to value")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
            ApplyTo::ClassicQueues => "classic_queues",
            ApplyTo::QuorumQueues => "quorum_queues",
            ApplyTo::Streams => "streams",
        }
    }

    /// Whether it covers `target`.
    pub fn covers(self, target: Target) -> bool {
        match target {
            Target::Queue => matches!(
                self,
                ApplyTo::Queues | ApplyTo::All | ApplyTo::ClassicQueues
            ),
            Target::QuorumQueue => {
                matches!(self, ApplyTo::Queues | ApplyTo::All | ApplyTo::QuorumQueues)
            }
            Target::Stream => matches!(self, ApplyTo::Queues | ApplyTo::All | ApplyTo::Streams),
            Target::Exchange => matches!(self, ApplyTo::Exchanges | ApplyTo::All),
        }
    }
}

/// What a policy is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A classic queue.
    Queue,
    QuorumQueue,
    Stream,
    Exchange,
}

impl Target {
    /// A queue declared with these arguments.
    pub fn queue(arguments: &warren_protocol::types::FieldTable) -> Target {
        match arguments.inner().get("x-queue-type") {
            Some(warren_protocol::types::AMQPValue::LongString(t)) if t.as_bytes() == b"quorum" => {
                Target::QuorumQueue
            }
            Some(warren_protocol::types::AMQPValue::LongString(t)) if t.as_bytes() == b"stream" => {
                Target::Stream
            }
            _ => Target::Queue,
        }
    }
}

/// `overflow` in a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// A policy definition's keys, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Definition {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    /// `queue-mode`: `Some(true)` for `lazy`, `Some(false)` for `default`.
    pub lazy: Option<bool>,
    pub alternate_exchange: Option<String>,
    pub delivery_limit: Option<u64>,
    pub consumer_timeout: Option<u64>,
    /// `max-age` (streams), ms.
    pub max_age: Option<u64>,
    /// `stream-max-segment-size-bytes`.
    pub segment_bytes: Option<u64>,
}

/// Keys an operator policy may set (RabbitMQ's list, less those Warren does
/// not implement).
const OPERATOR_KEYS: [&str; 6] = [
    "consumer-timeout",
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
];

/// Keys RabbitMQ (or one of its plugins) knows that Warren refuses, and why.
fn unsupported(key: &str) -> Option<&'static str> {
    Some(match key {
        "ha-mode"
        | "ha-params"
        | "ha-sync-mode"
        | "ha-promote-on-shutdown"
        | "ha-promote-on-failure"
        | "ha-sync-batch-size" => "Warren has no classic queue mirroring",
        "queue-master-locator"
        | "queue-leader-locator"
        | "target-group-size"
        | "initial-cluster-size" => "Warren runs on one node",
        "federation-upstream" | "federation-upstream-set" => "Warren has no federation",
        "queue-version" => "Warren's classic queues have one storage format",
        "max-in-memory-length" | "max-in-memory-bytes" => {
            "Warren has no quorum-queue memory limits"
        }
        "dead-letter-strategy" => "Warren dead-letters at most once (no at-least-once strategy)",
        _ => return None,
    })
}

/// A value as RabbitMQ prints it in validation errors.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("<<\"{s}\">>"),
        other => other.to_string(),
    }
}

fn uint(v: &Value, min: u64, max: u64, what: &str) -> Result<u64, String> {
    match v.as_u64() {
        Some(n) if n >= min && n <= max && !v.is_f64() => Ok(n),
        _ => Err(format!("{} is not a valid {what}", show(v))),
    }
}

fn text(v: &Value, what: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{} is not a valid {what}", show(v)))
}

impl Definition {
    /// Validate and decode a definition (`operator`: an operator policy's,
    /// which may hold only the numeric limits). The error is RabbitMQ's
    /// "Validation failed" text.
    pub fn parse(def: &Map<String, Value>, operator: bool) -> Result<Definition, String> {
        Definition::parse_inner(def, operator).map_err(|e| format!("Validation failed\n\n{e}\n"))
    }

    fn parse_inner(def: &Map<String, Value>, operator: bool) -> Result<Definition, String> {
        if def.is_empty() {
            return Err("no policy provided".into());
        }
        let unknown: Vec<String> = def
            .iter()
            .filter(|(k, _)| {
                let known = if operator {
                    OPERATOR_KEYS.contains(&k.as_str())
                } else {
                    KEYS.contains(&k.as_str())
                };
                !known && unsupported(k).is_none()
            })
            .map(|(k, v)| format!("{{<<\"{k}\">>,{}}}", show(v)))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "[{}] are not recognised policy settings",
                unknown.join(",")
            ));
        }
        let mut d = Definition::default();
        for (k, v) in def {
            if let Some(why) = unsupported(k) {
                return Err(format!("'{k}' is not supported: {why}"));
            }
            match k.as_str() {
                "message-ttl" => d.message_ttl = Some(uint(v, 0, MAX_EXPIRY, "message TTL")?),
                "expires" => d.expires = Some(uint(v, 1, MAX_EXPIRY, "queue expiry")?),
                "max-length" => d.max_length = Some(uint(v, 0, u64::MAX, "maximum length")?),
                "max-length-bytes" => {
                    d.max_length_bytes = Some(uint(v, 0, u64::MAX, "maximum length in bytes")?)
                }
                "overflow" => {
                    d.overflow = Some(match v.as_str() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => return Err(format!("{} is not a valid overflow value", show(v))),
                    })
                }
                "dead-letter-exchange" => {
                    d.dead_letter_exchange = Some(text(v, "dead letter exchange name")?)
                }
                "dead-letter-routing-key" => {
                    d.dead_letter_routing_key = Some(text(v, "dead letter routing key")?)
                }
                "queue-mode" => {
                    d.lazy = Some(match v.as_str() {
                        Some("lazy") => true,
                        Some("default") => false,
                        _ => return Err(format!("{} is not a valid queue-mode value", show(v))),
                    })
                }
                "alternate-exchange" => {
                    d.alternate_exchange = Some(text(v, "alternate exchange name")?)
                }
                "consumer-timeout" => {
                    d.consumer_timeout = Some(uint(v, 1, MAX_EXPIRY, "consumer timeout")?)
                }
                "delivery-limit" => {
                    d.delivery_limit = Some(uint(v, 0, u32::MAX as u64, "delivery limit")?)
                }
                "max-age" => {
                    d.max_age = Some(
                        v.as_str()
                            .and_then(crate::queue::args::parse_age)
                            .ok_or_else(|| format!("{} is not a valid max age", show(v)))?,
                    )
                }
                "stream-max-segment-size-bytes" => {
                    d.segment_bytes = Some(uint(v, 0, u64::MAX, "segment size")?)
                }
                // RabbitMQ's Bloom filter size: Warren filters exactly, so
                // a valid size changes nothing.
                "stream-filter-size-bytes" => {
                    uint(v, 16, 255, "filter size")?;
                }
                _ => unreachable!("checked above"),
            }
        }
        Ok(d)
    }
}

/// The keys a policy may hold.
const KEYS: [&str; 14] = [
    "max-age",
    "stream-max-segment-size-bytes",
    "stream-filter-size-bytes",
    "consumer-timeout",
    "delivery-limit",
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "queue-mode",
    "alternate-exchange",
];

/// A policy or operator policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    regex: Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    /// The definition as given (for listing and export).
    pub raw: Map<String, Value>,
    pub definition: Definition,
}

impl Policy {
    /// Validate a policy (`operator`: an operator policy).
    pub fn new(
        vhost: &str,
        name: &str,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        raw: Map<String, Value>,
        operator: bool,
    ) -> Result<Policy, String> {
        if name.is_empty() {
            return Err("a policy needs a name".into());
        }
        let regex = Regex::new(pattern).map_err(|e| {
            // regex's message draws the pattern over several lines: keep its last.
            let e = e.to_string();
            let why = e.lines().last().unwrap_or("").trim_start_matches("error: ");
            format!(
                "Validation failed\n\n<<\"{pattern}\">> is not a valid regular expression ({why})\n"
            )
        })?;
        let apply_to =
            ApplyTo::parse(apply_to).map_err(|e| format!("Validation failed\n\n{e}\n"))?;
        let definition = Definition::parse(&raw, operator)?;
        Ok(Policy {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            pattern: pattern.to_owned(),
            regex,
            apply_to,
            priority,
            raw,
            definition,
        })
    }

    /// Whether it applies to the `target` called `name` (`amq.*` objects
    /// and exclusive queues included, as in RabbitMQ).
    pub fn matches(&self, target: Target, name: &str) -> bool {
        self.apply_to.covers(target) && self.regex.is_match(name)
    }
}

/// A vhost's policies and operator policies, each list sorted by priority
/// (highest first, then by name): what applies is the first that matches.
#[derive(Debug, Default)]
pub struct Policies {
    policies: Vec<Arc<Policy>>,
    operator: Vec<Arc<Policy>>,
}

/// The policy and the operator policy that apply to one object.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied<'a> {
    pub policy: Option<&'a Policy>,
    pub operator: Option<&'a Policy>,
}

impl Policies {
    pub fn new(
        policies: impl IntoIterator<Item = Arc<Policy>>,
        operator: impl IntoIterator<Item = Arc<Policy>>,
    ) -> Policies {
        let sorted = |it: &mut dyn Iterator<Item = Arc<Policy>>| {
            let mut v: Vec<Arc<Policy>> = it.collect();
            v.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
            v
        };
        Policies {
            policies: sorted(&mut policies.into_iter()),
            operator: sorted(&mut operator.into_iter()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.operator.is_empty()
    }

    /// What applies to the `target` called `name`.
    pub fn applied(&self, target: Target, name: &str) -> Applied<'_> {
        Applied {
            policy: pick(&self.policies, target, name),
            operator: pick(&self.operator, target, name),
        }
    }
}

/// The first of `list` (sorted) that applies.
fn pick<'a>(list: &'a [Arc<Policy>], target: Target, name: &str) -> Option<&'a Policy> {
    list.iter().find(|p| p.matches(target, name)).map(|p| &**p)
}

impl Applied<'_> {
    /// The definition in force, as the management API shows it: the
    /// policy's keys, with the operator policy's numeric limits where
    /// stricter (or where the policy has none).
    pub fn effective_definition(&self) -> Map<String, Value> {
        let mut out = self.policy.map(|p| p.raw.clone()).unwrap_or_default();
        if let Some(op) = self.operator {
            for (k, v) in &op.raw {
                let stricter = match (out.get(k).and_then(Value::as_u64), v.as_u64()) {
                    (Some(mine), Some(theirs)) => theirs < mine,
                    _ => true,
                };
                if stricter {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        out
    }

    /// The effective `alternate-exchange` of an exchange whose declared
    /// argument is `declared`.
    pub fn alternate_exchange(&self, declared: Option<String>) -> Option<String> {
        declared.or_else(|| {
            self.policy
                .and_then(|p| p.definition.alternate_exchange.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn policy(name: &str, pattern: &str, apply: &str, prio: i64, d: Value) -> Arc<Policy> {
        Arc::new(Policy::new("/", name, pattern, apply, prio, def(d), false).unwrap())
    }

    #[test]
    fn validates_like_rabbitmq() {
        let err = |v: Value, op: bool| Definition::parse(&def(v), op).unwrap_err();
        assert_eq!(
            err(json!({"message-ttl": -1}), false),
            "Validation failed\n\n-1 is not a valid message TTL\n"
        );
        assert!(err(json!({"expires": 0}), false).contains("not a valid queue expiry"));
        assert!(err(json!({"max-length": "5"}), false).contains("<<\"5\">> is not a valid"));
        assert!(err(json!({"max-length": 1.5}), false).contains("not a valid maximum length"));
        assert!(err(json!({"overflow": "drop-tail"}), false).contains("not a valid overflow"));
        assert!(err(json!({"queue-mode": "eager"}), false).contains("queue-mode"));
        assert!(err(json!({"dead-letter-exchange": 1}), false).contains("dead letter exchange"));
        assert_eq!(
            err(json!({"foo": 1, "bar": 2}), false),
            "Validation failed\n\n[{<<\"bar\">>,2},{<<\"foo\">>,1}] are not recognised policy settings\n"
        );
        assert!(err(json!({"ha-mode": "all"}), false).contains("'ha-mode' is not supported"));
        assert!(err(json!({"delivery-limit": -1}), false).contains("not a valid delivery limit"));
        assert_eq!(
            Definition::parse(&def(json!({"delivery-limit": 3})), true)
                .unwrap()
                .delivery_limit,
            Some(3)
        );
        assert!(err(json!({}), false).contains("no policy provided"));
        // Operator policies hold the numeric limits only.
        assert!(err(json!({"overflow": "drop-head"}), true).contains("not recognised"));
        assert_eq!(
            Definition::parse(&def(json!({"max-length": 5, "expires": 10})), true).unwrap(),
            Definition {
                max_length: Some(5),
                expires: Some(10),
                ..Default::default()
            }
        );
        let bad_regex = Policy::new(
            "/",
            "p",
            "(",
            "queues",
            0,
            def(json!({"expires": 1})),
            false,
        );
        assert!(bad_regex
            .unwrap_err()
            .contains("is not a valid regular expression"));
        let bad_apply = Policy::new("/", "p", ".", "queue", 0, def(json!({"expires": 1})), false);
        assert!(bad_apply.unwrap_err().contains("apply-to"));
    }

    #[test]
    fn decodes_every_key() {
        let d = Definition::parse(
            &def(json!({
                "message-ttl": 10, "expires": 20, "max-length": 3, "max-length-bytes": 4,
                "overflow": "reject-publish-dlx", "dead-letter-exchange": "dlx",
                "dead-letter-routing-key": "rk", "queue-mode": "lazy",
                "alternate-exchange": "ae", "delivery-limit": 5,
                "consumer-timeout": 60000, "max-age": "2h",
                "stream-max-segment-size-bytes": 1000, "stream-filter-size-bytes": 32
            })),
            false,
        )
        .unwrap();
        assert_eq!(
            d,
            Definition {
                message_ttl: Some(10),
                expires: Some(20),
                max_length: Some(3),
                max_length_bytes: Some(4),
                overflow: Some(Overflow::RejectPublishDlx),
                dead_letter_exchange: Some("dlx".into()),
                dead_letter_routing_key: Some("rk".into()),
                lazy: Some(true),
                alternate_exchange: Some("ae".into()),
                delivery_limit: Some(5),
                consumer_timeout: Some(60000),
                max_age: Some(7_200_000),
                segment_bytes: Some(1000),
            }
        );
        assert!(Definition::parse(&def(json!({"max-age": "2x"})), false).is_err());
        assert!(Definition::parse(&def(json!({"stream-filter-size-bytes": 300})), false).is_err());
    }

    #[test]
    fn highest_priority_applies_per_kind() {
        let ps = Policies::new(
            [
                policy("low", "^q", "queues", 1, json!({"max-length": 1})),
                policy("high", "^q\\.", "all", 5, json!({"max-length": 2})),
                policy(
                    "ex",
                    ".*",
                    "exchanges",
                    9,
                    json!({"alternate-exchange": "ae"}),
                ),
                policy("b-tie", "^t", "queues", 3, json!({"max-length": 3})),
                policy("a-tie", "^t", "queues", 3, json!({"max-length": 4})),
            ],
            [],
        );
        let name = |t, n| ps.applied(t, n).policy.map(|p| p.name.clone());
        assert_eq!(name(Target::Queue, "q.x"), Some("high".into()));
        assert_eq!(name(Target::Queue, "qx"), Some("low".into()));
        assert_eq!(name(Target::Queue, "z"), None);
        assert_eq!(name(Target::Queue, "t1"), Some("a-tie".into()));
        assert_eq!(name(Target::Exchange, "q.x"), Some("ex".into()));
        assert_eq!(name(Target::Exchange, "amq.direct"), Some("ex".into()));
        let applied = ps.applied(Target::Exchange, "x");
        assert_eq!(applied.alternate_exchange(None), Some("ae".into()));
        assert_eq!(
            applied.alternate_exchange(Some("mine".into())),
            Some("mine".into())
        );
        // Each queue type by its apply-to; "queues" covers all three.
        let q = policy("qq", ".*", "quorum_queues", 0, json!({"max-length": 1}));
        assert!(!q.matches(Target::Queue, "a"));
        assert!(q.matches(Target::QuorumQueue, "a"));
        assert!(!q.matches(Target::Stream, "a"));
        let s = policy("st", ".*", "streams", 0, json!({"max-age": "1D"}));
        assert!(s.matches(Target::Stream, "a"));
        assert!(!s.matches(Target::Queue, "a"));
        let all = policy("all", ".*", "queues", 0, json!({"max-length-bytes": 1}));
        assert!(all.matches(Target::Stream, "a") && all.matches(Target::Queue, "a"));
        let c = policy("cq", ".*", "classic_queues", 0, json!({"max-length": 1}));
        assert!(c.matches(Target::Queue, "a"));
        assert!(!c.matches(Target::QuorumQueue, "a"));
        assert!(!c.matches(Target::Exchange, "a"));
    }
}
