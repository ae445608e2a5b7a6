//! etcdserverpb.Maintenance: status, alarms, defragmentation, hashes,
//! snapshots and leadership moves.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmRequest, AlarmResponse,
    AlarmType, DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, ResponseHeader, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use crate::proto::raftpb::internal_request::Request as Internal;
use crate::server::{EtcdServer, ETCD_VERSION};

/// Bytes per Snapshot stream message (etcd sends 32 KiB chunks).
const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceService {
    s: Arc<EtcdServer>,
}

impl MaintenanceService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }

    /// Defragment, Snapshot, Hash and HashKV are root's once auth is on;
    /// etcd passes their auth errors on unmapped (gRPC Unknown, `auth: ...`).
    async fn root_only<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ai = super::caller(&self.s, req)
            .await
            .map_err(|s| Status::from(crate::error::Error::from_peer(&s).raw_auth()))?;
        self.s
            .check_admin(ai.as_ref())
            .map_err(|e| Status::from(e.raw_auth()))
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        self.s
            .check_user(super::caller(&self.s, &req).await?.as_ref())?;
        let r = req.into_inner();
        // Only the alarms etcd acts on can be raised (etcd stores any kind; the list is
        // bounded in the store).
        let known = [AlarmType::None, AlarmType::Nospace, AlarmType::Corrupt];
        if r.action == AlarmAction::Activate as i32 && !known.iter().any(|k| *k as i32 == r.alarm) {
            return Err(Error::InvalidArgument(format!(
                "alarm type {} cannot be activated",
                r.alarm
            ))
            .into());
        }
        Ok(Response::new(
            self.s.propose_as(Internal::Alarm(r), None).await?,
        ))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let m = self.s.raft.metrics().borrow().clone();
        let learner = !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.s.member_id);
        let errors = self
            .s
            .alarms()
            .iter()
            .map(|a| {
                let name = AlarmType::try_from(a.alarm)
                    .map(|t| t.as_str_name())
                    .unwrap_or("UNKNOWN");
                format!("memberID:{} alarm:{name} ", a.member_id)
            })
            .collect();
        let resp = StatusResponse {
            header: Some(self.s.header(0)),
            version: ETCD_VERSION.into(),
            db_size: self.s.state.engine.size(),
            leader: self.s.leader(),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            errors,
            db_size_in_use: self.s.state.engine.size_in_use(),
            is_learner: learner,
        };
        Ok(Response::new(resp))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.root_only(&req).await?;
        // A compaction's records are deleted in the background: wait (bounded) until they are,
        // or a defragmentation right after a compaction (NOSPACE recovery) reclaims nothing.
        let until = tokio::time::Instant::now() + self.s.request_timeout();
        while self.s.state.compactor.pending() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let state = self.s.state.clone();
        tokio::task::spawn_blocking(move || state.engine.defragment())
            .await
            .map_err(Error::internal)??;
        Ok(Response::new(DefragmentResponse {
            header: Some(self.s.header(0)),
        }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.root_only(&req).await?;
        let state = self.s.state.clone();
        let hash = tokio::task::spawn_blocking(move || {
            let view = {
                let _consistent = state.store.read();
                state.engine.view()
            };
            view.hash_all()
        })
        .await
        .map_err(Error::internal)??;
        Ok(Response::new(HashResponse {
            header: Some(self.s.header(0)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.root_only(&req).await?;
        Ok(Response::new(self.s.hash_kv(req.get_ref().revision).await?))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.root_only(&req).await?;
        // Streamed from a consistent view of the store as it is read: neither the state nor
        // the file is held in memory, whatever their size. The channel's few chunks are all
        // that waits for a slow client.
        let state = self.s.state.clone();
        let header = self.s.header(0);
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let errors = tx.clone();
            let result = state.stream_snapshot(SNAPSHOT_CHUNK, |blob, remaining, revision| {
                let r = SnapshotResponse {
                    // The header names the revision the snapshot holds (backups record it).
                    header: Some(ResponseHeader {
                        revision: revision.max(1),
                        ..header
                    }),
                    remaining_bytes: remaining,
                    blob: blob.to_vec(),
                    version: String::new(),
                };
                tx.blocking_send(Ok(r)).is_ok()
            });
            if let Err(e) = result {
                let _ = errors.blocking_send(Err(Status::from(e)));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.s.not_learner()?;
        self.s
            .check_user(super::caller(&self.s, &req).await?.as_ref())?;
        self.s.move_leader(req.into_inner().target_id).await?;
        Ok(Response::new(MoveLeaderResponse {
            header: Some(self.s.header(0)),
        }))
    }

    async fn downgrade(
        &self,
        _req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "etcdserver: downgrade is not supported",
        ))
    }
}
