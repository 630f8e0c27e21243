//! Incoming connections: authenticate, then hand each request to the local Raft node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::WriteHalf;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::auth::{server_handshake, HANDSHAKE_TIMEOUT};
use super::frame::{encode, read_frame};
use super::{
    AppHandler, BoxStream, ClusterTls, HelloReply, RequestBody, ResponseBody, RpcRequest,
    RpcResponse,
};
use crate::error::ClusterError;
use crate::group::Groups;
use crate::types::{NodeInfo, Raft};
use warren_storage::RaftGroup;

/// Responses queued for a connection's writer task before handlers wait.
const RESPONSE_QUEUE: usize = 64;

/// Accepts cluster connections on `listener` until the returned future is dropped.
///
/// Every connection runs in its own task, owned by this future: dropping (or aborting)
/// it closes the listener and every accepted connection, which is how a node leaves.
pub async fn serve(listener: TcpListener, ctx: ServerCtx) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(handle_conn(stream, peer, ctx.clone()));
                }
                Err(e) => {
                    // Typically fd exhaustion: back off instead of spinning.
                    tracing::warn!("cluster listener accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What the server answers with: the node's Raft groups and application.
#[derive(Clone)]
pub struct ServerCtx {
    pub raft: Raft,
    pub secret: Arc<[u8]>,
    pub me: NodeInfo,
    pub tls: Option<ClusterTls>,
    pub app: Option<Arc<dyn AppHandler>>,
    pub groups: Groups,
}

async fn handle_conn(tcp: TcpStream, peer: SocketAddr, ctx: ServerCtx) {
    let ServerCtx {
        raft,
        secret,
        me,
        tls,
        app,
        groups,
    } = ctx;
    let _ = tcp.set_nodelay(true);
    let mut stream: BoxStream = match tls {
        None => Box::new(tcp),
        Some(t) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, t.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::warn!(%peer, "rejected cluster connection: TLS: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "cluster TLS handshake timed out");
                return;
            }
        },
    };
    let remote = match server_handshake(&mut stream, &secret, &me, &peer.to_string()).await {
        Ok(remote) => remote,
        Err(ClusterError::AuthFailed { .. }) => {
            tracing::warn!(%peer, "rejected cluster connection: authentication failed");
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, "cluster handshake failed: {e}");
            return;
        }
    };
    tracing::debug!(%peer, node = %remote, "cluster connection authenticated");

    let (rd, wr) = tokio::io::split(stream);
    let (responses, queue) = mpsc::channel(RESPONSE_QUEUE);
    // Handlers and the writer live in this set: when the connection ends they are
    // aborted with it.
    let mut tasks = JoinSet::new();
    tasks.spawn(write_loop(wr, queue));
    let mut rd = BufReader::new(rd);
    loop {
        let req: RpcRequest = match read_frame(&mut rd).await {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!(%peer, "cluster connection ended: {e}");
                break;
            }
        };
        let (raft, me, responses) = (raft.clone(), me.clone(), responses.clone());
        let (app, from, groups) = (app.clone(), remote.clone(), groups.clone());
        tasks.spawn(async move {
            let body = match req.body {
                RequestBody::App(r) => ResponseBody::App(match app {
                    Some(app) => app.handle(from, r).await,
                    None => Err("this node takes no application requests".into()),
                }),
                body => dispatch(&raft, &groups, me, body).await,
            };
            let _ = responses.send(RpcResponse { id: req.id, body }).await;
        });
        while tasks.try_join_next().is_some() {}
    }
}

async fn write_loop(mut wr: WriteHalf<BoxStream>, mut queue: mpsc::Receiver<RpcResponse>) {
    while let Some(resp) = queue.recv().await {
        let frame = match encode(&resp) {
            Ok(frame) => frame,
            Err(e) => {
                // Answer anyway so the caller fails fast instead of timing out.
                let fallback = RpcResponse {
                    id: resp.id,
                    body: ResponseBody::Error(e.to_string()),
                };
                match encode(&fallback) {
                    Ok(frame) => frame,
                    Err(_) => continue,
                }
            }
        };
        if wr.write_all(&frame).await.is_err() {
            return;
        }
    }
}

async fn dispatch(raft: &Raft, groups: &Groups, me: NodeInfo, body: RequestBody) -> ResponseBody {
    let member = |g: RaftGroup| {
        groups
            .get(g)
            .ok_or_else(|| format!("no member of raft group {g} here"))
    };
    match body {
        RequestBody::Hello => {
            let initialized = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .next()
                .is_some();
            ResponseBody::Hello(HelloReply {
                node: me,
                initialized,
            })
        }
        RequestBody::AppendEntries(req) => {
            ResponseBody::AppendEntries(raft.append_entries(req).await)
        }
        RequestBody::Vote(req) => ResponseBody::Vote(raft.vote(req).await),
        RequestBody::InstallSnapshot(req) => {
            ResponseBody::InstallSnapshot(raft.install_snapshot(req).await)
        }
        RequestBody::Leader(req) => ResponseBody::Leader(crate::leader::handle(raft, req).await),
        RequestBody::App(_) => ResponseBody::Error("misrouted application request".into()),
        RequestBody::GroupAppend(g, req) => match member(g) {
            Ok(r) => ResponseBody::AppendEntries(r.append_entries(req).await),
            Err(e) => ResponseBody::Error(e),
        },
        RequestBody::GroupVote(g, req) => match member(g) {
            Ok(r) => ResponseBody::Vote(r.vote(req).await),
            Err(e) => ResponseBody::Error(e),
        },
        RequestBody::GroupSnapshot(g, req) => match member(g) {
            Ok(r) => ResponseBody::InstallSnapshot(r.install_snapshot(req).await),
            Err(e) => ResponseBody::Error(e),
        },
    }
}
