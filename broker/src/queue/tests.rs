//! Actor-level tests: commands fed to one queue's state directly, with no
//! task and no connection, so that the choices the actor makes (which
//! consumer, when to hold publishers, what goes to disk and comes back) are
//! checked where they are made. Protocol behaviour is tested over TCP in
//! `tests/`.

use super::actor::Actor;
use super::handle::{ChannelCredit, Consumer, Publish, QueueCmd};
use super::{DeadLetterRouter, QueueHandle, QueueInfo};
use super::{FLOW_WINDOW, HOLD_MESSAGES, HOLD_STALL_MS, PAGE_WINDOW};
use crate::error::AmqpResult;
use crate::events::ConnEvent;
use crate::message::Message;
use bytes::{BufMut, Bytes};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use warren_protocol::amqp::basic::{gen_properties, AMQPProperties};
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;
use warren_protocol::types::{AMQPValue, FieldTable};

/// Dead letters go nowhere in these tests.
struct NoRouter;

impl DeadLetterRouter for NoRouter {
    fn route_dead_letter(&self, _: &Message) -> AmqpResult<Vec<QueueHandle>> {
        Ok(Vec::new())
    }
}

/// A queue's state, and the receiving end of its own mailbox (page reads
/// answer there).
struct Fixture {
    actor: Actor,
    mailbox: mpsc::UnboundedReceiver<QueueCmd>,
    _tx: mpsc::UnboundedSender<QueueCmd>,
}

fn fixture(args: FieldTable, persister: Option<crate::persist::Persister>) -> Fixture {
    let info = Arc::new(QueueInfo {
        name: "q".into(),
        id: 7,
        vhost: "/".into(),
        durable: false,
        exclusive_owner: None,
        auto_delete: false,
        arguments: args,
        home: None,
        quorum: None,
    });
    let (tx, mailbox) = mpsc::unbounded_channel();
    let router: Weak<dyn DeadLetterRouter> = Weak::<NoRouter>::new();
    let args = crate::queue::args::QueueArgs::parse(&info.arguments);
    let actor = Actor::new(info, args, router, persister, Box::new(|_| {}), &tx);
    Fixture {
        actor,
        mailbox,
        _tx: tx,
    }
}

fn message(body: String) -> Arc<Message> {
    let mut raw = Vec::new();
    raw.put_u16(60);
    raw.put_u16(0);
    raw.put_u64(body.len() as u64);
    let raw = cookie_factory::gen_simple(gen_properties(&AMQPProperties::default()), raw)
        .expect("encodes");
    Arc::new(Message {
        exchange: ShortStr::truncating(""),
        routing_key: ShortStr::truncating("q"),
        header: ContentHeader::parse(Bytes::from(raw)).expect("parses"),
        body: Bytes::from(body),
        stored: None,
    })
}

fn publish(a: &mut Actor, seq: u64) {
    let p = Publish {
        seq,
        msg: message(seq.to_string()),
        confirm: None,
        permit: true,
    };
    assert!(!a.on_cmd(QueueCmd::Publish(p)));
}

/// A consumer on channel key `chan_key`, and its connection's mailbox.
fn consume(
    a: &mut Actor,
    chan_key: u64,
    tag: &str,
    priority: i32,
    prefetch: u32,
) -> (Arc<AtomicU32>, mpsc::UnboundedReceiver<ConnEvent>) {
    let (conn, events) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicU32::new(0));
    let consumer = Consumer {
        tag: tag.into(),
        conn_id: 1,
        chan_key,
        channel: 1,
        no_ack: false,
        exclusive: false,
        prefetch,
        channel_credit: Arc::new(ChannelCredit::default()),
        in_flight: in_flight.clone(),
        conn,
        priority,
        unacked: 0,
        order: 0,
        timeout: None,
        cancel_notify: true,
        stream: None,
    };
    let (reply, mut answer) = oneshot::channel();
    assert!(!a.on_cmd(QueueCmd::Consume {
        consumer: Box::new(consumer),
        reply,
    }));
    assert!(matches!(answer.try_recv(), Ok(Ok(()))));
    (in_flight, events)
}

