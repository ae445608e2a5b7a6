//! The member: opens storage, starts Raft, proposes client writes in
//! batches (group commit), tracks leadership, expires leases, and serves the
//! etcd gRPC API and HTTP endpoints on the client URLs.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::config::{cluster_id, AutoCompaction, Config};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::mvcc::Applied;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, CompactionRequest, LeaseRevokeRequest,
    ResponseHeader,
};
use crate::proto::peerpb::peer_client::PeerClient;
use crate::proto::peerpb::{
    LeaseRemainingRequest, LeaseRemainingResponse, LeaseRenewRequest, LeaseRenewResponse,
    MembersRequest, ReadIndexRequest,
};
use crate::proto::raftpb::{internal_request::Request, Batch, InternalRequest};
use crate::raft::{
    BatchResult, KvState, LogStore, Member, Network, Peers, Proposal, Raft, StateMachine,
};
use crate::storage::{Engine, Identity};

/// The etcd API version cairn reports (kube-apiserver parses it).
pub const ETCD_VERSION: &str = "3.5.13";
/// The cluster version cairn reports.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// Most client requests carried by one Raft entry.
const MAX_BATCH: usize = 512;
/// Raft entries in flight at once, per member. The leader's own fsync runs
/// in the background (`raft::log_store`), so while one entry is being synced
/// and replicated the next one can already be appended. Measured on a 2-core
/// VM (64 clients, medians): 3 members 7.3k -> 7.7k puts/s going from 1 to
/// 2 (3 rounds); from 2 to 3, with applies off the WAL, 13.3k -> 14.5k/s
/// (4 paired rounds), one member 29.4k vs 29.5k/s; 4 did worse than 3 in
/// an earlier trial.
const MAX_INFLIGHT_BATCHES: usize = 3;

type Pending = (InternalRequest, oneshot::Sender<Result<Applied>>);
type ReadWaiter = oneshot::Sender<Result<()>>;

/// A running member.
pub struct EtcdServer {
    pub cfg: Config,
    pub raft: Raft,
    pub state: Arc<KvState>,
    pub member_id: u64,
    pub cluster_id: u64,
    pub metrics: Metrics,
    term: AtomicU64,
    leader: AtomicU64,
    /// Storage size for the space quota (`refresh_sizes` keeps it current).
    db_size: AtomicI64,
    proposals: mpsc::UnboundedSender<Pending>,
    reads: mpsc::UnboundedSender<ReadWaiter>,
    /// Channels to the other members.
    pub peers: Arc<Peers>,
    /// One membership change at a time (on the leader).
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// Turns true once this member has been removed from the cluster.
    pub(crate) removed: tokio::sync::watch::Sender<bool>,
    /// Every member ID a membership config seen here had.
    pub(crate) seen_members: Mutex<HashSet<u64>>,
    /// Held (shared) around Raft proposals and read rounds; MoveLeader holds
    /// it exclusively while the leader goes quiet.
    pub(crate) transfer_gate: tokio::sync::RwLock<()>,
    /// Restored from a snapshot and not yet in a Raft snapshot of its own: members must not be
    /// added until it is (they would replay a log that lacks the restored data).
    pub(crate) restore_pending: std::sync::atomic::AtomicBool,
    /// Whether this member leads others (its log then syncs in the background).
    log_background_sync: Arc<std::sync::atomic::AtomicBool>,
    /// The leadership openraft restored at start, if it did: its reads wait
    /// for the log this member had then ([`Self::read_index_floor`]).
    restored_leadership: Option<crate::raft::RestoredLeadership>,
}

fn map_write_err(e: RaftError<u64, ClientWriteError<u64, Member>>) -> Error {
    match e {
        // The entry may or may not have been appended before leadership
        // moved: etcd says "leader changed" for such proposals.
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Error::LeaderChanged,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Error::internal(e),
        RaftError::Fatal(e) => Error::Internal(format!("raft stopped: {e}")),
    }
}

