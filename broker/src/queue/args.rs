//! Queue arguments (`x-message-ttl`, `x-expires`, `x-max-length`,
//! `x-max-length-bytes`, `x-overflow`, `x-dead-letter-exchange`,
//! `x-dead-letter-routing-key`, `x-max-priority`): checked by
//! [`validate`] when the vhost declares a queue (406 like RabbitMQ), then read
//! once by the queue actor into [`QueueArgs`].

use crate::error::{precondition, AmqpResult};
use crate::policy::{self, Applied};
use warren_protocol::types::{AMQPValue, FieldTable};

/// Largest TTL / expiry RabbitMQ accepts (its timer limit, in ms).
const MAX_EXPIRY: i128 = 4_294_967_295;
/// Highest `x-max-priority` RabbitMQ supports.
const MAX_PRIORITY: i128 = 255;

/// What a queue does when a publish would exceed its length limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Enqueue, then drop (dead-letter, reason `maxlen`) from the head.
    #[default]
    DropHead,
    /// Refuse the publish (publisher confirm: basic.nack).
    RejectPublish,
    /// Refuse the publish and dead-letter it (reason `maxlen`).
    RejectPublishDlx,
}

/// The arguments the queue actor acts on, decoded once at declaration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// `x-message-ttl`, ms.
    pub message_ttl: Option<u64>,
    /// `x-expires`, ms unused before the queue deletes itself.
    pub expires: Option<u64>,
    /// `x-max-length`, ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`, body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-dead-letter-exchange` ("" is the default exchange).
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: replaces the message's routing key.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority`: priority levels 0..=n.
    pub max_priority: Option<u8>,
    /// `x-queue-mode: lazy`: beyond its in-memory window the queue pages
    /// every message to disk, not only persistent ones.
    pub lazy: bool,
    /// `x-single-active-consumer: true`: one consumer at a time gets
    /// messages; the others wait their turn.
    pub single_active: bool,
    /// `x-queue-type: quorum`: durable, and counts deliveries always (with
    /// a delivery limit of [`QUORUM_DELIVERY_LIMIT`] unless one is set).
    /// Replicated once Warren forms clusters; on one node it is a durable
    /// queue with those defaults.
    pub quorum: bool,
    /// `x-delivery-limit` / policy `delivery-limit`: a message that came
    /// back more often than this is dead-lettered (reason `delivery_limit`).
    pub delivery_limit: Option<u64>,
    /// `x-consumer-timeout` / policy `consumer-timeout` (else the broker's):
    /// ms a delivery may stay unacknowledged before its consumer is
    /// cancelled (or its channel closed) and its messages returned.
    pub consumer_timeout: Option<u64>,
    /// `x-queue-type: stream`: an append-only log read by offset.
    pub stream: bool,
    /// `x-max-age` / policy `max-age` (streams): ms after which a whole
    /// segment whose newest message is older is removed.
    pub max_age: Option<u64>,
    /// `x-stream-max-segment-size-bytes` / policy
    /// `stream-max-segment-size-bytes`: the retention unit of a stream.
    pub segment_bytes: Option<u64>,
}

/// The delivery limit of a quorum queue that sets none (RabbitMQ 4's).
pub const QUORUM_DELIVERY_LIMIT: u64 = 20;

impl QueueArgs {
    /// Whether the queue counts how often each message came back (and
    /// tells consumers, `x-delivery-count`): quorum queues and queues with
    /// a delivery limit.
    pub fn counts_deliveries(&self) -> bool {
        self.quorum || self.delivery_limit.is_some()
    }
}

