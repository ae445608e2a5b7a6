//! The member's background tasks: following Raft's metrics (term, leader,
//! removal), expiring leases and compacting on the leader, refreshing sizes,
//! and putting restored data into a Raft snapshot.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::read::wait_err;
use super::EtcdServer;
use crate::config::AutoCompaction;
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{CompactionRequest, LeaseRevokeRequest};
use crate::proto::peerpb::peer_client::PeerClient;
use crate::proto::peerpb::MembersRequest;
use crate::proto::raftpb::internal_request::Request;
use crate::storage::Engine;
use crate::storage::RESTORED_NEEDS_SNAPSHOT;

/// After a restore, takes a Raft snapshot and purges the log up to it, so that every member
/// added later catches up from a snapshot (which holds the restored data) rather than from the
/// log (which does not). Tries until it succeeds or the server stops.
pub(super) async fn snapshot_restored(server: std::sync::Weak<EtcdServer>, engine: Arc<Engine>) {
    loop {
        let Some(s) = server.upgrade() else { return };
        match put_restored_in_snapshot(&s, &engine).await {
            Ok(index) => {
                s.restore_pending.store(false, Ordering::Release);
                info!(
                    index,
                    "restored data is in a Raft snapshot; members may join"
                );
                return;
            }
            Err(e) => debug!(error = %e, "restored data not in a Raft snapshot yet"),
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One attempt of [`snapshot_restored`]: as the leader with its whole log applied, builds a
/// snapshot, purges the log up to it and clears the restore mark. Returns the snapshot's index.
pub(super) async fn put_restored_in_snapshot(s: &EtcdServer, engine: &Engine) -> Result<u64> {
    let step = Some(Duration::from_secs(5));
    let m = s
        .raft
        .wait(step)
        .metrics(
            |m| {
                m.current_leader == Some(m.id)
                    && m.last_applied.is_some()
                    && m.last_applied.map(|l| l.index) == m.last_log_index
            },
            "leading with the log applied",
        )
        .await
        .map_err(wait_err)?;
    let target = m.last_applied.expect("waited for it").index;
    s.raft.trigger().snapshot().await.map_err(Error::internal)?;
    let m = s
        .raft
        .wait(step)
        .metrics(
            |m| m.snapshot.is_some_and(|l| l.index >= target),
            "snapshot built",
        )
        .await
        .map_err(wait_err)?;
    let index = m.snapshot.expect("waited for it").index;
    s.raft
        .trigger()
        .purge_log(index)
        .await
        .map_err(Error::internal)?;
    s.raft
        .wait(step)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "log purged")
        .await
        .map_err(wait_err)?;
    engine.raft_put(RESTORED_NEEDS_SNAPSHOT, &false)?;
    Ok(index)
}

/// Follows Raft's metrics: term and leader for headers and metrics; on
/// becoming leader, restarts every lease clock.
pub(super) async fn track_leadership(server: std::sync::Weak<EtcdServer>) {
    let Some(s) = server.upgrade() else { return };
    let mut rx = s.raft.metrics();
    drop(s);
    let mut was_leader = false;
    let mut last_leader = None;
    loop {
        {
            let Some(s) = server.upgrade() else { return };
            let m = rx.borrow_and_update().clone();
            s.term.store(m.current_term, Ordering::Relaxed);
            s.leader
                .store(m.current_leader.unwrap_or(0), Ordering::Relaxed);
            s.metrics.has_leader.set(m.current_leader.is_some() as i64);
            let leader = m.state == ServerState::Leader;
            s.metrics.is_leader.set(leader as i64);
            if m.current_leader.is_some() && m.current_leader != last_leader {
                s.metrics.leader_changes.inc();
                last_leader = m.current_leader;
            }
            let nodes: HashSet<u64> = m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect();
            s.log_background_sync
                .store(nodes.len() > 1 && leader, Ordering::Relaxed);
            s.state.replicated.store(nodes.len() > 1, Ordering::Relaxed);
            // Removed only by a committed membership newer than the one that added this
            // member (`raft::MemberHistory`), or by a peer that knows that (it answered a
            // vote request with MemberRemoved); never by the effective membership, which
            // goes back when uncommitted entries are truncated.
            if s.state.removed(s.member_id) {
                s.stop_removed("its applied membership");
            } else if s.peers.removed.load(Ordering::Relaxed) {
                s.stop_removed("a peer answering its vote request");
            }
            if let Some(a) = m.last_applied {
                s.metrics.proposals_applied.set(a.index as i64);
            }
            s.metrics
                .proposals_committed
                .set(m.last_log_index.unwrap_or(0) as i64);
            if leader && !was_leader {
                let store = s.state.store.read();
                s.state
                    .lessor
                    .reset_all(store.leases().map(|(id, l)| (id, l.ttl)));
                info!(
                    member = format!("{:x}", s.member_id),
                    term = m.current_term,
                    "became leader"
                );
            }
            was_leader = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// While this member is a learner, has no leader, or is not in its own membership, asks the
/// leader (or, with none known, every other member) every 2 s whether it was removed. A voter
/// removed while it was down learns it when it campaigns; a learner never campaigns, and a
/// member removed before it applied its own addition hears from no leader again: without this
/// they would wait forever.
pub(super) async fn watch_removal(server: std::sync::Weak<EtcdServer>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        if *s.removed.borrow() {
            return;
        }
        let leader = s.raft.metrics().borrow().current_leader;
        let joined = s.member(s.member_id).is_some();
        if leader.is_some() && joined && !s.is_learner() {
            continue;
        }
        let members = s.members();
        let url_of = |id: u64| {
            members
                .iter()
                .find(|(m, _, _)| *m == id)
                .and_then(|(_, m, _)| m.peer_urls.first().cloned())
        };
        let mut urls: Vec<String> = match leader.filter(|l| *l != s.member_id).and_then(url_of) {
            Some(url) => vec![url],
            None => members
                .iter()
                .filter(|(id, _, _)| *id != s.member_id)
                .filter_map(|(_, m, _)| m.peer_urls.first().cloned())
                .chain(
                    s.cfg
                        .initial_cluster
                        .iter()
                        .filter(|(name, _)| **name != s.cfg.name)
                        .filter_map(|(_, u)| u.first().cloned()),
                )
                .collect(),
        };
        urls.sort();
        urls.dedup();
        for url in urls {
            let Ok(ch) = s.peers.connect(&url) else {
                continue;
            };
            let mut client = PeerClient::new(ch);
            let ask = s.peers.request(MembersRequest { id: s.member_id });
            let answer = tokio::time::timeout(Duration::from_secs(1), client.members(ask)).await;
            if let Ok(Ok(r)) = answer {
                if r.into_inner().removed {
                    s.stop_removed(&format!("the member at {url}"));
                    return;
                }
            }
        }
    }
}

/// Most expired leases revoked per half-second tick: etcd's lessor revokes
/// at most 1000 a second, so a mass expiry does not flood the log.
const REVOKES_PER_TICK: usize = 500;

/// On the leader, revokes leases whose clock ran out.
pub(super) async fn expire_leases(server: std::sync::Weak<EtcdServer>) {
    let revoking: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        if !s.is_leader() {
            continue;
        }
        let mut budget = REVOKES_PER_TICK.saturating_sub(revoking.lock().len());
        for id in s.state.lessor.expired() {
            if budget == 0 {
                break;
            }
            if !revoking.lock().insert(id) {
                continue;
            }
            budget -= 1;
            let s = s.clone();
            let revoking = revoking.clone();
            tokio::spawn(async move {
                // As root, as etcd revokes expired leases: whoever attached keys.
                let root = crate::auth::AuthInfo::member();
                match s
                    .propose(Request::LeaseRevoke(LeaseRevokeRequest { id }), Some(&root))
                    .await
                {
                    Ok(_) | Err(Error::LeaseNotFound) => s.state.lessor.forget(id),
                    Err(e) => warn!(lease = id, "revoking expired lease failed: {e}"),
                }
                revoking.lock().remove(&id);
            });
        }
    }
}

/// On every member, refreshes the storage size the space quota checks and
/// the size/count metrics, twice a second.
pub(super) async fn refresh_sizes(server: std::sync::Weak<EtcdServer>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        s.metrics.watchers.set(s.state.hub.watchers() as i64);
        let deleted = s.state.compactor.deleted();
        let counted = s.metrics.compaction_keys.get();
        s.metrics
            .compaction_keys
            .inc_by(deleted.saturating_sub(counted));
        s.metrics
            .compaction_pending
            .set(s.state.compactor.pending() as i64);
        s.metrics
            .keys_total
            .set(s.state.store.read().keys_total() as i64);
        let size = s.state.engine.size();
        s.db_size.store(size, Ordering::Relaxed);
        s.metrics.db_total_size.set(size);
        s.metrics
            .db_total_size_in_use
            .set(s.state.engine.size_in_use());
    }
}

/// On the leader, compacts history as `--auto-compaction-*` ask: in
/// revision mode every 5 minutes to `revision - retention`; in periodic mode
/// to the revision the store had one retention period ago, checked every
/// tenth of the period (etcd's compactors behave the same way).
pub(super) async fn auto_compact(server: std::sync::Weak<EtcdServer>, ac: AutoCompaction) {
    let step = match ac {
        AutoCompaction::Revision(_) => Duration::from_secs(300),
        AutoCompaction::Periodic(p) => (p / 10).max(Duration::from_millis(100)),
    };
    let mut samples: std::collections::VecDeque<(tokio::time::Instant, i64)> = Default::default();
    let mut tick = tokio::time::interval(step);
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        let (current, compacted) = {
            let store = s.state.store.read();
            (store.revision(), store.compacted())
        };
        let target = match ac {
            AutoCompaction::Revision(keep) => current - keep,
            AutoCompaction::Periodic(period) => {
                let now = tokio::time::Instant::now();
                samples.push_back((now, current));
                // The newest sample at least one period old is the target.
                let mut target = 0;
                while let Some(&(t, rev)) = samples.front() {
                    if now.duration_since(t) < period {
                        break;
                    }
                    target = rev;
                    samples.pop_front();
                }
                target
            }
        };
        if !s.is_leader() || target <= compacted {
            continue;
        }
        match s
            .propose(
                Request::Compaction(CompactionRequest {
                    revision: target,
                    physical: false,
                }),
                None,
            )
            .await
        {
            Ok(_) => info!(revision = target, "auto compaction"),
            Err(Error::Compacted) => {}
            Err(e) => warn!(revision = target, "auto compaction failed: {e}"),
        }
    }
}
