//! warrenctl against a Warren with its management API on a free port: every
//! verb does what it says (checked through the API or over AMQP), tables
//! and JSON come out as asked, and each kind of failure has its own exit
//! code and message: unreachable (69), refused credentials (77), missing
//! object (3), refused request (1), bad usage (2).

use std::net::SocketAddr;
use std::process::{Command, Output};
use warren_tests::TestBroker;

struct Ctl {
    api: SocketAddr,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        self.run_as("guest", "guest", args)
    }

    fn run_as(&self, user: &str, pass: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_warrenctl"))
            .env_remove("WARRENCTL_VHOST")
            .env("HOME", std::env::temp_dir().join("warrenctl-test-home"))
            .args([
                "--port",
                &self.api.port().to_string(),
                "--host",
                "127.0.0.1",
            ])
            .args(["--username", user, "--password", pass])
            .args(args)
            .output()
            .expect("warrenctl runs")
    }

    /// Run and expect success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "warrenctl {args:?}: {:?}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run and expect exit `code` with `text` in the error.
    fn fails(&self, args: &[&str], code: i32, text: &str) {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "warrenctl {args:?}: {err}");
        assert!(
            err.contains(text),
            "warrenctl {args:?}: {err:?} lacks {text:?}"
        );
    }
}

async fn broker() -> (TestBroker, Ctl) {
    let b = TestBroker::start_with(|c| c.management = Some("127.0.0.1:0".parse().unwrap())).await;
    let api = b
        .broker()
        .expect("in-process Warren")
        .listen_addrs
        .http
        .expect("the API listens");
    (b, Ctl { api })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_permissions_and_policies() {
    let (b, ctl) = broker().await;
    let broker = b.broker().unwrap();
    assert!(ctl.ok(&["status"]).contains("Product: Warren"));
    ctl.ok(&["add_vhost", "shop", "--description", "the shop"]);
    assert!(ctl.ok(&["list_vhosts"]).lines().any(|l| l.trim() == "shop"));
    ctl.ok(&["add_user", "ann", "pw1", "--tags", "monitoring"]);
    ctl.fails(&["add_user", "ann", "pw1"], 1, "user 'ann' already exists");
    ctl.ok(&["change_password", "ann", "pw2"]);
    broker.access.login("ann", b"pw2", true).unwrap();
    assert!(broker.access.login("ann", b"pw1", true).is_err());
    ctl.ok(&["set_user_tags", "ann", "management", "policymaker"]);
    let users = ctl.ok(&["list_users"]);
    assert!(
        users
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["ann", "management,policymaker"]),
        "{users}"
    );
    // The password survived the tag change.
    broker.access.login("ann", b"pw2", true).unwrap();
    ctl.ok(&[
        "-p",
        "shop",
        "set_permissions",
        "ann",
        "^ann\\.",
        ".*",
        ".*",
    ]);
    let perms = ctl.ok(&["-p", "shop", "list_permissions"]);
    assert!(
        perms.contains("ann") && perms.contains("^ann\\."),
        "{perms}"
    );
    ctl.ok(&[
        "-p",
        "shop",
        "set_topic_permissions",
        "ann",
        "amq.topic",
        "^a",
        "^a",
    ]);
    ctl.ok(&[
        "-p",
        "shop",
        "set_policy",
        "cap",
        "^ann\\.",
        "{\"max-length\": 2}",
        "--apply-to",
        "queues",
        "--priority",
        "3",
    ]);
    let policies = ctl.ok(&["-p", "shop", "--format", "json", "list_policies"]);
    let p: serde_json::Value = serde_json::from_str(&policies).unwrap();
    assert_eq!(p[0]["name"], "cap");
    assert_eq!(p[0]["priority"], 3);
    assert_eq!(p[0]["definition"]["max-length"], 2);
    ctl.fails(
        &[
            "-p",
            "shop",
            "set_policy",
            "bad",
            ".*",
            "{\"max-length\": -1}",
        ],
        1,
        "is not a valid maximum length",
    );
    ctl.fails(
        &["-p", "shop", "set_policy", "bad", ".*", "not json"],
        2,
        "the definition is not JSON",
    );
    ctl.ok(&["-p", "shop", "set_vhost_limits", "{\"max-queues\": 7}"]);
    assert_eq!(broker.access.vhost_limits("shop").max_queues, Some(7));
    ctl.ok(&["-p", "shop", "set_vhost_limits", "{}"]);
    assert_eq!(broker.access.vhost_limits("shop").max_queues, None);
    ctl.ok(&["set_user_limits", "ann", "{\"max-channels\": 3}"]);
    assert_eq!(
        broker.access.snapshot().users["ann"].limits.max_channels,
        Some(3)
    );
    ctl.ok(&["-p", "shop", "clear_policy", "cap"]);
    ctl.fails(
        &["-p", "shop", "clear_policy", "cap"],
        3,
        "policy 'cap' does not exist in vhost 'shop'",
    );
    ctl.ok(&["-p", "shop", "clear_permissions", "ann"]);
    ctl.fails(
        &["-p", "shop", "clear_permissions", "ann"],
        3,
        "has no permissions",
    );
    ctl.ok(&["delete_user", "ann"]);
    ctl.fails(&["delete_user", "ann"], 3, "user 'ann' does not exist");
    ctl.ok(&["delete_vhost", "shop"]);
    ctl.fails(&["delete_vhost", "shop"], 3, "vhost 'shop' does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_exchanges_bindings_connections_and_definitions() {
    let (b, ctl) = broker().await;
    let (conn, ch) = b.channel().await;
    ch.queue_declare("jobs".into(), Default::default(), Default::default())
        .await
        .unwrap();
    for _ in 0..3 {
        warren_tests::lapin_util::publish(&ch, "", "jobs", b"j").await;
    }
    warren_tests::lapin_util::wait_count(&ch, "jobs", 3).await;
    let queues = ctl.ok(&["list_queues", "name", "messages", "durable"]);
    assert!(
        queues
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["jobs", "3", "false"]),
        "{queues}"
    );
    ctl.fails(&["list_queues", "nonsense"], 2, "unknown column 'nonsense'");
    let exchanges = ctl.ok(&["list_exchanges"]);
    assert!(
        exchanges.contains("amq.default") && exchanges.contains("amq.topic"),
        "{exchanges}"
    );
    let bindings = ctl.ok(&["--format", "json", "list_bindings"]);
    let bs: serde_json::Value = serde_json::from_str(&bindings).unwrap();
    assert!(bs
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["destination_name"] == "jobs"));
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(5, Default::default()).await.unwrap();
    // (Kept: lapin cancels a consumer whose stream is dropped.)
    let _worker = cch
        .basic_consume(
            "jobs".into(),
            "the-worker".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let consumers = ctl.ok(&[
        "list_consumers",
        "queue_name",
        "consumer_tag",
        "prefetch_count",
    ]);
    assert!(
        consumers
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["jobs", "the-worker", "5"]),
        "{consumers}"
    );
    let channels = ctl.ok(&[
        "--format",
        "json",
        "list_channels",
        "number",
        "consumer_count",
    ]);
    let chs: serde_json::Value = serde_json::from_str(&channels).unwrap();
    assert!(
        chs.as_array()
            .unwrap()
            .iter()
            .any(|c| c["consumer_count"] == 1),
        "{channels}"
    );
    cch.close(200, "done".into()).await.unwrap();
    ctl.ok(&["purge_queue", "jobs"]);
    warren_tests::lapin_util::wait_count(&ch, "jobs", 0).await;
    // Connections: listed by name, closed with the reason.
    let conns = ctl.ok(&["--format", "json", "list_connections", "name", "user"]);
    let cs: serde_json::Value = serde_json::from_str(&conns).unwrap();
    let name = cs[0]["name"].as_str().unwrap().to_owned();
    assert_eq!(cs[0]["user"], "guest");
    let mut errors = warren_tests::lapin_util::Errors::of(&conn);
    ctl.ok(&["close_connection", &name, "go away"]);
    assert_eq!(errors.next_code().await, 320);
    ctl.fails(
        &["close_connection", "nobody", "x"],
        3,
        "connection 'nobody' does not exist",
    );
    // Definitions out and back in (into a fresh vhost named in the file).
    let dir = tempfile_dir();
    let file = dir.join("defs.json");
    ctl.ok(&["export_definitions", file.to_str().unwrap()]);
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    d["vhosts"] = serde_json::json!([{"name": "imported"}]);
    std::fs::write(&file, d.to_string()).unwrap();
    ctl.ok(&["import_definitions", file.to_str().unwrap()]);
    assert!(ctl
        .ok(&["list_vhosts"])
        .lines()
        .any(|l| l.trim() == "imported"));
    std::fs::write(
        &file,
        "{\"queues\": [{\"name\": \"q\", \"vhost\": \"missing\"}]}",
    )
    .unwrap();
    ctl.fails(
        &["import_definitions", file.to_str().unwrap()],
        1,
        "vhost 'missing' does not exist",
    );
    ctl.ok(&["delete_queue", "jobs"]);
    ctl.fails(&["delete_queue", "jobs"], 3, "queue 'jobs' does not exist");
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(warren_tests::unique("warrenctl"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_their_own_exit_codes() {
    let (_b, ctl) = broker().await;
    // Refused credentials.
    let o = ctl.run_as("guest", "wrong", &["list_users"]);
    assert_eq!(o.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Login failed"));
    // Unreachable.
    let port = warren_tests::daemon::free_port();
    let gone = Ctl {
        api: ([127, 0, 0, 1], port).into(),
    };
    gone.fails(&["status"], 69, "cannot reach the management API");
    // Usage.
    ctl.fails(&["no_such_verb"], 2, "unrecognized subcommand");
    // A user without the administrator tag may not manage users.
    ctl.ok(&["add_user", "mon", "pw", "--tags", "monitoring"]);
    let o = ctl.run_as("mon", "pw", &["add_user", "x", "y"]);
    assert_eq!(
        o.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `--tls --tls-ca`: warrenctl talks HTTPS to a broker whose API runs with
/// `management_tls`, trusting the test's CA; without the CA it refuses the
/// certificate (unreachable, 69) rather than talk in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "warrenctl test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert, key, ca_file) = (
        write("cert.pem", leaf_cert.pem()),
        write("key.pem", leaf_key.serialize_pem()),
        write("ca.pem", ca_cert.pem()),
    );
    let b = TestBroker::start_with(|c| {
        c.management = Some("127.0.0.1:0".parse().unwrap());
        c.management_tls = true;
        c.tls = Some(warren_broker::config::TlsListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            settings: warren_broker::tls::TlsSettings {
                cert,
                key,
                ca: None,
                verify_peer: false,
                fail_if_no_peer_cert: false,
                login_from: Default::default(),
            },
        });
    })
    .await;
    let api = b.broker().unwrap().listen_addrs.http.unwrap();
    let ctl = Ctl { api };
    let ca_s = ca_file.to_str().unwrap();
    let out = ctl.ok(&["--tls", "--tls-ca", ca_s, "status"]);
    assert!(out.contains("Product: Warren"), "{out}");
    ctl.ok(&["--tls", "--tls-ca", ca_s, "add_vhost", "over-tls"]);
    assert!(ctl
        .ok(&["--tls", "--tls-ca", ca_s, "list_vhosts"])
        .contains("over-tls"));
    // Not trusting the CA: refused, never sent in clear.
    ctl.fails(&["--tls", "status"], 69, "cannot reach the management API");
    // Plain HTTP to an HTTPS port: no answer.
    ctl.fails(&["status"], 69, "cannot reach the management API");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_of_a_lone_node_and_of_a_one_node_cluster() {
    let (_b, ctl) = broker().await;
    let out = ctl.ok(&["cluster_status"]);
    assert!(
        out.contains("Disk Nodes") && out.contains("(not clustered)"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["--format", "json", "cluster_status"])).unwrap();
    assert_eq!(
        json["disk_nodes"].as_array().map(Vec::len),
        Some(1),
        "{json}"
    );
    assert_eq!(json["metadata_leader"], serde_json::Value::Null);
    ctl.fails(
        &["forget_cluster_node", "warren@x"],
        1,
        "this node is not clustered",
    );
    ctl.fails(
        &["join_cluster", "127.0.0.1:1"],
        1,
        "this node is not clustered",
    );

    // A node with a secret and no peers is a cluster of one: it leads.
    let b = TestBroker::start_with(|c| {
        c.management = Some("127.0.0.1:0".parse().unwrap());
        warren_tests::cluster_of_one(c);
    })
    .await;
    let broker = b.broker().unwrap();
    let ctl = Ctl {
        api: broker.listen_addrs.http.unwrap(),
    };
    let name = broker.cluster.as_ref().unwrap().node().info().name.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let json: serde_json::Value =
            serde_json::from_str(&ctl.ok(&["--format", "json", "cluster_status"])).unwrap();
        if json["metadata_leader"] == serde_json::json!(name) {
            assert_eq!(json["running_nodes"], serde_json::json!([name]), "{json}");
            assert_eq!(json["raft"]["role"], "leader", "{json}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no leader: {json}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = ctl.ok(&["cluster_status"]);
    assert!(out.contains(&format!("{name} (term ")), "{out}");
    ctl.fails(&["forget_cluster_node", &name], 1, "cannot forget itself");
    ctl.fails(
        &["forget_cluster_node", "warren@elsewhere"],
        3,
        "warren@elsewhere is not a member of the cluster",
    );
}

/// `add_member`, `delete_member` and `rebalance` (rabbitmq-queues' verbs)
/// reach the API and report its refusals; the successful changes are
/// checked on three nodes in `broker/tests/cluster.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_member_commands() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let b = TestBroker::start_with(|c| {
        c.management = Some("127.0.0.1:0".parse().unwrap());
        warren_tests::cluster_of_one(c);
    })
    .await;
    let broker = b.broker().unwrap();
    let ctl = Ctl {
        api: broker.listen_addrs.http.unwrap(),
    };
    let name = broker.cluster.as_ref().unwrap().node().info().name.clone();
    ctl.fails(
        &["add_member", "nosuch", &name],
        3,
        "queue 'nosuch' does not exist",
    );
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_c, ch) = b.channel().await;
        match ch.queue_declare("qq".into(), durable, args.clone()).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // Its group elects its one member a moment after the declare.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let o = ctl.run(&["add_member", "qq", "warren@elsewhere"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if err.contains("not a member of the cluster") {
            assert_eq!(o.status.code(), Some(1), "{err}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{err}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    ctl.fails(&["delete_member", "qq", &name], 1, "last member");
    ctl.fails(&["add_member", "qq", &name], 1, "already a member");
    let out = ctl.ok(&["rebalance", "quorum"]);
    assert!(out.contains("leads its share"), "{out}");
    ctl.fails(&["rebalance", "stream"], 1, "only quorum queues");
}
