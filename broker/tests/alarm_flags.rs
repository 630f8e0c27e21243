//! The daemon's `--memory-limit` and `--disk-free-limit` flags: bad values
//! are clear command-line errors, and a limit the process is already over
//! blocks a publisher with `connection.blocked`.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::{BasicProperties, Event};
use std::process::Command;
use std::time::Duration;
use warren_tests::daemon::{free_port, Daemon};

/// The daemon under test.
const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// Run the daemon with `args`; it must refuse them before starting.
fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(WARREN)
        .args(["--port", "0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .output()
        .expect("run warren");
    assert_eq!(out.status.code(), Some(2), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_limits_are_command_line_errors() {
    for (flag, value) in [
        ("--memory-limit", "lots"),
        ("--memory-limit", "1.5"),
        ("--memory-limit", "140%"),
        ("--memory-limit", "12 parsecs"),
        ("--disk-free-limit", "-1"),
        ("--disk-free-limit", "40%"),
        ("--disk-free-limit", "99999999999999TB"),
    ] {
        let err = refused(&[&format!("{flag}={value}")]);
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: unclear error: {err}"
        );
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
    }
}

#[test]
fn help_lists_the_limits() {
    let out = Command::new(WARREN)
        .arg("--help")
        .output()
        .expect("run warren");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--memory-limit"), "{help}");
    assert!(help.contains("--disk-free-limit"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_below_rss_blocks_publishers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let d = Daemon::start_with(WARREN, dir.path(), port, &["--memory-limit", "1MiB"]);
    let (conn, ch) = d.channel().await;
    let mut ev = Box::pin(conn.events_listener());
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.next().await {
                Some(Event::ConnectionBlocked(r)) => return r,
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .expect("connection.blocked within 10 s");
    assert_eq!(reason, "low on memory");
}
