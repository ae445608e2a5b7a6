//! The peer network: gRPC channels to the other members (one per member,
//! connected lazily and reused), and openraft's client side of the Raft
//! RPCs over them. The server side is `crate::api::peer`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{OptionalSend, SnapshotMeta, Vote};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{Member, TypeConfig};
use crate::error::{Error, Result};
use crate::proto::peerpb::peer_client::PeerClient;
use crate::proto::peerpb::RaftMessage;

/// The metadata key that carries the sender's cluster ID: a member refuses
/// peers of another cluster, as etcd does.
pub const CLUSTER_ID_HEADER: &str = "x-cairn-cluster-id";
/// The metadata key that carries the sender's member ID.
pub const MEMBER_ID_HEADER: &str = "x-cairn-member-id";
/// The metadata key that carries the member ID a Raft message is for.
pub const TARGET_ID_HEADER: &str = "x-cairn-to";

/// Most bytes of one peer message (snapshot chunks and entry batches stay
/// well under it).
pub const MAX_PEER_MESSAGE: usize = 256 << 20;

/// The `id` of a snapshot stream's last message, whose data is the bincode of
/// the number of payload bytes sent (peer.proto's `SnapshotStream`).
pub const SNAPSHOT_END: u64 = u64::MAX;

/// Payload bytes a snapshot stream carries per message.
const STREAM_PIECE: usize = 1 << 20;

/// How a snapshot stream failed: the peer does not know the call (an older
/// build), or anything else.
enum Streamed {
    Unsupported,
    Failed(Box<StreamingError<TypeConfig, Fatal<u64>>>),
}

/// A peer's refusal as openraft's Unreachable: openraft then waits [`Conn`]'s backoff
/// before the next attempt (a Network error is retried at once, and a refusal that repeats
/// would start a snapshot transfer in a hot loop).
fn refused<E: std::fmt::Display>(target: u64, e: E) -> Unreachable {
    Unreachable::new(&std::io::Error::other(format!("peer {target:x}: {e}")))
}

/// Channels to the other members.
#[derive(Default)]
pub struct Peers {
    /// The cluster ID sent with every call (0 until it is known).
    cluster_id: AtomicU64,
    /// This member's ID, sent with every call.
    member_id: AtomicU64,
    channels: Mutex<HashMap<u64, (String, Channel)>>,
    /// When each peer last answered a Raft RPC.
    last_ok: Mutex<HashMap<u64, std::time::Instant>>,
    /// Set when a peer says this member was removed from the cluster.
    pub removed: std::sync::atomic::AtomicBool,
    /// TLS towards `https://` peer URLs (`--peer-*`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Peers {
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<Self> {
        let p = Self {
            tls,
            ..Self::default()
        };
        p.cluster_id.store(cluster_id, Ordering::Relaxed);
        p.member_id.store(member_id, Ordering::Relaxed);
        Arc::new(p)
    }

    /// A client for member `id` at the first of `urls`, reusing its channel
    /// while the URL stays the same.
    pub fn client(&self, id: u64, urls: &[String]) -> Result<PeerClient<Channel>> {
        let url = urls
            .first()
            .ok_or_else(|| Error::Internal(format!("member {id:x} has no peer URL")))?;
        let mut channels = self.channels.lock();
        if let Some((u, ch)) = channels.get(&id) {
            if u == url {
                return Ok(Self::wrap(ch.clone()));
            }
        }
        let ch = self.connect(url)?;
        channels.insert(id, (url.clone(), ch.clone()));
        Ok(Self::wrap(ch))
    }

