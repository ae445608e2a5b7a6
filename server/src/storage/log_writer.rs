//! Group commit for the Raft log: operations queue up while the previous
//! batch is being fsynced, then go to disk together in one synced write.
//! Truncations and purges travel the same queue, so they stay ordered with
//! the appends before them.

use std::sync::mpsc;
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

type Done = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// The log's writer thread.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<(LogOp, Done)>,
}

impl LogWriter {
    /// Starts the writer thread; `on_sync` observes each fsync's duration
    /// (seconds) for metrics.
    pub fn start(engine: Arc<Engine>, on_sync: impl Fn(f64) + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel::<(LogOp, Done)>();
        std::thread::Builder::new()
            .name("cairn-log-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while let Ok(next) = rx.try_recv() {
                        group.push(next);
                    }
                    let mut batch = WriteBatch::default();
                    let cf = engine.cf(CF_LOG);
                    for (op, _) in &group {
                        match op {
                            LogOp::Append(entries) => {
                                for (index, bytes) in entries {
                                    batch.put_cf(cf, index.to_be_bytes(), bytes);
                                }
                            }
                            LogOp::TruncateFrom(i) => batch.delete_range_cf(cf, i.to_be_bytes(), u64::MAX.to_be_bytes()),
                            LogOp::PurgeTo(i) => batch.delete_range_cf(cf, 0u64.to_be_bytes(), (i + 1).to_be_bytes()),
                        }
                    }
                    let mut wo = WriteOptions::default();
                    wo.set_sync(true);
                    let start = Instant::now();
                    let res = engine.db.write_opt(batch, &wo);
                    on_sync(start.elapsed().as_secs_f64());
                    for (_, done) in group {
                        done(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
                    }
                }
            })
            .expect("spawn log writer thread");
        Self { tx }
    }

    /// Queues an operation; `done` runs once it is on disk.
    pub fn submit(&self, op: LogOp, done: impl FnOnce(Result<(), std::io::Error>) + Send + 'static) -> Result<(), std::io::Error> {
        self.tx.send((op, Box::new(done))).map_err(|_| std::io::Error::other("log writer stopped"))
    }

    /// Queues an operation and waits until it is on disk.
    pub async fn run(&self, op: LogOp) -> Result<(), std::io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(op, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| std::io::Error::other("log writer stopped"))?
    }
}
