//! The membership planner: from what the controller observed (the cluster's member list and
//! health, the StatefulSet's replicas, members that lost their data) to the one next step. Pure
//! logic, no I/O, so every rule below is unit-tested.
//!
//! The rules, in order:
//! - The member list, never the pods, says how big the cluster is: a pod that is gone for a while
//!   changes nothing (etcd-io/etcd-operator#193 shrank clusters on pod loss).
//! - A member whose pod lost its data is replaced (removed, then added again as a learner with the
//!   same peer URL), or it would refuse to start forever. A pod whose member was removed from the
//!   cluster holds data that can never serve again: its volume and pod are deleted, and the
//!   ordinal joins again as a new member. Both go by the member ID the pod names, so a message
//!   left from before a replacement is never acted on twice.
//! - A cluster that starts from a backup bootstraps its first member alone (restored from the
//!   backup); the others join as learners, as in a scale-up.
//! - One step at a time, one learner at a time: a learner is promoted before anything else
//!   happens; it is added before its pod exists, and its pod starts with `existing`. A learner
//!   not promoted within `spec.scaling.learnerDeadline` (its pod never scheduled, or it cannot
//!   catch up) is removed, and the next is added only once the deadline has passed again.
//! - The StatefulSet only ever grows to cover a member in the list and only shrinks after the
//!   highest member was removed from the list; the removed member's volume is deleted then.
//! - Shrinking removes the highest ordinal, after moving leadership away from it, and only when
//!   the healthy voters left still form a quorum; otherwise the step is refused.

use std::time::Duration;

use crate::layout::Layout;
use crate::resources::Bootstrap;

/// The reason (Progressing condition, Event) when a learner missed its deadline.
pub const SCALE_UP_STALLED: &str = "ScaleUpStalled";

/// One member as observed through the etcd API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedMember {
    pub id: u64,
    /// Empty until the member started and published its name.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub learner: bool,
    /// Answered its Status RPC.
    pub healthy: bool,
    /// Its applied index, from Status (0 when it did not answer).
    pub applied_index: u64,
    /// The index of its last log entry, from Status (the leader's is the cluster's head).
    pub raft_index: u64,
    /// The revision its Status header carried (0 when it did not answer).
    pub revision: i64,
    /// What its `/version` says of cairn, if it answered.
    pub version: Option<MemberVersion>,
}

/// A member's cairn release and data format, from its `/version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberVersion {
    pub release: String,
    pub data_format: u32,
}

impl MemberVersion {
    /// From a `/version` body. cairn 0.1.0, the only release before these fields existed,
    /// says neither: a body without them is that release, data format 1.
    pub fn parse(body: &str) -> Option<MemberVersion> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v.get("etcdserver")?;
        let release = v
            .get("cairnserver")
            .and_then(|r| r.as_str())
            .unwrap_or("0.1.0")
            .to_string();
        let data_format = v
            .get("cairndataformat")
            .and_then(|f| f.as_str())
            .map_or(Some(1), |f| f.parse().ok())?;
        Some(MemberVersion {
            release,
            data_format,
        })
    }
}

/// The cluster as observed through the etcd API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster_id: u64,
    /// ID of the leader, if any member knows one.
    pub leader: Option<u64>,
    pub members: Vec<ObservedMember>,
}

impl ClusterView {
    /// The ordinal of a member of this cluster: by peer URL (set from the moment it is added),
    /// else by name.
    pub fn ordinal(&self, names: &dyn Layout, m: &ObservedMember) -> Option<i32> {
        m.peer_urls
            .iter()
            .find_map(|url| names.ordinal_of_peer_url(url))
            .or_else(|| names.ordinal(&m.name))
    }

    pub fn voters(&self) -> impl Iterator<Item = &ObservedMember> {
        self.members.iter().filter(|m| !m.learner)
    }

    pub fn by_ordinal(&self, names: &dyn Layout, ordinal: i32) -> Option<&ObservedMember> {
        self.members
            .iter()
            .find(|m| self.ordinal(names, m) == Some(ordinal))
    }

    /// Highest ordinal of a member in the list.
    pub fn max_ordinal(&self, names: &dyn Layout) -> Option<i32> {
        self.members
            .iter()
            .filter_map(|m| self.ordinal(names, m))
            .max()
    }
}

/// What cairn (like etcd) says when a member whose data directory was lost tries to start again
/// under its old member ID: `member <id> has already been bootstrapped`. It then exits;
/// Kubernetes keeps the end of its log as the container's termination message.
pub const LOST_DATA_MESSAGE: &str = "has already been bootstrapped";

/// What cairn says, and exits non-zero with, when its member was removed from the cluster:
/// `member <id>: the member has been permanently removed from the cluster` (etcd's text after
/// the ID).
pub const REMOVED_MESSAGE: &str = ": the member has been permanently removed from the cluster";