impl QueueArgs {
    /// Decode (leniently: [`validate`] already refused bad values).
    pub fn parse(args: &FieldTable) -> QueueArgs {
        let t = args.inner();
        let uint = |k: &str| {
            t.get(k)
                .and_then(int_value)
                .and_then(|(_, v)| u64::try_from(v).ok())
        };
        let text = |k: &str| t.get(k).and_then(string_value);
        QueueArgs {
            message_ttl: uint("x-message-ttl"),
            expires: uint("x-expires").filter(|&v| v > 0),
            max_length: uint("x-max-length"),
            max_length_bytes: uint("x-max-length-bytes"),
            overflow: match text("x-overflow").as_deref() {
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            },
            dead_letter_exchange: text("x-dead-letter-exchange"),
            dead_letter_routing_key: text("x-dead-letter-routing-key"),
            max_priority: uint("x-max-priority").map(|p| p.min(MAX_PRIORITY as u64) as u8),
            lazy: text("x-queue-mode").as_deref() == Some("lazy"),
            single_active: t.get("x-single-active-consumer") == Some(&AMQPValue::Boolean(true)),
            quorum: text("x-queue-type").as_deref() == Some("quorum"),
            delivery_limit: uint("x-delivery-limit"),
            consumer_timeout: uint("x-consumer-timeout").filter(|&v| v > 0),
            stream: text("x-queue-type").as_deref() == Some("stream"),
            max_age: text("x-max-age").as_deref().and_then(parse_age),
            segment_bytes: uint("x-stream-max-segment-size-bytes"),
        }
    }
}

impl QueueArgs {
    /// The settings in force for a queue declared with `declared` under
    /// the policies `applied` (RabbitMQ's precedence, see `policy`): the
    /// numeric limits take the smallest of argument, policy and operator
    /// policy; the other keys the argument if given, else the policy.
    pub fn effective(declared: &FieldTable, applied: Applied<'_>) -> QueueArgs {
        let mut a = QueueArgs::parse(declared);
        let min = |mine: Option<u64>, theirs: Option<u64>| match (mine, theirs) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        for d in [applied.policy, applied.operator]
            .into_iter()
            .flatten()
            .map(|p| &p.definition)
        {
            a.message_ttl = min(a.message_ttl, d.message_ttl);
            a.expires = min(a.expires, d.expires);
            a.max_length = min(a.max_length, d.max_length);
            a.max_length_bytes = min(a.max_length_bytes, d.max_length_bytes);
            a.delivery_limit = min(a.delivery_limit, d.delivery_limit);
            a.consumer_timeout = min(a.consumer_timeout, d.consumer_timeout);
            a.max_age = min(a.max_age, d.max_age);
        }
        if a.quorum && a.delivery_limit.is_none() {
            a.delivery_limit = Some(QUORUM_DELIVERY_LIMIT);
        }
        let Some(p) = applied.policy else {
            return a;
        };
        let d = &p.definition;
        let t = declared.inner();
        if !t.contains_key("x-overflow") {
            if let Some(o) = d.overflow {
                a.overflow = match o {
                    policy::Overflow::DropHead => Overflow::DropHead,
                    policy::Overflow::RejectPublish => Overflow::RejectPublish,
                    policy::Overflow::RejectPublishDlx => Overflow::RejectPublishDlx,
                };
            }
        }
        if !t.contains_key("x-dead-letter-exchange") {
            a.dead_letter_exchange = d.dead_letter_exchange.clone();
        }
        if !t.contains_key("x-dead-letter-routing-key") {
            a.dead_letter_routing_key = d.dead_letter_routing_key.clone();
        }
        if !t.contains_key("x-stream-max-segment-size-bytes") {
            a.segment_bytes = a.segment_bytes.or(d.segment_bytes);
        }
        if !t.contains_key("x-queue-mode") {
            if let Some(lazy) = d.lazy {
                a.lazy = lazy;
            }
        }
        a
    }
}

/// An integer argument with RabbitMQ's name for its wire type.
pub(crate) fn int_value(v: &AMQPValue) -> Option<(&'static str, i128)> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => ("byte", *x as i128),
        AMQPValue::ShortShortUInt(x) => ("unsignedbyte", *x as i128),
        AMQPValue::ShortInt(x) => ("short", *x as i128),
        AMQPValue::ShortUInt(x) => ("unsignedshort", *x as i128),
        AMQPValue::LongInt(x) => ("signedint", *x as i128),
        AMQPValue::LongUInt(x) => ("unsignedint", *x as i128),
        AMQPValue::LongLongInt(x) => ("long", *x as i128),
        _ => return None,
    })
}

