//! Mutual challenge-response authentication with a shared secret, run on every new
//! connection before any Raft traffic.
//!
//! 1. server → client: `Challenge { nonce_s }`
//! 2. client → server: `ClientProof { node, nonce_c, HMAC(secret, CLIENT_LABEL ‖ nonce_s) }`
//! 3. server → client: `Accepted { node, HMAC(secret, SERVER_LABEL ‖ nonce_c) }` or `Rejected`
//!
//! Fresh random nonces on both sides prevent replay; distinct labels prevent reflecting
//! one side's proof back as the other's. The secret itself never crosses the wire.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{read_frame_limited, write_frame, MAX_HANDSHAKE_FRAME_LEN};
use crate::error::ClusterError;
use crate::types::NodeInfo;

/// Bound on the whole handshake, so a silent peer cannot pin a connection task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Version of the cluster wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

const CLIENT_LABEL: &[u8] = b"warren-cluster client";
const SERVER_LABEL: &[u8] = b"warren-cluster server";
const NONCE_LEN: usize = 32;

type Nonce = [u8; NONCE_LEN];

#[derive(Serialize, Deserialize)]
struct Challenge {
    protocol: u32,
    nonce: Nonce,
}

#[derive(Serialize, Deserialize)]
struct ClientProof {
    node: NodeInfo,
    nonce: Nonce,
    mac: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
enum Verdict {
    Accepted { node: NodeInfo, mac: Vec<u8> },
    Rejected,
}

fn keyed(secret: &[u8], label: &[u8], nonce: &Nonce) -> Result<Hmac<Sha256>, ClusterError> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .map_err(|_| ClusterError::Config("unusable cluster secret".into()))?;
    mac.update(label);
    mac.update(nonce);
    Ok(mac)
}

fn sign(secret: &[u8], label: &[u8], nonce: &Nonce) -> Result<Vec<u8>, ClusterError> {
    Ok(keyed(secret, label, nonce)?
        .finalize()
        .into_bytes()
        .to_vec())
}

/// Constant-time check of `tag` (hmac's `verify_slice`).
fn verify(secret: &[u8], label: &[u8], nonce: &Nonce, tag: &[u8]) -> Result<bool, ClusterError> {
    Ok(keyed(secret, label, nonce)?.verify_slice(tag).is_ok())
}

async fn with_timeout<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| ClusterError::Timeout(format!("handshake with {what}")))?
}

/// Client side: authenticates to the server at `peer` (used in errors only) and returns
/// the server's self-description.
pub async fn client_handshake<S>(
    stream: &mut S,
    secret: &[u8],
    me: &NodeInfo,
    peer: &str,
) -> Result<NodeInfo, ClusterError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let auth_failed = || ClusterError::AuthFailed {
        peer: peer.to_string(),
    };
    with_timeout(peer, async {
        let challenge: Challenge = read_frame_limited(stream, MAX_HANDSHAKE_FRAME_LEN).await?;
        if challenge.protocol != PROTOCOL_VERSION {
            return Err(ClusterError::Protocol(format!(
                "{peer} speaks cluster protocol {}, we speak {PROTOCOL_VERSION}",
                challenge.protocol
            )));
        }
        let nonce: Nonce = rand::random();
        let proof = ClientProof {
            node: me.clone(),
            nonce,
            mac: sign(secret, CLIENT_LABEL, &challenge.nonce)?,
        };
        write_frame(stream, &proof).await?;
        match read_frame_limited(stream, MAX_HANDSHAKE_FRAME_LEN).await {
            Ok(Verdict::Accepted { node, mac }) => {
                if verify(secret, SERVER_LABEL, &nonce, &mac)? {
                    Ok(node)
                } else {
                    Err(auth_failed())
                }
            }
            Ok(Verdict::Rejected) => Err(auth_failed()),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Server side: challenges the client at `peer` and returns its (now authenticated)
/// self-description. On failure the caller drops the connection.
pub async fn server_handshake<S>(
    stream: &mut S,
    secret: &[u8],
    me: &NodeInfo,
    peer: &str,
) -> Result<NodeInfo, ClusterError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    with_timeout(peer, async {
        let nonce: Nonce = rand::random();
        write_frame(
            stream,
            &Challenge {
                protocol: PROTOCOL_VERSION,
                nonce,
            },
        )
        .await?;
        let proof: ClientProof = read_frame_limited(stream, MAX_HANDSHAKE_FRAME_LEN).await?;
        if !verify(secret, CLIENT_LABEL, &nonce, &proof.mac)? {
            // Tell the client why, so it can report a clear error; best effort only.
            let _ = write_frame(stream, &Verdict::Rejected).await;
            return Err(ClusterError::AuthFailed {
                peer: peer.to_string(),
            });
        }
        let verdict = Verdict::Accepted {
            node: me.clone(),
            mac: sign(secret, SERVER_LABEL, &proof.nonce)?,
        };
        write_frame(stream, &verdict).await?;
        Ok(proof.node)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        client_secret: &[u8],
        server_secret: &[u8],
    ) -> (
        Result<NodeInfo, ClusterError>,
        Result<NodeInfo, ClusterError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let client = NodeInfo::new("c", "127.0.0.1:1");
        let server = NodeInfo::new("s", "127.0.0.1:2");
        let (c, s) = tokio::join!(
            client_handshake(&mut a, client_secret, &client, "s"),
            server_handshake(&mut b, server_secret, &server, "c"),
        );
        (c, s)
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (c, s) = run(b"sesame", b"sesame").await;
        assert_eq!(c.expect("client").name, "s");
        assert_eq!(s.expect("server").name, "c");
    }

    #[tokio::test]
    async fn wrong_secret_fails_on_both_sides() {
        let (c, s) = run(b"sesame", b"other").await;
        assert!(matches!(c, Err(ClusterError::AuthFailed { .. })), "{c:?}");
        assert!(matches!(s, Err(ClusterError::AuthFailed { .. })), "{s:?}");
    }

    #[tokio::test]
    async fn forged_server_is_detected_by_client() {
        // A server that does not know the secret but accepts anyone: the client must
        // still refuse it because the server's proof does not verify.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let me = NodeInfo::new("c", "x:1");
        let fake_server = async {
            write_frame(
                &mut b,
                &Challenge {
                    protocol: PROTOCOL_VERSION,
                    nonce: [7; NONCE_LEN],
                },
            )
            .await?;
            let proof: ClientProof = read_frame_limited(&mut b, MAX_HANDSHAKE_FRAME_LEN).await?;
            let verdict = Verdict::Accepted {
                node: NodeInfo::new("evil", "x:2"),
                mac: sign(b"guess", SERVER_LABEL, &proof.nonce)?,
            };
            write_frame(&mut b, &verdict).await
        };
        let (c, s) = tokio::join!(
            client_handshake(&mut a, b"sesame", &me, "evil"),
            fake_server
        );
        s.expect("fake server io");
        assert!(matches!(c, Err(ClusterError::AuthFailed { .. })), "{c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out() {
        let (mut a, _b) = tokio::io::duplex(4096);
        let me = NodeInfo::new("c", "x:1");
        let err = client_handshake(&mut a, b"k", &me, "mute")
            .await
            .expect_err("timeout");
        assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
    }
}
