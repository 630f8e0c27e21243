//! Throughput/latency runs: producers and consumers on their own connections,
//! a once-a-second reporter and the final summary.

use crate::client::{Conn, Res, Target};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use warren_protocol::client::{self as wire, Args, Frame};

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    /// More brokers (cluster nodes): producer and consumer i connect to
    /// the (i mod n)-th of `target` and these.
    pub others: Vec<Target>,
    pub producers: usize,
    pub consumers: usize,
    pub queues: usize,
    pub size: usize,
    pub persistent: bool,
    /// Durable queues (and exchange).
    pub durable: bool,
    /// Queue arguments and consumer arguments (KEY, VALUE: an integer
    /// VALUE goes as a long, anything else as a string).
    pub queue_args: Vec<(String, String)>,
    pub consumer_args: Vec<(String, String)>,
    /// Outstanding confirms per producer; 0 = no confirms.
    pub confirm: u32,
    pub prefetch: u16,
    pub ack_every: u32,
    pub multiple: bool,
    pub no_ack: bool,
    /// Total publish rate limit, msg/s; 0 = unlimited.
    pub rate: u64,
    pub fanout: bool,
    pub seconds: u64,
    pub warmup: u64,
    pub keep: bool,
    /// Print the per-second lines.
    pub progress: bool,
}

pub const FANOUT: &str = "perf-fanout";

pub fn queue_name(i: usize) -> String {
    format!("perf-q{i}")
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on a process-wide monotonic clock (the body timestamp).
#[inline]
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

#[derive(Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub consumed: AtomicU64,
    /// When a confirm last arrived (any producer; `now_ns`), and the
    /// longest time between two (a failover shows as one long gap).
    pub last_confirm_ns: AtomicU64,
    pub confirm_gap_ns: AtomicU64,
}

struct Shared {
    cfg: Config,
    c: Counters,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
    /// One interval histogram per consumer, drained by the reporter.
    lat: Vec<Mutex<Histogram<u64>>>,
    /// Publish-to-confirm times, one interval histogram per producer.
    clat: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    fn fail(&self, who: &str, e: impl std::fmt::Display) {
        let mut f = self.failed.lock().unwrap();
        if f.is_none() {
            *f = Some(format!("{who}: {e}"));
        }
        self.stop.store(true, Relaxed);
    }
}

/// The end-of-run numbers (measured period only, warm-up excluded).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seconds: f64,
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub consumed: u64,
    /// Consume rate of each measured second, msg/s (stability under
    /// back-pressure: compare the minimum with the average).
    pub consume_per_second: Vec<u64>,
    /// Latency percentiles in µs: p50, p75, p95, p99, p99.9, max; `None` without samples.
    pub latency_us: Option<[u64; 6]>,
    /// The same for publish to confirm (with --confirm).
    pub confirm_latency_us: Option<[u64; 6]>,
    /// The longest time without any confirm between the first and the
    /// last of the run, warm-up included (ms; with --confirm): a leader's
    /// failover, measured from the last confirm before to the first after.
    pub confirm_gap_max_ms: Option<u64>,
    pub error: Option<String>,
}

impl Summary {
    fn rate(&self, n: u64) -> f64 {
        if self.seconds > 0.0 {
            n as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "summary: {:.1}s measured\n  published {} ({:.0} msg/s)\n  confirmed {} ({:.0} msg/s), nacked {}\n  consumed  {} ({:.0} msg/s)\n",
            self.seconds,
            self.published,
            self.rate(self.published),
            self.confirmed,
            self.rate(self.confirmed),
            self.nacked,
            self.consumed,
            self.rate(self.consumed),
        );
        if let Some(m) = self.consume_per_second.iter().min() {
            s += &format!("  consumed per second: min {m} msg/s\n");
        }
        match self.latency_us {
            Some(l) => {
                s += &format!(
                    "  latency µs: p50 {} p75 {} p95 {} p99 {} p99.9 {} max {}\n",
                    l[0], l[1], l[2], l[3], l[4], l[5]
                )
            }
            None => s += "  latency: no samples\n",
        }
        if let Some(l) = self.confirm_latency_us {
            s += &format!(
                "  confirm latency µs: p50 {} p75 {} p95 {} p99 {} p99.9 {} max {}\n",
                l[0], l[1], l[2], l[3], l[4], l[5]
            );
        }
        if let Some(g) = self.confirm_gap_max_ms {
            s += &format!("  longest time without a confirm: {g} ms\n");
        }
        if let Some(e) = &self.error {
            s += &format!("  error: {e}\n");
        }
        s
    }