impl EtcdServer {
    /// Opens the member's storage and starts Raft (not the client listeners).
    pub async fn start(cfg: Config) -> Result<Arc<Self>> {
        let dir = cfg.data_dir.join("member").join("cairn");
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Internal(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let engine = Engine::open(&dir)?;
        let identity = match engine.identity()? {
            Some(id) => id,
            None if cfg.initial_cluster_new => {
                let ids = cfg.initial_member_ids();
                let member_id = *ids.get(&cfg.name).ok_or_else(|| {
                    Error::Internal(format!(
                        "couldn't find local name {:?} in the initial cluster configuration",
                        cfg.name
                    ))
                })?;
                let all: Vec<u64> = ids.values().copied().collect();
                let id = Identity {
                    cluster_id: cluster_id(&all),
                    member_id,
                };
                engine.save_identity(&id)?;
                id
            }
            None => {
                let id = discover(&cfg).await?;
                info!(
                    member = format!("{:x}", id.member_id),
                    cluster = format!("{:x}", id.cluster_id),
                    "joining an existing cluster"
                );
                engine.save_identity(&id)?;
                id
            }
        };
        let peers = Peers::new(identity.cluster_id);
        let metrics = Metrics::default();
        let state = Arc::new(KvState::open(
            engine.clone(),
            cfg.min_lease_ttl(),
            identity.member_id,
        )?);
        let fsync = metrics.wal_fsync.clone();
        let restore_pending = engine
            .raft_get::<bool>(RESTORED_NEEDS_SNAPSHOT)?
            .unwrap_or(false);
        let restore_engine = engine.clone();
        let legacy_log = cfg.data_dir.join("member").join("cairn-wal");
        let log = LogStore::new(engine, &legacy_log, identity.member_id, move |secs| {
            fsync.observe(secs)
        })
        .map_err(Error::internal)?;
        let log_background_sync = log.background_sync();
        let restored_leadership = log.restored_leadership();
        let durable = log.durable();
        let election = cfg.election_timeout.as_millis() as u64;
        let raft_cfg = openraft::Config {
            cluster_name: cfg.initial_cluster_token.clone(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            // openraft's followers refuse votes for one election_timeout_max
            // after hearing from the leader (etcd's check-quorum does the same
            // for one election timeout): max is the election timeout, and a
            // follower campaigns after a random half to whole of it.
            election_timeout_min: election / 2,
            election_timeout_max: election,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_count),
            // A member lagging further than this catches up by snapshot
            // (etcd keeps 5000 entries too, fewer with a small snapshot count).
            max_in_snapshot_log_to_keep: cfg.snapshot_count.min(5000),
            // A snapshot of hundreds of MiB travels in 8 MiB chunks, each
            // with a minute to arrive.
            install_snapshot_timeout: 60_000,
            snapshot_max_chunk_size: 8 << 20,
            max_payload_entries: 64,
            ..Default::default()
        };
        let raft_cfg = Arc::new(raft_cfg.validate().map_err(Error::internal)?);
        // openraft runs on the calling runtime, the first client thread's
        // single-threaded one: a write then goes from socket to fsync to
        // apply to response without a thread handoff (measured: single-client
        // puts ~10% faster than with Raft on a thread of its own, and no
        // throughput lost at 64 clients, on a 2-core VM).
        let raft = Raft::new(
            identity.member_id,
            raft_cfg,
            Network::new(peers.clone(), durable.clone()),
            log,
            StateMachine::new(state.clone(), durable),
        )
        .await
        .map_err(Error::internal)?;
        if cfg.initial_cluster_new && !raft.is_initialized().await.map_err(Error::internal)? {
            // Every member bootstraps the same membership (Raft's first
            // entry must be identical everywhere); each then publishes its
            // client URLs once it runs, as etcd members do.
            let ids = cfg.initial_member_ids();
            let members: BTreeMap<u64, Member> = cfg
                .initial_cluster
                .iter()
                .map(|(name, urls)| {
                    (
                        ids[name],
                        Member {
                            name: name.clone(),
                            peer_urls: urls.clone(),
                            client_urls: Vec::new(),
                        },
                    )
                })
                .collect();
            info!(
                member = format!("{:x}", identity.member_id),
                cluster = format!("{:x}", identity.cluster_id),
                "bootstrapping a new cluster"
            );
            raft.initialize(members).await.map_err(Error::internal)?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reads_tx, reads_rx) = mpsc::unbounded_channel();
        let server = Arc::new(Self {
            cfg,
            raft,
            state,
            member_id: identity.member_id,
            cluster_id: identity.cluster_id,
            metrics,
            term: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            db_size: AtomicI64::new(0),
            proposals: tx,
            reads: reads_tx,
            peers,
            membership_lock: Default::default(),
            removed: tokio::sync::watch::channel(false).0,
            seen_members: Default::default(),
            transfer_gate: Default::default(),
            log_background_sync,
            restored_leadership,
            restore_pending: std::sync::atomic::AtomicBool::new(restore_pending),
        });
        if restore_pending {
            tokio::spawn(snapshot_restored(Arc::downgrade(&server), restore_engine));
        }
        tokio::spawn(read_batcher(Arc::downgrade(&server), reads_rx));
        tokio::spawn(refresh_sizes(Arc::downgrade(&server)));
        if let Some(ac) = server.cfg.auto_compaction {
            tokio::spawn(auto_compact(Arc::downgrade(&server), ac));
        }
        tokio::spawn(batcher(Arc::downgrade(&server), rx));
        tokio::spawn(crate::membership::publish(Arc::downgrade(&server)));
        tokio::spawn(track_leadership(Arc::downgrade(&server)));
        tokio::spawn(expire_leases(Arc::downgrade(&server)));
        Ok(server)
    }

    /// A response header at `revision` (0: the current revision).
    pub fn header(&self, revision: i64) -> ResponseHeader {
        let revision = if revision == 0 {
            self.state.store.read().revision()
        } else {
            revision
        };
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.term.load(Ordering::Relaxed),
        }
    }

