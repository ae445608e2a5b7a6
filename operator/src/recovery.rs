//! Quorum-loss recovery, decided: from what a reconcile observed (the member list and who
//! answers, the pods that are Pending, the annotation, the outage clock) to whether to recover
//! now and from which member. Pure logic, no I/O; `controller::recovery` carries it out.
//!
//! The rules:
//! - Never while a quorum of the voters answers (a slow majority that answers is a majority),
//!   never while a member that answers applies entries it had not when the loss was first seen
//!   (a quorum exists that the operator cannot reach), and never while a recovery is under way
//!   (one recovery per outage; a new annotation token starts it over).
//! - `Manual`: only for an annotation token not acted on before. `Automatic`: also once the
//!   outage has lasted `spec.recovery.after`, unless a voter that does not answer has a Pending
//!   pod (not scheduled, or its volume not attached yet: it may come back with its data).
//! - The survivor is the member that answers with the highest applied index (what
//!   `--force-new-cluster` keeps: the log is cut at the commit index; cairn re-applies up to the
//!   commit index it saved when it restarts, so the figure survives restarts); then the longest
//!   log; ties: the lowest ordinal. Every other ordinal is fenced (its pod and volume deleted) before the survivor is
//!   restarted alone.
//! - With no member answering, the latest verified backup is the way back (never one that was
//!   not verified), and it discards every member's volume: so never on `cairn.dev/recover`
//!   (which only ever restarts a member that has data), only on its own annotation
//!   `cairn.dev/recover-from-backup=<token>`, or automatically once every member's pod has said
//!   its data is gone (cairn's `has already been bootstrapped` termination message) for
//!   `after`. Members that merely do not answer, or crash for another reason (a bad image, an
//!   expired certificate), are never replaced by a backup without a token.

use std::time::Duration;

use crate::crd::{BackupRecord, QuorumLossMode, RecoveryStatus};
use crate::layout::Layout;
use crate::plan::{quorum, ClusterView};

/// What a reconcile knows for the decision.
pub struct Facts<'a> {
    pub mode: QuorumLossMode,
    /// `spec.recovery.after`.
    pub after: Duration,
    /// The value of the `cairn.dev/recover` annotation, if set.
    pub requested: Option<&'a str>,
    pub prev: &'a RecoveryStatus,
    /// How long the quorum has been lost, by the status's clock (`None`: not lost before now).
    pub lost_for: Option<Duration>,
    pub view: Option<&'a ClusterView>,
    /// Ordinals whose pod is Pending.
    pub pending: &'a [i32],
    /// The value of the `cairn.dev/recover-from-backup` annotation, if set.
    pub requested_backup: Option<&'a str>,
    /// Ordinals whose pod says (its termination message) that its data is gone.
    pub lost_data: &'a [i32],
    /// The latest backup that verification found as recorded.
    pub verified: Option<&'a BackupRecord>,
    /// The StatefulSet's replicas.
    pub replicas: i32,
}

/// Whether `t` is a token the annotation may carry: 1-63 letters, digits, `.`, `_`, `-`.
pub fn valid_token(t: &str) -> bool {
    (1..=63).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The member to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Survivor {
    pub ordinal: i32,
    pub id: u64,
    pub applied_index: u64,
}

/// What to do about quorum loss now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A quorum answers (or there is no cluster to speak of): no outage.
    Quorum,
    /// A recovery is under way: it goes on.
    InProgress,
    /// The quorum is lost and nothing is done now, for this reason.
    Wait(String),
    /// The quorum looks lost but the cluster makes progress (this says how): the outage clock
    /// starts again.
    Progress(String),
    /// Recover now: fence `fence`, then restart `survivor` alone, under `token`.
    Recover {
        survivor: Survivor,
        fence: Vec<i32>,
        token: String,
    },
    /// No member answers: start the cluster again from `backup` (verified), under `token`.
    Restore { backup: BackupRecord, token: String },
}

/// Whether a quorum of the voters in `view` answers.
pub fn has_quorum(view: &ClusterView) -> bool {
    let voters = view.voters().count();
    voters > 0 && view.voters().filter(|m| m.healthy).count() >= quorum(voters)
}

