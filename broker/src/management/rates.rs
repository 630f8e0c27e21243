//! Message rates for the API's `message_stats` and `churn_rates`: the
//! broker's counters sampled every few seconds; a rate is the change over
//! the last interval, per second.

use crate::broker::Broker;
use crate::queue::{QueueCmd, QueueStats};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the counters are sampled (RabbitMQ's default statistics
/// interval).
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The counters the API reports, by RabbitMQ's name.
fn read(b: &Broker) -> Vec<(&'static str, u64)> {
    let g = &b.metrics;
    let c = &b.churn;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    let consume = l(&g.delivered_consume_manual_ack) + l(&g.delivered_consume_auto_ack);
    let get = l(&g.delivered_get_manual_ack) + l(&g.delivered_get_auto_ack);
    vec![
        ("publish", l(&g.received)),
        ("confirm", l(&g.confirmed)),
        ("deliver_get", consume + get),
        ("deliver", l(&g.delivered_consume_manual_ack)),
        ("deliver_no_ack", l(&g.delivered_consume_auto_ack)),
        ("get", l(&g.delivered_get_manual_ack)),
        ("get_no_ack", l(&g.delivered_get_auto_ack)),
        ("get_empty", l(&g.get_empty)),
        ("ack", l(&g.acknowledged)),
        ("redeliver", l(&g.redelivered)),
        ("return_unroutable", l(&g.unroutable_returned)),
        ("drop_unroutable", l(&g.unroutable_dropped)),
        ("connection_created", l(&c.connections_opened)),
        ("connection_closed", l(&c.connections_closed)),
        ("channel_created", l(&g.channels_opened)),
        ("channel_closed", l(&g.channels_closed)),
        ("queue_declared", l(&c.queues_declared)),
        ("queue_created", l(&c.queues_created)),
        ("queue_deleted", l(&c.queues_deleted)),
    ]
}

const CHURN: [&str; 7] = [
    "connection_created",
    "connection_closed",
    "channel_created",
    "channel_closed",
    "queue_declared",
    "queue_created",
    "queue_deleted",
];

struct Sample {
    at: Instant,
    values: Vec<(&'static str, u64)>,
}

/// The last two samples.
#[derive(Default)]
pub struct Rates {
    last: Mutex<(Option<Sample>, Option<Sample>)>,
    /// Per queue (by id): its last totals, when they were read, and the
    /// rates over the interval before.
    queues: Mutex<HashMap<u64, QueueSample>>,
    /// Per vhost (by name), the same for its connections' counters.
    vhosts: Mutex<HashMap<String, Sample2<6>>>,
    /// Per exchange (by vhost and name): publish_in and publish_out.
    exchanges: Mutex<HashMap<(String, String), Sample2<2>>>,
}

const EXCHANGE_STATS: [&str; 2] = ["publish_in", "publish_out"];

fn exchange_values(c: &crate::metrics::ExchangeCounters) -> [u64; 2] {
    [c.publish_in.load(Relaxed), c.publish_out.load(Relaxed)]
}

/// A vhost's counters, as its `message_stats` names them.
const VHOST_STATS: [&str; 6] = [
    "publish",
    "deliver_get",
    "ack",
    "confirm",
    "redeliver",
    "return_unroutable",
];

fn vhost_values(g: &crate::metrics::Global) -> [u64; 6] {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    [
        l(&g.received),
        l(&g.delivered_consume_auto_ack)
            + l(&g.delivered_consume_manual_ack)
            + l(&g.delivered_get_auto_ack)
            + l(&g.delivered_get_manual_ack),
        l(&g.acknowledged),
        l(&g.confirmed),
        l(&g.redelivered),
        l(&g.unroutable_returned),
    ]
}

/// `message_stats` from totals and rates.
fn stats_json<const N: usize>(names: &[&str; N], values: [u64; N], rates: [f64; N]) -> Value {
    let mut m = Map::new();
    for (i, name) in names.iter().enumerate() {
        m.insert((*name).to_owned(), json!(values[i]));
        m.insert(format!("{name}_details"), json!({"rate": rates[i]}));
    }
    Value::Object(m)
}

/// The rates between a previous reading and `values` now.
fn rates_since<const N: usize>(
    prev: Option<&Sample2<N>>,
    values: [u64; N],
    now: Instant,
) -> [f64; N] {
    let Some(prev) = prev else { return [0.0; N] };
    let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
    let mut r = [0.0; N];
    for i in 0..N {
        r[i] = values[i].saturating_sub(prev.values[i]) as f64 / secs;
    }
    r
}

/// The queue counters the API reports, by RabbitMQ's name.
const QUEUE_STATS: [&str; 4] = ["publish", "deliver_get", "ack", "redeliver"];

fn queue_values(s: &QueueStats) -> [u64; 4] {
    [s.published, s.delivered, s.acked, s.redelivered]
}

struct Sample2<const N: usize> {
    at: Instant,
    values: [u64; N],
    rates: [f64; N],
}

type QueueSample = Sample2<4>;

impl Rates {
    /// Sample every [`INTERVAL`] while the broker lives.
    pub fn start(broker: &Arc<Broker>) -> Arc<Rates> {
        let rates = Arc::new(Rates::default());
        let (weak_b, weak_r) = (Arc::downgrade(broker), Arc::downgrade(&rates));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tick.tick().await;
                let (Some(b), Some(r)) = (weak_b.upgrade(), weak_r.upgrade()) else {
                    return;
                };
                r.sample(&b);
                r.sample_queues(&b).await;
            }
        });
        rates
    }

    fn sample(&self, b: &Broker) {
        let s = Sample {
            at: Instant::now(),
            values: read(b),
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.0 = last.1.take();
        last.1 = Some(s);
    }

    /// Read every queue's totals; a queue's rates are the change since its
    /// last reading. Queues that went away are forgotten.
    async fn sample_queues(&self, b: &Broker) {
        let mut seen = Vec::new();
        {
            let now = Instant::now();
            let mut map = self.vhosts.lock().unwrap_or_else(|e| e.into_inner());
            let mut live = Vec::new();
            for v in b.vhosts() {
                let values = vhost_values(&v.metrics);
                let rates = rates_since(map.get(&v.name), values, now);
                map.insert(
                    v.name.clone(),
                    Sample2 {
                        at: now,
                        values,
                        rates,
                    },
                );
                live.push(v.name.clone());
            }
            map.retain(|n, _| live.contains(n));
        }
        {
            let now = Instant::now();
            let mut map = self.exchanges.lock().unwrap_or_else(|e| e.into_inner());
            let mut live = Vec::new();
            for v in b.vhosts() {
                for x in v.exchanges() {
                    let key = (v.name.clone(), x.name.clone());
                    let values = exchange_values(&x.counters);
                    let rates = rates_since(map.get(&key), values, now);
                    map.insert(
                        key.clone(),
                        Sample2 {
                            at: now,
                            values,
                            rates,
                        },
                    );
                    live.push(key);
                }
            }
            map.retain(|k, _| live.contains(k));
        }
        for v in b.vhosts() {
            for q in v.queues() {
                let Some(s) = q.ask(|reply| QueueCmd::Info { reply }).await else {
                    continue;
                };
                seen.push(q.id());
                let now = Instant::now();
                let values = queue_values(&s);
                let mut map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let rates = rates_since(map.get(&q.id()), values, now);
                map.insert(
                    q.id(),
                    QueueSample {
                        at: now,
                        values,
                        rates,
                    },
                );
            }
        }
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| seen.contains(id));
    }

    /// A queue's `message_stats`: its totals now (`s`) and its rates over
    /// the last interval.
    pub fn queue(&self, id: u64, s: &QueueStats) -> Value {
        let rates = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map_or([0.0; 4], |q| q.rates);
        stats_json(&QUEUE_STATS, queue_values(s), rates)
    }

    /// An exchange's `message_stats`: publish_in and publish_out, with
    /// their rates over the last interval.
    pub fn exchange(&self, vhost: &str, x: &crate::vhost::ExchangeView) -> Value {
        let rates = self
            .exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(vhost.to_owned(), x.name.clone()))
            .map_or([0.0; 2], |s| s.rates);
        stats_json(&EXCHANGE_STATS, exchange_values(&x.counters), rates)
    }

    /// A vhost's `message_stats`: its connections' totals now and their
    /// rates over the last interval.
    pub fn vhost(&self, v: &crate::vhost::VHost) -> Value {
        let rates = self
            .vhosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&v.name)
            .map_or([0.0; 6], |s| s.rates);
        stats_json(&VHOST_STATS, vhost_values(&v.metrics), rates)
    }

    /// `message_stats` and `churn_rates` as RabbitMQ's overview has them:
    /// each counter, and `<name>_details: {"rate": per second}`.
    pub fn overview(&self, b: &Broker) -> (Value, Value) {
        let now = read(b);
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let rate = |name: &str| -> f64 {
            let (Some(a), Some(z)) = (&last.0, &last.1) else {
                return 0.0;
            };
            let secs = z.at.duration_since(a.at).as_secs_f64();
            let get = |s: &Sample| s.values.iter().find(|(n, _)| *n == name).map_or(0, |v| v.1);
            if secs <= 0.0 {
                0.0
            } else {
                (get(z).saturating_sub(get(a))) as f64 / secs
            }
        };
        let (mut stats, mut churn) = (Map::new(), Map::new());
        for (name, v) in now {
            let m = if CHURN.contains(&name) {
                &mut churn
            } else {
                &mut stats
            };
            m.insert(name.to_owned(), json!(v));
            m.insert(format!("{name}_details"), json!({"rate": rate(name)}));
        }
        (Value::Object(stats), Value::Object(churn))
    }
}
