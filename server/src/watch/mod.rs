//! The watch hub: fans applied events out to the watch streams.
//!
//! The state machine publishes each applied batch's events under the hub's
//! lock, after they are readable from storage. A watch registers under the
//! same lock and learns the last published revision `R`: history up to `R`
//! is replayed from storage by the stream, everything after `R` arrives
//! through the stream's channel, behind the replay. Nothing is lost or sent
//! twice while writes continue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::mvcc::KeyRange;
use crate::proto::mvccpb::Event;

/// What a watch stream receives from the hub.
#[derive(Debug)]
pub enum HubMsg {
    /// Live events for one of the stream's watchers, with their revision.
    Events { watch_id: i64, events: Vec<Event> },
    /// Every event up to `revision` has been queued before this message.
    Progress { revision: i64, all: bool },
}

struct Watcher {
    stream: u64,
    watch_id: i64,
    range: KeyRange,
    /// Live events are delivered from this revision on.
    from: i64,
    tx: mpsc::UnboundedSender<HubMsg>,
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

    /// A new stream id.
    pub fn new_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The last published revision.
    pub fn revision(&self) -> i64 {
        self.inner.lock().revision
    }

    /// The compacted revision as last published.
    pub fn compacted(&self) -> i64 {
        self.inner.lock().compacted
    }

    /// Publishes the events of revisions up to `revision`.
    pub fn publish(&self, events: &[Event], revision: i64, compacted: i64) {
        let mut i = self.inner.lock();
        i.revision = revision;
        i.compacted = compacted;
        if events.is_empty() {
            return;
        }
        let mut gone = Vec::new();
        for (key, w) in &i.watchers {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| {
                    let kv = e.kv.as_ref().expect("events carry a kv");
                    kv.mod_revision >= w.from && w.range.contains(&kv.key)
                })
                .cloned()
                .collect();
            if !mine.is_empty()
                && w.tx
                    .send(HubMsg::Events {
                        watch_id: w.watch_id,
                        events: mine,
                    })
                    .is_err()
            {
                gone.push(*key);
            }
        }
        for k in gone {
            i.watchers.remove(&k);
        }
    }

    /// Registers a watch starting at `start` (0: from now).
    pub fn register(
        &self,
        stream: u64,
        watch_id: i64,
        range: KeyRange,
        start: i64,
        tx: mpsc::UnboundedSender<HubMsg>,
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
    pub fn progress(&self, tx: &mpsc::UnboundedSender<HubMsg>, all: bool) {
        let i = self.inner.lock();
        let _ = tx.send(HubMsg::Progress {
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = hub.register(0, 1, KeyRange::new(b"a", b"\0"), 3, tx.clone());
        assert_eq!(
            r,
            Registered::Replay {
                from: 3,
                to: 5,
                current: 5
            }
        );
        hub.publish(&[ev("a", 6), ev("0", 6)], 6, 0);
        match rx.try_recv().unwrap() {
            HubMsg::Events { events, .. } => assert_eq!(events.len(), 1),
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
}
