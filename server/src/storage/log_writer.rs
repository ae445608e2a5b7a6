//! Raft log writes: entries, truncations and purges, each a RocksDB write
//! (without RocksDB's WAL) recorded in the log's journal ([`Journal`]), which
//! is synced before the write counts.
//!
//! A write is synced either inline, on the caller's thread (openraft's core,
//! on the single-threaded runtime that also serves clients), or in the
//! background ([`LogWriter::write_then_sync`]): written now, its fsync run by
//! a syncer thread that syncs everything queued by then at once. Which one is
//! the log store's choice (`raft::log_store`): the leader's own appends are
//! synced in the background, overlapping its fsync with the followers' and
//! with the next batch, as etcd's leader does; a lone write on one member and
//! every follower append are synced inline, which saves two thread wakeups
//! (~50-70 µs on a small VM) when there is nothing to overlap.

use std::sync::Arc;
use std::time::Instant;

use rocksdb::WriteBatch;

use super::engine::{Engine, CF_LOG};
use super::journal::Journal;
use super::log_files::{encode_record, KIND_ENTRY, KIND_TRUNCATE};

/// A change to the log.
pub enum LogOp {
    /// Encoded entries by index.
    Append(Vec<(u64, Vec<u8>)>),
    /// Delete entries with index `>=` this.
    TruncateFrom(u64),
    /// Delete entries with index `<=` this.
    PurgeTo(u64),
}

/// Told the outcome of a background sync.
pub type SyncDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Writes log operations durably.
pub struct LogWriter {
    engine: Arc<Engine>,
    journal: Arc<Journal>,
    on_sync: Arc<dyn Fn(f64) + Send + Sync>,
    syncer: std::sync::Mutex<Option<std::sync::mpsc::Sender<SyncDone>>>,
}

impl LogWriter {
    /// Opens the log's journal in `journal_dir`, replaying what it holds
    /// into RocksDB (entries up to `purged` dropped). `on_sync` observes
    /// each sync's duration in seconds (metrics).
    pub fn new(
        engine: Arc<Engine>,
        journal_dir: &std::path::Path,
        purged: Option<u64>,
        on_sync: impl Fn(f64) + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        Ok(Self {
            journal: Arc::new(Journal::open(engine.clone(), journal_dir, purged)?),
            engine,
            on_sync: Arc::new(on_sync),
            syncer: Default::default(),
        })
    }

    /// Applies `op` and returns once it is on disk.
    pub fn write(&self, op: LogOp) -> std::io::Result<()> {
        self.write_opt(op, true)
    }

    /// Applies `op` now and calls `done` once it is on disk: syncs happen in
    /// order on a thread of their own, one fsync for every append queued by then.
    pub fn write_then_sync(&self, op: LogOp, done: SyncDone) -> std::io::Result<()> {
        self.write_opt(op, false)?;
        let mut syncer = self.syncer.lock().expect("syncer lock");
        let tx = syncer.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<SyncDone>();
            let journal = self.journal.clone();
            let on_sync = self.on_sync.clone();
            std::thread::Builder::new()
                .name("cairn-log-sync".into())
                .spawn(move || {
                    while let Ok(first) = rx.recv() {
                        let mut waiting = vec![first];
                        waiting.extend(rx.try_iter());
                        let start = Instant::now();
                        let res = journal.sync().map_err(|e| e.to_string());
                        on_sync(start.elapsed().as_secs_f64());
                        for done in waiting {
                            done(res.clone());
                        }
                    }
                })
                .expect("spawn the log sync thread");
            tx
        });
        tx.send(done)
            .map_err(|_| ())
            .expect("the log sync thread runs while the writer lives");
        Ok(())
    }

    fn write_opt(&self, op: LogOp, sync: bool) -> std::io::Result<()> {
        let mut batch = WriteBatch::default();
        let mut records = Vec::new();
        let cf = self.engine.cf(CF_LOG);
        match op {
            LogOp::Append(entries) => {
                for (index, bytes) in entries {
                    encode_record(&mut records, KIND_ENTRY, index, &bytes);
                    batch.put_cf(cf, index.to_be_bytes(), bytes);
                }
            }
            LogOp::TruncateFrom(i) => {
                encode_record(&mut records, KIND_TRUNCATE, i, &[]);
                batch.delete_range_cf(cf, i.to_be_bytes(), u64::MAX.to_be_bytes())
            }
            // Not journaled: the purged index is saved (synced) first, and a
            // replay drops the entries up to it.
            LogOp::PurgeTo(i) => {
                batch.delete_range_cf(cf, 0u64.to_be_bytes(), (i + 1).to_be_bytes())
            }
        }
        self.journal.write(&self.engine, batch, &records)?;
        if sync && !records.is_empty() {
            let start = Instant::now();
            self.journal.sync()?;
            (self.on_sync)(start.elapsed().as_secs_f64());
        }
        Ok(())
    }
}
