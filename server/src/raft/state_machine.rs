//! The Raft state machine: applies committed batches to MVCC, persists the
//! changes with the applied position, publishes events to watchers and
//! starts/stops lease clocks. Also builds and installs Raft snapshots.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta};
use parking_lot::{Mutex, RwLock};

use super::{
    io_err, BatchResult, LogId, Member, Proposal, StorageError, StoredMembership, TypeConfig,
};
use crate::error::{Error, Result};
use crate::lease::Lessor;
use crate::mvcc::{MvccStore, Revision};
use crate::snapshot::{auth_extension, SnapshotPayload};
use crate::storage::{decode_record, Engine, StateMeta};
use crate::watch::Hub;

/// Receives the results of a batch this member proposed, once applied,
/// persisted and published to watchers.
pub type OnApplied = Box<dyn FnOnce(BatchResult) + Send>;

/// The last built or installed Raft snapshot, kept for openraft to send.
type StoredSnapshot = (SnapshotMeta<u64, Member>, Vec<u8>);

/// The key-value state shared by the state machine and the API.
pub struct KvState {
    pub engine: Arc<Engine>,
    pub store: RwLock<MvccStore>,
    pub hub: Hub,
    pub lessor: Lessor,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    snapshot: Mutex<Option<StoredSnapshot>>,
    snapshot_seq: AtomicU64,
    min_lease_ttl: i64,
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
}

