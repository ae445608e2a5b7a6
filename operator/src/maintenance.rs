//! Scheduled maintenance (`spec.maintenance`): which member a defragmentation run does next.
//! One member at a time (a member defragmenting answers slowly), followers from the highest
//! ordinal down, the leader last, and only while every voter is healthy and there is a leader.
//! Pure: the controller observes, this decides, the controller calls Defragment.

use crate::layout::Layout;
use crate::plan::ClusterView;

/// The next step of a defragmentation run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Defrag {
    /// Not now: why.
    Wait(String),
    /// Defragment this member.
    Member { id: u64, ordinal: i32, leader: bool },
    /// Every voter of the run is done.
    Done,
}

/// The next member of a run that has defragmented the members `done`.
pub fn next_defrag(layout: &dyn Layout, view: &ClusterView, done: &[u64]) -> Defrag {
    let Some(leader) = view.leader else {
        return Defrag::Wait("no leader".to_string());
    };
    if let Some(m) = view.voters().find(|m| !m.healthy) {
        let name = if m.name.is_empty() {
            format!("{:x}", m.id)
        } else {
            m.name.clone()
        };
        return Defrag::Wait(format!("member {name} is not healthy"));
    }
    let mut todo: Vec<(bool, i32, u64)> = view
        .voters()
        .filter(|m| !done.contains(&m.id))
        .map(|m| {
            let ordinal = view.ordinal(layout, m).unwrap_or(-1);
            (m.id == leader, ordinal, m.id)
        })
        .collect();
    // Followers first, from the highest ordinal down; the leader last.
    todo.sort_by_key(|(is_leader, ordinal, _)| (*is_leader, -ordinal));
    match todo.first() {
        Some((is_leader, ordinal, id)) => Defrag::Member {
            id: *id,
            ordinal: *ordinal,
            leader: *is_leader,
        },
        None => Defrag::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Names;
    use crate::plan::ObservedMember;

    fn view(leader: Option<u64>, unhealthy: &[u64]) -> (Names, ClusterView) {
        let n = Names {
            cluster: "demo".into(),
            namespace: "prod".into(),
        };
        let members = (0..3)
            .map(|o| ObservedMember {
                id: 10 + o as u64,
                name: n.member(o),
                peer_urls: vec![n.peer_url(o)],
                learner: false,
                healthy: !unhealthy.contains(&(10 + o as u64)),
                applied_index: 5,
                raft_index: 5,
                revision: 0,
                version: None,
            })
            .collect();
        (
            n,
            ClusterView {
                cluster_id: 1,
                leader,
                members,
            },
        )
    }

    #[test]
    fn followers_from_the_top_then_the_leader() {
        let (n, v) = view(Some(12), &[]);
        let mut done = Vec::new();
        let mut order = Vec::new();
        loop {
            match next_defrag(&n, &v, &done) {
                Defrag::Member {
                    id,
                    ordinal,
                    leader,
                } => {
                    order.push((ordinal, leader));
                    done.push(id);
                }
                Defrag::Done => break,
                Defrag::Wait(why) => panic!("{why}"),
            }
        }
        assert_eq!(order, vec![(1, false), (0, false), (2, true)]);
    }

    #[test]
    fn waits_while_a_voter_is_down_or_there_is_no_leader() {
        let (n, v) = view(Some(10), &[11]);
        assert_eq!(
            next_defrag(&n, &v, &[]),
            Defrag::Wait("member demo-1 is not healthy".into())
        );
        let (n, v) = view(None, &[]);
        assert_eq!(next_defrag(&n, &v, &[]), Defrag::Wait("no leader".into()));
        // A run that did every voter is done.
        let (n, v) = view(Some(10), &[]);
        assert_eq!(next_defrag(&n, &v, &[10, 11, 12]), Defrag::Done);
    }
}
