//! Permission changes take effect at once, on connections already open (a
//! publisher that had write permission loses it with its next message), and
//! a user's topic permissions are checked per routing key. RabbitMQ keeps a
//! channel's earlier grants cached; Warren re-checks after every change.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_broker::access::{self, password};
use warren_tests::lapin_util::Errors;
use warren_tests::{within, TestBroker};

async fn connect(b: &TestBroker, user: &str, pass: &str, vhost: &str) -> lapin::Result<Connection> {
    let url = format!("amqp://{user}:{pass}@{}/{vhost}", b.addr());
    Connection::connect(&url, ConnectionProperties::default()).await
}

#[tokio::test]
async fn a_revoked_write_permission_stops_the_next_publish() {
    let b = TestBroker::start().await;
    let Some(broker) = b.broker() else {
        return; // sets users up in-process
    };
    broker
        .access
        .change(|s, ops| {
            access::add_vhost(s, ops, "live", "", vec![])?;
            let hash = password::hash(password::Algorithm::Sha256, "pw");
            access::add_user(s, ops, "pub", hash, password::Algorithm::Sha256, vec![])?;
            access::set_permissions(s, ops, "pub", "live", ".*", ".*", ".*")
        })
        .unwrap();
    broker.ensure_vhost("live");
    let c = connect(&b, "pub", "pw", "live").await.expect("pub logs in");
    let mut errors = Errors::of(&c);
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = || {
        ch.basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
    };
    publish().await.unwrap().await.unwrap();
    broker
        .access
        .change(|s, ops| access::set_permissions(s, ops, "pub", "live", ".*", "^$", ".*"))
        .unwrap();
    let _ = publish().await;
    let code = within("the channel error", errors.next_code()).await;
    assert_eq!(code, 403);
    // A new connection is refused once the user has no permissions at all.
    broker
        .access
        .change(|s, ops| access::clear_permissions(s, ops, "pub", "live"))
        .unwrap();
    assert!(connect(&b, "pub", "pw", "live").await.is_err());
    b.stop().await;
}