fn decode_position(meta: &StateMeta) -> Result<(Option<LogId>, StoredMembership)> {
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
fn load_auth(bytes: &[u8]) -> Result<crate::auth::AuthStore> {
    if bytes.is_empty() {
        return Ok(Default::default());
    }
    let state = <crate::proto::raftpb::AuthState as prost::Message>::decode(bytes)
        .map_err(|e| Error::Internal(format!("storage: corrupt auth state: {e}")))?;
    Ok(crate::auth::AuthStore::from_state(state))
}

/// Rebuilds the key index from storage, one record at a time: only the
/// index is kept, never the values (startup at size, issue 22).
fn rebuild(engine: &Engine, meta: &StateMeta, min_lease_ttl: i64) -> Result<MvccStore> {
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
        let meta = engine.state_meta()?;
        let position = decode_position(&meta)?;
        let store = rebuild(&engine, &meta, min_lease_ttl)?;
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
            snapshot: Mutex::new(None),
            snapshot_seq: AtomicU64::new(0),
            min_lease_ttl,
            member_id,
            replicated: Default::default(),
            pending: Mutex::new(Default::default()),
            history,
            auth,
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
    pub fn applied(&self) -> (Option<LogId>, StoredMembership) {
        self.applied.lock().clone()
    }

    /// Whether member `id` was removed from the cluster, as far as the
    /// memberships applied here tell ([`super::MemberHistory`]).
    pub fn removed(&self, id: u64) -> bool {
        let current = self.applied.lock().1.clone();
        self.history.removed(id, &current)
    }

    fn position_meta(
        &self,
        store: &MvccStore,
        pos: &(Option<LogId>, StoredMembership),
    ) -> StateMeta {
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
        let ws = store.take_writes();
        let meta = self.position_meta(&store, &pos);
        let auth =
            auth_changed.then(|| prost::Message::encode_to_vec(&self.auth.store.read().to_state()));
        self.engine.write_state(&ws, &meta, auth.as_deref())?;
        self.hub
            .publish(&ws.events, store.revision(), store.compacted());
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

    /// Serializes the whole state machine at its applied position.
    pub fn snapshot_payload(&self) -> Result<(Vec<u8>, Option<LogId>, StoredMembership)> {
        // The lock keeps applies out only while the view is taken, so the
        // view matches `applied`; reading it then blocks nobody.
        let (view, meta, pos) = {
            let store = self.store.read();
            let pos = self.applied.lock().clone();
            (self.engine.view(), self.position_meta(&store, &pos), pos)
        };
        let payload = SnapshotPayload {
            meta,
            records: view.records()?,
            leases: view.leases()?,
            auth: view.auth_state()?,
        };
        let bytes = payload.encode()?;
        Ok((bytes, pos.0, pos.1))
    }

    /// Streams the snapshot file of the state machine at its applied position to `sink` in
    /// chunks of `chunk` bytes, holding neither the state nor the file in memory: the payload
    /// is the bincode of a [`SnapshotPayload`], written field by field from one consistent view
    /// (a first pass over it sizes the payload). `sink` gets each chunk, the bytes remaining
    /// and the revision the snapshot holds; it returns false to stop.
    pub fn stream_snapshot(
        &self,
        chunk: usize,
        mut sink: impl FnMut(&[u8], u64, i64) -> bool,
    ) -> Result<()> {
        let engine = self.engine.clone();
        let (view, meta) = {
            let store = self.store.read();
            let pos = self.applied.lock().clone();
            (engine.view(), self.position_meta(&store, &pos))
        };
        let revision = meta.revision;
        let meta_bytes = bincode::serialize(&meta).map_err(Error::internal)?;
        let lease_bytes = bincode::serialize(&view.leases()?).map_err(Error::internal)?;
        let auth_bytes = auth_extension(&view.auth_state()?);
        // (main, sub, bytes) encodes as two i64, a u64 length and the bytes.
        let (mut count, mut size) = (0u64, 0usize);
        view.each_record(|_, _, v| {
            count += 1;
            size += 24 + v.len();
            Ok(true)
        })?;
        let payload_len = meta_bytes.len() + 8 + size + lease_bytes.len() + auth_bytes.len();
        let mut w = crate::snapshot::StreamWriter::new(payload_len, chunk, |b, left| {
            sink(b, left, revision)
        });
        w.write(&meta_bytes);
        w.write(&count.to_le_bytes());
        view.each_record(|main, sub, v| {
            w.write(&main.to_le_bytes());
            w.write(&sub.to_le_bytes());
            w.write(&(v.len() as u64).to_le_bytes());
            w.write(v);
            Ok(!w.stopped())
        })?;
        w.write(&lease_bytes);
        w.write(&auth_bytes);
        w.finish()
    }

    /// Replaces the state machine with a snapshot's content.
    pub fn install_payload(&self, bytes: &[u8]) -> Result<()> {
        let mut payload = SnapshotPayload::decode(bytes)?;
        payload.check()?;
        let mut records = Vec::with_capacity(payload.records.len());
        for (main, sub, rec) in &payload.records {
            records.push((Revision::new(*main, *sub), decode_record(rec)?));
        }
        let mut store = self.store.write();
        self.engine
            .replace_state(&records, &payload.leases, &payload.meta, &payload.auth)?;
        *store = rebuild(&self.engine, &payload.meta, self.min_lease_ttl)?;
        *self.auth.store.write() = load_auth(&payload.auth)?;
        // Simple tokens name entries of the log this snapshot replaces.
        self.auth.tokens().clear();
        *self.applied.lock() = decode_position(&payload.meta)?;
        self.hub.reset(store.revision(), store.compacted());
        self.lessor
            .reset_all(store.leases().map(|(id, l)| (id, l.ttl)));
        Ok(())
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.state.clone();
        let (bytes, last, membership) = tokio::task::spawn_blocking(move || {
            let payload = state.snapshot_payload()?;
            // Applied changes skip the WAL, and the log purge that follows a
            // snapshot first flushes them, with the Raft core waiting: most
            // of that flush happens here instead, beside the core.
            state.engine.persist_state()?;
            Ok::<_, Error>(payload)
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)?;
        let seq = self.state.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        *self.state.snapshot.lock() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let state = self.state.clone();
        let b = bytes.clone();
        tokio::task::spawn_blocking(move || state.install_payload(&b))
            .await
            .map_err(io_err)?
            .map_err(io_err)?;
        tracing::info!(
            snapshot = meta.snapshot_id,
            bytes = bytes.len(),
            "installed a snapshot from the leader"
        );
        // The payload's position is the state machine's; the meta is Raft's word on it.
        *self.state.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
        self.state
            .history
            .note(&self.state.engine, &meta.last_membership)
            .map_err(io_err)?;
        *self.state.snapshot.lock() = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .state
            .snapshot
            .lock()
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(bytes.clone())),
            }))
    }
}

#[cfg(test)]
mod tests {
    use crate::snapshot::SnapshotPayload;
    use crate::storage::StateMeta;

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
        let (raft, _, _) = state.snapshot_payload().unwrap();
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
