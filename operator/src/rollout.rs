//! The rollout planner: how a change of the members' pod template (a new version or image,
//! resources, ...) reaches the members. The StatefulSet's update strategy is `OnDelete`, so no
//! pod changes until the operator deletes it; this module says which one, and when. Pure logic,
//! no I/O: the controller observes, this decides, the controller acts.
//!
//! The rules:
//! - One member at a time, and only when membership is steady (no learner, nothing to replace).
//! - Before a member is restarted, every other voter is healthy and caught up: its applied index
//!   within [`CAUGHT_UP_ENTRIES`] of the leader's last log index (both from Status).
//! - Members that are down go first (restarting them costs nothing: this is how a stalled
//!   upgrade is reverted), then followers from the highest ordinal down, the leader last, after
//!   leadership was moved to a member that already runs the new template. A cluster of one or
//!   two members cannot keep quorum through a restart; it is restarted the same way.
//! - A restarted member must come back running the current template, with the same member ID,
//!   healthy and caught up, within the deadline; otherwise the rollout stalls and touches no
//!   other member until it does come back or the template changes again (a revert).
//! - A version that cannot read the data format the members keep is refused before any member
//!   is touched ([`release_reads`]).

use std::time::Duration;

use jiff::Timestamp;

use crate::layout::Layout;
use crate::plan::{ClusterView, ObservedMember};

/// How far (in Raft entries) a member's applied index may be behind the leader's last log
/// index for it to count as caught up: well under a second of writes at full speed.
pub const CAUGHT_UP_ENTRIES: u64 = 1000;

/// The cairn releases the operator knows, and the data formats each reads (oldest, newest);
/// each writes its newest. See `cairn --version` and server/src/storage/engine.rs.
pub const RELEASES: &[(&str, u32, u32)] = &[("0.1.0", 1, 1), ("0.2.0", 1, 2)];

/// The data formats a cairn release reads, if the operator knows the release.
pub fn release_reads(version: &str) -> Option<(u32, u32)> {
    let v = version.strip_prefix('v').unwrap_or(version);
    RELEASES
        .iter()
        .find(|(r, _, _)| *r == v)
        .map(|(_, lo, hi)| (*lo, *hi))
}

/// The tag of an image reference (`registry:5000/cairn:0.2.0` -> `0.2.0`); none for a digest
/// or an untagged name.
pub fn image_tag(image: &str) -> Option<&str> {
    if image.contains('@') {
        return None;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map(|(_, tag)| tag)
}

/// Why an image may not replace the members' current one: it is a known release that does not
/// read the newest data format a member keeps. `None`: allowed (or unknown: not checkable).
pub fn refuse_image(image: &str, newest_format: u32) -> Option<String> {
    let tag = image_tag(image)?;
    let (lo, hi) = release_reads(tag)?;
    (newest_format < lo || newest_format > hi).then(|| {
        format!(
            "cairn {tag} reads data formats {lo} to {hi}, but a member keeps its data in format {newest_format}"
        )
    })
}

/// A member being restarted, as the status records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restarting {
    pub ordinal: i32,
    pub id: u64,
    /// The StatefulSet revision it was restarted into.
    pub revision: String,
    pub started: Timestamp,
}

/// What the controller saw of the rollout.
#[derive(Clone, Debug)]
pub struct Rollout<'a> {
    pub view: &'a ClusterView,
    /// The StatefulSet's current revision (`status.updateRevision`).
    pub revision: &'a str,
    /// Ordinals whose pod runs another revision than `revision`.
    pub outdated: Vec<i32>,
    /// The member restarted last, if its restart is not known to be done.
    pub restarting: Option<Restarting>,
    pub now: Timestamp,
    /// How long a restarted member has to be back (`spec.rollout.memberDeadline`).
    pub deadline: Duration,
}

/// The next rollout step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roll {
    /// Every pod runs the current template.
    Steady,
    /// The member restarted last is back and caught up: its restart is done.
    Done { ordinal: i32 },
    /// The member restarted last is not back yet; within its deadline.
    Wait { ordinal: i32 },
    /// The member restarted last is not back after its deadline: nothing else is touched.
    Stalled { ordinal: i32, why: String },
    /// Move leadership before restarting the leader.
    MoveLeader { from: u64, to: u64 },
    /// Delete the pod of this member: it starts again with the current template.
    Restart { ordinal: i32, id: u64 },
    /// A restart is due but another voter is not healthy or not caught up.
    Blocked { why: String },
    /// The version asked for cannot read the members' data format ([`refuse_image`]): the
    /// controller keeps the running image in the template and restarts nobody.
    Refused { why: String },
}

