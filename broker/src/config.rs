//! Broker configuration: what the daemon's flags set and tests override.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on for plain AMQP (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Serve plain AMQP on `listen` (off: TLS only).
    pub plain: bool,
    /// The AMQPS listener, if any.
    pub tls: Option<TlsListener>,
    /// Where the management HTTP API listens (None: off).
    pub management: Option<SocketAddr>,
    /// Serve the management API over TLS, with the AMQPS listener's
    /// certificate and client-certificate settings.
    pub management_tls: bool,
    /// Where the Prometheus metrics are served (None: off).
    pub prometheus: Option<SocketAddr>,
    /// Where durable state lives.
    pub data_dir: PathBuf,
    /// The user a blank node is given (administrator, full permissions on
    /// the vhost `/`), as RabbitMQ's `default_user` / `default_pass`. Not
    /// created when definitions are imported at boot.
    pub default_user: Option<(String, String)>,
    /// Users who may connect only from a loopback address (RabbitMQ's
    /// `loopback_users`).
    pub loopback_users: Vec<String>,
    /// A definitions file (RabbitMQ's JSON) imported at every start, as
    /// RabbitMQ's `load_definitions`. A blank node given one gets no
    /// default user.
    pub definitions: Option<PathBuf>,
    /// Largest accepted message body (RabbitMQ's default: 16 MiB); 406 above.
    pub max_message_size: u64,
    /// channel_max proposed in connection.tune.
    pub channel_max: u16,
    /// frame_max proposed in connection.tune.
    pub frame_max: u32,
    /// Heartbeat (seconds) proposed in connection.tune.
    pub heartbeat: u16,
    /// Open (authenticated) connections at most; one more is refused at
    /// connection.open with 530, as RabbitMQ's node connection limit.
    pub max_connections: usize,
    /// Connections still in the handshake (not yet authenticated) at most,
    /// apart from `max_connections`: sockets that never authenticate cannot
    /// lock real clients out. One more is closed at once.
    pub max_handshakes: usize,
    /// Connections in the handshake from one source address at most.
    pub max_handshakes_per_source: usize,
    /// Time allowed from TCP accept to connection.open.
    pub handshake_timeout: Duration,
    /// A connection whose socket takes no bytes for this long is closed
    /// (its unacked messages go back to their queues); with heartbeats on,
    /// two heartbeat intervals instead. RabbitMQ's send timeout is 15 s.
    pub write_timeout: Duration,
    /// A delivery left unacknowledged longer than this (ms) times its
    /// consumer out, on every queue that sets no `x-consumer-timeout` of its
    /// own (RabbitMQ's `consumer_timeout`). None: off.
    pub consumer_timeout: Option<u64>,
    /// Sync the store's write-ahead log on every write. Off only for benchmarks.
    pub fsync: bool,
    /// How long a store write of a few messages may wait for the acks that
    /// cancel it (see `persist::CommitWait`). Zero: never.
    pub commit_wait: Duration,
    /// Bytes of hot message bodies kept in memory for messages that live on
    /// disk (queues paging their tail).
    pub body_cache_bytes: u64,
    /// Memory high watermark in bytes: at or above it (process RSS) the
    /// memory alarm blocks publishers. 0 blocks every publisher.
    pub memory_limit: u64,
    /// Free disk space (of `data_dir`) in bytes below which the disk alarm
    /// blocks publishers. 0 disables the disk alarm.
    pub disk_free_limit: u64,
    /// This node's name, as RabbitMQ names nodes (`warren@` + host name by
    /// default); unique in a cluster.
    pub node_name: String,
    /// Clustering (None: a node on its own).
    pub cluster: Option<ClusterSettings>,
}

/// How a node takes part in a cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    /// Where the cluster port listens (`--cluster-port` on `--bind`).
    pub listen: SocketAddr,
    /// The address other nodes dial (default: `listen`, which must then
    /// not be a wildcard).
    pub advertise: Option<String>,
    /// The other initial members' cluster addresses (`host:port`).
    pub peers: Vec<String>,
    /// The secret nodes authenticate each other with (as the Erlang
    /// cookie).
    pub secret: Vec<u8>,
    /// TLS between nodes, with these certificate files (None: plain TCP).
    pub tls: Option<crate::tls::TlsSettings>,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("tls", &self.tls)
            .finish()
    }
}

/// The node's name, set once per process when the broker starts (a daemon
/// runs one broker; brokers started in one test process share the first
/// one's name).
static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// This process's node name (see [`Config::node_name`]).
pub fn node_name() -> &'static str {
    NODE_NAME.get_or_init(default_node_name)
}

/// Name the process's node (the first call wins).
pub(crate) fn set_node_name(name: &str) {
    let _ = NODE_NAME.set(name.to_owned());
}

