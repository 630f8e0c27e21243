//! Message deduplication, with the arguments of the
//! `rabbitmq-message-deduplication` plugin and LavinMQ, so existing
//! publishers work unchanged:
//!
//! - exchange level: the exchange type `x-message-deduplication` (routes
//!   like fanout), or `x-message-deduplication: true` on an exchange of
//!   another type; `x-cache-size` (required), `x-cache-ttl` (ms),
//!   `x-cache-persistence` (`memory` or `disk`). A message whose key was
//!   seen within the TTL (and is still among the last `x-cache-size` keys)
//!   is dropped.
//! - queue level: `x-message-deduplication: true` on a queue drops a
//!   message whose key is held by a message still in the queue (ready or
//!   unacked); see the queue actor.
//!
//! The key is the message header `x-deduplication-header` (or the header
//! named by the `x-deduplication-header` argument); a message without it is
//! never a duplicate. A per-message `x-cache-ttl` header overrides the TTL.
//!
//! Where Warren differs from both, answering their users' complaints: the
//! keys of a durable exchange (unless `x-cache-persistence: memory`) and of
//! a durable queue are written in the same store batch as the message's
//! enqueue, so they survive a crash (the plugin loses queue-level keys on
//! restart, LavinMQ all of them); a duplicate is an idempotent success, so
//! under publisher confirms it gets `basic.ack` (the plugin's nack makes
//! clients retry) and a mandatory duplicate is not returned as unroutable;
//! a publish that is nacked (a queue refused it) forgets its key, so the
//! publisher's retry is not taken for a duplicate; duplicates are counted.

use crate::error::{precondition, AmqpResult};
use crate::fields::as_int;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use warren_protocol::content::ContentHeader;
use warren_protocol::types::{AMQPValue, FieldTable};
use warren_storage::MessageOp;

/// The header that holds a message's key unless an argument names another.
pub const DEFAULT_HEADER: &str = "x-deduplication-header";
/// The exchange type that deduplicates and routes like fanout.
pub const EXCHANGE_TYPE: &str = "x-message-deduplication";
/// "Never expires".
const NEVER: u64 = u64::MAX;

/// Duplicates dropped by every exchange and queue of the node.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn positive(args: &FieldTable, key: &str) -> AmqpResult<Option<u64>> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(v) => match as_int(v) {
            Some(n) if n > 0 && n <= i128::from(u32::MAX) => Ok(Some(n as u64)),
            _ => Err(precondition(format!(
                "invalid argument '{key}': it must be an integer from 1 to 4294967295"
            ))),
        },
    }
}

/// The header a message's key is read from (`x-deduplication-header`
/// argument, else the default).
pub fn header_name(args: &FieldTable) -> AmqpResult<String> {
    match args.inner().get(DEFAULT_HEADER) {
        None => Ok(DEFAULT_HEADER.to_owned()),
        Some(v) => text(v).ok_or_else(|| {
            precondition(format!(
                "invalid argument '{DEFAULT_HEADER}': it must be a header name"
            ))
        }),
    }
}

/// A message's deduplication key: the header's value (a string's bytes, a
/// number in decimal); None without it.
pub fn key_of(header: &ContentHeader, name: &str) -> Option<Bytes> {
    if !header.has_headers() {
        return None;
    }
    let h = header.headers()?;
    let v = h.inner().get(name)?;
    Some(match v {
        AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
        AMQPValue::ShortString(s) => Bytes::copy_from_slice(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Bytes::copy_from_slice(b.as_slice()),
        other => match as_int(other) {
            Some(n) => Bytes::from(n.to_string()),
            None => Bytes::from(format!("{other:?}")),
        },
    })
}

/// Whether a queue deduplicates (`x-message-deduplication: true`).
pub fn queue_enabled(args: &FieldTable) -> bool {
    args.inner().get("x-message-deduplication") == Some(&AMQPValue::Boolean(true))
}

/// An exchange's deduplication settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Keys remembered at most (the oldest go first).
    pub size: usize,
    /// How long a key is remembered (ms); None: until pushed out.
    pub ttl: Option<u64>,
    pub header: String,
    /// Keep the keys in the store (`x-cache-persistence: disk`, the
    /// default of a durable exchange).
    pub persist: bool,
}