fn string_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// RabbitMQ's name for a field value's type (in error texts).
pub(crate) fn type_name(v: &AMQPValue) -> &'static str {
    if let Some((n, _)) = int_value(v) {
        return n;
    }
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        _ => "void",
    }
}

/// Check the declare arguments as RabbitMQ does: 406 PRECONDITION_FAILED
/// "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-1}".
pub fn validate(queue: &str, vhost: &str, args: &FieldTable) -> AmqpResult<()> {
    let t = args.inner();
    for (key, value) in t.iter() {
        let problem = match key.as_str() {
            "x-message-ttl" => int_arg(value, 0, MAX_EXPIRY, false),
            "x-expires" => int_arg(value, 1, MAX_EXPIRY, false),
            "x-max-length" | "x-max-length-bytes" => int_arg(value, 0, i128::MAX, false),
            "x-max-priority" => int_arg(value, 0, MAX_PRIORITY, true),
            "x-dead-letter-exchange" => str_arg(value).err(),
            // Arguments whose absence would change what happens to
            // messages: refused until Warren implements them, never
            // accepted and ignored (RabbitMQ's classic queues ignore some).
            "x-delivery-limit" => int_arg(value, 0, u32::MAX as i128, false),
            "x-consumer-timeout" => int_arg(value, 1, MAX_EXPIRY, false),
            // Warren hands a dead letter to its targets once, without a
            // confirm: RabbitMQ's at-most-once.
            "x-dead-letter-strategy" => match str_arg(value) {
                Err(e) => Some(e),
                Ok(v) if v == "at-most-once" => None,
                Ok(v) if v == "at-least-once" => Some("\"not supported by Warren yet\"".into()),
                Ok(_) => Some("invalid_dlx_strategy".into()),
            },
            // One node: every locator picks it, and a group is all the
            // nodes there are when it asks for more (RabbitMQ's rule).
            "x-queue-leader-locator" => match str_arg(value) {
                Err(e) => Some(e),
                Ok(v) if v == "client-local" || v == "balanced" => None,
                Ok(v) => Some(format!("{{invalid_leader_locator,<<\"{v}\">>}}")),
            },
            "x-quorum-initial-group-size" => int_arg(value, 1, i128::from(u16::MAX), false),
            "x-message-deduplication" => match value {
                AMQPValue::Boolean(_) => None,
                other => Some(format!("{{unacceptable_type,{}}}", type_name(other))),
            },
            "x-deduplication-header" => str_arg(value).err(),
            "x-max-age" => match value {
                AMQPValue::LongString(s) => match parse_age(&String::from_utf8_lossy(s.as_bytes())) {
                    Some(_) => None,
                    None => Some(format!(
                        "{{invalid_max_age,<<\"{}\">>}} (a positive number followed by Y, M, D, h, m or s)",
                        String::from_utf8_lossy(s.as_bytes())
                    )),
                },
                other => Some(format!("{{unacceptable_type,{}}}", type_name(other))),
            },
            "x-stream-max-segment-size-bytes" => int_arg(value, 0, i128::MAX, false),
            "x-initial-cluster-size" => int_arg(value, 1, i128::from(u16::MAX), false),
            // The size of RabbitMQ's per-chunk Bloom filter. Warren filters
            // each message exactly, so any valid size gives the same result.
            "x-stream-filter-size-bytes" => int_arg(value, 16, 255, false),
            "x-cache-size" | "x-cache-ttl" | "x-cache-persistence" => {
                Some("\"not supported by Warren yet\"".into())
            }
            "x-queue-type" => match str_arg(value) {
                Err(e) => Some(e),
                Ok(t) if t == "classic" || t == "quorum" || t == "stream" => None,
                Ok(t) => Some(format!("\"unsupported queue type '{t}'\"")),
            },
            "x-single-active-consumer" => match value {
                AMQPValue::Boolean(_) => None,
                other => Some(format!("{{unacceptable_type,{}}}", type_name(other))),
            },
            "x-dead-letter-routing-key" => match str_arg(value) {
                Err(e) => Some(e),
                Ok(_) if !t.contains_key("x-dead-letter-exchange") => {
                    Some("routing_key_but_no_dlx_defined".into())
                }
                Ok(_) => None,
            },
            "x-overflow" => match str_arg(value) {
                Err(e) => Some(e),
                Ok(s)
                    if matches!(
                        s.as_str(),
                        "drop-head" | "reject-publish" | "reject-publish-dlx"
                    ) =>
                {
                    None
                }
                Ok(s) => Some(format!("{{invalid_overflow,<<\"{s}\">>}}")),
            },
            _ => None,
        };
        if let Some(p) = problem {
            return Err(precondition(format!(
                "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {p}"
            )));
        }
    }
    Ok(())
}