/// A member's pod as the rollout sees it when the cluster cannot answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub ordinal: i32,
    /// Its StatefulSet revision (`controller-revision-hash`).
    pub revision: Option<String>,
    /// Its Ready condition.
    pub ready: bool,
    /// Being deleted.
    pub deleting: bool,
}

/// With no quorum (no member answers, or no leader), the one restart that is still safe: a pod
/// that is down and on an older template than `revision` (a member restarted onto an image that
/// does not start, whose template was set back). Restarting a member that is down cannot lower
/// availability, and it may be what brings quorum back; [`next_roll`] needs a leader, so this is
/// how a one- or two-member cluster, or one that lost quorum, reverts a broken upgrade.
pub fn restart_without_quorum(pods: &[PodState], revision: &str) -> Option<i32> {
    pods.iter()
        .filter(|p| !p.ready && !p.deleting)
        .filter(|p| p.revision.as_deref().is_some_and(|r| r != revision))
        .map(|p| p.ordinal)
        .min()
}

/// How far behind the leader `m` is, in entries; `None` without a leader's answer.
pub fn lag(view: &ClusterView, m: &ObservedMember) -> Option<u64> {
    let leader = view.members.iter().find(|l| Some(l.id) == view.leader)?;
    Some(leader.raft_index.saturating_sub(m.applied_index))
}

/// Why `m` is not ready to be relied on: not answering, or behind.
fn not_ready(view: &ClusterView, layout: &dyn Layout, m: &ObservedMember) -> Option<String> {
    let name = view
        .ordinal(layout, m)
        .map_or_else(|| format!("{:x}", m.id), |o| layout.member(o));
    if !m.healthy {
        return Some(format!("{name} does not answer"));
    }
    match lag(view, m) {
        None => Some("the cluster has no leader".to_string()),
        Some(n) if n > CAUGHT_UP_ENTRIES => {
            Some(format!("{name} is {n} entries behind the leader"))
        }
        Some(_) => None,
    }
}