    /// A header that carries no revision (etcd's Cluster responses).
    pub fn header_without_revision(&self) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: 0,
            raft_term: self.term.load(Ordering::Relaxed),
        }
    }

    /// Completes a header filled by the state machine (which sets only the revision).
    pub fn fill(&self, h: &mut Option<ResponseHeader>) {
        let rev = h.as_ref().map(|h| h.revision).unwrap_or(0);
        *h = Some(self.header(rev));
    }

    /// The current leader's member ID, 0 when there is none.
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == self.member_id
    }

    /// Whether this member is a learner: learners serve only what etcd's
    /// do (serializable reads, member list, status).
    pub fn is_learner(&self) -> bool {
        // Checked on every write: no copy of the member's record.
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        membership.get_node(&self.member_id).is_some()
            && !membership.voter_ids().any(|v| v == self.member_id)
    }

    /// Waits until Raft's membership has this member.
    pub async fn wait_joined(&self) {
        let me = self.member_id;
        let mut rx = self.raft.metrics();
        let joined = |m: &openraft::RaftMetrics<u64, Member>| {
            m.membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id == me)
        };
        if !joined(&rx.borrow()) {
            info!("waiting for the cluster's membership before serving clients");
            let _ = rx.wait_for(joined).await;
        }
    }

    /// Refuses what learners do not serve.
    pub fn not_learner(&self) -> Result<()> {
        if self.is_learner() {
            Err(Error::NotSupportedForLearner)
        } else {
            Ok(())
        }
    }

    pub fn request_timeout(&self) -> Duration {
        // etcd: 5s plus two election timeouts.
        Duration::from_secs(5) + 2 * self.cfg.election_timeout
    }

    /// Waits (bounded) until some member leads.
    pub async fn wait_leader(&self) -> Result<()> {
        if self.leader() != 0 {
            return Ok(());
        }
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                if rx.borrow_and_update().current_leader.is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(self.request_timeout(), wait)
            .await
            .map_err(|_| Error::NoLeader)
    }

    /// Replicates and applies one write request.
    pub async fn propose(&self, request: Request) -> Result<Applied> {
        self.not_learner()?;
        let req = InternalRequest {
            request: Some(request),
        };
        if req.encoded_len() > self.cfg.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        if needs_space(&req)
            && self.db_size.load(Ordering::Relaxed) + req.encoded_len() as i64
                > self.cfg.quota_backend_bytes
        {
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

    /// Raises the NOSPACE alarm for this member (once), as etcd does when a
    /// write would exceed `--quota-backend-bytes`; writes are refused until
    /// space is reclaimed (compact, defrag) and the alarm disarmed.
    fn raise_nospace(&self) {
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
            },
            tx,
        ));
        warn!(
            quota = self.cfg.quota_backend_bytes,
            "database space exceeded; NOSPACE alarm raised"
        );
    }

    /// Returns once this member has applied everything committed before the
    /// call: a linearizable read may then be served locally.
    pub async fn read_index(&self) -> Result<()> {
        self.not_learner()?;
        self.wait_leader().await?;
        let (tx, rx) = oneshot::channel();
        self.reads
            .send(tx)
            .map_err(|_| Error::Internal("server stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("server stopped".into()))?
    }

    /// One read-index round, for every read waiting: on the leader a
    /// heartbeat round to a quorum; on any other member the leader's read
    /// index, then waiting until this member has applied up to it.
    async fn confirm_reads(&self) -> Result<()> {
        let timeout = self.request_timeout();
        let until = tokio::time::Instant::now() + timeout;
        let rounds = async {
            loop {
                match self.read_round(timeout).await {
                    // A round that did not hear from a quorum in time (one
                    // slow or lost heartbeat) is tried again until the request
                    // times out, as etcd's read loop retries its ReadIndex.
                    Err(Error::Timeout) => tokio::time::sleep(Duration::from_millis(20)).await,
                    r => return r,
                }
            }
        };
        match tokio::time::timeout_at(until, rounds).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    /// One read-index round (see [`Self::confirm_reads`]).
    async fn read_round(&self, timeout: Duration) -> Result<()> {
        if self.is_leader() {
            let index = self.leader_read_index().await?;
            return self.wait_applied(index, timeout).await;
        }
        let mut leader = self.leader_client()?;
        let index = leader
            .read_index(self.peers.request(ReadIndexRequest {}))
            .await
            .map_err(|s| Error::from_peer(&s))?
            .into_inner()
            .index;
        self.wait_applied(index, timeout).await
    }

    /// Waits until this member has applied log index `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        if self.state.applied().0.map(|l| l.index).unwrap_or(0) >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(wait_err)
    }

    /// The leader's read index (called by other members through the peer
    /// service): confirms leadership with a quorum first.
    pub async fn leader_read_index(&self) -> Result<u64> {
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let _gate = self.transfer_gate.read().await;
        // The term is taken before leadership is confirmed: the index then
        // comes from a leadership of this term or a later one.
        let term = self.raft.metrics().borrow().current_term;
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => {
                Ok(self.read_index_floor(term, read.map(|l| l.index).unwrap_or(0)))
            }
            Err(e) => Err(check_leader_err(e)),
        }
    }

    /// Raises openraft's read index `index`, given while leading `term`, to
    /// the last entry this member had at start if `term` is the leadership
    /// openraft restored then, without an election (see
    /// [`crate::raft::LogStore::restored_leadership`]). Any later
    /// leadership begins with an entry after its whole log.
    fn read_index_floor(&self, term: u64, index: u64) -> u64 {
        match self.restored_leadership {
            Some(r) if r.term == term => index.max(r.last_index),
            _ => index,
        }
    }

    /// A peer client for the current leader.
    pub fn leader_client(&self) -> Result<PeerClient<tonic::transport::Channel>> {
        let leader = self.leader();
        if leader == 0 {
            return Err(Error::NoLeader);
        }
        let (node, _) = self.member(leader).ok_or(Error::NoLeader)?;
        self.peers.client(leader, &node.peer_urls)
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

    /// Members as Raft's applied membership has them: (id, member, is_learner).
    pub fn members(&self) -> Vec<(u64, Member, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: HashSet<u64> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .map(|(id, node)| (*id, node.clone(), !voters.contains(id)))
            .collect()
    }

    /// One member as Raft's membership has it: (member, is_learner).
    pub fn member(&self, id: u64) -> Option<(Member, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let node = m.membership().get_node(&id)?.clone();
        let voter = m.membership().voter_ids().any(|v| v == id);
        Some((node, !voter))
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            warn!("raft shutdown: {e}");
        }
    }
}

