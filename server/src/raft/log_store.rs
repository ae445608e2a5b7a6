//! The Raft log on RocksDB: entries by index, bincode-encoded; every
//! append is fsynced before openraft is told it is durable. The newest
//! entries are also kept in memory: openraft reads each committed entry back
//! to apply it (and to replicate it), and those reads then cost no decoding.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, RaftLogReader, Vote};
use parking_lot::Mutex;
use rocksdb::IteratorMode;

use super::{io_err, LogId, StorageError, TypeConfig};
use crate::storage::{Engine, LogOp, LogWriter};

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";

/// How many of the newest entries are kept in memory.
pub const LOG_CACHE_ENTRIES: u64 = 4096;

/// The log store handle (cheap to clone; clones share state).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    writer: Arc<LogWriter>,
    /// The newest entries (entry payloads are shared, clones are cheap).
    cache: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    /// Set while this member leads others: appends are then synced in the
    /// background (see `storage::log_writer`).
    background_sync: Arc<std::sync::atomic::AtomicBool>,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, on_sync: impl Fn(f64) + Send + Sync + 'static) -> Self {
        let writer = Arc::new(LogWriter::new(engine.clone(), on_sync));
        Self {
            engine,
            writer,
            cache: Arc::default(),
            background_sync: Arc::default(),
        }
    }

    /// The switch between inline and background syncs.
    pub fn background_sync(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.background_sync.clone()
    }

    fn last_on_disk(&self) -> Result<Option<Entry<TypeConfig>>, StorageError> {
        let cf = self.engine.cf(crate::storage::CF_LOG);
        match self.engine.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(io_err)?;
                Ok(Some(bincode::deserialize(&v).map_err(io_err)?))
            }
            None => Ok(None),
        }
    }
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
        let from = start.to_be_bytes();
        for item in self
            .engine
            .db
            .iterator_cf(cf, IteratorMode::From(&from, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(bincode::deserialize(&v).map_err(io_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.engine.raft_get(KEY_PURGED).map_err(io_err)?;
        let last = self.last_on_disk()?.map(|e| e.log_id);
        let last_log_id = last.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.engine.raft_put(KEY_VOTE, vote).map_err(io_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.engine.raft_get(KEY_VOTE).map_err(io_err)
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
        let mut encoded = Vec::new();
        let mut appended = Vec::new();
        for e in entries {
            encoded.push((e.log_id.index, bincode::serialize(&e).map_err(io_err)?));
            appended.push(e);
        }
        let mut callback = Some(callback);
        if !encoded.is_empty() {
            let result = if self
                .background_sync
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                let cb = callback.take().expect("not yet used");
                self.writer.write_then_sync(
                    LogOp::Append(encoded),
                    Box::new(move |r| {
                        cb.log_io_completed(r.map_err(std::io::Error::other));
                    }),
                )
            } else {
                // Synced before returning: see `storage::log_writer`.
                self.writer.write(LogOp::Append(encoded))
            };
            if let Err(e) = result {
                if let Some(cb) = callback.take() {
                    cb.log_io_completed(Err(std::io::Error::other(e.to_string())));
                }
                return Err(io_err(e));
            }
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
        if let Some(cb) = callback {
            cb.log_io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|i, _| *i < log_id.index);
        self.writer
            .write(LogOp::TruncateFrom(log_id.index))
            .map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|i, _| *i > log_id.index);
        self.engine.raft_put(KEY_PURGED, &log_id).map_err(io_err)?;
        self.writer
            .write(LogOp::PurgeTo(log_id.index))
            .map_err(io_err)
    }
}