/// The decision for `f`; `names` maps members to ordinals; `auto_token` is the token an
/// automatic recovery takes (unique to the outage).
pub fn decide(names: &dyn Layout, f: &Facts<'_>, auto_token: &str) -> Decision {
    let requested = f.requested.filter(|t| !t.is_empty() && !f.prev.used(t));
    let requested_backup = f
        .requested_backup
        .filter(|t| !t.is_empty() && !f.prev.used(t));
    for (annotation, t) in [
        (crate::crd::RECOVER_ANNOTATION, requested),
        (crate::crd::RECOVER_FROM_BACKUP_ANNOTATION, requested_backup),
    ] {
        if let Some(t) = t.filter(|t| !valid_token(t)) {
            return Decision::Wait(format!(
                "the value of {annotation} ({} bytes) is not a token: 1-63 letters, digits, '.', '_' or '-'",
                t.len()
            ));
        }
    }
    if let Some(run) = &f.prev.in_progress {
        // A new token of the same kind starts a recovery that has not finished over, unless a
        // quorum answers: a survivor's recovery is never turned into a restore from a backup.
        let new = match run.from_backup {
            None => requested,
            Some(_) => requested_backup,
        };
        let superseded = new.is_some_and(|t| t != run.token);
        if !superseded || f.view.is_some_and(has_quorum) {
            return Decision::InProgress;
        }
        if run.from_backup.is_some() {
            return restore(names, f, requested_backup, auto_token);
        }
        if f.view.is_none_or(|v| !v.members.iter().any(|m| m.healthy)) {
            return Decision::Wait(format!(
                "no member answers: the new {} token starts the recovery over once a member with data answers; {}=<token> would discard every member's volume for the verified backup",
                crate::crd::RECOVER_ANNOTATION,
                crate::crd::RECOVER_FROM_BACKUP_ANNOTATION,
            ));
        }
    }
    let nobody = f.view.is_none_or(|v| !v.members.iter().any(|m| m.healthy));
    let Some(view) = f.view.filter(|_| !nobody) else {
        return restore(names, f, requested_backup, auto_token);
    };
    if has_quorum(view) {
        return Decision::Quorum;
    }
    let answering: Vec<_> = view
        .members
        .iter()
        .filter(|m| m.healthy)
        .filter_map(|m| view.ordinal(names, m).map(|o| (o, m)))
        .collect();
    let applied_now = answering.iter().map(|(_, m)| m.applied_index).max();
    if let (Some(then), Some(now)) = (f.prev.applied_at_loss, applied_now) {
        if now > then {
            return Decision::Progress(format!(
                "members that answer still apply entries (applied index {now}, {then} when the loss was seen): a quorum exists that the operator cannot reach"
            ));
        }
    }
    // The furthest applied (what a forced member keeps), then the longest log, then the lowest
    // ordinal.
    let Some((ordinal, best)) = answering.iter().max_by(|(oa, a), (ob, b)| {
        (a.applied_index, a.raft_index)
            .cmp(&(b.applied_index, b.raft_index))
            .then(ob.cmp(oa))
    }) else {
        return restore(names, f, requested_backup, auto_token);
    };
    let token = match (requested, f.mode) {
        (Some(t), _) => t.to_string(),
        (None, QuorumLossMode::Manual) => {
            return Decision::Wait(format!(
                "spec.recovery.quorumLoss is Manual: annotate the EtcdCluster with {}=<a new token> to restart {} (applied index {}, the highest of the members that answer) as a one-member cluster",
                crate::crd::RECOVER_ANNOTATION,
                names.member(*ordinal),
                best.applied_index
            ));
        }
        (None, QuorumLossMode::Automatic) => {
            let lost_for = f.lost_for.unwrap_or_default();
            if lost_for < f.after {
                return Decision::Wait(format!(
                    "a majority of the voters has not answered for {}s; recovering automatically after {}s",
                    lost_for.as_secs(),
                    f.after.as_secs()
                ));
            }
            let pending: Vec<String> = view
                .voters()
                .filter(|m| !m.healthy)
                .filter_map(|m| view.ordinal(names, m))
                .filter(|o| f.pending.contains(o))
                .map(|o| names.member(o))
                .collect();
            if !pending.is_empty() {
                return Decision::Wait(format!(
                    "the pods of {} are Pending: they may come back with their data",
                    pending.join(", ")
                ));
            }
            if f.prev.last_token.as_deref() == Some(auto_token) {
                return Decision::Wait("recovered from this outage already".to_string());
            }
            auto_token.to_string()
        }
    };
    let top = f.replicas.max(view.max_ordinal(names).map_or(0, |o| o + 1));
    Decision::Recover {
        survivor: Survivor {
            ordinal: *ordinal,
            id: best.id,
            applied_index: best.applied_index,
        },
        fence: (0..top).filter(|o| o != ordinal).collect(),
        token,
    }
}