    fn wrap(ch: Channel) -> PeerClient<Channel> {
        PeerClient::new(ch)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE)
    }

    /// A channel to a peer URL, over TLS for an `https://` one.
    pub fn connect(&self, url: &str) -> Result<Channel> {
        connect(url, self.tls.as_ref())
    }

    /// Whether member `id` answered a Raft RPC within `within`.
    pub fn active(&self, id: u64, within: Duration) -> bool {
        self.last_ok
            .lock()
            .get(&id)
            .is_some_and(|t| t.elapsed() <= within)
    }

    /// A request carrying this cluster's ID.
    /// A Raft message for member `target` (refused by any other member on its URL).
    pub fn request_to<T>(&self, msg: T, target: u64) -> tonic::Request<T> {
        let mut r = self.request(msg);
        r.metadata_mut().insert(
            TARGET_ID_HEADER,
            format!("{target:x}")
                .parse()
                .expect("hex is valid metadata"),
        );
        r
    }

    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        for (key, id) in [
            (CLUSTER_ID_HEADER, self.cluster_id.load(Ordering::Relaxed)),
            (MEMBER_ID_HEADER, self.member_id.load(Ordering::Relaxed)),
        ] {
            if id != 0 {
                r.metadata_mut().insert(
                    key,
                    format!("{id:x}").parse().expect("hex is valid metadata"),
                );
            }
        }
        r
    }
}

