//! A queue of a cluster that lives on another node, as this node holds it:
//! a [`QueueHandle`] like any other, whose mailbox is read by a forwarding
//! actor instead of a queue. Publishes routed to it go to its home node in
//! batches (their confirms wait for the home node's); what operators and
//! declares ask (counts, purge, delete) is asked there. A consumer here is
//! registered there for this node's channel; the home node sends its
//! deliveries back (`deliver`, handled by [`deliver`]), in order, and acks,
//! rejects, `basic.get`, recover and channel closes go to it. Every few
//! seconds this node tells the home node which of its channels still use
//! the queue (a lease: the home node takes back the unacked messages of a
//! channel it stops hearing of, e.g. this node died); a home node that
//! cannot be reached cancels this node's consumers of the queue (as
//! RabbitMQ's `basic.cancel` when a queue's node goes down).
//!
//! The requests are JSON, sent with the cluster's application requests
//! (`warren_cluster::ClusterNode::call_app`); the home node answers them in
//! `crate::replicate::remote`.

use super::handle::{ChannelCredit, Got, QueueCmd, QueueStats};
use super::{QueueHandle, QueueInfo};
use crate::error::AmqpError;
use crate::events::{ConfirmTicket, ConnEvent};
use crate::message::MessageRef;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use warren_protocol::reply;

/// Publishes forwarded in one request, at most.
const BATCH: usize = 512;
/// Publish batches to one queue in flight at once (the queue's node hands
/// them over in the order they were sent: see `n` in the request).
const IN_FLIGHT: u32 = 8;

/// A forwarding actor's publish batches: numbered in a stream of their
/// own, so the queue's node takes them in order however they arrive.
struct Pipeline {
    stream: u64,
    n: u64,
    slots: Arc<Semaphore>,
    /// A quorum queue's forwarder: where batches the leader's node could
    /// not be reached for go back (to be sent again, to the next leader),
    /// numbered from the base given, instead of being nacked.
    resend: Option<(Resend, u64)>,
}

/// Publishes a quorum queue's forwarder gives back to its front: never sent
/// (the node could not be reached), numbered in the order they were sent.
pub type Resend = mpsc::UnboundedSender<(u64, Publishes)>;

/// Messages on their way, with their confirms.
pub type Publishes = Vec<(MessageRef, Option<Arc<ConfirmTicket>>)>;

impl Pipeline {
    fn new() -> Pipeline {
        Pipeline {
            stream: NEXT_SUB.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u64) << 40,
            n: 0,
            slots: Arc::new(Semaphore::new(IN_FLIGHT as usize)),
            resend: None,
        }
    }

    /// Wait until every batch sent so far is answered.
    async fn drain(&self) {
        if let Ok(all) = self.slots.acquire_many(IN_FLIGHT).await {
            drop(all);
        }
    }
}

/// How often this node tells a queue's node which channels still use it.
pub const LEASE_RENEW: Duration = Duration::from_secs(3);

/// A consumer of this node registered on a queue's home node: where its
/// deliveries go.
pub struct Sub {
    pub conn: mpsc::UnboundedSender<ConnEvent>,
    /// For operators: the consumer as its queue's node does not see it.
    pub info: super::handle::ConsumerInfo,
    pub chan_key: u64,
    pub channel: u16,
    pub tag: Arc<str>,
    pub in_flight: Arc<AtomicU32>,
    pub credit: Arc<ChannelCredit>,
    pub no_ack: bool,
    /// The forwarding handle's queue id (the channel's unacked deliveries
    /// name it).
    pub queue: u64,
    /// A quorum queue front's forwarder: set when the front retires it.
    /// From then on the consumer takes nothing more through it (the front
    /// registered it again with its next target, and two registrations
    /// delivering to one channel would interleave their deliveries).
    pub retired: Option<Arc<AtomicBool>>,
}

/// Every forwarded consumer of this process, by id (ids are unique per
/// process, so brokers sharing one, as in tests, cannot mix them up).
static SUBS: LazyLock<Mutex<HashMap<u64, Arc<Sub>>>> = LazyLock::new(Default::default);
static NEXT_SUB: LazyLock<AtomicU64> =
    LazyLock::new(|| AtomicU64::new(crate::message::fresh_ids_from()));

fn subs() -> std::sync::MutexGuard<'static, HashMap<u64, Arc<Sub>>> {
    SUBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deliveries from a queue's node for consumer `sub`, handed to its