/// Arguments only a stream takes.
const STREAM_ONLY: [&str; 4] = [
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-stream-filter-size-bytes",
];

/// Arguments a stream refuses (RabbitMQ's list, and Warren's queue-only
/// features: deduplication, consumer timeouts).
const NOT_FOR_STREAMS: [&str; 20] = [
    "x-max-length",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-priority",
    "x-expires",
    "x-single-active-consumer",
    "x-overflow",
    "x-queue-mode",
    "x-queue-master-locator",
    "x-delivery-limit",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
    "x-consumer-timeout",
    "x-message-deduplication",
    "x-deduplication-header",
    "x-cache-size",
    "x-cache-ttl",
];

/// What a queue of its type refuses at declaration, as RabbitMQ refuses it
/// (406). Quorum queues and streams are durable, not exclusive and not
/// auto-delete; quorum queues have no priorities and no queue mode;
/// streams refuse the arguments of destructive queues; only streams take
/// the stream arguments. Only for a queue being created.
pub fn validate_type(
    queue: &str,
    vhost: &str,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    args: &FieldTable,
) -> AmqpResult<()> {
    let t = args.inner();
    let kind = t.get("x-queue-type").and_then(string_value);
    let (type_name, refused): (&str, &[&str]) = match kind.as_deref() {
        Some("quorum") => (
            "rabbit_quorum_queue",
            &["x-max-priority", "x-queue-mode", "x-queue-master-locator"],
        ),
        Some("stream") => ("rabbit_stream_queue", &NOT_FOR_STREAMS),
        _ => ("rabbit_classic_queue", &[]),
    };
    if kind
        .as_deref()
        .is_some_and(|k| k == "quorum" || k == "stream")
    {
        for (bad, property) in [
            (!durable, "non-durable"),
            (exclusive, "exclusive-owner"),
            (auto_delete, "auto-delete"),
        ] {
            if bad {
                return Err(precondition(format!(
                    "invalid property '{property}' for queue '{queue}' in vhost '{vhost}'"
                )));
            }
        }
    }
    let stream = kind.as_deref() == Some("stream");
    for arg in t.keys() {
        let arg = arg.as_str();
        if refused.contains(&arg) || (!stream && STREAM_ONLY.contains(&arg)) {
            return Err(precondition(format!(
                "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}' of queue type {type_name}"
            )));
        }
    }
    Ok(())
}

/// A retention age as RabbitMQ writes it (`x-max-age`, policy `max-age`):
/// a positive number and a unit, `Y`, `M` (30 days), `D`, `h`, `m` or `s`;
/// in ms.
pub fn parse_age(s: &str) -> Option<u64> {
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    (n > 0).then(|| n.saturating_mul(secs).saturating_mul(1000))
}

