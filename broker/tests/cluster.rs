//! Three `warren` daemons on loopback form a cluster from `--cluster-peers`,
//! seen through `/api/nodes` (what `warrenctl cluster_status` reads); a
//! killed metadata leader is replaced and comes back as a member; bad
//! cluster flags stop the start with a clear message.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use warren_tests::daemon::{free_port, Daemon};
use warren_tests::http::request;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// One node's ports and flags.
struct Node {
    name: String,
    amqp: u16,
    api: u16,
    cluster: u16,
}

impl Node {
    fn nodes(&self) -> Vec<Value> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.api).into();
        let r = request(addr, "GET", "/api/nodes", ("guest", "guest"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json().as_array().cloned().unwrap_or_default()
    }

    fn start(&self, dir: &Path, peers: &str, secret_file: &Path) -> Daemon {
        self.start_with(dir, peers, secret_file, &[])
    }

    fn start_with(&self, dir: &Path, peers: &str, secret_file: &Path, extra: &[&str]) -> Daemon {
        let (api, cluster) = (self.api.to_string(), self.cluster.to_string());
        let secret = secret_file.to_str().expect("utf-8 path");
        let mut args = vec![
            "--log-level",
            "warn",
            "--management-port",
            &api,
            "--node-name",
            &self.name,
            "--cluster-port",
            &cluster,
            "--cluster-peers",
            peers,
            "--cluster-secret-file",
            secret,
        ];
        args.extend_from_slice(extra);
        Daemon::start_with(WARREN, dir, self.amqp, &args)
    }
}

/// `count` nodes named `warren@{prefix}{i}` on free loopback ports.
fn make_nodes(prefix: &str, count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| Node {
            name: format!("warren@{prefix}{i}"),
            amqp: free_port(),
            api: free_port(),
            cluster: free_port(),
        })
        .collect()
}

/// Their cluster addresses, as `--cluster-peers` takes them.
fn peer_list(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.cluster))
        .collect::<Vec<_>>()
        .join(",")
}

/// What one node's `/api/nodes` says: (members, running members, leader).
fn view(n: &Node) -> (Vec<String>, Vec<String>, Option<String>) {
    let nodes = n.nodes();
    let names = |keep: &dyn Fn(&Value) -> bool| -> Vec<String> {
        let mut v: Vec<String> = nodes
            .iter()
            .filter(|x| keep(x))
            .map(|x| x["name"].as_str().expect("a name").to_owned())
            .collect();
        v.sort();
        v
    };
    let leader = names(&|x| x["metadata_leader"] == Value::Bool(true)).pop();
    (
        names(&|_| true),
        names(&|x| x["running"] == Value::Bool(true)),
        leader,
    )
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_daemons_form_a_cluster_and_replace_a_killed_leader() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "a shared secret\n").expect("secret file");
    let nodes = make_nodes("t", 3);
    // Every node gets the same list, itself included.
    let peers = peer_list(&nodes);
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut daemons: Vec<Option<Daemon>> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Some(n.start(d, &peers, &secret)))
        .collect();
    let mut all: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    all.sort();

    // One cluster: every node lists the three, all running, one leader.
    let mut leader = None;
    eventually(
        "three nodes agreeing on a leader",
        Duration::from_secs(30),
        || {
            let views: Vec<_> = nodes.iter().map(view).collect();
            leader = views[0].2.clone();
            leader.is_some()
                && views
                    .iter()
                    .all(|(members, running, l)| *members == all && *running == all && *l == leader)
        },
    );
    let leader = leader.expect("a leader");
    let li = nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("a member");
    // This node's own entry comes first, with its Raft view.
    let me = &nodes[li].nodes()[0];
    assert_eq!(me["name"], Value::String(leader.clone()));
    assert_eq!(me["raft"]["role"], "leader");
    let term = me["raft"]["term"].as_u64().expect("a term");

    // SIGKILL the leader: the other two elect another and see it down.
    daemons[li].take().expect("running").kill();
    let others: Vec<&Node> = nodes.iter().filter(|n| n.name != leader).collect();
    let mut new_leader = None;
    eventually(
        "a new leader among the survivors",
        Duration::from_secs(30),
        || {
            let views: Vec<_> = others.iter().map(|n| view(n)).collect();
            new_leader = views[0].2.clone();
            new_leader.as_ref().is_some_and(|l| *l != leader)
                && views.iter().all(|(members, running, l)| {
                    *members == all
                        && !running.contains(&leader)
                        && running.len() == 2
                        && *l == new_leader
                })
        },
    );

    // It comes back, from its own data directory, as a member.
    daemons[li] = Some(nodes[li].start(&dirs[li], &peers, &secret));
    eventually(
        "the killed node back in the cluster",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .map(view)
                .all(|(members, running, l)| members == all && running == all && l == new_leader)
        },
    );
    let me = &nodes[li].nodes()[0];
    assert_eq!(me["raft"]["role"], "follower");
    assert!(me["raft"]["term"].as_u64().expect("a term") > term);
    assert_eq!(me["raft"]["bootstrap_error"], Value::Null);

    // Stopped for good, it is forgotten through another member (forget_cluster_node).
    daemons[li].take().expect("running").kill();
    let other = others[0];
    let api: SocketAddr = ([127, 0, 0, 1], other.api).into();
    let del = |name: &str| {
        request(
            api,
            "DELETE",
            &format!("/api/nodes/{}", name.replace('@', "%40")),
            ("guest", "guest"),
            None,
        )
    };
    let r = del(&other.name);
    assert_eq!(r.status, 400, "a node cannot forget itself: {}", r.body);
    assert!(r.body.contains("cannot forget itself"), "{}", r.body);
    assert_eq!(del("warren@nobody").status, 404);
    let r = del(&leader);
    assert_eq!(r.status, 204, "{}", r.body);
    let rest: Vec<String> = {
        let mut v: Vec<String> = others.iter().map(|n| n.name.clone()).collect();
        v.sort();
        v
    };
    eventually(
        "a cluster of the other two",
        Duration::from_secs(30),
        || {
            others.iter().all(|n| {
                let (members, running, l) = view(n);
                members == rest && running == rest && l.is_some()
            })
        },
    );
}

