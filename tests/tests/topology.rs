//! Exchanges, queues, bindings and routing.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use std::time::Duration;
use warren_protocol::client::{self, QUEUE_DECLARE_OK};
use warren_protocol::reply::{
    ACCESS_REFUSED, COMMAND_INVALID, NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED,
};
use warren_tests::lapin_util::*;
use warren_tests::raw::Raw;
use warren_tests::{unique, within, TestBroker};

// ------------------------------------------------------------------ helpers

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("exchange.declare {name}: {e}"));
}

async fn passive_exchange(ch: &Channel, name: &str) -> lapin::Result<()> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.bind {queue} {exchange} {key}: {e}"));
}

async fn delete_exchange(ch: &Channel, name: &str) {
    ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");
}

async fn delete_queue(ch: &Channel, name: &str) -> u32 {
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete")
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn lstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Publish each `(key, body)` to `exchange`, then make sure the broker has
/// routed them all before returning.
async fn publish_all(ch: &Channel, exchange: &str, msgs: &[(&str, &str)]) {
    for (key, body) in msgs {
        publish(ch, exchange, key, body.as_bytes()).await;
    }
    sync(ch).await;
}

/// A fresh channel on its own connection whose error events we watch.
async fn open(broker: &TestBroker) -> (lapin::Connection, Channel, Errors) {
    let (c, ch) = broker.channel().await;
    let e = Errors::of(&c);
    (c, ch, e)
}

// ---------------------------------------------------------------- exchanges

#[tokio::test]
async fn predeclared_exchanges_exist() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name} should exist: {e}"));
    }
    // The default exchange routes to every queue by name.
    let q = unique("dflt");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"via default").await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(drain(&ch, &q).await, vec!["via default"]);
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn declare_each_exchange_type() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for kind in [
        ExchangeKind::Direct,
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ] {
        let ch = conn.create_channel().await.expect("channel");
        let name = unique("ex");
        declare_exchange(&ch, &name, kind.clone()).await;
        // Same declaration again is fine.
        declare_exchange(&ch, &name, kind.clone()).await;
        passive_exchange(&ch, &name)
            .await
            .expect("passive declare of an existing exchange");
        delete_exchange(&ch, &name).await;
        // Gone: the passive declare fails and closes this channel.
        assert_code(passive_exchange(&ch, &name).await, NOT_FOUND);
    }
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn declare_all_types_on_one_channel() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let names: Vec<(String, ExchangeKind)> = [
        ExchangeKind::Direct,
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ]
    .into_iter()
    .map(|k| (unique("ex"), k))
    .collect();
    for (n, k) in &names {
        declare_exchange(&ch, n, k.clone()).await;
    }
    for (n, _) in &names {
        passive_exchange(&ch, n).await.expect("exists");
        delete_exchange(&ch, n).await;
    }
    // Deleting something missing succeeds.
    delete_exchange(&ch, &unique("never-declared")).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn unknown_exchange_type_is_503() {
    let broker = TestBroker::start().await;
    let (_conn, ch, mut errors) = open(&broker).await;
    let r = ch
        .exchange_declare(
            unique("ex").as_str().into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, COMMAND_INVALID);
    assert_eq!(errors.next_code().await, COMMAND_INVALID);
    broker.stop().await;
}

