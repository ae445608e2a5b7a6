//! Raft log writes: entries, truncations and purges, each one synced
//! RocksDB write.
//!
//! Writes happen on the caller's thread: openraft's core, on the
//! single-threaded runtime that also serves clients. The proposer keeps one
//! Raft entry — a batch of client requests — in flight, so there is nothing
//! to overlap with the fsync, while handing the write to another thread would
//! add two thread wakeups (~50-70 µs each on a small VM) to every write.

use std::sync::Arc;
use std::time::Instant;

use rocksdb::{WriteBatch, WriteOptions};

use super::engine::{Engine, CF_LOG};

/// A change to the log.
pub enum LogOp {
    /// Encoded entries by index.
    Append(Vec<(u64, Vec<u8>)>),
    /// Delete entries with index `>=` this.
    TruncateFrom(u64),
    /// Delete entries with index `<=` this.
    PurgeTo(u64),
}

/// Writes log operations durably.
pub struct LogWriter {
    engine: Arc<Engine>,
    on_sync: Box<dyn Fn(f64) + Send + Sync>,
}

impl LogWriter {
    /// `on_sync` observes each synced write's duration in seconds (metrics).
    pub fn new(engine: Arc<Engine>, on_sync: impl Fn(f64) + Send + Sync + 'static) -> Self {
        Self {
            engine,
            on_sync: Box::new(on_sync),
        }
    }

    /// Applies `op` and returns once it is on disk.
    pub fn write(&self, op: LogOp) -> Result<(), rocksdb::Error> {
        let mut batch = WriteBatch::default();
        let cf = self.engine.cf(CF_LOG);
        match op {
            LogOp::Append(entries) => {
                for (index, bytes) in entries {
                    batch.put_cf(cf, index.to_be_bytes(), bytes);
                }
            }
            LogOp::TruncateFrom(i) => {
                batch.delete_range_cf(cf, i.to_be_bytes(), u64::MAX.to_be_bytes())
            }
            LogOp::PurgeTo(i) => {
                batch.delete_range_cf(cf, 0u64.to_be_bytes(), (i + 1).to_be_bytes())
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let start = Instant::now();
        let res = self.engine.db.write_opt(batch, &wo);
        (self.on_sync)(start.elapsed().as_secs_f64());
        res
    }
}