/// Whether and how an exchange of type `kind` with `args` deduplicates;
/// 406 for invalid arguments (checked at declaration).
pub fn exchange_settings(
    kind: &str,
    durable: bool,
    args: &FieldTable,
) -> AmqpResult<Option<Settings>> {
    let t = args.inner();
    let enabled = kind == EXCHANGE_TYPE
        || match t.get("x-message-deduplication") {
            None | Some(AMQPValue::Boolean(false)) => false,
            Some(AMQPValue::Boolean(true)) => true,
            Some(_) => {
                return Err(precondition(
                    "invalid argument 'x-message-deduplication': it must be a boolean",
                ))
            }
        };
    if !enabled {
        for k in ["x-cache-size", "x-cache-ttl", "x-cache-persistence"] {
            if t.contains_key(k) {
                return Err(precondition(format!(
                    "invalid argument '{k}': the exchange does not deduplicate (x-message-deduplication)"
                )));
            }
        }
        return Ok(None);
    }
    let size = positive(args, "x-cache-size")?.ok_or_else(|| {
        precondition(
            "missing argument 'x-cache-size': a deduplicating exchange needs its cache size",
        )
    })?;
    let ttl = positive(args, "x-cache-ttl")?;
    let persist = match t.get("x-cache-persistence") {
        None => durable,
        Some(v) => match text(v).as_deref() {
            Some("disk") => durable,
            Some("memory") => false,
            _ => {
                return Err(precondition(
                    "invalid argument 'x-cache-persistence': it must be 'memory' or 'disk'",
                ))
            }
        },
    };
    Ok(Some(Settings {
        size: size as usize,
        ttl,
        header: header_name(args)?,
        persist,
    }))
}

/// What [`ExchangeDedup::admit`] decided.
pub enum Admit {
    /// Seen within its TTL: drop it (an idempotent success).
    Duplicate,
    /// Not a duplicate; no key was recorded (none, or the message routes
    /// nowhere).
    Pass,
    /// Not a duplicate; its key is recorded. `ops` write it down (and what
    /// the cache pushed out); `forget` undoes it if the publish is refused.
    New { ops: Vec<MessageOp>, forget: Forget },
}

/// How to take a recorded key back (the publish was nacked).
pub struct Forget {
    pub key: Bytes,
    pub expires: u64,
}

/// One exchange's cache of keys.
#[derive(Debug)]
pub struct ExchangeDedup {
    pub settings: Settings,
    /// The store scope of its keys (`x` ‖ vhost ‖ 0 ‖ exchange).
    pub scope: Bytes,
    cache: Mutex<Cache>,
    /// Duplicates dropped so far.
    pub duplicates: AtomicU64,
}

#[derive(Default, Debug)]
struct Cache {
    /// Key → (expiry, Unix ms; insertion number).
    keys: HashMap<Bytes, (u64, u64)>,
    /// Insertion order (entries whose number no longer matches are stale).
    order: VecDeque<(Bytes, u64)>,
    inserted: u64,
}

impl Cache {
    fn insert(&mut self, key: Bytes, expires: u64) {
        self.inserted += 1;
        self.keys.insert(key.clone(), (expires, self.inserted));
        self.order.push_back((key, self.inserted));
    }

    /// Push the oldest keys out until `size` remain; returns them.
    fn evict(&mut self, size: usize) -> Vec<Bytes> {
        let mut gone = Vec::new();
        while self.keys.len() > size {
            let Some((k, n)) = self.order.pop_front() else {
                break;
            };
            if self.keys.get(&k).is_some_and(|&(_, m)| m == n) {
                self.keys.remove(&k);
                gone.push(k);
            }
        }
        // Stale order entries (keys inserted again) are dropped now and then.
        if self.order.len() > 2 * self.keys.len() + 64 {
            let keys = &self.keys;
            self.order
                .retain(|(k, n)| keys.get(k).is_some_and(|&(_, m)| m == *n));
        }
        gone
    }
}

