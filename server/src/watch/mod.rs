//! The watch hub: fans applied events out to the watch streams.
//!
//! The state machine publishes each applied batch's events under the hub's
//! lock, after they are readable from storage. A watch registers under the
//! same lock and learns the last published revision `R`: history up to `R`
//! is replayed from storage by the stream, everything after `R` arrives
//! through the stream's channel, behind the replay. Nothing is lost or sent
//! twice while writes continue.
//!
//! Each applied batch's events are shared by every watcher they concern: the
//! hub only finds which watchers have at least one of them and queues the same
//! batch to each, with the revision the watcher's live events start at; the
//! stream picks out its watcher's events (and shapes them) as it sends them.
//!
//! A stream whose client stops reading does not grow without bound: past
//! [`MAX_QUEUED`] undelivered batches or [`MAX_QUEUED_BYTES`] of events queued
//! (a batch counted once per stream) its watchers are unregistered and told
//! from which revision they lag; the stream resyncs each one from storage the
//! way a new watch replays history (or cancels it, if compacted meanwhile), a
//! page at a time (etcd's unsynced watchers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::mvcc::KeyRange;
use crate::proto::mvccpb::Event;

/// Undelivered batches of events a stream may have queued before its watchers
/// are moved to resync from storage.
pub const MAX_QUEUED: usize = 1024;
/// Bytes of events (keys and values) a stream may have queued before its
/// watchers are moved to resync from storage.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// What a watch stream receives from the hub.
#[derive(Debug)]
pub enum HubMsg {
    /// An applied batch's events, some of them for one of the stream's
    /// watchers: those in its range from revision `from` on. `counted`: this
    /// message counts the batch (once per stream) against the stream's bounds,
    /// with `bytes`.
    Events {
        watch_id: i64,
        batch: Arc<[Event]>,
        from: i64,
        counted: bool,
        bytes: usize,
    },
    /// Every event up to `revision` has been queued before this message.
    Progress { revision: i64, all: bool },
    /// The stream fell behind: the watcher was unregistered and must resync
    /// from `from` (everything before it was queued ahead of this message).
    Lagged { watch_id: i64, from: i64 },
}

/// The hub's end of a watch stream's queue.
#[derive(Clone)]
pub struct StreamTx {
    tx: mpsc::UnboundedSender<HubMsg>,
    queued: Arc<Queued>,
}

/// What a stream has queued and not yet received.
#[derive(Default)]
struct Queued {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

/// The stream's end of its queue.
pub struct StreamRx {
    rx: mpsc::UnboundedReceiver<HubMsg>,
    queued: Arc<Queued>,
}

/// A new stream queue.
pub fn stream_queue() -> (StreamTx, StreamRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(Queued::default());
    (
        StreamTx {
            tx,
            queued: queued.clone(),
        },
        StreamRx { rx, queued },
    )
}

impl StreamRx {
    pub async fn recv(&mut self) -> Option<HubMsg> {
        let m = self.rx.recv().await;
        if let Some(HubMsg::Events {
            counted: true,
            bytes,
            ..
        }) = &m
        {
            self.queued.messages.fetch_sub(1, Ordering::Relaxed);
            self.queued.bytes.fetch_sub(*bytes, Ordering::Relaxed);
        }
        m
    }
}

/// The events of `batch` in `range` from revision `from` on.
pub fn events_for<'a>(
    batch: &'a [Event],
    range: &'a KeyRange,
    from: i64,
) -> impl Iterator<Item = &'a Event> + 'a {
    batch.iter().filter(move |e| {
        let kv = e.kv.as_ref().expect("events carry a kv");
        kv.mod_revision >= from && range.contains(&kv.key)
    })
}

/// About the bytes a batch of events holds.
fn batch_bytes(batch: &[Event]) -> usize {
    batch
        .iter()
        .map(|e| {
            let kv = |kv: &Option<crate::proto::mvccpb::KeyValue>| {
                kv.as_ref()
                    .map_or(0, |kv| kv.key.len() + kv.value.len() + 48)
            };
            kv(&e.kv) + kv(&e.prev_kv) + 16
        })
        .sum()
}

struct Watcher {
    stream: u64,
    watch_id: i64,
    range: KeyRange,
    /// Live events are delivered from this revision on.
    from: i64,
    tx: StreamTx,
}

#[derive(Default)]
struct Inner {
    revision: i64,
    compacted: i64,
    watchers: HashMap<(u64, i64), Watcher>,
}

/// The outcome of registering a watch.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    /// Replay history `[from, to]` (empty when `from > to`), then live events follow.
    Replay { from: i64, to: i64, current: i64 },
    /// The start revision is compacted; the watch was not registered.
    Compacted { compacted: i64, current: i64 },
}

/// The hub (one per member).
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    next_stream: AtomicU64,
}

