//! Users, vhosts, permissions and definitions across process restarts:
//! what a definitions file creates survives SIGKILL, a blank node given a
//! file gets no guest, a bad file stops the start and changes nothing, and
//! `warren export-definitions` writes what another node imports.

use lapin::{Connection, ConnectionProperties};
use std::process::Command;
use warren_tests::daemon::{free_port, Daemon};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_warren")
}

/// A password hash in RabbitMQ's format (salt 0A0B0C0D, SHA-256).
fn rabbit_hash(password: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let salt = [0x0a, 0x0b, 0x0c, 0x0d];
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut raw = salt.to_vec();
    raw.extend(h.finalize());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn file(extra_queue: &str) -> String {
    format!(
        r#"{{
      "users": [{{"name": "alice", "password_hash": "{}", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]}}],
      "vhosts": [{{"name": "v1"}}],
      "permissions": [{{"user": "alice", "vhost": "v1", "configure": ".*", "write": ".*", "read": ".*"}}],
      "queues": [{{"name": "{extra_queue}", "vhost": "v1", "durable": true, "auto_delete": false, "arguments": {{"x-max-length": 10}}}}]
    }}"#,
        rabbit_hash("alice-pw")
    )
}

async fn login(port: u16, user: &str, pass: &str, vhost: &str) -> lapin::Result<Connection> {
    let url = format!(
        "amqp://{user}:{pass}@127.0.0.1:{port}/{}",
        vhost.replace('/', "%2f")
    );
    Connection::connect(&url, ConnectionProperties::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_survive_sigkill_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let defs = dir.path().join("defs.json");
    std::fs::write(&defs, file("orders")).unwrap();
    let port = free_port();
    let d = Daemon::start_with(
        bin(),
        &data,
        port,
        &[
            "--log-level",
            "warn",
            "--definitions",
            defs.to_str().unwrap(),
        ],
    );
    let c = login(port, "alice", "alice-pw", "v1")
        .await
        .expect("alice logs in");
    let ch = c.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "orders".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(q.is_ok(), "the file's queue exists");
    assert!(
        login(port, "guest", "guest", "/").await.is_err(),
        "a blank node started with definitions has no guest"
    );
    d.kill();

    // Restarted without the file: everything is still there.
    let d = Daemon::start(bin(), &data, port);
    let c = login(port, "alice", "alice-pw", "v1")
        .await
        .expect("alice after SIGKILL");
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "orders".into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("queue after SIGKILL");
    assert!(login(port, "alice", "wrong", "v1").await.is_err());
    assert!(
        login(port, "guest", "guest", "/").await.is_err(),
        "no guest later either"
    );
    let _ = c.close(200, "bye".into()).await;
    let (status, _) = d.terminate();
    assert!(status.success());

    // A bad file: the start fails, naming every bad item; nothing changes.
    let bad = file("more")
        .replace("\".*\", \"write\"", "\"(\", \"write\"")
        .replace("\"x-max-length\": 10", "\"x-max-length\": -1");
    std::fs::write(&defs, bad).unwrap();
    let out = Command::new(bin())
        .args(["--port", &free_port().to_string(), "--data-dir"])
        .arg(&data)
        .args(["--definitions", defs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing changed"), "{err}");
    assert!(err.contains("invalid regular expression '('"), "{err}");
    assert!(err.contains("queue 'more' in vhost 'v1'"), "{err}");

    // Export, then import into a fresh node: alice's password still works.
    let out = Command::new(bin())
        .args(["export-definitions", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["name"] != "more"),
        "the bad file's queue was not created"
    );
    let exported = dir.path().join("exported.json");
    std::fs::write(&exported, &out.stdout).unwrap();
    let port2 = free_port();
    let d2 = Daemon::start_with(
        bin(),
        &dir.path().join("data2"),
        port2,
        &[
            "--log-level",
            "warn",
            "--definitions",
            exported.to_str().unwrap(),
        ],
    );
    let c = login(port2, "alice", "alice-pw", "v1")
        .await
        .expect("alice on the new node");
    let _ = c.close(200, "bye".into()).await;
    drop(d2);
}

/// What the management API changes at run time (users, vhosts, permissions,
/// policies, operator policies, limits) is stored before it is answered:
/// all of it is there after SIGKILL, and the policies are in force on the
/// recovered queue. A deleted vhost stays deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_changes_over_the_api_survive_sigkill() {
    use serde_json::json;
    use warren_tests::http::request;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, api_port) = (free_port(), free_port());
    let api_port_s = api_port.to_string();
    let flags = ["--log-level", "warn", "--management-port", &api_port_s];
    let api: std::net::SocketAddr = ([127, 0, 0, 1], api_port).into();
    let guest = ("guest", "guest");
    let d = Daemon::start_with(bin(), &data, port, &flags);
    let put = |path: &str, body: serde_json::Value| {
        let r = request(api, "PUT", path, guest, Some(&body));
        assert!(matches!(r.status, 201 | 204), "PUT {path}: {r:?}");
    };
    put("/api/vhosts/pay", json!({"description": "payments"}));
    put("/api/vhosts/gone", json!({}));
    put(
        "/api/users/carol",
        json!({"password": "c-pw", "tags": "management"}),
    );
    put(
        "/api/permissions/pay/carol",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    );
    put(
        "/api/policies/pay/cap",
        json!({"pattern": "^orders$", "definition": {"max-length": 5}, "apply-to": "queues"}),
    );
    put(
        "/api/operator-policies/pay/op",
        json!({"pattern": ".*", "definition": {"max-length": 3}}),
    );
    put("/api/vhost-limits/pay/max-connections", json!({"value": 4}));
    put("/api/user-limits/carol/max-channels", json!({"value": 2}));
    assert_eq!(
        request(api, "DELETE", "/api/vhosts/gone", guest, None).status,
        204
    );
    {
        let c = login(port, "carol", "c-pw", "pay")
            .await
            .expect("carol logs in");
        let ch = c.create_channel().await.unwrap();
        ch.queue_declare(
            "orders".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
        c.close(200, "bye".into()).await.unwrap();
    }
    d.kill();
    let _d = Daemon::start_with(bin(), &data, port, &flags);
    let get = |path: &str| {
        let r = request(api, "GET", path, guest, None);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.json()
    };
    assert_eq!(get("/api/vhosts/pay")["description"], "payments");
    assert_eq!(
        request(api, "GET", "/api/vhosts/gone", guest, None).status,
        404
    );
    assert_eq!(get("/api/users/carol")["tags"], json!(["management"]));
    assert_eq!(get("/api/permissions/pay/carol")["write"], ".*");
    assert_eq!(
        get("/api/policies/pay/cap")["definition"],
        json!({"max-length": 5})
    );
    assert_eq!(
        get("/api/vhost-limits/pay"),
        json!([{"vhost": "pay", "value": {"max-connections": 4}}])
    );
    assert_eq!(
        get("/api/user-limits/carol"),
        json!([{"user": "carol", "value": {"max-channels": 2}}])
    );
    let q = get("/api/queues/pay/orders");
    assert_eq!(q["policy"], "cap");
    assert_eq!(q["operator_policy"], "op");
    assert_eq!(q["effective_policy_definition"], json!({"max-length": 3}));
    // In force: the operator policy's limit.
    let c = login(port, "carol", "c-pw", "pay")
        .await
        .expect("carol logs in again");
    let ch = c.create_channel().await.unwrap();
    for _ in 0..6 {
        ch.basic_publish(
            "".into(),
            "orders".into(),
            Default::default(),
            b"o",
            Default::default(),
        )
        .await
        .unwrap();
    }
    warren_tests::lapin_util::wait_count(&ch, "orders", 3).await;
}
