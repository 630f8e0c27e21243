//! The home node's side of queues reached through other nodes (see
//! `crate::queue::remote`): it answers their forwarded publishes and
//! questions with its own queues, registers their consumers (sending each
//! one's deliveries back, in order), and it is how this node's forwarding
//! actors reach the others. Another node's channel is known here by
//! (node, its channel key) under a key of this node's; a channel not
//! renewed for [`LEASE`] is taken as closed (its node died or was cut
//! off): its consumers go and its unacked messages are requeued.

use super::SyncSlot;
use crate::broker::Broker;
use crate::events::{ConfirmTicket, ConnEvent};
use crate::queue::remote::{message_of, Link, LinkError};
use crate::queue::{ChannelCredit, Consumer};
use crate::queue::{QueueCmd, QueueHandle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long another node's channel lives here without a renewal.
const LEASE: Duration = Duration::from_secs(15);

/// How long a forwarded request may take (a publish waits for the home
/// node's store sync, as a local confirm does).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// This node's link to the others, through whichever cluster node it runs
/// now (a node that joins another cluster starts a new one).
pub(crate) struct ClusterLink(pub(crate) SyncSlot);

impl Link for ClusterLink {
    fn call(
        &self,
        node: &str,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, LinkError>> + Send>> {
        let sync = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        let node = node.to_owned();
        Box::pin(async move { call_node(sync, &node, request).await })
    }
}

/// Send `request` to the member called `node` through `sync`'s cluster
/// node (None: this node is between clusters).
async fn call_node(
    sync: Option<Arc<super::ClusterSync>>,
    node: &str,
    request: Value,
) -> Result<Value, LinkError> {
    let sync = sync.ok_or_else(|| LinkError::Down("this node is not in a cluster now".into()))?;
    match sync.cluster.call_app(node, request, CALL_TIMEOUT).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(why)) => Err(LinkError::Failed(why)),
        Err(warren_cluster::CallError::Connect(e)) => Err(LinkError::Down(e.to_string())),
        Err(warren_cluster::CallError::Rpc(e)) => Err(LinkError::Failed(e.to_string())),
    }
}

/// [`call_node`] through broker `b`'s current cluster node.
pub(crate) async fn call_from(b: &Broker, node: &str, request: Value) -> Result<Value, LinkError> {
    call_node(b.cluster.as_ref().and_then(|m| m.sync()), node, request).await
}

/// Answers other members' requests about this node's queues. Set up before
/// the broker exists (the cluster node starts first), so it finds the
/// broker through `broker` once that is made.
#[derive(Default)]
pub struct Handler {
    pub(crate) broker: OnceLock<Weak<Broker>>,
    chans: Arc<Mutex<HashMap<(String, u64), Chan>>>,
    turns: Turns,
    sweeper: OnceLock<()>,
}

/// Where each forwarding actor's stream of publish batches is: the number
/// of the next batch to hand over (batches may arrive out of order; each
/// waits for its turn).
struct Turn {
    next: Mutex<u64>,
    moved: tokio::sync::Notify,
    used: Mutex<Instant>,
}

type Turns = Arc<Mutex<HashMap<(String, u64), Arc<Turn>>>>;

/// How long a batch waits for the ones before it (lost on the way: their
/// sender failed) before it goes anyway.
const TURN_WAIT: Duration = Duration::from_secs(5);

/// Wait for batch `n` of stream `stream` from node `from` to be next.
async fn wait_turn(turns: &Turns, from: &str, stream: u64, n: u64) -> Arc<Turn> {
    let turn = {
        let mut m = turns.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((from.to_owned(), stream))
            .or_insert_with(|| {
                // A stream seen for the first time starts at 0, unless this
                // node restarted under it: then it goes on from here.
                let first = if n < 8 { 0 } else { n };
                Arc::new(Turn {
                    next: Mutex::new(first),
                    moved: tokio::sync::Notify::new(),
                    used: Mutex::new(Instant::now()),
                })
            })
            .clone()
    };
    *turn.used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    let deadline = tokio::time::Instant::now() + TURN_WAIT;
    loop {
        let moved = turn.moved.notified();
        if *turn.next.lock().unwrap_or_else(|e| e.into_inner()) >= n {
            break;
        }
        if tokio::time::timeout_at(deadline, moved).await.is_err() {
            tracing::warn!(
                node = from,
                batch = n,
                "forwarded publishes out of order: an earlier batch never came"
            );
            break;
        }
    }
    turn
}

