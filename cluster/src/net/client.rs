//! Outgoing connections: one authenticated, multiplexed connection per peer address,
//! opened lazily and replaced after it fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::auth::{client_handshake, HANDSHAKE_TIMEOUT};
use super::frame::{encode, read_frame};
use super::{
    BoxStream, ClusterTls, HelloReply, RequestBody, ResponseBody, RpcRequest, RpcResponse,
};
use crate::error::ClusterError;
use crate::types::NodeInfo;

/// After this many timeouts in a row with no successful reply, the connection is
/// presumed dead (e.g. a half-open TCP connection) and replaced.
const MAX_CONSECUTIVE_TIMEOUTS: u32 = 3;
/// Frames queued for the writer task before callers wait.
const WRITE_QUEUE: usize = 64;

/// How a call failed: before a connection existed (peer unreachable or not authenticated)
/// or during the exchange. openraft treats the two differently.
#[derive(Debug)]
pub enum CallError {
    Connect(ClusterError),
    Rpc(ClusterError),
}

impl CallError {
    pub fn into_inner(self) -> ClusterError {
        match self {
            CallError::Connect(e) | CallError::Rpc(e) => e,
        }
    }
}

type Waiters = HashMap<u64, oneshot::Sender<ResponseBody>>;

/// State shared by a connection and its reader/writer tasks.
#[derive(Default)]
struct Shared {
    waiters: Mutex<Waiters>,
    closed: AtomicBool,
    timeouts: AtomicU32,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // Only map inserts/removes run under this lock; a poisoned map is still valid.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and wakes every waiting caller with an error.
    fn fail_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waiters().clear();
    }
}

/// Removes a waiter when its call finishes or is cancelled (openraft drops RPC futures
/// on its own timeouts), so the map cannot grow with abandoned ids.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.waiters().remove(&self.id);
    }
}

/// One authenticated connection. Frames are written by a dedicated task so that a
/// cancelled caller can never leave half a frame on the wire.
pub struct Conn {
    peer: String,
    shared: Arc<Shared>,
    frames: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    tasks: [JoinHandle<()>; 2],
}