/// Batches linearizable reads (as etcd's read loop does): one read-index
/// round serves every read that arrived before it started; reads arriving
/// meanwhile wait for the next round.
async fn read_batcher(
    server: std::sync::Weak<EtcdServer>,
    mut rx: mpsc::UnboundedReceiver<ReadWaiter>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let Some(s) = server.upgrade() else { return };
        let result = s.confirm_reads().await;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Requests that grow the database and are refused over the quota.
fn needs_space(r: &InternalRequest) -> bool {
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
async fn batcher(server: std::sync::Weak<EtcdServer>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    // Unique across restarts: an entry proposed before a restart and applied
    // after it must not match a new batch's number.
    let mut seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let Some(s) = server.upgrade() else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
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
async fn submit(s: &EtcdServer, batch: Batch) -> Result<()> {
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

/// Set by `cairn snapshot restore`: the restored data came from outside the Raft log.
pub const RESTORED_NEEDS_SNAPSHOT: &[u8] = b"restored_needs_snapshot";

/// After a restore, takes a Raft snapshot and purges the log up to it, so that every member
/// added later catches up from a snapshot (which holds the restored data) rather than from the
/// log (which does not). Tries until it succeeds or the server stops.
async fn snapshot_restored(server: std::sync::Weak<EtcdServer>, engine: Arc<Engine>) {
    loop {
        let Some(s) = server.upgrade() else { return };
        match put_restored_in_snapshot(&s, &engine).await {
            Ok(index) => {
                s.restore_pending.store(false, Ordering::Release);
                info!(
                    index,
                    "restored data is in a Raft snapshot; members may join"
                );
                return;
            }
            Err(e) => debug!(error = %e, "restored data not in a Raft snapshot yet"),
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One attempt of [`snapshot_restored`]: as the leader with its whole log applied, builds a
/// snapshot, purges the log up to it and clears the restore mark. Returns the snapshot's index.
async fn put_restored_in_snapshot(s: &EtcdServer, engine: &Engine) -> Result<u64> {
    let step = Some(Duration::from_secs(5));
    let m = s
        .raft
        .wait(step)
        .metrics(
            |m| {
                m.current_leader == Some(m.id)
                    && m.last_applied.is_some()
                    && m.last_applied.map(|l| l.index) == m.last_log_index
            },
            "leading with the log applied",
        )
        .await
        .map_err(wait_err)?;
    let target = m.last_applied.expect("waited for it").index;
    s.raft.trigger().snapshot().await.map_err(Error::internal)?;
    let m = s
        .raft
        .wait(step)
        .metrics(
            |m| m.snapshot.is_some_and(|l| l.index >= target),
            "snapshot built",
        )
        .await
        .map_err(wait_err)?;
    let index = m.snapshot.expect("waited for it").index;
    s.raft
        .trigger()
        .purge_log(index)
        .await
        .map_err(Error::internal)?;
    s.raft
        .wait(step)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "log purged")
        .await
        .map_err(wait_err)?;
    engine.raft_put(RESTORED_NEEDS_SNAPSHOT, &false)?;
    Ok(index)
}

/// What a timed-out or interrupted wait on Raft's metrics means to clients.
fn wait_err(e: openraft::metrics::WaitError) -> Error {
    match e {
        openraft::metrics::WaitError::Timeout(..) => Error::Timeout,
        openraft::metrics::WaitError::ShuttingDown => Error::Internal("server stopped".into()),
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

fn check_leader_err(e: RaftError<u64, openraft::error::CheckIsLeaderError<u64, Member>>) -> Error {
    use openraft::error::CheckIsLeaderError;
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => Error::LeaderChanged,
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => Error::Timeout,
        RaftError::Fatal(e) => Error::Internal(format!("raft stopped: {e}")),
    }
}

/// A joining member (`--initial-cluster-state existing`) asks the members
/// in `--initial-cluster` for the cluster's membership and finds itself in
/// it by its peer URLs (it must have been added with MemberAdd).
async fn discover(cfg: &Config) -> Result<Identity> {
    let mut mine = cfg.advertise_peer_urls.clone();
    mine.sort();
    let mut last = String::from("no other member in --initial-cluster");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        for (name, urls) in &cfg.initial_cluster {
            if *name == cfg.name {
                continue;
            }
            for url in urls {
                let mut client = PeerClient::new(crate::raft::connect(url)?);
                let call = client.members(MembersRequest {});
                let resp = match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(e)) => {
                        last = format!("{url}: {}", e.message());
                        continue;
                    }
                    Err(_) => {
                        last = format!("{url}: timed out");
                        continue;
                    }
                };
                for m in &resp.members {
                    let mut theirs = m.peer_ur_ls.clone();
                    theirs.sort();
                    if theirs == mine {
                        // A member that already ran (it published its name)
                        // has a log this empty data dir lost: it must be
                        // removed and added again, as etcd requires.
                        if !m.name.is_empty() {
                            return Err(Error::Internal(format!(
                                "member {:x} has already been bootstrapped",
                                m.id
                            )));
                        }
                        return Ok(Identity {
                            cluster_id: resp.cluster_id,
                            member_id: m.id,
                        });
                    }
                }
                return Err(Error::Internal(format!(
                    "member with peer URLs {} is not in the cluster's membership (add it with `etcdctl member add` first)",
                    mine.join(",")
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Internal(format!(
        "cannot fetch the cluster's membership from --initial-cluster: {last}"
    )))
}

/// Follows Raft's metrics: term and leader for headers and metrics; on
/// becoming leader, restarts every lease clock.
async fn track_leadership(server: std::sync::Weak<EtcdServer>) {
    let Some(s) = server.upgrade() else { return };
    let mut rx = s.raft.metrics();
    drop(s);
    let mut was_leader = false;
    let mut last_leader = None;
    loop {
        {
            let Some(s) = server.upgrade() else { return };
            let m = rx.borrow_and_update().clone();
            s.term.store(m.current_term, Ordering::Relaxed);
            s.leader
                .store(m.current_leader.unwrap_or(0), Ordering::Relaxed);
            s.metrics.has_leader.set(m.current_leader.is_some() as i64);
            let leader = m.state == ServerState::Leader;
            s.metrics.is_leader.set(leader as i64);
            if m.current_leader.is_some() && m.current_leader != last_leader {
                s.metrics.leader_changes.inc();
                last_leader = m.current_leader;
            }
            let nodes: HashSet<u64> = m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect();
            s.log_background_sync
                .store(nodes.len() > 1 && leader, Ordering::Relaxed);
            s.state.replicated.store(nodes.len() > 1, Ordering::Relaxed);
            let removed = {
                let mut seen = s.seen_members.lock();
                seen.extend(nodes.iter().copied());
                seen.contains(&s.member_id) && !nodes.contains(&s.member_id)
            };
            if removed || s.peers.removed.load(Ordering::Relaxed) {
                warn!(
                    member = format!("{:x}", s.member_id),
                    "the member has been permanently removed from the cluster; stopping"
                );
                s.removed.send_replace(true);
            }
            if let Some(a) = m.last_applied {
                s.metrics.proposals_applied.set(a.index as i64);
            }
            s.metrics
                .proposals_committed
                .set(m.last_log_index.unwrap_or(0) as i64);
            if leader && !was_leader {
                let store = s.state.store.read();
                s.state
                    .lessor
                    .reset_all(store.leases().map(|(id, l)| (id, l.ttl)));
                info!(
                    member = format!("{:x}", s.member_id),
                    term = m.current_term,
                    "became leader"
                );
            }
            was_leader = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// On the leader, revokes leases whose clock ran out.
async fn expire_leases(server: std::sync::Weak<EtcdServer>) {
    let revoking: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        if !s.is_leader() {
            continue;
        }
        for id in s.state.lessor.expired() {
            if !revoking.lock().insert(id) {
                continue;
            }
            let s = s.clone();
            let revoking = revoking.clone();
            tokio::spawn(async move {
                match s
                    .propose(Request::LeaseRevoke(LeaseRevokeRequest { id }))
                    .await
                {
                    Ok(_) | Err(Error::LeaseNotFound) => s.state.lessor.forget(id),
                    Err(e) => warn!(lease = id, "revoking expired lease failed: {e}"),
                }
                revoking.lock().remove(&id);
            });
        }
    }
}

/// On every member, refreshes the storage size the space quota checks and
/// the size/count metrics, twice a second.
async fn refresh_sizes(server: std::sync::Weak<EtcdServer>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        s.metrics.watchers.set(s.state.hub.watchers() as i64);
        s.metrics
            .keys_total
            .set(s.state.store.read().keys_total() as i64);
        let size = s.state.engine.size();
        s.db_size.store(size, Ordering::Relaxed);
        s.metrics.db_total_size.set(size);
        s.metrics
            .db_total_size_in_use
            .set(s.state.engine.size_in_use());
    }
}

/// On the leader, compacts history as `--auto-compaction-*` ask: in
/// revision mode every 5 minutes to `revision - retention`; in periodic mode
/// to the revision the store had one retention period ago, checked every
/// tenth of the period (etcd's compactors behave the same way).
async fn auto_compact(server: std::sync::Weak<EtcdServer>, ac: AutoCompaction) {
    let step = match ac {
        AutoCompaction::Revision(_) => Duration::from_secs(300),
        AutoCompaction::Periodic(p) => (p / 10).max(Duration::from_millis(100)),
    };
    let mut samples: std::collections::VecDeque<(tokio::time::Instant, i64)> = Default::default();
    let mut tick = tokio::time::interval(step);
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        let (current, compacted) = {
            let store = s.state.store.read();
            (store.revision(), store.compacted())
        };
        let target = match ac {
            AutoCompaction::Revision(keep) => current - keep,
            AutoCompaction::Periodic(period) => {
                let now = tokio::time::Instant::now();
                samples.push_back((now, current));
                // The newest sample at least one period old is the target.
                let mut target = 0;
                while let Some(&(t, rev)) = samples.front() {
                    if now.duration_since(t) < period {
                        break;
                    }
                    target = rev;
                    samples.pop_front();
                }
                target
            }
        };
        if !s.is_leader() || target <= compacted {
            continue;
        }
        match s
            .propose(Request::Compaction(CompactionRequest {
                revision: target,
                physical: false,
            }))
            .await
        {
            Ok(_) => info!(revision = target, "auto compaction"),
            Err(Error::Compacted) => {}
            Err(e) => warn!(revision = target, "auto compaction failed: {e}"),
        }
    }
}

/// How long a stopping member waits for open requests and streams to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Runs a member until `shutdown` resolves: the library entry point of the
/// `cairn` binary.
///
/// Stopping is graceful for at most [`STOP_GRACE`], as etcd's (bounded) graceful stop:
/// long-lived streams (watches, lease keep-alives, peers' Raft streams) would otherwise hold
/// the member up until it is killed (a pod's whole termination grace period).
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let server = EtcdServer::start(cfg).await?;
    let mut removed = server.removed.subscribe();
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    // Watched from the start: a member still waiting to join stops too.
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = removed.wait_for(|r| *r) => {}
        }
        let _ = stopping_tx.send(true);
    });
    let mut stopped = stopping.clone();
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let serving = crate::api::serve(server.clone(), stop);
    let result = tokio::select! {
        r = serving => r,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            warn!("connections still open {STOP_GRACE:?} after the stop signal: closing them");
            Ok(())
        }
    };
    server.shutdown().await;
    if *server.removed.borrow() {
        return Err(Error::MemberRemoved);
    }
    result
}
