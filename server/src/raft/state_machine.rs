//! The Raft state machine: applies committed batches to MVCC, persists the
//! changes with the applied position, publishes events to watchers and
//! starts/stops lease clocks. Also builds and installs Raft snapshots.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta};
use parking_lot::{Mutex, RwLock};

use super::snapshot::{Incoming, Install, Outgoing, SnapshotData};
use super::{
    io_err, BatchResult, LogId, Member, Proposal, StorageError, StoredMembership, TypeConfig,
};
use crate::error::{Error, Result};
use crate::lease::Lessor;
use crate::mvcc::MvccStore;
use crate::storage::{Engine, StateMeta, View};
use crate::watch::Hub;

/// Keys of the index a range walks per hold of the store lock: an apply
/// waits for at most one such step, not for the whole walk.
pub const RANGE_STEP: usize = 4096;

/// Receives the results of a batch this member proposed, once applied,
/// persisted and published to watchers.
pub type OnApplied = Box<dyn FnOnce(BatchResult) + Send>;

/// The last applied log id and the membership as of it.
pub type Position = (Option<LogId>, StoredMembership);

/// The key-value state shared by the state machine and the API.
pub struct KvState {
    pub engine: Arc<Engine>,
    pub store: RwLock<MvccStore>,
    pub hub: Hub,
    pub lessor: Lessor,
    applied: Mutex<Position>,
    pub(super) min_lease_ttl: i64,
    /// Where snapshots from the leader are received: `<data-dir>/member/snap`.
    pub(super) snap_dir: std::path::PathBuf,
    /// This member's ID, to recognise the batches it proposed.
    member_id: u64,
    /// Set while the cluster has other members (see `StateMachine::apply`).
    pub replicated: std::sync::atomic::AtomicBool,
    /// Batches proposed here and not yet applied, by sequence number.
    pending: Mutex<std::collections::HashMap<u64, OnApplied>>,
    /// Which members the applied memberships have had: who was removed.
    pub history: super::MemberHistory,
    /// Users, roles and permissions, applied from the log like the key space.
    pub auth: crate::auth::Auth,
    /// Deletes the records compactions drop, in the background.
    pub compactor: crate::storage::Compactor,
    /// Observes how long each applied batch takes to write (the server sets it).
    pub commit_seconds: std::sync::OnceLock<prometheus::Histogram>,
}

pub(super) fn decode_position(meta: &StateMeta) -> Result<Position> {
    let applied = if meta.applied.is_empty() {
        None
    } else {
        crate::storage::dec(&meta.applied)?
    };
    let membership = if meta.membership.is_empty() {
        StoredMembership::default()
    } else {
        crate::storage::dec(&meta.membership)?
    };
    Ok((applied, membership))
}

/// The auth state stored as `bytes` (empty: a new one).
pub(super) fn load_auth(bytes: &[u8]) -> Result<crate::auth::AuthStore> {
    if bytes.is_empty() {
        return Ok(Default::default());
    }
    let state = <crate::proto::raftpb::AuthState as prost::Message>::decode(bytes)
        .map_err(|e| Error::Internal(format!("storage: corrupt auth state: {e}")))?;
    Ok(crate::auth::AuthStore::from_state(state))
}