/// The sequences delivered so far on a consumer's connection.
fn delivered(events: &mut mpsc::UnboundedReceiver<ConnEvent>) -> Vec<u64> {
    std::iter::from_fn(|| events.try_recv().ok())
        .flat_map(|e| match e {
            ConnEvent::Deliver { seq, .. } => vec![seq],
            ConnEvent::DeliverMany { items, .. } => items.iter().map(|i| i.2).collect(),
            _ => vec![0],
        })
        .collect()
}

#[test]
fn higher_priority_consumers_go_first_round_robin_within_a_level() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (_, mut high1) = consume(a, 1, "high1", 5, 2);
    let (_, mut low) = consume(a, 3, "low", 0, 0);
    let (_, mut high2) = consume(a, 2, "high2", 5, 2);
    for seq in 1..=10 {
        publish(a, seq);
    }
    a.end_wakeup();
    // The two priority-5 consumers take turns until their prefetch is
    // full; the rest goes to the priority-0 one.
    assert_eq!(delivered(&mut high1), vec![1, 3]);
    assert_eq!(delivered(&mut high2), vec![2, 4]);
    assert_eq!(delivered(&mut low), vec![5, 6, 7, 8, 9, 10]);
    // An ack makes room at a high-priority consumer: it gets the next one.
    let ack = QueueCmd::Ack {
        chan_key: 1,
        seqs: [1].into_iter().collect(),
    };
    assert!(!a.on_cmd(ack));
    publish(a, 11);
    a.end_wakeup();
    assert_eq!(delivered(&mut high1), vec![11]);
    assert!(delivered(&mut low).is_empty());
}

#[test]
fn a_consumer_whose_connection_is_behind_is_skipped() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (behind, mut slow) = consume(a, 1, "slow", 0, 0);
    let (_, mut fast) = consume(a, 2, "fast", 0, 0);
    behind.store(FLOW_WINDOW, Ordering::Release);
    for seq in 1..=4 {
        publish(a, seq);
    }
    a.end_wakeup();
    assert!(delivered(&mut slow).is_empty());
    assert_eq!(delivered(&mut fast), vec![1, 2, 3, 4]);
    // Its connection wrote the window out: it is served again.
    behind.store(0, Ordering::Release);
    publish(a, 5);
    publish(a, 6);
    a.end_wakeup();
    assert_eq!(delivered(&mut slow).len(), 1);
    assert_eq!(delivered(&mut fast).len(), 1);
}

#[test]
fn publishers_are_held_while_consumers_take_messages_and_let_go_when_they_stall() {
    let n = HOLD_MESSAGES as u64 + 1;
    // No consumer: the queue is a buffer, every slot goes back at once.
    let mut f = fixture(FieldTable::default(), None);
    for seq in 1..=n {
        publish(&mut f.actor, seq);
    }
    assert_eq!(f.actor.end_wakeup(), n as usize);

    // A consumer that takes messages (prefetch 1): the backlog is over the
    // bound, so the slots are held.
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (_, mut events) = consume(a, 1, "c", 0, 1);
    a.now = 1_000;
    for seq in 1..=n {
        publish(a, seq);
    }
    assert_eq!(a.end_wakeup(), 0, "held while the consumer takes messages");
    assert_eq!(delivered(&mut events), vec![1]);
    a.now += HOLD_STALL_MS / 2;
    assert_eq!(a.end_wakeup(), 0, "still held: not stalled yet");
    // The consumer took nothing for longer than the stall limit: let go.
    a.now += HOLD_STALL_MS;
    assert_eq!(a.end_wakeup(), n as usize);
}

