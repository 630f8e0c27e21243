//! A stream consumer's arguments, checked by the channel at `basic.consume`
//! (406 with RabbitMQ's texts) and acted on by the stream: where to start
//! (`x-stream-offset`), which messages it wants (`x-stream-filter`,
//! `x-stream-match-unfiltered`) and whether the stream remembers where it
//! got to (`x-stream-automatic-offset-tracking`).

use crate::error::{precondition, AmqpResult};
use crate::queue::args::{parse_age, type_name};
use warren_protocol::types::{AMQPValue, FieldTable};

/// Consumer arguments only a stream takes.
pub const STREAM_CONSUMER_ARGS: [&str; 4] = [
    "x-stream-offset",
    "x-stream-filter",
    "x-stream-match-unfiltered",
    "x-stream-automatic-offset-tracking",
];

/// Where a stream consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first offset the stream still holds.
    First,
    /// The start of the last chunk (the last batch appended together).
    Last,
    /// The next message appended (RabbitMQ's default).
    Next,
    /// This offset (the first kept if it is older; waits for it if it is
    /// beyond the end).
    Offset(u64),
    /// The first message appended at or after this Unix time (ms): an AMQP
    /// timestamp, or now less an interval (`1h`, `30m`).
    Time(u64),
}

/// A stream consumer's settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamConsume {
    /// None: not given (a tracked offset, else `Next`).
    pub start: Option<Start>,
    /// `x-stream-filter`: only messages whose `x-stream-filter-value` is
    /// one of these (None: every message).
    pub filter: Option<Vec<Vec<u8>>>,
    /// `x-stream-match-unfiltered`: with a filter, messages without a
    /// filter value too.
    pub match_unfiltered: bool,
    /// `x-stream-automatic-offset-tracking`: the stream stores how far the
    /// consumer (by its tag) has acknowledged, and a later consumer with
    /// the same tag and no `x-stream-offset` starts there.
    pub track: bool,
    /// The consumer's arguments as given (what another node's consumer of
    /// the stream sends its node, which reads them again).
    pub arguments: FieldTable,
}

fn invalid(key: &str, queue: &str, vhost: &str, why: String) -> crate::error::AmqpError {
    precondition(format!(
        "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {why}"
    ))
}

/// RabbitMQ's rendering of a bad offset value.
fn bad_offset(v: &AMQPValue) -> String {
    let shown = match v {
        AMQPValue::LongString(s) => format!("<<\"{}\">>", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("<<\"{}\">>", s.as_str()),
        other => format!("{other:?}"),
    };
    format!("{{invalid_stream_offset_arg,{{{},{shown}}}}}", type_name(v))
}

/// Check and decode a stream consumer's arguments; `now_ms` turns an
/// interval into a start time.
pub fn parse(
    queue: &str,
    vhost: &str,
    args: &FieldTable,
    now_ms: u64,
) -> AmqpResult<StreamConsume> {
    let t = args.inner();
    let mut c = StreamConsume {
        arguments: args.clone(),
        ..Default::default()
    };
    if let Some(v) = t.get("x-stream-offset") {
        let start = match v {
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                let s = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    _ => unreachable!(),
                };
                match s.as_str() {
                    "first" => Some(Start::First),
                    "last" => Some(Start::Last),
                    "next" => Some(Start::Next),
                    other => parse_age(other).map(|ms| Start::Time(now_ms.saturating_sub(ms))),
                }
            }
            AMQPValue::Timestamp(secs) => Some(Start::Time(secs.saturating_mul(1000))),
            other => crate::fields::as_int(other)
                .map(|n| Start::Offset(n.clamp(0, i128::from(u64::MAX)) as u64)),
        };
        match start {
            Some(s) => c.start = Some(s),
            None => return Err(invalid("x-stream-offset", queue, vhost, bad_offset(v))),
        }
    }
    if let Some(v) = t.get("x-stream-filter") {
        let text = |v: &AMQPValue| match v {
            AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
            _ => None,
        };
        let values = match v {
            AMQPValue::FieldArray(a) => a.as_slice().iter().map(text).collect::<Option<Vec<_>>>(),
            one => text(one).map(|s| vec![s]),
        };
        match values {
            Some(vs) if !vs.is_empty() => c.filter = Some(vs),
            _ => {
                return Err(invalid(
                    "x-stream-filter",
                    queue,
                    vhost,
                    format!(
                        "{{unacceptable_type,{}}} (a string or a non-empty array of strings)",
                        type_name(v)
                    ),
                ))
            }
        }
    }
    for (key, slot) in [
        ("x-stream-match-unfiltered", &mut c.match_unfiltered),
        ("x-stream-automatic-offset-tracking", &mut c.track),
    ] {
        match t.get(key) {
            None => {}
            Some(AMQPValue::Boolean(b)) => *slot = *b,
            Some(v) => {
                return Err(invalid(
                    key,
                    queue,
                    vhost,
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                ))
            }
        }
    }
    Ok(c)
}

