//! The Raft log on RocksDB. Appends go through the group-commit writer
//! thread; until durable they are served from an in-memory tail so the
//! replication path can read them at once.

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
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

/// The log store handle (cheap to clone; clones share state).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    writer: LogWriter,
    /// Entries submitted but not yet known durable.
    tail: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, on_sync: impl Fn(f64) + Send + 'static) -> Self {
        let writer = LogWriter::start(engine.clone(), on_sync);
        Self { engine, writer, tail: Arc::new(Mutex::new(BTreeMap::new())) }
    }

    fn last_on_disk(&self) -> Result<Option<Entry<TypeConfig>>, StorageError> {
        let cf = self.engine.cf(crate::storage::engine_cf_log());
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
        let mut out: BTreeMap<u64, Entry<TypeConfig>> = BTreeMap::new();
        let cf = self.engine.cf(crate::storage::engine_cf_log());
        let from = start.to_be_bytes();
        for item in self.engine.db.iterator_cf(cf, IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.insert(idx, bincode::deserialize(&v).map_err(io_err)?);
        }
        for (idx, e) in self.tail.lock().range(range) {
            out.insert(*idx, e.clone());
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.engine.raft_get(KEY_PURGED).map_err(io_err)?;
        let tail_last = self.tail.lock().values().next_back().map(|e| e.log_id);
        let last = match tail_last {
            Some(l) => Some(l),
            None => self.last_on_disk()?.map(|e| e.log_id),
        };
        let last_log_id = last.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
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

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.engine.raft_put_nosync(KEY_COMMITTED, &committed).map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.engine.raft_get::<Option<LogId>>(KEY_COMMITTED).map_err(io_err)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        let mut written = Vec::new();
        {
            let mut tail = self.tail.lock();
            for e in entries {
                encoded.push((e.log_id.index, bincode::serialize(&e).map_err(io_err)?));
                written.push(e.log_id);
                tail.insert(e.log_id.index, e);
            }
        }
        if written.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let tail = self.tail.clone();
        self.writer
            .submit(LogOp::Append(encoded), move |res| {
                if res.is_ok() {
                    // Durable now: readers find these on disk. Only drop what
                    // this append wrote (a later append may have replaced them).
                    let mut t = tail.lock();
                    for id in written {
                        if t.get(&id.index).is_some_and(|e| e.log_id == id) {
                            t.remove(&id.index);
                        }
                    }
                }
                callback.log_io_completed(res);
            })
            .map_err(io_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.tail.lock().retain(|i, _| *i < log_id.index);
        self.writer.run(LogOp::TruncateFrom(log_id.index)).await.map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.engine.raft_put(KEY_PURGED, &log_id).map_err(io_err)?;
        self.tail.lock().retain(|i, _| *i > log_id.index);
        self.writer.run(LogOp::PurgeTo(log_id.index)).await.map_err(io_err)
    }
}