#[tokio::test]
async fn a_lazy_queue_pages_its_tail_out_and_reads_it_back_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let alarms = crate::alarm::Alarms::start(dir.path(), 1 << 60, 0);
    let store = Arc::new(warren_storage::mem::MemStore::new());
    let persister =
        crate::persist::Persister::start(store, 0, 1 << 20, alarms, std::time::Duration::ZERO)
            .expect("store service");
    let mut args = FieldTable::default();
    args.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
    let mut f = fixture(args, Some(persister));
    let n = PAGE_WINDOW as u64 + 1_500;
    for seq in 1..=n {
        publish(&mut f.actor, seq);
    }
    f.actor.end_wakeup();
    // The window is full; the rest is on disk, remembered as a range.
    assert_eq!(f.actor.ready.len(), PAGE_WINDOW);
    let tail = f.actor.tail.as_ref().expect("paging");
    assert_eq!(tail.len, n - PAGE_WINDOW as u64);
    assert_eq!(f.actor.ready_count(), n);

    // Drain with basic.get: every message comes back once, in order, the
    // paged ones read back from the store as the window runs low.
    let mut got = Vec::new();
    while (got.len() as u64) < n {
        let (reply, mut answer) = oneshot::channel();
        f.actor.get(1, true, None, reply);
        f.actor.end_wakeup();
        loop {
            match answer.try_recv() {
                Ok(Some(g)) => {
                    got.push(String::from_utf8_lossy(&g.msg.body).parse::<u64>().unwrap());
                    break;
                }
                Ok(None) => panic!("get-empty after {} of {n}", got.len()),
                Err(_) => {
                    let cmd = tokio::time::timeout(Duration::from_secs(10), f.mailbox.recv())
                        .await
                        .expect("a page read answers")
                        .expect("mailbox open");
                    assert!(matches!(cmd, QueueCmd::Paged { .. }));
                    f.actor.on_cmd(cmd);
                    f.actor.end_wakeup();
                }
            }
        }
    }
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    f.actor.end_wakeup();
    assert!(f.actor.tail.is_none(), "back to memory once drained");
    assert_eq!(f.actor.ready_count(), 0);
}

fn reject(a: &mut Actor, chan_key: u64, seq: u64) {
    let cmd = QueueCmd::Reject {
        chan_key,
        seqs: [seq].into_iter().collect(),
        requeue: true,
    };
    assert!(!a.on_cmd(cmd));
}

/// Deliveries on a consumer's connection: (seq, redelivered, x-delivery-count).
fn deliveries(events: &mut mpsc::UnboundedReceiver<ConnEvent>) -> Vec<(u64, bool, Option<i128>)> {
    let count = |msg: &crate::message::MessageRef| {
        msg.header.headers().and_then(|h| {
            h.inner()
                .get("x-delivery-count")
                .and_then(crate::fields::as_int)
        })
    };
    std::iter::from_fn(|| events.try_recv().ok())
        .flat_map(|e| match e {
            ConnEvent::Deliver {
                seq,
                redelivered,
                msg,
                ..
            } => vec![(seq, redelivered, count(&msg))],
            ConnEvent::DeliverMany { items, .. } => items
                .iter()
                .map(|(msg, redelivered, seq)| (*seq, *redelivered, count(msg)))
                .collect(),
            _ => vec![],
        })
        .collect()
}

#[test]
fn a_message_returned_more_often_than_the_delivery_limit_dies() {
    let mut args = FieldTable::default();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    let mut f = fixture(args, None);
    let a = &mut f.actor;
    let (_, mut events) = consume(a, 1, "c", 0, 0);
    publish(a, 1);
    a.end_wakeup();
    assert_eq!(deliveries(&mut events), vec![(1, false, None)]);
    reject(a, 1, 1);
    a.end_wakeup();
    assert_eq!(deliveries(&mut events), vec![(1, true, Some(1))]);
    reject(a, 1, 1);
    a.end_wakeup();
    assert_eq!(deliveries(&mut events), vec![(1, true, Some(2))]);
    // The third return is one more than the limit: dead-lettered (here:
    // dropped, the queue has no dead-letter exchange), never delivered again.
    let dead = || {
        super::dead_letter::DEAD[super::dead_letter::Reason::DeliveryLimit as usize][0]
            .load(Ordering::Relaxed)
    };
    let before = dead();
    reject(a, 1, 1);
    a.end_wakeup();
    assert!(deliveries(&mut events).is_empty());
    assert_eq!(a.ready_count() + a.unacked.len() as u64, 0);
    assert!(
        dead() > before,
        "counted as dead-lettered for delivery_limit"
    );
}

