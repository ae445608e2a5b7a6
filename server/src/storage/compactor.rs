//! Physical compaction in the background (etcd's scheduled compaction; issue 22). A
//! compaction is applied to the key index at once, so from then on no read reaches the
//! revisions it drops; their records are deleted from RocksDB here, on a thread of its own,
//! [`BATCH`] at a time with a [`PAUSE`] between batches (etcd's
//! `--experimental-compaction-batch-limit` and its 10 ms pause), while applies go on.
//!
//! Deletes skip the WAL like every applied change: a crash can leave some records behind,
//! and so can a stop before the queue is empty. The key index rebuilt at the next start is
//! compacted again at the stored compaction revision, which finds them
//! (`raft::KvState::open`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::Engine;
use crate::mvcc::Revision;

/// Records deleted at a time.
pub const BATCH: usize = 1000;
/// The pause after each batch.
pub const PAUSE: Duration = Duration::from_millis(10);

struct Job {
    /// The compaction revision this job completes.
    rev: i64,
    revisions: Vec<Revision>,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Storage is compacted through this revision (every job up to it is done).
    done: tokio::sync::watch::Sender<i64>,
    /// Records queued and not yet deleted.
    pending: AtomicU64,
    /// Records deleted since the start.
    deleted: AtomicU64,
    /// Held while a batch is deleted; holds what is left of the job in progress.
    working: Mutex<u64>,
    /// Bumped by [`Compactor::clear`]: a job taken before gives up at its next batch.
    epoch: AtomicU64,
}

/// The thread that deletes compacted records.
pub struct Compactor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    pub fn start(engine: Arc<Engine>) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            done: tokio::sync::watch::channel(0).0,
            pending: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            working: Mutex::new(0),
            epoch: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-compactor".into())
            .spawn(move || run(&s, &engine))
            .expect("spawn the compactor thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Queues the records of `revisions`, which the compaction at `rev` dropped from the key
    /// index (possibly none: storage is then compacted through `rev` once the jobs before
    /// are done).
    pub fn submit(&self, rev: i64, revisions: Vec<Revision>) {
        self.shared
            .pending
            .fetch_add(revisions.len() as u64, Ordering::Relaxed);
        self.shared.queue.lock().push_back(Job { rev, revisions });
        self.shared.wake.notify_one();
    }

    /// Drops every queued job (the state machine was replaced; its own leftovers are
    /// submitted next).
    ///
    /// The job in progress is given up too, and a batch being deleted is waited for: call
    /// this before the state is replaced, or a batch of the old state's revisions could
    /// delete records of the new one that carry the same revisions.
    pub fn clear(&self) {
        let mut left = self.shared.working.lock();
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        let mut q = self.shared.queue.lock();
        let n: u64 = q.iter().map(|j| j.revisions.len() as u64).sum::<u64>() + *left;
        q.clear();
        *left = 0;
        self.shared.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// The revision storage is compacted through.
    pub fn done(&self) -> i64 {
        *self.shared.done.borrow()
    }

    /// Waits until storage is compacted through `rev`.
    pub async fn wait(&self, rev: i64) {
        let mut rx = self.shared.done.subscribe();
        let _ = rx.wait_for(|d| *d >= rev).await;
    }

    /// Records queued and not yet deleted.
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Records deleted since the start.
    pub fn deleted(&self) -> u64 {
        self.shared.deleted.load(Ordering::Relaxed)
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _q = self.shared.queue.lock();
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, engine: &Engine) {
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(j) = q.pop_front() {
                    break j;
                }
                shared.wake.wait(&mut q);
            }
        };
        let epoch = {
            let mut left = shared.working.lock();
            *left = job.revisions.len() as u64;
            shared.epoch.load(Ordering::SeqCst)
        };
        for batch in job.revisions.chunks(BATCH) {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            {
                let mut left = shared.working.lock();
                if shared.epoch.load(Ordering::SeqCst) != epoch {
                    // Cleared: what was left is no longer counted.
                    break;
                }
                if let Err(e) = engine.delete_records(batch) {
                    // Left behind: found again at the next start.
                    tracing::error!(error = %e, "compaction: deleting records failed");
                }
                *left -= batch.len() as u64;
            }
            shared
                .pending
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            shared
                .deleted
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            std::thread::sleep(PAUSE);
        }
        shared.done.send_modify(|d| *d = (*d).max(job.rev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::{Record, WriteSet};
    use crate::proto::mvccpb::KeyValue;
    use crate::storage::StateMeta;

    /// Records are deleted in batches with pauses (so a big job takes a while and the caller
    /// does not wait for it), the done revision follows the jobs in order, and a stop
    /// leaves the rest for the next start.
    #[test]
    fn deletes_in_paused_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let n = 5 * BATCH as i64;
        let records = (2..2 + n)
            .map(|m| {
                let kv = KeyValue {
                    key: b"k".to_vec(),
                    ..Default::default()
                };
                let rec = Record {
                    kv,
                    tombstone: false,
                };
                (Revision::new(m, 0), rec)
            })
            .collect();
        let ws = WriteSet {
            records,
            ..Default::default()
        };
        let meta = StateMeta {
            revision: n + 1,
            ..Default::default()
        };
        engine.write_state(&ws, &meta, None).unwrap();
        let c = Compactor::start(engine.clone());
        let all: Vec<Revision> = (2..2 + n).map(|m| Revision::new(m, 0)).collect();
        c.submit(n, all[..all.len() - 1].to_vec());
        c.submit(n + 1, Vec::new());
        // Five batches with a pause after each: not done the moment it is queued.
        assert!(c.done() < n);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(c.wait(n + 1));
        assert_eq!(c.pending(), 0);
        assert_eq!(c.deleted(), n as u64 - 1);
        let left: Vec<_> = engine.records().map(|r| r.unwrap().0).collect();
        assert_eq!(left, vec![Revision::new(n + 1, 0)]);
        drop(c);
        // Cleared with a job under way (50 batches with a pause after each, of revisions
        // storage does not hold) and one queued behind it: the one under way stops at its
        // next batch, the queued one never runs, nothing stays counted.
        let c = Compactor::start(engine.clone());
        let absent: Vec<Revision> = (0..50 * BATCH as i64)
            .map(|i| Revision::new(1_000_000 + i, 0))
            .collect();
        c.submit(n + 1, absent);
        c.submit(n + 1, vec![Revision::new(n + 1, 0)]);
        c.clear();
        assert_eq!(c.pending(), 0);
        assert!(c.deleted() < 50 * BATCH as u64);
        drop(c);
        assert_eq!(engine.records().count(), 1);
    }
}