/// Run the daemon with `args`; it must refuse them and say why.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(WARREN)
        .args([
            "--port",
            "0",
            "--management-port",
            "0",
            "--prometheus-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(args)
        .output()
        .expect("run warren");
    assert!(!out.status.success(), "{args:?} was accepted");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_cluster_flags_stop_the_start() {
    let (_, e) = refused(&["--cluster-peers", "127.0.0.1:25672"]);
    assert!(e.contains("--cluster-peers") && e.contains("secret"), "{e}");
    let (_, e) = refused(&["--cluster-secret", ""]);
    assert!(e.contains("empty"), "{e}");
    let (_, e) = refused(&["--cluster-secret", "s", "--cluster-peers", "nohost"]);
    assert!(e.contains("'nohost' is not HOST:PORT"), "{e}");
    let (_, e) = refused(&["--cluster-secret", "s", "--cluster-peers", "h:99999"]);
    assert!(e.contains("'h:99999' is not HOST:PORT"), "{e}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let (_, e) = refused(&["--cluster-secret-file", missing.to_str().expect("utf-8")]);
    assert!(
        e.contains("--cluster-secret-file") && e.contains("nope"),
        "{e}"
    );
    let (code, e) = refused(&["--cluster-secret", "s", "--cluster-secret-file", "f"]);
    assert_eq!(code, Some(2), "{e}");
    assert!(e.contains("cannot be used with"), "{e}");
    let (_, e) = refused(&["--node-name", " "]);
    assert!(e.contains("--node-name"), "{e}");
    let (_, e) = refused(&["--cluster-port", "26000"]);
    assert!(e.contains("--cluster-port") && e.contains("secret"), "{e}");
    let (_, e) = refused(&["--cluster-tls", "true"]);
    assert!(e.contains("--cluster-tls") && e.contains("secret"), "{e}");
    let (_, e) = refused(&["--cluster-secret", "s", "--cluster-tls", "true"]);
    assert!(e.contains("--cluster-tls needs --tls-cert"), "{e}");
}

/// Three daemons with `--cluster-tls` (a CA and a certificate for
/// 127.0.0.1 this test makes) form a cluster and share a user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_over_tls() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "cluster CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "node");
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let file = |name: &str, text: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.pem", ca.pem()),
        file("node.pem", cert.pem()),
        file("node.key", key.serialize_pem()),
    );
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("tls", 3);
    let peers = peer_list(&nodes);
    let _daemons: Vec<Daemon> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let tls_port = free_port().to_string();
            n.start_with(
                &tmp.path().join(format!("n{i}")),
                &peers,
                &secret,
                &[
                    "--tls-cert",
                    &cert_file,
                    "--tls-key",
                    &key_file,
                    "--tls-ca",
                    &ca_file,
                    "--tls-port",
                    &tls_port,
                    "--cluster-tls",
                    "true",
                ],
            )
        })
        .collect();
    let mut all: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    all.sort();
    eventually("three nodes over TLS", Duration::from_secs(30), || {
        nodes
            .iter()
            .map(view)
            .all(|(members, running, l)| members == all && running == all && l.is_some())
    });
    let user = serde_json::json!({"password": "pw", "tags": "administrator"});
    eventually(
        "the cluster to take a user",
        Duration::from_secs(30),
        || {
            let (status, _) = call(&nodes[0], "PUT", "/api/users/tlsuser", Some(user.clone()));
            status == 201 || status == 204
        },
    );
    for n in &nodes {
        eventually("the user everywhere", Duration::from_secs(10), || {
            call(n, "GET", "/api/users/tlsuser", None).0 == 200
        });
    }
    // A node without TLS, with the right secret, gets nowhere.
    let plain = Node {
        name: "warren@plain".into(),
        amqp: free_port(),
        api: free_port(),
        cluster: free_port(),
    };
    let _d = plain.start(&tmp.path().join("plain"), &peers, &secret);
    std::thread::sleep(Duration::from_secs(3));
    let (members, _, leader) = view(&plain);
    assert_eq!((members, leader), (vec!["warren@plain".to_string()], None));
    for n in &nodes {
        assert_eq!(view(n).0, all);
    }
}

/// Log in over AMQP: whether it worked.
async fn logs_in(port: u16, user: &str, pass: &str, vhost: &str) -> bool {
    let url = format!("amqp://{user}:{pass}@127.0.0.1:{port}/{vhost}");
    match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
        Ok(c) => {
            let _ = c.close(200, "bye".into()).await;
            true
        }
        Err(_) => false,
    }
}