/// What cairn says, and exits with, when `--experimental-initial-corrupt-check` finds its data
/// different from a peer's: `member <id> found data inconsistency with peers: ...`.
pub const INCONSISTENT_MESSAGE: &str = " found data inconsistency with peers";

/// Why a member pod's data cannot serve, as its termination message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// Its volume was lost: the member `id` it was must be replaced.
    LostData { id: u64 },
    /// Its member `id` was removed from the cluster: its data can never serve again.
    Removed { id: u64 },
    /// Its data differs from its peers' (the initial corruption check): member `id` must be
    /// removed and join again with an empty volume.
    Inconsistent { id: u64 },
}

/// What a termination message says about the member's data, if anything (the last such line).
pub fn unusable(termination_message: &str) -> Option<Unusable> {
    termination_message.lines().rev().find_map(|line| {
        let (before, kind) = if let Some(i) = line.find(LOST_DATA_MESSAGE) {
            (&line[..i], 0)
        } else if let Some(i) = line.find(REMOVED_MESSAGE) {
            (&line[..i], 1)
        } else if let Some(i) = line.find(INCONSISTENT_MESSAGE) {
            (&line[..i], 2)
        } else {
            return None;
        };
        let id = before.trim_end().rsplit("member ").next()?.trim();
        let id = u64::from_str_radix(id, 16).ok()?;
        Some(match kind {
            0 => Unusable::LostData { id },
            1 => Unusable::Removed { id },
            _ => Unusable::Inconsistent { id },
        })
    })
}

/// Whether a member's termination message says it lost its data.
pub fn reports_lost_data(termination_message: &str) -> bool {
    matches!(
        unusable(termination_message),
        Some(Unusable::LostData { .. })
    )
}

/// Majority of `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// What the controller saw this round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `spec.replicas` of the StatefulSet, `None` if it does not exist.
    pub statefulset_replicas: Option<i32>,
    /// The member list and health; `None` when no member could be reached.
    pub view: Option<ClusterView>,
    /// Ordinals whose pod reported that its data cannot serve, and why.
    pub unusable: Vec<(i32, Unusable)>,
    /// The cluster starts from a backup (`spec.bootstrap.fromBackup`).
    pub from_backup: bool,
    /// The learner deadline and how long the learner in flight has had.
    pub learner_clock: LearnerClock,
    /// Members with a CORRUPT alarm (their data differs from the leader's).
    pub corrupt: Vec<u64>,
}

/// What [`next_step`] needs to hold learners to `spec.scaling.learnerDeadline`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnerClock {
    /// The deadline; `None`: none.
    pub deadline: Option<Duration>,
    /// How long ago the step that added the learner in flight started.
    pub in_flight_for: Option<Duration>,
    /// How long ago a learner was last removed for missing its deadline.
    pub stalled_for: Option<Duration>,
}

/// Why a step is not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No member answered.
    Unreachable,
    /// Members answered but there is no leader.
    NoLeader,
    /// A leader answers, but fewer voters than a quorum do.
    NoQuorum {
        answering: usize,
        voters: usize,
        needed: usize,
    },
    /// Removing the member would leave fewer healthy voters than a quorum.
    WouldLoseQuorum { healthy_after: usize, needed: usize },
    /// The last learner missed its deadline and was removed: the next one is added once the
    /// deadline has passed again.
    ScaleUpStalled {
        deadline: Duration,
        retry_in: Duration,
    },
}

impl Refusal {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unreachable => "Unreachable",
            Refusal::NoLeader | Refusal::NoQuorum { .. } => "QuorumLost",
            Refusal::WouldLoseQuorum { .. } => "WouldLoseQuorum",
            Refusal::ScaleUpStalled { .. } => SCALE_UP_STALLED,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Unreachable => "no member of the cluster answers".to_string(),
            Refusal::NoLeader => "the cluster has no leader (quorum lost?)".to_string(),
            Refusal::NoQuorum {
                answering,
                voters,
                needed,
            } => format!(
                "{answering} of {voters} voters answer where {needed} are needed for quorum: no membership change until a quorum answers"
            ),
            Refusal::WouldLoseQuorum {
                healthy_after,
                needed,
            } => format!(
                "removing a member now would leave {healthy_after} healthy voters where {needed} are needed for quorum"
            ),
            Refusal::ScaleUpStalled { deadline, retry_in } => format!(
                "the last learner did not catch up within {}s and was removed; the next is added in {}s",
                deadline.as_secs(),
                retry_in.as_secs().max(1)
            ),
        }
    }
}