/// A lazily connected channel to a peer URL; over TLS with `tls` for an `https://` URL.
pub fn connect(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Channel> {
    let bad = |e: &dyn std::fmt::Display| Error::Internal(format!("bad peer URL {url}: {e}"));
    let secure = url.starts_with("https://");
    // tonic without its own TLS refuses https URIs: the channel is named http://, and the
    // connector below does the TLS.
    let named = if secure {
        url.replacen("https://", "http://", 1)
    } else {
        url.to_string()
    };
    let endpoint = Endpoint::from_shared(named)
        .map_err(|e| bad(&e))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20);
    if !secure {
        return Ok(endpoint.connect_lazy());
    }
    let Some(config) = tls.cloned() else {
        return Err(Error::Internal(format!(
            "peer URL {url}: TLS between members needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file"
        )));
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| bad(&"no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(2380);
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| bad(&e))?
        .to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, host, name) = (config.clone(), host.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Creates openraft's per-peer clients.
#[derive(Clone)]
pub struct Network {
    peers: Arc<Peers>,
    durable: Arc<super::Durable>,
}

impl Network {
    /// `durable`: how far this member's log is on disk (see below).
    pub fn new(peers: Arc<Peers>, durable: Arc<super::Durable>) -> Self {
        Self { peers, durable }
    }
}

/// openraft's client for one peer.
pub struct Conn {
    target: u64,
    peers: Arc<Peers>,
    client: std::result::Result<PeerClient<Channel>, String>,
    durable: Arc<super::Durable>,
    /// The AppendEntries stream, opened on first use, dropped on any error.
    stream: Option<AppendStream>,
    /// The peer answered that it takes snapshots in chunks only (an older build); asked
    /// again when openraft makes a new client (the peer's URL changed, or it was replaced).
    chunks_only: bool,
}

struct AppendStream {
    tx: tokio::sync::mpsc::Sender<RaftMessage>,
    rx: tonic::Streaming<RaftMessage>,
    next_id: u64,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        Conn {
            target,
            peers: self.peers.clone(),
            client: self
                .peers
                .client(target, &node.peer_urls)
                .map_err(|e| e.to_string()),
            durable: self.durable.clone(),
            stream: None,
            chunks_only: false,
        }
    }
}

/// Most bytes of entries one AppendEntries carries (a single entry may be
/// larger, up to [`MAX_PEER_MESSAGE`]): a follower catching up receives the
/// log in messages of bounded size.
pub const MAX_APPEND_BYTES: usize = 4 << 20;

/// How many of `entries`, from the first, encode within `budget` bytes (at
/// least one).
fn entries_within(entries: &[openraft::Entry<TypeConfig>], budget: usize) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for e in entries {
        total += bincode::serialized_size(e).map_or(usize::MAX, |s| s as usize);
        if n > 0 && total > budget {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// Encodes an openraft message for the wire.
pub fn encode<T: Serialize>(msg: &T) -> Result<RaftMessage> {
    Ok(RaftMessage {
        data: bincode::serialize(msg).map_err(Error::internal)?,
        id: 0,
    })
}

/// Decodes an openraft message from the wire.
pub fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T> {
    bincode::deserialize(&msg.data).map_err(Error::internal)
}

impl Conn {
    /// One Raft RPC: the reply is the bincode of `Result<Resp, E>` (the
    /// remote Raft's own error travels back as a remote error).
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        f: impl AsyncFnOnce(
            PeerClient<Channel>,
            tonic::Request<RaftMessage>,
        ) -> std::result::Result<tonic::Response<RaftMessage>, tonic::Status>,
    ) -> std::result::Result<Resp, RPCError<u64, Member, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(e.clone()),
                )))
            }
        };
        let msg = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = self.peers.request_to(msg, self.target);
        request.set_timeout(option.hard_ttl());
        let outcome = tokio::time::timeout(option.hard_ttl(), f(client, request))
            .await
            .map(|r| r.map(tonic::Response::into_inner));
        self.reply(outcome)
    }

    /// Turns a call's outcome into openraft's terms: a timeout or transport
    /// failure is a network error (Unreachable when no connection was had),
    /// the reply the bincode of `Result<Resp, E>`, whose error is the remote
    /// Raft's own.
    fn reply<Resp, E>(
        &self,
        outcome: std::result::Result<
            std::result::Result<RaftMessage, tonic::Status>,
            tokio::time::error::Elapsed,
        >,
    ) -> std::result::Result<Resp, RPCError<u64, Member, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply = match outcome {
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("peer {:x}: timed out", self.target),
                );
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Ok(Err(status)) => {
                if status.message() == Error::MemberRemoved.to_string() {
                    tracing::warn!(
                        peer = format!("{:x}", self.target),
                        "a peer says this member was removed from the cluster"
                    );
                    self.peers.removed.store(true, Ordering::Relaxed);
                }
                let e = std::io::Error::other(format!("peer {:x}: {status}", self.target));
                return Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&e)),
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
            Ok(Ok(r)) => r,
        };
        self.peers
            .last_ok
            .lock()
            .insert(self.target, std::time::Instant::now());
        let result: std::result::Result<Resp, E> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends a snapshot on one `SnapshotStream` call: the payload is read as it goes, in
    /// pieces of [`STREAM_PIECE`], with HTTP/2's flow control keeping the producer at most a
    /// few windows ahead (no length is needed up front, so the view is read once). Given up
    /// when a piece waits longer than the install timeout to be taken, when the answer takes
    /// longer than that after the last piece, or when openraft cancels it.
    async fn stream_snapshot(
        &self,
        vote: Vote<u64>,
        meta: &SnapshotMeta<u64, Member>,
        data: &mut super::snapshot::SnapshotData,
        cancel: impl Future<Output = ReplicationClosed>,
        option: &RPCOption,
    ) -> std::result::Result<SnapshotResponse<u64>, Streamed> {
        use tokio::io::AsyncReadExt;
        let failed = |e: &dyn std::fmt::Display| {
            let e = std::io::Error::other(format!("peer {:x}: {e}", self.target));
            Streamed::Failed(Box::new(StreamingError::Network(NetworkError::new(&e))))
        };
        let mut client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                let e = std::io::Error::other(e.clone());
                return Err(Streamed::Failed(Box::new(StreamingError::Unreachable(
                    Unreachable::new(&e),
                ))));
            }
        };
        let head = encode(&(vote, meta)).map_err(|e| failed(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<RaftMessage>(2);
        let request = self
            .peers
            .request_to(tokio_stream::wrappers::ReceiverStream::new(rx), self.target);
        let patience = option.hard_ttl();
        let pump = async move {
            let send = async |msg| match tokio::time::timeout(patience, tx.send(msg)).await {
                Ok(Ok(())) => Ok(()),
                // The call ended: its outcome says why.
                Ok(Err(_)) => Err(None),
                Err(_) => Err(Some(
                    "a snapshot piece waited too long to be taken".to_string(),
                )),
            };
            send(head).await?;
            let mut sent = 0u64;
            loop {
                let mut piece = Vec::with_capacity(STREAM_PIECE);
                while piece.len() < STREAM_PIECE {
                    match data.read_buf(&mut piece).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(Some(format!("reading the snapshot: {e}"))),
                    }
                }
                if piece.is_empty() {
                    break;
                }
                sent += piece.len() as u64;
                send(RaftMessage { data: piece, id: 0 }).await?;
            }
            let end = encode(&sent).map_err(|e| Some(e.to_string()))?;
            send(RaftMessage {
                data: end.data,
                id: SNAPSHOT_END,
            })
            .await
        };
        let call = client.snapshot_stream(request);
        tokio::pin!(pump, call, cancel);
        let mut answer_by = None;
        let reply = loop {
            let wait_answer = async {
                match answer_by {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                closed = &mut cancel => return Err(Streamed::Failed(Box::new(StreamingError::Closed(closed)))),
                pumped = &mut pump, if answer_by.is_none() => match pumped {
                    Ok(()) => answer_by = Some(tokio::time::Instant::now() + patience),
                    Err(Some(e)) => return Err(failed(&e)),
                    // The call ended early: wait for its outcome.
                    Err(None) => answer_by = Some(tokio::time::Instant::now() + patience),
                },
                outcome = &mut call => break outcome,
                _ = wait_answer => return Err(failed(&"no answer to a snapshot sent")),
            }
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(Streamed::Unsupported)
            }
            Err(status) => {
                return Err(Streamed::Failed(Box::new(StreamingError::Unreachable(
                    refused(self.target, status),
                ))))
            }
        };
        self.peers
            .last_ok
            .lock()
            .insert(self.target, std::time::Instant::now());
        let result: std::result::Result<SnapshotResponse<u64>, Fatal<u64>> =
            decode(&reply).map_err(|e| failed(&e))?;
        result.map_err(|e| {
            Streamed::Failed(Box::new(StreamingError::RemoteError(RemoteError::new(
                self.target,
                e,
            ))))
        })
    }

    /// Sends a snapshot as InstallSnapshot chunks of `chunk` bytes, one at a time, as
    /// openraft's own transport does; reading one chunk ahead tells which is the last, so
    /// the length is never needed. Any failure ends the transfer (openraft starts another;
    /// the receiver takes a new one from offset 0).
    async fn send_in_chunks(
        &mut self,
        vote: Vote<u64>,
        meta: &SnapshotMeta<u64, Member>,
        mut data: Box<super::snapshot::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed>,
        option: &RPCOption,
        chunk: usize,
    ) -> std::result::Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        use tokio::io::AsyncReadExt;
        let storage = |e: std::io::Error| {
            let e = std::io::Error::other(format!("reading the snapshot: {e}"));
            StreamingError::Network(NetworkError::new(&e))
        };
        let mut read_chunk = async || -> std::io::Result<Vec<u8>> {
            let mut buf = Vec::with_capacity(chunk);
            while buf.len() < chunk {
                if data.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            Ok(buf)
        };
        tokio::pin!(cancel);
        let mut offset = 0u64;
        let mut this = read_chunk().await.map_err(storage)?;
        loop {
            let next = if this.len() < chunk {
                Vec::new()
            } else {
                read_chunk().await.map_err(storage)?
            };
            let done = next.is_empty();
            let n = this.len() as u64;
            let req = InstallSnapshotRequest {
                vote,
                meta: meta.clone(),
                offset,
                data: this,
                done,
            };
            let answer = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                answer = self.install_snapshot(req, option.clone()) => answer,
            };
            let resp = match answer {
                Ok(resp) => resp,
                Err(RPCError::RemoteError(RemoteError {
                    target,
                    target_node,
                    source: RaftError::Fatal(fatal),
                })) => {
                    return Err(StreamingError::RemoteError(RemoteError {
                        target,
                        target_node,
                        source: fatal,
                    }))
                }
                Err(RPCError::Unreachable(e)) => return Err(StreamingError::Unreachable(e)),
                // A mismatch (the peer lost track of the transfer) included: the next
                // attempt starts from the first byte, after a backoff.
                Err(e) => return Err(StreamingError::Unreachable(refused(self.target, e))),
            };
            // A higher vote: the caller steps down.
            if resp.vote > vote || done {
                return Ok(SnapshotResponse::new(resp.vote));
            }
            offset += n;
            this = next;
        }
    }

    /// One request and its reply on the AppendEntries stream (opened if
    /// needed).
    async fn on_stream(
        &self,
        stream: Option<AppendStream>,
        mut msg: RaftMessage,
    ) -> std::result::Result<(AppendStream, RaftMessage), tonic::Status> {
        let mut s = match stream {
            Some(s) => s,
            None => {
                let mut client = self.client.clone().map_err(tonic::Status::unavailable)?;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let req = self
                    .peers
                    .request_to(tokio_stream::wrappers::ReceiverStream::new(rx), self.target);
                let rx = client.append_stream(req).await?.into_inner();
                AppendStream { tx, rx, next_id: 0 }
            }
        };
        s.next_id += 1;
        msg.id = s.next_id;
        s.tx.send(msg)
            .await
            .map_err(|_| tonic::Status::unavailable("peer stream closed"))?;
        loop {
            match s.rx.message().await? {
                Some(reply) if reply.id == s.next_id => return Ok((s, reply)),
                Some(_) => continue,
                None => return Err(tonic::Status::unavailable("peer stream ended")),
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> std::result::Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>>
    {
        // A leader reports its own entries written before their fsync ends
        // (`raft::log_store`), so a commit index may count a copy that is not
        // yet on its disk: followers learn it only once it is, and so never
        // apply (or answer a client for) an entry a majority does not hold.
        if let Some(commit) = &rpc.leader_commit {
            self.durable.wait(commit.index).await;
        }
        // Too many bytes of entries for one message: openraft sends fewer (as
        // many as fit, at least one; an entry alone always goes). Sized
        // before encoding, so a refused message is never built.
        let fit = entries_within(&rpc.entries, MAX_APPEND_BYTES);
        if fit < rpc.entries.len() {
            return Err(RPCError::PayloadTooLarge(
                openraft::error::PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        let msg = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // The stream is kept only while it works: any failure drops it.
        let stream = self.stream.take();
        let outcome = tokio::time::timeout(option.hard_ttl(), self.on_stream(stream, msg))
            .await
            .map(|r| {
                r.map(|(stream, reply)| {
                    self.stream = Some(stream);
                    reply
                })
            });
        self.reply(outcome)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> std::result::Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, async |mut c, r| c.install_snapshot(r).await)
            .await
    }

    /// A snapshot goes on one stream ([`Conn::stream_snapshot`]); to a member of a build
    /// without that call, in InstallSnapshot chunks ([`Conn::send_in_chunks`]).
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        mut snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> std::result::Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        use futures::FutureExt;
        let cancel = cancel.shared();
        let streamed = if self.chunks_only {
            Err(Streamed::Unsupported)
        } else {
            self.stream_snapshot(
                vote,
                &snapshot.meta,
                &mut snapshot.snapshot,
                cancel.clone(),
                &option,
            )
            .await
        };
        match streamed {
            Ok(answer) => Ok(answer),
            Err(Streamed::Failed(e)) => Err(*e),
            Err(Streamed::Unsupported) => {
                if !self.chunks_only {
                    tracing::info!(
                        peer = format!("{:x}", self.target),
                        "the peer takes snapshots in chunks only (an older build)"
                    );
                    self.chunks_only = true;
                }
                // The stream may have read some of it already.
                use tokio::io::AsyncSeekExt;
                let Snapshot { meta, mut snapshot } = snapshot;
                snapshot
                    .seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                let chunk = option.snapshot_chunk_size().unwrap_or(8 << 20);
                self.send_in_chunks(vote, &meta, snapshot, cancel, &option, chunk)
                    .await
            }
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> std::result::Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(&rpc, &option, async |mut c, r| c.vote(r).await)
            .await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A member that is down is retried every 200 ms: a restarted member
        // rejoins quickly.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::peerpb::peer_server::{Peer, PeerServer};
    use crate::raft::snapshot::tests::{payload_of, state_with};
    use crate::raft::snapshot::{Outgoing, SnapshotData};

    /// A peer of a build before `SnapshotStream`: it takes InstallSnapshot chunks only
    /// (every other call answers Unimplemented).
    #[derive(Default, Clone)]
    struct OldPeer {
        got: Arc<Mutex<Vec<u8>>>,
        chunks: Arc<Mutex<Vec<(u64, usize, bool)>>>,
    }

    #[tonic::async_trait]
    impl Peer for OldPeer {
        async fn install_snapshot(
            &self,
            req: tonic::Request<RaftMessage>,
        ) -> std::result::Result<tonic::Response<RaftMessage>, tonic::Status> {
            let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
            let mut got = self.got.lock();
            if rpc.offset == 0 {
                got.clear();
            }
            got.extend_from_slice(&rpc.data);
            self.chunks
                .lock()
                .push((rpc.offset, rpc.data.len(), rpc.done));
            let answer: std::result::Result<
                InstallSnapshotResponse<u64>,
                RaftError<u64, InstallSnapshotError>,
            > = Ok(InstallSnapshotResponse { vote: rpc.vote });
            Ok(tonic::Response::new(encode(&answer)?))
        }
    }

    /// A leader of this build sends a snapshot to a member of an older one: the stream is
    /// refused as unknown, and the same bytes go in chunks, the last one marked done, without
    /// the length being asked for first (a chunk read ahead tells the end, also when the
    /// payload fills its chunks exactly).
    #[test]
    fn a_peer_without_streams_gets_the_snapshot_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        // About 3 MiB.
        let state = state_with(dir.path(), 300, 10_000, 9);
        let want = payload_of(&state);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let peer = OldPeer::default();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(
                        PeerServer::new(peer.clone()).max_decoding_message_size(MAX_PEER_MESSAGE),
                    )
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let peers = Peers::new(1, 2, None);
            let mut conn = Conn {
                target: 7,
                client: peers
                    .client(7, &[format!("http://{addr}")])
                    .map_err(|e| e.to_string()),
                peers,
                durable: super::super::Durable::new(0),
                stream: None,
                chunks_only: false,
            };
            let vote = Vote::new(3, 2);
            let meta = SnapshotMeta {
                last_log_id: None,
                last_membership: Default::default(),
                snapshot_id: "2-9".into(),
            };
            let outgoing = async || {
                let (_, out) = Outgoing::start(state.clone()).await.unwrap();
                Box::new(SnapshotData::Out(out))
            };
            let snapshot = Snapshot {
                meta: meta.clone(),
                snapshot: outgoing().await,
            };
            let option = RPCOption::new(Duration::from_secs(10));
            let answer = conn
                .full_snapshot(vote, snapshot, std::future::pending(), option.clone())
                .await
                .unwrap();
            assert_eq!(answer.vote, vote);
            assert!(*peer.got.lock() == want, "the bytes sent are the payload");
            assert_eq!(
                *peer.chunks.lock(),
                vec![(0, want.len(), true)],
                "one chunk of at most 8 MiB"
            );
            for chunk in [1 << 20, want.len(), want.len() / 2 + want.len() % 2] {
                peer.chunks.lock().clear();
                let answer = conn
                    .send_in_chunks(
                        vote,
                        &meta,
                        outgoing().await,
                        std::future::pending(),
                        &option,
                        chunk,
                    )
                    .await
                    .unwrap();
                assert_eq!(answer.vote, vote);
                assert!(*peer.got.lock() == want, "chunks of {chunk}");
                let chunks = peer.chunks.lock().clone();
                assert_eq!(
                    chunks.len(),
                    want.len().div_ceil(chunk),
                    "chunks of {chunk}"
                );
                let mut offset = 0;
                for (i, (at, len, done)) in chunks.iter().enumerate() {
                    assert_eq!((*at, *done), (offset, i == chunks.len() - 1));
                    offset += *len as u64;
                }
            }
        });
    }
}
