//! The member: `EtcdServer` opens storage, starts Raft and its background
//! tasks, and answers what the API layer asks of the member as a whole
//! (headers, leadership, membership as Raft has it). The rest lives beside it:
//! `propose` (group commit and forwarding to the leader), `read` (read-index
//! batching), `tasks` (leadership tracking, lease expiry, sizes, compaction),
//! `door` (what the API asks of the key space: ranges, txns, typed
//! proposals), `discover` (a joining member finding its ID) and `membership` (etcd's
//! Cluster API on Raft's membership). Serving the API is `crate::run`'s.

mod corrupt;
mod discover;
mod door;
pub mod membership;
mod propose;
mod read;
mod tasks;

pub use door::AppliedResponse;
pub use propose::{propose_forwarded, MAX_BATCH};
pub use read::CAUGHT_UP_ENTRIES;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::SnapshotPolicy;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{cluster_id, Config};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::peerpb::peer_client::PeerClient;
use crate::raft::{KvState, LogStore, Member, Network, Peers, Raft, StateMachine};
use crate::storage::{Engine, Identity};
use propose::Pending;
use read::ReadWaiter;

/// The etcd API version cairn reports (kube-apiserver parses it).
pub const ETCD_VERSION: &str = "3.5.13";
/// The cluster version cairn reports.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

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
    /// Held (shared) around Raft proposals and read rounds; MoveLeader holds
    /// it exclusively while the leader goes quiet.
    pub(crate) transfer_gate: tokio::sync::RwLock<()>,
    /// The leader's read index as `/readyz?voter` last asked it, and when: probes and
    /// scrapers asking within [`read::CAUGHT_UP_FRESH`] share one answer (each asking costs
    /// the leader a quorum round), and callers arriving while one is asked wait for it.
    pub(crate) caught_up_head: tokio::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Restored from a snapshot and not yet in a Raft snapshot of its own: members must not be
    /// added until it is (they would replay a log that lacks the restored data).
    pub(crate) restore_pending: std::sync::atomic::AtomicBool,
    /// Whether this member leads others (its log then syncs in the background).
    log_background_sync: Arc<std::sync::atomic::AtomicBool>,
    /// The leadership openraft restored at start, if it did: its reads wait
    /// for the log this member had then ([`Self::read_index_floor`]).
    restored_leadership: Option<crate::raft::RestoredLeadership>,
    /// TLS of the client and peer ports, and towards other members.
    pub tls: crate::tls::MemberTls,
}

/// `--force-new-cluster` (or its once-per-token form naming this member): before Raft starts,
/// the member's log is rewritten so that it starts as the only voter (`raft::force`).
async fn force_new_cluster(
    cfg: &Config,
    engine: &Engine,
    log: &mut LogStore,
    state: &KvState,
    me: u64,
) -> Result<()> {
    use crate::config::ForceNewCluster;
    let once = match &cfg.force_new_cluster {
        ForceNewCluster::No => return Ok(()),
        ForceNewCluster::Always => None,
        ForceNewCluster::Once(token) => {
            let done: Option<String> = engine.raft_get(crate::storage::FORCED_NEW_CLUSTER)?;
            if done.as_ref() == Some(token) {
                info!(
                    token,
                    "--experimental-force-new-cluster-once: done before, not again"
                );
                return Ok(());
            }
            Some(token)
        }
    };
    match crate::raft::force_new_cluster(log, me, &state.applied()).await {
        Ok(Some(f)) => warn!(
            member = format!("{me:x}"),
            kept_index = f.kept.index,
            dropped_entries = f.dropped,
            left_behind = ?f.left_behind.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
            "forcing a new cluster: this member is its only voter; its data up to its commit index is kept"
        ),
        Ok(None) => info!("--force-new-cluster: the data holds no membership, nothing to force"),
        Err(e) => return Err(Error::Internal(format!("cannot force a new cluster: {e}"))),
    }
    if let Some(token) = once {
        engine.raft_put(crate::storage::FORCED_NEW_CLUSTER, token)?;
    }
    Ok(())
}

