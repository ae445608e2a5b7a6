//! Writes: client requests queue up and leave in batches, one Raft entry
//! each (group commit), proposed on the leader or forwarded to it; calls
//! that must run on the leader (lease renewals, a lease's remaining time).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::warn;

use super::EtcdServer;
use crate::error::{Error, Result};
use crate::mvcc::Applied;
use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
use crate::proto::peerpb::peer_client::PeerClient;
use crate::proto::peerpb::{
    LeaseRemainingRequest, LeaseRemainingResponse, LeaseRenewRequest, LeaseRenewResponse,
};
use crate::proto::raftpb::{internal_request::Request, Batch, InternalRequest};
use crate::raft::{BatchResult, Member, Proposal};

/// Most client requests carried by one Raft entry.
pub const MAX_BATCH: usize = 512;
/// Most bytes of requests carried by one Raft entry (a request larger than
/// this travels alone): an entry always fits a peer message
/// ([`crate::raft::MAX_PEER_MESSAGE`]) with room to spare, whatever the
/// request sizes.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Raft entries in flight at once, per member. The leader's own fsync runs
/// in the background (`raft::log_store`), so while one entry is being synced
/// and replicated the next one can already be appended. Measured on a 2-core
/// VM (64 clients, medians): 3 members 7.3k -> 7.7k puts/s going from 1 to
/// 2 (3 rounds); from 2 to 3, with applies off the WAL, 13.3k -> 14.5k/s
/// (4 paired rounds), one member 29.4k vs 29.5k/s; 4 did worse than 3 in
/// an earlier trial.
const MAX_INFLIGHT_BATCHES: usize = 3;

pub(super) type Pending = (InternalRequest, oneshot::Sender<Result<Applied>>);

pub(super) fn map_write_err(e: RaftError<u64, ClientWriteError<u64, Member>>) -> Error {
    match e {
        // The entry may or may not have been appended before leadership
        // moved: etcd says "leader changed" for such proposals.
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Error::LeaderChanged,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Error::internal(e),
        RaftError::Fatal(e) => Error::Internal(format!("raft stopped: {e}")),
    }
}

impl EtcdServer {
    /// Replicates and applies one write request, made by `ai` (checked where
    /// it is applied).
    pub async fn propose(
        &self,
        request: Request,
        ai: Option<&crate::auth::AuthInfo>,
    ) -> Result<Applied> {
        self.not_learner()?;
        let req = InternalRequest {
            request: Some(request),
            username: ai.map(|a| a.user.clone()).unwrap_or_default(),
            auth_revision: ai.map(|a| a.revision).unwrap_or_default(),
        };
        if req.encoded_len() > self.cfg.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        if refused_when_corrupt(&req) && self.corrupt() {
            return Err(Error::Corrupt);
        }
        if needs_space(&req) && self.over_quota(req.encoded_len() as i64) {
            self.raise_nospace();
            return Err(Error::NoSpace);
        }
        self.wait_leader().await?;
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send((req, tx))
            .map_err(|_| Error::Internal("server stopped".into()))?;
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Internal("server stopped".into())),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Whether `more` bytes would take the state past `--quota-backend-bytes`. The size
    /// refreshed twice a second decides, unless it says no: then the size is read afresh, so a
    /// write right after space was reclaimed (compact, defragment, disarm) is not refused on a
    /// stale size (and the alarm not raised again).
    fn over_quota(&self, more: i64) -> bool {
        let quota = self.cfg.quota_backend_bytes;
        if self.db_size.load(Ordering::Relaxed) + more <= quota {
            return false;
        }
        let size = self.state.engine.size();
        self.db_size.store(size, Ordering::Relaxed);
        size + more > quota
    }

