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