/// The next rollout step (see the module doc).
pub fn next_roll(layout: &dyn Layout, r: &Rollout<'_>) -> Roll {
    let view = r.view;
    if let Some(rs) = &r.restarting {
        // A restart into a revision that is no longer current was overtaken (a revert):
        // planned afresh below.
        if rs.revision == r.revision {
            let back = view.by_ordinal(layout, rs.ordinal);
            let why = if r.outdated.contains(&rs.ordinal) {
                Some(format!(
                    "{} does not run the new pod template",
                    layout.member(rs.ordinal)
                ))
            } else {
                match back {
                    None => Some(format!(
                        "{} is not in the member list",
                        layout.member(rs.ordinal)
                    )),
                    Some(m) if m.id != rs.id => Some(format!(
                        "{} came back as member {:x}, not {:x}",
                        layout.member(rs.ordinal),
                        m.id,
                        rs.id
                    )),
                    Some(m) => not_ready(view, layout, m),
                }
            };
            return match why {
                None => Roll::Done {
                    ordinal: rs.ordinal,
                },
                Some(why) => {
                    let waited = r.now.duration_since(rs.started).as_secs_f64();
                    if waited > r.deadline.as_secs_f64() {
                        Roll::Stalled {
                            ordinal: rs.ordinal,
                            why: format!("{why} {}s after its restart", waited.round() as u64),
                        }
                    } else {
                        Roll::Wait {
                            ordinal: rs.ordinal,
                        }
                    }
                }
            };
        }
    }

    // The members to restart, in order: down first, then followers from the top, the leader
    // last.
    let mut todo: Vec<(&ObservedMember, i32)> = view
        .members
        .iter()
        .filter_map(|m| view.ordinal(layout, m).map(|o| (m, o)))
        .filter(|(_, o)| r.outdated.contains(o))
        .collect();
    if todo.is_empty() {
        return Roll::Steady;
    }
    todo.sort_by_key(|(m, o)| (m.healthy, view.leader == Some(m.id), -o));
    let (next, ordinal) = todo[0];

    // Every other voter must be there and caught up.
    for m in view.voters().filter(|m| m.id != next.id) {
        if let Some(why) = not_ready(view, layout, m) {
            return Roll::Blocked { why };
        }
    }
    if view.leader == Some(next.id) {
        // The leader is restarted last, so the others already run the new template (and are
        // healthy and caught up, as checked above): the lowest ordinal leads next.
        let to = view
            .voters()
            .filter(|m| m.id != next.id)
            .filter_map(|m| view.ordinal(layout, m).map(|o| (m, o)))
            .min_by_key(|(_, o)| *o)
            .map(|(m, _)| m.id);
        if let Some(to) = to {
            return Roll::MoveLeader { from: next.id, to };
        }
    }
    Roll::Restart {
        ordinal,
        id: next.id,
    }
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

    /// Voters 0..n; `healthy[i]`, `applied[i]`; the leader's last log index is 5000.
    fn view(healthy: &[bool], applied: &[u64], leader: i32) -> ClusterView {
        let n = names();
        ClusterView {
            cluster_id: 7,
            leader: Some(100 + leader as u64),
            members: (0..healthy.len())
                .map(|o| ObservedMember {
                    id: 100 + o as u64,
                    name: n.member(o as i32),
                    peer_urls: vec![n.peer_url(o as i32)],
                    learner: false,
                    healthy: healthy[o],
                    applied_index: applied[o],
                    raft_index: if o as i32 == leader { 5000 } else { applied[o] },
                    revision: 0,
                    version: None,
                })
                .collect(),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn rollout<'a>(
        view: &'a ClusterView,
        outdated: &[i32],
        restarting: Option<Restarting>,
    ) -> Rollout<'a> {
        Rollout {
            view,
            revision: "rev-b",
            outdated: outdated.to_vec(),
            restarting,
            now: at(1000),
            deadline: Duration::from_secs(300),
        }
    }

    #[test]
    fn followers_first_from_the_top_the_leader_last_after_a_move() {
        let n = names();
        let v = view(&[true; 3], &[5000; 3], 1);
        // Followers 2 then 0, then leadership moves to a member already on the new template.
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1, 2], None)),
            Roll::Restart {
                ordinal: 2,
                id: 102
            }
        );
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1], None)),
            Roll::Restart {
                ordinal: 0,
                id: 100
            }
        );
        assert_eq!(
            next_roll(&n, &rollout(&v, &[1], None)),
            Roll::MoveLeader { from: 101, to: 100 }
        );
        let moved = view(&[true; 3], &[5000; 3], 0);
        assert_eq!(
            next_roll(&n, &rollout(&moved, &[1], None)),
            Roll::Restart {
                ordinal: 1,
                id: 101
            }
        );
        assert_eq!(next_roll(&n, &rollout(&moved, &[], None)), Roll::Steady);
        let five = view(&[true; 5], &[5000; 5], 4);
        assert_eq!(
            next_roll(&n, &rollout(&five, &[1, 4], None)),
            Roll::Restart {
                ordinal: 1,
                id: 101
            }
        );
        assert_eq!(
            next_roll(&n, &rollout(&five, &[4], None)),
            Roll::MoveLeader { from: 104, to: 100 }
        );
    }

    #[test]
    fn a_voter_down_or_behind_blocks_every_restart_but_its_own() {
        let n = names();
        // demo-0 is down: it goes first (restarting it costs nothing)...
        let v = view(&[false, true, true], &[0, 5000, 5000], 1);
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1, 2], None)),
            Roll::Restart {
                ordinal: 0,
                id: 100
            }
        );
        // ...but while it is down and current, nobody else is restarted.
        assert_eq!(
            next_roll(&n, &rollout(&v, &[1, 2], None)),
            Roll::Blocked {
                why: "demo-0 does not answer".into()
            }
        );
        // A follower far behind blocks too; within the bound it does not.
        let v = view(&[true; 3], &[5000, 5000, 5000 - CAUGHT_UP_ENTRIES - 1], 1);
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0], None)),
            Roll::Blocked {
                why: format!(
                    "demo-2 is {} entries behind the leader",
                    CAUGHT_UP_ENTRIES + 1
                )
            }
        );
        let v = view(&[true; 3], &[5000, 5000, 5000 - CAUGHT_UP_ENTRIES], 1);
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0], None)),
            Roll::Restart {
                ordinal: 0,
                id: 100
            }
        );
        // No leader: nothing is caught up.
        let mut v = view(&[true; 3], &[5000; 3], 1);
        v.leader = None;
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0], None)),
            Roll::Blocked {
                why: "the cluster has no leader".into()
            }
        );
    }

    fn restarting(ordinal: i32, started: i64) -> Option<Restarting> {
        Some(Restarting {
            ordinal,
            id: 100 + ordinal as u64,
            revision: "rev-b".into(),
            started: at(started),
        })
    }

    #[test]
    fn a_restarted_member_must_come_back_same_id_and_caught_up_within_the_deadline() {
        let n = names();
        // Back, current, caught up: done.
        let v = view(&[true; 3], &[5000; 3], 1);
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1], restarting(2, 900))),
            Roll::Done { ordinal: 2 }
        );
        // Not answering yet: wait, then stall past the deadline.
        let down = view(&[true, true, false], &[5000, 5000, 0], 1);
        assert_eq!(
            next_roll(&n, &rollout(&down, &[0, 1], restarting(2, 900))),
            Roll::Wait { ordinal: 2 }
        );
        assert_eq!(
            next_roll(&n, &rollout(&down, &[0, 1], restarting(2, 600))),
            Roll::Stalled {
                ordinal: 2,
                why: "demo-2 does not answer 400s after its restart".into()
            }
        );
        // Its pod still on the old template (not re-created yet).
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1, 2], restarting(2, 990))),
            Roll::Wait { ordinal: 2 }
        );
        // Behind, or with another ID.
        let behind = view(&[true; 3], &[5000, 5000, 10], 1);
        assert_eq!(
            next_roll(&n, &rollout(&behind, &[0, 1], restarting(2, 600))),
            Roll::Stalled {
                ordinal: 2,
                why: "demo-2 is 4990 entries behind the leader 400s after its restart".into()
            }
        );
        let mut other = restarting(2, 600);
        other.as_mut().unwrap().id = 999;
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0, 1], other)),
            Roll::Stalled {
                ordinal: 2,
                why: "demo-2 came back as member 66, not 3e7 400s after its restart".into()
            }
        );
    }

    #[test]
    fn a_stalled_restart_is_reverted_by_the_previous_template() {
        let n = names();
        // demo-2 crash-loops on the new template; the template goes back to the old revision:
        // demo-2 is now the only outdated member, and down, so it goes first.
        let down = view(&[true, true, false], &[5000, 5000, 0], 1);
        let mut r = rollout(&down, &[2], restarting(2, 0));
        r.revision = "rev-a";
        assert_eq!(
            next_roll(&n, &r),
            Roll::Restart {
                ordinal: 2,
                id: 102
            }
        );
    }

    #[test]
    fn a_single_member_is_restarted_in_place() {
        let n = names();
        let v = view(&[true], &[5000], 0);
        assert_eq!(
            next_roll(&n, &rollout(&v, &[0], None)),
            Roll::Restart {
                ordinal: 0,
                id: 100
            }
        );
    }

    #[test]
    fn without_quorum_only_a_pod_down_on_an_old_template_is_restarted() {
        let pod = |ordinal, revision: &str, ready, deleting| PodState {
            ordinal,
            revision: Some(revision.to_string()),
            ready,
            deleting,
        };
        // A one-member cluster whose only member crash-loops on a broken image, set back.
        assert_eq!(
            restart_without_quorum(&[pod(0, "broken", false, false)], "good"),
            Some(0)
        );
        // Not while it runs the current template (it is down for another reason), is being
        // deleted already, or is ready.
        for p in [
            pod(0, "good", false, false),
            pod(0, "broken", false, true),
            pod(0, "broken", true, false),
        ] {
            assert_eq!(
                restart_without_quorum(std::slice::from_ref(&p), "good"),
                None,
                "{p:?}"
            );
        }
        let unknown = PodState {
            revision: None,
            ..pod(1, "", false, false)
        };
        assert_eq!(restart_without_quorum(&[unknown], "good"), None);
        // One at a time, the lowest first.
        assert_eq!(
            restart_without_quorum(
                &[
                    pod(2, "broken", false, false),
                    pod(1, "broken", false, false)
                ],
                "good"
            ),
            Some(1)
        );
    }

    #[test]
    fn releases_refuse_data_formats_they_cannot_read() {
        assert_eq!(image_tag("cairn:0.2.0"), Some("0.2.0"));
        assert_eq!(image_tag("registry:5000/x/cairn:0.1.0"), Some("0.1.0"));
        assert_eq!(image_tag("registry:5000/x/cairn"), None);
        assert_eq!(image_tag("cairn@sha256:abcd"), None);
        assert_eq!(release_reads("v0.2.0"), Some((1, 2)));
        assert_eq!(release_reads("9.9.9"), None);
        assert_eq!(refuse_image("cairn:0.2.0", 1), None);
        assert_eq!(refuse_image("cairn:0.2.0", 2), None);
        assert_eq!(refuse_image("cairn:0.1.0", 1), None);
        assert_eq!(
            refuse_image("cairn:0.1.0", 2).as_deref(),
            Some("cairn 0.1.0 reads data formats 1 to 1, but a member keeps its data in format 2")
        );
        // Unknown releases cannot be checked.
        assert_eq!(refuse_image("cairn:0.2.0-broken", 2), None);
        assert_eq!(refuse_image("cairn", 2), None);
    }
}