/// The store scope of an exchange's keys.
pub fn exchange_scope(vhost: &str, exchange: &str) -> Bytes {
    let mut scope = Vec::with_capacity(2 + vhost.len() + exchange.len());
    scope.push(b'x');
    scope.extend_from_slice(vhost.as_bytes());
    scope.push(0);
    scope.extend_from_slice(exchange.as_bytes());
    scope.into()
}

/// The store scope of a queue's keys.
pub fn queue_scope(queue: u64) -> Bytes {
    let mut scope = Vec::with_capacity(9);
    scope.push(b'q');
    scope.extend_from_slice(&queue.to_be_bytes());
    scope.into()
}

impl ExchangeDedup {
    pub fn new(settings: Settings, vhost: &str, exchange: &str) -> ExchangeDedup {
        ExchangeDedup {
            settings,
            scope: exchange_scope(vhost, exchange),
            cache: Mutex::new(Cache::default()),
            duplicates: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Cache updates never panic half-way.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys read back from the store at start-up (expired ones dropped,
    /// the soonest to expire pushed out first if over the size).
    pub fn restore(&self, mut keys: Vec<(Bytes, u64)>, now: u64) -> Vec<MessageOp> {
        keys.sort_by_key(|(_, e)| *e);
        let mut c = self.lock();
        let mut ops = Vec::new();
        for (k, expires) in keys {
            if expires <= now {
                ops.push(self.delete_op(k, None));
            } else {
                c.insert(k, expires);
            }
        }
        for k in c.evict(self.settings.size) {
            ops.push(self.delete_op(k, None));
        }
        ops
    }

    fn delete_op(&self, key: Bytes, if_value: Option<u64>) -> MessageOp {
        MessageOp::DedupDelete {
            scope: self.scope.clone(),
            key,
            if_value,
        }
    }

    /// Decide on a message published at `now` (Unix ms); `routed`: it goes
    /// to at least one queue (a message that routes nowhere records no key,
    /// so a retry once the topology is fixed is not a duplicate).
    pub fn admit(&self, header: &ContentHeader, routed: bool, now: u64) -> Admit {
        let Some(key) = key_of(header, &self.settings.header) else {
            return Admit::Pass;
        };
        let mut c = self.lock();
        if c.keys.get(&key).is_some_and(|&(e, _)| e > now) {
            drop(c);
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Admit::Duplicate;
        }
        if !routed {
            return Admit::Pass;
        }
        let ttl = message_ttl(header).or(self.settings.ttl);
        let expires = ttl.map_or(NEVER, |t| now.saturating_add(t));
        c.insert(key.clone(), expires);
        let gone = c.evict(self.settings.size);
        drop(c);
        let mut ops = Vec::new();
        if self.settings.persist {
            ops.push(MessageOp::DedupPut {
                scope: self.scope.clone(),
                key: key.clone(),
                value: expires,
            });
            ops.extend(gone.into_iter().map(|k| self.delete_op(k, None)));
        }
        Admit::New {
            ops,
            forget: Forget { key, expires },
        }
    }

    /// Take back a key whose publish was refused (if it is still the one
    /// recorded then); returns the store write, if the keys are stored.
    pub fn forget(&self, f: Forget) -> Option<MessageOp> {
        let mut c = self.lock();
        if c.keys.get(&f.key).is_some_and(|&(e, _)| e == f.expires) {
            c.keys.remove(&f.key);
        }
        drop(c);
        self.settings
            .persist
            .then(|| self.delete_op(f.key, Some(f.expires)))
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The per-message `x-cache-ttl` header (ms), if valid.
fn message_ttl(header: &ContentHeader) -> Option<u64> {
    let h = header.headers()?;
    let n = as_int(h.inner().get("x-cache-ttl")?)?;
    (n > 0).then(|| n.min(i128::from(u64::MAX >> 1)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use warren_protocol::amqp::basic::{gen_properties, AMQPProperties};

    fn header(pairs: &[(&str, AMQPValue)]) -> ContentHeader {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        let props = AMQPProperties::default().with_headers(t);
        let mut raw = Vec::new();
        raw.put_u16(60);
        raw.put_u16(0);
        raw.put_u64(0);
        let raw = cookie_factory::gen_simple(gen_properties(&props), raw).unwrap();
        ContentHeader::parse(Bytes::from(raw)).unwrap()
    }

    fn key(k: &str) -> ContentHeader {
        header(&[(DEFAULT_HEADER, AMQPValue::LongString(k.into()))])
    }

    fn settings(size: usize, ttl: Option<u64>) -> Settings {
        Settings {
            size,
            ttl,
            header: DEFAULT_HEADER.into(),
            persist: true,
        }
    }

    #[test]
    fn a_key_seen_within_its_ttl_is_a_duplicate() {
        let d = ExchangeDedup::new(settings(10, Some(100)), "/", "x");
        assert!(matches!(d.admit(&key("a"), true, 1_000), Admit::New { .. }));
        assert!(matches!(d.admit(&key("a"), true, 1_050), Admit::Duplicate));
        assert!(matches!(d.admit(&key("b"), true, 1_050), Admit::New { .. }));
        // Expired: new again.
        assert!(matches!(d.admit(&key("a"), true, 1_101), Admit::New { .. }));
        // No key: never a duplicate.
        assert!(matches!(d.admit(&header(&[]), true, 1_101), Admit::Pass));
        // A per-message TTL overrides the exchange's.
        let short = header(&[
            (DEFAULT_HEADER, AMQPValue::LongString("c".into())),
            ("x-cache-ttl", AMQPValue::LongInt(10)),
        ]);
        assert!(matches!(d.admit(&short, true, 2_000), Admit::New { .. }));
        assert!(matches!(d.admit(&key("c"), true, 2_011), Admit::New { .. }));
        assert_eq!(d.duplicates.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_cache_keeps_the_last_size_keys_and_forgets_refused_ones() {
        let d = ExchangeDedup::new(settings(2, None), "/", "x");
        for k in ["a", "b", "c"] {
            assert!(matches!(d.admit(&key(k), true, 1), Admit::New { .. }));
        }
        assert_eq!(d.len(), 2);
        assert!(
            matches!(d.admit(&key("a"), true, 1), Admit::New { .. }),
            "pushed out"
        );
        // Unroutable: not recorded.
        assert!(matches!(d.admit(&key("z"), false, 1), Admit::Pass));
        assert!(matches!(d.admit(&key("z"), true, 1), Admit::New { .. }));
        // Refused: forgotten, so the retry is not a duplicate.
        let Admit::New { forget, ops } = d.admit(&key("r"), true, 1) else {
            panic!("new")
        };
        assert!(!ops.is_empty(), "persisted: the key is written");
        assert!(d.forget(forget).is_some());
        assert!(matches!(d.admit(&key("r"), true, 2), Admit::New { .. }));
    }

    #[test]
    fn arguments_are_checked() {
        let args = |pairs: &[(&str, AMQPValue)]| {
            let mut t = FieldTable::default();
            for (k, v) in pairs {
                t.insert((*k).into(), v.clone());
            }
            t
        };
        assert!(exchange_settings(EXCHANGE_TYPE, true, &args(&[])).is_err());
        let s = exchange_settings(
            EXCHANGE_TYPE,
            true,
            &args(&[("x-cache-size", AMQPValue::LongInt(5))]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s, settings(5, None));
        assert_eq!(exchange_settings("direct", true, &args(&[])).unwrap(), None);
        assert!(exchange_settings(
            "direct",
            true,
            &args(&[("x-cache-size", AMQPValue::LongInt(5))])
        )
        .is_err());
        let memory = exchange_settings(
            "direct",
            true,
            &args(&[
                ("x-message-deduplication", AMQPValue::Boolean(true)),
                ("x-cache-size", AMQPValue::LongInt(5)),
                (
                    "x-cache-persistence",
                    AMQPValue::LongString("memory".into()),
                ),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(!memory.persist);
        assert!(exchange_settings(
            EXCHANGE_TYPE,
            true,
            &args(&[("x-cache-size", AMQPValue::LongInt(0))])
        )
        .is_err());
    }
}