/// An integer within `min..=max`; the Erlang-style reason otherwise.
fn int_arg(v: &AMQPValue, min: i128, max: i128, priority: bool) -> Option<String> {
    let Some((_, n)) = int_value(v) else {
        return Some(format!("{{unacceptable_type,{}}}", type_name(v)));
    };
    if n < 0 {
        Some(format!("{{value_negative,{n}}}"))
    } else if n < min {
        Some(format!("{{value_zero,{n}}}"))
    } else if n > max && priority {
        Some(format!("{{max_value_exceeded,{n}}}"))
    } else if n > max {
        Some(format!("{{value_too_large,{n},{max}}}"))
    } else {
        None
    }
}

fn str_arg(v: &AMQPValue) -> Result<String, String> {
    match v {
        AMQPValue::LongString(s) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Err(format!("{{unacceptable_type,{}}}", type_name(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::types::LongString;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn parses_every_argument() {
        let a = QueueArgs::parse(&table(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-expires", AMQPValue::LongLongInt(1000)),
            ("x-max-length", AMQPValue::ShortInt(2)),
            ("x-max-length-bytes", AMQPValue::LongUInt(100)),
            ("x-overflow", s("reject-publish-dlx")),
            ("x-dead-letter-exchange", s("dlx")),
            ("x-dead-letter-routing-key", s("rk")),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
            ("x-queue-mode", s("lazy")),
        ]));
        assert_eq!(
            a,
            QueueArgs {
                message_ttl: Some(50),
                expires: Some(1000),
                max_length: Some(2),
                max_length_bytes: Some(100),
                overflow: Overflow::RejectPublishDlx,
                dead_letter_exchange: Some("dlx".into()),
                dead_letter_routing_key: Some("rk".into()),
                max_priority: Some(10),
                lazy: true,
                single_active: false,
                quorum: false,
                delivery_limit: None,
                consumer_timeout: None,
                stream: false,
                max_age: None,
                segment_bytes: None,
            }
        );
        assert_eq!(
            QueueArgs::parse(&FieldTable::default()),
            QueueArgs::default()
        );
    }

    #[test]
    fn refuses_bad_values_like_rabbitmq() {
        let err = |pairs: &[(&str, AMQPValue)]| {
            validate("q", "/", &table(pairs)).map_err(|e| (e.code, e.text))
        };
        assert_eq!(
            err(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
            Err((
                406,
                "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-1}"
                    .into()
            ))
        );
        let bad: &[(&str, AMQPValue)] = &[
            ("x-message-ttl", s("10")),
            ("x-expires", AMQPValue::LongInt(0)),
            ("x-expires", AMQPValue::LongLongInt(-5)),
            ("x-max-length", AMQPValue::LongInt(-1)),
            ("x-max-length-bytes", AMQPValue::Boolean(true)),
            ("x-max-priority", AMQPValue::LongInt(256)),
            ("x-overflow", s("drop-tail")),
            ("x-overflow", AMQPValue::LongInt(1)),
            ("x-dead-letter-exchange", AMQPValue::LongInt(1)),
            ("x-dead-letter-routing-key", s("rk")),
        ];
        for (k, v) in bad {
            let r = err(&[(k, v.clone())]);
            assert!(matches!(r, Err((406, _))), "{k} {v:?}: {r:?}");
        }
        assert_eq!(
            err(&[("x-max-length", s("1"))]).unwrap_err().1,
            "invalid arg 'x-max-length' for queue 'q' in vhost '/': {unacceptable_type,longstr}"
        );
        let good = table(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-expires", AMQPValue::LongInt(1)),
            ("x-max-length", AMQPValue::LongInt(0)),
            ("x-max-priority", AMQPValue::LongInt(255)),
            ("x-overflow", s("drop-head")),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("k")),
            ("x-something-else", AMQPValue::Boolean(true)),
        ]);
        assert_eq!(validate("q", "/", &good), Ok(()));
    }
}