#[tokio::test]
async fn exchange_inequivalent_redeclare_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let name = unique("ex");
    let ch = conn.create_channel().await.unwrap();
    declare_exchange(&ch, &name, ExchangeKind::Direct).await;

    // Different type.
    let r = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, PRECONDITION_FAILED);

    // Different durability.
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, PRECONDITION_FAILED);

    // Different auto-delete.
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, PRECONDITION_FAILED);

    // A passive declare ignores the type.
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        name.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare with another type");
    delete_exchange(&ch, &name).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn amq_prefix_is_reserved_for_exchanges() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            unique("amq.mine").as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, ACCESS_REFUSED);
    // Neither the default exchange nor amq.* may be deleted.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.exchange_delete("amq.direct".into(), ExchangeDeleteOptions::default())
            .await,
        ACCESS_REFUSED,
    );
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.exchange_delete("".into(), ExchangeDeleteOptions::default())
            .await,
        ACCESS_REFUSED,
    );
    // And they survived.
    let ch = conn.create_channel().await.unwrap();
    passive_exchange(&ch, "amq.direct")
        .await
        .expect("amq.direct still there");
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn default_exchange_declare_is_403_and_amq_passive_missing_is_404() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    // RabbitMQ refuses even a passive declare of the default exchange.
    let ch = conn.create_channel().await.unwrap();
    assert_code(passive_exchange(&ch, "").await, ACCESS_REFUSED);
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        ACCESS_REFUSED,
    );
    // A passive declare of a missing amq.* name is a plain 404.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        passive_exchange(&ch, &unique("amq.missing")).await,
        NOT_FOUND,
    );
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn default_exchange_cannot_be_bound() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("q");
    declare_queue(&ch, &q).await;
    let r = ch
        .queue_bind(
            q.as_str().into(),
            "".into(),
            "other-key".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, ACCESS_REFUSED);
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_unbind(
            q.as_str().into(),
            "".into(),
            q.as_str().into(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, ACCESS_REFUSED);
    let ch = conn.create_channel().await.unwrap();
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_delete_if_unused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let ex = unique("ex");
    let q = unique("q");
    declare_exchange(&ch, &ex, ExchangeKind::Direct).await;
    declare_queue(&ch, &q).await;
    bind(&ch, &q, &ex, "k").await;
    let r = ch
        .exchange_delete(
            ex.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await;
    assert_code(r, PRECONDITION_FAILED);

    let ch = conn.create_channel().await.unwrap();
    passive_exchange(&ch, &ex)
        .await
        .expect("still exists after refused delete");
    ch.queue_unbind(
        q.as_str().into(),
        ex.as_str().into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");
    ch.exchange_delete(
        ex.as_str().into(),
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    )
    .await
    .expect("delete if_unused without bindings");
    assert_code(passive_exchange(&ch, &ex).await, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn deleting_an_exchange_removes_its_bindings() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let ex = unique("ex");
    let q = unique("q");
    declare_exchange(&ch, &ex, ExchangeKind::Fanout).await;
    declare_queue(&ch, &q).await;
    bind(&ch, &q, &ex, "").await;
    delete_exchange(&ch, &ex).await;
    // Recreate it: the old binding must not come back.
    declare_exchange(&ch, &ex, ExchangeKind::Fanout).await;
    publish_all(&ch, &ex, &[("", "lost")]).await;
    sync(&ch).await;
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);
    delete_exchange(&ch, &ex).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_to_exchange_bindings() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let src = unique("src");
    let dst = unique("dst");
    let q = unique("q");
    declare_exchange(&ch, &src, ExchangeKind::Topic).await;
    declare_exchange(&ch, &dst, ExchangeKind::Direct).await;
    declare_queue(&ch, &q).await;
    bind(&ch, &q, &dst, "x.y").await;
    ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "x.*".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.bind");

    // x.y matches src's binding x.* and then dst's binding x.y.
    // x.z matches x.* but not dst's x.y; y.y matches nothing at src.
    publish_all(&ch, &src, &[("x.y", "1"), ("x.z", "2"), ("y.y", "3")]).await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(drain(&ch, &q).await, vec!["1"]);

    ch.exchange_unbind(
        dst.as_str().into(),
        src.as_str().into(),
        "x.*".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.unbind");
    publish_all(&ch, &src, &[("x.y", "4")]).await;
    // Direct to dst still works.
    publish_all(&ch, &dst, &[("x.y", "5")]).await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(drain(&ch, &q).await, vec!["5"]);

    delete_exchange(&ch, &src).await;
    delete_exchange(&ch, &dst).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_bind_cycle_delivers_once() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let a = unique("a");
    let b = unique("b");
    let q = unique("q");
    declare_exchange(&ch, &a, ExchangeKind::Fanout).await;
    declare_exchange(&ch, &b, ExchangeKind::Fanout).await;
    declare_queue(&ch, &q).await;
    for (d, s) in [(&b, &a), (&a, &b)] {
        ch.exchange_bind(
            d.as_str().into(),
            s.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.bind");
    }
    bind(&ch, &q, &a, "").await;
    bind(&ch, &q, &b, "").await;
    publish_all(&ch, &a, &[("", "once")]).await;
    wait_count(&ch, &q, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(drain(&ch, &q).await, vec!["once"]);
    delete_exchange(&ch, &a).await;
    delete_exchange(&ch, &b).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_bind_missing_is_404() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_bind(
            "amq.fanout".into(),
            unique("missing").as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_bind(
            unique("missing").as_str().into(),
            "amq.fanout".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, NOT_FOUND);
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn alternate_exchange() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let ae = unique("ae");
    let ex = unique("ex");
    let main_q = unique("main");
    let ae_q = unique("unrouted");
    declare_exchange(&ch, &ae, ExchangeKind::Fanout).await;
    ch.exchange_declare(
        ex.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        table(&[("alternate-exchange", lstr(&ae))]),
    )
    .await
    .expect("declare with alternate-exchange");
    declare_queue(&ch, &main_q).await;
    declare_queue(&ch, &ae_q).await;
    bind(&ch, &main_q, &ex, "known").await;
    bind(&ch, &ae_q, &ae, "").await;

    publish_all(&ch, &ex, &[("known", "routed"), ("unknown", "to-ae")]).await;
    wait_count(&ch, &main_q, 1).await;
    wait_count(&ch, &ae_q, 1).await;
    assert_eq!(drain(&ch, &main_q).await, vec!["routed"]);
    assert_eq!(drain(&ch, &ae_q).await, vec!["to-ae"]);

    // A mandatory publish caught by the alternate exchange is not returned.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = ch
        .basic_publish(
            ex.as_str().into(),
            "unknown".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"mandatory-to-ae",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(confirm, lapin::Confirmation::Ack(None));
    wait_count(&ch, &ae_q, 1).await;
    assert_eq!(drain(&ch, &ae_q).await, vec!["mandatory-to-ae"]);

    for e in [&ex, &ae] {
        delete_exchange(&ch, e).await;
    }
    for q in [&main_q, &ae_q] {
        delete_queue(&ch, q).await;
    }
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn internal_exchange_refuses_publishes_but_routes_bindings() {
    let broker = TestBroker::start().await;
    let (conn, ch, mut errors) = open(&broker).await;
    let internal = unique("internal");
    let front = unique("front");
    let q = unique("q");
    ch.exchange_declare(
        internal.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare internal");
    declare_exchange(&ch, &front, ExchangeKind::Fanout).await;
    declare_queue(&ch, &q).await;
    bind(&ch, &q, &internal, "").await;
    ch.exchange_bind(
        internal.as_str().into(),
        front.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.bind");
    // Through the front exchange: routed.
    publish_all(&ch, &front, &[("", "via-front")]).await;
    wait_count(&ch, &q, 1).await;
    assert_eq!(drain(&ch, &q).await, vec!["via-front"]);

    // Directly: 403 closes the channel.
    publish(&ch, &internal, "", b"direct").await;
    assert_eq!(errors.next_code().await, ACCESS_REFUSED);
    let ch = conn.create_channel().await.unwrap();
    sync(&ch).await;
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);

    delete_exchange(&ch, &front).await;
    delete_exchange(&ch, &internal).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn publish_to_missing_exchange_is_404() {
    let broker = TestBroker::start().await;
    let (conn, ch, mut errors) = open(&broker).await;
    publish(&ch, &unique("missing"), "k", b"x").await;
    assert_eq!(errors.next_code().await, NOT_FOUND);
    let ch2 = conn.create_channel().await.unwrap();
    sync(&ch2).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

// ------------------------------------------------------------------ routing

/// Declare queues, bind each with its keys (or header tables), publish, and
/// return what each queue received, in order.
struct Fixture {
    conn: lapin::Connection,
    ch: Channel,
    exchange: String,
    queues: Vec<String>,
}

impl Fixture {
    async fn new(broker: &TestBroker, kind: ExchangeKind, nqueues: usize) -> Fixture {
        let (conn, ch) = broker.channel().await;
        let exchange = unique("route");
        declare_exchange(&ch, &exchange, kind).await;
        let mut queues = Vec::new();
        for i in 0..nqueues {
            let q = unique(&format!("rq{i}"));
            declare_queue(&ch, &q).await;
            queues.push(q);
        }
        Fixture {
            conn,
            ch,
            exchange,
            queues,
        }
    }

    async fn bind(&self, i: usize, key: &str) {
        bind(&self.ch, &self.queues[i], &self.exchange, key).await;
    }

    async fn bind_args(&self, i: usize, args: FieldTable) {
        self.ch
            .queue_bind(
                self.queues[i].as_str().into(),
                self.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .expect("queue.bind with arguments");
    }

    /// Everything each queue holds once routing is done.
    async fn contents(&self) -> Vec<Vec<String>> {
        sync(&self.ch).await;
        let mut out = Vec::new();
        for q in &self.queues {
            out.push(drain(&self.ch, q).await);
        }
        out
    }

    async fn done(self) {
        delete_exchange(&self.ch, &self.exchange).await;
        for q in &self.queues {
            delete_queue(&self.ch, q).await;
        }
        self.conn.close(200, "bye".into()).await.expect("close");
    }
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn direct_routing() {
    let broker = TestBroker::start().await;
    let f = Fixture::new(&broker, ExchangeKind::Direct, 3).await;
    f.bind(0, "red").await;
    f.bind(1, "green").await;
    f.bind(1, "red").await;
    f.bind(2, "").await;
    publish_all(
        &f.ch,
        &f.exchange,
        &[
            ("red", "r"),
            ("green", "g"),
            ("blue", "b"),
            ("", "empty"),
            ("Red", "case"),
        ],
    )
    .await;
    let got = f.contents().await;
    // Queue 1 is bound twice but gets one copy of "r".
    assert_eq!(got, vec![v(&["r"]), v(&["r", "g"]), v(&["empty"])]);
    f.done().await;
    broker.stop().await;
}

#[tokio::test]
async fn fanout_routing_ignores_keys() {
    let broker = TestBroker::start().await;
    let f = Fixture::new(&broker, ExchangeKind::Fanout, 3).await;
    f.bind(0, "").await;
    f.bind(1, "whatever").await;
    f.bind(1, "other").await;
    publish_all(&f.ch, &f.exchange, &[("a", "1"), ("", "2")]).await;
    let got = f.contents().await;
    assert_eq!(got, vec![v(&["1", "2"]), v(&["1", "2"]), v(&[])]);
    f.done().await;
    broker.stop().await;
}

#[tokio::test]
async fn topic_routing() {
    let broker = TestBroker::start().await;
    let patterns = ["a.*.c", "a.#", "#", "a.#.c", "*.b.*", "#.c", "a.b", "*"];
    let f = Fixture::new(&broker, ExchangeKind::Topic, patterns.len()).await;
    for (i, p) in patterns.iter().enumerate() {
        f.bind(i, p).await;
    }
    let keys = [
        "a", "a.c", "a.b.c", "a.b.b.c", "a.b", "x.b.y", "c", "b.c", "a.b.c.d", "", "a..c",
    ];
    let msgs: Vec<(&str, &str)> = keys.iter().map(|k| (*k, *k)).collect();
    publish_all(&f.ch, &f.exchange, &msgs).await;
    let got = f.contents().await;
    let expected = [
        // a.*.c: exactly one word between (an empty word counts)
        v(&["a.b.c", "a..c"]),
        // a.#: "a" followed by zero or more words
        v(&["a", "a.c", "a.b.c", "a.b.b.c", "a.b", "a.b.c.d", "a..c"]),
        // #: everything, even the empty key
        v(&keys),
        // a.#.c: zero or more words between
        v(&["a.c", "a.b.c", "a.b.b.c", "a..c"]),
        // *.b.*
        v(&["a.b.c", "x.b.y"]),
        // #.c
        v(&["a.c", "a.b.c", "a.b.b.c", "c", "b.c", "a..c"]),
        // a.b: literal
        v(&["a.b"]),
        // *: exactly one word
        v(&["a", "c"]),
    ];
    for (i, p) in patterns.iter().enumerate() {
        assert_eq!(got[i], expected[i], "pattern {p:?}");
    }
    f.done().await;
    broker.stop().await;
}

#[tokio::test]
async fn topic_unbind_stops_routing() {
    let broker = TestBroker::start().await;
    let f = Fixture::new(&broker, ExchangeKind::Topic, 1).await;
    f.bind(0, "a.#").await;
    f.bind(0, "#.z").await;
    publish_all(&f.ch, &f.exchange, &[("a.z", "1")]).await;
    f.ch.queue_unbind(
        f.queues[0].as_str().into(),
        f.exchange.as_str().into(),
        "a.#".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");
    publish_all(&f.ch, &f.exchange, &[("a.y", "2"), ("b.z", "3")]).await;
    assert_eq!(f.contents().await, vec![v(&["1", "3"])]);
    f.done().await;
    broker.stop().await;
}

fn hdr_props(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
    BasicProperties::default().with_headers(table(pairs))
}

#[tokio::test]
async fn headers_routing_all_and_any() {
    let broker = TestBroker::start().await;
    let f = Fixture::new(&broker, ExchangeKind::Headers, 3).await;
    let all = table(&[
        ("x-match", lstr("all")),
        ("color", lstr("red")),
        ("size", AMQPValue::LongInt(3)),
    ]);
    let any = table(&[
        ("x-match", lstr("any")),
        ("color", lstr("red")),
        ("size", AMQPValue::LongInt(3)),
    ]);
    // No x-match: defaults to all.
    let dflt = table(&[("color", lstr("red")), ("size", AMQPValue::LongInt(3))]);
    f.bind_args(0, all).await;
    f.bind_args(1, any).await;
    f.bind_args(2, dflt).await;

    let cases: Vec<(&str, BasicProperties)> = vec![
        (
            "both",
            hdr_props(&[("color", lstr("red")), ("size", AMQPValue::LongInt(3))]),
        ),
        (
            "both+extra",
            hdr_props(&[
                ("color", lstr("red")),
                ("size", AMQPValue::LongInt(3)),
                ("z", lstr("q")),
            ]),
        ),
        ("color-only", hdr_props(&[("color", lstr("red"))])),
        ("size-only", hdr_props(&[("size", AMQPValue::LongInt(3))])),
        (
            "wrong-values",
            hdr_props(&[("color", lstr("blue")), ("size", AMQPValue::LongInt(4))]),
        ),
        (
            "one-wrong",
            hdr_props(&[("color", lstr("red")), ("size", AMQPValue::LongInt(4))]),
        ),
        ("no-headers", BasicProperties::default()),
    ];
    for (body, props) in &cases {
        f.ch.basic_publish(
            f.exchange.as_str().into(),
            "ignored".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props.clone(),
        )
        .await
        .expect("publish");
    }
    let got = f.contents().await;
    assert_eq!(got[0], v(&["both", "both+extra"]), "x-match all");
    assert_eq!(
        got[1],
        v(&["both", "both+extra", "color-only", "size-only", "one-wrong"]),
        "x-match any"
    );
    assert_eq!(got[2], v(&["both", "both+extra"]), "default x-match");
    f.done().await;
    broker.stop().await;
}

// ------------------------------------------------------------------- queues

#[tokio::test]
async fn queue_declare_ok_counts() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("counts");
    let decl = declare_queue(&ch, &q).await;
    assert_eq!(decl.name().as_str(), q);
    assert_eq!((decl.message_count(), decl.consumer_count()), (0, 0));
    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    wait_count(&ch, &q, 3).await;
    let decl = declare_queue(&ch, &q).await;
    assert_eq!((decl.message_count(), decl.consumer_count()), (3, 0));

    // A consumer holding one unacked message: 2 ready, 1 consumer.
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"m0");
    let decl = passive_queue(&ch, &q).await.unwrap();
    assert_eq!((decl.message_count(), decl.consumer_count()), (2, 1));
    assert_eq!(delete_queue(&ch, &q).await, 2);
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn server_named_queue() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let a = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let b = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(a.name().as_str().starts_with("amq.gen-"), "{}", a.name());
    assert!(b.name().as_str().starts_with("amq.gen-"), "{}", b.name());
    assert_ne!(a.name(), b.name());
    passive_queue(&ch, a.name().as_str())
        .await
        .expect("server-named queue exists");
    publish(&ch, "", a.name().as_str(), b"to-gen").await;
    wait_count(&ch, a.name().as_str(), 1).await;
    assert_eq!(drain(&ch, a.name().as_str()).await, vec!["to-gen"]);
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn queue_passive_missing_is_404() {
    let broker = TestBroker::start().await;
    let (_conn, ch, mut errors) = open(&broker).await;
    assert_code(passive_queue(&ch, &unique("missing")).await, NOT_FOUND);
    assert_eq!(errors.next_code().await, NOT_FOUND);
    broker.stop().await;
}

#[tokio::test]
async fn queue_inequivalent_redeclare_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = unique("ineq");
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, &q).await;
    let variants: Vec<(QueueDeclareOptions, FieldTable)> = vec![
        (
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
        (
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
        (
            QueueDeclareOptions::default(),
            table(&[("x-max-length", AMQPValue::LongInt(10))]),
        ),
    ];
    for (opts, args) in variants {
        let ch = conn.create_channel().await.unwrap();
        assert_code(
            ch.queue_declare(q.as_str().into(), opts, args.clone())
                .await,
            PRECONDITION_FAILED,
        );
    }
    // A passive declare ignores the flags; the original one still matches.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive ignores durable");
    declare_queue(&ch, &q).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn queue_amq_prefix_is_403() {
    let broker = TestBroker::start().await;
    let (_conn, ch, mut errors) = open(&broker).await;
    assert_code(
        ch.queue_declare(
            unique("amq.q").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        ACCESS_REFUSED,
    );
    assert_eq!(errors.next_code().await, ACCESS_REFUSED);
    broker.stop().await;
}

#[tokio::test]
async fn queue_bind_unbind() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("bq");
    declare_queue(&ch, &q).await;
    bind(&ch, &q, "amq.direct", &q).await;
    // Binding twice is idempotent.
    bind(&ch, &q, "amq.direct", &q).await;
    publish_all(&ch, "amq.direct", &[(&q, "bound")]).await;
    ch.queue_unbind(
        q.as_str().into(),
        "amq.direct".into(),
        q.as_str().into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");
    publish_all(&ch, "amq.direct", &[(&q, "unbound")]).await;
    assert_eq!(drain(&ch, &q).await, vec!["bound"]);
    // Unbinding what is not bound succeeds.
    ch.queue_unbind(
        q.as_str().into(),
        "amq.direct".into(),
        "never".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind of a missing binding");

    // Missing exchange / missing queue: 404.
    let r = ch
        .queue_bind(
            q.as_str().into(),
            unique("nx").as_str().into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_bind(
            unique("nq").as_str().into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn queue_purge_returns_count() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("purge");
    declare_queue(&ch, &q).await;
    for i in 0..5 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    wait_count(&ch, &q, 5).await;
    assert_eq!(
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        5
    );
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);
    assert_eq!(
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        0
    );
    // Purge leaves unacked messages alone.
    publish(&ch, "", &q, b"held").await;
    wait_count(&ch, &q, 1).await;
    let held = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        0
    );
    held.delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_count(&ch, &q, 1).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn queue_delete_conditions_and_count() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = unique("del");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"1").await;
    publish(&ch, "", &q, b"2").await;
    wait_count(&ch, &q, 2).await;

    assert_code(
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await,
        PRECONDITION_FAILED,
    );

    let ch = conn.create_channel().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _consumer = cch
        .basic_consume(
            q.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_code(
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await,
        PRECONDITION_FAILED,
    );
    let ch = conn.create_channel().await.unwrap();
    cch.basic_cancel("holder".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // The one delivered-but-unacked message is still in the queue.
    cch.close(200, "bye".into()).await.unwrap();
    wait_count(&ch, &q, 2).await;
    assert_eq!(
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            }
        )
        .await
        .unwrap(),
        2
    );
    assert_code(passive_queue(&ch, &q).await, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    // Deleting a missing queue succeeds with 0.
    assert_eq!(delete_queue(&ch, &unique("never")).await, 0);
    // if_empty on an empty queue works.
    let q2 = unique("del2");
    declare_queue(&ch, &q2).await;
    assert_eq!(
        ch.queue_delete(
            q2.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            }
        )
        .await
        .unwrap(),
        0
    );
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn queue_delete_removes_bindings() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("qdb");
    declare_queue(&ch, &q).await;
    bind(&ch, &q, "amq.fanout", "").await;
    delete_queue(&ch, &q).await;
    declare_queue(&ch, &q).await;
    publish_all(&ch, "amq.fanout", &[("", "x")]).await;
    assert_eq!(passive_queue(&ch, &q).await.unwrap().message_count(), 0);
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn exclusive_queue_is_locked_to_its_connection() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let och = owner.create_channel().await.unwrap();
    let q = unique("excl");
    och.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Another channel of the same connection may use it.
    let och2 = owner.create_channel().await.unwrap();
    publish(&och2, "", &q, b"mine").await;
    wait_count(&och2, &q, 1).await;

    let other = broker.connect().await;
    let ch = other.create_channel().await.unwrap();
    assert_code(passive_queue(&ch, &q).await, RESOURCE_LOCKED);
    let ch = other.create_channel().await.unwrap();
    assert_code(
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
        RESOURCE_LOCKED,
    );
    let ch = other.create_channel().await.unwrap();
    assert_code(
        ch.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        RESOURCE_LOCKED,
    );
    let ch = other.create_channel().await.unwrap();
    assert_code(
        ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await,
        RESOURCE_LOCKED,
    );
    let ch = other.create_channel().await.unwrap();
    assert_code(
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await,
        RESOURCE_LOCKED,
    );
    let ch = other.create_channel().await.unwrap();
    assert_code(
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await,
        RESOURCE_LOCKED,
    );

    // Closing the owner deletes the queue.
    owner.close(200, "bye".into()).await.unwrap();
    within("the exclusive queue to go", async {
        loop {
            let ch = other.create_channel().await.unwrap();
            match passive_queue(&ch, &q).await {
                Err(e) if code(&e) == Some(NOT_FOUND) => return,
                Err(e) if code(&e) == Some(RESOURCE_LOCKED) => {}
                Ok(_) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    other.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn exclusive_queue_goes_when_connection_drops() {
    // Not a clean close: the TCP connection just goes away.
    let broker = TestBroker::start().await;
    let q = unique("excl-drop");
    {
        let mut raw = Raw::open(&broker).await;
        raw.open_channel(1).await;
        raw.send_with(|b| {
            client::queue_declare_with(b, 1, &q, client::EXCLUSIVE, &0u32.to_be_bytes())
        })
        .await;
        raw.expect_method(1, QUEUE_DECLARE_OK).await;
        drop(raw);
    }
    let other = broker.connect().await;
    within("the exclusive queue to go", async {
        loop {
            let ch = other.create_channel().await.unwrap();
            match passive_queue(&ch, &q).await {
                Err(e) if code(&e) == Some(NOT_FOUND) => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    other.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn auto_delete_queue_goes_after_last_consumer() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("autodel");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Never consumed: stays.
    tokio::time::sleep(Duration::from_millis(100)).await;
    passive_queue(&ch, &q)
        .await
        .expect("auto-delete queue stays until a consumer came and went");

    let _c1 = ch
        .basic_consume(
            q.as_str().into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _c2 = ch
        .basic_consume(
            q.as_str().into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_cancel("c1".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let decl = passive_queue(&ch, &q).await.expect("one consumer left");
    assert_eq!(decl.consumer_count(), 1);
    ch.basic_cancel("c2".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    within("the auto-delete queue to go", async {
        loop {
            let ch = conn.create_channel().await.unwrap();
            match passive_queue(&ch, &q).await {
                Err(e) if code(&e) == Some(NOT_FOUND) => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn auto_delete_exchange_goes_with_its_last_binding() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let ex = unique("adx");
    let q = unique("adq");
    ch.exchange_declare(
        ex.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Never bound: it stays.
    passive_exchange(&ch, &ex)
        .await
        .expect("unbound auto-delete exchange stays");
    declare_queue(&ch, &q).await;
    bind(&ch, &q, &ex, "a").await;
    bind(&ch, &q, &ex, "b").await;
    ch.queue_unbind(
        q.as_str().into(),
        ex.as_str().into(),
        "a".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    passive_exchange(&ch, &ex).await.expect("one binding left");
    ch.queue_unbind(
        q.as_str().into(),
        ex.as_str().into(),
        "b".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_code(passive_exchange(&ch, &ex).await, NOT_FOUND);
    let ch = conn.create_channel().await.unwrap();
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn empty_queue_name_means_the_last_declared_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    // Nothing declared yet on this channel: 404.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.basic_get("".into(), BasicGetOptions::default()).await,
        NOT_FOUND,
    );

    let ch = conn.create_channel().await.unwrap();
    let decl = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = decl.name().to_string();
    ch.queue_bind(
        "".into(),
        "amq.direct".into(),
        "to-last".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_all(&ch, "amq.direct", &[("to-last", "one"), ("to-last", "two")]).await;
    wait_count(&ch, &name, 2).await;
    let m = ch
        .basic_get("".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(m.delivery.data, b"one");
    assert_eq!(
        ch.queue_purge("".into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ch.queue_delete("".into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        0
    );
    assert_code(passive_queue(&ch, &name).await, NOT_FOUND);
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

#[tokio::test]
async fn bindings_with_different_arguments_are_distinct() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let ex = unique("hx");
    let q = unique("hq");
    declare_exchange(&ch, &ex, ExchangeKind::Headers).await;
    declare_queue(&ch, &q).await;
    let a = table(&[("k", lstr("a"))]);
    let b = table(&[("k", lstr("b"))]);
    for args in [&a, &b] {
        ch.queue_bind(
            q.as_str().into(),
            ex.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            args.clone(),
        )
        .await
        .unwrap();
    }
    // Removing the "a" binding leaves "b" in place.
    ch.queue_unbind(q.as_str().into(), ex.as_str().into(), "".into(), a.clone())
        .await
        .unwrap();
    for v in ["a", "b"] {
        ch.basic_publish(
            ex.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            v.as_bytes(),
            hdr_props(&[("k", lstr(v))]),
        )
        .await
        .unwrap();
    }
    sync(&ch).await;
    assert_eq!(drain(&ch, &q).await, vec!["b"]);
    delete_exchange(&ch, &ex).await;
    delete_queue(&ch, &q).await;
    conn.close(200, "bye".into()).await.expect("close");
    broker.stop().await;
}

/// `x-consistent-hash`: each message goes to exactly one queue, the same
/// one for the same routing key; a weight that is not a positive integer is
/// 406. (RabbitMQ needs its bundled plugin for this type: skipped when the
/// broker does not know it.)
#[tokio::test]
async fn consistent_hash_sends_a_key_to_one_queue_always() {
    let broker = TestBroker::start().await;
    let (_conn, ch) = broker.channel().await;
    let x = unique("chx");
    let declared = ch
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    if declared.is_err() && !broker.is_warren() {
        return; // the reference without the plugin
    }
    declared.expect("x-consistent-hash declared");
    let queues: Vec<String> = (0..3).map(|_| unique("chq")).collect();
    for q in &queues {
        declare_queue(&ch, q).await;
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    for round in 0..2 {
        for k in 0..100 {
            let body = format!("{k}/{round}");
            publish(&ch, &x, &format!("account-{k}"), body.as_bytes()).await;
        }
    }
    sync(&ch).await;
    let mut home = std::collections::HashMap::new();
    let mut total = 0;
    for q in &queues {
        let got = drain(&ch, q).await;
        assert!(!got.is_empty(), "100 keys reach every queue");
        for body in got {
            total += 1;
            let key = body.split('/').next().unwrap().to_owned();
            let first = home.entry(key).or_insert_with(|| q.clone());
            assert_eq!(first, q, "both copies of a key in one queue");
        }
    }
    assert_eq!(total, 200, "each message in exactly one queue");
    let q = &queues[0];
    let err = ch
        .queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "heavy".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(PRECONDITION_FAILED), "{err}");
    broker.stop().await;
}

/// `x-delayed-message`: more persistent delayed messages than the
/// scheduler keeps in memory (its window is 10,000), published in an order
/// unrelated to their due times: every one arrives once, in due order, none
/// before its time (the window trims and reads back from the store while
/// messages keep coming).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_beyond_the_window_arrive_in_due_order() {
    let broker = TestBroker::start().await;
    if !broker.is_warren() {
        return; // the plugin is not in the reference
    }
    let (_conn, ch) = broker.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let x = unique("delayed");
    let mut a = FieldTable::default();
    a.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        a,
    )
    .await
    .unwrap();
    let q = unique("delayed-q");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    const N: u64 = 25_000;
    let start = std::time::Instant::now();
    let mut confirms = Vec::with_capacity(N as usize);
    for i in 0..N {
        // Due (ms after start) scrambled against publish order, over 2 s
        // from 5 s on; the delay is what is left of it when published.
        let due = 5_000 + (i * 7_919 % N) * 2_000 / N;
        let delay = due.saturating_sub(start.elapsed().as_millis() as u64);
        let mut h = FieldTable::default();
        h.insert("x-delay".into(), AMQPValue::LongLongInt(delay as i64));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h);
        let c = ch
            .basic_publish(
                x.as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                &due.to_be_bytes(),
                props,
            )
            .await
            .unwrap();
        confirms.push(c);
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    let published = start.elapsed();
    assert!(
        published < Duration::from_millis(4_500),
        "publishing took {published:?}: the test's timing assumption fails"
    );
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The broker's due time is its receipt plus the delay: never before
    // the due time computed here, and later by at most the publish's
    // latency. So arrivals follow these due times, within that latency
    // (a scheduler that sent them in publish order would be up to 2 s off).
    const LATENCY_MS: u64 = 300;
    let mut latest = 0u64;
    for n in 0..N {
        let d = within("the next delayed message", next_delivery(&mut consumer)).await;
        let due = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        assert!(
            due + LATENCY_MS >= latest,
            "message {n}: due at {due} ms came after one due at {latest} ms"
        );
        let since = start.elapsed().as_millis() as u64;
        assert!(
            since + 2 >= due,
            "message {n} came {since} ms in, due at {due}"
        );
        latest = latest.max(due);
    }
    assert_no_delivery(&mut consumer, Duration::from_millis(200)).await;
    broker.stop().await;
}
