//! A `warren` daemon process for tests: started on a loopback port and a
//! data directory, killed with SIGKILL.
#![allow(dead_code)]

use lapin::{Channel, Connection, ConnectionProperties};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    pub fn start(dir: &Path, port: u16) -> Daemon {
        Daemon::start_with(dir, port, &[])
    }

    /// Start with extra flags.
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "warn",
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn warren");
        let d = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "warren did not listen on {port}");
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

pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}
