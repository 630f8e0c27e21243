//! Publisher confirms and transactions.

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use warren_protocol::client::{
    self, BASIC_ACK, CONFIRM_SELECT_OK, QUEUE_DECLARE_OK, QUEUE_DELETE_OK,
};
use warren_protocol::frame::BODY;
use warren_protocol::reply::{NOT_FOUND, PRECONDITION_FAILED};
use warren_tests::lapin_util::*;
use warren_tests::raw::{frame, Raw};
use warren_tests::{unique, within, TestBroker};

async fn passive_count(ch: &Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

async fn delete(ch: &Channel, q: &str) {
    ch.queue_delete(q.into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
}

// ----------------------------------------------------------------- confirms

#[tokio::test]
async fn each_publish_is_acked() {
    let broker = TestBroker::start().await;
    let (conn, ch) = broker.channel().await;
    let q = unique("confirm");
    declare_queue(&ch, &q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert!(ch.status().confirm());
    for i in 0..5 {
        let c = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(c, Confirmation::Ack(None), "publish {i}");
    }
    // Unroutable but not mandatory: still acked.
    let c = ch
        .basic_publish(
            "amq.direct".into(),
            unique("nobody").as_str().into(),
            BasicPublishOptions::default(),
            b"void",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(c, Confirmation::Ack(None));
    assert_eq!(passive_count(&ch, &q).await, 5);
    // Selecting again is harmless.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    delete(&ch, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_publishes_are_all_acked() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let setup = conn.create_channel().await.unwrap();
    let q = unique("burst");
    declare_queue(&setup, &q).await;
    const CHANNELS: usize = 4;
    const PER_CHANNEL: usize = 500;
    let mut tasks = Vec::new();
    for c in 0..CHANNELS {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut confirms = Vec::with_capacity(PER_CHANNEL);
            for i in 0..PER_CHANNEL {
                let body = format!("{c}-{i}");
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish"),
                );
            }
            let mut acked = 0;
            for confirm in confirms {
                if confirm.await.expect("confirm") == Confirmation::Ack(None) {
                    acked += 1;
                }
            }
            assert!(ch
                .wait_for_confirms()
                .await
                .expect("wait_for_confirms")
                .is_empty());
            acked
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += within("all confirms", t).await.expect("publisher task");
    }
    assert_eq!(total, CHANNELS * PER_CHANNEL);
    assert_eq!(
        passive_count(&setup, &q).await,
        (CHANNELS * PER_CHANNEL) as u32
    );
    // Per channel, messages are enqueued in publish order.
    let mut last = [None::<usize>; CHANNELS];
    while let Some(b) = get_body(&setup, &q).await {
        let s = String::from_utf8(b).unwrap();
        let (c, i) = s.split_once('-').unwrap();
        let (c, i): (usize, usize) = (c.parse().unwrap(), i.parse().unwrap());
        assert_eq!(last[c].map_or(0, |l| l + 1), i, "channel {c} out of order");
        last[c] = Some(i);
    }
    delete(&setup, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn raw_confirm_tags_count_from_one() {
    let broker = TestBroker::start().await;
    let q = unique("rawconfirm");
    let mut raw = Raw::open(&broker).await;
    raw.open_channel(1).await;
    raw.send_with(|b| client::confirm_select(b, 1)).await;
    raw.expect_method(1, CONFIRM_SELECT_OK).await;
    raw.send_with(|b| client::queue_declare(b, 1, &q, false))
        .await;
    raw.expect_method(1, QUEUE_DECLARE_OK).await;
    for _ in 0..3 {
        raw.send_with(|b| client::publish(b, 1, "", &q)).await;
        raw.send_with(|b| client::content_header(b, 1, 2, false))
            .await;
        raw.send(&frame(BODY, 1, b"hi")).await;
    }
    // Acks may be batched with `multiple`, but must cover 1..=3 exactly once.
    let mut confirmed = 0u64;
    while confirmed < 3 {
        let f = raw.expect_method(1, BASIC_ACK).await;
        let p = &f.payload[4..];
        let tag = u64::from_be_bytes(p[0..8].try_into().unwrap());
        let multiple = p[8] & 1 == 1;
        if multiple {
            assert!(
                tag > confirmed,
                "multiple ack {tag} does not advance past {confirmed}"
            );
        } else {
            assert_eq!(tag, confirmed + 1, "single ack out of sequence");
        }
        confirmed = tag;
    }
    assert_eq!(confirmed, 3);
    raw.send_with(|b| client::queue_delete(b, 1, &q)).await;
    let ok = raw.expect_method(1, QUEUE_DELETE_OK).await;
    assert_eq!(u32::from_be_bytes(ok.payload[4..8].try_into().unwrap()), 3);
    raw.close().await;
    broker.stop().await;
}

#[tokio::test]
async fn confirm_channel_error_fails_pending_confirms() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut errors = Errors::of(&conn);
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            unique("missing-ex").as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert_eq!(errors.next_code().await, NOT_FOUND);
    let r = within("the confirm to fail", confirm).await;
    assert!(
        r.is_err(),
        "confirm of a publish that closed the channel: {r:?}"
    );
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

// ------------------------------------------------------------- transactions

#[tokio::test]
async fn tx_commit_publishes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = unique("txc");
    declare_queue(&observer, &q).await;
    ch.tx_select().await.unwrap();
    for i in 0..3 {
        publish(&ch, "", &q, format!("t{i}").as_bytes()).await;
    }
    sync(&ch).await;
    assert_eq!(
        passive_count(&observer, &q).await,
        0,
        "uncommitted publishes are invisible"
    );
    ch.tx_commit().await.unwrap();
    assert_eq!(passive_count(&observer, &q).await, 3);
    assert_eq!(drain(&observer, &q).await, vec!["t0", "t1", "t2"]);
    // The channel stays transactional: the next batch needs its own commit.
    publish(&ch, "", &q, b"t3").await;
    sync(&ch).await;
    assert_eq!(passive_count(&observer, &q).await, 0);
    ch.tx_commit().await.unwrap();
    assert_eq!(passive_count(&observer, &q).await, 1);
    // An empty commit is fine.
    ch.tx_commit().await.unwrap();
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn tx_rollback_discards_publishes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = unique("txr");
    declare_queue(&observer, &q).await;
    ch.tx_select().await.unwrap();
    publish(&ch, "", &q, b"gone1").await;
    publish(&ch, "", &q, b"gone2").await;
    ch.tx_rollback().await.unwrap();
    publish(&ch, "", &q, b"kept").await;
    ch.tx_commit().await.unwrap();
    assert_eq!(drain(&observer, &q).await, vec!["kept"]);
    // Publishes pending when the channel closes are discarded too.
    publish(&ch, "", &q, b"never").await;
    ch.close(200, "bye".into()).await.unwrap();
    sync(&observer).await;
    assert_eq!(passive_count(&observer, &q).await, 0);
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn tx_acks_take_effect_on_commit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let q = unique("txack");
    declare_queue(&observer, &q).await;
    publish(&observer, "", &q, b"a").await;
    publish(&observer, "", &q, b"b").await;
    wait_count(&observer, &q, 2).await;

    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    let a = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    let b = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    ch.basic_ack(a.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.tx_commit().await.unwrap();
    // b's ack is in an uncommitted transaction when the channel closes: b goes back.
    ch.basic_ack(b.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    sync(&ch).await;
    ch.close(200, "bye".into()).await.unwrap();
    wait_count(&observer, &q, 1).await;
    let m = observer
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"b");
    assert!(m.delivery.redelivered);
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn tx_rollback_keeps_messages_unacked() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = conn.create_channel().await.unwrap();
    let q = unique("txrb");
    declare_queue(&observer, &q).await;
    publish(&observer, "", &q, b"x").await;
    wait_count(&observer, &q, 1).await;
    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.tx_rollback().await.unwrap();
    // The ack was discarded; the message is still unacked (not requeued).
    assert_eq!(passive_count(&observer, &q).await, 0);
    // Acking it again and committing removes it for good.
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.tx_commit().await.unwrap();
    ch.close(200, "bye".into()).await.unwrap();
    sync(&observer).await;
    assert_eq!(passive_count(&observer, &q).await, 0);
    delete(&observer, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn commit_or_rollback_without_select_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_code(ch.tx_commit().await, PRECONDITION_FAILED);
    let ch = conn.create_channel().await.unwrap();
    assert_code(ch.tx_rollback().await, PRECONDITION_FAILED);
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn tx_and_confirm_are_exclusive() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    assert_code(
        ch.confirm_select(ConfirmSelectOptions::default()).await,
        PRECONDITION_FAILED,
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert_code(ch.tx_select().await, PRECONDITION_FAILED);
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_publishes_on_one_connection_stay_intact() {
    // Body frames of different channels interleave on the wire; each channel's
    // content must be reassembled on its own.
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let setup = conn.create_channel().await.unwrap();
    let q = unique("bigburst");
    declare_queue(&setup, &q).await;
    const CHANNELS: u8 = 4;
    const PER_CHANNEL: u8 = 8;
    const SIZE: usize = 200_000;
    let mut tasks = Vec::new();
    for c in 0..CHANNELS {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut confirms = Vec::new();
            for i in 0..PER_CHANNEL {
                let mut body = vec![c * 16 + i; SIZE];
                body[0] = c;
                body[1] = i;
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish"),
                );
            }
            for confirm in confirms {
                assert_eq!(confirm.await.expect("confirm"), Confirmation::Ack(None));
            }
        }));
    }
    for t in tasks {
        within("the publishers", t).await.expect("publisher task");
    }
    let mut seen = 0;
    while let Some(m) = setup
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let b = &m.delivery.data;
        assert_eq!(b.len(), SIZE);
        let (c, i) = (b[0], b[1]);
        assert!(
            b[2..].iter().all(|&x| x == c * 16 + i),
            "body of {c}-{i} mixed with another"
        );
        seen += 1;
    }
    assert_eq!(seen, CHANNELS as usize * PER_CHANNEL as usize);
    delete(&setup, &q).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