async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn call(n: &Node, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let addr: SocketAddr = ([127, 0, 0, 1], n.api).into();
    let r = request(addr, method, path, ("guest", "guest"), body.as_ref());
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_permissions_and_policies_are_shared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("s", 3);
    let peers = peer_list(&nodes);
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut daemons: Vec<Option<Daemon>> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Some(n.start(d, &peers, &secret)))
        .collect();

    // A user made on one node (once the cluster has formed and shared its
    // records) logs in on every node.
    let ann = serde_json::json!({"password": "pw-ann", "tags": ""});
    eventually(
        "the cluster to take a user",
        Duration::from_secs(30),
        || {
            let (status, _) = call(&nodes[0], "PUT", "/api/users/ann", Some(ann.clone()));
            status == 201 || status == 204
        },
    );
    let (status, body) = call(&nodes[1], "PUT", "/api/vhosts/shop", None);
    assert!(status == 201 || status == 204, "{status} {body}");
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (status, body) = call(
        &nodes[2],
        "PUT",
        "/api/permissions/shop/ann",
        Some(all.clone()),
    );
    assert!(status == 201 || status == 204, "{status} {body}");
    let (status, body) = call(&nodes[0], "PUT", "/api/permissions/shop/guest", Some(all));
    assert!(status == 201 || status == 204, "{status} {body}");
    for n in &nodes {
        eventually_async("ann in shop on every node", Duration::from_secs(10), || {
            logs_in(n.amqp, "ann", "pw-ann", "shop")
        })
        .await;
    }

    // A policy set on one node is in force on another's queues.
    let policy =
        serde_json::json!({"pattern": "^q", "definition": {"max-length": 1}, "apply-to": "queues"});
    let (status, body) = call(&nodes[0], "PUT", "/api/policies/shop/cap", Some(policy));
    assert!(status == 201 || status == 204, "{status} {body}");
    let (status, body) = call(
        &nodes[1],
        "PUT",
        "/api/queues/shop/q1",
        Some(serde_json::json!({"durable": true})),
    );
    assert!(status == 201 || status == 204, "{status} {body}");
    eventually(
        "the policy on the other node's queue",
        Duration::from_secs(10),
        || {
            let (_, body) = call(&nodes[1], "GET", "/api/queues/shop/q1", None);
            serde_json::from_str::<Value>(&body).is_ok_and(|q| q["policy"] == "cap")
        },
    );

    // A node that was down catches up.
    daemons[2].take().expect("running").kill();
    let bob = serde_json::json!({"password": "pw-bob", "tags": ""});
    let (status, body) = call(&nodes[0], "PUT", "/api/users/bob", Some(bob));
    assert!(status == 201 || status == 204, "{status} {body}");
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (status, body) = call(&nodes[1], "PUT", "/api/permissions/%2F/bob", Some(all));
    assert!(status == 201 || status == 204, "{status} {body}");
    let (status, body) = call(&nodes[1], "DELETE", "/api/users/ann", None);
    assert_eq!(status, 204, "{body}");
    daemons[2] = Some(nodes[2].start(&dirs[2], &peers, &secret));
    eventually_async("bob on the returned node", Duration::from_secs(20), || {
        logs_in(nodes[2].amqp, "bob", "pw-bob", "%2f")
    })
    .await;
    for n in &nodes {
        assert!(
            !logs_in(n.amqp, "ann", "pw-ann", "shop").await,
            "ann is gone from {}",
            n.name
        );
    }

    // A deleted vhost goes everywhere, with its queues.
    let (status, body) = call(&nodes[2], "DELETE", "/api/vhosts/shop", None);
    assert_eq!(status, 204, "{body}");
    for n in &nodes {
        eventually("the vhost gone", Duration::from_secs(10), || {
            call(n, "GET", "/api/vhosts/shop", None).0 == 404
        });
    }
    assert_eq!(call(&nodes[1], "GET", "/api/queues/shop/q1", None).0, 404);
    drop(daemons);
}

/// Prometheus shows the metadata group as this node sees it (a one-node
/// cluster, in process); an unclustered node shows none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_shows_the_metadata_group() {
    let start = |clustered: bool| {
        warren_tests::TestBroker::start_with(move |c| {
            c.prometheus = Some("127.0.0.1:0".parse().unwrap());
            if clustered {
                warren_tests::cluster_of_one(c);
            }
        })
    };
    let scrape = |b: &warren_tests::TestBroker| {
        let addr = b.broker().unwrap().listen_addrs.prometheus.unwrap();
        request(addr, "GET", "/metrics", ("guest", "guest"), None).body
    };
    let lone = start(false).await;
    assert!(!scrape(&lone).contains("warren_cluster_members"));
    let one = start(true).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(&one);
        if text.contains("\nwarren_cluster_metadata_leader 1\n") {
            assert!(text.contains("\nwarren_cluster_members 1\n"), "{text}");
            assert!(text.contains("warren_raft_term "), "{text}");
            assert!(text.contains("warren_raft_last_applied_index "), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "never led: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On a node clustered alone a quorum queue is a Raft group of one: it is
/// declared over AMQP and the API, confirms publishes once its log has
/// them, delivers them in order, and the API shows its leader and members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_on_a_cluster_of_one() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let b = warren_tests::TestBroker::start_with(|c| {
        c.management = Some("127.0.0.1:0".parse().unwrap());
        c.prometheus = Some("127.0.0.1:0".parse().unwrap());
        warren_tests::cluster_of_one(c);
    })
    .await;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The cluster of one forms a moment after the start.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ch = loop {
        let (c, ch) = b.channel().await;
        match ch.queue_declare("qq".into(), durable, quorum.clone()).await {
            Ok(_) => break (c, ch),
            Err(e) => assert!(Instant::now() < deadline, "never declared: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (_c, ch) = ch;
    assert_eq!(publish_confirmed(&ch, "", "qq", "m", 20).await, 20);
    for i in 0..20 {
        let got = ch
            .basic_get("qq".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .expect("a message");
        assert_eq!(got.delivery.data, format!("m{i}").as_bytes());
        assert!(!got.delivery.redelivered);
    }
    let api = b.broker().unwrap().listen_addrs.http.unwrap();
    let body = serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}});
    let r = request(
        api,
        "PUT",
        "/api/queues/%2F/qq2",
        ("guest", "guest"),
        Some(&body),
    );
    assert!(r.status == 201 || r.status == 204, "{}", r.body);
    let r = request(api, "GET", "/api/queues/%2F/qq", ("guest", "guest"), None);
    let q = r.json();
    assert_eq!(q["type"], "quorum", "{q}");
    assert_eq!(q["messages"], 0, "{q}");
    assert!(q["leader"].is_string(), "{q}");
    assert_eq!(q["members"].as_array().map(Vec::len), Some(1), "{q}");
    assert_eq!(q["node"], q["leader"], "{q}");
    // Prometheus: the groups this node is in and leads; per queue, RabbitMQ's
    // Raft series.
    let prom = b.broker().unwrap().listen_addrs.prometheus.unwrap();
    let text = request(prom, "GET", "/metrics", ("guest", "guest"), None).body;
    assert!(text.contains("\nwarren_quorum_queue_members 2\n"), "{text}");
    assert!(text.contains("\nwarren_quorum_queue_leaders 2\n"), "{text}");
    let text = request(prom, "GET", "/metrics/per-object", ("guest", "guest"), None).body;
    for series in [
        "rabbitmq_raft_term_total{vhost=\"/\",queue=\"qq\"} ",
        "rabbitmq_raft_log_last_applied_index{vhost=\"/\",queue=\"qq\"} ",
        "warren_quorum_queue_leader{vhost=\"/\",queue=\"qq\"} 1\n",
        "warren_quorum_queue_apply_lag{vhost=\"/\",queue=\"qq2\"} ",
    ] {
        assert!(text.contains(series), "{series} in {text}");
    }
}

