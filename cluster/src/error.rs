//! Error type of the cluster crate.

use std::io;

/// Errors returned by the transport and by [`crate::ClusterNode`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Socket-level failure.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),

    /// The peer does not share our secret (or is not a Warren cluster node).
    #[error("authentication with {peer} failed")]
    AuthFailed { peer: String },

    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),

    /// A frame header announced (or a message needed) more than the frame cap.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    FrameTooLarge { len: usize, max: usize },

    /// The peer sent something we did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// The connection closed while a request was in flight.
    #[error("connection to {peer} closed")]
    ConnectionClosed { peer: String },

    /// Any other Raft failure (fatal errors, membership changes in progress...).
    #[error("raft error: {0}")]
    Raft(String),

    /// The configuration cannot work (for example duplicate member names).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The node has been shut down.
    #[error("cluster node is shut down")]
    Shutdown,
}