/// No member answers: the latest verified backup, by a token, or automatically once every
/// member's pod has been crash-looping for `after`.
fn restore(
    names: &dyn Layout,
    f: &Facts<'_>,
    requested: Option<&str>,
    auto_token: &str,
) -> Decision {
    let Some(backup) = f.verified else {
        return Decision::Wait(
            "no member answers, and there is no verified backup to start again from".to_string(),
        );
    };
    let token = match (requested, f.mode) {
        (Some(t), _) => t.to_string(),
        (None, QuorumLossMode::Manual) => {
            return Decision::Wait(format!(
                "no member answers: {} restarts a member that has data once one answers; to discard every member's volume and start again from the verified backup {} (revision {}; what was written after it is lost), annotate the EtcdCluster with {}=<a new token>",
                crate::crd::RECOVER_ANNOTATION,
                backup.key,
                backup.revision,
                crate::crd::RECOVER_FROM_BACKUP_ANNOTATION,
            ));
        }
        (None, QuorumLossMode::Automatic) => {
            let lost_for = f.lost_for.unwrap_or_default();
            let not_lost: Vec<String> = (0..f.replicas.max(1))
                .filter(|o| !f.lost_data.contains(o) || f.pending.contains(o))
                .map(|o| names.member(o))
                .collect();
            if !not_lost.is_empty() {
                return Decision::Wait(format!(
                    "no member answers, but {} {} not said that its data is gone: not replaced by a backup without {}=<token>",
                    not_lost.join(", "),
                    if not_lost.len() == 1 { "has" } else { "have" },
                    crate::crd::RECOVER_FROM_BACKUP_ANNOTATION,
                ));
            }
            if lost_for < f.after {
                return Decision::Wait(format!(
                    "every member's data is gone for {}s; starting again from the verified backup {} after {}s",
                    lost_for.as_secs(),
                    backup.key,
                    f.after.as_secs()
                ));
            }
            if f.prev.last_token.as_deref() == Some(auto_token) {
                return Decision::Wait("recovered from this outage already".to_string());
            }
            auto_token.to_string()
        }
    };
    Decision::Restore {
        backup: backup.clone(),
        token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Names;
    use crate::plan::ObservedMember;

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    /// Members per ordinal: (ordinal, healthy, applied index); no leader.
    fn view(members: &[(i32, bool, u64)]) -> ClusterView {
        let n = names();
        ClusterView {
            cluster_id: 7,
            leader: None,
            members: members
                .iter()
                .map(|&(o, healthy, applied_index)| ObservedMember {
                    id: 100 + o as u64,
                    name: n.member(o),
                    peer_urls: vec![n.peer_url(o)],
                    learner: false,
                    healthy,
                    applied_index,
                    raft_index: applied_index,
                    revision: 0,
                    version: None,
                })
                .collect(),
        }
    }

    fn facts<'a>(
        mode: QuorumLossMode,
        view: Option<&'a ClusterView>,
        prev: &'a RecoveryStatus,
        lost_for: Option<Duration>,
        pending: &'a [i32],
    ) -> Facts<'a> {
        Facts {
            mode,
            after: Duration::from_secs(300),
            requested: None,
            prev,
            lost_for,
            view,
            pending,
            requested_backup: None,
            lost_data: &[],
            verified: None,
            replicas: 3,
        }
    }

    const LONG: Option<Duration> = Some(Duration::from_secs(301));

    #[test]
    fn automatic_recovery_keeps_the_member_with_the_most_data_and_fences_the_rest() {
        let n = names();
        let prev = RecoveryStatus::default();
        let v = view(&[(0, true, 40), (1, false, 0), (2, true, 55)]);
        // Two of three answer: a quorum, nothing to do, however long anything lasted.
        assert_eq!(
            decide(
                &n,
                &facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[]),
                "a"
            ),
            Decision::Quorum
        );
        let v = view(&[(0, true, 40), (1, false, 0), (2, false, 0)]);
        assert_eq!(
            decide(
                &n,
                &facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[]),
                "auto-1"
            ),
            Decision::Recover {
                survivor: Survivor {
                    ordinal: 0,
                    id: 100,
                    applied_index: 40
                },
                fence: vec![1, 2],
                token: "auto-1".into(),
            }
        );
        // Two answer without a leader in a five-member cluster: the one further ahead is kept.
        let v = view(&[
            (0, true, 40),
            (1, false, 0),
            (2, true, 41),
            (3, false, 0),
            (4, false, 0),
        ]);
        let mut f = facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[]);
        f.replicas = 5;
        match decide(&n, &f, "t") {
            Decision::Recover {
                survivor, fence, ..
            } => {
                assert_eq!((survivor.ordinal, fence), (2, vec![0, 1, 3, 4]));
            }
            d => panic!("{d:?}"),
        }
        // The highest applied index wins over a longer log (entries past a member's commit
        // index are dropped by the force); the longer log breaks a tie.
        let mut v = view(&[
            (0, true, 50),
            (1, false, 0),
            (2, true, 48),
            (3, false, 0),
            (4, false, 0),
        ]);
        v.members[0].raft_index = 50;
        v.members[2].raft_index = 60;
        let mut f = facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[]);
        f.replicas = 5;
        assert!(
            matches!(decide(&n, &f, "t"), Decision::Recover { survivor, .. } if survivor.ordinal == 0)
        );
        v.members[2].applied_index = 50;
        let mut f = facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[]);
        f.replicas = 5;
        assert!(
            matches!(decide(&n, &f, "t"), Decision::Recover { survivor, .. } if survivor.ordinal == 2)
        );
    }

    #[test]
    fn automatic_recovery_waits_for_the_delay_and_for_pending_pods() {
        let n = names();
        let prev = RecoveryStatus::default();
        let v = view(&[(0, true, 40), (1, false, 0), (2, false, 0)]);
        for lost in [None, Some(Duration::from_secs(299))] {
            let d = decide(
                &n,
                &facts(QuorumLossMode::Automatic, Some(&v), &prev, lost, &[]),
                "t",
            );
            assert!(
                matches!(&d, Decision::Wait(w) if w.contains("after 300s")),
                "{d:?}"
            );
        }
        let d = decide(
            &n,
            &facts(QuorumLossMode::Automatic, Some(&v), &prev, LONG, &[2]),
            "t",
        );
        assert_eq!(
            d,
            Decision::Wait(
                "the pods of demo-2 are Pending: they may come back with their data".into()
            )
        );
    }

    #[test]
    fn manual_recovery_waits_for_a_new_token_and_never_acts_twice() {
        let n = names();
        let v = view(&[(0, false, 0), (1, true, 12), (2, false, 0)]);
        let prev = RecoveryStatus::default();
        let d = decide(
            &n,
            &facts(QuorumLossMode::Manual, Some(&v), &prev, LONG, &[]),
            "t",
        );
        assert!(
            matches!(&d, Decision::Wait(w) if w.contains("cairn.dev/recover") && w.contains("demo-1")),
            "{d:?}"
        );
        // The token acts at once, Pending pods or not (whoever set it decided).
        let mut f = facts(QuorumLossMode::Manual, Some(&v), &prev, None, &[0]);
        f.requested = Some("outage-7");
        assert!(
            matches!(decide(&n, &f, "t"), Decision::Recover { token, survivor, .. } if token == "outage-7" && survivor.ordinal == 1)
        );
        // The same token again, after it was acted on: nothing.
        let done = RecoveryStatus {
            last_token: Some("outage-7".into()),
            ..RecoveryStatus::default()
        };
        f.prev = &done;
        assert!(matches!(decide(&n, &f, "t"), Decision::Wait(_)));
        // But never while a quorum answers, token or not.
        let healthy = view(&[(0, true, 9), (1, true, 12), (2, false, 0)]);
        f.view = Some(&healthy);
        f.requested = Some("outage-8");
        assert_eq!(decide(&n, &f, "t"), Decision::Quorum);
        // Nor while one is under way.
        let running = RecoveryStatus {
            in_progress: Some(crate::crd::RecoveryRun {
                token: "outage-7".into(),
                survivor: "demo-1".into(),
                survivor_id: "65".into(),
                applied_index: 12,
                highest_revision: None,
                started: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                phase: crate::crd::RecoveryPhase::Forcing,
                phase_since: None,
                fenced: None,
                stuck: false,
                from_backup: None,
                destination: None,
            }),
            ..RecoveryStatus::default()
        };
        f.prev = &running;
        f.view = Some(&v);
        f.requested = Some("outage-7");
        assert_eq!(decide(&n, &f, "t"), Decision::InProgress);
        // A new token starts a stuck one over.
        f.requested = Some("outage-8");
        assert!(
            matches!(decide(&n, &f, "t"), Decision::Recover { token, .. } if token == "outage-8")
        );
        // A value that is no token is refused, said why.
        let long = "x".repeat(64);
        for bad in ["a b", "x:y", long.as_str()] {
            f.requested = Some(bad);
            f.prev = &prev;
            assert!(
                matches!(decide(&n, &f, "t"), Decision::Wait(w) if w.contains("not a token")),
                "{bad}"
            );
        }
    }

    #[test]
    fn members_that_still_apply_entries_show_a_quorum_the_operator_cannot_reach() {
        let n = names();
        let v = view(&[(0, true, 40), (1, false, 0), (2, false, 0)]);
        let seen = RecoveryStatus {
            applied_at_loss: Some(35),
            ..RecoveryStatus::default()
        };
        let d = decide(
            &n,
            &facts(QuorumLossMode::Automatic, Some(&v), &seen, LONG, &[]),
            "t",
        );
        assert!(
            matches!(&d, Decision::Progress(w) if w.contains("applied index 40, 35")),
            "{d:?}"
        );
        let still = RecoveryStatus {
            applied_at_loss: Some(40),
            ..RecoveryStatus::default()
        };
        let d = decide(
            &n,
            &facts(QuorumLossMode::Automatic, Some(&v), &still, LONG, &[]),
            "t",
        );
        assert!(matches!(d, Decision::Recover { .. }), "{d:?}");
        // The same outage's token again (recovered already): nothing.
        let done = RecoveryStatus {
            last_token: Some("auto-5".into()),
            ..RecoveryStatus::default()
        };
        let d = decide(
            &n,
            &facts(QuorumLossMode::Automatic, Some(&v), &done, LONG, &[]),
            "auto-5",
        );
        assert!(
            matches!(&d, Decision::Wait(w) if w.contains("already")),
            "{d:?}"
        );
    }

    #[test]
    fn with_no_member_answering_only_a_verified_backup_is_restored() {
        let n = names();
        let prev = RecoveryStatus::default();
        let v = view(&[(0, false, 0), (1, false, 0), (2, false, 0)]);
        let backup = BackupRecord {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            key: "b/1.snap".into(),
            size: 1,
            revision: 9,
            sha256: "x".into(),
            keys: None,
            hash: None,
            hash_compact_revision: None,
            encryption_key_id: None,
        };
        for v in [None, Some(&v)] {
            // No verified backup: nothing, token or not.
            let mut f = facts(QuorumLossMode::Automatic, v, &prev, LONG, &[]);
            f.requested_backup = Some("x");
            assert!(
                matches!(decide(&n, &f, "t"), Decision::Wait(w) if w.contains("no verified backup"))
            );
            // Its own token restores the verified one; cairn.dev/recover never does.
            f.verified = Some(&backup);
            assert!(
                matches!(decide(&n, &f, "t"), Decision::Restore { backup: b, token } if b.key == "b/1.snap" && token == "x")
            );
            f.requested_backup = None;
            f.requested = Some("y");
            f.lost_data = &[0, 1, 2];
            f.mode = QuorumLossMode::Manual;
            assert!(
                matches!(decide(&n, &f, "t"), Decision::Wait(w) if w.contains("recover-from-backup"))
            );
            // Automatic: only once every member's pod said its data is gone, after `after`.
            f.requested = None;
            f.mode = QuorumLossMode::Automatic;
            f.lost_data = &[0, 2];
            let d = decide(&n, &f, "t");
            assert!(
                matches!(&d, Decision::Wait(w) if w.contains("demo-1 has not said")),
                "{d:?}"
            );
            f.lost_data = &[0, 1, 2];
            f.pending = &[1];
            assert!(matches!(decide(&n, &f, "t"), Decision::Wait(_)));
            f.pending = &[];
            assert!(matches!(decide(&n, &f, "t"), Decision::Restore { token, .. } if token == "t"));
            f.lost_for = Some(Duration::from_secs(5));
            assert!(matches!(decide(&n, &f, "t"), Decision::Wait(_)));
            // No replicas known: no evidence either.
            f.lost_for = LONG;
            f.replicas = 0;
            f.lost_data = &[];
            assert!(matches!(decide(&n, &f, "t"), Decision::Wait(_)));
        }
        // A survivor's recovery under way is never turned into a restore by a new token.
        let running = RecoveryStatus {
            in_progress: Some(crate::crd::RecoveryRun {
                token: "outage-7".into(),
                survivor: "demo-1".into(),
                survivor_id: "65".into(),
                applied_index: 12,
                highest_revision: None,
                started: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                phase: crate::crd::RecoveryPhase::Forcing,
                phase_since: None,
                fenced: None,
                stuck: false,
                from_backup: None,
                destination: None,
            }),
            ..RecoveryStatus::default()
        };
        let mut f = facts(QuorumLossMode::Automatic, Some(&v), &running, LONG, &[]);
        f.verified = Some(&backup);
        f.lost_data = &[0, 1, 2];
        f.requested = Some("outage-8");
        let d = decide(&n, &f, "t");
        assert!(
            matches!(&d, Decision::Wait(w) if w.contains("recover-from-backup")),
            "{d:?}"
        );
        f.requested = None;
        f.requested_backup = Some("outage-8");
        assert_eq!(decide(&n, &f, "t"), Decision::InProgress);
    }
}
