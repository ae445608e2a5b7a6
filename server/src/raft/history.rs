//! Which member IDs the applied (so committed) memberships have had, and from
//! which log index each first appeared: how a member tells "removed" from
//! "not added yet". Member IDs are never reused, and applied memberships only
//! move forward in the log, so an ID that an applied membership had at index
//! `i` and that the applied membership at a later index lacks was removed.
//!
//! Nothing else may decide removal: the effective membership openraft
//! reports goes back when a follower's uncommitted entries are truncated, and
//! a member catching up replays old memberships that predate its own
//! addition; neither is evidence. The history is kept in the `raft` column
//! family (fsynced when an ID is first seen, which happens once per member
//! ever added), so that a restarted member and its peers still know.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::StoredMembership;
use crate::error::Result;
use crate::storage::Engine;

/// The `raft` column family's key for the history.
const KEY: &[u8] = b"member_history";

/// Member ID -> log index of the first applied membership that had it.
#[derive(Default)]
pub struct MemberHistory {
    first_seen: Mutex<BTreeMap<u64, u64>>,
}

impl MemberHistory {
    pub fn load(engine: &Engine) -> Result<Self> {
        Ok(Self {
            first_seen: Mutex::new(engine.raft_get(KEY)?.unwrap_or_default()),
        })
    }

    /// Records the members of an applied membership (from the log or a
    /// snapshot); persists the history when it has new IDs.
    pub fn note(&self, engine: &Engine, m: &StoredMembership) -> Result<()> {
        let Some(at) = m.log_id().map(|l| l.index) else {
            return Ok(());
        };
        let mut seen = self.first_seen.lock();
        let mut changed = false;
        for (id, _) in m.membership().nodes() {
            seen.entry(*id).or_insert_with(|| {
                changed = true;
                at
            });
        }
        if changed {
            engine.raft_put(KEY, &*seen)?;
        }
        Ok(())
    }

    /// Whether `id` was removed: an applied membership had it, and `current`
    /// (the applied membership now), from a later log position, does not.
    pub fn removed(&self, id: u64, current: &StoredMembership) -> bool {
        let Some(first) = self.first_seen.lock().get(&id).copied() else {
            return false;
        };
        let now = current.log_id().map_or(0, |l| l.index);
        now > first && !current.membership().nodes().any(|(n, _)| *n == id)
    }

    /// Whether `id` was ever a member here (a new member must not get it).
    pub fn ever(&self, id: u64) -> bool {
        self.first_seen.lock().contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, LogId, Membership};

    use super::*;
    use crate::raft::Member;

    fn membership(index: u64, voters: &[u64], learners: &[u64]) -> StoredMembership {
        let voters: BTreeSet<u64> = voters.iter().copied().collect();
        let nodes: BTreeMap<u64, Member> = voters
            .iter()
            .chain(learners)
            .map(|id| (*id, Member::default()))
            .collect();
        StoredMembership::new(
            Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            Membership::new(vec![voters], nodes),
        )
    }

    #[test]
    fn removal_needs_a_later_membership_without_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let h = MemberHistory::load(&engine).unwrap();
        // A member catching up replays memberships older than its own addition (9 at index
        // 40): not removed, whatever it sees before.
        h.note(&engine, &membership(1, &[1, 2, 3], &[])).unwrap();
        assert!(!h.removed(9, &membership(20, &[1, 3], &[])));
        h.note(&engine, &membership(40, &[1, 3], &[9])).unwrap();
        assert!(!h.removed(9, &membership(40, &[1, 3], &[9])));
        // An applied membership older than the one that added it (a restart whose applied
        // state lags the history): not removed.
        assert!(!h.removed(9, &membership(20, &[1, 3], &[])));
        // Removed: 2 (since index 1) is not in the membership at 40; 9 is gone at 50.
        assert!(h.removed(2, &membership(40, &[1, 3], &[9])));
        assert!(h.removed(9, &membership(50, &[1, 3], &[])));
        assert!(h.ever(2) && !h.ever(7));
        // The history survives a restart.
        drop(h);
        let h = MemberHistory::load(&engine).unwrap();
        assert!(h.removed(9, &membership(50, &[1, 3], &[])));
        assert!(!h.removed(7, &membership(50, &[1, 3], &[])));
    }
}