    /// Raises the NOSPACE alarm for this member (once), as etcd does when a
    /// write would exceed `--quota-backend-bytes`; writes are refused until
    /// space is reclaimed (compact, defrag) and the alarm disarmed.
    pub(super) fn raise_nospace(&self) {
        let raised = self
            .state
            .store
            .read()
            .alarms()
            .iter()
            .any(|a| a.alarm == AlarmType::Nospace as i32 && a.member_id == self.member_id);
        if raised {
            return;
        }
        let alarm = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.member_id,
            alarm: AlarmType::Nospace as i32,
        };
        let (tx, _rx) = oneshot::channel();
        let _ = self.proposals.send((
            InternalRequest {
                request: Some(Request::Alarm(alarm)),
                ..Default::default()
            },
            tx,
        ));
        warn!(
            quota = self.cfg.quota_backend_bytes,
            "database space exceeded; NOSPACE alarm raised"
        );
    }

    /// Runs `local` on the leader, or has the leader run it through the
    /// peer service (`remote`, given a client for the leader), bounded by
    /// the request timeout.
    pub async fn on_leader<T>(
        &self,
        local: impl AsyncFnOnce() -> Result<T>,
        remote: impl AsyncFnOnce(
            PeerClient<tonic::transport::Channel>,
        ) -> std::result::Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T> {
        self.wait_leader().await?;
        if self.is_leader() {
            return local().await;
        }
        let client = self.leader_client()?;
        match tokio::time::timeout(self.request_timeout(), remote(client)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(st)) => Err(Error::from_peer(&st)),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Renews a lease on the leader's clock (forwarded there from other
    /// members). Returns the TTL, 0 if the lease does not exist.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        self.not_learner()?;
        let local = async || {
            let ttl = self.state.store.read().lease(id).map(|l| l.ttl);
            if let Some(ttl) = ttl {
                self.state.lessor.renew(id, ttl);
            }
            Ok(LeaseRenewResponse {
                ttl: ttl.unwrap_or(0),
            })
        };
        let remote = async |mut c: PeerClient<_>| {
            c.lease_renew(self.peers.request(LeaseRenewRequest { id }))
                .await
        };
        Ok(self.on_leader(local, remote).await?.ttl)
    }

    /// Seconds left on lease `id`'s clock, from the leader; None if the
    /// leader has no clock for it.
    pub async fn lease_remaining(&self, id: i64) -> Result<Option<i64>> {
        let local = async || {
            let ttl = self.state.lessor.remaining(id).map(|d| d.as_secs() as i64);
            Ok(LeaseRemainingResponse {
                ttl: ttl.unwrap_or(-1),
            })
        };
        let remote = async |mut c: PeerClient<_>| {
            c.lease_remaining(self.peers.request(LeaseRemainingRequest { id }))
                .await
        };
        let ttl = self.on_leader(local, remote).await?.ttl;
        Ok((ttl >= 0).then_some(ttl))
    }
}

/// Requests that grow the database and are refused over the quota.
/// Requests a cluster with a CORRUPT alarm refuses (etcd's corrupt applier: the key space and
/// leases; alarms, members and auth still work, so the alarm can be dealt with).
fn refused_when_corrupt(r: &InternalRequest) -> bool {
    matches!(
        &r.request,
        Some(
            Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Txn(_)
                | Request::Compaction(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_)
        )
    )
}

pub(super) fn needs_space(r: &InternalRequest) -> bool {
    match &r.request {
        Some(Request::Put(_)) | Some(Request::LeaseGrant(_)) => true,
        Some(Request::Txn(t)) => !crate::mvcc::is_read_only(t),
        _ => false,
    }
}

