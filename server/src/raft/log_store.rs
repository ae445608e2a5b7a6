//! The Raft log on RocksDB: entries by index, bincode-encoded. The newest
//! entries are also kept in memory: openraft reads each committed entry back
//! to apply it (and to replicate it), and those reads then cost no decoding.
//!
//! Durability. openraft 0.9's core waits for every append to be reported on
//! disk before it goes on (it replicates nothing meanwhile). A leader's own
//! appends are therefore reported at once and synced in the background, the
//! way etcd's leader persists its entries while they travel to the
//! followers; [`Durable`] tracks how far this member's log really is on disk,
//! and nothing leaves the leader that depends on an entry before that entry
//! is durable here:
//! - the state machine applies an entry (and so answers its client, serves
//!   it to reads and watchers) only once it is durable on this member;
//! - the leader tells followers a commit index only once the entries up to it
//!   are durable on the leader (`raft::network`), so no follower applies or
//!   acknowledges an entry that a majority does not hold on disk.
//!
//! A follower's appends are synced before they are reported (its answer
//! counts towards a commit), as are truncations, purges and votes.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, EntryPayload, RaftLogReader, Vote};
use parking_lot::Mutex;
use rocksdb::IteratorMode;

use super::{io_err, LogId, StorageError, TypeConfig};
use crate::storage::{Engine, LogOp, LogWriter};

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";
/// The last committed log id openraft told this member of (see `save_committed`).
const KEY_COMMITTED: &[u8] = b"committed";
/// A purge openraft asked for that `purge` held back at the applied position (a follower told
/// to purge up to a snapshot from the leader before the snapshot is loaded). Openraft counts
/// it done: its log may then hold a hole below it, which `limit_purges` purges at start.
const KEY_PURGE_WANTED: &[u8] = b"purge_wanted";

/// How many of the newest entries are kept in memory.
pub const LOG_CACHE_ENTRIES: u64 = 4096;

/// How far this member's own log is known to be on disk: the index up to
/// which every entry has been synced.
pub struct Durable {
    index: tokio::sync::watch::Sender<u64>,
    /// Bumped by a truncation: a background sync of entries written before
    /// it no longer speaks for the indexes it covered.
    epoch: Mutex<u64>,
}

impl Durable {
    pub fn new(index: u64) -> Arc<Self> {
        Arc::new(Self {
            index: tokio::sync::watch::channel(index).0,
            epoch: Mutex::new(0),
        })
    }

    fn epoch(&self) -> u64 {
        *self.epoch.lock()
    }

    /// Entries up to `index`, written in `epoch`, are on disk.
    fn advance(&self, epoch: u64, index: u64) {
        let current = self.epoch.lock();
        if *current == epoch {
            self.index.send_if_modified(|i| {
                let moved = index > *i;
                *i = (*i).max(index);
                moved
            });
        }
    }

    /// The log was cut back to `index` (everything up to it synced).
    fn reset(&self, index: u64) {
        let mut epoch = self.epoch.lock();
        *epoch += 1;
        self.index.send_replace(index);
    }

    /// Returns once entries up to `index` are on disk.
    pub async fn wait(&self, index: u64) {
        if *self.index.borrow() >= index {
            return;
        }
        let mut rx = self.index.subscribe();
        // The sender lives as long as `self`.
        let _ = rx.wait_for(|i| *i >= index).await;
    }
}

/// The log store handle (cheap to clone; clones share state).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    writer: Arc<LogWriter>,
    /// This member's Raft ID.
    id: u64,
    /// The vote as last saved: tells whether an append is this member's own
    /// as leader of the current term.
    vote: Arc<Mutex<Option<Vote<u64>>>>,
    durable: Arc<Durable>,
    /// The newest entries (entry payloads are shared, clones are cheap).
    cache: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    /// Set while this member leads others: its appends are then always
    /// synced in the background, overlapping replication.
    background_sync: Arc<std::sync::atomic::AtomicBool>,
    /// See [`Self::restored_leadership`].
    restored: Option<RestoredLeadership>,
    /// See [`Self::limit_purges`].
    applied: Option<AppliedNow>,
}