/// Another node's channel, as this node knows it.
struct Chan {
    key: u64,
    credit: Arc<ChannelCredit>,
    /// The queues it used here (told when it closes).
    queues: Vec<QueueHandle>,
    renewed: Instant,
}

type Chans = Arc<Mutex<HashMap<(String, u64), Chan>>>;

fn lock(c: &Chans) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Chan>> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Close the channels whose lease ran out, every few seconds (and forget
/// publish streams idle for minutes).
async fn sweep(chans: Chans, turns: Turns) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| {
                t.used.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
                    < Duration::from_secs(600)
            });
        let gone: Vec<Chan> = {
            let mut m = lock(&chans);
            let old: Vec<(String, u64)> = m
                .iter()
                .filter(|(_, c)| c.renewed.elapsed() > LEASE)
                .map(|(k, _)| k.clone())
                .collect();
            old.into_iter().filter_map(|k| m.remove(&k)).collect()
        };
        for c in gone {
            tracing::warn!(
                chan = c.key,
                "another node's channel was not renewed: its unacked messages are requeued"
            );
            for q in c.queues {
                q.tell(QueueCmd::ChannelClosed { chan_key: c.key });
            }
        }
    }
}

impl warren_cluster::AppHandler for Handler {
    fn handle(
        &self,
        _from: warren_cluster::NodeInfo,
        request: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>> {
        let broker = self.broker.get().and_then(Weak::upgrade);
        let (chans, turns) = (self.chans.clone(), self.turns.clone());
        if broker.is_some() {
            self.sweeper.get_or_init(|| {
                tokio::spawn(sweep(chans.clone(), turns.clone()));
            });
        }
        Box::pin(async move {
            let b = broker.ok_or("this node is starting or stopping")?;
            match request.get("op").and_then(Value::as_str) {
                Some("deliver" | "ended" | "timed_out") => consumer_event(request).await,
                _ => handle(&b, &chans, &turns, &_from.name, request).await,
            }
        })
    }
}

/// The local (not forwarded) queue a request names.
fn local_queue(b: &Broker, r: &Value) -> Result<QueueHandle, String> {
    let s = |k: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the request lacks '{k}'"))
    };
    let (vhost, name) = (s("vhost")?, s("queue")?);
    b.vhost(vhost)
        .and_then(|v| v.find_queue(name))
        .filter(|q| q.home().is_none())
        .ok_or_else(|| format!("no queue '{name}' in vhost '{vhost}' on this node"))
}

/// A forwarded consumer's event, from the queue's node to this one.
async fn consumer_event(r: Value) -> Result<Value, String> {
    let sub = r.get("sub").and_then(Value::as_u64).ok_or("no 'sub'")?;
    match r.get("op").and_then(Value::as_str) {
        Some("deliver") => {
            let mut items = Vec::new();
            for i in r
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let m = i.get("m").ok_or("a delivery without a message")?;
                let seq = i.get("seq").and_then(Value::as_u64).ok_or("no 'seq'")?;
                let redelivered = i.get("r").and_then(Value::as_bool) == Some(true);
                items.push((Arc::new(message_of(m)?), redelivered, seq));
            }
            let taken = crate::queue::remote::deliver(sub, items).await;
            Ok(json!({ "taken": taken }))
        }
        Some("ended") => {
            let ok = r.get("ok").and_then(Value::as_bool) == Some(true);
            crate::queue::remote::ended(sub, ok);
            Ok(json!({}))
        }
        _ => {
            let returned: Box<[u64]> = r
                .get("returned")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            let cancelled = r.get("cancelled").and_then(Value::as_bool) == Some(true);
            let timeout = r.get("timeout").and_then(Value::as_u64).unwrap_or(0);
            crate::queue::remote::timed_out(sub, cancelled, timeout, returned);
            Ok(json!({}))
        }
    }
}

