//! A broker that stopped on a full disk starts again: it recovers, raises
//! the disk alarm (publishers blocked) and serves consumers, so draining can
//! free space; when space comes back, publishing resumes. The data
//! directory is on a small tmpfs made for the test (needs root to mount;
//! skipped, with a note, where mounting is not allowed).

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use warren_tests::daemon::{free_port, Daemon};
use warren_tests::within;

/// The broker under test: this build's, or `WARREN_TEST_BIN` (to check
/// that an older build fails this test).
fn bin() -> String {
    std::env::var("WARREN_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_warren").into())
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(warren_tests::unique("warren-full-disk"));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Write a file until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).and_then(|()| f.sync_data()).is_err() {
            break;
        }
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_on_a_full_disk_starts_drains_and_resumes() {
    let Some(fs) = Tmpfs::mount("256m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let data = fs.0.join("data");
    let port = free_port();
    let flags = ["--log-level", "info", "--disk-free-limit", "1MB"];
    // After the restart, more than a full disk's worth is asked to be free
    // (RocksDB gives back its preallocated log files as it opens): the
    // alarm is on until the filler goes.
    let full_flags = ["--log-level", "info", "--disk-free-limit", "200MB"];
    let n = 200u32;
    let q = "full-disk";
    {
        let d = Daemon::start_with(bin(), &data, port, &flags);
        let (_c, ch) = d.channel().await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        for _ in 0..n {
            ch.basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                &[7u8; 4096],
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .expect("confirmed");
        }
        // A crash: what is in RocksDB's WAL must be replayed at the next start.
        d.kill();
    }
    let filler = fill(&fs.0);

    // It starts on the full disk ...
    let d = Daemon::start_with(bin(), &data, port, &full_flags);
    let (_c, ch) = d.channel().await;
    // ... with publishers blocked: a confirm does not come while the alarm is
    // on. (The publish that finds the alarm on is taken, as RabbitMQ takes
    // it; then the connection stops reading and the next one waits. lapin
    // may also hold it back itself once it hears connection.blocked, so
    // both go from a task of their own.)
    let (_pc, pub_ch) = d.channel().await;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publishing = tokio::spawn(async move {
        let mut confirms = Vec::new();
        for body in [&b"first"[..], b"second"] {
            let c = pub_ch
                .basic_publish(
                    "".into(),
                    q.into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
            confirms.push(c);
        }
        for c in confirms {
            assert!(c.await.expect("confirm").is_ack());
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !publishing.is_finished(),
        "publishes were confirmed on a full disk"
    );
    // ... and consumers are served: every confirmed message comes back.
    let mut got = 0;
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(m.delivery.data.len(), 4096);
        got += 1;
    }
    assert_eq!(got, n, "every confirmed message is served on the full disk");
    // Space comes back: the alarm clears and the held publish is confirmed.
    std::fs::remove_file(&filler).unwrap();
    within(
        "the held publishes are confirmed once space is back",
        publishing,
    )
    .await
    .expect("publisher task");
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("disk resource limit alarm set"), "{log}");
    assert!(log.contains("disk resource limit alarm cleared"), "{log}");
}