/// Where the state machine is now (its last applied log id).
pub type AppliedNow = Arc<dyn Fn() -> Option<LogId> + Send + Sync>;

/// A leadership that openraft restores at start, with no election: this
/// member's saved vote was a committed vote for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoredLeadership {
    /// The term it leads.
    pub term: u64,
    /// The last entry of its log at start.
    pub last_index: u64,
}

impl LogStore {
    /// Opens the log in `engine`, first moving into it a log that an
    /// earlier build left in files under `legacy_dir` (see
    /// [`crate::storage::log_files`]), then replaying the log's journal,
    /// kept in `cairn-journal` beside `legacy_dir`.
    pub fn new(
        engine: Arc<Engine>,
        legacy_dir: &std::path::Path,
        id: u64,
        on_sync: impl Fn(f64) + Send + Sync + 'static,
    ) -> Result<Self, StorageError> {
        move_log_files_into_rocksdb(&engine, legacy_dir)?;
        let purged: Option<LogId> = engine.raft_get(KEY_PURGED).map_err(io_err)?;
        let journal = legacy_dir.with_file_name("cairn-journal");
        let writer = LogWriter::new(engine.clone(), &journal, purged.map(|p| p.index), on_sync)
            .map_err(io_err)?;
        // What is on disk at start is durable, as is what was purged (it is
        // in a snapshot).
        let state = log_state(&engine)?;
        let last_index = state.last_log_id.map(|l| l.index).unwrap_or(0);
        let durable = Durable::new(last_index);
        let vote: Option<Vote<u64>> = engine.raft_get(KEY_VOTE).map_err(io_err)?;
        let restored = vote
            .filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(id))
            .map(|v| RestoredLeadership {
                term: v.leader_id().get_term(),
                last_index,
            });
        Ok(Self {
            writer: Arc::new(writer),
            engine,
            id,
            vote: Arc::new(Mutex::new(vote)),
            durable,
            cache: Arc::default(),
            background_sync: Arc::default(),
            restored,
            applied: None,
        })
    }

    /// The leadership openraft restores at start, if any. Its read index
    /// needs a floor: openraft takes the larger of the commit index and the
    /// first entry of the leader's term, and after a restart both can be
    /// older than writes this leader acknowledged before it stopped (the
    /// commit index restarts at the applied position, which is persisted
    /// lazily; the term's first entry was committed long before). Every
    /// acknowledged write is in its log at start, so reads wait for that.
    pub fn restored_leadership(&self) -> Option<RestoredLeadership> {
        self.restored
    }

    /// Purges go no further than `applied` says the state machine is (see `purge`). At
    /// start: a log with a hole below the applied position (a snapshot from the leader was
    /// loaded, and the purge openraft asked for with it was held back until then) is purged
    /// up to that position now; openraft cannot start on such a log.
    pub fn limit_purges(&mut self, applied: AppliedNow) -> Result<(), StorageError> {
        if let Some(a) = applied() {
            let purged = self.purged_index();
            let wanted: Option<LogId> = self.engine.raft_get(KEY_PURGE_WANTED).map_err(io_err)?;
            // A purge held back once reached the applied position: openraft was told it was
            // done, so below it the log may have a hole (entries it never sent again, the
            // snapshot holding them), whatever the first key on disk says (a purge's deletes
            // can come back after a crash).
            let held_back = wanted.is_some_and(|w| w.index > purged && a.index >= w.index);
            let cf = self.engine.cf(crate::storage::CF_LOG);
            let first = match self.engine.db.iterator_cf(cf, IteratorMode::Start).next() {
                Some(item) => {
                    let (k, _) = item.map_err(io_err)?;
                    let k: [u8; 8] = k.as_ref().try_into().map_err(io_err)?;
                    Some(u64::from_be_bytes(k))
                }
                None => None,
            };
            let hole_at_start = a.index > purged && first.is_some_and(|f| f > purged + 1);
            if held_back || hole_at_start {
                tracing::info!(
                    upto = a.index,
                    "purging a log held back for a loaded snapshot"
                );
                self.engine.persist_state().map_err(io_err)?;
                self.purge_now(a)?;
                if held_back {
                    self.engine.raft_delete(KEY_PURGE_WANTED).map_err(io_err)?;
                }
            }
        }
        self.applied = Some(applied);
        Ok(())
    }

    /// Purges the log up to `log_id`; the applied state up to it must be flushed.
    fn purge_now(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|i, _| *i > log_id.index);
        self.engine.raft_put(KEY_PURGED, &log_id).map_err(io_err)?;
        self.writer
            .write(LogOp::PurgeTo(log_id.index))
            .map_err(io_err)?;
        // Purged entries are in a snapshot (one installed from the leader
        // included): nothing up to them waits for a sync any more.
        self.durable.advance(self.durable.epoch(), log_id.index);
        Ok(())
    }

    fn purged_index(&self) -> u64 {
        self.engine
            .raft_get::<LogId>(KEY_PURGED)
            .ok()
            .flatten()
            .map_or(0, |l| l.index)
    }

    /// The last log id known committed that this member's log on disk still holds: the id
    /// saved by `save_committed`, or the log's last entry when a crash cut the log short of it
    /// (a leader reports its own appends before they are synced, so openraft can count an entry
    /// committed that the leader then loses; the entries before it that did reach the disk
    /// were committed with it). `None` when nothing was saved, or the saved id names an entry
    /// the log holds differently (then the applied position is all that is known).
    pub fn committed_on_disk(&self) -> Result<Option<LogId>, StorageError> {
        let Some(saved) = self
            .engine
            .raft_get::<LogId>(KEY_COMMITTED)
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let state = log_state(&self.engine)?;
        let Some(last) = state.last_log_id else {
            return Ok(None);
        };
        if last.index < saved.index {
            return Ok(Some(last));
        }
        if state
            .last_purged_log_id
            .is_some_and(|p| p.index >= saved.index)
        {
            // Purged: in the applied state, which is ahead of it.
            return Ok(Some(saved));
        }
        let cf = self.engine.cf(crate::storage::CF_LOG);
        let held = match self
            .engine
            .db
            .get_cf(cf, saved.index.to_be_bytes())
            .map_err(io_err)?
        {
            Some(v) => {
                bincode::deserialize::<Entry<TypeConfig>>(&v)
                    .map_err(io_err)?
                    .log_id
            }
            None => return Ok(None),
        };
        Ok((held == saved).then_some(saved))
    }

    /// The committed id handed to openraft at start: the saved one only when the log holds
    /// that very entry (by Raft's log matching, the entries before it are then the committed
    /// ones, not an old term's tail) and every entry from the applied position up to it (no
    /// hole: openraft re-applies them, and a gap would stop the start). Otherwise `None`: the
    /// applied position, as before the id was kept. Earlier, handing openraft the saved id
    /// unchecked broke the fault suites (a log left with a hole by a held-back purge, see
    /// `KEY_PURGE_WANTED`, read at start); `limit_purges` now purges such a hole first.
    fn committed_for_start(&self) -> Result<Option<LogId>, StorageError> {
        let Some(saved) = self
            .engine
            .raft_get::<LogId>(KEY_COMMITTED)
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let purged = self.purged_index();
        let applied = self
            .applied
            .as_ref()
            .and_then(|now| now())
            .map_or(0, |a| a.index);
        let from = purged.max(applied) + 1;
        if saved.index < from {
            return Ok(Some(saved).filter(|_| saved.index <= applied));
        }
        let cf = self.engine.cf(crate::storage::CF_LOG);
        let mut last = None;
        let entries = self.engine.db.iterator_cf(
            cf,
            IteratorMode::From(&from.to_be_bytes(), rocksdb::Direction::Forward),
        );
        for (item, next) in entries.zip(from..) {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            if idx != next || idx > saved.index {
                break;
            }
            if idx == saved.index {
                last = Some(
                    bincode::deserialize::<Entry<TypeConfig>>(&v)
                        .map_err(io_err)?
                        .log_id,
                );
            }
        }
        Ok(last.filter(|l| *l == saved))
    }

    /// Replaces the log past `kept` by `entry` (at `kept.index + 1`), saves `vote` and `kept`
    /// as committed, all synced, before Raft starts: what `--force-new-cluster` writes
    /// (`super::force`). The leadership restored at start is dropped with the old vote.
    pub(super) fn rewrite_tail(
        &mut self,
        kept: LogId,
        entry: Entry<TypeConfig>,
        vote: Vote<u64>,
    ) -> Result<(), StorageError> {
        let index = entry.log_id.index;
        // The commit index first: a crash midway then forces again from the same point.
        self.engine.raft_put(KEY_COMMITTED, &kept).map_err(io_err)?;
        // A log that does not hold `kept` (empty past a snapshot loaded from a leader, its
        // purge held back) would be left with a hole below the new entry: purged up to it
        // first, the applied state flushed (it holds `kept`).
        let cf = self.engine.cf(crate::storage::CF_LOG);
        let held = self
            .engine
            .db
            .get_cf(cf, kept.index.to_be_bytes())
            .map_err(io_err)?
            .is_some();
        if !held && kept.index > self.purged_index() {
            self.engine.persist_state().map_err(io_err)?;
            self.purge_now(kept)?;
        }
        self.cache.lock().retain(|i, _| *i <= kept.index);
        self.writer
            .write(LogOp::TruncateFrom(kept.index + 1))
            .map_err(io_err)?;
        self.writer
            .write(LogOp::Append(vec![(
                index,
                bincode::serialize(&entry).map_err(io_err)?,
            )]))
            .map_err(io_err)?;
        self.durable.reset(index);
        self.engine.raft_put(KEY_VOTE, &vote).map_err(io_err)?;
        *self.vote.lock() = Some(vote);
        self.restored = None;
        Ok(())
    }

    /// The switch between inline and background syncs.
    pub fn background_sync(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.background_sync.clone()
    }

    /// How far this member's log is on disk.
    pub fn durable(&self) -> Arc<Durable> {
        self.durable.clone()
    }

    /// Whether `entries` are appended by this member as the leader of the
    /// term of its saved vote (not replicated to it by another leader).
    fn own_as_leader(&self, entries: &[Entry<TypeConfig>]) -> bool {
        let vote = self.vote.lock();
        let Some(v) = vote.as_ref() else { return false };
        v.is_committed()
            && v.leader_id().voted_for() == Some(self.id)
            && entries.iter().all(|e| e.log_id.leader_id == *v.leader_id())
    }
}

