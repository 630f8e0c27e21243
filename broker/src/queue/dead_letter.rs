//! Dead-lettering: the message a queue republishes to its
//! `x-dead-letter-exchange` when a message is rejected without requeue,
//! expires, or is dropped by a length limit. Builds RabbitMQ's `x-death`
//! header (one entry per queue and reason, with a count) and the
//! `x-first-death-*` / `x-last-death-*` headers, and detects automatic cycles
//! (RabbitMQ's rule: a message that would come back to a queue it already died
//! in, with no rejection on the way, is dropped).
//!
//! Used by the queue actor only; no I/O here. The rebuilt header is the one
//! place Warren changes a publisher's properties: the headers table gets the
//! death headers, and the `expiration` property is removed and kept as
//! `original-expiration`, as RabbitMQ does; every other property keeps the
//! publisher's bytes.

use crate::message::Message;
use warren_protocol::method::ShortStr;
use warren_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

/// Dead letters dropped because their header could not be rebuilt (each one
/// is also logged). Expected to stay 0.
pub static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Messages that died, by reason (as `Reason::index`) and whether their
/// queue had a dead-letter exchange (`[.][1]`, RabbitMQ's `at_most_once`
/// strategy) or not (`[.][0]`, `disabled`: dropped).
pub static DEAD: [[std::sync::atomic::AtomicU64; 2]; 4] =
    [const { [const { std::sync::atomic::AtomicU64::new(0) }; 2] }; 4];

