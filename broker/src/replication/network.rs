//! Node-to-node RPCs: Raft's messages as postcard in length-prefixed frames over TCP, one
//! request and its reply at a time per connection (openraft opens one client per target
//! and purpose: replication, heartbeats, snapshots).
//!
//! A snapshot goes as a header frame naming its files and their sizes, then each file's
//! bytes in frames of at most 1 MiB, into a fresh directory on the receiver, which
//! then installs it.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use openraft::errors::{NetworkError, RPCError, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkV2};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::clock::Clocks;
use super::handshake::{self, Bytes32, Credentials};
use super::state_machine::{SnapshotDir, StorageSlot};
use super::{Raft, TypeConfig, io_err};
use crate::tls::{self, Stream};

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>;

/// Largest frame: an append carries at most `max_payload_entries` writer batches.
const MAX_FRAME: usize = 1 << 30;
/// Largest frame taken before the handshake is accepted (its frames are a few dozen bytes).
const MAX_HELLO: usize = 4096;
/// Node connections a node serves at once.
const MAX_NODE_CONNECTIONS: usize = 256;
/// How long a new node connection may take to present the group's secret.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node connection may stay silent (heartbeats come every 200 ms).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest transfer an append is given time for (bytes a second): 10 MB/s.
const APPEND_BYTES_PER_SEC: f64 = 10e6;
/// Bytes of a snapshot file per frame.
const CHUNK: usize = 1 << 20;

/// What one node asks another.
#[derive(Serialize, Deserialize)]
enum Rpc {
    /// The first frame of the old handshake, which sent the group's secret as it is:
    /// refused, with a sentence the old node logs.
    LegacyHello {
        token: String,
    },
    /// Entries (none: a heartbeat), with how far the receiver's wall clock is from the
    /// group's as the leader measured it (see [`super::clock`]).
    Append {
        req: AppendEntriesRequest<TypeConfig>,
        your_skew_ms: Option<i64>,
    },
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    /// A whole snapshot follows: these files, in this order, with these sizes.
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        files: Vec<(String, u64)>,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    Info,
    /// The first frame of a connection: asks for the answering node's nonce (see
    /// [`super::handshake`]).
    Knock,
    /// The dialling node's nonce and its proof of the group's secret.
    Prove {
        nonce: Bytes32,
        proof: Bytes32,
    },
    /// `Info` with what older nodes do not tell (added last: an older node
    /// cannot read it and closes the connection, and the asker falls back to `Info`).
    InfoWithFaces,
}

/// The answer.
#[derive(Serialize, Deserialize)]
enum Reply {
    /// The handshake was accepted: the answering node's proof of the group's secret.
    Proven(Bytes32),
    /// The answer to an append, with when (on the answering node's wall clock) the
    /// request was read and the answer sent.
    Append {
        resp: AppendEntriesResponse<TypeConfig>,
        received_ms: u64,
        replied_ms: u64,
    },
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Info(NodeInfo),
    /// The request could not be served (the node is shutting down, a bad snapshot).
    Failed(String),
    /// The answering node's nonce for the handshake.
    Nonce(Bytes32),
    /// The answer to `InfoWithFaces`.
    InfoWithFaces {
        info: NodeInfo,
        remoting_addr: Option<String>,
    },
}

/// What a node tells about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its node id.
    pub id: u64,
    /// Where clients connect (the native protocol).
    pub client_addr: String,
    /// Its gRPC endpoint, if it serves one.
    pub grpc_addr: Option<String>,
    /// It belongs to an initialized group (it has a log or a vote).
    pub initialized: bool,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its Remoting endpoint (RocketMQ's classic clients), if it serves one. Not in
    /// the encoding of the `Info` reply, which older nodes read and write: it travels
    /// in the `InfoWithFaces` reply.
    #[serde(skip)]
    pub remoting_addr: Option<String>,
}

