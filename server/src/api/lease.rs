//! etcdserverpb.Lease: grants and revokes go through Raft; keep-alives and
//! remaining TTLs are the leader's clock (`crate::lease`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::error::Error;
use crate::lease::MAX_LEASE_TTL;
use crate::proto::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::proto::raftpb::internal_request::Request as Internal;
use crate::server::EtcdServer;

pub struct LeaseService {
    s: Arc<EtcdServer>,
    /// etcd-style ID generator: member bits, then time, then a counter.
    next_id: AtomicU64,
}

impl LeaseService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seed = ((s.member_id & 0xffff) << 48) | ((ms & 0xff_ffff_ffff) << 8);
        Self {
            s,
            next_id: AtomicU64::new(seed),
        }
    }

    fn generate_id(&self) -> i64 {
        loop {
            let id = (self.next_id.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)) as i64;
            if id != 0 && self.s.lease(id).is_none() {
                return id;
            }
        }
    }

    /// Renews on the leader's clock (forwarded there from other members);
    /// etcd answers an unknown lease with TTL 0, not an error.
    async fn keep_alive_one(&self, id: i64) -> Result<LeaseKeepAliveResponse, Error> {
        let ttl = self.s.lease_renew(id).await?;
        Ok(LeaseKeepAliveResponse {
            header: Some(self.s.header(0)),
            id,
            ttl,
        })
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for Arc<LeaseService> {
    #[instrument(level = "debug", skip_all, fields(ttl = req.get_ref().ttl))]
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        self.s
            .check_user(super::caller(&self.s, &req).await?.as_ref())?;
        let mut r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge.into());
        }
        if r.id == 0 {
            r.id = self.generate_id();
        }
        Ok(Response::new(
            self.s.propose_as(Internal::LeaseGrant(r), None).await?,
        ))
    }

    #[instrument(level = "debug", skip_all, fields(id = req.get_ref().id))]
    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // Revoking deletes the lease's keys: the caller must be able to
        // write them all (checked where it is applied).
        let ai = super::caller(&self.s, &req).await?;
        self.s.check_user(ai.as_ref())?;
        let r = Internal::LeaseRevoke(req.into_inner());
        Ok(Response::new(self.s.propose_as(r, ai.as_ref()).await?))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        // Renewing keeps the lease's keys alive: the stream's caller must be
        // able to write them all.
        let ai = super::caller(&self.s, &req).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let checked = me.s.check_lease_keys(ai.as_ref(), r.id, true);
                let resp = match checked {
                    Ok(()) => me.keep_alive_one(r.id).await,
                    Err(e) => Err(e),
                }
                .map_err(Status::from);
                let stop = resp.is_err();
                if tx.send(resp).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(level = "debug", skip_all, fields(id = req.get_ref().id))]
    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        let r = req.into_inner();
        self.s.read_index().await?;
        // The names of its keys are for those who may read them all.
        if r.keys {
            self.s.check_lease_keys(ai.as_ref(), r.id, false)?;
        } else {
            self.s.check_user(ai.as_ref())?;
        }
        // The remaining TTL is the leader's clock.
        let remaining = self.s.lease_remaining(r.id).await?;
        let header = Some(self.s.header(0));
        let resp = match self.s.lease(r.id) {
            // etcd answers an unknown lease with TTL -1, not an error.
            None => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                ..Default::default()
            },
            Some(l) => {
                let remaining = remaining.unwrap_or(l.ttl);
                LeaseTimeToLiveResponse {
                    header,
                    id: r.id,
                    ttl: remaining,
                    granted_ttl: l.ttl,
                    keys: if r.keys {
                        l.keys.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }
            }
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.s
            .check_user(super::caller(&self.s, &req).await?.as_ref())?;
        self.s.read_index().await?;
        let (ids, revision) = self.s.lease_ids();
        let leases = ids.into_iter().map(|id| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.s.header(revision)),
            leases,
        }))
    }
}
