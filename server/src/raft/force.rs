//! `--force-new-cluster`, with etcd's meaning: a member restarts from its own data as the only
//! voter of its cluster, keeping its member and cluster IDs and its data up to its commit index.
//! For quorum loss: the members that are gone for good cannot be removed the normal way (that
//! needs a quorum), so the survivor leaves them behind.
//!
//! What etcd does (`restartAsStandaloneNode`): the log entries past the commit index are
//! dropped, and configuration changes removing every other member are appended as committed.
//! Here, before openraft starts: the log past the commit index is cut, and one membership entry
//! with this member as the only voter is appended under a new term (no other leader ever wrote
//! in it), with a vote for itself in that term (not committed: openraft elects it at once, as
//! the only voter, and commits the entry with its first one as leader). The commit index is the
//! committed log id openraft last saved (`LogStore::committed_on_disk`), or the applied
//! position when that is further; nothing past it was known to be committed here.
//!
//! The members left behind are removed by that membership: should one come back with its old
//! data it is told so by this member and stops (etcd's "permanently removed"); should a majority
//! of them come back together they could still elect among themselves, so whoever forces a new
//! cluster must keep them from coming back with their data (the operator deletes their volumes
//! first).

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, Entry, EntryPayload, Membership, RaftLogReader, Vote};

use super::{LogId, LogStore, Position, StorageError};

/// What a forced start kept and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forced {
    /// The last entry kept (the commit index).
    pub kept: LogId,
    /// How many entries past it were dropped.
    pub dropped: u64,
    /// The members that were in the membership with this one, now left behind.
    pub left_behind: Vec<u64>,
}

