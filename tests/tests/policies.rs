//! Policies and operator policies applied live: a policy set while a queue
//! holds messages takes effect at once (a lower max-length drops heads),
//! clearing it lifts it, queue arguments and operator policies combine as
//! RabbitMQ combines them (the smallest limit wins), a dead-letter exchange
//! and an alternate exchange can come from a policy, and of two matching
//! policies the higher priority applies. Policies are set in-process (the
//! broker handle), so these run against Warren only.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Channel;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use warren_broker::broker::Broker;
use warren_broker::policy::Policy;
use warren_tests::lapin_util::*;
use warren_tests::{unique, within, TestBroker};

async fn set(b: &Arc<Broker>, name: &str, pattern: &str, apply: &str, prio: i64, def: Value) {
    set_kind(b, name, pattern, apply, prio, def, false).await
}

async fn set_kind(
    b: &Arc<Broker>,
    name: &str,
    pattern: &str,
    apply: &str,
    prio: i64,
    def: Value,
    operator: bool,
) {
    let def = def.as_object().expect("a definition object").clone();
    let p = Policy::new("/", name, pattern, apply, prio, def, operator).expect("valid policy");
    b.set_policy(p, operator).await.expect("policy set");
}

async fn fill(ch: &Channel, q: &str, n: usize) {
    for i in 0..n {
        publish(ch, "", q, format!("m{i}").as_bytes()).await;
    }
    sync(ch).await;
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

#[tokio::test]
async fn a_max_length_policy_applies_to_a_full_queue_at_once_and_clearing_it_lifts_it() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let (_c, ch) = b.channel().await;
    let q = unique("pol-len");
    declare_queue(&ch, &q).await;
    fill(&ch, &q, 10).await;
    set(
        &broker,
        "len",
        &format!("^{q}$"),
        "queues",
        0,
        json!({"max-length": 3}),
    )
    .await;
    // The oldest go first.
    wait_count(&ch, &q, 3).await;
    fill(&ch, &q, 2).await;
    wait_count(&ch, &q, 3).await;
    assert_eq!(drain(&ch, &q).await, ["m9", "m0", "m1"]);
    broker.clear_policy("/", "len", false).await.unwrap();
    fill(&ch, &q, 5).await;
    wait_count(&ch, &q, 5).await;
    assert!(broker
        .clear_policy("/", "len", false)
        .await
        .unwrap_err()
        .contains("does not exist"));
}

#[tokio::test]
async fn the_smallest_limit_of_argument_policy_and_operator_policy_wins() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let (_c, ch) = b.channel().await;
    let (qa, qb) = (unique("pol-min-a"), unique("pol-min-b"));
    // Argument 2 against policy 4: 2.
    ch.queue_declare(
        qa.as_str().into(),
        QueueDeclareOptions::default(),
        args(&[("x-max-length", AMQPValue::LongInt(2))]),
    )
    .await
    .unwrap();
    declare_queue(&ch, &qb).await;
    set(
        &broker,
        "four",
        "^pol-min-",
        "queues",
        0,
        json!({"max-length": 4}),
    )
    .await;
    fill(&ch, &qa, 6).await;
    fill(&ch, &qb, 6).await;
    wait_count(&ch, &qa, 2).await;
    wait_count(&ch, &qb, 4).await;
    // An operator policy of 3: stricter than the policy, not the argument.
    set_kind(
        &broker,
        "op",
        "^pol-min-",
        "queues",
        0,
        json!({"max-length": 3}),
        true,
    )
    .await;
    wait_count(&ch, &qb, 3).await;
    fill(&ch, &qa, 6).await;
    wait_count(&ch, &qa, 2).await;
    // Clearing the policy leaves the operator policy in force.
    broker.clear_policy("/", "four", false).await.unwrap();
    fill(&ch, &qb, 6).await;
    wait_count(&ch, &qb, 3).await;
    broker.clear_policy("/", "op", true).await.unwrap();
    fill(&ch, &qb, 2).await;
    wait_count(&ch, &qb, 5).await;
}

