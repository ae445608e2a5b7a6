//! peerpb.Peer: what members ask of each other on `--listen-peer-urls`.
//! Raft's RPCs go to openraft; the rest lets a follower hand writes, reads,
//! lease renewals and membership changes to the leader.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto::etcdserverpb::{
    MemberAddRequest, MemberAddResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use crate::proto::peerpb::peer_server::Peer;
use crate::proto::peerpb::{
    ElectRequest, ElectResponse, LeaseRemainingRequest, LeaseRemainingResponse, LeaseRenewRequest,
    LeaseRenewResponse, MembersRequest, MembersResponse, ProposeResponse, PublishRequest,
    PublishResponse, RaftMessage, ReadIndexRequest, ReadIndexResponse,
};
use crate::proto::raftpb::Batch;
use crate::raft::{decode, encode, TypeConfig, CLUSTER_ID_HEADER};
use crate::server::EtcdServer;

pub struct PeerService {
    s: Arc<EtcdServer>,
}

impl PeerService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }

    /// Refuses members of another cluster (as etcd does).
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let Some(v) = req.metadata().get(CLUSTER_ID_HEADER) {
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
        }
        Ok(())
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
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        let result = self.s.raft.append_entries(rpc).await;
        Ok(Response::new(encode(&result)?))
    }

    type AppendStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send>>;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        self.check(&req)?;
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
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        let result = self.s.raft.install_snapshot(rpc).await;
        Ok(Response::new(encode(&result)?))
    }

    async fn propose(&self, req: Request<Batch>) -> Result<Response<ProposeResponse>, Status> {
        self.check(&req)?;
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
        self.check(&req)?;
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
}
