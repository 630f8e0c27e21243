//! A `warren` daemon process for tests: started on a loopback port and a
//! data directory, killed with SIGKILL. The binary's path is an argument:
//! `env!("CARGO_BIN_EXE_warren")` exists only in the broker crate's own
//! integration tests.

use lapin::{Channel, Connection, ConnectionProperties};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A warren daemon on a loopback port, killed with SIGKILL when dropped.
pub struct Daemon {
    child: Child,
    pub port: u16,
}

impl Daemon {
    /// Start the `warren` binary at `bin` on `dir` and `port`.
    pub fn start(bin: impl AsRef<OsStr>, dir: &Path, port: u16) -> Daemon {
        Daemon::start_with(bin, dir, port, &["--log-level", "warn"])
    }

    /// Start with extra command-line flags (after the defaults, which they
    /// must not repeat). The management API is off unless `extra` gives
    /// `--management-port`.
    pub fn start_with(bin: impl AsRef<OsStr>, dir: &Path, port: u16, extra: &[&str]) -> Daemon {
        // Logs (stdout) and errors (stderr) go to one file, shown on failure.
        let log = std::env::temp_dir().join(format!("warren-test-daemon-{port}.log"));
        let out = std::fs::File::create(&log).expect("daemon log file");
        let child = Command::new(bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--data-dir",
            ])
            .arg(dir)
            .args(if extra.contains(&"--management-port") {
                &[][..]
            } else {
                &["--management-port", "0"][..]
            })
            .args(if extra.contains(&"--prometheus-port") {
                &[][..]
            } else {
                &["--prometheus-port", "0"][..]
            })
            .args(extra)
            .stdout(out.try_clone().expect("daemon log file"))
            .stderr(out)
            .spawn()
            .expect("spawn warren");
        let mut d = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = d.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("warren did not listen on {port} ({exited:?}); its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port);
        let c = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:") * 1024
    }

    /// Anonymous resident memory of the process now (RssAnon: heap, stacks;
    /// not the binary's file-backed pages), in bytes.
    pub fn anon_rss(&self) -> u64 {
        status_kib(self.child.id(), "RssAnon:") * 1024
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        status_kib(self.child.id(), "VmRSS:") * 1024
    }

    /// SIGTERM, then wait (up to a minute) for the process to exit; returns
    /// its exit status and its log.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for warren") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "warren did not exit within a minute of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = std::env::temp_dir().join(format!("warren-test-daemon-{}.log", self.port));
        (status, std::fs::read_to_string(log).unwrap_or_default())
    }

    /// Send a signal (SIGHUP: reload TLS files).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