#[test]
fn without_a_limit_a_classic_queue_does_not_count_deliveries() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (_, mut events) = consume(a, 1, "c", 0, 0);
    publish(a, 1);
    a.end_wakeup();
    for _ in 0..3 {
        deliveries(&mut events);
        reject(a, 1, 1);
        a.end_wakeup();
    }
    assert_eq!(deliveries(&mut events), vec![(1, true, None)]);
}

#[test]
fn a_timed_out_consumer_is_cancelled_and_its_messages_come_back() {
    let mut args = FieldTable::default();
    args.insert("x-consumer-timeout".into(), AMQPValue::LongInt(100));
    let mut f = fixture(args, None);
    let a = &mut f.actor;
    let (_, mut slow) = consume(a, 1, "slow", 0, 0);
    publish(a, 1);
    publish(a, 2);
    a.end_wakeup();
    assert_eq!(delivered(&mut slow), vec![1, 2]);
    // Not late yet.
    a.now += 100;
    assert!(!a.check_timeouts());
    assert!(slow.try_recv().is_err());
    a.now += 100;
    assert!(!a.check_timeouts());
    match slow.try_recv() {
        Ok(ConnEvent::TimedOut {
            tag: Some(tag),
            timeout,
            mut returned,
            ..
        }) => {
            returned.sort();
            assert_eq!((&*tag, timeout, &*returned), ("slow", 100, &[1u64, 2][..]));
        }
        _ => panic!("no timeout event"),
    }
    assert!(a.consumers.is_empty(), "cancelled");
    // Another consumer gets them, redelivered.
    let (_, mut next) = consume(a, 2, "next", 0, 0);
    a.end_wakeup();
    assert_eq!(
        deliveries(&mut next)
            .into_iter()
            .map(|d| (d.0, d.1))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true)]
    );
}

#[test]
fn a_timed_out_consumer_that_cannot_be_cancelled_has_its_channel_closed() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (_, mut events) = consume(a, 1, "c", 0, 0);
    // Its own timeout, and a client without consumer_cancel_notify.
    a.consumers[0].timeout = Some(50);
    a.consumers[0].cancel_notify = false;
    publish(a, 1);
    a.end_wakeup();
    assert_eq!(delivered(&mut events), vec![1]);
    a.now += 1_000;
    assert!(!a.check_timeouts());
    assert!(matches!(
        events.try_recv(),
        Ok(ConnEvent::TimedOut {
            tag: None,
            timeout: 50,
            ..
        })
    ));
    // The queue keeps the consumer until its channel closes.
    assert_eq!(a.consumers.len(), 1);
    assert_eq!(a.unacked.len(), 1);
}

#[test]
fn a_consumer_gets_a_wake_ups_deliveries_in_one_event_within_its_windows() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (in_flight, mut events) = consume(a, 1, "c", 0, 0);
    in_flight.store(FLOW_WINDOW - 3, Ordering::Release);
    for seq in 1..=5 {
        publish(a, seq);
    }
    a.end_wakeup();
    // The flow window had room for three: one event carries them, and the
    // window counts all three at once.
    match events.try_recv() {
        Ok(ConnEvent::DeliverMany { items, .. }) => {
            assert_eq!(items.iter().map(|i| i.2).collect::<Vec<_>>(), [1, 2, 3])
        }
        _ => panic!("expected one DeliverMany"),
    }
    assert!(events.try_recv().is_err());
    assert_eq!(in_flight.load(Ordering::Acquire), FLOW_WINDOW);
    // A prefetch bounds a run too.
    let (_, mut limited) = consume(a, 2, "limited", 0, 1);
    a.end_wakeup();
    assert_eq!(delivered(&mut limited), vec![4]);
}