type Conn = Framed<Stream, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Connects to the node at `addr` (over mutual TLS when configured) and proves that
/// this node holds the group's secret, and that it does (see [`super::handshake`]).
async fn connect(addr: &str, creds: &Credentials) -> io::Result<Conn> {
    let socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let stream = tls::connect(socket, addr, creds.tls.as_ref().map(|t| &t.client)).await?;
    let mut conn = Framed::new(stream, codec());
    send(&mut conn, &Rpc::Knock).await?;
    let ns = match recv(&mut conn).await? {
        Reply::Nonce(ns) => ns,
        Reply::Failed(why) => return Err(io_err(why)),
        _ => return Err(io_err("unexpected reply to the handshake")),
    };
    let nc: Bytes32 = rand::random();
    let proof = creds.client_proof(&ns, &nc);
    send(&mut conn, &Rpc::Prove { nonce: nc, proof }).await?;
    match recv(&mut conn).await? {
        Reply::Proven(theirs) if handshake::same(&theirs, &creds.server_proof(&ns, &nc)) => {
            Ok(conn)
        }
        Reply::Proven(_) => Err(io_err(format!(
            "{addr} does not hold this group's cluster secret"
        ))),
        Reply::Failed(why) => Err(io_err(why)),
        _ => Err(io_err("unexpected reply to the handshake")),
    }
}

async fn send<T: Serialize>(conn: &mut Conn, msg: &T) -> io::Result<()> {
    let bytes = postcard::to_allocvec(msg).map_err(io_err)?;
    conn.send(Bytes::from(bytes)).await
}

async fn recv<T: for<'de> Deserialize<'de>>(conn: &mut Conn) -> io::Result<T> {
    match conn.next().await {
        Some(frame) => postcard::from_bytes(&frame?).map_err(io_err),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        )),
    }
}

/// Asks the node at `addr` about itself (for forming the group and finding the leader's
/// client address).
///
/// # Errors
/// The node cannot be reached or does not answer within `timeout`.
pub async fn info(addr: &str, creds: &Credentials, timeout: Duration) -> io::Result<NodeInfo> {
    let call = async {
        let mut conn = connect(addr, creds).await?;
        send(&mut conn, &Rpc::InfoWithFaces).await?;
        match recv(&mut conn).await {
            Ok(Reply::InfoWithFaces {
                info,
                remoting_addr,
            }) => {
                return Ok(NodeInfo {
                    remoting_addr,
                    ..info
                });
            }
            Ok(Reply::Failed(why)) => return Err(io_err(why)),
            Ok(_) => return Err(io_err("unexpected reply to Info")),
            // A node of an older version does not know the question (it closed the
            // connection): ask it what it knows.
            Err(_) => {}
        }
        let mut conn = connect(addr, creds).await?;
        send(&mut conn, &Rpc::Info).await?;
        match recv(&mut conn).await? {
            Reply::Info(info) => Ok(info),
            Reply::Failed(why) => Err(io_err(why)),
            _ => Err(io_err("unexpected reply to Info")),
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{addr} did not answer")))?
}

/// Makes a client per target node.
#[derive(Clone, Default)]
pub struct Network {
    /// The group's secret and the node port's TLS.
    pub creds: Credentials,
    /// What appends measure of the members' wall clocks.
    pub clocks: Arc<Clocks>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            creds: self.creds.clone(),
            conn: None,
            clocks: self.clocks.clone(),
        }
    }
}

/// One connection to a target node, opened on demand and dropped on any error.
pub struct Peer {
    target: u64,
    addr: String,
    creds: Credentials,
    conn: Option<Conn>,
    clocks: Arc<Clocks>,
}

impl Peer {
    async fn call(&mut self, rpc: &Rpc, ttl: Duration) -> Result<Reply, RPCError<TypeConfig>> {
        let call = async {
            if self.conn.is_none() {
                self.conn = Some(
                    connect(&self.addr, &self.creds)
                        .await
                        .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?,
                );
            }
            let conn = self.conn.as_mut().expect("connected");
            send(conn, rpc)
                .await
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            recv(conn)
                .await
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))
        };
        let result = match tokio::time::timeout(ttl, call).await {
            Ok(r) => r,
            Err(_) => Err(RPCError::Unreachable(Unreachable::new(&io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not answer within {ttl:?}", self.addr),
            )))),
        };
        if result.is_err() {
            // The reply of a request that timed out may still come: never read it as the
            // next one's.
            self.conn = None;
        }
        match result? {
            Reply::Failed(why) => Err(RPCError::Unreachable(Unreachable::new(&io_err(why)))),
            reply => Ok(reply),
        }
    }
}