impl Hub {
    /// Sets the published position at startup or after a snapshot install.
    pub fn reset(&self, revision: i64, compacted: i64) {
        let mut i = self.inner.lock();
        i.revision = revision;
        i.compacted = compacted;
    }

    /// Sets the published position after the state machine was replaced (a snapshot load):
    /// every watcher is moved to resync from storage, from where its live events would have
    /// gone on, since what lies between was never published.
    pub fn replace(&self, revision: i64, compacted: i64) {
        let mut i = self.inner.lock();
        let published = i.revision;
        for (_, w) in i.watchers.drain() {
            let _ = w.tx.tx.send(HubMsg::Lagged {
                watch_id: w.watch_id,
                from: w.from.max(published + 1),
            });
        }
        i.revision = revision;
        i.compacted = compacted;
    }

    /// A new stream id.
    pub fn new_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The compacted revision as last published.
    pub fn compacted(&self) -> i64 {
        self.inner.lock().compacted
    }

    /// Publishes the events of revisions up to `revision`: shared, not copied per watcher.
    pub fn publish(&self, events: Vec<Event>, revision: i64, compacted: i64) {
        let mut i = self.inner.lock();
        let published = i.revision;
        i.revision = revision;
        i.compacted = compacted;
        if events.is_empty() {
            return;
        }
        let bytes = batch_bytes(&events);
        let batch: Arc<[Event]> = events.into();
        let mut counted = std::collections::HashSet::new();
        let mut gone = Vec::new();
        let mut lagging = Vec::new();
        for (key, w) in &i.watchers {
            if events_for(&batch, &w.range, w.from).next().is_none() {
                continue;
            }
            let q = &w.tx.queued;
            if q.messages.load(Ordering::Relaxed) >= MAX_QUEUED
                || q.bytes.load(Ordering::Relaxed) >= MAX_QUEUED_BYTES
            {
                lagging.push(*key);
                continue;
            }
            // The batch is held once per stream, however many of its watchers it concerns,
            // and counted once.
            let first = counted.insert(w.stream);
            let bytes = if first { bytes } else { 0 };
            if first {
                q.messages.fetch_add(1, Ordering::Relaxed);
                q.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            let msg = HubMsg::Events {
                watch_id: w.watch_id,
                batch: batch.clone(),
                from: w.from,
                counted: first,
                bytes,
            };
            if w.tx.tx.send(msg).is_err() {
                gone.push(*key);
            }
        }
        for k in gone {
            i.watchers.remove(&k);
        }
        for k in lagging {
            if let Some(w) = i.watchers.remove(&k) {
                let from = w.from.max(published + 1);
                let _ = w.tx.tx.send(HubMsg::Lagged {
                    watch_id: w.watch_id,
                    from,
                });
            }
        }
    }

    /// Registers a watch starting at `start` (0: from now).
    pub fn register(
        &self,
        stream: u64,
        watch_id: i64,
        range: KeyRange,
        start: i64,
        tx: StreamTx,
    ) -> Registered {
        let mut i = self.inner.lock();
        let current = i.revision;
        if start != 0 && start < i.compacted {
            return Registered::Compacted {
                compacted: i.compacted,
                current,
            };
        }
        let from = if start == 0 { current + 1 } else { start };
        let live_from = from.max(current + 1);
        i.watchers.insert(
            (stream, watch_id),
            Watcher {
                stream,
                watch_id,
                range,
                from: live_from,
                tx,
            },
        );
        Registered::Replay {
            from,
            to: current,
            current,
        }
    }

    pub fn cancel(&self, stream: u64, watch_id: i64) -> bool {
        self.inner
            .lock()
            .watchers
            .remove(&(stream, watch_id))
            .is_some()
    }

    /// Removes every watcher of a closed stream.
    pub fn close_stream(&self, stream: u64) {
        self.inner.lock().watchers.retain(|_, w| w.stream != stream);
    }

    /// Queues a progress marker behind every event published so far.
    pub fn progress(&self, tx: &StreamTx, all: bool) {
        let i = self.inner.lock();
        let _ = tx.tx.send(HubMsg::Progress {
            revision: i.revision,
            all,
        });
    }

    /// Number of registered watchers (for metrics).
    pub fn watchers(&self) -> usize {
        self.inner.lock().watchers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::KeyValue;

    fn ev(key: &str, rev: i64) -> Event {
        Event {
            kv: Some(KeyValue {
                key: key.into(),
                mod_revision: rev,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn registration_splits_replay_and_live_without_overlap() {
        let hub = Hub::default();
        hub.reset(5, 0);
        let (tx, mut rx) = stream_queue();
        let r = hub.register(0, 1, KeyRange::new(b"a", b"\0"), 3, tx.clone());
        assert_eq!(
            r,
            Registered::Replay {
                from: 3,
                to: 5,
                current: 5
            }
        );
        hub.publish(vec![ev("a", 6), ev("0", 6)], 6, 0);
        let range = KeyRange::new(b"a", b"\0");
        match rx.rx.try_recv().unwrap() {
            HubMsg::Events { batch, from, .. } => {
                assert_eq!(events_for(&batch, &range, from).count(), 1)
            }
            m => panic!("{m:?}"),
        }
        let r = hub.register(0, 2, KeyRange::new(b"a", b""), 0, tx.clone());
        assert_eq!(
            r,
            Registered::Replay {
                from: 7,
                to: 6,
                current: 6
            }
        );
        hub.reset(6, 4);
        assert_eq!(
            hub.register(0, 3, KeyRange::new(b"a", b""), 3, tx),
            Registered::Compacted {
                compacted: 4,
                current: 6
            }
        );
    }

    #[test]
    fn a_stream_that_stops_reading_is_told_to_resync() {
        let hub = Hub::default();
        hub.reset(1, 0);
        let (tx, mut rx) = stream_queue();
        hub.register(0, 7, KeyRange::new(b"k", b""), 0, tx);
        for rev in 2..(2 + MAX_QUEUED as i64) {
            hub.publish(vec![ev("k", rev)], rev, 0);
        }
        let next = 2 + MAX_QUEUED as i64;
        hub.publish(vec![ev("k", next)], next, 0);
        hub.publish(vec![ev("k", next + 1)], next + 1, 0);
        assert_eq!(hub.watchers(), 0, "the lagging watcher is unregistered");
        let mut last = 0;
        let mut lagged = None;
        while let Ok(m) = rx.rx.try_recv() {
            match m {
                HubMsg::Events { batch, .. } => last = batch[0].kv.as_ref().unwrap().mod_revision,
                HubMsg::Lagged { from, .. } => lagged = Some(from),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(last, next - 1, "everything before the overflow was queued");
        assert_eq!(
            lagged,
            Some(next),
            "resync starts at the first revision not queued"
        );
    }

    /// The bound counts bytes too, a batch once per stream however many of its watchers
    /// it concerns; one batch is shared by them all, not copied.
    #[test]
    fn a_stream_is_bounded_by_bytes_and_shares_batches() {
        let hub = Hub::default();
        hub.reset(1, 0);
        let (tx, mut rx) = stream_queue();
        for id in 0..50 {
            hub.register(0, id, KeyRange::new(b"k", b"l"), 0, tx.clone());
        }
        let big = |rev: i64| {
            let mut e = ev("k1", rev);
            e.kv.as_mut().unwrap().value = vec![0; 1 << 20];
            e
        };
        hub.publish(vec![big(2)], 2, 0);
        let mut batches = Vec::new();
        while let Ok(m) = rx.rx.try_recv() {
            match m {
                HubMsg::Events { batch, .. } => batches.push(batch),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(batches.len(), 50);
        assert_eq!(
            tx.queued.messages.load(Ordering::Relaxed),
            1,
            "one batch queued"
        );
        assert!(
            batches.iter().all(|b| Arc::ptr_eq(b, &batches[0])),
            "one shared batch"
        );
        let counted = tx.queued.bytes.load(Ordering::Relaxed);
        assert!(
            (1 << 20..2 << 20).contains(&counted),
            "{counted}: counted once"
        );
        // Nobody reads: about MAX_QUEUED_BYTES later every watcher is moved to resync.
        let mut rev = 3;
        while hub.watchers() > 0 {
            hub.publish(vec![big(rev)], rev, 0);
            rev += 1;
            assert!(rev < 100, "never bounded");
        }
        let queued = (rev - 2) as usize;
        assert!(
            queued <= MAX_QUEUED_BYTES / (1 << 20) + 2,
            "{queued} MiB queued"
        );
    }

    /// A state machine replaced under the watchers (a snapshot load): each one resyncs
    /// from storage where its live events would have gone on.
    #[test]
    fn a_replaced_state_moves_every_watcher_to_resync() {
        let hub = Hub::default();
        hub.reset(5, 0);
        let (tx, mut rx) = stream_queue();
        hub.register(0, 1, KeyRange::new(b"a", b""), 0, tx.clone());
        hub.register(0, 2, KeyRange::new(b"b", b""), 9, tx);
        hub.replace(100, 50);
        assert_eq!(hub.watchers(), 0);
        let mut lagged = std::collections::BTreeMap::new();
        while let Ok(m) = rx.rx.try_recv() {
            match m {
                HubMsg::Lagged { watch_id, from } => lagged.insert(watch_id, from),
                m => panic!("{m:?}"),
            };
        }
        assert_eq!(lagged, [(1, 6), (2, 9)].into_iter().collect());
    }
}