/// connection in order; returns once the connection has room for more (so
/// the home node sends no faster than the client reads). False: no such
/// consumer (cancelled meanwhile).
pub async fn deliver(sub: u64, items: Vec<(MessageRef, bool, u64)>) -> bool {
    let Some(s) = subs().get(&sub).cloned() else {
        return false;
    };
    if s.retired
        .as_ref()
        .is_some_and(|r| r.load(Ordering::Acquire))
    {
        return false;
    }
    let n = items.len() as u32;
    if !s.no_ack {
        s.credit.unacked.fetch_add(n, Ordering::AcqRel);
    }
    s.in_flight.fetch_add(n, Ordering::AcqRel);
    let ev = ConnEvent::DeliverMany {
        chan_key: s.chan_key,
        channel: s.channel,
        tag: s.tag.clone(),
        items,
        in_flight: s.in_flight.clone(),
    };
    if s.conn.send(ev).is_err() {
        return true; // the connection is closing: its channel close follows
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.in_flight.load(Ordering::Acquire) >= super::FLOW_WINDOW
        && tokio::time::Instant::now() < deadline
        && !s.conn.is_closed()
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// The queue's node ended consumer `sub`: `ok` at the client's request
/// (cancel-ok), else because the queue went away.
pub fn ended(sub: u64, ok: bool) {
    let s = subs().remove(&sub);
    // (Through a retired forwarder: the front registered the consumer
    // again elsewhere, and it goes on there.)
    if let Some(s) = s.filter(|s| {
        !s.retired
            .as_ref()
            .is_some_and(|r| r.load(Ordering::Acquire))
    }) {
        let (chan_key, tag) = (s.chan_key, s.tag.clone());
        let _ = s.conn.send(match ok {
            true => ConnEvent::CancelOk { chan_key, tag },
            false => ConnEvent::Cancelled { chan_key, tag },
        });
    }
}

/// The queue's node timed a delivery of consumer `sub` out (see
/// `ConnEvent::TimedOut`): `cancelled` it cancelled the consumer and took
/// back `returned`, else the channel is to close.
pub fn timed_out(sub: u64, cancelled: bool, timeout: u64, returned: Box<[u64]>) {
    let s = match cancelled {
        true => subs().remove(&sub),
        false => subs().get(&sub).cloned(),
    };
    if let Some(s) = s {
        let _ = s.conn.send(ConnEvent::TimedOut {
            chan_key: s.chan_key,
            tag: cancelled.then(|| s.tag.clone()),
            timeout,
            queue: s.queue,
            returned,
        });
    }
}
/// Mailbox slots of a forwarding actor (as a queue's).
const PERMITS: usize = 4096;

/// Why a request to a queue's home node failed.
#[derive(Debug)]
pub enum LinkError {
    /// The home node could not be reached (down, or cut off from this one).
    Down(String),
    /// It answered with a refusal, or the exchange broke half-way.
    Failed(String),
}

/// How this node reaches the other members (the broker's cluster node).
pub trait Link: Send + Sync + 'static {
    fn call(
        &self,
        node: &str,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, LinkError>> + Send>>;
}

/// The handle of a queue that lives on node `info.home`, reached through
/// `link`.
pub fn spawn(info: QueueInfo, link: Arc<dyn Link>) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    tokio::spawn(run(info.clone(), link, mailbox, permits.clone(), None));
    QueueHandle::new(info, permits, tx)
}

/// A forwarding handle to the node that leads a quorum queue, for the
/// queue's front (`super::quorum`), which follows the leader: it never
/// cancels its consumers when that node cannot be reached (the front
/// registers them with the next leader). Setting the flag it returns before
/// dropping the handle retires it quietly (its consumers are not told);
/// dropped without it (the queue was deleted), its consumers are cancelled.
///
/// Publishes the leader's node could not be reached for (never sent) go
/// back to the front through `resend`, to go to the next leader.
pub fn spawn_follower(
    info: Arc<QueueInfo>,
    link: Arc<dyn Link>,
    resend: Resend,
    base: u64,
) -> (QueueHandle, Arc<AtomicBool>) {
    let permits = Arc::new(Semaphore::new(PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let retired = Arc::new(AtomicBool::new(false));
    tokio::spawn(run(
        info.clone(),
        link,
        mailbox,
        permits.clone(),
        Some((retired.clone(), (resend, base))),
    ));
    (QueueHandle::new(info, permits, tx), retired)
}

/// "home node … is down or inaccessible", as RabbitMQ words it (404).
pub fn home_down(info: &QueueInfo) -> AmqpError {
    AmqpError::new(
        reply::NOT_FOUND,
        format!(
            "home node '{}' of {}queue '{}' in vhost '{}' is down or inaccessible",
            info.home.as_deref().unwrap_or("?"),
            if info.durable { "durable " } else { "" },
            info.name,
            info.vhost
        ),
    )
}

/// This node's consumers and channels that use a queue of another node.
#[derive(Default)]
struct Consumers {
    /// (channel key, consumer tag) -> forwarded consumer id.
    subs: HashMap<(u64, Arc<str>), u64>,
    /// Channels the home node keeps state for (consumers, unacked gets).
    chans: HashSet<u64>,
    /// A quorum queue front's forwarder: its retired flag.
    retired: Option<Arc<AtomicBool>>,
}

impl Consumers {
    /// Forget a channel's consumers (it closed).
    fn drop_chan(&mut self, chan: u64) {
        self.subs.retain(|(c, _), sub| {
            if *c == chan {
                subs().remove(sub);
            }
            *c != chan
        });
    }

    /// Forget every consumer here without telling them (a quorum queue's
    /// front registered them elsewhere).
    fn forget_all(&mut self) {
        let mut all = subs();
        for (_, sub) in self.subs.drain() {
            all.remove(&sub);
        }
        self.chans.clear();
    }

    /// End every consumer here (the queue's node is gone, or this handle).
    fn cancel_all(&mut self) {
        for (_, sub) in self.subs.drain() {
            ended(sub, false);
        }
        self.chans.clear();
    }

    /// Tell the home node which channels still use the queue; cancel the
    /// consumers it no longer knows (it restarted) or of all if it cannot
    /// be reached.
    async fn renew(&mut self, info: &QueueInfo, home: &str, link: &dyn Link, follower: bool) {
        if self.chans.is_empty() {
            return;
        }
        let chans: Vec<u64> = self.chans.iter().copied().collect();
        match link
            .call(home, request(info, "renew", json!({ "chans": chans })))
            .await
        {
            Ok(v) => {
                let unknown: HashSet<u64> = v
                    .get("unknown")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .collect();
                // (A quorum queue's front moves its consumers to the next
                // leader itself.)
                if unknown.is_empty() || follower {
                    return;
                }
                self.subs.retain(|(c, _), sub| {
                    if unknown.contains(c) {
                        ended(*sub, false);
                    }
                    !unknown.contains(c)
                });
                self.chans.retain(|c| !unknown.contains(c));
            }
            Err(LinkError::Down(_)) if follower => {}
            Err(LinkError::Down(why)) => {
                tracing::warn!(queue = %info.name, home, error = %why, "the queue's node is down: its consumers here are cancelled");
                self.cancel_all();
            }
            Err(LinkError::Failed(_)) => {}
        }
    }
}

/// A message as a forwarded publish carries it.
pub fn message_json(m: &crate::message::Message) -> Value {
    json!({
        "x": B64.encode(m.exchange.as_str()),
        "k": B64.encode(m.routing_key.as_str()),
        "h": B64.encode(m.header.raw()),
        "b": B64.encode(&m.body),
    })
}

/// The message a forwarded publish carries (not stored yet: no store id).
pub fn message_of(v: &Value) -> Result<crate::message::Message, String> {
    let field = |k: &str| -> Result<bytes::Bytes, String> {
        let s = v
            .get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a forwarded message lacks '{k}'"))?;
        B64.decode(s)
            .map(Into::into)
            .map_err(|e| format!("a forwarded message's '{k}' is not base64: {e}"))
    };
    let stored = warren_storage::StoredMessage {
        exchange: field("x")?,
        routing_key: field("k")?,
        header: field("h")?,
        body: field("b")?,
    };
    let mut m = crate::message::Message::from_stored(0, stored)
        .ok_or("a forwarded message is not a valid message")?;
    m.stored = None;
    Ok(m)
}

/// A request about queue `info` for its home node.
fn request(info: &QueueInfo, op: &str, mut extra: Value) -> Value {
    let mut r = json!({"op": op, "vhost": info.vhost, "queue": &*info.name});
    if let (Some(o), Some(e)) = (r.as_object_mut(), extra.as_object_mut()) {
        o.append(e);
    }
    r
}

async fn run(
    info: Arc<QueueInfo>,
    link: Arc<dyn Link>,
    mut mailbox: mpsc::UnboundedReceiver<QueueCmd>,
    permits: Arc<Semaphore>,
    follower: Option<(Arc<AtomicBool>, (Resend, u64))>,
) {
    let home: Arc<str> = info.home.clone().unwrap_or_else(|| "".into());
    let mut batch: Vec<(MessageRef, Option<Arc<ConfirmTicket>>)> = Vec::new();
    let mut pipe = Pipeline::new();
    let retired = follower.as_ref().map(|(r, _)| r.clone());
    pipe.resend = follower.map(|(_, s)| s);
    let mut st = Consumers {
        retired: retired.clone(),
        ..Default::default()
    };
    let mut renew = tokio::time::interval(LEASE_RENEW);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            c = mailbox.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = renew.tick() => {
                st.renew(&info, &home, &*link, retired.is_some()).await;
                continue;
            }
        };
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                QueueCmd::Publish(p) => {
                    if p.permit {
                        permits.add_permits(1);
                    }
                    batch.push((p.msg, p.confirm));
                    if batch.len() >= BATCH {
                        forward(&info, &home, &link, &mut pipe, &mut batch).await;
                    }
                }
                QueueCmd::Ack { chan_key, mut seqs } => {
                    // Acks of one channel in a row go as one request.
                    forward(&info, &home, &link, &mut pipe, &mut batch).await;
                    let mut held = None;
                    while let Ok(c) = mailbox.try_recv() {
                        match c {
                            QueueCmd::Ack {
                                chan_key: k,
                                seqs: s,
                            } if k == chan_key => seqs.extend(s),
                            other => {
                                held = Some(other);
                                break;
                            }
                        }
                    }
                    answer(
                        &info,
                        &home,
                        &link,
                        &mut st,
                        QueueCmd::Ack { chan_key, seqs },
                    )
                    .await;
                    if held.is_some() {
                        next = held;
                        continue;
                    }
                }
                other => {
                    // Publishes before a command reach the home node first
                    // (and, for what reads or changes the queue's messages,
                    // are in it).
                    forward(&info, &home, &link, &mut pipe, &mut batch).await;
                    if matches!(
                        other,
                        QueueCmd::Stats { .. }
                            | QueueCmd::Info { .. }
                            | QueueCmd::Purge { .. }
                            | QueueCmd::Delete { .. }
                            | QueueCmd::Get { .. }
                    ) {
                        pipe.drain().await;
                    }
                    answer(&info, &home, &link, &mut st, other).await;
                }
            }
            next = mailbox.try_recv().ok();
        }
        forward(&info, &home, &link, &mut pipe, &mut batch).await;
    }
    // The queue was dropped here: its consumers here end, and what is left
    // is not confirmed.
    pipe.drain().await;
    match retired {
        Some(r) if r.load(Ordering::Acquire) => {
            st.forget_all();
            // Not sent yet: back to the front, for the next leader.
            if let (Some((back, base)), false) = (&pipe.resend, batch.is_empty()) {
                let _ = back.send((base + pipe.n, std::mem::take(&mut batch)));
            }
        }
        _ => st.cancel_all(),
    }
    for (_, t) in batch.drain(..) {
        if let Some(t) = t {
            t.nack();
            t.settle();
        }
    }
}