/// Why a new cluster cannot be forced from this data.
#[derive(Debug, thiserror::Error)]
pub enum ForceError {
    #[error(transparent)]
    Storage(#[from] Box<StorageError>),
    #[error("member {0:x} is not in the membership its data holds")]
    NotAMember(u64),
}

/// Rewrites the log of member `me`, whose state machine is at `applied`, so that it starts as
/// the only voter of its cluster. `None`: the data holds no membership (a member that never
/// joined), and nothing is changed.
pub async fn force_new_cluster(
    log: &mut LogStore,
    me: u64,
    applied: &Position,
) -> Result<Option<Forced>, ForceError> {
    let committed = log.committed_on_disk().map_err(Box::new)?;
    let kept = match (committed, applied.0) {
        (Some(c), Some(a)) => Some(if c.index >= a.index { c } else { a }),
        (c, a) => c.or(a),
    };
    let Some(kept) = kept else {
        tracing::info!("no committed entry known and nothing applied");
        return Ok(None);
    };
    let state = log.get_log_state().await.map_err(Box::new)?;
    let last = state.last_log_id.unwrap_or(kept);
    // The membership in force at `kept`: the last one in the log up to it after the applied
    // position, else the applied one. Read in chunks, newest first, with stops at the first.
    let mut membership = None;
    // The first entry not in the applied state (the log starts at 0: the first membership).
    let first = match (
        state.last_purged_log_id.map(|l| l.index),
        applied.0.map(|l| l.index),
    ) {
        (None, None) => 0,
        (p, a) => p.max(a).map_or(0, |i| i + 1),
    };
    let mut end = kept.index + 1;
    while membership.is_none() && end > first {
        let start = end.saturating_sub(64).max(first);
        let entries = log
            .try_get_log_entries(start..end)
            .await
            .map_err(Box::new)?;
        membership = entries.iter().rev().find_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(m.clone()),
            _ => None,
        });
        end = start;
    }
    let membership = membership.unwrap_or_else(|| applied.1.membership().clone());
    if membership.nodes().next().is_none() {
        tracing::info!(
            kept = kept.index,
            applied = ?applied.0.map(|a| a.index),
            first,
            "no membership up to the commit index"
        );
        return Ok(None);
    }
    let node = membership
        .get_node(&me)
        .ok_or(ForceError::NotAMember(me))?
        .clone();
    let left_behind: Vec<u64> = membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| *id != me)
        .collect();
    let vote = log.read_vote().await.map_err(Box::new)?.unwrap_or_default();
    let term = vote.leader_id().get_term().max(last.leader_id.term) + 1;
    let alone = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, node)]));
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, me), kept.index + 1),
        payload: EntryPayload::Membership(alone),
    };
    log.rewrite_tail(kept, entry, Vote::new(term, me))
        .map_err(Box::new)?;
    Ok(Some(Forced {
        kept,
        dropped: last.index.saturating_sub(kept.index),
        left_behind,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Member;
    use crate::storage::Engine;
    use openraft::StoredMembership;

    fn id(term: u64, leader: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, leader), index)
    }

    fn members(voters: &[u64]) -> Membership<u64, Member> {
        let nodes: BTreeMap<u64, Member> = voters
            .iter()
            .map(|v| {
                (
                    *v,
                    Member {
                        name: format!("m{v}"),
                        ..Member::default()
                    },
                )
            })
            .collect();
        Membership::new(vec![voters.iter().copied().collect()], nodes)
    }

    /// A log of member 1: entry 0 makes {1, 2, 3} (as openraft's initialization does); the
    /// rest are blank entries of leader 2 in term 3, except the memberships given.
    fn log_with(
        last: u64,
        more: &[(u64, &[u64])],
    ) -> (tempfile::TempDir, LogStore, StoredMembership<u64, Member>) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let store =
            LogStore::new(engine.clone(), &dir.path().join("cairn-wal"), 1, |_| {}).unwrap();
        let cf = engine.cf(crate::storage::CF_LOG);
        for i in 0..=last {
            let payload = if i == 0 {
                EntryPayload::Membership(members(&[1, 2, 3]))
            } else if let Some((_, m)) = more.iter().find(|(at, _)| *at == i) {
                EntryPayload::Membership(members(m))
            } else {
                EntryPayload::Blank
            };
            let e: Entry<crate::raft::TypeConfig> = Entry {
                log_id: id(3, 2, i),
                payload,
            };
            engine
                .db
                .put_cf(cf, i.to_be_bytes(), bincode::serialize(&e).unwrap())
                .unwrap();
        }
        let first = StoredMembership::new(Some(id(3, 2, 0)), members(&[1, 2, 3]));
        (dir, store, first)
    }

    #[tokio::test]
    async fn the_log_past_the_commit_index_gives_way_to_a_membership_of_one() {
        let (_dir, mut log, first) = log_with(10, &[]);
        log.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        log.save_committed(Some(id(3, 2, 7))).await.unwrap();
        let applied = (Some(id(3, 2, 5)), first);
        let f = force_new_cluster(&mut log, 1, &applied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            f,
            Forced {
                kept: id(3, 2, 7),
                dropped: 3,
                left_behind: vec![2, 3],
            }
        );
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(id(4, 1, 8)));
        let e = log.try_get_log_entries(8..=8).await.unwrap();
        let EntryPayload::Membership(m) = &e[0].payload else {
            panic!("{:?}", e[0]);
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), [1]);
        assert_eq!(m.get_node(&1).unwrap().name, "m1");
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 1)));
        assert_eq!(log.committed_on_disk().unwrap(), Some(id(3, 2, 7)));
        // Nothing past the new entry is left, in memory or on disk.
        assert!(log.try_get_log_entries(9..).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_commit_index_is_the_furthest_known_and_the_membership_the_one_in_force_there() {
        // A membership {1, 2} at 6, past the applied position: it is the one left behind.
        let (_dir, mut log, first) = log_with(10, &[(6, &[1, 2])]);
        // Saved further than the log reaches (a leader's unsynced tail lost): the log's end.
        log.save_committed(Some(id(3, 2, 12))).await.unwrap();
        let applied = (Some(id(3, 2, 4)), first.clone());
        let f = force_new_cluster(&mut log, 1, &applied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.kept, f.dropped, f.left_behind),
            (id(3, 2, 10), 0, vec![2])
        );
        // Nothing saved: the applied position is the commit index.
        let (_dir, mut log, first) = log_with(10, &[(9, &[1, 2])]);
        let applied = (Some(id(3, 2, 8)), first);
        let f = force_new_cluster(&mut log, 1, &applied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.kept, f.dropped, f.left_behind),
            (id(3, 2, 8), 2, vec![2, 3])
        );
        // A member not in the membership cannot be its only voter.
        let (_dir, mut log, first) = log_with(5, &[]);
        let applied = (Some(id(3, 2, 5)), first);
        assert!(matches!(
            force_new_cluster(&mut log, 9, &applied).await,
            Err(ForceError::NotAMember(9))
        ));
        // Nothing applied yet (the state never flushed): the membership is the log's first entry.
        let (_dir, mut log, _) = log_with(6, &[]);
        log.save_committed(Some(id(3, 2, 5))).await.unwrap();
        let none = (None, StoredMembership::default());
        let f = force_new_cluster(&mut log, 1, &none)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.kept, f.dropped, f.left_behind),
            (id(3, 2, 5), 1, vec![2, 3])
        );
        // A log emptied by a snapshot from the leader (purged to 3, applied at 10): purged up
        // to the applied position before the new entry, so that no hole is left below it.
        let (_dir, mut log, first) = log_with(3, &[]);
        log.purge(id(3, 2, 3)).await.unwrap();
        let applied = (Some(id(3, 2, 10)), first);
        let f = force_new_cluster(&mut log, 1, &applied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.kept, id(3, 2, 10));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(id(3, 2, 10)));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(11));
        // A member that never joined: nothing to force.
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let mut log = LogStore::new(engine, &dir.path().join("cairn-wal"), 1, |_| {}).unwrap();
        assert_eq!(force_new_cluster(&mut log, 1, &none).await.unwrap(), None);
    }
}