    pub fn json(&self, cfg: &Config) -> String {
        let pct = |p: Option<[u64; 6]>| match p {
            Some(l) => format!(
                "{{\"p50\":{},\"p75\":{},\"p95\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
                l[0], l[1], l[2], l[3], l[4], l[5]
            ),
            None => "null".into(),
        };
        let lat = pct(self.latency_us);
        let clat = pct(self.confirm_latency_us);
        let per_sec = self
            .consume_per_second
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let per_sec_min = match self.consume_per_second.iter().min() {
            Some(m) => m.to_string(),
            None => "null".into(),
        };
        let err = match &self.error {
            Some(e) => format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\"")),
            None => "null".into(),
        };
        format!(
            "{{\"seconds\":{:.3},\"producers\":{},\"consumers\":{},\"queues\":{},\"size\":{},\"persistent\":{},\"confirm\":{},\"published\":{},\"confirmed\":{},\"nacked\":{},\"consumed\":{},\"publish_rate\":{:.0},\"confirm_rate\":{:.0},\"consume_rate\":{:.0},\"consume_per_second\":[{}],\"consume_per_second_min\":{},\"latency_us\":{},\"confirm_latency_us\":{},\"confirm_gap_max_ms\":{},\"error\":{}}}",
            self.seconds,
            cfg.producers,
            cfg.consumers,
            cfg.queues,
            cfg.size,
            cfg.persistent,
            cfg.confirm,
            self.published,
            self.confirmed,
            self.nacked,
            self.consumed,
            self.rate(self.published),
            self.rate(self.confirmed),
            self.rate(self.consumed),
            per_sec,
            per_sec_min,
            lat,
            clat,
            self.confirm_gap_max_ms
                .map_or_else(|| "null".to_string(), |g| g.to_string()),
            err
        )
    }
}

fn percentiles(h: &Histogram<u64>) -> Option<[u64; 6]> {
    if h.is_empty() {
        return None;
    }
    Some([
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.75),
        h.value_at_quantile(0.95),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ])
}

/// An encoded field table (length prefix included): integers as longs
/// (`l`), anything else as long strings.
fn arguments(args: &[(String, String)]) -> Vec<u8> {
    let mut t = Vec::new();
    for (k, v) in args {
        t.push(k.len() as u8);
        t.extend_from_slice(k.as_bytes());
        match v.parse::<i64>() {
            Ok(n) => {
                t.push(b'l');
                t.extend_from_slice(&n.to_be_bytes());
            }
            Err(_) => {
                t.push(b'S');
                t.extend_from_slice(&(v.len() as u32).to_be_bytes());
                t.extend_from_slice(v.as_bytes());
            }
        }
    }
    let mut out = (t.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&t);
    out
}