fn unexpected() -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&io_err("unexpected reply")))
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = SnapshotDir;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft's deadline (three quarters of a heartbeat) is for heartbeats; an
        // append waits for the follower's fsync and may carry hundreds of MiB.
        let bytes: usize = rpc
            .entries
            .iter()
            .map(|e| match &e.payload {
                openraft::EntryPayload::Normal(b) => b.data.len(),
                _ => 0,
            })
            .sum();
        let ttl = if rpc.entries.is_empty() {
            option.soft_ttl()
        } else {
            Duration::from_secs(2) + Duration::from_secs_f64(bytes as f64 / APPEND_BYTES_PER_SEC)
        };
        let rpc = Rpc::Append {
            req: rpc,
            your_skew_ms: self.clocks.skew_of(self.target),
        };
        let sent_ms = txmq_protocol::now_ms();
        let sent = std::time::Instant::now();
        match self.call(&rpc, ttl).await? {
            Reply::Append {
                resp,
                received_ms,
                replied_ms,
            } => {
                self.clocks.exchange(
                    self.target,
                    sent_ms,
                    received_ms,
                    replied_ms,
                    sent.elapsed(),
                );
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&Rpc::Vote(rpc), option.soft_ttl()).await? {
            Reply::Vote(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&Rpc::PreVote(rpc), option.soft_ttl()).await? {
            Reply::Vote(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(&Rpc::TransferLeader(req), option.soft_ttl())
            .await?
        {
            Reply::TransferLeader(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = openraft::errors::ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let (addr, creds) = (self.addr.clone(), self.creds.clone());
        let send = async move {
            let mut conn = connect(&addr, &creds)
                .await
                .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
            send_snapshot(&mut conn, vote, snapshot)
                .await
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
        };
        tokio::select! {
            r = tokio::time::timeout(option.hard_ttl(), send) => r.unwrap_or_else(|_| {
                Err(StreamingError::Unreachable(Unreachable::new(&io::Error::new(
                    io::ErrorKind::TimedOut,
                    "sending a snapshot took too long",
                ))))
            }),
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// Sends the snapshot's files and waits for the receiver to install it.
async fn send_snapshot(
    conn: &mut Conn,
    vote: Vote,
    snapshot: Snapshot,
) -> io::Result<SnapshotResponse<TypeConfig>> {
    let dir = snapshot.snapshot.0;
    // Every file opened before the first byte goes: a newer snapshot may replace this
    // one meanwhile, and an open file outlives its directory entry.
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| io_err("a file name that is not UTF-8"))?;
            let file = tokio::fs::File::open(entry.path()).await?;
            let len = file.metadata().await?.len();
            files.push((name, len, file));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    tracing::info!(
        snapshot = %dir.display(),
        files = files.len(),
        bytes = files.iter().map(|f| f.1).sum::<u64>(),
        "sending a snapshot"
    );
    send(
        conn,
        &Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            files: files.iter().map(|(n, l, _)| (n.clone(), *l)).collect(),
        },
    )
    .await?;
    let mut buf = vec![0u8; CHUNK];
    for (_, len, mut file) in files {
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            file.read_exact(&mut buf[..n]).await?;
            conn.send(Bytes::copy_from_slice(&buf[..n])).await?;
            left -= n as u64;
        }
    }
    match recv(conn).await? {
        Reply::Snapshot(r) => Ok(r),
        Reply::Failed(why) => Err(io_err(why)),
        _ => Err(io_err("unexpected reply to a snapshot")),
    }
}

/// Serves the other nodes' RPCs on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    raft: Raft,
    slot: Arc<StorageSlot>,
    info: Arc<dyn Fn() -> NodeInfo + Send + Sync>,
    creds: Credentials,
    clocks: Arc<Clocks>,
    cancel: CancellationToken,
) {
    let creds = Arc::new(creds);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_NODE_CONNECTIONS));
    loop {
        let (socket, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("node listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "node listener: {MAX_NODE_CONNECTIONS} connections open; refused");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (raft, slot, info, cancel, creds, clocks) = (
            raft.clone(),
            slot.clone(),
            info.clone(),
            cancel.clone(),
            creds.clone(),
            clocks.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tls::accept(socket, creds.tls.as_ref().map(|t| &t.server)).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(%peer, "node connection refused: TLS: {e}");
                    return;
                }
            };
            let mut conn = Framed::new(stream, codec());
            tokio::select! {
                () = cancel.cancelled() => {}
                r = serve_conn(&mut conn, &raft, &slot, &*info, &creds, &clocks) => if let Err(e) = r {
                    tracing::debug!(%peer, "node connection closed: {e}");
                },
            }
        });
    }
}