/// A node in a cluster of its own joins another at run time
/// (`join_cluster`, `POST /api/join-cluster`): it becomes a member, its
/// users are added to the cluster's and it gets the cluster's, and its
/// changes reach the others; a node in a cluster of several cannot join
/// another.
#[test]
fn a_lone_node_joins_a_cluster_at_run_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("j", 2);
    // Each its own cluster: its own address as its only peer.
    let daemons: Vec<Daemon> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let own = format!("127.0.0.1:{}", n.cluster);
            n.start(&tmp.path().join(format!("n{i}")), &own, &secret)
        })
        .collect();
    let user = |n: &Node, name: &str| {
        let body = serde_json::json!({"password": "pw", "tags": ""});
        call(n, "PUT", &format!("/api/users/{name}"), Some(body)).0
    };
    for (n, name) in nodes.iter().zip(["in-cluster", "on-its-own"]) {
        eventually(
            "a cluster of one taking a change",
            Duration::from_secs(30),
            || matches!(user(n, name), 201 | 204),
        );
    }
    let join = |n: &Node, peer: &str| {
        call(
            n,
            "POST",
            "/api/join-cluster",
            Some(serde_json::json!({ "peer": peer })),
        )
    };
    // The joiner's own vhost, with a queue holding a message.
    let ok =
        |(status, body): (u16, String)| assert!(matches!(status, 201 | 204), "{status} {body}");
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    ok(call(&nodes[1], "PUT", "/api/vhosts/own", None));
    ok(call(
        &nodes[1],
        "PUT",
        "/api/permissions/own/guest",
        Some(all),
    ));
    ok(call(
        &nodes[1],
        "PUT",
        "/api/queues/own/kept",
        Some(serde_json::json!({"durable": true})),
    ));
    let msg = serde_json::json!({"properties": {"delivery_mode": 2}, "routing_key": "kept",
        "payload": "still here", "payload_encoding": "string"});
    let (status, body) = call(
        &nodes[1],
        "POST",
        "/api/exchanges/own/amq.default/publish",
        Some(msg),
    );
    assert_eq!(status, 200, "{body}");
    let depth = |n: &Node| {
        let (_, body) = call(n, "GET", "/api/queues/own/kept", None);
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|q| q["messages"].as_u64())
    };
    eventually("the message counted", Duration::from_secs(10), || {
        depth(&nodes[1]) == Some(1)
    });
    // Not a cluster address.
    let (status, body) = join(&nodes[1], &format!("127.0.0.1:{}", free_port()));
    assert_eq!(status, 400, "{body}");
    let (status, body) = join(&nodes[1], &format!("127.0.0.1:{}", nodes[0].cluster));
    assert_eq!(status, 204, "{body}");
    let mut both: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    both.sort();
    eventually("a cluster of two", Duration::from_secs(30), || {
        nodes
            .iter()
            .map(view)
            .all(|(members, running, l)| members == both && running == both && l.is_some())
    });
    // The joiner has the cluster's users, and brought its own to it.
    for n in &nodes {
        eventually("both nodes' users on both", Duration::from_secs(10), || {
            call(n, "GET", "/api/users/in-cluster", None).0 == 200
                && call(n, "GET", "/api/users/on-its-own", None).0 == 200
        });
    }
    // Its vhost is the cluster's now, and its queue kept its message.
    eventually(
        "the joiner's vhost on the other node",
        Duration::from_secs(10),
        || call(&nodes[0], "GET", "/api/vhosts/own", None).0 == 200,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(depth(&nodes[1]), Some(1));
    // Its changes reach the other node.
    eventually(
        "a change through the joiner",
        Duration::from_secs(10),
        || matches!(user(&nodes[1], "after-join"), 201 | 204),
    );
    eventually(
        "the joiner's change on the other node",
        Duration::from_secs(10),
        || call(&nodes[0], "GET", "/api/users/after-join", None).0 == 200,
    );
    // In a cluster of two now: it cannot join another.
    let (status, body) = join(&nodes[0], &format!("127.0.0.1:{}", nodes[1].cluster));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("member of a cluster of 2"), "{body}");
    drop(daemons);
}

/// A channel on a node's AMQP port.
async fn amqp(port: u16) -> (lapin::Connection, lapin::Channel) {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = c.create_channel().await.expect("channel");
    (c, ch)
}

/// Wait until the node has queue `name` (its declare on another node
/// reaches it a moment after that node answered).
async fn queue_on(n: &Node, name: &str, what: &str) {
    use warren_tests::lapin_util::passive_queue;
    eventually_async(what, Duration::from_secs(10), || async {
        let (_c, ch) = amqp(n.amqp).await;
        passive_queue(&ch, name).await.is_ok()
    })
    .await;
}

/// Publish `n` persistent messages with confirms; how many were acked.
async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    prefix: &str,
    n: usize,
) -> usize {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let mut waits = Vec::new();
    for i in 0..n {
        let w = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                format!("{prefix}{i}").as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic.publish");
        waits.push(w);
    }
    let mut acked = 0;
    for w in waits {
        if w.await.expect("confirm").is_ack() {
            acked += 1;
        }
    }
    acked
}

