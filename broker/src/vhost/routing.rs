//! Routing: the queues a message published to an exchange goes to. Cached
//! per `(exchange, routing key)` in moka and in a one-entry memo per
//! connection, both checked against the topology generation; headers
//! exchanges depend on the message and are never cached.

use super::{Topology, VHost};
use crate::dedup::ExchangeDedup;
use crate::error::{access_refused, not_found, AmqpResult};
use crate::exchange::{Dest, Exchange, Msg};
use crate::metrics::ExchangeCounters;
use crate::queue::QueueHandle;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;

/// A cached routing result.
pub struct Route {
    exchange: ShortStr,
    routing_key: ShortStr,
    generation: u64,
    queues: Vec<QueueHandle>,
    /// The exchange's counters.
    counters: Arc<ExchangeCounters>,
    /// The exchange's deduplication cache, if it deduplicates.
    dedup: Option<Arc<ExchangeDedup>>,
    /// Some(durable) if the exchange delays messages (`x-delayed-message`).
    delayed: Option<bool>,
}

/// Queues a message goes to.
pub enum Routed {
    Cached(Arc<Route>),
    /// Not cacheable (a headers exchange); with the exchange's counters
    /// and deduplication cache.
    Fresh(
        Vec<QueueHandle>,
        Arc<ExchangeCounters>,
        Option<Arc<ExchangeDedup>>,
        Option<bool>,
    ),
}

impl Routed {
    pub fn queues(&self) -> &[QueueHandle] {
        match self {
            Routed::Cached(r) => &r.queues,
            Routed::Fresh(v, _, _, _) => v,
        }
    }

    /// The deduplication cache of the exchange published to, if any.
    pub fn dedup(&self) -> Option<&Arc<ExchangeDedup>> {
        match self {
            Routed::Cached(r) => r.dedup.as_ref(),
            Routed::Fresh(_, _, d, _) => d.as_ref(),
        }
    }

    /// Some(durable) if the exchange published to delays messages.
    pub fn delayed(&self) -> Option<bool> {
        match self {
            Routed::Cached(r) => r.delayed,
            Routed::Fresh(_, _, _, d) => *d,
        }
    }

    /// The counters of the exchange the message was published to.
    pub fn counters(&self) -> &Arc<ExchangeCounters> {
        match self {
            Routed::Cached(r) => &r.counters,
            Routed::Fresh(_, c, _, _) => c,
        }
    }
}

impl VHost {
    fn route_key(&self, exchange: &str, routing_key: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        exchange.hash(&mut h);
        routing_key.hash(&mut h);
        h.finish()
    }

    /// [`VHost::route`] through a one-entry memo the caller keeps (a
    /// connection's last route): a publisher that keeps to one exchange and
    /// routing key skips the shared cache's hashing and bookkeeping. The memo
    /// is only trusted while the topology generation is unchanged.
    pub fn route_memo(
        &self,
        memo: &mut Option<Arc<Route>>,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        header: &ContentHeader,
    ) -> AmqpResult<Routed> {
        if let Some(r) = memo.as_ref() {
            if r.generation == self.generation.load(Ordering::Acquire)
                && &r.exchange == exchange
                && &r.routing_key == routing_key
            {
                self.route_stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Routed::Cached(r.clone()));
            }
        }
        let routed = self.route(exchange, routing_key, header)?;
        if let Routed::Cached(r) = &routed {
            *memo = Some(r.clone());
        }
        Ok(routed)
    }

    /// The queues a message published to `exchange` goes to.
    pub fn route(
        &self,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        header: &ContentHeader,
    ) -> AmqpResult<Routed> {
        let key = self.route_key(exchange.as_str(), routing_key.as_str());
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(r) = self.routes.get(&key) {
            if r.generation == generation
                && &r.exchange == exchange
                && &r.routing_key == routing_key
            {
                self.route_stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Routed::Cached(r));
            }
        }
        self.route_stats.misses.fetch_add(1, Ordering::Relaxed);
        let t = self.read();
        let ex = exchange.as_str();
        let e = t
            .exchanges
            .get(ex)
            .ok_or_else(|| not_found("exchange", ex, &self.name))?;
        if e.internal {
            return Err(access_refused(format!(
                "cannot publish to internal exchange '{ex}' in vhost '{}'",
                self.name
            )));
        }
        let counters = e.counters.clone();
        let dedup = e.dedup.clone();
        let delayed = e.delays().then_some(e.durable);
        let mut queues = Vec::new();
        let mut cacheable = true;
        if ex.is_empty() {
            if let Some(q) = t.queues.get(routing_key.as_str()) {
                queues.push(q.clone());
            }
        } else {
            let headers = if header.has_headers() {
                header.headers()
            } else {
                None
            };
            let m = Msg {
                routing_key: routing_key.as_str(),
                headers: headers.as_ref(),
                header: Some(header),
            };
            let mut names: Vec<Arc<str>> = Vec::new();
            let mut visited: Vec<&str> = Vec::new();
            resolve(&t, e, &m, &mut names, &mut visited, &mut cacheable);
            names.sort();
            names.dedup();
            queues.extend(names.iter().filter_map(|n| t.queues.get(&**n).cloned()));
        }
        drop(t);
        if !cacheable {
            return Ok(Routed::Fresh(queues, counters, dedup, delayed));
        }
        let r = Arc::new(Route {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            generation,
            queues,
            counters,
            dedup,
            delayed,
        });
        self.routes.insert(key, r.clone());
        Ok(Routed::Cached(r))
    }
}

/// Follow an exchange's bindings (and exchange-to-exchange bindings, and the
/// alternate exchange when nothing matched) down to queue names.
fn resolve<'t>(
    t: &'t Topology,
    e: &'t Exchange,
    m: &Msg<'_>,
    out: &mut Vec<Arc<str>>,
    visited: &mut Vec<&'t str>,
    cacheable: &mut bool,
) -> bool {
    if visited.contains(&&*e.name) {
        return false;
    }
    visited.push(&e.name);
    if e.per_message() {
        *cacheable = false;
    }
    let mut dests = Vec::new();
    e.route(m, &mut dests);
    let mut routed = false;
    for d in dests {
        match d {
            Dest::Queue(n) => {
                if t.queues.contains_key(&*n) {
                    routed = true;
                    out.push(n);
                }
            }
            Dest::Exchange(n) => {
                if let Some(x) = t.exchanges.get(&*n) {
                    routed |= resolve(t, x, m, out, visited, cacheable);
                }
            }
        }
    }
    if !routed {
        if let Some(ae) = e.alternate.as_deref().and_then(|a| t.exchanges.get(a)) {
            routed = resolve(t, ae, m, out, visited, cacheable);
        }
    }
    routed
}

impl crate::queue::DeadLetterRouter for VHost {
    fn route_dead_letter(&self, msg: &crate::message::Message) -> AmqpResult<Vec<QueueHandle>> {
        self.route(&msg.exchange, &msg.routing_key, &msg.header)
            .map(|r| r.queues().to_vec())
    }
}
