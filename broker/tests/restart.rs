//! The `warren` process on a data directory: durable definitions survive a
//! SIGKILL (they are synced before declare-ok/bind-ok), transient ones do not,
//! and a second process on the same directory is refused with a clear message.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use std::process::Command;
use std::time::{Duration, Instant};
use warren_tests::daemon::{free_port, Daemon};
use warren_tests::lapin_util::{code, passive_queue};

/// The daemon under test.
const WARREN: &str = env!("CARGO_BIN_EXE_warren");

fn max_length(n: i32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-max-length".into(), AMQPValue::LongInt(n));
    t
}

async fn passive_exchange(ch: &Channel, name: &str) -> lapin::Result<()> {
    let opts = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        opts,
        FieldTable::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_definitions_survive_sigkill_and_transient_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start(WARREN, dir.path(), port);
    {
        let (_c, ch) = d.channel().await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            "dx".into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.exchange_declare(
            "dx2".into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.exchange_declare(
            "tx".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let dq = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("dq".into(), dq, max_length(5))
            .await
            .unwrap();
        ch.queue_declare("dq2".into(), dq, FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare(
            "tq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "dq".into(),
            "dx".into(),
            "a.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.exchange_bind(
            "dx2".into(),
            "dx".into(),
            "b.*".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "dq2".into(),
            "dx2".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        // A binding to a transient queue is not durable either.
        ch.queue_bind(
            "tq".into(),
            "dx".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        // Killed right after the last bind-ok: nothing may be lost.
    }
    d.kill();

    let d = Daemon::start(WARREN, dir.path(), port);
    let (_c, ch) = d.channel().await;
    passive_exchange(&ch, "dx")
        .await
        .expect("durable exchange is back");
    passive_exchange(&ch, "dx2")
        .await
        .expect("durable exchange is back");
    passive_queue(&ch, "dq")
        .await
        .expect("durable queue is back");
    passive_queue(&ch, "dq2")
        .await
        .expect("durable queue is back");
    assert_eq!(
        passive_queue(&ch, "tq")
            .await
            .map(|_| ())
            .err()
            .as_ref()
            .and_then(code),
        Some(404)
    );
    let (_c, ch) = d.channel().await;
    assert_eq!(
        passive_exchange(&ch, "tx")
            .await
            .err()
            .as_ref()
            .and_then(code),
        Some(404)
    );

    // Arguments came back: redeclaring with others is inequivalent.
    let (_c, ch) = d.channel().await;
    let dq = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("dq".into(), dq, max_length(5))
        .await
        .expect("same arguments are fine");
    let err = ch
        .queue_declare("dq".into(), dq, max_length(6))
        .await
        .expect_err("406");
    assert_eq!(code(&err), Some(406));

    // Bindings came back: queue binding and exchange-to-exchange binding route.
    let (_c, ch) = d.channel().await;
    for key in ["a.x", "b.y"] {
        ch.basic_publish(
            "dx".into(),
            key.into(),
            BasicPublishOptions::default(),
            key.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    for (queue, body) in [("dq", "a.x"), ("dq2", "b.y")] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                assert_eq!(m.delivery.data, body.as_bytes());
                break;
            }
            assert!(Instant::now() < deadline, "nothing routed to {queue}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A persistent message dead-lettered (rejected) into a durable queue is
/// stored there: it survives a SIGKILL, and the original does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_into_a_durable_queue_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start(WARREN, dir.path(), port);
    let (_c, ch) = d.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dlq".into()),
    );
    ch.queue_declare("work".into(), durable, args)
        .await
        .unwrap();
    ch.queue_declare("dlq".into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |body: &'static [u8]| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                "work".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    assert!(publish(b"doomed").await.is_ack());
    let m = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: false },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while passive_queue(&ch, "dlq").await.unwrap().message_count() != 1 {
        assert!(Instant::now() < deadline, "dead letter did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A later confirm means the store writer got past the dead letter.
    assert!(publish(b"marker").await.is_ack());
    d.kill();

    let d = Daemon::start(WARREN, dir.path(), port);
    let (_c, ch) = d.channel().await;
    let dead = ch
        .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the dead letter survived");
    assert_eq!(dead.delivery.data, b"doomed");
    let headers = dead.properties.headers().clone().unwrap_or_default();
    assert!(headers.inner().contains_key("x-death"), "x-death kept");
    let rest = ch
        .basic_get("work".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the marker");
    assert_eq!(
        rest.delivery.data, b"marker",
        "the rejected original is gone"
    );
    assert!(ch
        .basic_get("work".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
}
/// SIGTERM is a clean stop: the process exits 0 (it once aborted now and
/// then, RocksDB torn down by the exit handlers under its own background
/// threads), and what was confirmed before it is there afterwards. Odd
/// rounds stop an idle daemon right after it listens (where the abort
/// showed most), even rounds one that was just written to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_keeps_what_was_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rounds = 8u32;
    let per_round = 50u32;
    for round in 0..rounds {
        let d = Daemon::start(WARREN, dir.path(), port);
        if round % 2 == 0 {
            let (c, ch) = d.channel().await;
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare("term-q".into(), durable, FieldTable::default())
                .await
                .unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut confirms = Vec::new();
            for i in 0..per_round {
                let body = format!("{round}-{i}");
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        "term-q".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
                );
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack());
            }
            drop(ch);
            drop(c);
            tokio::time::sleep(Duration::from_millis(20 * round as u64)).await;
        }
        let (status, log) = d.terminate();
        assert!(
            status.success(),
            "round {round}: warren exited with {status} on SIGTERM; its log:\n{log}"
        );
    }
    let d = Daemon::start(WARREN, dir.path(), port);
    let (_c, ch) = d.channel().await;
    let q = passive_queue(&ch, "term-q").await.unwrap();
    assert_eq!(q.message_count(), rounds / 2 * per_round);
    let first = ch
        .basic_get("term-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(first.delivery.data, b"0-0");
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Daemon::start(WARREN, dir.path(), free_port());
    let out = Command::new(WARREN)
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &free_port().to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run warren");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "stderr: {err}");
}
