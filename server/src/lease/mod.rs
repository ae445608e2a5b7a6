//! Lease clocks. The state machine knows which leases exist and their TTLs;
//! when each one expires is this member's business: only the leader expires
//! leases (by proposing a revoke), and a new leader restarts every clock so
//! no lease expires because of an election.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// etcd's largest TTL (`lease.MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Deadlines of the leases this member knows.
#[derive(Default)]
pub struct Lessor {
    deadlines: Mutex<HashMap<i64, Instant>>,
}

/// `now + ttl` seconds, saturating far in the future: a TTL the state machine let through must
/// never panic the clock (`Instant + Duration` panics on overflow).
fn deadline(now: Instant, ttl: i64) -> Instant {
    let ttl = Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64);
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Lessor {
    /// Starts (or restarts) a lease's clock.
    pub fn renew(&self, id: i64, ttl: i64) {
        self.deadlines
            .lock()
            .insert(id, deadline(Instant::now(), ttl));
    }

    pub fn forget(&self, id: i64) {
        self.deadlines.lock().remove(&id);
    }

    /// Restarts every clock (on becoming leader).
    pub fn reset_all(&self, leases: impl Iterator<Item = (i64, i64)>) {
        let now = Instant::now();
        let mut d = self.deadlines.lock();
        d.clear();
        for (id, ttl) in leases {
            d.insert(id, deadline(now, ttl));
        }
    }

    /// Time left before the lease expires, if its clock runs here.
    pub fn remaining(&self, id: i64) -> Option<Duration> {
        self.deadlines
            .lock()
            .get(&id)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Leases whose deadline has passed.
    pub fn expired(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut due: Vec<(Instant, i64)> = self
            .deadlines
            .lock()
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, d)| (*d, *id))
            .collect();
        // Longest overdue first: revoking is rate-limited, and none waits forever.
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks() {
        let l = Lessor::default();
        l.renew(1, 0);
        l.renew(2, 100);
        assert_eq!(l.expired(), vec![1]);
        assert!(l.remaining(2).unwrap() > Duration::from_secs(99));
        l.forget(1);
        assert!(l.expired().is_empty());
        l.reset_all([(3, 0)].into_iter());
        assert_eq!(l.expired(), vec![3]);
        assert!(l.remaining(2).is_none());
        // No TTL panics the clock, however large (data dirs may hold one from before the
        // state machine checked).
        l.renew(4, i64::MAX);
        l.reset_all([(5, i64::MAX), (6, MAX_LEASE_TTL)].into_iter());
        assert!(l.remaining(5).unwrap() > Duration::from_secs(1 << 30));
    }
}