impl StreamConsume {
    /// Whether a message with this filter value goes to the consumer.
    pub fn wants(&self, value: Option<&[u8]>) -> bool {
        match (&self.filter, value) {
            (None, _) => true,
            (Some(_), None) => self.match_unfiltered,
            (Some(f), Some(v)) => f.iter().any(|x| x == v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::types::{FieldArray, LongString};

    fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }
    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }
    fn start(v: AMQPValue) -> Result<Option<Start>, String> {
        parse("s", "/", &args(&[("x-stream-offset", v)]), 10_000_000)
            .map(|c| c.start)
            .map_err(|e| e.text)
    }

    #[test]
    fn offsets_as_rabbitmq_takes_them() {
        assert_eq!(start(s("first")), Ok(Some(Start::First)));
        assert_eq!(start(s("last")), Ok(Some(Start::Last)));
        assert_eq!(start(s("next")), Ok(Some(Start::Next)));
        assert_eq!(start(AMQPValue::LongInt(5)), Ok(Some(Start::Offset(5))));
        assert_eq!(
            start(AMQPValue::LongLongInt(-1)),
            Ok(Some(Start::Offset(0)))
        );
        assert_eq!(start(AMQPValue::Timestamp(7)), Ok(Some(Start::Time(7000))));
        assert_eq!(
            start(s("1h")),
            Ok(Some(Start::Time(10_000_000 - 3_600_000)))
        );
        assert_eq!(
            start(s("0s")),
            Err("invalid arg 'x-stream-offset' for queue 's' in vhost '/': {invalid_stream_offset_arg,{longstr,<<\"0s\">>}}".into())
        );
        assert!(start(s("bogus")).is_err());
        assert!(start(AMQPValue::Boolean(true)).is_err());
        let none = parse("s", "/", &FieldTable::default(), 0).unwrap();
        assert_eq!(none, StreamConsume::default());
    }

    #[test]
    fn filters_match_exactly() {
        let c = parse(
            "s",
            "/",
            &args(&[(
                "x-stream-filter",
                AMQPValue::FieldArray(FieldArray::from(vec![s("eu"), s("us")])),
            )]),
            0,
        )
        .unwrap();
        assert!(c.wants(Some(b"eu")) && c.wants(Some(b"us")));
        assert!(!c.wants(Some(b"apac")) && !c.wants(None));
        let c = parse(
            "s",
            "/",
            &args(&[
                ("x-stream-filter", s("eu")),
                ("x-stream-match-unfiltered", AMQPValue::Boolean(true)),
            ]),
            0,
        )
        .unwrap();
        assert!(c.wants(None) && c.wants(Some(b"eu")) && !c.wants(Some(b"us")));
        assert!(StreamConsume::default().wants(Some(b"x")));
        assert!(parse(
            "s",
            "/",
            &args(&[("x-stream-filter", AMQPValue::LongInt(1))]),
            0
        )
        .is_err());
        assert!(parse(
            "s",
            "/",
            &args(&[("x-stream-automatic-offset-tracking", s("yes"))]),
            0
        )
        .is_err());
    }
}
