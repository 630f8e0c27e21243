//! Broker configuration: what the daemon's flags set and tests override.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Where durable state lives.
    pub data_dir: PathBuf,
    /// Users and their passwords. `guest` may only connect from loopback.
    pub users: Vec<(String, String)>,
    /// Largest accepted message body (RabbitMQ's default: 16 MiB); 406 above.
    pub max_message_size: u64,
    /// channel_max proposed in connection.tune.
    pub channel_max: u16,
    /// frame_max proposed in connection.tune.
    pub frame_max: u32,
    /// Heartbeat (seconds) proposed in connection.tune.
    pub heartbeat: u16,
    /// Concurrent connections accepted; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed from TCP accept to connection.open.
    pub handshake_timeout: Duration,
    /// Sync the store's write-ahead log on every write. Off only for benchmarks.
    pub fsync: bool,
    /// Bytes of hot message bodies kept in memory for messages that live on
    /// disk (queues paging their tail).
    pub body_cache_bytes: u64,
}

/// Smallest frame_max a client may choose (AMQP 0-9-1 frame-min-size).
pub const FRAME_MIN: u32 = 4096;
/// Largest frame accepted before tune-ok: an unauthenticated peer cannot make
/// Warren buffer more than this.
pub const PRE_TUNE_FRAME_MAX: u32 = 8192;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:5672".parse().expect("valid address"),
            data_dir: PathBuf::from("data"),
            users: vec![("guest".into(), "guest".into())],
            max_message_size: 16 * 1024 * 1024,
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
            max_connections: 65536,
            handshake_timeout: Duration::from_secs(10),
            fsync: true,
            body_cache_bytes: 64 << 20,
        }
    }
}
