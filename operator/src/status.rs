//! What the status says: from what a reconcile observed (the member list and health) and
//! planned (the step, the operation in progress) to `EtcdClusterStatus` with its members and its
//! `Available`, `Progressing` and `Degraded` conditions. Pure, no I/O; the controller adds what
//! only it knows (backups, the restore, the disruption budget) and patches it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use std::cmp::Ordering;

use crate::crd::{condition, reason, EtcdClusterStatus, MemberStatus, Operation};
use crate::layout::Layout;
use crate::plan::{ClusterView, Step};
use crate::rollout::Roll;

/// Orders cairn releases: dotted numbers numerically (`0.10.0` after `0.9.1`), anything else
/// as text.
pub fn release_cmp(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| (p.parse().unwrap_or(u64::MAX), p.to_string()))
            .collect()
    };
    parts(a).cmp(&parts(b))
}

/// What a status is derived for, besides the observations.
pub struct Report<'a> {
    /// `metadata.generation` of the EtcdCluster.
    pub generation: Option<i64>,
    /// `spec.size`.
    pub desired: i32,
    /// `spec.paused`.
    pub paused: bool,
    pub layout: &'a dyn Layout,
    pub now: &'a Time,
}

/// The status of a cluster: `prev`'s conditions carried over (their transition times kept while
/// they hold), the members as `view` lists them (or, when nobody answers, `prev`'s members, none
/// of them healthy) with their versions, and the conditions for `step` and, once membership is
/// steady, for the rollout's `roll`.
pub fn derive(
    ctx: &Report<'_>,
    prev: &EtcdClusterStatus,
    view: Option<&ClusterView>,
    cluster_id: Option<String>,
    step: &Step,
    roll: &Roll,
    operation: Option<Operation>,
) -> EtcdClusterStatus {
    let generation = ctx.generation;
    let t = ctx.now;
    let layout = ctx.layout;
    let paused = ctx.paused;
    let mut st = EtcdClusterStatus {
        observed_generation: generation,
        cluster_id,
        operation,
        conditions: prev.conditions.clone(),
        // The controller sets these when it looks again; until then they stand.
        auth_enabled: prev.auth_enabled,
        root_secret: prev.root_secret.clone(),
        recovery: prev.recovery.clone(),
        // The highest revision ever reported: it outlives the members that reported it.
        revision: view
            .and_then(|v| v.members.iter().map(|m| m.revision).max())
            .filter(|r| *r > 0)
            .max(prev.revision),
        ..EtcdClusterStatus::default()
    };
    if let Some(v) = view {
        let mut members: Vec<(i32, MemberStatus)> = v
            .members
            .iter()
            .map(|m| {
                let ordinal = v.ordinal(layout, m);
                let name = if m.name.is_empty() {
                    ordinal.map(|o| layout.member(o)).unwrap_or_default()
                } else {
                    m.name.clone()
                };
                (
                    ordinal.unwrap_or(i32::MAX),
                    MemberStatus {
                        name,
                        id: format!("{:x}", m.id),
                        leader: v.leader == Some(m.id),
                        learner: m.learner,
                        healthy: m.healthy,
                        version: m.version.as_ref().map(|v| v.release.clone()),
                        data_format: m.version.as_ref().map(|v| v.data_format as i32),
                    },
                )
            })
            .collect();
        members.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.name.cmp(&b.1.name)));
        st.members = members.into_iter().map(|(_, m)| m).collect();
        st.size = v.voters().count() as i32;
        st.ready_members = v.members.iter().filter(|m| m.healthy).count() as i32;
        st.leader = st.members.iter().find(|m| m.leader).map(|m| m.name.clone());
    } else {
        // Nobody answers: keep the last known members, none of them healthy.
        st.size = prev.size;
        st.members = prev
            .members
            .iter()
            .map(|m| MemberStatus {
                healthy: false,
                leader: false,
                ..m.clone()
            })
            .collect();
    }

    // A member that does not answer now keeps what it said last.
    for m in st.members.iter_mut() {
        if m.version.is_none() {
            if let Some(p) = prev.members.iter().find(|p| p.id == m.id) {
                m.version = p.version.clone();
                m.data_format = p.data_format;
            }
        }
    }
    st.version = if !st.members.is_empty() && st.members.iter().all(|m| m.version.is_some()) {
        st.members
            .iter()
            .filter_map(|m| m.version.clone())
            .min_by(|a, b| release_cmp(a, b))
    } else {
        prev.version.clone()
    };
    st.data_format = st
        .members
        .iter()
        .filter_map(|m| m.data_format)
        .max()
        .or(prev.data_format);

    let has_leader = st.leader.is_some();
    let (avail_reason, avail_msg) = match (view, has_leader) {
        (_, true) => (
            "QuorumAvailable",
            format!("{} of {} members ready", st.ready_members, st.members.len()),
        ),
        (None, false) if st.cluster_id.is_none() => {
            ("Bootstrapping", "waiting for the first members".to_string())
        }
        (None, false) => ("Unreachable", "no member answers".to_string()),
        (Some(_), false) => (
            "QuorumLost",
            "members answer but there is no leader".to_string(),
        ),
    };
    st.set_condition(
        condition::AVAILABLE,
        has_leader,
        avail_reason,
        avail_msg,
        generation,
        t,
    );

    let (progressing, reason, msg) = if paused {
        (
            false,
            "Paused",
            "spec.paused is set: nothing is changed".to_string(),
        )
    } else {
        match step {
            Step::Steady => match roll {
                Roll::Steady => (false, "Steady", format!("{} voting members", st.size)),
                Roll::Restart { ordinal, .. } | Roll::Wait { ordinal } => (
                    true,
                    reason::UPGRADING,
                    format!(
                        "restarting {} into the current pod template",
                        layout.member(*ordinal)
                    ),
                ),
                Roll::Done { ordinal } => (
                    true,
                    reason::UPGRADING,
                    format!("{} is back and caught up", layout.member(*ordinal)),
                ),
                Roll::MoveLeader { .. } => (
                    true,
                    reason::UPGRADING,
                    "moving leadership away before restarting the leader".to_string(),
                ),
                Roll::Blocked { why } => (true, reason::UPGRADE_WAITING, why.clone()),
                Roll::Stalled { why, .. } => (false, reason::UPGRADE_STALLED, why.clone()),
                Roll::Refused { why } => (false, reason::UPGRADE_REFUSED, why.clone()),
            },
            Step::Bootstrap { .. } | Step::WaitBootstrap => (
                true,
                "Bootstrapping",
                "starting the first members".to_string(),
            ),
            Step::AddLearner { .. }
            | Step::Grow { .. }
            | Step::Promote { .. }
            | Step::WaitLearner { .. } => (
                true,
                "ScalingUp",
                format!("growing to {} members", ctx.desired),
            ),
            Step::MoveLeader { .. } | Step::Remove { .. } | Step::Shrink { .. } => (
                true,
                "ScalingDown",
                format!("shrinking to {} members", ctx.desired),
            ),
            Step::Replace { ordinal, .. } => (
                true,
                "MemberReplaced",
                format!("replacing {}, which lost its data", layout.member(*ordinal)),
            ),
            Step::Wipe { ordinal } => (
                true,
                "MemberReplaced",
                format!(
                    "replacing {}, which was removed from the cluster",
                    layout.member(*ordinal)
                ),
            ),
            Step::RemoveCorrupt { ordinal, .. } => (
                true,
                "MemberReplaced",
                format!(
                    "replacing {}, whose data differs from its peers'",
                    layout.member(*ordinal)
                ),
            ),
            Step::RemoveLearner { ordinal, .. } => (
                false,
                crate::plan::SCALE_UP_STALLED,
                format!(
                    "{} was not promoted within the learner deadline: removing it",
                    layout.member(*ordinal)
                ),
            ),
            Step::Refuse(r) => (false, r.reason(), r.message()),
        }
    };
    st.set_condition(
        condition::PROGRESSING,
        progressing,
        reason,
        msg,
        generation,
        t,
    );

    let unhealthy: Vec<&str> = st
        .members
        .iter()
        .filter(|m| !m.healthy)
        .map(|m| m.name.as_str())
        .collect();
    let (degraded, reason, msg) = match step {
        Step::Refuse(r) if !paused => (true, r.reason(), r.message()),
        _ if !has_leader && st.cluster_id.is_some() => {
            (true, avail_reason, "the cluster has no leader".to_string())
        }
        _ if !unhealthy.is_empty() => (
            true,
            "MembersUnhealthy",
            format!("not answering: {}", unhealthy.join(", ")),
        ),
        _ => (false, "AllHealthy", "every member answers".to_string()),
    };
    st.set_condition(condition::DEGRADED, degraded, reason, msg, generation, t);
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::OperationKind;
    use crate::layout::Names;
    use crate::plan::{ObservedMember, Refusal};

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    fn at(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    /// Members 0..n, all voters; `healthy[i]` says whether ordinal i answers (an unhealthy one
    /// has not published its name).
    fn view(healthy: &[bool], leader: Option<u64>) -> ClusterView {
        let n = names();
        ClusterView {
            cluster_id: 7,
            leader,
            // Listed out of order: the status sorts by ordinal.
            members: (0..healthy.len() as i32)
                .rev()
                .map(|o| ObservedMember {
                    id: 100 + o as u64,
                    name: if healthy[o as usize] {
                        n.member(o)
                    } else {
                        String::new()
                    },
                    peer_urls: vec![n.peer_url(o)],
                    learner: false,
                    healthy: healthy[o as usize],
                    applied_index: 0,
                    raft_index: 0,
                    revision: 0,
                    version: None,
                })
                .collect(),
        }
    }

    fn cond<'a>(st: &'a EtcdClusterStatus, t: &str) -> (&'a str, &'a str) {
        let c = st.condition(t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn report<'a>(layout: &'a Names, now: &'a Time, paused: bool) -> Report<'a> {
        Report {
            generation: Some(4),
            desired: 3,
            paused,
            layout,
            now,
        }
    }

    #[test]
    fn a_healthy_cluster_is_available_steady_and_not_degraded() {
        let (n, t) = (names(), at(1000));
        let v = view(&[true, true, true], Some(101));
        let st = derive(
            &report(&n, &t, false),
            &EtcdClusterStatus::default(),
            Some(&v),
            Some("7".into()),
            &Step::Steady,
            &Roll::Steady,
            None,
        );
        assert_eq!(st.observed_generation, Some(4));
        assert_eq!((st.size, st.ready_members), (3, 3));
        assert_eq!(st.leader.as_deref(), Some("demo-1"));
        let listed: Vec<(&str, &str, bool)> = st
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.id.as_str(), m.leader))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("demo-0", "64", false),
                ("demo-1", "65", true),
                ("demo-2", "66", false)
            ]
        );
        assert_eq!(cond(&st, condition::AVAILABLE), ("True", "QuorumAvailable"));
        assert_eq!(cond(&st, condition::PROGRESSING), ("False", "Steady"));
        assert_eq!(cond(&st, condition::DEGRADED), ("False", "AllHealthy"));
    }

    #[test]
    fn a_member_that_does_not_answer_is_named_by_its_ordinal_and_degrades() {
        let (n, t) = (names(), at(1000));
        let v = view(&[true, true, false], Some(100));
        let st = derive(
            &report(&n, &t, false),
            &EtcdClusterStatus::default(),
            Some(&v),
            Some("7".into()),
            &Step::Steady,
            &Roll::Steady,
            None,
        );
        assert_eq!(st.members[2].name, "demo-2");
        assert!(!st.members[2].healthy);
        assert_eq!((st.size, st.ready_members), (3, 2));
        let d = st.condition(condition::DEGRADED).unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "MembersUnhealthy")
        );
        assert_eq!(d.message, "not answering: demo-2");
    }

    #[test]
    fn nobody_answering_keeps_the_last_members_unhealthy() {
        let (n, t0, t1) = (names(), at(1000), at(2000));
        let v = view(&[true, true, true], Some(100));
        let before = derive(
            &report(&n, &t0, false),
            &EtcdClusterStatus::default(),
            Some(&v),
            Some("7".into()),
            &Step::Steady,
            &Roll::Steady,
            None,
        );
        let st = derive(
            &report(&n, &t1, false),
            &before,
            None,
            Some("7".into()),
            &Step::Refuse(Refusal::Unreachable),
            &Roll::Steady,
            None,
        );
        assert_eq!(st.size, 3);
        assert_eq!(st.members.len(), 3);
        assert!(st.members.iter().all(|m| !m.healthy && !m.leader));
        assert_eq!(st.leader, None);
        assert_eq!(cond(&st, condition::AVAILABLE), ("False", "Unreachable"));
        assert_eq!(cond(&st, condition::DEGRADED), ("True", "Unreachable"));
        // The conditions changed now.
        assert_eq!(
            st.condition(condition::AVAILABLE)
                .unwrap()
                .last_transition_time,
            t1
        );
        // Before the first bootstrap, nobody answering is no failure.
        let st = derive(
            &report(&n, &t1, false),
            &EtcdClusterStatus::default(),
            None,
            None,
            &Step::WaitBootstrap,
            &Roll::Steady,
            None,
        );
        assert_eq!(cond(&st, condition::AVAILABLE), ("False", "Bootstrapping"));
        assert_eq!(cond(&st, condition::PROGRESSING), ("True", "Bootstrapping"));
        assert_eq!(cond(&st, condition::DEGRADED), ("False", "AllHealthy"));
    }

    #[test]
    fn steps_say_what_is_in_progress_and_refusals_degrade_unless_paused() {
        let (n, t) = (names(), at(1000));
        let v = view(&[true, true, true], Some(100));
        let op = Operation {
            kind: OperationKind::ScaleUp,
            member: "demo-3".into(),
            target_size: 5,
            started_at: t.clone(),
            member_id: None,
            revision: None,
            pod_uid: None,
        };
        let cases = [
            (Step::AddLearner { ordinal: 3 }, "True", "ScalingUp"),
            (
                Step::Remove {
                    id: 102,
                    ordinal: 2,
                },
                "True",
                "ScalingDown",
            ),
            (
                Step::Replace {
                    id: 101,
                    ordinal: 1,
                },
                "True",
                "MemberReplaced",
            ),
            (
                Step::Refuse(Refusal::WouldLoseQuorum {
                    healthy_after: 1,
                    needed: 2,
                }),
                "False",
                "WouldLoseQuorum",
            ),
        ];
        for (step, progressing, reason) in cases {
            let st = derive(
                &report(&n, &t, false),
                &EtcdClusterStatus::default(),
                Some(&v),
                Some("7".into()),
                &step,
                &Roll::Steady,
                Some(op.clone()),
            );
            assert_eq!(
                cond(&st, condition::PROGRESSING),
                (progressing, reason),
                "{step:?}"
            );
            assert_eq!(st.operation.as_ref(), Some(&op));
            let degraded = matches!(step, Step::Refuse(_));
            assert_eq!(
                cond(&st, condition::DEGRADED).0,
                if degraded { "True" } else { "False" },
                "{step:?}"
            );
        }
        let st = derive(
            &report(&n, &t, true),
            &EtcdClusterStatus::default(),
            Some(&v),
            Some("7".into()),
            &Step::Refuse(Refusal::NoLeader),
            &Roll::Steady,
            None,
        );
        assert_eq!(cond(&st, condition::PROGRESSING), ("False", "Paused"));
        assert_eq!(cond(&st, condition::DEGRADED), ("False", "AllHealthy"));
    }

    #[test]
    fn versions_are_the_lowest_release_and_newest_format_and_rollouts_are_reported() {
        use crate::plan::MemberVersion;
        let (n, t) = (names(), at(1000));
        let mut v = view(&[true, true, true], Some(100));
        let release = |r: &str, f| {
            Some(MemberVersion {
                release: r.into(),
                data_format: f,
            })
        };
        // Listed from ordinal 2 down.
        v.members[0].version = release("0.10.0", 2);
        v.members[1].version = release("0.9.1", 2);
        v.members[2].version = release("0.10.0", 2);
        let first = derive(
            &report(&n, &t, false),
            &EtcdClusterStatus::default(),
            Some(&v),
            Some("7".into()),
            &Step::Steady,
            &Roll::Wait { ordinal: 2 },
            None,
        );
        assert_eq!(first.version.as_deref(), Some("0.9.1"));
        assert_eq!(first.data_format, Some(2));
        assert_eq!(first.members[1].version.as_deref(), Some("0.9.1"));
        assert_eq!(
            cond(&first, condition::PROGRESSING),
            ("True", reason::UPGRADING)
        );
        // demo-1 stops answering: it keeps what it said.
        v.members[1].version = None;
        v.members[1].healthy = false;
        let st = derive(
            &report(&n, &t, false),
            &first,
            Some(&v),
            Some("7".into()),
            &Step::Steady,
            &Roll::Stalled {
                ordinal: 1,
                why: "demo-1 does not answer 301s after its restart".into(),
            },
            None,
        );
        assert_eq!(st.members[1].version.as_deref(), Some("0.9.1"));
        assert_eq!(st.version.as_deref(), Some("0.9.1"));
        let p = st.condition(condition::PROGRESSING).unwrap();
        assert_eq!(
            (p.status.as_str(), p.reason.as_str(), p.message.as_str()),
            (
                "False",
                reason::UPGRADE_STALLED,
                "demo-1 does not answer 301s after its restart"
            )
        );
        for (roll, want) in [
            (
                Roll::Blocked { why: "x".into() },
                ("True", reason::UPGRADE_WAITING),
            ),
            (
                Roll::Refused { why: "y".into() },
                ("False", reason::UPGRADE_REFUSED),
            ),
            (
                Roll::MoveLeader { from: 1, to: 2 },
                ("True", reason::UPGRADING),
            ),
        ] {
            let st = derive(
                &report(&n, &t, false),
                &first,
                Some(&v),
                Some("7".into()),
                &Step::Steady,
                &roll,
                None,
            );
            assert_eq!(cond(&st, condition::PROGRESSING), want, "{roll:?}");
        }
        // A membership step wins over the rollout.
        let st = derive(
            &report(&n, &t, false),
            &first,
            Some(&v),
            Some("7".into()),
            &Step::AddLearner { ordinal: 3 },
            &Roll::Wait { ordinal: 2 },
            None,
        );
        assert_eq!(cond(&st, condition::PROGRESSING), ("True", "ScalingUp"));
    }

    #[test]
    fn releases_order_by_number() {
        assert_eq!(release_cmp("0.10.0", "0.9.1"), Ordering::Greater);
        assert_eq!(release_cmp("v0.2.0", "0.2.0"), Ordering::Equal);
        assert_eq!(release_cmp("0.1.0", "0.2.0"), Ordering::Less);
    }
}