/// Turns queued proposals into Raft entries: everything waiting when the
/// in-flight slot frees up goes into one entry. The leader proposes it to
/// Raft; any other member forwards it to the leader. Either way the results
/// come back through [`KvState::expect`] when this member applies the entry
/// (which also frees the slot); a proposal that fails, or is not applied
/// here in time, is answered with the error.
pub(super) async fn batcher(
    server: std::sync::Weak<EtcdServer>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    // Unique across restarts: an entry proposed before a restart and applied
    // after it must not match a new batch's number.
    let mut seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // A request that did not fit the last batch's bytes starts the next.
    let mut held: Option<Pending> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Some(s) = server.upgrade() else { return };
        let mut bytes = first.0.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    let len = p.0.encoded_len();
                    if bytes + len > MAX_BATCH_BYTES {
                        held = Some(p);
                        break;
                    }
                    bytes += len;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        seq += 1;
        let n = batch.len();
        s.metrics.batch_size.observe(n as f64);
        s.metrics.proposals_pending.add(n as i64);
        let (requests, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // The results cross from the Raft thread in one message and fan out
        // here: one wakeup per batch instead of one per request, and the
        // responses leave together (fewer socket writes).
        let (done_tx, done_rx) = oneshot::channel::<BatchResult>();
        s.state.expect(
            seq,
            Box::new(move |results| {
                let _ = done_tx.send(results);
                drop(permit);
            }),
        );
        let pending = s.metrics.proposals_pending.clone();
        tokio::spawn(async move {
            let mut results = done_rx.await.unwrap_or_default().into_iter();
            for w in waiters {
                let r = results
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("missing apply result".into())));
                let _ = w.send(r);
            }
            pending.sub(n as i64);
        });
        let batch = Batch {
            requests,
            proposer: s.member_id,
            seq,
        };
        tokio::spawn(async move {
            let timeout = s.request_timeout();
            let outcome = tokio::time::timeout(timeout, submit(&s, batch)).await;
            let err = match outcome {
                Ok(Ok(())) => {
                    // Committed; wait (bounded) for this member's apply to answer.
                    if s.state.is_expected(seq) {
                        tokio::time::sleep(timeout).await;
                    }
                    Error::Timeout
                }
                Ok(Err(e)) => e,
                Err(_) => Error::Timeout,
            };
            if let Some(answer) = s.state.cancel(seq) {
                s.metrics.proposals_failed.inc_by(n as u64);
                answer((0..n).map(|_| Err(err.clone())).collect());
            }
        });
    }
}

/// Proposes a batch: to Raft on the leader, through the peer service
/// elsewhere. A forward the leader refused before proposing (it was not
/// the leader, or could not be reached) is retried once a leader is known.
pub(super) async fn submit(s: &EtcdServer, batch: Batch) -> Result<()> {
    let batch = Arc::new(batch);
    loop {
        s.wait_leader().await?;
        if s.is_leader() {
            let _gate = s.transfer_gate.read().await;
            return s
                .raft
                .client_write(Proposal(batch))
                .await
                .map(|_| ())
                .map_err(map_write_err);
        }
        let leader_id = s.leader();
        let Ok(mut leader) = s.leader_client() else {
            // Leadership moved between the checks: look again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        match leader.propose(s.peers.request((*batch).clone())).await {
            Ok(_) => return Ok(()),
            Err(status) => {
                let e = Error::from_peer(&status);
                let undelivered = matches!(e, Error::NotLeader | Error::NoLeader)
                    || crate::raft::not_connected(&status);
                if !undelivered {
                    return Err(e);
                }
                // Wait for a different (or first) leader, then try again.
                let mut m = s.raft.metrics();
                let changed = m.wait_for(|m| m.current_leader.is_some_and(|l| l != leader_id));
                if tokio::time::timeout(Duration::from_millis(100), changed)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The leader's side of a forwarded batch.
pub async fn propose_forwarded(s: &EtcdServer, batch: Batch) -> Result<()> {
    if !s.is_leader() {
        return Err(if s.leader() == 0 {
            Error::NoLeader
        } else {
            Error::NotLeader
        });
    }
    let _gate = s.transfer_gate.read().await;
    s.raft
        .client_write(Proposal(Arc::new(batch)))
        .await
        .map(|_| ())
        .map_err(map_write_err)
}