/// Exchanges, queues and bindings declared through any node are the
/// cluster's: every node sees them, routes to a queue wherever it lives
/// (the publish is forwarded to the queue's node, and confirmed once that
/// node has it), and answers for it; a queue whose node is down gives
/// RabbitMQ's 404, and its publishes are nacked; a node that was down
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_are_shared_and_publishes_reach_a_queue_on_another_node() {
    use lapin::options::{
        BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use warren_tests::lapin_util::{code, drain, passive_queue};
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("t", 3);
    let peers = peer_list(&nodes);
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut daemons: Vec<Option<Daemon>> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Some(n.start(d, &peers, &secret)))
        .collect();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    // Declared on node 0 once the cluster has formed (a refusal before
    // that closes the connection: a new one for each try).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_c0, ch0) = amqp(nodes[0].amqp).await;
        let r = ch0
            .exchange_declare(
                "orders".into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match r {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the cluster never took a declare: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let (_c0, ch0) = amqp(nodes[0].amqp).await;
    ch0.queue_declare("q0".into(), durable, FieldTable::default())
        .await
        .expect("q0 on node 0");
    ch0.queue_bind(
        "q0".into(),
        "orders".into(),
        "pay.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind q0");

    // Node 1 sees them (its declare-ok came after node 0 applied it;
    // node 1 applies it a moment later).
    let (_c1, ch1) = amqp(nodes[1].amqp).await;
    queue_on(&nodes[1], "q0", "q0 on node 1").await;
    // Publishes through node 1 (by the exchange) and node 2 (by the
    // default exchange) are confirmed once q0's node has them.
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    eventually_async("the binding on node 1", Duration::from_secs(10), || async {
        call(&nodes[1], "GET", "/api/bindings/%2F/e/orders/q/q0", None)
            .1
            .contains("pay.#")
    })
    .await;
    assert_eq!(
        publish_confirmed(&ch1, "orders", "pay.card", "a", 100).await,
        100
    );
    queue_on(&nodes[2], "q0", "q0 on node 2").await;
    assert_eq!(publish_confirmed(&ch2, "", "q0", "b", 50).await, 50);
    // Every node answers with the home node's count.
    for n in &nodes {
        let (_c, ch) = amqp(n.amqp).await;
        let q = passive_queue(&ch, "q0").await.expect("q0");
        assert_eq!(q.message_count(), 150, "on {}", n.name);
    }
    let (status, body) = call(&nodes[2], "GET", "/api/queues/%2F/q0", None);
    assert_eq!(status, 200, "{body}");
    let q: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(q["node"], nodes[0].name.as_str(), "{body}");
    assert_eq!(q["messages"], 150, "{body}");

    // A consumer through node 1 gets q0's messages from node 0. Unacked
    // when its channel closes, they go back (and come again redelivered).
    {
        let (_c, ch) = amqp(nodes[1].amqp).await;
        ch.basic_qos(10, Default::default()).await.expect("qos");
        let mut c = ch
            .basic_consume(
                "q0".into(),
                "c1".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume through node 1");
        for _ in 0..10 {
            warren_tests::lapin_util::next_delivery(&mut c).await;
        }
        // The prefetch holds at 10 across the nodes.
        warren_tests::lapin_util::assert_no_delivery(&mut c, Duration::from_millis(300)).await;
        ch.close(200, "bye".into()).await.expect("close");
    }
    eventually_async("q0 back to 150 ready", Duration::from_secs(10), || async {
        let (_c, ch) = amqp(nodes[0].amqp).await;
        passive_queue(&ch, "q0")
            .await
            .is_ok_and(|q| q.message_count() == 150)
    })
    .await;
    // An inequivalent redeclaration elsewhere is refused as on one node.
    let (_c, ch) = amqp(nodes[2].amqp).await;
    let e = ch
        .queue_declare(
            "q0".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent");
    assert_eq!(code(&e), Some(406), "{e}");

    // Consumed through node 1 with acks: every message, in each
    // publisher's order, the ten taken before marked redelivered.
    let (_c1, ch1) = amqp(nodes[1].amqp).await;
    ch1.basic_qos(25, Default::default()).await.expect("qos");
    let mut c = ch1
        .basic_consume(
            "q0".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume through node 1");
    // Node 1 lists the consumer of its connection.
    eventually_async(
        "the consumer listed on node 1",
        Duration::from_secs(10),
        || async {
            call(&nodes[1], "GET", "/api/consumers", None)
                .1
                .contains("\"c2\"")
        },
    )
    .await;
    let mut got = Vec::new();
    let mut redelivered = 0;
    for _ in 0..150 {
        let d = warren_tests::lapin_util::next_delivery(&mut c).await;
        redelivered += d.redelivered as usize;
        got.push(String::from_utf8(d.data.clone()).expect("utf-8"));
        d.ack(Default::default()).await.expect("ack");
    }
    assert_eq!(redelivered, 10);
    let from =
        |p: &str| -> Vec<String> { got.iter().filter(|m| m.starts_with(p)).cloned().collect() };
    assert_eq!(
        from("a"),
        (0..100).map(|i| format!("a{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        from("b"),
        (0..50).map(|i| format!("b{i}")).collect::<Vec<_>>()
    );
    eventually_async(
        "q0 empty with nothing unacked",
        Duration::from_secs(10),
        || async {
            let (status, body) = call(&nodes[0], "GET", "/api/queues/%2F/q0", None);
            status == 200 && serde_json::from_str::<Value>(&body).is_ok_and(|q| q["messages"] == 0)
        },
    )
    .await;
    ch1.basic_cancel("c2".into(), Default::default())
        .await
        .expect("cancel through node 1");

    // A queue of node 2, bound through node 0: node 0's publish reaches it.
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    ch2.queue_declare("q2".into(), durable, FieldTable::default())
        .await
        .expect("q2 on node 2");
    let (_c0, ch0) = amqp(nodes[0].amqp).await;
    queue_on(&nodes[0], "q2", "q2 on node 0").await;
    ch0.queue_bind(
        "q2".into(),
        "orders".into(),
        "pay.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind q2 through node 0");
    assert_eq!(
        publish_confirmed(&ch0, "orders", "pay.cash", "c", 3).await,
        3
    );
    assert_eq!(drain(&ch2, "q2").await, vec!["c0", "c1", "c2"]);
    assert_eq!(drain(&ch0, "q0").await, vec!["c0", "c1", "c2"]);

    // A queue deleted through another node goes everywhere.
    ch0.queue_delete("q2".into(), QueueDeleteOptions::default())
        .await
        .expect("delete q2 through node 0");
    for n in &nodes {
        eventually_async("q2 gone", Duration::from_secs(10), || async {
            let (_c, ch) = amqp(n.amqp).await;
            passive_queue(&ch, "q2").await.is_err()
        })
        .await;
    }

    // A stream of node 0: appended to through node 1, read through node 2
    // from its first offset.
    {
        use lapin::types::AMQPValue;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        let (_c, ch) = amqp(nodes[0].amqp).await;
        ch.queue_declare("log".into(), durable, args)
            .await
            .expect("a stream on node 0");
        queue_on(&nodes[1], "log", "the stream on node 1").await;
        let (_c, ch) = amqp(nodes[1].amqp).await;
        assert_eq!(publish_confirmed(&ch, "", "log", "s", 5).await, 5);
        queue_on(&nodes[2], "log", "the stream on node 2").await;
        let (_c, ch) = amqp(nodes[2].amqp).await;
        ch.basic_qos(10, Default::default()).await.expect("qos");
        let mut from = FieldTable::default();
        from.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut c = ch
            .basic_consume(
                "log".into(),
                "r".into(),
                BasicConsumeOptions::default(),
                from,
            )
            .await
            .expect("read the stream through node 2");
        for i in 0..5 {
            let d = warren_tests::lapin_util::next_delivery(&mut c).await;
            assert_eq!(d.data, format!("s{i}").into_bytes());
            let offset = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-stream-offset").cloned());
            assert_eq!(offset, Some(AMQPValue::LongLongInt(i)), "offset of s{i}");
            d.ack(Default::default()).await.expect("ack");
        }
    }

    // Direct reply-to across nodes: a requester on node 0, its request in a
    // queue of node 1, the replier on node 2.
    {
        use lapin::options::{BasicGetOptions, BasicPublishOptions};
        let (_cr, req) = amqp(nodes[0].amqp).await;
        let mut replies = req
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("reply consumer");
        let (_c1, ch1) = amqp(nodes[1].amqp).await;
        ch1.queue_declare(
            "rpc".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("rpc queue on node 1");
        for n in [&nodes[0], &nodes[2]] {
            queue_on(n, "rpc", "rpc everywhere").await;
        }
        req.basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            b"ping",
            lapin::BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .expect("request");
        let (_c2, rep) = amqp(nodes[2].amqp).await;
        let mut request = None;
        for _ in 0..50 {
            request = rep
                .basic_get("rpc".into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get through node 2");
            if request.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let request = request.expect("the request reached node 1's queue");
        let to = request
            .delivery
            .properties
            .reply_to()
            .clone()
            .expect("a reply address");
        rep.basic_publish(
            "".into(),
            to.as_str().into(),
            BasicPublishOptions::default(),
            b"pong",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("reply");
        let d = warren_tests::lapin_util::next_delivery(&mut replies).await;
        assert_eq!(d.data, b"pong");
    }

    // A definitions file imported through one node is the cluster's.
    let defs = serde_json::json!({
        "users": [{"name": "imp", "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ""}],
        "vhosts": [{"name": "impv"}],
        "permissions": [{"user": "guest", "vhost": "impv", "configure": ".*", "write": ".*", "read": ".*"}],
        "exchanges": [{"name": "imp.x", "vhost": "impv", "type": "fanout", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
        "queues": [{"name": "imp.q", "vhost": "impv", "durable": true, "auto_delete": false, "arguments": {}}],
        "bindings": [{"source": "imp.x", "vhost": "impv", "destination": "imp.q", "destination_type": "queue", "routing_key": "", "arguments": {}}],
    });
    let (status, body) = call(&nodes[1], "POST", "/api/definitions", Some(defs));
    assert!(status == 201 || status == 204, "{status} {body}");
    eventually(
        "the imported binding on node 2",
        Duration::from_secs(10),
        || {
            let (status, body) = call(&nodes[2], "GET", "/api/bindings/impv/e/imp.x/q/imp.q", None);
            status == 200 && body.contains("imp.q")
        },
    );
    let (status, _) = call(&nodes[0], "GET", "/api/users/imp", None);
    assert_eq!(status, 200);
    let (status, body) = call(&nodes[0], "GET", "/api/queues/impv/imp.q", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&nodes[1].name), "{body}");

    // Node 2's queue while node 2 is down: 404 as RabbitMQ words it, and
    // a publish to it is nacked, not lost quietly.
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    ch2.queue_declare("q3".into(), durable, FieldTable::default())
        .await
        .expect("q3 on node 2");
    queue_on(&nodes[0], "q3", "q3 on node 0").await;
    assert_eq!(publish_confirmed(&ch0, "", "q3", "d", 2).await, 2);
    // A consumer through node 0 of node 2's queue.
    let (_cc, chc) = amqp(nodes[0].amqp).await;
    let mut c3 = chc
        .basic_consume(
            "q3".into(),
            "c3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume q3 through node 0");
    for _ in 0..2 {
        warren_tests::lapin_util::next_delivery(&mut c3).await;
    }
    daemons[2].take().expect("running").kill();
    // Its queue's node gone, the consumer is cancelled (basic.cancel),
    // as RabbitMQ does.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        use futures_lite::StreamExt;
        while let Some(d) = c3.next().await {
            d.expect("no error before the cancel");
        }
    })
    .await;
    assert!(ended.is_ok(), "the consumer was not cancelled");
    let (_c, ch) = amqp(nodes[0].amqp).await;
    let e = passive_queue(&ch, "q3").await.expect_err("home down");
    assert_eq!(code(&e), Some(404), "{e}");
    assert!(e.to_string().contains("is down or inaccessible"), "{e}");
    let (_c0, ch0) = amqp(nodes[0].amqp).await;
    assert_eq!(publish_confirmed(&ch0, "", "q3", "e", 1).await, 0);
    // Changes while it is down reach it when it returns; its messages
    // are still there.
    ch0.queue_declare("q4".into(), durable, FieldTable::default())
        .await
        .expect("q4 while node 2 is down");
    daemons[2] = Some(nodes[2].start(&dirs[2], &peers, &secret));
    eventually_async("node 2 back with q4", Duration::from_secs(30), || async {
        let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", nodes[2].amqp);
        let Ok(c) = lapin::Connection::connect(&url, Default::default()).await else {
            return false;
        };
        let Ok(ch) = c.create_channel().await else {
            return false;
        };
        passive_queue(&ch, "q4").await.is_ok()
    })
    .await;
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    assert_eq!(drain(&ch2, "q3").await, vec!["d0", "d1"]);

    // A node that dies holding unacked messages of another node's queue:
    // once its lease runs out they are back in the queue.
    let (_c0, ch0) = amqp(nodes[0].amqp).await;
    assert_eq!(publish_confirmed(&ch0, "", "q4", "f", 3).await, 3);
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    let mut c4 = ch2
        .basic_consume(
            "q4".into(),
            "c4".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume q4 through node 2");
    for _ in 0..3 {
        warren_tests::lapin_util::next_delivery(&mut c4).await;
    }
    daemons[2].take().expect("running").kill();
    eventually_async("q4's messages back", Duration::from_secs(30), || async {
        let (_c, ch) = amqp(nodes[0].amqp).await;
        passive_queue(&ch, "q4")
            .await
            .is_ok_and(|q| q.message_count() == 3)
    })
    .await;
    drop(daemons);
}

/// A quorum queue's leader, as a node's API shows it.
fn qq_leader(n: &Node, name: &str) -> Option<String> {
    let (status, body) = call(n, "GET", &format!("/api/queues/%2F/{name}"), None);
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["leader"].as_str().map(str::to_owned)
}

/// A quorum queue declared through one node is a Raft group of all three:
/// publishes through any node are confirmed once a majority has them, and
/// consumed through any node in each publisher's order. When its leader is
/// SIGKILLed, the others elect one within seconds: clients connected to
/// them keep their connections, publishes go on being confirmed, the
/// consumer keeps consuming and gets its unacked messages again, marked
/// redelivered, and nothing confirmed is lost. The killed node comes back
/// and agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_survives_the_loss_of_its_leader() {
    use futures_lite::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use warren_tests::lapin_util::passive_queue;
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("qq", 3);
    let peers = peer_list(&nodes);
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut daemons: Vec<Option<Daemon>> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Some(n.start(d, &peers, &secret)))
        .collect();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_c, ch) = amqp(nodes[0].amqp).await;
        match ch.queue_declare("qq".into(), durable, quorum.clone()).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never declared: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in &nodes[1..] {
        queue_on(n, "qq", "the quorum queue on every node").await;
    }
    let mut leader = None;
    eventually(
        "a leader all nodes agree on",
        Duration::from_secs(15),
        || {
            let ls: Vec<_> = nodes.iter().map(|n| qq_leader(n, "qq")).collect();
            leader = ls[0].clone();
            leader.is_some() && ls.iter().all(|l| *l == leader)
        },
    );
    let leader = leader.expect("leader");
    let li = nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("a node leads");
    let (a, b) = ((li + 1) % 3, (li + 2) % 3);

    // Publishes through both followers and the leader.
    let (_ca, cha) = amqp(nodes[a].amqp).await;
    let (_cb, chb) = amqp(nodes[b].amqp).await;
    let (_cl, chl) = amqp(nodes[li].amqp).await;
    assert_eq!(publish_confirmed(&cha, "", "qq", "a", 100).await, 100);
    assert_eq!(publish_confirmed(&chb, "", "qq", "b", 50).await, 50);
    assert_eq!(publish_confirmed(&chl, "", "qq", "l", 30).await, 30);
    for n in &nodes {
        eventually_async("every node counts 180", Duration::from_secs(10), || async {
            let (_c, ch) = amqp(n.amqp).await;
            passive_queue(&ch, "qq")
                .await
                .ok()
                .map(|q| q.message_count())
                == Some(180)
        })
        .await;
    }

    // A consumer through follower b holds 10 unacked.
    let (_cc, chc) = amqp(nodes[b].amqp).await;
    chc.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = chc
        .basic_consume(
            "qq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut held = Vec::new();
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery")
            .expect("open")
            .expect("delivery");
        assert!(!d.redelivered);
        held.push(String::from_utf8(d.data.clone()).expect("utf-8"));
    }
    let mut want: Vec<String> = (0..100).map(|i| format!("a{i}")).collect();
    want.extend((0..50).map(|i| format!("b{i}")));
    want.extend((0..30).map(|i| format!("l{i}")));
    assert_eq!(held, want[..10]);

    // The leader dies.
    let killed_at = Instant::now();
    daemons[li].take().expect("leader").kill();
    drop((_cl, chl));
    // Publishes through follower a go on, one at a time: one sent while
    // there is no leader is confirmed once a new one has it, or nacked
    // (sent to the dead leader), and then sent again.
    let mut failover = None;
    for i in 0..40 {
        let mut tries = 0;
        loop {
            let confirm = cha
                .basic_publish(
                    "".into(),
                    "qq".into(),
                    lapin::options::BasicPublishOptions::default(),
                    format!("c{i}").as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("basic.publish")
                .await
                .expect("confirm");
            if confirm.is_ack() {
                break;
            }
            tries += 1;
            assert!(tries < 50, "c{i} never confirmed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        failover.get_or_insert_with(|| killed_at.elapsed());
    }
    let mut new_leader = None;
    eventually("a new leader", Duration::from_secs(15), || {
        new_leader = qq_leader(&nodes[a], "qq").filter(|l| *l != leader);
        new_leader.is_some()
    });
    want.extend((0..40).map(|i| format!("c{i}")));

    // The consumer, on its same channel, gets everything: its 10 unacked
    // again (redelivered), then the rest, each publisher's in order.
    let mut got: Vec<(String, bool)> = Vec::new();
    while got.len() < want.len() {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} deliveries: {got:?}", got.len()))
            .expect("open")
            .expect("delivery");
        let body = String::from_utf8(d.data.clone()).expect("utf-8");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        if !got.iter().any(|(b, _)| *b == body) {
            got.push((body, d.redelivered));
        }
    }
    let bodies: Vec<&str> = got.iter().map(|(b, _)| b.as_str()).collect();
    for p in ["a", "b", "l", "c"] {
        let mine: Vec<&str> = bodies
            .iter()
            .copied()
            .filter(|b| b.starts_with(p))
            .collect();
        let expected: Vec<&str> = want
            .iter()
            .map(String::as_str)
            .filter(|b| b.starts_with(p))
            .collect();
        assert_eq!(mine, expected, "publisher {p}'s messages, in order");
    }
    for h in &held {
        assert!(
            got.iter().any(|(b, r)| b == h && *r),
            "{h} again, redelivered"
        );
    }
    eprintln!("quorum queue failover: confirms went on {failover:?} after the leader's kill; new leader {new_leader:?}");

    // The killed node returns and agrees: nothing left.
    daemons[li] = Some(nodes[li].start(&dirs[li], &peers, &secret));
    for n in &nodes {
        eventually_async("every node counts 0", Duration::from_secs(30), || async {
            let (_c, ch) = amqp(n.amqp).await;
            passive_queue(&ch, "qq")
                .await
                .ok()
                .map(|q| q.message_count())
                == Some(0)
        })
        .await;
    }
    drop(daemons);
}

/// A quorum queue's members change at run time through any node's API
/// (`rabbitmq-queues add_member` / `delete_member`'s endpoints), under a
/// publisher's load: a new member catches up and can take over, a removed
/// one hands over, and every publish confirmed meanwhile is kept; and
/// `POST /api/rebalance/queues` moves leaders off a node that leads more
/// than its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_members_change_and_leaders_rebalance() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use warren_tests::lapin_util::drain;
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "shared").expect("secret file");
    let nodes = make_nodes("qm", 3);
    let peers = peer_list(&nodes);
    let _daemons: Vec<Daemon> = (0..3)
        .map(|i| nodes[i].start(&tmp.path().join(format!("n{i}")), &peers, &secret))
        .collect();
    let quorum = |size: i64| {
        let mut a = FieldTable::default();
        a.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        a.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(size),
        );
        a
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_c, ch) = amqp(nodes[0].amqp).await;
        match ch.queue_declare("m1".into(), durable, quorum(1)).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never declared: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_c0, ch0) = amqp(nodes[0].amqp).await;
    for q in ["m2", "m3", "m4"] {
        ch0.queue_declare(q.into(), durable, quorum(3))
            .await
            .expect("declare");
    }
    ch0.queue_declare("classic".into(), durable, FieldTable::default())
        .await
        .expect("declare");
    let members = |n: &Node, q: &str| -> Vec<String> {
        let (_, body) = call(n, "GET", &format!("/api/queues/%2F/{q}"), None);
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        let mut m: Vec<String> = serde_json::from_value(v["members"].clone()).unwrap_or_default();
        m.sort();
        m
    };
    eventually("m1 led by node 0 alone", Duration::from_secs(15), || {
        members(&nodes[0], "m1") == vec![nodes[0].name.clone()]
            && qq_leader(&nodes[0], "m1").as_deref() == Some(nodes[0].name.as_str())
    });
    let replicas = |n: &Node, q: &str, op: &str, node: &str| {
        call(
            n,
            "POST",
            &format!("/api/queues/quorum/%2F/{q}/replicas/{op}"),
            Some(serde_json::json!({ "node": node })),
        )
    };
    // Refusals: not a cluster member, already a member, not a quorum queue,
    // the last member.
    let (s, b) = replicas(&nodes[1], "m1", "add", "warren@nowhere");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("not a member of the cluster"), "{b}");
    let (s, b) = replicas(&nodes[1], "m1", "add", &nodes[0].name);
    assert!(s == 400 && b.contains("already a member"), "{s} {b}");
    let (s, b) = replicas(&nodes[1], "classic", "add", &nodes[1].name);
    assert!(s == 400 && b.contains("not a quorum queue"), "{s} {b}");
    let (s, b) = replicas(&nodes[2], "m1", "delete", &nodes[0].name);
    assert!(s == 400 && b.contains("last member"), "{s} {b}");

    // Under load: a publisher through node 2 while the members change.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, port) = (stop.clone(), nodes[2].amqp);
        tokio::spawn(async move {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            let (_c, ch) = amqp(port).await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!("y{i}");
                i += 1;
                let c = ch
                    .basic_publish(
                        "".into(),
                        "m1".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("basic.publish")
                    .await
                    .expect("confirm");
                if c.is_ack() {
                    acked.push(body);
                }
            }
            acked
        })
    };

    // Node 1 joins m1 (asked through node 2, outside the group).
    let (s, b) = replicas(&nodes[2], "m1", "add", &nodes[1].name);
    assert_eq!(s, 204, "{b}");
    let both = {
        let mut v = vec![nodes[0].name.clone(), nodes[1].name.clone()];
        v.sort();
        v
    };
    eventually("m1 on nodes 0 and 1", Duration::from_secs(15), || {
        members(&nodes[1], "m1") == both
    });
    let (_c2, ch2) = amqp(nodes[2].amqp).await;
    assert_eq!(publish_confirmed(&ch2, "", "m1", "x", 10).await, 10);
    // Node 0 leaves: node 1, caught up, leads and has every message.
    let (s, b) = replicas(&nodes[1], "m1", "delete", &nodes[0].name);
    assert_eq!(s, 204, "{b}");
    eventually("m1 led by node 1 alone", Duration::from_secs(15), || {
        members(&nodes[1], "m1") == vec![nodes[1].name.clone()]
            && qq_leader(&nodes[1], "m1").as_deref() == Some(nodes[1].name.as_str())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await.expect("the publisher");
    assert!(
        !acked.is_empty(),
        "nothing confirmed while the members changed"
    );
    let got = drain(&ch2, "m1").await;
    let xs: Vec<String> = got.iter().filter(|m| m.starts_with('x')).cloned().collect();
    assert_eq!(xs, (0..10).map(|i| format!("x{i}")).collect::<Vec<_>>());
    for m in &acked {
        assert!(
            got.contains(m),
            "{m} was confirmed while the members changed, and is gone"
        );
    }
    eprintln!(
        "members changed under load: {} publishes confirmed meanwhile, all kept",
        acked.len()
    );

    // m2..m4 are led by node 0 (their declaring node): a rebalance moves
    // leaders to the others.
    eventually("m2..m4 led by node 0", Duration::from_secs(15), || {
        ["m2", "m3", "m4"]
            .iter()
            .all(|q| qq_leader(&nodes[0], q).as_deref() == Some(nodes[0].name.as_str()))
    });
    let (s, b) = call(
        &nodes[2],
        "POST",
        "/api/rebalance/queues",
        Some(serde_json::json!({})),
    );
    assert_eq!(s, 200, "{b}");
    let moves: Vec<Value> = serde_json::from_str(&b).expect("moves");
    assert!(!moves.is_empty(), "{b}");
    // (A member whose log lags loses its election: as with RabbitMQ, an
    // operator runs the rebalance again.)
    let mut polls = 0;
    eventually("leaders spread", Duration::from_secs(30), || {
        let mut led = std::collections::HashMap::new();
        for q in ["m1", "m2", "m3", "m4"] {
            match qq_leader(&nodes[if q == "m1" { 1 } else { 0 }], q) {
                Some(l) => *led.entry(l).or_insert(0) += 1,
                None => return false,
            }
        }
        let spread = led.values().all(|n| *n <= 2) && led.len() >= 2;
        polls += 1;
        if !spread && polls % 15 == 0 {
            call(
                &nodes[2],
                "POST",
                "/api/rebalance/queues",
                Some(serde_json::json!({})),
            );
        }
        spread
    });
}