/// Declare queues (and the fanout exchange with its bindings).
async fn setup(cfg: &Config) -> Res<()> {
    let mut c = Conn::connect(&cfg.target).await?;
    c.channel(1).await?;
    for i in 0..cfg.queues {
        let flags = if cfg.durable { wire::DURABLE } else { 0 };
        wire::queue_declare_with(
            &mut c.wbuf,
            1,
            &queue_name(i),
            flags,
            &arguments(&cfg.queue_args),
        );
        c.expect(1, wire::QUEUE_DECLARE_OK).await?;
    }
    if cfg.fanout {
        wire::exchange_declare(&mut c.wbuf, 1, FANOUT, "fanout", cfg.durable);
        c.expect(1, wire::EXCHANGE_DECLARE_OK).await?;
        for i in 0..cfg.queues {
            wire::queue_bind(&mut c.wbuf, 1, &queue_name(i), FANOUT, "");
            c.expect(1, wire::QUEUE_BIND_OK).await?;
        }
    }
    c.close().await;
    Ok(())
}

async fn cleanup(cfg: &Config) -> Res<()> {
    let mut c = Conn::connect(&cfg.target).await?;
    c.channel(1).await?;
    for i in 0..cfg.queues {
        wire::queue_delete(&mut c.wbuf, 1, &queue_name(i));
        c.expect(1, wire::QUEUE_DELETE_OK).await?;
    }
    if cfg.fanout {
        wire::exchange_delete(&mut c.wbuf, 1, FANOUT);
        c.expect(1, wire::EXCHANGE_DELETE_OK).await?;
    }
    c.close().await;
    Ok(())
}

/// Publisher-confirm bookkeeping: how many distinct tags are settled, whether
/// acked one by one (in any order) or with `multiple`.
#[derive(Default)]
pub struct Confirms {
    upto: u64,
    above: BTreeSet<u64>,
}

impl Confirms {
    /// Settle `tag` (and everything below when `multiple`); returns how many
    /// tags this newly settled.
    pub fn settle(&mut self, tag: u64, multiple: bool) -> u64 {
        if tag <= self.upto {
            return 0;
        }
        if multiple {
            let singles = self.above.range(..=tag).count() as u64;
            let n = tag - self.upto - singles;
            self.above = self.above.split_off(&(tag + 1));
            self.upto = tag;
            self.advance();
            n
        } else if self.above.insert(tag) {
            self.advance();
            1
        } else {
            0
        }
    }

    fn advance(&mut self) {
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }
}

impl Config {
    /// The broker producer or consumer `i` connects to.
    pub fn target_of(&self, i: usize) -> &Target {
        match i % (self.others.len() + 1) {
            0 => &self.target,
            k => &self.others[k - 1],
        }
    }
}