/// Send the publishes gathered so far (up to [`IN_FLIGHT`] batches wait
/// for their answers at once); each confirm waits for the home node's (a
/// nack if it refused the message or could not be reached).
async fn forward(
    info: &Arc<QueueInfo>,
    home: &str,
    link: &Arc<dyn Link>,
    pipe: &mut Pipeline,
    batch: &mut Vec<(MessageRef, Option<Arc<ConfirmTicket>>)>,
) {
    if batch.is_empty() {
        return;
    }
    let Ok(slot) = pipe.slots.clone().acquire_owned().await else {
        return;
    };
    let msgs: Vec<Value> = batch.iter().map(|(m, _)| message_json(m)).collect();
    let n = pipe.n;
    let req = request(
        info,
        "publish",
        json!({"messages": msgs, "stream": pipe.stream, "n": n}),
    );
    pipe.n += 1;
    let call = link.call(home, req);
    let resend = pipe.resend.clone().map(|(tx, base)| (tx, base + n));
    let sent: Vec<(MessageRef, Option<Arc<ConfirmTicket>>)> = match resend {
        Some(_) => std::mem::take(batch),
        None => Vec::new(),
    };
    let tickets: Vec<Option<Arc<ConfirmTicket>>> = match resend {
        Some(_) => Vec::new(),
        None => batch.drain(..).map(|(_, t)| t).collect(),
    };
    let (name, home) = (info.name.clone(), home.to_owned());
    tokio::spawn(async move {
        let r = call.await;
        let tickets = match (resend, &r) {
            (Some((back, order)), Err(LinkError::Down(_))) => {
                // Never sent: the front sends them to the next leader.
                let _ = back.send((order, sent));
                drop(slot);
                return;
            }
            (Some(_), _) => sent.into_iter().map(|(_, t)| t).collect(),
            (None, _) => tickets,
        };
        let nacked: Vec<bool> = match &r {
            Ok(v) => {
                let mut n = vec![false; tickets.len()];
                for i in v
                    .get("nacked")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                {
                    if let Some(x) = n.get_mut(i as usize) {
                        *x = true;
                    }
                }
                n
            }
            Err(e) => {
                tracing::warn!(queue = %name, home, error = ?e, "forwarded publishes not confirmed");
                vec![true; tickets.len()]
            }
        };
        for (t, nack) in tickets.into_iter().zip(nacked) {
            if let Some(t) = t {
                if nack {
                    t.nack();
                }
                t.settle();
            }
        }
        drop(slot);
    });
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Answer a command other than a publish: ask the home node what it must,
/// refuse what cannot be done through this node, ignore what concerns only
/// consumers here (there are none).
async fn answer(
    info: &Arc<QueueInfo>,
    home: &str,
    link: &Arc<dyn Link>,
    st: &mut Consumers,
    cmd: QueueCmd,
) {
    let ask = |op: &str, extra: Value| link.call(home, request(info, op, extra));
    match cmd {
        QueueCmd::Stats { reply } => {
            if let Ok(v) = ask("stats", json!({})).await {
                let _ = reply.send((u(&v, "messages") as u32, u(&v, "consumers") as u32));
            }
        }
        QueueCmd::Info { reply } => {
            if let Ok(v) = ask("info", json!({})).await {
                let _ = reply.send(QueueStats {
                    ready: u(&v, "ready"),
                    ready_bytes: u(&v, "ready_bytes"),
                    unacked: u(&v, "unacked"),
                    consumers: u(&v, "consumers") as u32,
                    published: u(&v, "published"),
                    delivered: u(&v, "delivered"),
                    acked: u(&v, "acked"),
                    redelivered: u(&v, "redelivered"),
                    deduplicated: v.get("deduplicated").and_then(Value::as_u64),
                    stream: None,
                });
            }
        }
        QueueCmd::Purge { reply } => {
            if let Ok(v) = ask("purge", json!({})).await {
                let _ = reply.send(u(&v, "count") as u32);
            }
        }
        QueueCmd::Delete {
            if_unused,
            if_empty,
            reply,
        } => {
            let r = match ask(
                "delete",
                json!({"if_unused": if_unused, "if_empty": if_empty}),
            )
            .await
            {
                Ok(v) => match v.get("error") {
                    Some(e) => Err(AmqpError::new(
                        u(e, "code") as u16,
                        e.get("text").and_then(Value::as_str).unwrap_or("refused"),
                    )),
                    None => Ok(u(&v, "count") as u32),
                },
                Err(LinkError::Down(_)) => Err(home_down(info)),
                Err(LinkError::Failed(why)) => Err(AmqpError::new(reply::INTERNAL_ERROR, why)),
            };
            let _ = reply.send(r);
        }
        QueueCmd::Touch => {
            let call = ask("touch", json!({}));
            tokio::spawn(async move {
                let _ = call.await;
            });
        }
        QueueCmd::Consume { consumer, reply } => {
            let sub = NEXT_SUB.fetch_add(1, Ordering::Relaxed);
            let c = &consumer;
            subs().insert(
                sub,
                Arc::new(Sub {
                    info: c.info(true, c.timeout),
                    conn: c.conn.clone(),
                    chan_key: c.chan_key,
                    channel: c.channel,
                    tag: c.tag.clone(),
                    in_flight: c.in_flight.clone(),
                    credit: c.channel_credit.clone(),
                    no_ack: c.no_ack,
                    queue: info.id,
                    retired: st.retired.clone(),
                }),
            );
            let r = ask(
                "consume",
                json!({
                    "sub": sub, "chan": c.chan_key, "tag": &*c.tag, "no_ack": c.no_ack,
                    "exclusive": c.exclusive, "prefetch": c.prefetch,
                    "global_prefetch": c.channel_credit.limit.load(Ordering::Relaxed),
                    "priority": c.priority, "timeout": c.timeout,
                    "cancel_notify": c.cancel_notify,
                    // A stream consumer's arguments, read again there.
                    "stream_args": c.stream.as_ref().map(|s| {
                        crate::replicate::topology::table_text(&s.arguments)
                    }),
                }),
            )
            .await;
            let r = match r {
                Ok(v) => match v.get("error") {
                    Some(e) => Err(AmqpError::new(
                        u(e, "code") as u16,
                        e.get("text").and_then(Value::as_str).unwrap_or("refused"),
                    )),
                    None => Ok(()),
                },
                Err(LinkError::Down(_)) => Err(home_down(info)),
                Err(LinkError::Failed(why)) => Err(AmqpError::new(reply::INTERNAL_ERROR, why)),
            };
            match r {
                Ok(()) => {
                    st.subs.insert((c.chan_key, c.tag.clone()), sub);
                    st.chans.insert(c.chan_key);
                }
                Err(_) => {
                    subs().remove(&sub);
                }
            }
            let _ = reply.send(r);
        }
        QueueCmd::Cancel { chan_key, tag } => {
            let Some(sub) = st.subs.remove(&(chan_key, tag.clone())) else {
                return;
            };
            let r = ask(
                "cancel",
                json!({"sub": sub, "chan": chan_key, "tag": &*tag}),
            )
            .await;
            // Cancel-ok comes from the queue's node after its last
            // delivery; if it cannot, from here.
            let gone = r.map_or(true, |v| v.get("gone").is_some());
            if gone {
                ended(sub, true);
            }
        }
        QueueCmd::Ack { chan_key, seqs } => {
            let _ = ask("ack", json!({"chan": chan_key, "seqs": &seqs[..]})).await;
        }
        QueueCmd::Reject {
            chan_key,
            seqs,
            requeue,
        } => {
            let _ = ask(
                "reject",
                json!({"chan": chan_key, "seqs": &seqs[..], "requeue": requeue}),
            )
            .await;
        }
        QueueCmd::ChannelClosed { chan_key } => {
            if st.chans.remove(&chan_key) {
                st.drop_chan(chan_key);
                let _ = ask("closed", json!({"chan": chan_key})).await;
            }
        }
        QueueCmd::Recover { chan_key } => {
            if st.chans.contains(&chan_key) {
                let _ = ask("recover", json!({"chan": chan_key})).await;
            }
        }
        QueueCmd::Get {
            chan_key,
            no_ack,
            reply,
            ..
        } => {
            if !no_ack {
                st.chans.insert(chan_key);
            }
            let got = match ask("get", json!({"chan": chan_key, "no_ack": no_ack})).await {
                Ok(v) => v.get("message").and_then(|m| {
                    let mut msg = message_of(m).ok()?;
                    msg.stored = None;
                    Some(Got {
                        msg: Arc::new(msg),
                        seq: u(&v, "seq"),
                        redelivered: v.get("redelivered").and_then(Value::as_bool) == Some(true),
                        remaining: u(&v, "remaining") as u32,
                    })
                }),
                Err(_) => None,
            };
            let _ = reply.send(got);
        }
        QueueCmd::Consumers { reply } => {
            // This node's consumers of the queue (its node lists its own).
            let all = subs();
            let mine = st
                .subs
                .values()
                .filter_map(|s| all.get(s).map(|s| s.info.clone()))
                .collect();
            let _ = reply.send(mine);
        }
        // Nothing here to wake, reconfigure or recover; deliveries that
        // came back undelivered belong to the queue's node (its relays).
        QueueCmd::Wake
        | QueueCmd::Undelivered { .. }
        | QueueCmd::Reconfigure(_)
        | QueueCmd::Recovered { .. }
        | QueueCmd::StreamCommitted { .. }
        | QueueCmd::StreamRead(_)
        | QueueCmd::Paged { .. }
        | QueueCmd::Publish(_) => {}
    }
}