fn seqs_of(r: &Value) -> crate::queue::Seqs {
    r.get("seqs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

/// This node's key for another node's channel `chan` (made on first use),
/// noting that it used `q`.
fn chan_key(
    b: &Broker,
    chans: &Chans,
    from: &str,
    chan: u64,
    q: &QueueHandle,
    limit: u32,
) -> (u64, Arc<ChannelCredit>) {
    let mut m = lock(chans);
    let c = m.entry((from.to_owned(), chan)).or_insert_with(|| Chan {
        key: b.next_chan_key(),
        credit: Arc::new(ChannelCredit::default()),
        queues: Vec::new(),
        renewed: Instant::now(),
    });
    if limit > 0 {
        c.credit.limit.store(limit, Ordering::Relaxed);
    }
    if !c.queues.contains(q) {
        c.queues.push(q.clone());
    }
    c.renewed = Instant::now();
    (c.key, c.credit.clone())
}

/// This node's key for another node's channel, if it has one.
fn known_chan(chans: &Chans, from: &str, r: &Value) -> Option<u64> {
    let chan = r.get("chan").and_then(Value::as_u64)?;
    lock(chans).get(&(from.to_owned(), chan)).map(|c| c.key)
}

/// Send consumer `sub`'s events to node `to`, in order, until it ends.
async fn relay(
    b: Weak<Broker>,
    q: QueueHandle,
    to: String,
    sub: u64,
    chan: u64,
    in_flight: Arc<std::sync::atomic::AtomicU32>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<ConnEvent>,
) {
    let call = |req: Value| {
        let (b, to) = (b.upgrade(), to.clone());
        async move {
            let b = b.ok_or_else(|| LinkError::Down("this node is stopping".into()))?;
            call_from(&b, &to, req).await
        }
    };
    while let Some(ev) = events.recv().await {
        let items: Vec<(crate::message::MessageRef, bool, u64)> = match ev {
            ConnEvent::Deliver {
                msg,
                redelivered,
                seq,
                ..
            } => vec![(msg, redelivered, seq)],
            ConnEvent::DeliverMany { items, .. } => items,
            ConnEvent::CancelOk { .. } | ConnEvent::Cancelled { .. } => {
                let ok = matches!(ev, ConnEvent::CancelOk { .. });
                let _ = call(json!({"op": "ended", "sub": sub, "ok": ok})).await;
                return;
            }
            ConnEvent::TimedOut {
                tag,
                timeout,
                returned,
                ..
            } => {
                let req = json!({"op": "timed_out", "sub": sub, "cancelled": tag.is_some(),
                    "timeout": timeout, "returned": &returned[..]});
                let _ = call(req).await;
                if tag.is_some() {
                    return;
                }
                continue;
            }
            _ => continue,
        };
        let n = items.len() as u32;
        let seqs: crate::queue::Seqs = items.iter().map(|i| i.2).collect();
        let body: Vec<Value> = items
            .iter()
            .map(|(m, r, s)| json!({"m": crate::queue::remote::message_json(m), "r": r, "seq": s}))
            .collect();
        let r = call(json!({"op": "deliver", "sub": sub, "items": body})).await;
        let reopened = crate::channel::consume::took_in_flight_n(&in_flight, n);
        match r {
            Ok(v) if v.get("taken").and_then(Value::as_bool) == Some(false) => {
                // That node no longer has the consumer (cancelled meanwhile,
                // or it restarted, or its quorum queue front registered it
                // again elsewhere): the deliveries come back uncounted, and
                // this relay ends, so the queue drops the consumer instead
                // of handing it more that would only come back (each time
                // counted against a delivery limit: messages were lost so).
                tracing::debug!(node = %to, sub, n, "a consumer on another node is gone there: it leaves the queue");
                events.close();
                let mut seqs = seqs;
                while let Ok(ev) = events.try_recv() {
                    match ev {
                        ConnEvent::Deliver { seq, .. } => seqs.push(seq),
                        ConnEvent::DeliverMany { items, .. } => {
                            seqs.extend(items.into_iter().map(|i| i.2))
                        }
                        _ => {}
                    }
                }
                q.tell(QueueCmd::Undelivered {
                    chan_key: chan,
                    seqs,
                });
                return;
            }
            Ok(_) => {}
            Err(e) => {
                // Its node is gone: its channel's messages come back.
                tracing::warn!(node = %to, error = ?e, "cannot deliver to a consumer on another node: its channel is closed here");
                q.tell(QueueCmd::ChannelClosed { chan_key: chan });
                return;
            }
        }
        if reopened {
            q.tell(QueueCmd::Wake);
        }
    }
}

/// Send a direct reply to its requester on node `node` (see
/// `channel::reply_to`); whether it was delivered.
pub(crate) async fn send_reply(b: &Broker, node: &str, msg: &crate::message::Message) -> bool {
    let req = json!({
        "op": "reply",
        "name": msg.routing_key.as_str(),
        "message": crate::queue::remote::message_json(msg),
    });
    match call_from(b, node, req).await {
        Ok(v) => v.get("taken").and_then(Value::as_bool) == Some(true),
        Err(_) => false,
    }
}

async fn handle(
    b: &Arc<Broker>,
    chans: &Chans,
    turns: &Turns,
    from: &str,
    r: Value,
) -> Result<Value, String> {
    let op = r.get("op").and_then(Value::as_str).unwrap_or_default();
    let q = local_queue(b, &r);
    let flag = |k: &str| r.get(k).and_then(Value::as_bool) == Some(true);
    let num = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let me = || b.cluster.as_ref().map_or(0, |m| m.node().id());
    let group = |q: &Result<QueueHandle, String>| -> Result<u64, String> {
        let q = q.as_ref().map_err(Clone::clone)?;
        q.info
            .quorum
            .ok_or_else(|| format!("queue '{}' is not a quorum queue", q.name()))
    };
    match op {
        "quorum_member" => {
            let g = group(&q)?;
            let node = r.get("node").and_then(Value::as_str).unwrap_or_default();
            match crate::queue::quorum::change_members(me(), g, flag("add"), node.to_owned()).await
            {
                Ok(()) => Ok(json!({})),
                Err(e) => Ok(json!({"error": {"code": 400, "text": e}})),
            }
        }
        "quorum_status" => {
            let st = crate::queue::quorum::status(me(), group(&q)?).await;
            Ok(json!({
                "leader": st.as_ref().and_then(|s| s.leader.as_ref().map(|l| l.name.clone())),
                "members": st.map(|s| s.members.into_iter().map(|m| m.name).collect::<Vec<_>>()),
            }))
        }
        "quorum_elect" => {
            crate::queue::quorum::control(me(), group(&q)?, crate::queue::quorum::Control::Elect);
            Ok(json!({}))
        }
        "reply" => {
            let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
            let m = message_of(r.get("message").ok_or("a reply without a message")?)?;
            let target = b.replies().get(name).cloned();
            let taken = match target {
                Some(t) => t.send_waiting(Arc::new(m)).await,
                None => false,
            };
            Ok(json!({ "taken": taken }))
        }
        "consume" => {
            let q = match q {
                Ok(q) => q,
                Err(why) => return Ok(json!({"error": {"code": 404, "text": why}})),
            };
            let sub = num("sub");
            let (key, credit) = chan_key(
                b,
                chans,
                from,
                num("chan"),
                &q,
                num("global_prefetch") as u32,
            );
            let (conn, events) = tokio::sync::mpsc::unbounded_channel();
            let in_flight = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let tag: Arc<str> = r.get("tag").and_then(Value::as_str).unwrap_or("").into();
            let stream = match r.get("stream_args").and_then(Value::as_str) {
                None => None,
                Some(a) => {
                    let args = super::topology::table_of(a)?;
                    let parsed = crate::queue::stream::parse_consume(
                        q.name(),
                        &q.info.vhost,
                        &args,
                        crate::message::unix_ms(),
                    );
                    match parsed {
                        Ok(s) => Some(Box::new(s)),
                        Err(e) => return Ok(json!({"error": {"code": e.code, "text": e.text}})),
                    }
                }
            };
            let consumer = Consumer {
                tag,
                conn_id: 0,
                chan_key: key,
                channel: 0,
                no_ack: flag("no_ack"),
                exclusive: flag("exclusive"),
                prefetch: num("prefetch") as u32,
                channel_credit: credit,
                in_flight: in_flight.clone(),
                conn,
                priority: r.get("priority").and_then(Value::as_i64).unwrap_or(0) as i32,
                unacked: 0,
                order: 0,
                timeout: r.get("timeout").and_then(Value::as_u64),
                cancel_notify: flag("cancel_notify"),
                stream,
            };
            let res = q
                .ask(|reply| QueueCmd::Consume {
                    consumer: Box::new(consumer),
                    reply,
                })
                .await;
            match res {
                Some(Ok(())) => {
                    tokio::spawn(relay(
                        Arc::downgrade(b),
                        q,
                        from.to_owned(),
                        sub,
                        key,
                        in_flight,
                        events,
                    ));
                    Ok(json!({}))
                }
                Some(Err(e)) => Ok(json!({"error": {"code": e.code, "text": e.text}})),
                None => Ok(json!({"error": {"code": 404, "text": "the queue is gone"}})),
            }
        }
        "cancel" => {
            // The consumer's relay tells the other node once it is done.
            let (Ok(q), Some(key)) = (q, known_chan(chans, from, &r)) else {
                return Ok(json!({"gone": true}));
            };
            let tag: Arc<str> = r.get("tag").and_then(Value::as_str).unwrap_or("").into();
            q.tell(QueueCmd::Cancel { chan_key: key, tag });
            Ok(json!({}))
        }
        "ack" | "reject" | "recover" => {
            let (Ok(q), Some(key)) = (q, known_chan(chans, from, &r)) else {
                return Ok(json!({}));
            };
            q.tell(match op {
                "ack" => QueueCmd::Ack {
                    chan_key: key,
                    seqs: seqs_of(&r),
                },
                "reject" => QueueCmd::Reject {
                    chan_key: key,
                    seqs: seqs_of(&r),
                    requeue: flag("requeue"),
                },
                _ => QueueCmd::Recover { chan_key: key },
            });
            Ok(json!({}))
        }
        "closed" => {
            let chan = num("chan");
            let c = lock(chans).remove(&(from.to_owned(), chan));
            if let Some(c) = c {
                for q in c.queues {
                    q.tell(QueueCmd::ChannelClosed { chan_key: c.key });
                }
            }
            Ok(json!({}))
        }
        "renew" => {
            let mut m = lock(chans);
            let mut unknown = Vec::new();
            for chan in r
                .get("chans")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
            {
                match m.get_mut(&(from.to_owned(), chan)) {
                    Some(c) => c.renewed = Instant::now(),
                    None => unknown.push(chan),
                }
            }
            Ok(json!({ "unknown": unknown }))
        }
        "get" => {
            let q = q?;
            let no_ack = flag("no_ack");
            let (key, _) = chan_key(b, chans, from, num("chan"), &q, 0);
            let got = q
                .ask(|reply| QueueCmd::Get {
                    chan_key: key,
                    no_ack,
                    conn: None,
                    reply,
                })
                .await
                .flatten();
            Ok(match got {
                Some(g) => json!({
                    "message": crate::queue::remote::message_json(&g.msg),
                    "seq": g.seq, "redelivered": g.redelivered, "remaining": g.remaining,
                }),
                None => json!({}),
            })
        }
        "publish" => {
            let msgs = r
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("a publish without messages")?;
            // In the order they were sent, whatever order they came in.
            let turn = match (num("stream"), r.get("n").and_then(Value::as_u64)) {
                (stream, Some(n)) if stream != 0 => {
                    Some((wait_turn(turns, from, stream, n).await, n))
                }
                _ => None,
            };
            let next = |turn: Option<(Arc<Turn>, u64)>| {
                if let Some((t, n)) = turn {
                    let mut next = t.next.lock().unwrap_or_else(|e| e.into_inner());
                    *next = (*next).max(n + 1);
                    drop(next);
                    t.moved.notify_waiters();
                }
            };
            let Ok(q) = q else {
                // Deleted meanwhile: every message is refused (the
                // publisher's confirm is a nack, so it may route again).
                next(turn);
                return Ok(json!({"nacked": (0..msgs.len()).collect::<Vec<_>>()}));
            };
            let (events, mut confirms) = tokio::sync::mpsc::unbounded_channel();
            for (i, m) in msgs.iter().enumerate() {
                let ticket = Arc::new(ConfirmTicket::new(events.clone(), 0, i as u64));
                match message_of(m) {
                    Ok(msg) => {
                        crate::channel::publish::hand_to_queue(b, &q, msg, ticket).await;
                    }
                    Err(why) => {
                        tracing::warn!(error = %why, "refused a forwarded message");
                        ticket.nack();
                        ticket.settle();
                    }
                }
            }
            next(turn);
            drop(events);
            let mut nacked = Vec::new();
            while let Some(ev) = confirms.recv().await {
                match ev {
                    ConnEvent::Confirm {
                        seq, nack: true, ..
                    } => nacked.push(seq),
                    ConnEvent::Confirms { seqs, .. } => {
                        nacked.extend(seqs.into_iter().filter(|(_, n)| *n).map(|(s, _)| s));
                    }
                    _ => {}
                }
            }
            Ok(json!({ "nacked": nacked }))
        }
        "stats" => {
            let (m, c) = q?
                .ask(|reply| QueueCmd::Stats { reply })
                .await
                .ok_or("the queue is gone")?;
            Ok(json!({"messages": m, "consumers": c}))
        }
        "info" => {
            let s = q?
                .ask(|reply| QueueCmd::Info { reply })
                .await
                .ok_or("the queue is gone")?;
            Ok(json!({
                "ready": s.ready, "ready_bytes": s.ready_bytes, "unacked": s.unacked,
                "consumers": s.consumers, "published": s.published, "delivered": s.delivered,
                "acked": s.acked, "redelivered": s.redelivered, "deduplicated": s.deduplicated,
            }))
        }
        "purge" => {
            let n = q?.ask(|reply| QueueCmd::Purge { reply }).await.unwrap_or(0);
            Ok(json!({ "count": n }))
        }
        "delete" => {
            let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(false);
            let Ok(q) = q else {
                return Ok(json!({"count": 0}));
            };
            let r = q
                .ask(|reply| QueueCmd::Delete {
                    if_unused: flag("if_unused"),
                    if_empty: flag("if_empty"),
                    reply,
                })
                .await
                .unwrap_or(Ok(0));
            Ok(match r {
                Ok(n) => json!({ "count": n }),
                Err(e) => json!({"error": {"code": e.code, "text": e.text}}),
            })
        }
        "touch" => {
            if let Ok(q) = q {
                q.tell(QueueCmd::Touch);
            }
            Ok(json!({}))
        }
        other => Err(format!("unknown request '{other}'")),
    }
}