async fn serve_conn(
    conn: &mut Conn,
    raft: &Raft,
    slot: &StorageSlot,
    info: &(dyn Fn() -> NodeInfo + Send + Sync),
    creds: &Credentials,
    clocks: &Clocks,
) -> io::Result<()> {
    // The handshake (see [`super::handshake`]), in small frames, soon. Frames stay
    // small until it is accepted: the codec reserves what a header announces before
    // the frame arrives, and a stranger must not make it reserve a gigabyte.
    conn.codec_mut().set_max_frame_length(MAX_HELLO);
    let ns: Bytes32 = rand::random();
    let handshake = async {
        match recv(conn).await? {
            Rpc::Knock => send(conn, &Reply::Nonce(ns)).await?,
            Rpc::LegacyHello { .. } => {
                return Ok(Err("this node speaks a newer node protocol: \
                               upgrade every node of the group (stop the group once)"));
            }
            _ => return Ok(Err("not a member of this group (no handshake)")),
        }
        Ok::<_, io::Error>(match recv(conn).await? {
            Rpc::Prove { nonce, proof }
                if handshake::same(&proof, &creds.client_proof(&ns, &nonce)) =>
            {
                Ok(nonce)
            }
            _ => Err("not a member of this group (wrong secret)"),
        })
    };
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io_err("no handshake"))??;
    let nc = match answer {
        Ok(nc) => nc,
        Err(why) => {
            send(conn, &Reply::Failed(why.into())).await?;
            return Err(io_err(format!("a node connection refused: {why}")));
        }
    };
    send(conn, &Reply::Proven(creds.server_proof(&ns, &nc))).await?;
    conn.codec_mut().set_max_frame_length(MAX_FRAME);
    loop {
        let rpc: Rpc = match tokio::time::timeout(IDLE_TIMEOUT, recv(conn)).await {
            Ok(rpc) => rpc?,
            Err(_) => return Err(io_err("idle")),
        };
        let received_ms = txmq_protocol::now_ms();
        let reply = match rpc {
            Rpc::LegacyHello { .. } | Rpc::Knock | Rpc::Prove { .. } => {
                Reply::Failed("a handshake on a welcomed connection".into())
            }
            Rpc::Append { req, your_skew_ms } => match raft.append_entries(req).await {
                Ok(resp) => {
                    // Believed from the leader of this node's term only.
                    if let Some(skew) = your_skew_ms
                        && !matches!(resp, AppendEntriesResponse::HigherVote(_))
                    {
                        clocks.told(skew);
                    }
                    Reply::Append {
                        resp,
                        received_ms,
                        replied_ms: txmq_protocol::now_ms(),
                    }
                }
                Err(e) => Reply::Failed(e.to_string()),
            },
            Rpc::Vote(req) => raft
                .vote(req)
                .await
                .map(Reply::Vote)
                .unwrap_or_else(|e| Reply::Failed(e.to_string())),
            Rpc::PreVote(req) => raft
                .pre_vote(req)
                .await
                .map(Reply::Vote)
                .unwrap_or_else(|e| Reply::Failed(e.to_string())),
            Rpc::TransferLeader(req) => raft
                .handle_transfer_leader(req)
                .await
                .map(Reply::TransferLeader)
                .unwrap_or_else(|e| Reply::Failed(e.to_string())),
            Rpc::Info => Reply::Info(info()),
            Rpc::InfoWithFaces => {
                let info = info();
                let remoting_addr = info.remoting_addr.clone();
                Reply::InfoWithFaces {
                    info,
                    remoting_addr,
                }
            }
            Rpc::Snapshot { vote, meta, files } => {
                if slot.in_use() {
                    // The parts of a leadership that just ended still hold the storage:
                    // installing would have to wait for them, and a failed installation
                    // stops Raft for good. Refused instead, by closing the connection
                    // before its files are read: the leader sends the snapshot again.
                    tracing::info!(
                        ?meta,
                        "snapshot refused for now: the storage is still in use"
                    );
                    return Err(io_err(
                        "the storage is in use; send the snapshot again later",
                    ));
                }
                let dir = slot.snapshot_dir(&super::state_machine::unique(
                    super::state_machine::RECEIVED,
                ))?;
                if let Err(e) = receive_files(conn, &dir, &files).await {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                tracing::info!(?meta, "installing a snapshot");
                let snapshot = Snapshot {
                    meta,
                    snapshot: SnapshotDir(dir.clone()),
                };
                let r = raft.install_full_snapshot(vote, snapshot).await;
                if dir.exists() {
                    // Not taken (an older snapshot, or it failed).
                    let _ = std::fs::remove_dir_all(&dir);
                }
                r.map(Reply::Snapshot)
                    .unwrap_or_else(|e| Reply::Failed(e.to_string()))
            }
        };
        send(conn, &reply).await?;
    }
}