/// Count a message that died.
pub fn count(reason: Reason, has_dlx: bool) {
    DEAD[reason as usize][has_dlx as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Why a message died (the `reason` of its `x-death` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// basic.reject / basic.nack with requeue=false.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped or refused by `x-max-length` / `x-max-length-bytes`.
    MaxLen,
    /// Came back more often than the queue's delivery limit.
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn text_of(v: Option<&AMQPValue>) -> Option<&[u8]> {
    match v? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// The message to republish: `msg` dead in `queue` for `reason`, addressed to
/// `exchange` with `routing_key` (the dead-letter routing key, or None for
/// the original one). `now` is the time in seconds since the Unix epoch.
/// The new header keeps every property's bytes but the headers table (x-death
/// added) and `expiration` (removed, kept in x-death). None only if the
/// rebuilt header is refused, which a header that was valid on arrival
/// cannot be (the caller logs and counts it all the same).
pub fn make(
    msg: &Message,
    reason: Reason,
    queue: &str,
    exchange: &str,
    routing_key: Option<&str>,
    now: u64,
) -> Option<Message> {
    let mut headers = msg.header.headers().unwrap_or_default();
    let original_expiration = msg.header.expiration();
    // The count belongs to the queue the message died in (RabbitMQ drops
    // it too).
    if headers.contains_key("x-delivery-count") {
        let mut m = headers.inner().clone();
        m.remove("x-delivery-count");
        headers = m.into();
    }

    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |d: &AMQPValue| match d {
        AMQPValue::FieldTable(t) => {
            text_of(t.inner().get("queue")) == Some(queue.as_bytes())
                && text_of(t.inner().get("reason")) == Some(reason.as_str().as_bytes())
        }
        _ => false,
    };
    let entry = match deaths.iter().position(same) {
        Some(i) => {
            // Seen here for this reason before: count it, move it to the front.
            let AMQPValue::FieldTable(mut t) = deaths.remove(i) else {
                return None;
            };
            let count = t
                .inner()
                .get("count")
                .and_then(crate::fields::as_int)
                .unwrap_or(0);
            t.insert(
                "count".into(),
                AMQPValue::LongLongInt(i64::try_from(count + 1).unwrap_or(i64::MAX)),
            );
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), long_str(reason.as_str()));
            t.insert("queue".into(), long_str(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now));
            t.insert("exchange".into(), long_str(msg.exchange.as_str()));
            let mut keys = FieldArray::default();
            keys.push(long_str(msg.routing_key.as_str()));
            // The keys it was routed with: CC's strings (RabbitMQ routes on
            // those only; anything else in CC, however deep, stays out).
            if let Some(AMQPValue::FieldArray(cc)) = headers.inner().get("CC") {
                for k in cc.as_slice() {
                    if text_of(Some(k)).is_some() {
                        keys.push(k.clone());
                    }
                }
            }
            t.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
            if let Some(e) = original_expiration {
                t.insert("original-expiration".into(), long_str(e));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
    for (key, value) in [
        ("reason", reason.as_str()),
        ("queue", queue),
        ("exchange", msg.exchange.as_str()),
    ] {
        let first = format!("x-first-death-{key}");
        if !headers.contains_key(&first) {
            headers.insert(first.into(), long_str(value));
        }
        headers.insert(format!("x-last-death-{key}").into(), long_str(value));
    }
    let header = msg.header.with_headers(&headers, true)?;
    Some(Message {
        exchange: ShortStr::truncating(exchange),
        routing_key: match routing_key {
            Some(k) => ShortStr::truncating(k),
            None => msg.routing_key.clone(),
        },
        header,
        body: msg.body.clone(),
        // Dead letters are not written to the store yet.
        stored: None,
    })
}

/// `msg` as this queue delivers it after it came back `count` times: the
/// header `x-delivery-count` set (RabbitMQ's quorum queues' header), every
/// other property the publisher's bytes. The body and store id are shared.
/// None only if the rebuilt header is refused, which one that was valid on
/// arrival cannot be.
pub fn with_delivery_count(msg: &Message, count: u32) -> Option<Message> {
    let mut headers = msg.header.headers().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(count as i64),
    );
    Some(Message {
        exchange: msg.exchange.clone(),
        routing_key: msg.routing_key.clone(),
        header: msg.header.with_headers(&headers, false)?,
        body: msg.body.clone(),
        stored: msg.stored,
    })
}

/// Whether delivering `msg` (already dead-lettered, so its `x-death` is up to
/// date) to `target` closes an automatic cycle: the target appears in
/// `x-death` and no death since (and including) that one was a rejection.
/// Rejections never cycle (a client decided).
pub fn is_cycle(msg: &Message, reason: Reason, target: &str) -> bool {
    if reason == Reason::Rejected {
        return false;
    }
    let Some(headers) = msg.header.headers() else {
        return false;
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    for d in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = d else {
            return false; // put there by a client: not automatic
        };
        if text_of(t.inner().get("reason")) == Some(b"rejected") {
            return false;
        }
        if text_of(t.inner().get("queue")) == Some(target.as_bytes()) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};
    use warren_protocol::amqp::basic::{gen_properties, AMQPProperties};
    use warren_protocol::content::ContentHeader;

    /// A content-header payload (class, weight, body size, properties).
    fn encode_header(props: &AMQPProperties, body_size: u64) -> Option<ContentHeader> {
        let mut raw = Vec::with_capacity(64);
        raw.put_u16(60);
        raw.put_u16(0);
        raw.put_u64(body_size);
        let raw = cookie_factory::gen_simple(gen_properties(props), raw).ok()?;
        ContentHeader::parse(Bytes::from(raw)).ok()
    }

    fn message(props: AMQPProperties) -> Message {
        Message {
            exchange: ShortStr::truncating("orig-x"),
            routing_key: ShortStr::truncating("orig-rk"),
            header: encode_header(&props, 4).unwrap(),
            body: Bytes::from_static(b"body"),
            stored: None,
        }
    }

    fn death(m: &Message, i: usize) -> FieldTable {
        let h = m.header.headers().unwrap();
        let Some(AMQPValue::FieldArray(a)) = h.inner().get("x-death") else {
            panic!("no x-death");
        };
        let AMQPValue::FieldTable(t) = &a.as_slice()[i] else {
            panic!("not a table");
        };
        t.clone()
    }

    fn text(t: &FieldTable, k: &str) -> String {
        String::from_utf8_lossy(text_of(t.inner().get(k)).unwrap()).into_owned()
    }

    #[test]
    fn first_death_builds_headers() {
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_expiration("5000".into())
            .with_priority(3);
        let m = make(
            &message(props),
            Reason::Expired,
            "q1",
            "dlx",
            Some("dead"),
            42,
        )
        .unwrap();
        assert_eq!(m.exchange.as_str(), "dlx");
        assert_eq!(m.routing_key.as_str(), "dead");
        assert_eq!(m.body, Bytes::from_static(b"body"));
        assert_eq!(m.header.body_size(), 4);
        assert_eq!(m.header.expiration(), None);
        assert_eq!(m.header.priority(), Some(3));
        let d = death(&m, 0);
        assert_eq!(d.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(text(&d, "reason"), "expired");
        assert_eq!(text(&d, "queue"), "q1");
        assert_eq!(text(&d, "exchange"), "orig-x");
        assert_eq!(text(&d, "original-expiration"), "5000");
        assert_eq!(d.inner().get("time"), Some(&AMQPValue::Timestamp(42)));
        assert_eq!(
            d.inner().get("routing-keys"),
            Some(&AMQPValue::FieldArray(vec![long_str("orig-rk")].into()))
        );
        let h = m.header.headers().unwrap();
        assert_eq!(
            h.inner().get("x-first-death-reason"),
            Some(&long_str("expired"))
        );
        assert_eq!(h.inner().get("x-first-death-queue"), Some(&long_str("q1")));
        assert_eq!(
            h.inner().get("x-first-death-exchange"),
            Some(&long_str("orig-x"))
        );
    }

    #[test]
    fn repeated_deaths_count_and_cycles_are_found() {
        let m0 = message(AMQPProperties::default());
        // q1 -> (expired) -> q2 -> (expired) -> q1: a cycle back to q1.
        let m1 = make(&m0, Reason::Expired, "q1", "", None, 1).unwrap();
        assert_eq!(m1.routing_key.as_str(), "orig-rk");
        assert!(!is_cycle(&m1, Reason::Expired, "q2"));
        assert!(is_cycle(&m1, Reason::Expired, "q1"));
        let m2 = make(&m1, Reason::Expired, "q2", "", None, 2).unwrap();
        assert!(is_cycle(&m2, Reason::Expired, "q1"));
        assert_eq!(text(&death(&m2, 0), "queue"), "q2");
        assert_eq!(text(&death(&m2, 1), "queue"), "q1");
        // A rejection on the way breaks the automatic cycle.
        let m3 = make(&m2, Reason::Rejected, "q2", "", None, 3).unwrap();
        assert!(!is_cycle(&m3, Reason::Rejected, "q1"));
        let m4 = make(&m3, Reason::Expired, "q1", "", None, 4).unwrap();
        assert!(!is_cycle(&m4, Reason::Expired, "q2"));
        // q1/expired was seen: counted, moved to the front, first-death kept.
        let d = death(&m4, 0);
        assert_eq!(text(&d, "queue"), "q1");
        assert_eq!(d.inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(d.inner().get("time"), Some(&AMQPValue::Timestamp(1)));
        let h = m4.header.headers().unwrap();
        assert_eq!(h.inner().get("x-first-death-queue"), Some(&long_str("q1")));
        assert_eq!(
            h.inner().get("x-last-death-reason"),
            Some(&long_str("expired"))
        );
    }

    /// A CC header may hold anything (a table nested near the depth limit,
    /// say): RabbitMQ routes on its strings only, and so does x-death's
    /// routing-keys, so the dead letter stays valid. (Warren used to copy
    /// the whole CC into x-death, went past its own depth limit, and
    /// dropped the dead letter.)
    #[test]
    fn a_deep_cc_header_does_not_make_the_dead_letter_invalid() {
        let mut deep = AMQPValue::LongString("leaf".into());
        for _ in 0..29 {
            let mut t = FieldTable::default();
            t.insert("n".into(), deep);
            deep = AMQPValue::FieldTable(t);
        }
        let mut cc = FieldArray::default();
        cc.push(AMQPValue::LongString("also".into()));
        cc.push(deep);
        let mut headers = FieldTable::default();
        headers.insert("CC".into(), AMQPValue::FieldArray(cc));
        let m = message(AMQPProperties::default().with_headers(headers));
        let dead = make(&m, Reason::Rejected, "q1", "dlx", None, 1).expect("dead letter");
        let Some(AMQPValue::FieldArray(keys)) =
            death(&dead, 0).inner().get("routing-keys").cloned()
        else {
            panic!("no routing-keys");
        };
        let keys: Vec<_> = keys
            .as_slice()
            .iter()
            .map(|k| text_of(Some(k)).map(<[u8]>::to_vec))
            .collect();
        assert_eq!(
            keys,
            vec![Some(b"orig-rk".to_vec()), Some(b"also".to_vec())]
        );
    }

    /// Properties that are not UTF-8 are carried as bytes on arrival, and
    /// through dead-lettering too.
    #[test]
    fn properties_that_are_not_utf8_survive_dead_lettering() {
        let mut raw = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4];
        raw.extend_from_slice(&(0x8000u16 | 0x0080).to_be_bytes());
        raw.extend_from_slice(b"\x04caf\xe9\x02\xff\xfe");
        let m = Message {
            exchange: ShortStr::truncating("orig-x"),
            routing_key: ShortStr::truncating("orig-rk"),
            header: ContentHeader::parse(Bytes::from(raw)).expect("accepted"),
            body: Bytes::from_static(b"body"),
            stored: None,
        };
        let dead = make(&m, Reason::Expired, "q1", "dlx", None, 1).expect("dead letter");
        let r = dead.header.raw();
        assert_eq!(&r[14..19], b"\x04caf\xe9", "content-type bytes kept");
        assert!(r.ends_with(b"\x02\xff\xfe"), "message-id bytes kept");
        assert_eq!(text(&death(&dead, 0), "reason"), "expired");
    }
}