impl Conn {
    async fn open(
        addr: &str,
        secret: &[u8],
        me: &NodeInfo,
        tls: Option<&ClusterTls>,
    ) -> Result<Conn, ClusterError> {
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ClusterError::Timeout(format!("connecting to {addr}")))??;
        tcp.set_nodelay(true)?;
        let mut stream: BoxStream = match tls {
            None => Box::new(tcp),
            Some(t) => {
                // The certificate must name the host part of the address dialled.
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| ClusterError::Config(format!("{addr}: {e}")))?;
                let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, t.connector.connect(name, tcp))
                    .await
                    .map_err(|_| ClusterError::Timeout(format!("TLS with {addr}")))?
                    .map_err(|e| ClusterError::Protocol(format!("TLS with {addr}: {e}")))?;
                Box::new(s)
            }
        };
        client_handshake(&mut stream, secret, me, addr).await?;
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        let (frames, queue) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(read_loop(rd, shared.clone(), addr.to_string()));
        let writer = tokio::spawn(write_loop(wr, queue, shared.clone()));
        Ok(Conn {
            peer: addr.to_string(),
            shared,
            frames,
            next_id: AtomicU64::new(1),
            tasks: [reader, writer],
        })
    }

    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.shared.fail_all();
        for t in &self.tasks {
            t.abort();
        }
    }

    fn closed_error(&self) -> ClusterError {
        ClusterError::ConnectionClosed {
            peer: self.peer.clone(),
        }
    }

    /// Sends one request and waits up to `ttl` for its response.
    async fn call(&self, body: RequestBody, ttl: Duration) -> Result<ResponseBody, ClusterError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Encoding first: an oversized request fails here and leaves the connection usable.
        let frame = encode(&RpcRequest { id, body })?;
        let (tx, rx) = oneshot::channel();
        self.shared.waiters().insert(id, tx);
        let _guard = WaiterGuard {
            shared: &self.shared,
            id,
        };
        // Checked after registering: `fail_all` sets the flag before clearing the map,
        // so either we see the flag or our waiter gets dropped.
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let exchange = async {
            self.frames
                .send(frame)
                .await
                .map_err(|_| self.closed_error())?;
            rx.await.map_err(|_| self.closed_error())
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(body)) => {
                self.shared.timeouts.store(0, Ordering::Relaxed);
                Ok(body)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if self.shared.timeouts.fetch_add(1, Ordering::Relaxed) + 1
                    >= MAX_CONSECUTIVE_TIMEOUTS
                {
                    tracing::debug!(peer = %self.peer, "dropping unresponsive cluster connection");
                    self.close();
                }
                Err(ClusterError::Timeout(format!(
                    "request to {} after {ttl:?}",
                    self.peer
                )))
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

async fn read_loop(rd: ReadHalf<BoxStream>, shared: Arc<Shared>, peer: String) {
    let mut rd = BufReader::new(rd);
    loop {
        match read_frame::<_, RpcResponse>(&mut rd).await {
            Ok(resp) => {
                // No waiter means the caller gave up (timeout); the reply is dropped.
                if let Some(tx) = shared.waiters().remove(&resp.id) {
                    let _ = tx.send(resp.body);
                }
            }
            Err(e) => {
                tracing::debug!(%peer, "cluster connection closed: {e}");
                break;
            }
        }
    }
    shared.fail_all();
}

async fn write_loop(
    mut wr: WriteHalf<BoxStream>,
    mut queue: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = queue.recv().await {
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    shared.fail_all();
    let _ = wr.shutdown().await;
}

/// A per-address slot; its async lock serializes connection attempts to that address.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// The set of outgoing connections of one node, shared by Raft replication, elections
/// and discovery so each peer address gets a single connection.
pub struct PeerPool {
    me: NodeInfo,
    secret: Arc<[u8]>,
    tls: Option<ClusterTls>,
    slots: Mutex<HashMap<String, Slot>>,
    closed: AtomicBool,
}

impl PeerPool {
    /// A pool authenticating with `secret` and introducing itself as `me`, over TLS
    /// when `tls` is given.
    pub fn new(me: NodeInfo, secret: Arc<[u8]>, tls: Option<ClusterTls>) -> Arc<Self> {
        Arc::new(Self {
            me,
            secret,
            tls,
            slots: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        })
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the live connection to `addr`, opening one if needed.
    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, ClusterError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(ClusterError::Shutdown);
        }
        let slot = self.slots().entry(addr.to_string()).or_default().clone();
        let mut guard = slot.lock_owned().await;
        if let Some(conn) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        *guard = None;
        // The attempt runs in its own task holding the slot, so a caller cancelled by a
        // short RPC timeout does not abort a handshake that the next caller can reuse.
        let (addr, secret, me) = (addr.to_string(), self.secret.clone(), self.me.clone());
        let tls = self.tls.clone();
        let attempt = tokio::spawn(async move {
            let conn = Arc::new(Conn::open(&addr, &secret, &me, tls.as_ref()).await?);
            *guard = Some(conn.clone());
            Ok::<_, ClusterError>(conn)
        });
        attempt
            .await
            .map_err(|e| ClusterError::Protocol(format!("connection task failed: {e}")))?
    }

    /// Sends `body` to the node at `addr`, connecting first if needed; `ttl` bounds the
    /// whole call.
    pub(crate) async fn call(
        &self,
        addr: &str,
        body: RequestBody,
        ttl: Duration,
    ) -> Result<ResponseBody, CallError> {
        let deadline = Instant::now() + ttl;
        let conn = match tokio::time::timeout_at(deadline, self.conn(addr)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(CallError::Connect(e)),
            Err(_) => {
                return Err(CallError::Connect(ClusterError::Timeout(format!(
                    "connecting to {addr}"
                ))))
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        conn.call(body, left).await.map_err(CallError::Rpc)
    }

    /// Asks the node at `addr` who it is (authenticating it on the way).
    pub async fn hello(&self, addr: &str, ttl: Duration) -> Result<HelloReply, ClusterError> {
        match self.call(addr, RequestBody::Hello, ttl).await {
            Ok(ResponseBody::Hello(reply)) => Ok(reply),
            Ok(other) => Err(ClusterError::Protocol(format!(
                "expected a Hello reply from {addr}, got {}",
                other.kind()
            ))),
            Err(e) => Err(e.into_inner()),
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let slots: Vec<Slot> = self.slots().drain().map(|(_, s)| s).collect();
        for slot in slots {
            // A slot locked by an in-flight attempt is left to finish; its connection is
            // dropped with the slot since the pool no longer references it.
            if let Ok(mut guard) = slot.try_lock() {
                if let Some(conn) = guard.take() {
                    conn.close();
                }
            }
        }
    }
}