#[test]
fn deliveries_to_a_vanished_connection_go_back_in_order() {
    let mut f = fixture(FieldTable::default(), None);
    let a = &mut f.actor;
    let (gone_flow, gone) = consume(a, 1, "gone", 0, 0);
    drop(gone);
    for seq in 1..=4 {
        publish(a, seq);
    }
    a.end_wakeup();
    assert_eq!(
        gone_flow.load(Ordering::Acquire),
        0,
        "nothing counted as sent"
    );
    // Its channel closes (the connection's ChannelClosed); the next
    // consumer gets every message, in order, none marked redelivered.
    assert!(!a.on_cmd(QueueCmd::ChannelClosed { chan_key: 1 }));
    let (_, mut next) = consume(a, 2, "next", 0, 0);
    a.end_wakeup();
    assert_eq!(
        deliveries(&mut next),
        (1..=4).map(|s| (s, false, None)).collect::<Vec<_>>()
    );
}

#[test]
fn mailbox_messages_stay_small() {
    // Every publish and delivery is moved through a channel slot the size
    // of the largest variant: keep the rare big ones boxed.
    assert!(std::mem::size_of::<QueueCmd>() <= 64, "QueueCmd grew");
    assert!(std::mem::size_of::<ConnEvent>() <= 64, "ConnEvent grew");
}

/// A consumer of another node that its node no longer has (it restarted,
/// or a quorum queue's front registered the consumer again elsewhere): its
/// relay hands back what it was given (`Undelivered`) and closes. The
/// queue must drop that consumer, and the messages must come back
/// uncounted. Before, the queue went on handing such a consumer messages, each
/// bounce counted as a return, until the delivery limit killed them:
/// confirmed messages of a quorum queue were lost so.
#[test]
fn a_consumer_gone_on_its_node_leaves_and_what_it_was_given_comes_back_uncounted() {
    let mut args = FieldTable::default();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    let mut f = fixture(args, None);
    let a = &mut f.actor;
    // Both registrations on one channel with one tag, as when a node
    // registers a consumer again before its old registration is gone.
    let (_, mut ghost) = consume(a, 1, "c", 0, 2);
    let (_, mut live) = consume(a, 1, "c", 0, 2);
    for seq in 1..=4 {
        publish(a, seq);
    }
    a.end_wakeup();
    // Round robin: the ghost was given every other message.
    let given: Vec<u64> = deliveries(&mut ghost).iter().map(|d| d.0).collect();
    assert_eq!(given.len(), 2);
    let taken: Vec<u64> = deliveries(&mut live).iter().map(|d| d.0).collect();
    assert_eq!(taken.len(), 2);
    // The live one's acks free its own prefetch slots (not the ghost's,
    // which sorts first): it gets the next messages.
    let acks = QueueCmd::Ack {
        chan_key: 1,
        seqs: taken.iter().copied().collect(),
    };
    assert!(!a.on_cmd(acks));
    let live_one = a.consumers.iter().find(|c| c.order == 2).expect("live");
    assert_eq!(live_one.unacked, 0);
    let ghost_one = a.consumers.iter().find(|c| c.order == 1).expect("ghost");
    assert_eq!(ghost_one.unacked, 2);
    ghost.close();
    let cmd = QueueCmd::Undelivered {
        chan_key: 1,
        seqs: given.iter().copied().collect(),
    };
    assert!(!a.on_cmd(cmd));
    a.end_wakeup();
    assert_eq!(a.consumers.len(), 1, "the gone consumer left");
    assert_eq!(a.consumers[0].order, 2);
    // The live consumer gets them uncounted (no x-delivery-count), marked
    // redelivered: it was handed later ones meanwhile.
    let back = deliveries(&mut live);
    assert_eq!(
        back,
        given.iter().map(|s| (*s, true, None)).collect::<Vec<_>>()
    );
    // A consumer whose events channel closed leaves at the first delivery
    // that fails, and the others get the messages in the same wake-up.
    let acks = QueueCmd::Ack {
        chan_key: 1,
        seqs: given.iter().copied().collect(),
    };
    assert!(!a.on_cmd(acks));
    let (_, mut other) = consume(a, 3, "d", 0, 0);
    other.close();
    for seq in 5..=6 {
        publish(a, seq);
    }
    a.end_wakeup();
    assert_eq!(deliveries(&mut live).len(), 2);
    assert_eq!(a.ready_count(), 0);
}
