//! What the status says: from what a reconcile observed (the member list and health) and
//! planned (the step, the operation in progress) to `EtcdClusterStatus` with its members and its
//! `Available`, `Progressing` and `Degraded` conditions. Pure, no I/O; the controller adds what
//! only it knows (backups, the restore, the disruption budget) and patches it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{condition, EtcdClusterStatus, MemberStatus, Operation};
use crate::layout::Layout;
use crate::plan::{ClusterView, Step};

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
/// of them healthy), and the conditions for `step`.
pub fn derive(
    ctx: &Report<'_>,
    prev: &EtcdClusterStatus,
    view: Option<&ClusterView>,
    cluster_id: Option<String>,
    step: &Step,
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
            Step::Steady => (false, "Steady", format!("{} voting members", st.size)),
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
            None,
        );
        let st = derive(
            &report(&n, &t1, false),
            &before,
            None,
            Some("7".into()),
            &Step::Refuse(Refusal::Unreachable),
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
            None,
        );
        assert_eq!(cond(&st, condition::PROGRESSING), ("False", "Paused"));
        assert_eq!(cond(&st, condition::DEGRADED), ("False", "AllHealthy"));
    }
}
