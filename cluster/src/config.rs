//! Configuration of a cluster member.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use openraft::{Config, SnapshotPolicy};
use warren_storage::mem::MemStore;
use warren_storage::RaftLogStore;

use crate::error::ClusterError;

/// Snapshot bytes per InstallSnapshot request; well under the frame cap once encoded.
const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// Time allowed for one snapshot chunk to be sent and acknowledged.
const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 5_000;

/// How to start a cluster member.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Unique, stable node name; the Raft id is derived from it.
    pub name: String,
    /// Address to listen on for cluster traffic (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address other members dial (`HOST:PORT`); defaults to the bound address, and is
    /// required when listening on an unspecified address such as 0.0.0.0.
    pub advertise: Option<String>,
    /// Cluster addresses of the other initial members.
    pub peers: Vec<String>,
    /// Shared secret authenticating members to each other.
    pub secret: Vec<u8>,
    /// Leader heartbeat period, in milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout range, in milliseconds (randomized within it).
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// The same timings for application groups (quorum queues), shorter than the
    /// metadata group's: a queue's failover is what clients wait for. openraft lets no
    /// member vote for another until it has not heard from the leader for the
    /// longest election timeout, and a follower stands only after that plus its own
    /// timeout: failover takes one to two times `group_election_timeout_max_ms`.
    /// Defaults 100 ms and 300-600 ms: about 1.2 s failover on one machine, no
    /// spurious elections under a saturating load (BENCHMARKS.md), and a heartbeat
    /// per group and follower every 100 ms (many groups cost CPU: see the README).
    pub group_heartbeat_ms: u64,
    pub group_election_timeout_min_ms: u64,
    pub group_election_timeout_max_ms: u64,
    /// Build a snapshot after this many new log entries.
    pub snapshot_after_logs: u64,
    /// Log entries kept after a snapshot, so slightly lagging followers catch up from the
    /// log instead of receiving the whole snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Where the Raft log and vote are kept. Defaults to a fresh in-memory store, which
    /// lasts as long as the process: hand a node restarted in the same process the same
    /// store, and a durable engine to survive process restarts.
    pub log_store: Arc<dyn RaftLogStore>,
    /// TLS for cluster connections (None: plain TCP; the secret's handshake runs either
    /// way). Every member must use it or none.
    pub tls: Option<crate::net::ClusterTls>,
    /// Answers other members' application requests (None: refused).
    pub app: Option<Arc<dyn crate::net::AppHandler>>,
}

impl ClusterConfig {
    /// A configuration with default timings and no peers.
    pub fn new(name: impl Into<String>, listen: SocketAddr, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            listen,
            advertise: None,
            peers: Vec::new(),
            secret: secret.into(),
            heartbeat_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            group_heartbeat_ms: 100,
            group_election_timeout_min_ms: 300,
            group_election_timeout_max_ms: 600,
            snapshot_after_logs: 5000,
            logs_kept_after_snapshot: 1000,
            log_store: Arc::new(MemStore::new()),
            tls: None,
            app: None,
        }
    }

    /// Refuses configurations that cannot work, before anything is bound or started.
    pub(crate) fn check(&self) -> Result<(), ClusterError> {
        if self.name.is_empty() {
            return Err(ClusterError::Config("node name must not be empty".into()));
        }
        if self.secret.is_empty() {
            return Err(ClusterError::Config(
                "cluster secret must not be empty".into(),
            ));
        }
        self.raft_config().map(|_| ())
    }

    /// The address peers should dial, given the address actually bound.
    pub(crate) fn advertise_for(&self, bound: SocketAddr) -> Result<String, ClusterError> {
        match &self.advertise {
            Some(a) => Ok(a.clone()),
            None if bound.ip().is_unspecified() => Err(ClusterError::Config(format!(
                "listening on {bound}: set an advertise address peers can dial"
            ))),
            None => Ok(bound.to_string()),
        }
    }

    pub(crate) fn raft_config(&self) -> Result<Arc<Config>, ClusterError> {
        self.raft_config_with(
            self.heartbeat_ms,
            self.election_timeout_min_ms,
            self.election_timeout_max_ms,
        )
    }

    /// openraft's configuration for application groups.
    pub(crate) fn group_raft_config(&self) -> Result<Arc<Config>, ClusterError> {
        self.raft_config_with(
            self.group_heartbeat_ms,
            self.group_election_timeout_min_ms,
            self.group_election_timeout_max_ms,
        )
    }

    fn raft_config_with(
        &self,
        heartbeat: u64,
        election_min: u64,
        election_max: u64,
    ) -> Result<Arc<Config>, ClusterError> {
        let cfg = Config {
            cluster_name: "warren".to_string(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_logs),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            // Chunks travel as JSON (bytes become number arrays, ~3.5x larger): keep them
            // small and give each one far more than openraft's 200 ms default.
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT_MS,
            ..Default::default()
        };
        cfg.validate()
            .map(Arc::new)
            .map_err(|e| ClusterError::Config(e.to_string()))
    }
}

/// Keeps the secret out of logs.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("election_timeout_min_ms", &self.election_timeout_min_ms)
            .field("election_timeout_max_ms", &self.election_timeout_max_ms)
            .field("group_heartbeat_ms", &self.group_heartbeat_ms)
            .field(
                "group_election_timeout_min_ms",
                &self.group_election_timeout_min_ms,
            )
            .field(
                "group_election_timeout_max_ms",
                &self.group_election_timeout_max_ms,
            )
            .field("snapshot_after_logs", &self.snapshot_after_logs)
            .field("logs_kept_after_snapshot", &self.logs_kept_after_snapshot)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_address_rules() {
        let mut cfg = ClusterConfig::new("a", "127.0.0.1:0".parse().expect("addr"), b"k".to_vec());
        let bound = "127.0.0.1:5672".parse().expect("addr");
        assert_eq!(cfg.advertise_for(bound).expect("bound"), "127.0.0.1:5672");
        let any = "0.0.0.0:5672".parse().expect("addr");
        assert!(matches!(
            cfg.advertise_for(any),
            Err(ClusterError::Config(_))
        ));
        cfg.advertise = Some("rabbit-1:25672".into());
        assert_eq!(cfg.advertise_for(any).expect("explicit"), "rabbit-1:25672");
    }

    #[test]
    fn config_checks() {
        let listen = "127.0.0.1:0".parse().expect("addr");
        assert!(ClusterConfig::new("a", listen, b"k".to_vec())
            .check()
            .is_ok());
        assert!(ClusterConfig::new("", listen, b"k".to_vec())
            .check()
            .is_err());
        assert!(ClusterConfig::new("a", listen, Vec::new()).check().is_err());
        let mut bad = ClusterConfig::new("a", listen, b"k".to_vec());
        bad.election_timeout_min_ms = 100; // not above the heartbeat
        assert!(bad.check().is_err());
    }

    #[test]
    fn debug_redacts_secret() {
        let cfg = ClusterConfig::new(
            "a",
            "127.0.0.1:0".parse().expect("addr"),
            b"hunter2".to_vec(),
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("redacted"));
    }
}