/// Builds between 146416b and 816ab1f kept the log in files of its own:
/// such a log moves into RocksDB (synced) before the files go. If RocksDB
/// already holds a log, the files are a copy left by an interrupted move (a
/// move either way writes the new copy, synced, before it removes the old),
/// and RocksDB's copy is the log.
fn move_log_files_into_rocksdb(engine: &Engine, dir: &std::path::Path) -> Result<(), StorageError> {
    use crate::storage::log_files;
    if log_files::segments(dir).map_err(io_err)?.is_empty() {
        return log_files::remove(dir).map_err(io_err);
    }
    let cf = engine.cf(crate::storage::CF_LOG);
    if engine
        .db
        .iterator_cf(cf, IteratorMode::Start)
        .next()
        .is_none()
    {
        let purged: Option<LogId> = engine.raft_get(KEY_PURGED).map_err(io_err)?;
        let entries = log_files::read(dir, purged.map(|l| l.index)).map_err(io_err)?;
        tracing::info!(
            entries = entries.len(),
            dir = %dir.display(),
            "moving the Raft log from its files into RocksDB"
        );
        let mut batch = rocksdb::WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, index.to_be_bytes(), bytes);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        engine.db.write_opt(batch, &wo).map_err(io_err)?;
    }
    log_files::remove(dir).map_err(io_err)
}

