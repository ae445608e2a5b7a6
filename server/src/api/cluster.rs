//! etcdserverpb.Cluster: membership from Raft's config; changes run on the
//! leader (`crate::server::membership`), forwarded there from any other member.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::etcdserverpb::{
    cluster_server::Cluster, MemberAddRequest, MemberAddResponse, MemberListRequest,
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
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let s = &self.s;
        s.not_learner()?;
        // Membership changes are root's once auth is on.
        s.check_admin(super::caller(s, &req).await?.as_ref())?;
        let r = req.into_inner();
        let forwarded = r.clone();
        let resp = s
            .on_leader(
                async || s.member_add(r).await,
                async |mut c| c.member_add(s.peers.request(forwarded)).await,
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let s = &self.s;
        s.not_learner()?;
        // Membership changes are root's once auth is on.
        s.check_admin(super::caller(s, &req).await?.as_ref())?;
        let r = req.into_inner();
        let resp = s
            .on_leader(
                async || s.member_remove(r).await,
                async |mut c| c.member_remove(s.peers.request(r)).await,
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let s = &self.s;
        s.not_learner()?;
        // Membership changes are root's once auth is on.
        s.check_admin(super::caller(s, &req).await?.as_ref())?;
        let r = req.into_inner();
        let forwarded = r.clone();
        let resp = s
            .on_leader(
                async || s.member_update(r).await,
                async |mut c| c.member_update(s.peers.request(forwarded)).await,
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // A linearizable list reflects every change acknowledged before it.
        if req.get_ref().linearizable {
            self.s.read_index().await?;
        }
        // etcd's Cluster responses carry no revision.
        let header = self.s.header_without_revision();
        Ok(Response::new(MemberListResponse {
            header: Some(header),
            members: self.s.member_list(),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let s = &self.s;
        s.not_learner()?;
        // Membership changes are root's once auth is on.
        s.check_admin(super::caller(s, &req).await?.as_ref())?;
        let r = req.into_inner();
        let resp = s
            .on_leader(
                async || s.member_promote(r).await,
                async |mut c| c.member_promote(s.peers.request(r)).await,
            )
            .await?;
        Ok(Response::new(resp))
    }
}
