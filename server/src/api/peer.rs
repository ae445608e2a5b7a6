//! peerpb.Peer: what members ask of each other on `--listen-peer-urls`.
//! Raft's RPCs go to openraft; the rest lets a follower hand writes, reads,
//! lease renewals and membership changes to the leader.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto::etcdserverpb::{
    HashKvRequest, HashKvResponse, MemberAddRequest, MemberAddResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use crate::proto::peerpb::peer_server::Peer;
use crate::proto::peerpb::{
    ElectRequest, ElectResponse, LeaseRemainingRequest, LeaseRemainingResponse, LeaseRenewRequest,
    LeaseRenewResponse, MembersRequest, MembersResponse, ProposeResponse, PublishRequest,
    PublishResponse, RaftMessage, ReadIndexRequest, ReadIndexResponse,
};
use crate::proto::raftpb::Batch;
use crate::raft::{
    decode, encode, TypeConfig, CLUSTER_ID_HEADER, MEMBER_ID_HEADER, SNAPSHOT_END, TARGET_ID_HEADER,
};
use crate::server::EtcdServer;

#[derive(Clone)]
pub struct PeerService {
    s: Arc<EtcdServer>,
    /// The snapshot being received, and how many of its bytes have arrived.
    receiving: Arc<parking_lot::Mutex<Option<(String, u64)>>>,
    /// Counts snapshot streams that passed their header's checks: a newer one ends the one
    /// before (a leader that gave up on a transfer, or a new leader), so that one at a time
    /// writes to disk.
    streams: Arc<std::sync::atomic::AtomicU64>,
}

/// The AppendEntries stream's replies (the type the generated service names).
type RaftStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send + 'static>>;

/// How long a snapshot stream may send nothing before it is given up.
const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a snapshot chunk is not taken.
#[derive(Debug, PartialEq, Eq)]
enum ChunkRefused {
    /// Not a continuation of the snapshot being received: the leader is to start again at
    /// offset 0 (openraft's SnapshotMismatch).
    Mismatch,
    /// The snapshot would pass the size cap.
    TooLarge,
}

/// Checks an InstallSnapshot chunk against the snapshot being received: openraft 0.9 announces
/// no total size and writes each chunk at its offset into a buffer in memory, so a chunk past
/// the bytes received so far would allocate the gap. A chunk must start at or before where the
/// received bytes end (again at an offset already received: a resend after a lost answer; a
/// new snapshot at offset 0), and the total stays under `cap`. Returns the new mark.
fn admit_chunk(
    receiving: &Option<(String, u64)>,
    id: &str,
    offset: u64,
    len: usize,
    cap: u64,
) -> Result<u64, ChunkRefused> {
    let received = match receiving {
        _ if offset == 0 => 0,
        Some((current, received)) if current == id => *received,
        _ => return Err(ChunkRefused::Mismatch),
    };
    if offset > received {
        return Err(ChunkRefused::Mismatch);
    }
    let end = offset.saturating_add(len as u64);
    if end > cap {
        return Err(ChunkRefused::TooLarge);
    }
    Ok(end.max(received))
}