/// The log's bounds on disk: the last purged entry and the last entry (the
/// last purged one when the log is empty).
fn log_state(engine: &Engine) -> Result<LogState<TypeConfig>, StorageError> {
    let last_purged: Option<LogId> = engine.raft_get(KEY_PURGED).map_err(io_err)?;
    let cf = engine.cf(crate::storage::CF_LOG);
    let last = match engine.db.iterator_cf(cf, IteratorMode::End).next() {
        Some(item) => {
            let (_, v) = item.map_err(io_err)?;
            let e: Entry<TypeConfig> = bincode::deserialize(&v).map_err(io_err)?;
            Some(e.log_id)
        }
        None => None,
    };
    Ok(LogState {
        last_purged_log_id: last_purged,
        last_log_id: last.or(last_purged),
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        {
            // Served from memory when the cache holds the start of the range
            // (it holds a contiguous run up to the last entry).
            let cache = self.cache.lock();
            if cache.contains_key(&start) {
                return Ok(cache.range(range).map(|(_, e)| e.clone()).collect());
            }
        }
        let mut out = Vec::new();
        let cf = self.engine.cf(crate::storage::CF_LOG);
        // Only a run without gaps from the first index of the range that is not purged: a log
        // with a hole (see `KEY_PURGE_WANTED`) must never hand out entries that are not
        // consecutive, which a follower would take as following the one before. (Purged
        // entries a crash brought back on disk are not the log's: skipped. A log never purged
        // starts where its first entry is.)
        let purged: Option<LogId> = self.engine.raft_get(KEY_PURGED).map_err(io_err)?;
        let first = purged.map_or(start, |p| start.max(p.index + 1));
        let from = first.to_be_bytes();
        let mut next = None;
        for item in self
            .engine
            .db
            .iterator_cf(cf, IteratorMode::From(&from, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            let next = next.get_or_insert(if purged.is_some() { first } else { idx });
            if !range.contains(&idx) || idx != *next {
                if idx != *next && range.contains(&idx) {
                    tracing::warn!(
                        start,
                        missing = *next,
                        "the log has a hole: read stops at it"
                    );
                }
                break;
            }
            out.push(bincode::deserialize(&v).map_err(io_err)?);
            *next += 1;
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        log_state(&self.engine)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.engine.raft_put(KEY_VOTE, vote).map_err(io_err)?;
        *self.vote.lock() = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        // Read from disk at open, kept by every save.
        Ok(*self.vote.lock())
    }

    /// Kept so that `--force-new-cluster` knows how far the log is committed (the applied
    /// position is persisted lazily, and can be far behind after a crash). Only a leader's own tail can be shorter on disk than what was committed
    /// (followers sync their appends before they answer, so before any commit covers them):
    /// `committed_on_disk` clamps to the log at start. Written without a sync, once per commit advance: a process crash keeps it (the
    /// RocksDB WAL is in the page cache), a power loss may take it back to an older value,
    /// which is safe (the applied position is then the floor, as before it was kept).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let Some(c) = committed else { return Ok(()) };
        self.engine
            .raft_put_unsynced(KEY_COMMITTED, &c)
            .map_err(io_err)
    }

    /// Openraft re-applies the log up to it at start, so a restarted member reports (and
    /// serves) what it had applied, not only what was flushed. See `committed_for_start`.
    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.committed_for_start()
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let appended: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(last) = appended.last().map(|e| e.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let mut encoded = Vec::with_capacity(appended.len());
        let mut requests = 0;
        for e in &appended {
            encoded.push((e.log_id.index, bincode::serialize(e).map_err(io_err)?));
            if let EntryPayload::Normal(p) = &e.payload {
                requests += p.0.requests.len();
            }
        }
        // The leader's own entries are reported written at once and synced
        // in the background (see the module notes) while it leads others or
        // clients write concurrently; a lone write on one member is synced
        // inline, which is quicker when there is nothing to overlap.
        let background = self.own_as_leader(&appended)
            && (self
                .background_sync
                .load(std::sync::atomic::Ordering::Relaxed)
                || requests > 1);
        let epoch = self.durable.epoch();
        let result = if background {
            let durable = self.durable.clone();
            self.writer.write_then_sync(
                LogOp::Append(encoded),
                Box::new(move |r| match r {
                    Ok(()) => durable.advance(epoch, last),
                    Err(e) => {
                        // Raft was told these entries are written: going on
                        // could acknowledge what is not on disk.
                        tracing::error!(error = %e, "syncing the Raft log failed; stopping");
                        std::process::abort();
                    }
                }),
            )
        } else {
            self.writer.write(LogOp::Append(encoded)).inspect(|_| {
                self.durable.advance(epoch, last);
            })
        };
        if let Err(e) = result {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(io_err(e));
        }
        {
            let mut cache = self.cache.lock();
            for e in appended {
                // A gap (after a snapshot install) restarts the contiguous run.
                if cache
                    .last_key_value()
                    .is_some_and(|(i, _)| i + 1 != e.log_id.index)
                {
                    cache.clear();
                }
                cache.insert(e.log_id.index, e);
            }
            while cache.len() as u64 > LOG_CACHE_ENTRIES {
                cache.pop_first();
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|i, _| *i < log_id.index);
        self.writer
            .write(LogOp::TruncateFrom(log_id.index))
            .map_err(io_err)?;
        // The synced write made everything before it durable too.
        self.durable.reset(log_id.index.saturating_sub(1));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Applied changes are written without the WAL: after a crash they are
        // re-applied from the log, so the log keeps every entry until the
        // state it produced is on disk. The Raft core waits for this flush;
        // most of it was done when the snapshot was built (`build_snapshot`).
        //
        // A follower is told to purge up to a snapshot from the leader as soon as the
        // snapshot's install is queued, not once it is done (openraft 0.9): a crash in between
        // would leave a log purged past the applied position, which no restart recovers from.
        // So a purge goes no further than the state machine has applied (read before the
        // flush, so on disk after it); what it keeps is purged later.
        let wanted = log_id;
        let log_id = match self.applied.as_ref().map(|now| now()) {
            None => log_id,
            Some(Some(a)) if a.index >= log_id.index => log_id,
            Some(Some(a)) if a.index > self.purged_index() => a,
            Some(_) => {
                tracing::info!(upto = log_id.index, "not purging past the applied position");
                self.engine
                    .raft_put(KEY_PURGE_WANTED, &log_id)
                    .map_err(io_err)?;
                return Ok(());
            }
        };
        if log_id.index < wanted.index {
            // Held back: remembered, so that a restart purges past the hole openraft may leave.
            self.engine
                .raft_put(KEY_PURGE_WANTED, &wanted)
                .map_err(io_err)?;
        }
        let engine = self.engine.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || engine.persist_state())
            .await
            .map_err(io_err)?
            .map_err(io_err)?;
        tracing::info!(
            upto = log_id.index,
            flush_ms = started.elapsed().as_secs_f64() * 1e3,
            "purging the Raft log; applied state flushed first"
        );
        self.purge_now(log_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::log_files::tests::write_segment;

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A log store over a new database holding blank entries `entries`, none purged.
    fn store_with(entries: std::ops::RangeInclusive<u64>) -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let store =
            LogStore::new(engine.clone(), &dir.path().join("cairn-wal"), 1, |_| {}).unwrap();
        let cf = engine.cf(crate::storage::CF_LOG);
        for i in entries {
            let e = bincode::serialize(&blank(i)).unwrap();
            engine.db.put_cf(cf, i.to_be_bytes(), e).unwrap();
        }
        (dir, store)
    }

    #[tokio::test]
    async fn a_log_left_in_files_by_an_earlier_build_moves_into_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let files = dir.path().join("cairn-wal");
        let entries: Vec<Entry<TypeConfig>> = (0..5).map(blank).collect();
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| bincode::serialize(e).unwrap())
            .collect();
        let records: Vec<(u8, u64, &[u8])> = encoded
            .iter()
            .enumerate()
            .map(|(i, b)| (1, i as u64, b.as_slice()))
            .collect();
        write_segment(&files, 0, &records[..3]);
        write_segment(&files, 1, &records[3..]);
        let ids = |es: &[Entry<TypeConfig>]| es.iter().map(|e| e.log_id).collect::<Vec<_>>();

        let mut store = LogStore::new(engine.clone(), &files, 1, |_| {}).unwrap();
        assert!(!files.exists(), "the files are left behind");
        assert_eq!(
            store.get_log_state().await.unwrap().last_log_id,
            Some(entries[4].log_id)
        );
        let got = store.try_get_log_entries(0..5).await.unwrap();
        assert_eq!(ids(&got), ids(&entries));
        drop(store);

        // A stale copy of the files beside a log in RocksDB (a move cut
        // short) is removed, and RocksDB's log is kept.
        write_segment(&files, 0, &records[..1]);
        let mut store = LogStore::new(engine.clone(), &files, 1, |_| {}).unwrap();
        assert!(!files.exists());
        let got = store.try_get_log_entries(0..5).await.unwrap();
        assert_eq!(ids(&got), ids(&entries));
    }

    /// A purge (openraft asks for one up to a snapshot from the leader before the snapshot
    /// is loaded) goes no further than the state machine has applied.
    #[tokio::test]
    async fn purges_stop_at_the_applied_position() {
        use openraft::storage::RaftLogStorage;
        let (_dir, mut store) = store_with(1..=10);
        let applied = Arc::new(Mutex::new(None::<LogId>));
        let now = applied.clone();
        store.limit_purges(Arc::new(move || *now.lock())).unwrap();
        let purged = |s: &LogStore| s.purged_index();

        // Nothing applied: nothing purged.
        store.purge(blank(8).log_id).await.unwrap();
        assert_eq!(purged(&store), 0);
        // Applied up to 5: purged up to 5, not 8.
        *applied.lock() = Some(blank(5).log_id);
        store.purge(blank(8).log_id).await.unwrap();
        assert_eq!(purged(&store), 5);
        assert_eq!(
            store.get_log_state().await.unwrap().last_purged_log_id,
            Some(blank(5).log_id)
        );
        // The state machine caught up (the snapshot loaded): the next purge goes all the way.
        *applied.lock() = Some(blank(9).log_id);
        store.purge(blank(8).log_id).await.unwrap();
        assert_eq!(purged(&store), 8);
    }

    /// A log whose first entries a loaded snapshot replaced, its purge held back (a new
    /// member: nothing before the snapshot, entries after it), is purged up to the applied
    /// position at start, so that openraft finds no hole in it.
    #[tokio::test]
    async fn a_hole_below_the_applied_position_is_purged_at_start() {
        use openraft::storage::RaftLogStorage;
        let (_dir, mut store) = store_with(6..=10);
        store
            .limit_purges(Arc::new(move || Some(blank(5).log_id)))
            .unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(blank(5).log_id));
        assert_eq!(state.last_log_id, Some(blank(10).log_id));
        // No hole: nothing is purged at start.
        let (_dir, mut store) = store_with(1..=10);
        store
            .limit_purges(Arc::new(move || Some(blank(5).log_id)))
            .unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap().last_purged_log_id,
            None
        );
    }

    /// A follower told to purge up to a snapshot from the leader (20) before the snapshot is
    /// loaded purges only to its applied position (5) and remembers the rest; openraft counts
    /// the purge done and appends past the snapshot (21..25), leaving a hole (11..20) after its
    /// old entries (6..10). Reads never cross the hole, and a restart once the snapshot is
    /// loaded purges past it, whatever the first key on disk is.
    #[tokio::test]
    async fn a_held_back_purge_leaves_no_hole_after_a_restart() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        let (dir, mut store) = store_with(1..=10);
        let applied = Arc::new(Mutex::new(Some(blank(5).log_id)));
        let now = applied.clone();
        store.limit_purges(Arc::new(move || *now.lock())).unwrap();
        store.purge(blank(20).log_id).await.unwrap();
        assert_eq!(store.purged_index(), 5);
        let engine = store.engine.clone();
        let cf = engine.cf(crate::storage::CF_LOG);
        for i in 21..=25 {
            let e = bincode::serialize(&blank(i)).unwrap();
            engine.db.put_cf(cf, i.to_be_bytes(), e).unwrap();
        }
        let got = store.try_get_log_entries(6..26).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            (6..=10).collect::<Vec<_>>(),
            "a read stops at the hole"
        );
        // The snapshot loaded, then a restart.
        *applied.lock() = Some(blank(20).log_id);
        drop(store);
        let mut store =
            LogStore::new(engine.clone(), &dir.path().join("cairn-wal"), 1, |_| {}).unwrap();
        let now = applied.clone();
        store.limit_purges(Arc::new(move || *now.lock())).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(blank(20).log_id));
        assert_eq!(state.last_log_id, Some(blank(25).log_id));
        let got = store.try_get_log_entries(21..26).await.unwrap();
        assert_eq!(got.len(), 5);
    }

    /// The committed id openraft re-applies up to at start: the saved one only when the log
    /// holds that very entry and every entry from the applied position up to it.
    #[tokio::test]
    async fn the_committed_id_at_start_is_checked_against_the_log() {
        use openraft::storage::RaftLogStorage;
        let (_dir, mut store) = store_with(1..=10);
        store
            .limit_purges(Arc::new(move || Some(blank(3).log_id)))
            .unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None, "nothing saved");
        store.save_committed(Some(blank(8).log_id)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(blank(8).log_id));
        // Saved at or below the applied position: as saved (openraft takes the larger).
        store.save_committed(Some(blank(2).log_id)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(blank(2).log_id));
        // An entry of another term at that index: not this log's committed prefix.
        let other = LogId::new(openraft::CommittedLeaderId::new(2, 1), 8);
        store.save_committed(Some(other)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
        // Past the log's end, or across a hole: not handed over.
        store.save_committed(Some(blank(12).log_id)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
        store.save_committed(Some(blank(8).log_id)).await.unwrap();
        let cf = store.engine.cf(crate::storage::CF_LOG);
        store.engine.db.delete_cf(cf, 6u64.to_be_bytes()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
    }

    /// openraft restores a leadership at start, without an election, when
    /// the saved vote is a committed vote for this member: the store tells
    /// which term that is and how far its log went (the read index floor).
    #[test]
    fn a_restored_leadership_is_recognised_with_its_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let files = dir.path().join("cairn-wal");
        let open = || LogStore::new(engine.clone(), &files, 1, |_| {}).unwrap();
        assert_eq!(open().restored_leadership(), None, "no vote yet");

        let cf = engine.cf(crate::storage::CF_LOG);
        for i in 1..=7 {
            let e = bincode::serialize(&blank(i)).unwrap();
            engine.db.put_cf(cf, i.to_be_bytes(), e).unwrap();
        }
        engine.raft_put(KEY_VOTE, &Vote::<u64>::new(3, 1)).unwrap();
        assert_eq!(
            open().restored_leadership(),
            None,
            "a candidate's vote is not a leadership"
        );
        engine
            .raft_put(KEY_VOTE, &Vote::<u64>::new_committed(3, 2))
            .unwrap();
        assert_eq!(open().restored_leadership(), None, "another member leads");
        engine
            .raft_put(KEY_VOTE, &Vote::<u64>::new_committed(3, 1))
            .unwrap();
        assert_eq!(
            open().restored_leadership(),
            Some(RestoredLeadership {
                term: 3,
                last_index: 7
            })
        );
    }

    #[tokio::test]
    async fn a_sync_from_before_a_truncation_does_not_count() {
        let d = Durable::new(3);
        d.wait(3).await;
        let before = d.epoch();
        // Entries 4..=9 written; the log is cut back to 5 before their sync ends.
        d.reset(5);
        d.advance(before, 9);
        assert_eq!(
            *d.index.borrow(),
            5,
            "a stale sync must not vouch for 6..=9"
        );
        let waiter = {
            let d = std::sync::Arc::clone(&d);
            tokio::spawn(async move { d.wait(7).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "7 is not durable yet");
        d.advance(d.epoch(), 7);
        waiter.await.unwrap();
        // Only forward.
        d.advance(d.epoch(), 6);
        assert_eq!(*d.index.borrow(), 7);
    }
}