impl EtcdServer {
    /// Opens the member's storage and starts Raft (not the client listeners).
    pub async fn start(cfg: Config) -> Result<Arc<Self>> {
        let tls = crate::tls::MemberTls::load(&cfg)?;
        let tokens = crate::auth::Tokens::from_flags(&cfg.auth_token, cfg.auth_token_ttl)
            .map_err(|e| Error::InvalidArgument(format!("--auth-token: {e}")))?;
        let dir = cfg.data_dir.join("member").join("cairn");
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Internal(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let engine = Engine::open(&dir)?;
        let had_data = engine.identity()?.is_some();
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
                let id = discover::discover(&cfg, tls.peer_client.as_ref()).await?;
                info!(
                    member = format!("{:x}", id.member_id),
                    cluster = format!("{:x}", id.cluster_id),
                    "joining an existing cluster"
                );
                engine.save_identity(&id)?;
                id
            }
        };
        let peers = Peers::new(
            identity.cluster_id,
            identity.member_id,
            tls.peer_client.clone(),
        );
        let metrics = Metrics::default();
        metrics.quota_backend_bytes.set(cfg.quota_backend_bytes);
        let state = Arc::new(KvState::open(
            engine.clone(),
            cfg.min_lease_ttl(),
            identity.member_id,
        )?);
        let _ = state.commit_seconds.set(metrics.backend_commit.clone());
        state.auth.set_tokens(tokens);
        if state.auth.enabled() && cfg.peer_tls.as_ref().is_none_or(|t| !t.client_cert_auth) {
            // As with etcd: whoever reaches the peer port can propose as any user.
            warn!("auth is enabled but the peer port does not verify members' certificates (--peer-client-cert-auth): keep it unreachable from clients");
        }
        if state.removed(identity.member_id) {
            // Its own applied log says so: it will never be a member again (etcd's
            // stance; etcd exits 0 here, cairn exits non-zero so that the termination
            // message reaches an operator).
            error!(
                member = format!("{:x}", identity.member_id),
                "the member has been permanently removed from the cluster"
            );
            return Err(Error::Removed(identity.member_id));
        }
        let fsync = metrics.wal_fsync.clone();
        let restore_pending = engine
            .raft_get::<bool>(crate::storage::RESTORED_NEEDS_SNAPSHOT)?
            .unwrap_or(false);
        // A restored data dir's first start bootstraps the membership it was restored for.
        let restored_members: Option<BTreeMap<u64, Member>> =
            engine.raft_get(crate::storage::RESTORED_MEMBERS)?;
        let restore_engine = engine.clone();
        let force_engine = engine.clone();
        let legacy_log = cfg.data_dir.join("member").join("cairn-wal");
        let mut log = LogStore::new(engine, &legacy_log, identity.member_id, move |secs| {
            fsync.observe(secs)
        })
        .map_err(Error::internal)?;
        let applied_state = state.clone();
        log.limit_purges(Arc::new(move || applied_state.applied().0))
            .map_err(Error::internal)?;
        if had_data {
            force_new_cluster(&cfg, &force_engine, &mut log, &state, identity.member_id).await?;
        }
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
            // A snapshot travels in 8 MiB chunks; the last one is answered only once
            // the whole snapshot is checked and loaded, which takes tens of seconds
            // at GiB sizes, so each chunk has five minutes.
            install_snapshot_timeout: 300_000,
            snapshot_max_chunk_size: 8 << 20,
            max_payload_entries: 64,
            ..Default::default()
        };
        let raft_cfg = Arc::new(raft_cfg.validate().map_err(Error::internal)?);
        // openraft runs on the calling runtime, the first client thread's
        // single-threaded one: a write then goes from socket to fsync to
        // apply to response without a thread handoff (measured: single-client
        // puts ~10% faster than with Raft on a thread of its own; measured
        // again for issue 22 with client connections on threads of their own:
        // 25-35% fewer puts and ranges at 64 clients and no better tail beside
        // 1M-key ranges, on a 2-core VM; README, "Known limits").
        let raft = Raft::new(
            identity.member_id,
            raft_cfg,
            Network::new(peers.clone(), durable.clone()),
            log,
            StateMachine::new(state.clone(), durable),
        )
        .await
        .map_err(Error::internal)?;
        if (cfg.initial_cluster_new || restored_members.is_some())
            && !raft.is_initialized().await.map_err(Error::internal)?
        {
            // Every member bootstraps the same membership (Raft's first
            // entry must be identical everywhere); each then publishes its
            // client URLs once it runs, as etcd members do. A restored data
            // dir bootstraps what it was restored for (its member ID came
            // from the restore's flags; etcd's restored WAL holds them too).
            let members = restored_members.unwrap_or_else(|| cfg.initial_members());
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
            transfer_gate: Default::default(),
            caught_up_head: Default::default(),
            log_background_sync,
            restored_leadership,
            restore_pending: std::sync::atomic::AtomicBool::new(restore_pending),
            tls,
        });
        if restore_pending {
            tokio::spawn(tasks::snapshot_restored(
                Arc::downgrade(&server),
                restore_engine,
            ));
        }
        tokio::spawn(read::read_batcher(Arc::downgrade(&server), reads_rx));
        tokio::spawn(tasks::refresh_sizes(Arc::downgrade(&server)));
        if let Some(ac) = server.cfg.auto_compaction {
            tokio::spawn(tasks::auto_compact(Arc::downgrade(&server), ac));
        }
        tokio::spawn(propose::batcher(Arc::downgrade(&server), rx));
        tokio::spawn(membership::publish(Arc::downgrade(&server)));
        tokio::spawn(tasks::track_leadership(Arc::downgrade(&server)));
        tokio::spawn(tasks::expire_leases(Arc::downgrade(&server)));
        tokio::spawn(tasks::watch_removal(Arc::downgrade(&server)));
        if let Some(every) = server.cfg.corrupt_check_every {
            tokio::spawn(corrupt::periodic(Arc::downgrade(&server), every));
        }
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

    /// A peer client for the current leader.
    pub fn leader_client(&self) -> Result<PeerClient<tonic::transport::Channel>> {
        let leader = self.leader();
        if leader == 0 {
            return Err(Error::NoLeader);
        }
        let (node, _) = self.member(leader).ok_or(Error::NoLeader)?;
        self.peers.client(leader, &node.peer_urls)
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

    /// Why this member's Raft core stopped, if it did: it then makes no progress at all
    /// (health, readiness and liveness say so; `serve` exits).
    pub fn raft_stopped(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.running_state.as_ref().err().map(|e| e.to_string())
    }

    /// Stops this member for good: it was removed from the cluster (`by` says who knows).
    pub(crate) fn stop_removed(&self, by: &str) {
        if self.removed.send_replace(true) {
            return;
        }
        warn!(
            member = format!("{:x}", self.member_id),
            by, "the member has been permanently removed from the cluster; stopping"
        );
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            warn!("raft shutdown: {e}");
        }
    }
}