impl PeerService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self {
            s,
            receiving: Default::default(),
            streams: Default::default(),
        }
    }

    /// Most bytes a snapshot sent to this member may have: twice the space quota (a snapshot
    /// holds the live data, which the quota bounds) and some room.
    fn snapshot_cap(&self) -> u64 {
        (self.s.cfg.quota_backend_bytes.max(0) as u64).saturating_mul(2) + (64 << 20)
    }

    /// Refuses a request without this cluster's ID, as etcd refuses members of another
    /// cluster. Only the membership may be asked without it (a joining member does not know
    /// the ID yet; the client port's MemberList tells as much).
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(v) = req.metadata().get(CLUSTER_ID_HEADER) else {
            return Err(Status::failed_precondition(
                "request has no cluster ID: not a member of this cluster",
            ));
        };
        let theirs = v
            .to_str()
            .ok()
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        if theirs != Some(self.s.cluster_id) {
            return Err(Status::failed_precondition(format!(
                "request cluster ID mismatch (got {}, want {:x})",
                v.to_str().unwrap_or("?"),
                self.s.cluster_id
            )));
        }
        Ok(())
    }

    /// The member ID a header names (0 if it is unreadable), if there is one.
    fn id_header<T>(req: &Request<T>, key: &str) -> Option<u64> {
        req.metadata().get(key).map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0)
        })
    }

    /// The sender's member ID, which must be a member of this cluster. Members of builds
    /// before the header send none: taken, for one release, so that a rolling upgrade keeps
    /// writing.
    fn sender<T>(&self, req: &Request<T>) -> Result<Option<u64>, Status> {
        let Some(id) = Self::id_header(req, MEMBER_ID_HEADER) else {
            return Ok(None);
        };
        if id == 0 || self.s.member(id).is_none() {
            return Err(Status::failed_precondition(format!(
                "request from {id:x}, which is not a member of this cluster"
            )));
        }
        Ok(Some(id))
    }

    /// Refuses a Raft message meant for another member (one that had this URL before), as
    /// etcd drops messages to another ID: a removed member still running on a reused URL
    /// must not answer for its successor.
    fn addressed_here<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match Self::id_header(req, TARGET_ID_HEADER) {
            Some(to) if to != self.s.member_id => Err(Status::failed_precondition(format!(
                "message to member {to:x} reached member {:x}",
                self.s.member_id
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `id` was a member and has been removed, by the memberships
    /// applied here (`raft::MemberHistory`): a member not known here yet, or
    /// known only from memberships older than the one applied now, is never
    /// "removed".
    fn is_removed(&self, id: u64) -> bool {
        self.s.state.removed(id)
    }
}

fn raft_err<E: std::fmt::Display>(e: E) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check(&req)?;
        self.addressed_here(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        let result = self.s.raft.append_entries(rpc).await;
        Ok(Response::new(encode(&result)?))
    }

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<RaftStream>, Status> {
        self.check(&req)?;
        self.addressed_here(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let s = self.s.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let reply = match decode::<AppendEntriesRequest<TypeConfig>>(&m) {
                    Ok(rpc) => {
                        let result = s.raft.append_entries(rpc).await;
                        encode(&result).map(|mut r| {
                            r.id = m.id;
                            r
                        })
                    }
                    Err(e) => Err(e),
                };
                let failed = reply.is_err();
                if tx.send(reply.map_err(Status::from)).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check(&req)?;
        self.addressed_here(&req)?;
        let rpc: VoteRequest<u64> = decode(req.get_ref())?;
        // A removed member that never learnt of its removal campaigns; it
        // is told, and stops (etcd's peers reject removed members the same way).
        if self.is_removed(rpc.vote.leader_id().voted_for().unwrap_or(0)) {
            return Err(Error::MemberRemoved.into());
        }
        let result = self.s.raft.vote(rpc).await;
        Ok(Response::new(encode(&result)?))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check(&req)?;
        self.addressed_here(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        let id = rpc.meta.snapshot_id.clone();
        let admitted = admit_chunk(
            &self.receiving.lock(),
            &id,
            rpc.offset,
            rpc.data.len(),
            self.snapshot_cap(),
        );
        let end = match admitted {
            Ok(end) => end,
            Err(ChunkRefused::TooLarge) => {
                *self.receiving.lock() = None;
                return Err(Status::resource_exhausted(format!(
                    "snapshot {id}: over {} bytes",
                    self.snapshot_cap()
                )));
            }
            Err(ChunkRefused::Mismatch) => {
                use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
                let segment = |offset| openraft::SnapshotSegmentId {
                    id: id.clone(),
                    offset,
                };
                let mismatch: Result<
                    openraft::raft::InstallSnapshotResponse<u64>,
                    RaftError<u64, InstallSnapshotError>,
                > = Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
                    SnapshotMismatch {
                        expect: segment(0),
                        got: segment(rpc.offset),
                    },
                )));
                return Ok(Response::new(encode(&mismatch)?));
            }
        };
        let done = rpc.done;
        let result = self.s.raft.install_snapshot(rpc).await;
        // Taken chunks move the mark; a refused one or the last one ends the transfer (the
        // leader starts again at offset 0).
        *self.receiving.lock() = match &result {
            Ok(_) if !done => Some((id, end)),
            _ => None,
        };
        Ok(Response::new(encode(&result)?))
    }

    async fn snapshot_stream(
        &self,
        req: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<RaftMessage>, Status> {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        self.check(&req)?;
        self.addressed_here(&req)?;
        let mut stream = req.into_inner();
        let mut next = async || match tokio::time::timeout(STREAM_IDLE, stream.message()).await {
            Err(_) => Err(Status::deadline_exceeded("snapshot stream idle")),
            Ok(m) => m,
        };
        let head = next()
            .await?
            .ok_or_else(|| Status::invalid_argument("snapshot stream without a header"))?;
        let (vote, meta): (
            openraft::Vote<u64>,
            openraft::SnapshotMeta<u64, crate::raft::Member>,
        ) = decode(&head)?;
        // A leader of an older term is answered at once with the vote here (it steps down),
        // before any byte is written.
        let current = self.s.raft.metrics().borrow().vote;
        if vote < current {
            let answer: Result<openraft::raft::SnapshotResponse<u64>, openraft::error::Fatal<u64>> =
                Ok(openraft::raft::SnapshotResponse::new(current));
            return Ok(Response::new(encode(&answer)?));
        }
        let id = meta.snapshot_id.clone();
        let mut data = self
            .s
            .raft
            .begin_receiving_snapshot()
            .await
            .map_err(raft_err)?;
        let mine = self.streams.fetch_add(1, Ordering::SeqCst) + 1;
        let cap = self.snapshot_cap();
        let mut received = 0u64;
        loop {
            if self.streams.load(Ordering::SeqCst) != mine {
                return Err(Status::aborted(format!(
                    "snapshot {id}: a newer transfer replaced this one"
                )));
            }
            let msg = next().await?.ok_or_else(|| {
                Status::aborted(format!(
                    "snapshot {id}: the stream ended before its end mark"
                ))
            })?;
            if msg.id == SNAPSHOT_END {
                let sent: u64 = decode(&msg)?;
                if sent != received {
                    return Err(Status::data_loss(format!(
                        "snapshot {id}: {received} bytes received, {sent} sent"
                    )));
                }
                break;
            }
            if msg.data.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "snapshot {id}: an empty piece"
                )));
            }
            received = received.saturating_add(msg.data.len() as u64);
            if received > cap {
                return Err(Status::resource_exhausted(format!(
                    "snapshot {id}: over {cap} bytes"
                )));
            }
            data.write_all(&msg.data).await.map_err(raft_err)?;
        }
        data.shutdown().await.map_err(raft_err)?;
        let snapshot = openraft::storage::Snapshot {
            meta,
            snapshot: data,
        };
        let result = self.s.raft.install_full_snapshot(vote, snapshot).await;
        Ok(Response::new(encode(&result)?))
    }

    async fn propose(&self, req: Request<Batch>) -> Result<Response<ProposeResponse>, Status> {
        self.check(&req)?;
        // A member proposes its own batches, as its batcher makes them: at most MAX_BATCH
        // requests, each within --max-request-bytes (every member applies what is committed:
        // the state machine checks the requests' shape again).
        let batch = req.get_ref();
        match self.sender(&req)? {
            Some(sender) if batch.proposer != sender => {
                return Err(Status::failed_precondition(format!(
                    "batch proposed by {:x} sent by {sender:x}",
                    batch.proposer
                )));
            }
            Some(_) => {}
            // An older build names no sender: its batches name it as their proposer.
            None if self.s.member(batch.proposer).is_none() => {
                return Err(Status::failed_precondition(format!(
                    "batch proposed by {:x}, which is not a member of this cluster",
                    batch.proposer
                )));
            }
            None => {}
        }
        if batch.requests.len() > crate::server::MAX_BATCH
            || batch
                .requests
                .iter()
                .any(|r| prost::Message::encoded_len(r) > self.s.cfg.max_request_bytes)
        {
            return Err(Error::RequestTooLarge.into());
        }
        crate::server::propose_forwarded(&self.s, req.into_inner()).await?;
        Ok(Response::new(ProposeResponse {}))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check(&req)?;
        let index = self.s.leader_read_index().await?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn lease_renew(
        &self,
        req: Request<LeaseRenewRequest>,
    ) -> Result<Response<LeaseRenewResponse>, Status> {
        self.check(&req)?;
        if !self.s.is_leader() {
            return Err(Error::NotLeader.into());
        }
        let ttl = self.s.lease_renew(req.get_ref().id).await?;
        Ok(Response::new(LeaseRenewResponse { ttl }))
    }

    async fn lease_remaining(
        &self,
        req: Request<LeaseRemainingRequest>,
    ) -> Result<Response<LeaseRemainingResponse>, Status> {
        self.check(&req)?;
        if !self.s.is_leader() {
            return Err(Error::NotLeader.into());
        }
        let ttl = self.s.lease_remaining(req.get_ref().id).await?;
        Ok(Response::new(LeaseRemainingResponse {
            ttl: ttl.unwrap_or(-1),
        }))
    }

    async fn members(
        &self,
        req: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        if req.metadata().get(CLUSTER_ID_HEADER).is_some() {
            self.check(&req)?;
        }
        let asking = req.get_ref().id;
        Ok(Response::new(MembersResponse {
            cluster_id: self.s.cluster_id,
            members: self.s.member_list(),
            removed: asking != 0 && self.is_removed(asking),
        }))
    }

    async fn publish(
        &self,
        req: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.check(&req)?;
        if !self.s.is_leader() {
            return Err(Error::NotLeader.into());
        }
        self.s.publish_member(req.into_inner()).await?;
        Ok(Response::new(PublishResponse {}))
    }

    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.s.member_add(req.into_inner()).await?))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.s.member_remove(req.into_inner()).await?))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.s.member_update(req.into_inner()).await?))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(
            self.s.member_promote(req.into_inner()).await?,
        ))
    }

    async fn elect(&self, req: Request<ElectRequest>) -> Result<Response<ElectResponse>, Status> {
        self.check(&req)?;
        use crate::proto::peerpb::elect_request::Kind;
        match req.get_ref().kind() {
            Kind::Campaign => self.s.raft.trigger().elect().await.map_err(raft_err)?,
            Kind::Hold => {
                self.s.raft.runtime_config().elect(false);
                // Released by the transferor, or by itself if that never comes.
                let s = self.s.clone();
                let after = 4 * s.cfg.election_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    s.raft.runtime_config().elect(true);
                });
            }
            Kind::Release => self.s.raft.runtime_config().elect(true),
        }
        Ok(Response::new(ElectResponse {}))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.s.hash_kv(req.get_ref().revision).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::{admit_chunk, ChunkRefused};

    #[test]
    fn snapshot_chunks_must_follow_on_and_stay_under_the_cap() {
        let cap = 1 << 20;
        // A new snapshot starts at 0; chunks follow on; a resend of received bytes is taken.
        assert_eq!(admit_chunk(&None, "s1", 0, 100, cap), Ok(100));
        let at = Some(("s1".to_string(), 100));
        assert_eq!(admit_chunk(&at, "s1", 100, 50, cap), Ok(150));
        assert_eq!(admit_chunk(&at, "s1", 50, 50, cap), Ok(100));
        assert_eq!(admit_chunk(&at, "s1", 50, 10, cap), Ok(100));
        // Past what arrived (the buffer would allocate the gap), another snapshot's chunk, no
        // snapshot at all: the leader is told to start again.
        for (state, id, offset) in [
            (&at, "s1", 1u64 << 40),
            (&at, "s1", u64::MAX),
            (&at, "s1", 101),
            (&at, "s2", 100),
            (&None, "s1", 100),
        ] {
            assert_eq!(
                admit_chunk(state, id, offset, 10, cap),
                Err(ChunkRefused::Mismatch),
                "{offset}"
            );
        }
        // Over the cap.
        assert_eq!(
            admit_chunk(&at, "s1", 100, cap as usize, cap),
            Err(ChunkRefused::TooLarge)
        );
        // A new transfer at 0 replaces one in progress.
        assert_eq!(admit_chunk(&at, "s2", 0, 10, cap), Ok(10));
    }
}
