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

impl Lessor {
    /// Starts (or restarts) a lease's clock.
    pub fn renew(&self, id: i64, ttl: i64) {
        self.deadlines
            .lock()
            .insert(id, Instant::now() + Duration::from_secs(ttl.max(0) as u64));
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
            d.insert(id, now + Duration::from_secs(ttl.max(0) as u64));
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
        self.deadlines
            .lock()
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect()
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
    }
}