/// Receives `files` into `dir`, synced.
async fn receive_files(conn: &mut Conn, dir: &Path, files: &[(String, u64)]) -> io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    for (name, len) in files {
        if name.contains('/') || name.starts_with('.') {
            return Err(io_err(format!("a snapshot file named {name:?}")));
        }
        let mut file = tokio::fs::File::create(dir.join(name)).await?;
        let mut left = *len;
        while left > 0 {
            let chunk = conn
                .next()
                .await
                .ok_or_else(|| io_err("the snapshot stopped short"))??;
            if chunk.len() as u64 > left {
                return Err(io_err("a snapshot file longer than announced"));
            }
            file.write_all(&chunk).await?;
            left -= chunk.len() as u64;
        }
        file.sync_all().await?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NodeInfo` as nodes before the Remoting face encoded it.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldNodeInfo {
        id: u64,
        client_addr: String,
        grpc_addr: Option<String>,
        initialized: bool,
        leader: Option<u64>,
    }

    /// Older nodes read and write `Reply::Info` as before (the Remoting address is not
    /// in it), and `InfoWithFaces` carries it.
    #[test]
    fn node_info_stays_readable_by_older_nodes() {
        let info = NodeInfo {
            id: 2,
            client_addr: "10.0.0.2:9876".into(),
            grpc_addr: Some("10.0.0.2:8081".into()),
            initialized: true,
            leader: Some(1),
            remoting_addr: Some("10.0.0.2:10911".into()),
        };
        let old = OldNodeInfo {
            id: 2,
            client_addr: "10.0.0.2:9876".into(),
            grpc_addr: Some("10.0.0.2:8081".into()),
            initialized: true,
            leader: Some(1),
        };
        let new_bytes = postcard::to_allocvec(&info).unwrap();
        assert_eq!(new_bytes, postcard::to_allocvec(&old).unwrap());
        let read: NodeInfo = postcard::from_bytes(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(read.remoting_addr, None);
        assert_eq!(read.client_addr, old.client_addr);
        let with = postcard::to_allocvec(&Reply::InfoWithFaces {
            info: info.clone(),
            remoting_addr: info.remoting_addr.clone(),
        })
        .unwrap();
        match postcard::from_bytes::<Reply>(&with).unwrap() {
            Reply::InfoWithFaces {
                info: got,
                remoting_addr,
            } => {
                assert_eq!(remoting_addr.as_deref(), Some("10.0.0.2:10911"));
                assert_eq!(got.client_addr, info.client_addr);
            }
            _ => panic!("another reply"),
        }
    }
}
