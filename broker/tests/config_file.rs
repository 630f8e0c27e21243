//! The daemon reads its settings from a TOML file (the example in the
//! repository must load as it is), under its flags and environment.

use std::process::Command;
use warren_tests::daemon::{free_port, Daemon};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_warren")
}

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../warren.example.toml")
}

#[test]
fn the_example_config_loads_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The example says port 5672 and data-dir "data": the flags win.
    let d = Daemon::start_with(
        bin(),
        &dir.path().join("data"),
        port,
        &["--config", example().to_str().unwrap()],
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
}

#[test]
fn a_bad_config_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("w.toml");
    std::fs::write(&cfg, "port = 1\nmemroy-limit = \"1GiB\"\n").unwrap();
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown key 'memroy-limit'") && err.contains("w.toml"),
        "{err}"
    );
    // A value the flag would refuse is refused from the file too.
    std::fs::write(&cfg, "memory-limit = \"lots\"\n").unwrap();
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("memory-limit"));
}

#[test]
fn the_environment_is_between_flags_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("w.toml");
    // The file asks for an invalid size; the environment overrides it.
    std::fs::write(&cfg, "disk-free-limit = \"bogus\"\n").unwrap();
    let port = free_port();
    let out = Command::new(bin())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("d"))
        .env("WARREN_DISK_FREE_LIMIT", "also-bogus")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("also-bogus"),
        "the environment's value was used: {err}"
    );
}