/// The next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the StatefulSet for the first members, started together with `new`.
    Bootstrap { replicas: i32 },
    /// Nothing to do until members answer (the first bootstrap is under way).
    WaitBootstrap,
    /// Remove the member that lost its data, then add it again as a learner.
    Replace { id: u64, ordinal: i32 },
    /// Delete the volume and pod of `ordinal`, whose member was removed from the cluster: the
    /// data can never serve again; the ordinal then joins as a new member.
    Wipe { ordinal: i32 },
    /// Grow the StatefulSet so the listed member `ordinal` gets its pod.
    Grow { replicas: i32 },
    /// Promote a learner.
    Promote { id: u64, ordinal: i32 },
    /// The learner's pod is not serving yet.
    WaitLearner { ordinal: i32 },
    /// The learner has not caught up within the deadline: remove it (the scale-up stalled).
    RemoveLearner { id: u64, ordinal: i32 },
    /// The member's data differs from its peers' (a CORRUPT alarm, or the initial check):
    /// remove it and disarm its alarm; its pod then stops, is wiped and joins again.
    RemoveCorrupt { id: u64, ordinal: i32 },
    /// Shrink the StatefulSet to `replicas` and delete the volumes of the ordinals above it.
    Shrink {
        replicas: i32,
        delete_volumes: Vec<i32>,
    },
    /// Add a learner for the next ordinal (its pod comes with the following Grow).
    AddLearner { ordinal: i32 },
    /// Move leadership away from the member about to be removed.
    MoveLeader { from: u64, to: u64 },
    /// Remove the highest member from the list.
    Remove { id: u64, ordinal: i32 },
    /// A step is needed but unsafe now.
    Refuse(Refusal),
    /// Size reached, nothing to do.
    Steady,
}

/// What a member starting now reads from the bootstrap ConfigMap. Before the first bootstrap
/// succeeded: `new` with the `initial` first ordinals. After it: `existing` with every member in
/// the list (a learner just added included), so a member that starts later joins.
pub fn bootstrap(names: &dyn Layout, initial: i32, view: Option<&ClusterView>) -> Bootstrap {
    match view {
        None => Bootstrap {
            initial_cluster: names.initial_cluster(&(0..initial).collect::<Vec<_>>()),
            new_cluster: true,
        },
        Some(view) => {
            let mut ordinals: Vec<i32> = view
                .members
                .iter()
                .filter_map(|m| view.ordinal(names, m))
                .collect();
            ordinals.sort_unstable();
            ordinals.dedup();
            Bootstrap {
                initial_cluster: names.initial_cluster(&ordinals),
                new_cluster: false,
            }
        }
    }
}

