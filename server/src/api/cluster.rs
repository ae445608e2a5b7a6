//! etcdserverpb.Cluster: the member list from Raft's membership.
//! Membership changes (add, remove, update, promote) come with replication.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::etcdserverpb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use crate::server::EtcdServer;

pub struct ClusterService {
    s: Arc<EtcdServer>,
}

impl ClusterService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }

    fn members(&self) -> Vec<Member> {
        self.s
            .members()
            .into_iter()
            .map(|(id, m, learner)| Member {
                id,
                name: m.name,
                peer_ur_ls: m.peer_urls,
                client_ur_ls: m.client_urls,
                is_learner: learner,
            })
            .collect()
    }
}

fn not_yet() -> Status {
    Status::unimplemented("etcdserver: membership changes are not supported by this cairn version")
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(not_yet())
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(not_yet())
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(not_yet())
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // etcd's Cluster responses carry no revision.
        let header = self.s.header_without_revision();
        Ok(Response::new(MemberListResponse {
            header: Some(header),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(not_yet())
    }
}