async fn producer(sh: Arc<Shared>, i: usize) -> Res<()> {
    let cfg = &sh.cfg;
    let mut c = Conn::connect(cfg.target_of(i)).await?;
    c.channel(1).await?;
    let confirm = cfg.confirm > 0;
    if confirm {
        wire::confirm_select(&mut c.wbuf, 1);
        c.expect(1, wire::CONFIRM_SELECT_OK).await?;
    }
    let frame_max = c.frame_max;
    let Conn {
        stream, mut rbuf, ..
    } = c;
    let (mut rd, mut wr) = stream.into_split();

    // Reader: confirms, and anything fatal from the broker.
    let settled = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    // Each write of publishes: the last tag in it and when it was sent, for
    // the publish-to-confirm latency (taken once every tag up to it is
    // confirmed).
    let sent: Arc<Mutex<std::collections::VecDeque<(u64, u64)>>> = Default::default();
    let reader = {
        let (sh, settled, wake, sent) = (sh.clone(), settled.clone(), wake.clone(), sent.clone());
        tokio::spawn(async move {
            let mut conf = Confirms::default();
            let mut timed_upto = 0u64;
            let res: Res<()> = async {
                loop {
                    let mut acked = 0;
                    let mut nacked = 0;
                    while let Some((f, n)) = wire::parse(&rbuf, u32::MAX)? {
                        if let Frame::Method { id, args, .. } = f {
                            match id {
                                wire::BASIC_ACK | wire::BASIC_NACK => {
                                    let mut a = Args(args);
                                    let tag = a.u64().ok_or("bad ack")?;
                                    let multiple = a.u8().ok_or("bad ack")? & 1 == 1;
                                    let k = conf.settle(tag, multiple);
                                    if id == wire::BASIC_ACK {
                                        acked += k;
                                    } else {
                                        nacked += k;
                                    }
                                }
                                // Sent after every frame before our close was
                                // handled: nothing of ours is still in flight.
                                wire::CONNECTION_CLOSE_OK => return Ok(()),
                                wire::CONNECTION_CLOSE | wire::CHANNEL_CLOSE => {
                                    return Err(format!(
                                        "closed by broker: {}",
                                        wire::close_reason(args)
                                    )
                                    .into())
                                }
                                _ => {}
                            }
                        }
                        rbuf.advance(n);
                    }
                    if conf.upto > timed_upto {
                        let now = now_ns();
                        let mut h = sh.clat[i].lock().unwrap();
                        let mut sent = sent.lock().unwrap();
                        while let Some(&(last, stamp)) = sent.front() {
                            if last > conf.upto {
                                break;
                            }
                            sent.pop_front();
                            let us = (now.saturating_sub(stamp) / 1000).max(1);
                            h.saturating_record_n(us, last - timed_upto);
                            timed_upto = last;
                        }
                    }
                    if acked > 0 {
                        let now = now_ns();
                        let before = sh.c.last_confirm_ns.swap(now, Relaxed);
                        if before > 0 {
                            sh.c.confirm_gap_ns
                                .fetch_max(now.saturating_sub(before), Relaxed);
                        }
                    }
                    if acked + nacked > 0 {
                        sh.c.confirmed.fetch_add(acked, Relaxed);
                        sh.c.nacked.fetch_add(nacked, Relaxed);
                        settled.fetch_add(acked + nacked, Relaxed);
                        wake.notify_one();
                    }
                    rbuf.reserve(1 << 16);
                    if rd.read_buf(&mut rbuf).await? == 0 {
                        return Err("connection closed by broker".into());
                    }
                }
            }
            .await;
            if let Err(e) = res {
                if !sh.stop.load(Relaxed) {
                    sh.fail(&format!("producer {i}"), e);
                }
            }
            wake.notify_one();
        })
    };

    let (exchange, key) = if cfg.fanout {
        (FANOUT.to_string(), String::new())
    } else {
        (String::new(), queue_name(i % cfg.queues))
    };
    let prefix = wire::publish_prefix(1, &exchange, &key, cfg.size, cfg.persistent);
    let body = vec![0u8; cfg.size];
    let per_msg = prefix.len() + cfg.size + 8 * (1 + cfg.size / frame_max as usize);
    let batch = (65536 / per_msg).clamp(1, 512) as u64;
    let rate = cfg.rate as f64 / cfg.producers as f64;
    let window = cfg.confirm as u64;
    let mut out = BytesMut::with_capacity(per_msg * batch as usize + 1024);
    let mut seq: u64 = 0;
    let started = Instant::now();
    let res: Res<()> = async {
        while !sh.stop.load(Relaxed) {
            let mut n = batch;
            if confirm {
                let pending = seq - settled.load(Relaxed);
                if pending >= window {
                    let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
                    continue;
                }
                n = n.min(window - pending);
            }
            if rate > 0.0 {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                if due <= seq {
                    let next = Duration::from_secs_f64((seq + 1) as f64 / rate);
                    tokio::time::sleep_until((started + next).into()).await;
                    continue;
                }
                n = n.min(due - seq);
            }
            let stamp = now_ns();
            for _ in 0..n {
                wire::put_message(&mut out, &prefix, 1, &body, frame_max, stamp);
            }
            if confirm {
                sent.lock().unwrap().push_back((seq + n, stamp));
            }
            wr.write_all(&out).await?;
            out.clear();
            seq += n;
            sh.c.published.fetch_add(n, Relaxed);
        }
        Ok(())
    }
    .await;
    if let Err(e) = res {
        sh.fail(&format!("producer {i}"), e);
    }
    // Close and wait for close-ok: a broker applying flow control may still
    // hold our publishes in its socket buffer, and they must not leak into the
    // queues of a run started right after this one.
    let mut bye = BytesMut::new();
    wire::connection_close(&mut bye);
    let _ = wr.write_all(&bye).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    Ok(())
}