/// The next membership step towards `desired` voters.
pub fn next_step(names: &dyn Layout, desired: i32, bootstrapped: bool, obs: &Observed) -> Step {
    let Some(replicas) = obs.statefulset_replicas else {
        // A bootstrapped cluster is never bootstrapped again: a StatefulSet made for a size
        // other than the member list's would adopt its pods and shrink them away (with their
        // volumes). The controller makes it again for the listed members when it knows them.
        if bootstrapped {
            return Step::Refuse(Refusal::Unreachable);
        }
        // From a backup the first member alone starts, restored; the others join as learners.
        let replicas = if obs.from_backup { 1 } else { desired };
        return Step::Bootstrap { replicas };
    };
    let Some(view) = &obs.view else {
        return if bootstrapped {
            Step::Refuse(Refusal::Unreachable)
        } else {
            Step::WaitBootstrap
        };
    };
    if view.leader.is_none() {
        return Step::Refuse(Refusal::NoLeader);
    }
    // A member can still call itself leader while a majority of the voters does not answer
    // (until it hears of a newer term): no membership change can commit then (etcd refuses it
    // as `unhealthy cluster`), and the quorum-loss recovery decides what happens.
    let voters = view.voters().count();
    let answering = view.voters().filter(|m| m.healthy).count();
    if voters > 0 && answering < quorum(voters) {
        return Step::Refuse(Refusal::NoQuorum {
            answering,
            voters,
            needed: quorum(voters),
        });
    }

    // A member whose data cannot serve: deal with it first. Only for the member ID the pod
    // names: a message from before a replacement names the replaced ID.
    let top = view.max_ordinal(names).map_or(0, |o| o + 1);
    for &(ordinal, why) in &obs.unusable {
        match why {
            Unusable::LostData { id } => {
                if view.by_ordinal(names, ordinal).is_some_and(|m| m.id == id) {
                    return Step::Replace { id, ordinal };
                }
            }
            Unusable::Inconsistent { .. } => {}
            // Above the listed members it is a removal for a shrink, which deletes the volume.
            Unusable::Removed { id } => {
                if ordinal < top && ordinal < replicas && !view.members.iter().any(|m| m.id == id) {
                    return Step::Wipe { ordinal };
                }
            }
        }
    }

    // A member whose data differs from its peers': out of the cluster (the leader moved away
    // first), as long as the others keep a quorum; it then joins again with an empty volume.
    let inconsistent = obs.unusable.iter().filter_map(|&(ordinal, why)| match why {
        Unusable::Inconsistent { id } => view
            .by_ordinal(names, ordinal)
            .filter(|m| m.id == id)
            .map(|m| m.id),
        _ => None,
    });
    let corrupt: Vec<u64> = obs.corrupt.iter().copied().chain(inconsistent).collect();
    if let Some(bad) = view.members.iter().find(|m| corrupt.contains(&m.id)) {
        if let Some(ordinal) = view.ordinal(names, bad) {
            if !bad.learner {
                let voters = view.voters().count();
                let healthy_after = view
                    .voters()
                    .filter(|m| m.id != bad.id && m.healthy && !corrupt.contains(&m.id))
                    .count();
                let needed = quorum(voters.saturating_sub(1).max(1));
                if healthy_after < needed {
                    return Step::Refuse(Refusal::WouldLoseQuorum {
                        healthy_after,
                        needed,
                    });
                }
                if view.leader == Some(bad.id) {
                    if let Some(to) = view
                        .voters()
                        .filter(|m| m.id != bad.id && m.healthy && !corrupt.contains(&m.id))
                        .min_by_key(|m| view.ordinal(names, m).unwrap_or(i32::MAX))
                    {
                        return Step::MoveLeader {
                            from: bad.id,
                            to: to.id,
                        };
                    }
                }
            }
            return Step::RemoveCorrupt {
                id: bad.id,
                ordinal,
            };
        }
    }

    // The learner in flight: give it a pod, then promote it.
    if let Some(l) = view.members.iter().find(|m| m.learner) {
        if let Some(ordinal) = view.ordinal(names, l) {
            if replicas <= ordinal {
                return Step::Grow {
                    replicas: ordinal + 1,
                };
            }
            // Past the deadline a learner that answers is still tried for promotion (the
            // controller removes it when the promotion is refused as not caught up); one that
            // does not answer is removed.
            let clock = &obs.learner_clock;
            if let (Some(deadline), Some(age)) = (clock.deadline, clock.in_flight_for) {
                if age > deadline && !l.healthy {
                    return Step::RemoveLearner { id: l.id, ordinal };
                }
            }
            return if l.healthy {
                Step::Promote { id: l.id, ordinal }
            } else {
                Step::WaitLearner { ordinal }
            };
        }
    }

    // Pods above the highest listed member were removed from the cluster: shrink.
    if replicas > top {
        return Step::Shrink {
            replicas: top,
            delete_volumes: (top..replicas).collect(),
        };
    }
    // Listed members without pods (a grow that did not happen yet).
    if replicas < top {
        return Step::Grow { replicas: top };
    }

    let voters = view.voters().count() as i32;
    if voters < desired {
        let clock = &obs.learner_clock;
        if let (Some(deadline), Some(since)) = (clock.deadline, clock.stalled_for) {
            if since < deadline {
                return Step::Refuse(Refusal::ScaleUpStalled {
                    deadline,
                    retry_in: deadline - since,
                });
            }
        }
        // Fill a hole first (a replaced member whose re-add did not happen), else the next one.
        let ordinal = (0..top)
            .find(|o| view.by_ordinal(names, *o).is_none())
            .unwrap_or(top);
        return Step::AddLearner { ordinal };
    }
    if voters > desired {
        let Some((victim, ordinal)) = view
            .voters()
            .filter_map(|m| view.ordinal(names, m).map(|o| (m, o)))
            .max_by_key(|(_, o)| *o)
        else {
            return Step::Steady;
        };
        let healthy_after = view
            .voters()
            .filter(|m| m.id != victim.id && m.healthy)
            .count();
        let needed = quorum(voters as usize - 1);
        if healthy_after < needed {
            return Step::Refuse(Refusal::WouldLoseQuorum {
                healthy_after,
                needed,
            });
        }
        if view.leader == Some(victim.id) {
            let to = view
                .voters()
                .filter(|m| m.id != victim.id && m.healthy)
                .min_by_key(|m| view.ordinal(names, m).unwrap_or(i32::MAX))
                .map(|m| m.id);
            if let Some(to) = to {
                return Step::MoveLeader {
                    from: victim.id,
                    to,
                };
            }
        }
        return Step::Remove {
            id: victim.id,
            ordinal,
        };
    }
    Step::Steady
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Names;

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    /// A member per ordinal: (ordinal, learner, healthy).
    fn view(members: &[(i32, bool, bool)], leader: Option<i32>) -> ClusterView {
        let n = names();
        ClusterView {
            cluster_id: 7,
            leader: leader.map(|o| 100 + o as u64),
            members: members
                .iter()
                .map(|&(o, learner, healthy)| ObservedMember {
                    id: 100 + o as u64,
                    name: if healthy { n.member(o) } else { String::new() },
                    peer_urls: vec![n.peer_url(o)],
                    learner,
                    healthy,
                    applied_index: 0,
                    raft_index: 0,
                    revision: 0,
                    version: None,
                })
                .collect(),
        }
    }

    fn obs(replicas: i32, v: ClusterView) -> Observed {
        Observed {
            statefulset_replicas: Some(replicas),
            view: Some(v),
            ..Observed::default()
        }
    }

    fn healthy(n: i32) -> Vec<(i32, bool, bool)> {
        (0..n).map(|o| (o, false, true)).collect()
    }

    #[test]
    fn ordinals_come_from_peer_urls_even_without_names() {
        let n = names();
        let v = view(&[(0, false, true), (3, true, false)], Some(0));
        assert_eq!(v.ordinal(&n, &v.members[1]), Some(3));
        let foreign = ObservedMember {
            id: 1,
            name: String::new(),
            peer_urls: vec!["http://demo-1.elsewhere:2380".into()],
            learner: false,
            healthy: true,
            applied_index: 0,
            raft_index: 0,
            revision: 0,
            version: None,
        };
        assert_eq!(v.ordinal(&n, &foreign), None);
    }

    #[test]
    fn versions_are_read_from_version_bodies() {
        let v = MemberVersion::parse(
            r#"{"etcdserver":"3.5.13","etcdcluster":"3.5.0","cairnserver":"0.2.0","cairndataformat":"2"}"#,
        );
        assert_eq!(
            v,
            Some(MemberVersion {
                release: "0.2.0".into(),
                data_format: 2
            })
        );
        // cairn 0.1.0 said only etcd's fields.
        let v = MemberVersion::parse(r#"{"etcdserver":"3.5.13","etcdcluster":"3.5.0"}"#);
        assert_eq!(
            v,
            Some(MemberVersion {
                release: "0.1.0".into(),
                data_format: 1
            })
        );
        for bad in [
            "",
            "404 page not found",
            "{}",
            r#"{"etcdserver":"3","cairndataformat":"x"}"#,
        ] {
            assert_eq!(MemberVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_bootstrapped_cluster_without_statefulset_is_never_bootstrapped_again() {
        for from_backup in [false, true] {
            let o = Observed {
                from_backup,
                ..Observed::default()
            };
            assert_eq!(
                next_step(&names(), 3, true, &o),
                Step::Refuse(Refusal::Unreachable)
            );
        }
    }

    #[test]
    fn bootstrap_when_there_is_no_statefulset() {
        let o = Observed::default();
        assert_eq!(
            next_step(&names(), 3, false, &o),
            Step::Bootstrap { replicas: 3 }
        );
        // From a backup, the first member alone; the others join later as learners.
        let o = Observed {
            from_backup: true,
            ..Observed::default()
        };
        assert_eq!(
            next_step(&names(), 3, false, &o),
            Step::Bootstrap { replicas: 1 }
        );
        let restored = Observed {
            from_backup: true,
            ..obs(1, view(&healthy(1), Some(0)))
        };
        assert_eq!(
            next_step(&names(), 3, true, &restored),
            Step::AddLearner { ordinal: 1 }
        );
    }

    #[test]
    fn a_learner_past_its_deadline_is_removed_and_the_next_waits_a_deadline() {
        let minutes = |m: u64| Some(Duration::from_secs(m * 60));
        let with_learner = |in_flight_for, healthy| Observed {
            learner_clock: LearnerClock {
                deadline: minutes(10),
                in_flight_for,
                stalled_for: None,
            },
            ..obs(
                4,
                view(
                    &[
                        (0, false, true),
                        (1, false, true),
                        (2, false, true),
                        (3, true, healthy),
                    ],
                    Some(0),
                ),
            )
        };
        // Within the deadline: wait for it, or promote it.
        assert_eq!(
            next_step(&names(), 4, true, &with_learner(minutes(9), false)),
            Step::WaitLearner { ordinal: 3 }
        );
        assert_eq!(
            next_step(&names(), 4, true, &with_learner(minutes(9), true)),
            Step::Promote {
                id: 103,
                ordinal: 3
            }
        );
        // Past it: removed when it does not answer (its pod never started, or it hangs); one
        // that answers is still tried for promotion (removed by the controller when refused).
        assert_eq!(
            next_step(&names(), 4, true, &with_learner(minutes(11), false)),
            Step::RemoveLearner {
                id: 103,
                ordinal: 3
            }
        );
        assert_eq!(
            next_step(&names(), 4, true, &with_learner(minutes(11), true)),
            Step::Promote {
                id: 103,
                ordinal: 3
            }
        );
        // No deadline, or no record of when it was added: no removal.
        let mut o = with_learner(minutes(11), false);
        o.learner_clock.deadline = None;
        assert_eq!(
            next_step(&names(), 4, true, &o),
            Step::WaitLearner { ordinal: 3 }
        );
        assert_eq!(
            next_step(&names(), 4, true, &with_learner(None, false)),
            Step::WaitLearner { ordinal: 3 }
        );
        // Removed: its pod and volume go, then the next learner waits out a deadline.
        let removed = |stalled_for| Observed {
            learner_clock: LearnerClock {
                deadline: minutes(10),
                in_flight_for: None,
                stalled_for,
            },
            ..obs(3, view(&healthy(3), Some(0)))
        };
        assert_eq!(
            next_step(&names(), 4, true, &removed(minutes(4))),
            Step::Refuse(Refusal::ScaleUpStalled {
                deadline: Duration::from_secs(600),
                retry_in: Duration::from_secs(360)
            })
        );
        assert_eq!(
            next_step(&names(), 4, true, &removed(minutes(11))),
            Step::AddLearner { ordinal: 3 }
        );
        // A stall does not hold anything else back.
        assert_eq!(
            next_step(&names(), 3, true, &removed(minutes(4))),
            Step::Steady
        );
        assert_eq!(
            Refusal::ScaleUpStalled {
                deadline: Duration::from_secs(600),
                retry_in: Duration::from_secs(360)
            }
            .message(),
            "the last learner did not catch up within 600s and was removed; the next is added in 360s"
        );
    }

    #[test]
    fn a_member_whose_data_differs_is_removed_leader_moved_first_quorum_kept() {
        // A CORRUPT alarm on a follower: removed.
        let o = Observed {
            corrupt: vec![102],
            ..obs(3, view(&healthy(3), Some(0)))
        };
        assert_eq!(
            next_step(&names(), 3, true, &o),
            Step::RemoveCorrupt {
                id: 102,
                ordinal: 2
            }
        );
        // On the leader: leadership moves to a consistent member first.
        let o = Observed {
            corrupt: vec![100],
            ..obs(3, view(&healthy(3), Some(0)))
        };
        assert_eq!(
            next_step(&names(), 3, true, &o),
            Step::MoveLeader { from: 100, to: 101 }
        );
        // The initial check's exit, for the member the pod names.
        let o = Observed {
            unusable: vec![(1, Unusable::Inconsistent { id: 101 })],
            ..obs(3, view(&healthy(3), Some(0)))
        };
        assert_eq!(
            next_step(&names(), 3, true, &o),
            Step::RemoveCorrupt {
                id: 101,
                ordinal: 1
            }
        );
        // A message from before a replacement names another ID: nothing.
        let o = Observed {
            unusable: vec![(1, Unusable::Inconsistent { id: 77 })],
            ..obs(3, view(&healthy(3), Some(0)))
        };
        assert_eq!(next_step(&names(), 3, true, &o), Step::Steady);
        // Not when the others would not keep a quorum.
        let o = Observed {
            corrupt: vec![102],
            ..obs(
                3,
                view(
                    &[(0, false, true), (1, false, false), (2, false, true)],
                    Some(0),
                ),
            )
        };
        assert_eq!(
            next_step(&names(), 3, true, &o),
            Step::Refuse(Refusal::WouldLoseQuorum {
                healthy_after: 1,
                needed: 2
            })
        );
        assert_eq!(
            unusable("cairn: member 9c819950b72cd2e2 found data inconsistency with peers: member 1 has hash 2"),
            Some(Unusable::Inconsistent { id: 0x9c819950b72cd2e2 })
        );
    }

    #[test]
    fn unreachable_waits_during_bootstrap_and_refuses_after() {
        let o = Observed {
            statefulset_replicas: Some(3),
            view: None,
            ..Observed::default()
        };
        assert_eq!(next_step(&names(), 3, false, &o), Step::WaitBootstrap);
        assert_eq!(
            next_step(&names(), 5, true, &o),
            Step::Refuse(Refusal::Unreachable)
        );
        let o = obs(3, view(&healthy(3), None));
        assert_eq!(
            next_step(&names(), 5, true, &o),
            Step::Refuse(Refusal::NoLeader)
        );
    }

    #[test]
    fn steady_at_size() {
        assert_eq!(
            next_step(&names(), 3, true, &obs(3, view(&healthy(3), Some(1)))),
            Step::Steady
        );
    }

    #[test]
    fn transient_pod_loss_changes_nothing() {
        // One member down (pod gone): no shrink, no re-add, no replace.
        let v = view(
            &[(0, false, true), (1, false, false), (2, false, true)],
            Some(0),
        );
        assert_eq!(next_step(&names(), 3, true, &obs(3, v)), Step::Steady);
        // Two: the quorum is gone, the step refused (and still nothing changes).
        let v = view(
            &[(0, false, true), (1, false, false), (2, false, false)],
            Some(0),
        );
        assert_eq!(
            next_step(&names(), 3, true, &obs(3, v)),
            Step::Refuse(Refusal::NoQuorum {
                answering: 1,
                voters: 3,
                needed: 2
            })
        );
    }

    #[test]
    fn scale_up_adds_a_learner_grows_then_promotes() {
        let n = names();
        assert_eq!(
            next_step(&n, 5, true, &obs(3, view(&healthy(3), Some(0)))),
            Step::AddLearner { ordinal: 3 }
        );
        let mut m = healthy(3);
        m.push((3, true, false));
        assert_eq!(
            next_step(&n, 5, true, &obs(3, view(&m, Some(0)))),
            Step::Grow { replicas: 4 }
        );
        assert_eq!(
            next_step(&n, 5, true, &obs(4, view(&m, Some(0)))),
            Step::WaitLearner { ordinal: 3 }
        );
        m[3] = (3, true, true);
        assert_eq!(
            next_step(&n, 5, true, &obs(4, view(&m, Some(0)))),
            Step::Promote {
                id: 103,
                ordinal: 3
            }
        );
        m[3] = (3, false, true);
        assert_eq!(
            next_step(&n, 5, true, &obs(4, view(&m, Some(0)))),
            Step::AddLearner { ordinal: 4 }
        );
    }

    #[test]
    fn a_learner_is_finished_even_if_the_size_went_back_down() {
        // spec.size edited from 4 back to 3 mid-step: the learner is promoted first, then removed.
        let mut m = healthy(3);
        m.push((3, true, true));
        assert_eq!(
            next_step(&names(), 3, true, &obs(4, view(&m, Some(0)))),
            Step::Promote {
                id: 103,
                ordinal: 3
            }
        );
    }

    #[test]
    fn scale_down_moves_leadership_then_removes_then_shrinks() {
        let n = names();
        let v = view(&healthy(5), Some(4));
        assert_eq!(
            next_step(&n, 3, true, &obs(5, v)),
            Step::MoveLeader { from: 104, to: 100 }
        );
        let v = view(&healthy(5), Some(0));
        assert_eq!(
            next_step(&n, 3, true, &obs(5, v)),
            Step::Remove {
                id: 104,
                ordinal: 4
            }
        );
        let v = view(&healthy(4), Some(0));
        assert_eq!(
            next_step(&n, 3, true, &obs(5, v.clone())),
            Step::Shrink {
                replicas: 4,
                delete_volumes: vec![4]
            }
        );
        assert_eq!(
            next_step(&n, 3, true, &obs(4, v)),
            Step::Remove {
                id: 103,
                ordinal: 3
            }
        );
    }

    #[test]
    fn removal_refused_when_the_rest_cannot_keep_quorum() {
        // 3 voters, one of the two that would stay is down: removing the third leaves 1 of 2.
        let v = view(
            &[(0, false, true), (1, false, false), (2, false, true)],
            Some(0),
        );
        assert_eq!(
            next_step(&names(), 2, true, &obs(3, v)),
            Step::Refuse(Refusal::WouldLoseQuorum {
                healthy_after: 1,
                needed: 2
            })
        );
        // The member being removed is the one down: the rest keep quorum.
        let v = view(
            &[(0, false, true), (1, false, true), (2, false, false)],
            Some(0),
        );
        assert_eq!(
            next_step(&names(), 2, true, &obs(3, v)),
            Step::Remove {
                id: 102,
                ordinal: 2
            }
        );
    }

    #[test]
    fn lost_data_is_replaced_first() {
        let v = view(
            &[(0, false, true), (1, false, false), (2, false, true)],
            Some(0),
        );
        let o = Observed {
            unusable: vec![(1, Unusable::LostData { id: 101 })],
            ..obs(3, v.clone())
        };
        assert_eq!(
            next_step(&names(), 5, true, &o),
            Step::Replace {
                id: 101,
                ordinal: 1
            }
        );
        // A message naming another ID is from before a replacement: not acted on again.
        let o = Observed {
            unusable: vec![(1, Unusable::LostData { id: 77 })],
            ..obs(3, v)
        };
        assert_eq!(next_step(&names(), 3, true, &o), Step::Steady);
        // Already replaced (now a learner with a new ID): carry on promoting it.
        let v = view(
            &[(0, false, true), (1, true, true), (2, false, true)],
            Some(0),
        );
        let o = Observed {
            unusable: vec![],
            from_backup: false,
            ..obs(3, v)
        };
        assert_eq!(
            next_step(&names(), 3, true, &o),
            Step::Promote {
                id: 101,
                ordinal: 1
            }
        );
    }

    #[test]
    fn no_membership_change_while_a_leader_answers_without_quorum() {
        // Two of three voters gone (their data too): the survivor still calls itself leader.
        let v = view(
            &[(0, false, true), (1, false, false), (2, false, false)],
            Some(0),
        );
        let o = Observed {
            unusable: vec![
                (1, Unusable::LostData { id: 101 }),
                (2, Unusable::LostData { id: 102 }),
            ],
            ..obs(3, v.clone())
        };
        let why = Refusal::NoQuorum {
            answering: 1,
            voters: 3,
            needed: 2,
        };
        let refused = Step::Refuse(why.clone());
        assert_eq!(next_step(&names(), 3, true, &o), refused);
        // Nor a shrink, a removal or a growth.
        assert_eq!(next_step(&names(), 1, true, &obs(3, v.clone())), refused);
        assert_eq!(next_step(&names(), 5, true, &obs(3, v)), refused);
        // A learner does not count: one voter of one answers, the learner is promoted.
        let v = view(&[(0, false, true), (1, true, true)], Some(0));
        assert_eq!(
            next_step(&names(), 3, true, &obs(2, v)),
            Step::Promote {
                id: 101,
                ordinal: 1
            }
        );
        assert_eq!(why.reason(), "QuorumLost");
        assert_eq!(
            why.message(),
            "1 of 3 voters answer where 2 are needed for quorum: no membership change until a quorum answers"
        );
    }

    #[test]
    fn a_hole_left_by_an_interrupted_replacement_is_filled_first() {
        let v = view(&[(0, false, true), (2, false, true)], Some(0));
        assert_eq!(
            next_step(&names(), 3, true, &obs(3, v)),
            Step::AddLearner { ordinal: 1 }
        );
    }

    #[test]
    fn a_removed_member_is_wiped_then_added_again() {
        // Member 1 (ID 101) was removed by hand; its pod says so.
        let v = view(&[(0, false, true), (2, false, true)], Some(0));
        let o = Observed {
            unusable: vec![(1, Unusable::Removed { id: 101 })],
            ..obs(3, v.clone())
        };
        assert_eq!(next_step(&names(), 3, true, &o), Step::Wipe { ordinal: 1 });
        // Once wiped (a new pod, no message), the hole is filled with a new member.
        assert_eq!(
            next_step(&names(), 3, true, &obs(3, v)),
            Step::AddLearner { ordinal: 1 }
        );
        // A message naming an ID that is still listed is not evidence of anything.
        let v = healthy(3);
        let o = Observed {
            unusable: vec![(1, Unusable::Removed { id: 101 })],
            ..obs(3, view(&v, Some(0)))
        };
        assert_eq!(next_step(&names(), 3, true, &o), Step::Steady);
        // The highest member removed for a shrink: the shrink deletes its volume.
        let v = view(&[(0, false, true), (1, false, true)], Some(0));
        let o = Observed {
            unusable: vec![(2, Unusable::Removed { id: 102 })],
            ..obs(3, v)
        };
        assert!(matches!(
            next_step(&names(), 2, true, &o),
            Step::Shrink { replicas: 2, .. }
        ));
    }

    #[test]
    fn termination_messages_name_the_member_and_why() {
        assert_eq!(
            unusable("cairn: member 9c819950b72cd2e2 has already been bootstrapped\n"),
            Some(Unusable::LostData {
                id: 0x9c819950b72cd2e2
            })
        );
        let log = "2026-12-06T13:41:34Z WARN cairn::server::tasks: the member has been permanently removed from the cluster; stopping member=\"46a7171c4bc2cb5a\"\n\
                   cairn: member 46a7171c4bc2cb5a: the member has been permanently removed from the cluster\n";
        assert_eq!(
            unusable(log),
            Some(Unusable::Removed {
                id: 0x46a7171c4bc2cb5a
            })
        );
        assert!(!reports_lost_data(log));
        assert_eq!(unusable("cairn: OOMKilled"), None);
        assert_eq!(unusable("member zz has already been bootstrapped"), None);
    }

    #[test]
    fn bootstrap_flags_new_then_existing_with_the_member_list() {
        let n = names();
        let b = bootstrap(&n, 3, None);
        assert!(b.new_cluster);
        assert_eq!(
            b.initial_cluster,
            n.initial_cluster(&(0..3).collect::<Vec<_>>())
        );
        let mut m = healthy(3);
        m.push((3, true, false));
        let b = bootstrap(&n, 3, Some(&view(&m, Some(0))));
        assert!(!b.new_cluster);
        assert_eq!(
            b.initial_cluster,
            n.initial_cluster(&(0..4).collect::<Vec<_>>())
        );
    }

    #[test]
    fn never_shrinks_below_a_listed_member() {
        // Members 0..4 listed, StatefulSet at 3 (a grow was lost): grow, never remove.
        let v = view(&healthy(4), Some(0));
        assert_eq!(
            next_step(&names(), 4, true, &obs(3, v)),
            Step::Grow { replicas: 4 }
        );
    }

    #[test]
    fn quorum_sizes() {
        assert_eq!(
            (1..=6).map(quorum).collect::<Vec<_>>(),
            vec![1, 2, 2, 3, 3, 4]
        );
    }
}