/// Rebuilds the key index from storage, one record at a time: only the
/// index is kept, never the values (startup at size, issue 22).
pub(super) fn rebuild(engine: &Engine, meta: &StateMeta, min_lease_ttl: i64) -> Result<MvccStore> {
    let mut failed = None;
    let records = engine.records().map_while(|r| match r {
        Ok(rec) => Some(rec),
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    let store = MvccStore::restore(
        min_lease_ttl,
        records,
        engine.leases()?.into_iter(),
        meta.revision,
        meta.compacted,
        Engine::alarms_of(meta),
    );
    match failed {
        Some(e) => Err(e),
        None => Ok(store),
    }
}

impl KvState {
    /// Loads the state machine from storage, rebuilding the key index.
    pub fn open(engine: Arc<Engine>, min_lease_ttl: i64, member_id: u64) -> Result<Self> {
        // Beside the database's own directory (`<data-dir>/member/cairn`).
        let snap_dir = engine.dir().parent().unwrap_or(engine.dir()).join("snap");
        super::snapshot::finish_interrupted_install(&engine, &snap_dir)?;
        let meta = engine.state_meta()?;
        let position = decode_position(&meta)?;
        let mut store = rebuild(&engine, &meta, min_lease_ttl)?;
        let compactor = crate::storage::Compactor::start(engine.clone());
        compactor.submit(store.compacted(), store.compact_leftovers());
        let hub = Hub::default();
        hub.reset(store.revision(), store.compacted());
        let history = super::MemberHistory::load(&engine)?;
        // Data dirs of builds before the history: start it from the applied membership.
        history.note(&engine, &position.1)?;
        let auth = crate::auth::Auth::default();
        *auth.store.write() = load_auth(&engine.auth_state()?)?;
        Ok(Self {
            engine,
            store: RwLock::new(store),
            hub,
            lessor: Lessor::default(),
            applied: Mutex::new(position),
            min_lease_ttl,
            snap_dir,
            member_id,
            replicated: Default::default(),
            pending: Mutex::new(Default::default()),
            history,
            auth,
            compactor,
            commit_seconds: std::sync::OnceLock::new(),
        })
    }

    /// Registers the receiver of batch `seq`'s results (proposed by this
    /// member with `proposer` = its ID). Delivering results here, on the
    /// Raft thread right after they are durable and visible, spares the
    /// trip back through openraft's response path.
    pub fn expect(&self, seq: u64, on_applied: OnApplied) {
        self.pending.lock().insert(seq, on_applied);
    }

    /// Whether batch `seq` still waits for its results.
    pub fn is_expected(&self, seq: u64) -> bool {
        self.pending.lock().contains_key(&seq)
    }

    /// Withdraws a registration (the proposal failed); the caller answers.
    pub fn cancel(&self, seq: u64) -> Option<OnApplied> {
        self.pending.lock().remove(&seq)
    }

    /// The last applied log id and the membership as of it.
    pub fn applied(&self) -> Position {
        self.applied.lock().clone()
    }

    /// Whether member `id` was removed from the cluster, as far as the
    /// memberships applied here tell ([`super::MemberHistory`]).
    pub fn removed(&self, id: u64) -> bool {
        let current = self.applied.lock().1.clone();
        self.history.removed(id, &current)
    }

    /// A view of the database at the applied position, that position and the state's meta
    /// as of it. The store lock keeps applies out only while the view is taken, so the view
    /// matches the position; reading it then blocks nobody.
    pub(super) fn view_at_applied<'a>(
        &self,
        engine: &'a Engine,
    ) -> (View<'a>, StateMeta, Position) {
        let store = self.store.read();
        let pos = self.applied.lock().clone();
        (engine.view(), self.position_meta(&store, &pos), pos)
    }

    /// Evaluates a Range. The store lock is held while the index is walked, for
    /// [`RANGE_STEP`] keys at a time, and while a storage view is taken at the end of the
    /// walk; not while the records are read: a large range holds up an apply for one step
    /// at most.
    pub fn range(
        &self,
        r: &crate::proto::etcdserverpb::RangeRequest,
    ) -> Result<crate::proto::etcdserverpb::RangeResponse> {
        self.range_through(r, |reader, plan| plan.read(reader, r))
    }

    /// [`Self::range`], with the reading done by `read` (tests slow it down).
    pub(crate) fn range_through<T>(
        &self,
        r: &crate::proto::etcdserverpb::RangeRequest,
        read: impl FnOnce(&dyn crate::mvcc::RevisionReader, crate::mvcc::RangePlan) -> Result<T>,
    ) -> Result<T> {
        let mut store = self.store.read();
        let mut steps = store.start_range(r)?;
        loop {
            if let Some(plan) = store.step_range(&mut steps, RANGE_STEP)? {
                let view = self.engine.view();
                drop(store);
                return read(&view, plan);
            }
            // An apply waiting for the lock goes first.
            parking_lot::RwLockReadGuard::bump(&mut store);
        }
    }

    /// Evaluates a read-only txn as [`Self::range`] does a range: its compares and the
    /// start of its walk under the store lock (after `check`, the caller's permission check,
    /// under the same lock), its ranges walked [`RANGE_STEP`] keys per hold of the lock, the
    /// records read from a view taken at the last step without it. A compaction that passes
    /// the txn's revision between steps starts it over.
    pub fn read_only_txn(
        &self,
        t: &crate::proto::etcdserverpb::TxnRequest,
        check: impl Fn(&MvccStore) -> Result<()>,
    ) -> Result<crate::proto::etcdserverpb::TxnResponse> {
        use crate::mvcc::TxnStep;
        'start: loop {
            let mut store = self.store.read();
            check(&store)?;
            let mut steps = store.start_read_only_txn(&*self.engine, t)?;
            loop {
                match store.step_read_only_txn(&mut steps, RANGE_STEP)? {
                    TxnStep::Planned(plan) => {
                        let view = self.engine.view();
                        drop(store);
                        return plan.read(&view, t);
                    }
                    TxnStep::More => parking_lot::RwLockReadGuard::bump(&mut store),
                    TxnStep::Overtaken => continue 'start,
                }
            }
        }
    }

    /// Takes the position a loaded snapshot holds.
    pub(super) fn set_position_from(&self, meta: &StateMeta) -> Result<()> {
        *self.applied.lock() = decode_position(meta)?;
        Ok(())
    }

    fn position_meta(&self, store: &MvccStore, pos: &Position) -> StateMeta {
        StateMeta {
            applied: bincode::serialize(&pos.0).expect("serialize log id"),
            membership: bincode::serialize(&pos.1).expect("serialize membership"),
            revision: store.revision(),
            compacted: store.compacted(),
            alarms: store
                .alarms()
                .iter()
                .map(|a| (a.member_id, a.alarm))
                .collect(),
        }
    }

    fn apply_entries(&self, entries: Vec<openraft::Entry<TypeConfig>>) -> Result<Vec<BatchResult>> {
        let mut store = self.store.write();
        let mut pos = self.applied.lock();
        let compacted = store.compacted();
        let mut results = Vec::with_capacity(entries.len());
        let mut ready = Vec::new();
        let mut auth_changed = false;
        for e in entries {
            pos.0 = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => results.push(Vec::new()),
                EntryPayload::Normal(Proposal(batch)) => {
                    let at = Applying {
                        index: e.log_id.index,
                        mine: batch.proposer == self.member_id,
                    };
                    let out: BatchResult = batch
                        .requests
                        .iter()
                        .map(|r| self.apply_one(&mut store, r, at, &mut auth_changed))
                        .collect();
                    let mine = (batch.proposer == self.member_id)
                        .then(|| self.pending.lock().remove(&batch.seq))
                        .flatten();
                    match mine {
                        Some(on_applied) => {
                            ready.push((on_applied, out));
                            results.push(Vec::new());
                        }
                        None => results.push(out),
                    }
                }
                EntryPayload::Membership(m) => {
                    pos.1 = StoredMembership::new(Some(e.log_id), m);
                    self.history.note(&self.engine, &pos.1)?;
                    results.push(Vec::new());
                }
            }
        }
        let mut ws = store.take_writes();
        let meta = self.position_meta(&store, &pos);
        let auth =
            auth_changed.then(|| prost::Message::encode_to_vec(&self.auth.store.read().to_state()));
        let started = std::time::Instant::now();
        self.engine.write_state(&ws, &meta, auth.as_deref())?;
        if let Some(h) = self.commit_seconds.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        if store.compacted() != compacted {
            // The index no longer reaches them; their records go in the background.
            self.compactor
                .submit(store.compacted(), std::mem::take(&mut ws.removed));
        }
        self.hub.publish(
            std::mem::take(&mut ws.events),
            store.revision(),
            store.compacted(),
        );
        for (id, ttl) in &ws.granted {
            self.lessor.renew(*id, *ttl);
        }
        for id in &ws.revoked {
            self.lessor.forget(*id);
        }
        drop(store);
        for (on_applied, out) in ready {
            on_applied(out);
        }
        Ok(results)
    }

    /// Applies one request of a batch at log `index`: auth changes to the
    /// auth state (by an admin once auth is on), anything else to the key
    /// space once the user its proposer named may make it.
    fn apply_one(
        &self,
        store: &mut MvccStore,
        r: &crate::proto::raftpb::InternalRequest,
        at: Applying,
        auth_changed: &mut bool,
    ) -> Result<crate::mvcc::Applied> {
        use crate::proto::raftpb::internal_request::Request as R;
        // As etcd's request header: empty when no one was named, and the
        // checks say what that means (an empty user, a revision of 0).
        let ai = Some(crate::auth::AuthInfo {
            user: r.username.clone(),
            revision: r.auth_revision,
        });
        let Some(req) = &r.request else {
            return store.apply(&*self.engine, r);
        };
        if !crate::auth::store::is_auth_request(req) {
            let auth = self.auth.store.read();
            if auth.enabled() {
                let keys = |id: i64| store.lease(id).map(|l| l.keys.clone());
                auth.check_request(ai.as_ref(), req, &keys)?;
            }
            drop(auth);
            return store.apply(&*self.engine, r);
        }
        let mut auth = self.auth.store.write();
        if !matches!(req, R::Authenticate(_)) {
            auth.check_admin(ai.as_ref())?;
        }
        let before = (auth.enabled(), auth.revision());
        let applied = auth.apply(req)?;
        *auth_changed |= before != (auth.enabled(), auth.revision());
        let tokens = self.auth.tokens();
        let token = match (applied, req) {
            // Every member registers a simple token; a JWT is signed only for
            // the client waiting on the proposing member.
            (crate::auth::AuthApplied::Authenticated { user, revision }, R::Authenticate(a))
                if at.mine || tokens.registers() =>
            {
                tokens.assign(&user, revision, &a.simple_token, at.index)?
            }
            (_, R::UserDelete(d)) => {
                tokens.invalidate_user(&d.name);
                String::new()
            }
            (_, R::UserChangePassword(c)) => {
                tokens.invalidate_user(&c.name);
                String::new()
            }
            (_, R::AuthDisable(_)) => {
                tokens.clear();
                String::new()
            }
            _ => String::new(),
        };
        Ok(crate::mvcc::Applied::Auth { token })
    }
}