#[tokio::test]
async fn a_policy_can_give_a_queue_its_ttl_and_dead_letter_exchange() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let (_c, ch) = b.channel().await;
    let (q, dlq) = (unique("pol-dl"), unique("pol-dlq"));
    declare_queue(&ch, &q).await;
    declare_queue(&ch, &dlq).await;
    set(
        &broker,
        "dl",
        &format!("^{q}$"),
        "queues",
        0,
        json!({"message-ttl": 50, "dead-letter-exchange": "", "dead-letter-routing-key": dlq}),
    )
    .await;
    publish(&ch, "", &q, b"late").await;
    wait_count(&ch, &dlq, 1).await;
    let m = ch
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(m.delivery.data, b"late");
    let death = m.delivery.properties.headers().as_ref().unwrap().inner()["x-death"].clone();
    let AMQPValue::FieldArray(deaths) = death else {
        panic!("x-death is a list")
    };
    let AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
        panic!("x-death entries are tables")
    };
    assert_eq!(
        first.inner()["reason"],
        AMQPValue::LongString(LongString::from("expired"))
    );
}

#[tokio::test]
async fn an_alternate_exchange_from_a_policy_catches_unroutable_messages_until_cleared() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let (_c, ch) = b.channel().await;
    let (x, ae, caught) = (unique("pol-x"), unique("pol-ae"), unique("pol-caught"));
    for (name, kind) in [
        (&x, lapin::ExchangeKind::Direct),
        (&ae, lapin::ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(
            name.as_str().into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    declare_queue(&ch, &caught).await;
    ch.queue_bind(
        caught.as_str().into(),
        ae.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A policy for queues only does not touch the exchange.
    set(
        &broker,
        "q-only",
        &format!("^{x}$"),
        "queues",
        5,
        json!({"alternate-exchange": ae}),
    )
    .await;
    publish(&ch, &x, "nowhere", b"1").await;
    sync(&ch).await;
    set(
        &broker,
        "ae",
        &format!("^{x}$"),
        "exchanges",
        0,
        json!({"alternate-exchange": ae}),
    )
    .await;
    publish(&ch, &x, "nowhere", b"2").await;
    wait_count(&ch, &caught, 1).await;
    broker.clear_policy("/", "ae", false).await.unwrap();
    publish(&ch, &x, "nowhere", b"3").await;
    sync(&ch).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(drain(&ch, &caught).await, ["2"]);
}

#[tokio::test]
async fn of_two_matching_policies_the_higher_priority_applies() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let (_c, ch) = b.channel().await;
    let q = unique("pol-prio");
    declare_queue(&ch, &q).await;
    set(
        &broker,
        "wide",
        "^pol-prio",
        "all",
        1,
        json!({"max-length": 1}),
    )
    .await;
    set(
        &broker,
        "narrow",
        &format!("^{q}$"),
        "queues",
        7,
        json!({"max-length": 4}),
    )
    .await;
    fill(&ch, &q, 6).await;
    wait_count(&ch, &q, 4).await;
    // The lower-priority one takes over when the other goes.
    broker.clear_policy("/", "narrow", false).await.unwrap();
    wait_count(&ch, &q, 1).await;
    within("clean up", broker.clear_policy("/", "wide", false))
        .await
        .unwrap();
}

#[tokio::test]
async fn policies_on_a_missing_vhost_or_with_bad_values_are_refused() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else { return };
    let def = json!({"max-length": 1}).as_object().unwrap().clone();
    let p = Policy::new("nope", "p", ".*", "queues", 0, def, false).unwrap();
    assert_eq!(
        broker.set_policy(p, false).await.unwrap_err(),
        "vhost 'nope' does not exist"
    );
    let bad = json!({"max-length": -1}).as_object().unwrap().clone();
    assert!(Policy::new("/", "p", ".*", "queues", 0, bad, false)
        .unwrap_err()
        .contains("-1 is not a valid maximum length"));
    assert!(broker.access.snapshot().policies.is_empty());
}