/// `warren@` and the host's name: the default node name.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("warren@{host}")
}

/// The AMQPS listener: where, and its certificates.
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub settings: crate::tls::TlsSettings,
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
            plain: true,
            tls: None,
            management: None,
            management_tls: false,
            prometheus: None,
            data_dir: PathBuf::from("data"),
            default_user: Some(("guest".into(), "guest".into())),
            loopback_users: vec!["guest".into()],
            definitions: None,
            max_message_size: 16 * 1024 * 1024,
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
            max_connections: 65536,
            max_handshakes: 1024,
            max_handshakes_per_source: 128,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(15),
            consumer_timeout: None,
            fsync: true,
            commit_wait: Duration::from_micros(crate::persist::COMMIT_WAIT_US),
            body_cache_bytes: 64 << 20,
            memory_limit: MemoryLimit::Fraction(crate::alarm::DEFAULT_MEMORY_FRACTION)
                .resolve()
                .unwrap_or(u64::MAX),
            disk_free_limit: crate::alarm::DEFAULT_DISK_FREE_LIMIT,
            node_name: default_node_name(),
            cluster: None,
        }
    }
}

/// `--memory-limit`: an absolute size or a fraction of the memory this
/// process may use (see [`crate::alarm::total_memory`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryLimit {
    Absolute(u64),
    Fraction(f64),
}

impl MemoryLimit {
    /// The limit in bytes; an error when a fraction is given and the total
    /// memory cannot be read.
    pub fn resolve(self) -> Result<u64, String> {
        match self {
            MemoryLimit::Absolute(n) => Ok(n),
            MemoryLimit::Fraction(f) => {
                let total = crate::alarm::total_memory().ok_or_else(|| {
                    "cannot read the total memory (/proc/meminfo); give the memory limit as an absolute size such as 2GiB".to_owned()
                })?;
                Ok((total as f64 * f) as u64)
            }
        }
    }
}

/// Parse a memory limit: "0.4" or "40%" (a fraction of total memory), or an
/// absolute size as [`parse_size`] accepts ("512MiB", "2GB", "1073741824").
pub fn parse_memory_limit(s: &str) -> Result<MemoryLimit, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a percentage such as 40%"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("'{s}': a percentage must be between 0% and 100%"));
        }
        return Ok(MemoryLimit::Fraction(p / 100.0));
    }
    if t.contains('.') && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let f: f64 = t
            .parse()
            .map_err(|_| format!("'{s}' is not a fraction such as 0.4"))?;
        if !(0.0..=1.0).contains(&f) {
            return Err(format!(
                "'{s}': a fraction of total memory must be between 0 and 1 (for bytes, add a unit such as GiB)"
            ));
        }
        return Ok(MemoryLimit::Fraction(f));
    }
    parse_size(s).map(MemoryLimit::Absolute)
}

/// Parse a size in bytes: a number with an optional unit, as RabbitMQ reads
/// its information units: `kB`/`KB`, `MB`, `GB`, `TB` are powers of 1000;
/// `k`/`K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` powers of 1024; `B` or no
/// unit is bytes. A fractional number needs a unit ("1.5GiB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size (examples: 1073741824, 512MiB, 2GB)"
        ));
    }
    let mult: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "MB" => 1000_u64.pow(2),
        "GB" => 1000_u64.pow(3),
        "TB" => 1000_u64.pow(4),
        "k" | "K" | "KiB" | "kiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "'{s}': unknown unit '{other}' (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    if num.contains('.') {
        if mult == 1 {
            return Err(format!("'{s}': a fractional size needs a unit such as GiB"));
        }
        let f: f64 = num.parse().map_err(|_| format!("'{s}' is not a number"))?;
        let bytes = f * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("'{s}' is too large"));
        }
        return Ok(bytes as u64);
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("1.2.3GB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn memory_limits() {
        assert_eq!(parse_memory_limit("0.4"), Ok(MemoryLimit::Fraction(0.4)));
        assert_eq!(parse_memory_limit("40%"), Ok(MemoryLimit::Fraction(0.4)));
        assert_eq!(
            parse_memory_limit("512MiB"),
            Ok(MemoryLimit::Absolute(512 << 20))
        );
        assert_eq!(
            parse_memory_limit("1073741824"),
            Ok(MemoryLimit::Absolute(1 << 30))
        );
        assert!(parse_memory_limit("1.5").is_err());
        assert!(parse_memory_limit("140%").is_err());
        assert!(parse_memory_limit("lots").is_err());
        let total = crate::alarm::total_memory().expect("Linux");
        let half = MemoryLimit::Fraction(0.5).resolve().expect("resolves");
        assert!(half.abs_diff(total / 2) <= 1);
    }
}