/// Where a request is applied: its entry's log index, and whether this
/// member proposed it.
#[derive(Clone, Copy)]
struct Applying {
    index: u64,
    mine: bool,
}

/// openraft's handle on [`KvState`].
#[derive(Clone)]
pub struct StateMachine {
    state: Arc<KvState>,
    /// How far this member's log is on disk: nothing is applied before it is.
    durable: Arc<super::log_store::Durable>,
}

impl StateMachine {
    pub fn new(state: Arc<KvState>, durable: Arc<super::log_store::Durable>) -> Self {
        Self { state, durable }
    }
}

/// A snapshot of `data` at `pos`. Its ID names the position, so the same position always
/// gives the same ID (a transfer retried at the same position goes on with the same bytes).
fn snapshot_of(pos: Position, data: Outgoing) -> Snapshot<TypeConfig> {
    let snapshot_id = match &pos.0 {
        Some(l) => format!("{}-{}", l.leader_id, l.index),
        None => "none".to_string(),
    };
    Snapshot {
        meta: SnapshotMeta {
            last_log_id: pos.0,
            last_membership: pos.1,
            snapshot_id,
        },
        snapshot: Box::new(SnapshotData::Out(data)),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// The state machine is its own snapshot: building one only makes the applied state
    /// durable, so that the log before it may be purged. Its bytes are produced when a member
    /// needs them ([`Outgoing`]).
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (pos, data) = Outgoing::start(self.state.clone()).await.map_err(io_err)?;
        // Applied changes skip the WAL, and the log purge that follows a
        // snapshot first flushes them, with the Raft core waiting: most
        // of that flush happens here instead, beside the core.
        let engine = self.state.engine.clone();
        tokio::task::spawn_blocking(move || engine.persist_state())
            .await
            .map_err(io_err)?
            .map_err(io_err)?;
        Ok(snapshot_of(pos, data))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<Position, StorageError> {
        Ok(self.state.applied())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResult>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        // On the leader an entry can be committed before its own fsync has
        // finished (`raft::log_store`): it is applied, and so answered, once
        // it is on disk here too.
        if let Some(last) = entries.last() {
            self.durable.wait(last.log_id.index).await;
        }
        if self.state.replicated.load(Ordering::Relaxed) {
            // With other members, let the Raft messages that are ready go
            // first (openraft shares this thread): a follower then answers
            // the leader's commit heartbeat before applying, and the
            // leader's next entry, which waits for that answer (openraft
            // keeps one message in flight per follower), leaves sooner.
            // Measured on a 2-core VM, 3 members: 64-client puts 9.5k ->
            // ~11k/s, 1-client 771 -> ~940/s; on one member it only costs.
            tokio::task::yield_now().await;
        }
        self.state.apply_entries(entries).map_err(io_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let incoming = Incoming::create(&self.state.snap_dir)
            .await
            .map_err(io_err)?;
        Ok(Box::new(SnapshotData::In(incoming)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let incoming = match *snapshot {
            SnapshotData::In(i) => i,
            SnapshotData::Out(o) => Incoming::copy_of(o, &self.state.snap_dir)
                .await
                .map_err(io_err)?,
        };
        let path = incoming
            .into_installing(&self.state.snap_dir)
            .await
            .map_err(io_err)?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let state = self.state.clone();
        let (p, want) = (path.clone(), meta.last_log_id);
        let loaded =
            tokio::task::spawn_blocking(move || state.install_file(&p, Install::Raft, Some(want)))
                .await
                .map_err(io_err)
                .and_then(|r| r.map_err(io_err));
        // The file goes once it is loaded, or if its load never began; otherwise the next
        // start loads it (`finish_interrupted_install`).
        if loaded.is_ok() || !self.state.install_pending() {
            let _ = std::fs::remove_file(&path);
        }
        let loaded = loaded?;
        tracing::info!(
            snapshot = meta.snapshot_id,
            bytes,
            revision = loaded.revision,
            "installed a snapshot from the leader"
        );
        // The payload's position is the state machine's; the meta is Raft's word on it.
        *self.state.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
        self.state
            .history
            .note(&self.state.engine, &meta.last_membership)
            .map_err(io_err)?;
        Ok(())
    }

    /// A snapshot at the applied position, none before anything is applied.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        if self.state.applied().0.is_none() {
            return Ok(None);
        }
        let (pos, data) = Outgoing::start(self.state.clone()).await.map_err(io_err)?;
        Ok(Some(snapshot_of(pos, data)))
    }
}

#[cfg(test)]
mod tests {
    use crate::snapshot::SnapshotPayload;
    use crate::storage::StateMeta;

    fn put_request(key: &str) -> crate::proto::raftpb::InternalRequest {
        use crate::proto::raftpb::internal_request::Request;
        crate::proto::raftpb::InternalRequest {
            request: Some(Request::Put(crate::proto::etcdserverpb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// A log entry at `index` carrying `req` (proposed by another member).
    fn entry(
        req: crate::proto::raftpb::InternalRequest,
        index: u64,
    ) -> openraft::Entry<super::TypeConfig> {
        let batch = crate::proto::raftpb::Batch {
            requests: vec![req],
            proposer: 9,
            seq: index,
        };
        openraft::Entry::<super::TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(super::Proposal(std::sync::Arc::new(batch))),
        }
    }

    /// A compaction is applied to the index at once and its records are deleted in the
    /// background; records a stop left behind are deleted after the next start.
    #[test]
    fn compaction_deletes_in_the_background_and_after_a_restart() {
        use crate::proto::etcdserverpb::{CompactionRequest, RangeRequest};
        use crate::proto::raftpb::{internal_request::Request, InternalRequest};
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::storage::Engine::open(dir.path()).unwrap();
        let state = super::KvState::open(engine.clone(), 2, 1).unwrap();
        let n = 3000u64;
        for i in 1..=n {
            state
                .apply_entries(vec![entry(put_request("k"), i)])
                .unwrap();
        }
        let compact = |rev: i64, index: u64| {
            let req = InternalRequest {
                request: Some(Request::Compaction(CompactionRequest {
                    revision: rev,
                    physical: false,
                })),
                ..Default::default()
            };
            entry(req, index)
        };
        let rev = n as i64 + 1;
        state.apply_entries(vec![compact(rev - 1, n + 1)]).unwrap();
        // Answered from the index at once.
        let at = |r: i64| RangeRequest {
            key: b"k".to_vec(),
            revision: r,
            ..Default::default()
        };
        assert!(state.range(&at(rev - 2)).is_err(), "compacted");
        assert_eq!(state.range(&at(rev)).unwrap().kvs.len(), 1);
        // HashKV does not depend on how far the deletion has gone.
        let hash = |state: &super::KvState| {
            let (kept, compacted, current) = {
                let store = state.store.read();
                (
                    store.kept_at_compacted(),
                    store.compacted(),
                    store.revision(),
                )
            };
            state
                .engine
                .view()
                .hash_kv(current, compacted, &kept)
                .unwrap()
        };
        let during = hash(&state);
        rt().block_on(state.compactor.wait(rev - 1));
        assert_eq!(hash(&state), during);
        assert_eq!(engine.records().count(), 2, "the last two revisions stay");
        assert_eq!(state.compactor.deleted(), n - 2);

        // Records of a compaction left in storage (a stop before they were deleted).
        let (last, _) = engine.records().last().unwrap().unwrap();
        drop(state);
        let ws = crate::mvcc::WriteSet {
            records: (2..last.main)
                .map(|m| {
                    let rec = crate::mvcc::Record {
                        kv: crate::proto::mvccpb::KeyValue {
                            key: b"k".to_vec(),
                            mod_revision: m,
                            ..Default::default()
                        },
                        tombstone: false,
                    };
                    (crate::mvcc::Revision::new(m, 0), rec)
                })
                .collect(),
            ..Default::default()
        };
        let meta = engine.state_meta().unwrap();
        engine.write_state(&ws, &meta, None).unwrap();
        assert_eq!(engine.records().count() as u64, n);
        let state = super::KvState::open(engine.clone(), 2, 1).unwrap();
        rt().block_on(state.compactor.wait(meta.compacted));
        assert_eq!(engine.records().count(), 2);
        assert_eq!(state.range(&at(rev)).unwrap().kvs.len(), 1);
    }

    /// A range stopped half way through reading its values holds up no apply: a put is
    /// applied, and visible to a new range, while the first one waits; the first one then
    /// answers as of when it began.
    #[test]
    fn a_slow_range_does_not_hold_up_apply() {
        use crate::proto::etcdserverpb::RangeRequest;
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::storage::Engine::open(dir.path()).unwrap();
        let state = std::sync::Arc::new(super::KvState::open(engine, 2, 1).unwrap());
        let put = |key: &str, index: u64| entry(put_request(key), index);
        for i in 1..=20 {
            state
                .apply_entries(vec![put(&format!("k{i:02}"), i)])
                .unwrap();
        }
        let all = RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            ..Default::default()
        };
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let reader = {
            let (state, all) = (state.clone(), all.clone());
            std::thread::spawn(move || {
                state
                    .range_through(&all, |reader, plan| {
                        started_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        plan.read(reader, &all)
                    })
                    .unwrap()
            })
        };
        started.recv().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let writer = {
            let state = state.clone();
            std::thread::spawn(move || {
                state.apply_entries(vec![put("k99", 21)]).unwrap();
                done_tx.send(()).unwrap();
            })
        };
        // Had the range kept the store lock, the put would wait for it forever.
        done.recv_timeout(std::time::Duration::from_secs(30))
            .expect("apply waited for a range");
        writer.join().unwrap();
        assert_eq!(state.range(&all).unwrap().kvs.len(), 21);
        release.send(()).unwrap();
        let first = reader.join().unwrap();
        assert_eq!(first.kvs.len(), 20, "the range answers as of when it began");
        assert_eq!(first.header.unwrap().revision, 21);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn streamed_snapshot_equals_raft_snapshot_and_carries_auth() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::storage::Engine::open(dir.path()).unwrap();
        let auth = crate::proto::raftpb::AuthState {
            enabled: true,
            revision: 9,
            ..Default::default()
        };
        let meta = StateMeta {
            applied: vec![],
            membership: vec![],
            revision: 1,
            compacted: 0,
            alarms: vec![],
        };
        let auth_bytes = prost::Message::encode_to_vec(&auth);
        engine
            .write_state(&Default::default(), &meta, Some(&auth_bytes))
            .unwrap();
        let state = super::KvState::open(engine, 2, 1).unwrap();
        assert!(state.auth.enabled());
        let state = std::sync::Arc::new(state);
        let (_, out) = rt()
            .block_on(super::Outgoing::start(state.clone()))
            .unwrap();
        let raft = rt()
            .block_on(super::super::snapshot::read_all(out))
            .unwrap();
        let mut streamed = Vec::new();
        state
            .stream_snapshot(7, |b, _, _| {
                streamed.extend_from_slice(b);
                true
            })
            .unwrap();
        let file = crate::snapshot::verify(&streamed).unwrap();
        assert_eq!(file, raft.as_slice());
        assert_eq!(SnapshotPayload::decode(file).unwrap().auth, auth_bytes);
    }
}