async fn consumer(sh: Arc<Shared>, i: usize) -> Res<()> {
    let cfg = &sh.cfg;
    let mut c = Conn::connect(cfg.target_of(i)).await?;
    c.channel(1).await?;
    if cfg.prefetch > 0 && !cfg.no_ack {
        wire::qos(&mut c.wbuf, 1, cfg.prefetch);
        c.expect(1, wire::BASIC_QOS_OK).await?;
    }
    let q = queue_name(i % cfg.queues);
    wire::consume_with(
        &mut c.wbuf,
        1,
        &q,
        &format!("perf-c{i}"),
        cfg.no_ack,
        &arguments(&cfg.consumer_args),
    );
    c.expect(1, wire::BASIC_CONSUME_OK).await?;
    let mut ack_every = cfg.ack_every.max(1) as u64;
    if cfg.prefetch > 0 {
        ack_every = ack_every.min(cfg.prefetch as u64);
    }
    let Conn {
        mut stream,
        mut rbuf,
        mut wbuf,
        ..
    } = c;
    let mut last_tag = 0u64;
    let mut unacked: Vec<u64> = Vec::new();
    let mut since_ack = 0u64;
    let mut remaining = 0u64;
    let mut first_body = false;
    let mut lats: Vec<u64> = Vec::with_capacity(1024);
    let stamp_ok = cfg.size >= 8;
    loop {
        let mut done = 0u64;
        while let Some((f, n)) = wire::parse(&rbuf, u32::MAX)? {
            let mut complete = false;
            match f {
                Frame::Method { id, args, .. } => match id {
                    wire::BASIC_DELIVER => {
                        let mut a = Args(args);
                        a.short();
                        last_tag = a.u64().ok_or("bad deliver")?;
                    }
                    wire::CONNECTION_CLOSE | wire::CHANNEL_CLOSE => {
                        return Err(format!("closed by broker: {}", wire::close_reason(args)).into())
                    }
                    wire::BASIC_CANCEL => return Err("consumer cancelled by broker".into()),
                    _ => {}
                },
                Frame::Header { body_size, .. } => {
                    remaining = body_size;
                    first_body = true;
                    complete = body_size == 0;
                }
                Frame::Body { data, .. } => {
                    if first_body && stamp_ok && data.len() >= 8 {
                        let sent = u64::from_be_bytes(data[..8].try_into().unwrap());
                        lats.push(now_ns().saturating_sub(sent) / 1000);
                    }
                    first_body = false;
                    remaining = remaining.saturating_sub(data.len() as u64);
                    complete = remaining == 0;
                }
                Frame::Heartbeat => {}
            }
            rbuf.advance(n);
            if complete {
                done += 1;
                if !cfg.no_ack {
                    since_ack += 1;
                    if !cfg.multiple {
                        unacked.push(last_tag);
                    }
                    if since_ack >= ack_every {
                        if cfg.multiple {
                            wire::put_ack(&mut wbuf, 1, last_tag, true);
                        } else {
                            for t in unacked.drain(..) {
                                wire::put_ack(&mut wbuf, 1, t, false);
                            }
                        }
                        since_ack = 0;
                    }
                }
            }
        }
        if done > 0 {
            sh.c.consumed.fetch_add(done, Relaxed);
        }
        if !lats.is_empty() {
            let mut h = sh.lat[i].lock().unwrap();
            for l in lats.drain(..) {
                h.saturating_record(l.max(1));
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        rbuf.reserve(1 << 16);
        if stream.read_buf(&mut rbuf).await? == 0 {
            return Err("connection closed by broker".into());
        }
    }
}

/// Run the test: set up, start consumers then producers, report every second,
/// stop after warm-up + seconds, clean up. Returns the summary.
pub async fn run(cfg: Config) -> Res<Summary> {
    now_ns();
    setup(&cfg).await?;
    let sh = Arc::new(Shared {
        lat: (0..cfg.consumers)
            .map(|_| Mutex::new(histogram()))
            .collect(),
        clat: (0..cfg.producers)
            .map(|_| Mutex::new(histogram()))
            .collect(),
        cfg: cfg.clone(),
        c: Counters::default(),
        stop: AtomicBool::new(false),
        failed: Mutex::new(None),
    });
    let mut consumers = Vec::new();
    for i in 0..cfg.consumers {
        let sh2 = sh.clone();
        consumers.push(tokio::spawn(async move {
            if let Err(e) = consumer(sh2.clone(), i).await {
                if !sh2.stop.load(Relaxed) {
                    sh2.fail(&format!("consumer {i}"), e);
                }
            }
        }));
    }
    // Let the consumers subscribe before publishing starts.
    if cfg.consumers > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut producers = Vec::new();
    for i in 0..cfg.producers {
        let sh2 = sh.clone();
        producers.push(tokio::spawn(async move {
            if let Err(e) = producer(sh2.clone(), i).await {
                sh2.fail(&format!("producer {i}"), e);
            }
        }));
    }

    let snap = |c: &Counters| {
        [
            c.published.load(Relaxed),
            c.confirmed.load(Relaxed),
            c.nacked.load(Relaxed),
            c.consumed.load(Relaxed),
        ]
    };
    let start = Instant::now();
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut total = histogram();
    let mut sec = histogram();
    let mut ctotal = histogram();
    let mut prev = snap(&sh.c);
    let mut base = prev;
    let mut base_at = start;
    let mut last_at = start;
    let end = cfg.warmup + cfg.seconds;
    let mut measured = if cfg.warmup == 0 { 0.0 } else { -1.0 };
    let mut consume_per_second = Vec::with_capacity(cfg.seconds as usize);
    for s in 1..=end {
        tick.tick().await;
        let now = Instant::now();
        let cur = snap(&sh.c);
        sec.reset();
        for h in &sh.lat {
            let mut h = h.lock().unwrap();
            let _ = sec.add(&*h);
            h.reset();
        }
        let dt = now.duration_since(last_at).as_secs_f64();
        let warm = s <= cfg.warmup;
        for h in &sh.clat {
            let mut h = h.lock().unwrap();
            if !warm {
                let _ = ctotal.add(&*h);
            }
            h.reset();
        }
        if !warm {
            let _ = total.add(&sec);
            consume_per_second.push(((cur[3] - prev[3]) as f64 / dt).round() as u64);
        }
        if cfg.progress {
            let r = |k: usize| (cur[k] - prev[k]) as f64 / dt;
            let lat = if sec.is_empty() {
                String::from("-")
            } else {
                format!(
                    "p50 {} µs, p99 {} µs",
                    sec.value_at_quantile(0.5),
                    sec.value_at_quantile(0.99)
                )
            };
            eprintln!(
                "{s:>4}s{} published {:>9.0} msg/s, confirmed {:>9.0} msg/s, consumed {:>9.0} msg/s, latency {lat}",
                if warm { " (warm-up)" } else { "" },
                r(0),
                r(1),
                r(3)
            );
        }
        if s == cfg.warmup {
            base = cur;
            base_at = now;
            measured = 0.0;
        }
        prev = cur;
        last_at = now;
        if sh.stop.load(Relaxed) {
            break;
        }
    }
    let fin = snap(&sh.c);
    if measured >= 0.0 {
        measured = last_at.duration_since(base_at).as_secs_f64();
    }
    sh.stop.store(true, Relaxed);
    for p in producers {
        let _ = tokio::time::timeout(Duration::from_secs(12), p).await;
    }
    for c in &consumers {
        c.abort();
    }
    for c in consumers {
        let _ = c.await;
    }
    let error = sh.failed.lock().unwrap().clone();
    if !cfg.keep {
        if let Err(e) = cleanup(&cfg).await {
            eprintln!("cleanup failed: {e}");
        }
    }
    Ok(Summary {
        seconds: measured.max(0.0),
        published: fin[0] - base[0],
        confirmed: fin[1] - base[1],
        nacked: fin[2] - base[2],
        consumed: fin[3] - base[3],
        consume_per_second,
        latency_us: percentiles(&total),
        confirm_latency_us: percentiles(&ctotal),
        confirm_gap_max_ms: (cfg.confirm > 0 && sh.c.last_confirm_ns.load(Relaxed) > 0)
            .then(|| sh.c.confirm_gap_ns.load(Relaxed) / 1_000_000),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_count_each_tag_once() {
        let mut c = Confirms::default();
        assert_eq!(c.settle(3, true), 3);
        assert_eq!(c.settle(5, false), 1);
        assert_eq!(c.settle(5, false), 0);
        assert_eq!(c.settle(4, false), 1); // 4 then 5 close the gap
        assert_eq!(c.upto, 5);
        assert_eq!(c.settle(8, false), 1);
        assert_eq!(c.settle(10, true), 4); // 6, 7, 9, 10
        assert_eq!(c.settle(2, true), 0);
        assert!(c.above.is_empty());
    }

    #[test]
    fn json_is_one_line() {
        let s = Summary {
            seconds: 1.0,
            published: 10,
            consume_per_second: vec![9, 7, 8],
            latency_us: Some([1, 2, 3, 4, 5, 6]),
            confirm_latency_us: None,
            error: Some("a \"b\"".into()),
            ..Default::default()
        };
        let cfg = Config {
            target: Target::parse("amqp://h").unwrap(),
            others: Vec::new(),
            producers: 1,
            consumers: 1,
            queues: 1,
            size: 16,
            persistent: false,
            durable: false,
            queue_args: Vec::new(),
            consumer_args: Vec::new(),
            confirm: 0,
            prefetch: 0,
            ack_every: 1,
            multiple: false,
            no_ack: false,
            rate: 0,
            fanout: false,
            seconds: 1,
            warmup: 0,
            keep: false,
            progress: false,
        };
        let j = s.json(&cfg);
        assert!(!j.contains('\n'));
        assert!(j.contains("\"publish_rate\":10,"), "{j}");
        assert!(j.contains("\"p999\":5"), "{j}");
        assert!(
            j.contains("\"consume_per_second\":[9,7,8],\"consume_per_second_min\":7,"),
            "{j}"
        );
        let none = Summary::default().json(&cfg);
        assert!(
            none.contains("\"consume_per_second\":[],\"consume_per_second_min\":null,"),
            "{none}"
        );
        assert!(j.contains("\"error\":\"a \\\"b\\\"\""), "{j}");
    }

    #[test]
    fn arguments_encode_integers_as_longs_and_the_rest_as_strings() {
        let t = arguments(&[
            ("x-queue-type".into(), "stream".into()),
            ("x-max-length-bytes".into(), "1000".into()),
        ]);
        let mut want = Vec::new();
        want.extend_from_slice(&[12]);
        want.extend_from_slice(b"x-queue-type");
        want.push(b'S');
        want.extend_from_slice(&6u32.to_be_bytes());
        want.extend_from_slice(b"stream");
        want.push(18);
        want.extend_from_slice(b"x-max-length-bytes");
        want.push(b'l');
        want.extend_from_slice(&1000i64.to_be_bytes());
        assert_eq!(&t[..4], &(want.len() as u32).to_be_bytes());
        assert_eq!(&t[4..], &want[..]);
        assert_eq!(arguments(&[]), 0u32.to_be_bytes().to_vec());
    }
}
