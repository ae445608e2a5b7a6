//! The operator's membership logic against real cairn clusters on loopback. The test plays the
//! StatefulSet's part (a cairn process per ordinal, started with the flags the bootstrap ConfigMap
//! would give it, its data dir as the volume) and drives the same planner and etcd calls as the
//! controller: scale up learner-first, scale down with a leader move, refusal when a removal
//! would lose quorum or no member answers, and the repair of a member that lost its data. A
//! writer runs through every resize; no acknowledged write may be missing afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_operator::layout::Layout;
use cairn_operator::members::Outcome;
use cairn_operator::plan::{self, bootstrap, next_step, Observed, Refusal, Step};

use crate::cluster::{wait_leader, Pods};

/// Runs the controller's loop (observe, plan, act) until the size is reached or a step is
/// refused. Returns the steps taken; checks on every observation that there is never more than
/// one learner.
async fn drive(pods: &mut Pods, desired: i32) -> Vec<Step> {
    drive_with(pods, desired, &mut Learners::default()).await
}

/// The learner deadline as the controller keeps it (the times it records in status), and
/// ordinals whose process is frozen right after it starts (a learner that never catches up).
#[derive(Default)]
struct Learners {
    deadline: Option<Duration>,
    added_at: Option<Instant>,
    stalled_at: Option<Instant>,
    freeze: Vec<i32>,
}

async fn drive_with(pods: &mut Pods, desired: i32, learners: &mut Learners) -> Vec<Step> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut steps = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no steady state after {steps:?}");
        let view = pods.members().observe().await.ok();
        if let Some(v) = &view {
            assert!(v.members.iter().filter(|m| m.learner).count() <= 1, "{v:?}");
        }
        let unusable = (0..pods.replicas)
            .filter_map(|o| Some((o, plan::unusable(&pods.exited_log(o)?)?)))
            .collect();
        let obs = Observed {
            statefulset_replicas: Some(pods.replicas),
            view: view.clone(),
            unusable,
            from_backup: false,
            learner_clock: plan::LearnerClock {
                deadline: learners.deadline,
                in_flight_for: learners.added_at.map(|t| t.elapsed()),
                stalled_for: learners.stalled_at.map(|t| t.elapsed()),
            },
            corrupt: match &view {
                Some(v) => {
                    let corrupt: Vec<u64> = pods
                        .members()
                        .alarms()
                        .await
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(_, a)| *a == etcd_client::AlarmType::Corrupt)
                        .map(|(id, _)| id)
                        .collect();
                    // As the controller: the alarm of a member no longer listed is disarmed.
                    for id in corrupt
                        .iter()
                        .filter(|id| !v.members.iter().any(|m| m.id == **id))
                    {
                        let _ = pods
                            .members()
                            .disarm(*id, etcd_client::AlarmType::Corrupt)
                            .await;
                    }
                    corrupt
                }
                None => Vec::new(),
            },
        };
        let step = next_step(&pods.layout, desired, true, &obs);
        if !matches!(step, Step::WaitLearner { .. }) && steps.last() != Some(&step) {
            steps.push(step.clone());
        }
        match &step {
            Step::Steady | Step::Refuse(_) => {
                if step == Step::Steady {
                    learners.stalled_at = None;
                }
                return steps;
            }
            Step::Grow { replicas } => {
                let b = bootstrap(&pods.layout, 0, view.as_ref());
                for o in pods.replicas..*replicas {
                    pods.start(o, &b);
                    if learners.freeze.contains(&o) {
                        pods.freeze(o);
                    }
                }
                pods.replicas = *replicas;
            }
            Step::Shrink {
                replicas,
                delete_volumes,
            } => {
                for o in *replicas..pods.replicas {
                    pods.stop(o);
                }
                for o in delete_volumes {
                    let _ = std::fs::remove_dir_all(pods.volume(*o));
                }
                pods.replicas = *replicas;
            }
            Step::Replace { ordinal, .. } | Step::AddLearner { ordinal } => {
                if let Err(e) = pods.members().execute(&pods.layout, &step).await {
                    for o in 0..pods.replicas {
                        eprintln!(
                            "--- member {o}\n{}",
                            std::fs::read_to_string(pods.log(o)).unwrap_or_default()
                        );
                    }
                    panic!("{step:?}: {e}");
                }
                learners.added_at = Some(Instant::now());
                if *ordinal < pods.replicas {
                    // The pod exists (it lost its data): restart it with the new member list.
                    let view = pods.members().observe().await.unwrap();
                    pods.stop(*ordinal);
                    pods.start(*ordinal, &bootstrap(&pods.layout, 0, Some(&view)));
                }
            }
            Step::Wipe { ordinal } => {
                // The controller deletes the claim and the pod; the StatefulSet makes both again.
                pods.stop(*ordinal);
                std::fs::remove_dir_all(pods.volume(*ordinal)).unwrap();
                let b = bootstrap(&pods.layout, 0, view.as_ref());
                pods.start(*ordinal, &b);
            }
            Step::MoveLeader { .. } => {
                // A member may still report the old leader right after a move: observe again.
                if let Err(e) = pods.members().execute(&pods.layout, &step).await {
                    eprintln!("{step:?}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Step::RemoveCorrupt { id, .. } => {
                pods.members()
                    .execute(&pods.layout, &step)
                    .await
                    .unwrap_or_else(|e| panic!("{step:?}: {e}"));
                // As the controller: it may reach the removed member, which refuses; the next
                // observation disarms it then.
                let _ = pods
                    .members()
                    .disarm(*id, etcd_client::AlarmType::Corrupt)
                    .await;
            }
            Step::Promote { .. } | Step::Remove { .. } | Step::RemoveLearner { .. } => {
                let out = pods
                    .members()
                    .execute(&pods.layout, &step)
                    .await
                    .unwrap_or_else(|e| panic!("{step:?}: {e}"));
                if out == Outcome::LearnerBehind {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else if !matches!(step, Step::Remove { .. }) {
                    learners.added_at = None;
                }
                if matches!(step, Step::RemoveLearner { .. }) {
                    learners.stalled_at = Some(Instant::now());
                }
            }
            Step::WaitLearner { .. } | Step::WaitBootstrap => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Step::Bootstrap { .. } => unreachable!("the cluster was bootstrapped"),
        }
    }
}

async fn wait_steady(pods: &mut Pods, size: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(v) = pods.members().observe().await {
            if v.leader.is_some()
                && v.members.len() == size as usize
                && v.members.iter().all(|m| m.healthy && !m.name.is_empty())
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "cluster did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every acknowledged key is present, read from every member's own store.
pub(crate) async fn assert_all_present(pods: &Pods, acked: &[String]) {
    assert!(!acked.is_empty(), "the writer got no write through");
    for o in 0..pods.replicas {
        let mut c = etcd_client::Client::connect([pods.layout.client_url(o)], None)
            .await
            .unwrap();
        assert_member_has(&mut c, &format!("member {o}"), acked).await;
    }
}

/// Every acknowledged key is in the store of the member `c` talks to (`who`).
pub(crate) async fn assert_member_has(c: &mut etcd_client::Client, who: &str, acked: &[String]) {
    // A linearizable read first, so the member has applied everything acknowledged.
    c.get(
        "load/",
        Some(
            etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only(),
        ),
    )
    .await
    .unwrap();
    let r = c
        .get(
            "load/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_serializable(),
            ),
        )
        .await
        .unwrap();
    let have: std::collections::HashSet<&str> =
        r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    for k in acked {
        assert!(have.contains(k.as_str()), "{who} lost acknowledged {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_up_and_down_learner_first_leader_moved_volumes_deleted() {
    let mut pods = Pods::new("grow");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Through ordinal 0, as fast as it goes.
    let load = crate::writer::spawn(
        vec![pods.layout.client_url(0)],
        etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3)),
        "load/",
        Duration::ZERO,
        stop.clone(),
    );

    let steps = drive(&mut pods, 5).await;
    assert_eq!(
        steps
            .iter()
            .filter(|s| !matches!(s, Step::Promote { .. }))
            .cloned()
            .collect::<Vec<_>>(),
        vec![
            Step::AddLearner { ordinal: 3 },
            Step::Grow { replicas: 4 },
            Step::AddLearner { ordinal: 4 },
            Step::Grow { replicas: 5 },
            Step::Steady,
        ],
        "{steps:?}"
    );
    assert_eq!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Promote { .. }))
            .count(),
        2
    );
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.voters().count(), 5);
    assert!(v.members.iter().all(|m| m.healthy));

    // Put leadership on the highest ordinal, so shrinking has to move it first.
    let top = v.by_ordinal(&pods.layout, 4).unwrap().id;
    let leader = v.leader.unwrap();
    if leader != top {
        pods.members().move_leader(leader, top).await.unwrap();
    }
    let steps = drive(&mut pods, 3).await;
    assert_eq!(
        steps[0],
        Step::MoveLeader {
            from: top,
            to: v.by_ordinal(&pods.layout, 0).unwrap().id
        },
        "{steps:?}"
    );
    let rest: Vec<Step> = steps[1..]
        .iter()
        .filter(|s| !matches!(s, Step::MoveLeader { .. }))
        .cloned()
        .collect();
    assert!(
        matches!(
            rest.as_slice(),
            [
                Step::Remove { ordinal: 4, .. },
                Step::Shrink { replicas: 4, .. },
                Step::Remove { ordinal: 3, .. },
                Step::Shrink { replicas: 3, .. },
                Step::Steady
            ]
        ),
        "{steps:?}"
    );
    assert!(!pods.volume(3).exists() && !pods.volume(4).exists());
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.members.len(), 3);
    assert!(v.leader.is_some() && v.members.iter().all(|m| m.healthy && !m.learner));

    stop.store(true, Ordering::Relaxed);
    let (acked, _) = load.await.unwrap();
    assert_all_present(&pods, &acked).await;

    // Grow again: the new members start from empty volumes, not the removed members' data.
    let steps = drive(&mut pods, 4).await;
    assert_eq!(steps.last(), Some(&Step::Steady));
    assert_all_present(&pods, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_never_catches_up_is_removed_at_its_deadline() {
    let mut pods = Pods::new("deadline");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = crate::writer::spawn(
        vec![pods.layout.client_url(0)],
        etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3)),
        "load/",
        Duration::from_millis(5),
        stop.clone(),
    );
    // The new member starts, joins as a learner, and freezes: it never catches up.
    let mut learners = Learners {
        deadline: Some(Duration::from_secs(4)),
        freeze: vec![3],
        ..Learners::default()
    };
    let started = Instant::now();
    let steps = drive_with(&mut pods, 4, &mut learners).await;
    let held = started.elapsed();
    assert!(
        matches!(
            steps.as_slice(),
            [
                Step::AddLearner { ordinal: 3 },
                Step::Grow { replicas: 4 },
                Step::RemoveLearner { ordinal: 3, .. },
                Step::Shrink { replicas: 3, .. },
                Step::Refuse(Refusal::ScaleUpStalled { .. }),
            ]
        ),
        "{steps:?}"
    );
    assert!(held >= Duration::from_secs(4), "removed after {held:?}");
    assert!(!pods.volume(3).exists(), "the learner's volume is left");
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.members.len(), 3, "{v:?}");
    assert!(v.members.iter().all(|m| m.healthy && !m.learner), "{v:?}");

    // Until the deadline has passed again no learner is added; then the next one (whose pod
    // runs) is added and promoted.
    learners.freeze.clear();
    assert!(matches!(
        drive_with(&mut pods, 4, &mut learners).await.as_slice(),
        [Step::Refuse(Refusal::ScaleUpStalled { .. })]
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let steps = drive_with(&mut pods, 4, &mut learners).await;
    assert_eq!(
        steps.first(),
        Some(&Step::AddLearner { ordinal: 3 }),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&Step::Steady), "{steps:?}");
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.voters().count(), 4, "{v:?}");

    stop.store(true, Ordering::Relaxed);
    let (acked, _) = load.await.unwrap();
    assert!(!acked.is_empty());
    assert_all_present(&pods, &acked).await;
}

/// A member with a CORRUPT alarm (raised here through the Alarm API as the leader's periodic
/// check raises it: cairn's own check is tested with the server) is removed, its alarm
/// disarmed so the cluster serves again, its data wiped, and it joins again as a new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_corrupt_alarm_is_replaced_and_the_cluster_serves_again() {
    let mut pods = Pods::new("corrupt");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    let mut c = etcd_client::Client::connect(pods.endpoints(), None)
        .await
        .unwrap();
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let v = pods.members().observe().await.unwrap();
    let leader = v.leader.unwrap();
    let bad = v.members.iter().find(|m| m.id != leader).unwrap();
    let ordinal = v.ordinal(&pods.layout, bad).unwrap();
    let mut member = etcd_client::AlarmOptions::new();
    member.with_member(bad.id);
    c.alarm(
        etcd_client::AlarmAction::Activate,
        etcd_client::AlarmType::Corrupt,
        Some(member),
    )
    .await
    .unwrap();
    // Every member refuses once it has applied the alarm (a follower behind may still take
    // a write right after it is raised: the gate is where the request arrives).
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match c.put("while", "corrupt", None).await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "writes still taken"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused.to_string().contains("etcdserver: corrupt cluster"),
        "{refused}"
    );

    // The removed member answers with its old member list until it stops: a drive may end
    // Steady on that view; the controller looks again, and so does the test.
    let mut steps = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        steps.extend(drive(&mut pods, 3).await);
        let v = pods.members().observe().await.unwrap();
        if v.voters().count() == 3 && v.members.iter().all(|m| m.id != bad.id) {
            break;
        }
        assert!(Instant::now() < deadline, "{steps:?} {v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        steps.first(),
        Some(&Step::RemoveCorrupt {
            id: bad.id,
            ordinal
        }),
        "{steps:?}"
    );
    // Its volume goes: wiped in place, or deleted with a shrink when it is the highest.
    assert!(
        steps.iter().any(|s| match s {
            Step::Wipe { ordinal: o } => *o == ordinal,
            Step::Shrink { delete_volumes, .. } => delete_volumes.contains(&ordinal),
            _ => false,
        }),
        "the member's data was not wiped: {steps:?}"
    );
    assert_eq!(steps.last(), Some(&Step::Steady), "{steps:?}");
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.voters().count(), 3);
    assert!(v.members.iter().all(|m| m.id != bad.id), "{v:?}");
    // No alarm left (the drive disarms a removed member's alarm at its next observation).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alarms = pods.members().alarms().await.unwrap();
        if alarms.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{alarms:?}");
        let _ = pods
            .members()
            .disarm(bad.id, etcd_client::AlarmType::Corrupt)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.put("after", "ok", None).await.unwrap();
    let mut fresh = etcd_client::Client::connect([pods.layout.client_url(ordinal)], None)
        .await
        .unwrap();
    let got = fresh
        .get("k", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_removal_without_quorum_and_when_unreachable() {
    let mut pods = Pods::new("quorum");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    // One of the members that would stay is down: shrinking to 2 would leave 1 healthy voter.
    pods.stop(1);
    wait_leader(&pods).await;
    let steps = drive(&mut pods, 2).await;
    assert_eq!(
        steps.last(),
        Some(&Step::Refuse(Refusal::WouldLoseQuorum {
            healthy_after: 1,
            needed: 2
        })),
        "{steps:?}"
    );
    // Nothing was removed.
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.members.len(), 3);
    // Transient loss of a member changes nothing at the target size.
    assert_eq!(drive(&mut pods, 3).await, vec![Step::Steady]);
    // No member answers at all.
    pods.stop(0);
    pods.stop(2);
    assert_eq!(
        drive(&mut pods, 2).await,
        vec![Step::Refuse(Refusal::Unreachable)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_data_is_replaced() {
    let mut pods = Pods::new("repair");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    lose_and_replace(&mut pods, 2).await;
}

/// Issue 26: after resizes, a member replaced with an empty volume got a new ID, caught up and
/// then declared itself "permanently removed". Here with the membership changes of two resizes
/// in the log (the learner replays them), and again with a small snapshot count so that the
/// log is compacted and the learner catches up by snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_lost_after_resizes_is_replaced_and_rejoins() {
    for extra in [vec![], vec!["--snapshot-count=40".to_string()]] {
        let mut pods = Pods::new("resized");
        pods.extra = extra.clone();
        pods.bootstrap(3);
        wait_steady(&mut pods, 3).await;
        let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
            .await
            .unwrap();
        // Enough entries for several snapshots at the small snapshot count.
        for i in 0..200 {
            c.put(format!("early/{i}"), "v", None).await.unwrap();
        }
        for size in [5, 3, 4, 3] {
            let steps = drive(&mut pods, size).await;
            assert_eq!(steps.last(), Some(&Step::Steady), "{extra:?}: {steps:?}");
            wait_steady(&mut pods, size).await;
        }
        for i in 0..200 {
            c.put(format!("late/{i}"), "v", None).await.unwrap();
        }
        lose_and_replace(&mut pods, 2).await;
        if !extra.is_empty() {
            let log = std::fs::read_to_string(pods.log(2)).unwrap();
            assert!(
                log.contains("installed a snapshot from the leader"),
                "the learner did not catch up by snapshot:\n{log}"
            );
        }
        let mut c2 = etcd_client::Client::connect([pods.layout.client_url(2)], None)
            .await
            .unwrap();
        for prefix in ["early/", "late/"] {
            let r = c2
                .get(
                    prefix,
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .unwrap();
            assert_eq!(r.count(), 200, "{extra:?}: {prefix}");
        }
        // It stays a member: a restart finds itself in its own log and serves again.
        pods.stop(2);
        let v = pods.members().observe().await.unwrap();
        pods.start(2, &bootstrap(&pods.layout, 0, Some(&v)));
        wait_steady(&mut pods, 3).await;
        let log = std::fs::read_to_string(pods.log(2)).unwrap();
        assert!(!log.contains("permanently removed"), "{extra:?}: {log}");
    }
}

/// Issue 26: a member removed from the cluster stops with etcd's message, naming its ID, and
/// exits non-zero, at once on every later start too; the planner then deletes its volume and
/// adds the ordinal again as a new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_every_time_then_is_wiped_and_added_again() {
    let mut pods = Pods::new("removed");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    let v = pods.members().observe().await.unwrap();
    let id = v.by_ordinal(&pods.layout, 1).unwrap().id;
    let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    c.put("before", "removal", None).await.unwrap();
    c.member_remove(id).await.unwrap();
    let says = format!("member {id:x}: the member has been permanently removed from the cluster");
    for run in 0..3 {
        if run > 0 {
            let v = pods.members().observe().await.unwrap();
            pods.start(1, &bootstrap(&pods.layout, 0, Some(&v)));
        }
        let log = stops_removed(&mut pods, 1, id).await;
        assert!(log.contains(&says), "run {run}: {log}");
    }

    // Member 1 may have led: the controller retries a refusal for want of a leader; here, wait.
    wait_leader(&pods).await;
    let steps = drive(&mut pods, 3).await;
    assert!(
        matches!(
            steps.as_slice(),
            [
                Step::Wipe { ordinal: 1 },
                Step::AddLearner { ordinal: 1 },
                Step::Promote { ordinal: 1, .. },
                Step::Steady
            ]
        ),
        "{steps:?}"
    );
    let v = pods.members().observe().await.unwrap();
    let new = v.by_ordinal(&pods.layout, 1).unwrap();
    assert_ne!(new.id, id);
    assert!(new.healthy && !new.learner && v.voters().count() == 3);
    let mut c1 = etcd_client::Client::connect([pods.layout.client_url(1)], None)
        .await
        .unwrap();
    let r = c1.get("before", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"removal");
}

/// One of the initial members starts only after the cluster formed without it, so its pod reads
/// `existing` (a pod scheduled late): it has never run, so it joins under its ID, as etcd's does,
/// rather than being refused as "already bootstrapped" (and replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_member_that_starts_late_joins() {
    let mut pods = Pods::new("late");
    let initial = bootstrap(&pods.layout, 3, None);
    pods.start(0, &initial);
    pods.start(1, &initial);
    pods.replicas = 3;
    wait_leader(&pods).await;
    let v = pods.members().observe().await.unwrap();
    let id = v.by_ordinal(&pods.layout, 2).unwrap().id;
    pods.start(2, &bootstrap(&pods.layout, 0, Some(&v)));
    wait_steady(&mut pods, 3).await;
    let v = pods.members().observe().await.unwrap();
    assert_eq!(v.by_ordinal(&pods.layout, 2).unwrap().id, id);
    assert!(pods.exit_status(2).is_none());
}

/// A learner removed while it was down hears from no leader when it starts again (learners
/// do not campaign, which is how a voter learns of its removal): it asks the other members,
/// and stops with etcd's message, non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_removed_while_down_stops_when_it_starts() {
    let mut pods = Pods::new("gone");
    pods.bootstrap(3);
    wait_steady(&mut pods, 3).await;
    let id = pods
        .members()
        .add_learner(&pods.layout.peer_url(3))
        .await
        .unwrap();
    let v = pods.members().observe().await.unwrap();
    pods.start(3, &bootstrap(&pods.layout, 0, Some(&v)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c3 = etcd_client::Client::connect([pods.layout.client_url(3)], None)
        .await
        .unwrap();
    while c3.status().await.is_err() {
        assert!(Instant::now() < deadline, "the learner did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pods.stop(3);
    let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    c.member_remove(id).await.unwrap();
    let v = pods.members().observe().await.unwrap();
    pods.start(3, &bootstrap(&pods.layout, 0, Some(&v)));
    stops_removed(&mut pods, 3, id).await;
}

/// Waits (30 s at most) until ordinal `o` exits, non-zero, saying that member `id` was
/// removed; returns its log.
async fn stops_removed(pods: &mut Pods, o: i32, id: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = pods.exit_status(o) {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "member {o} did not stop:\n{}",
            std::fs::read_to_string(pods.log(o)).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = pods.exited_log(o).unwrap();
    assert!(!status.success(), "{status}\n{log}");
    assert_eq!(
        plan::unusable(&log),
        Some(plan::Unusable::Removed { id }),
        "{log}"
    );
    log
}

/// Member `ordinal` loses its volume; its pod comes back empty, refuses to start, and the
/// planner's steps replace it: it holds the data written before and is a healthy voter again.
async fn lose_and_replace(pods: &mut Pods, ordinal: i32) {
    let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    c.put("before", "loss", None).await.unwrap();
    let old = pods.members().observe().await.unwrap();
    let old_id = old.by_ordinal(&pods.layout, ordinal).unwrap().id;

    pods.stop(ordinal);
    std::fs::remove_dir_all(pods.volume(ordinal)).unwrap();
    pods.start(ordinal, &bootstrap(&pods.layout, 0, Some(&old)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.exited_log(ordinal).is_none() {
        assert!(
            Instant::now() < deadline,
            "member {ordinal} did not refuse to start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(plan::reports_lost_data(&pods.exited_log(ordinal).unwrap()));
    // The member may have been the leader: the controller retries a refusal; here, wait it out.
    wait_leader(pods).await;

    let size = pods.replicas;
    let steps = drive(pods, size).await;
    assert!(
        matches!(
            steps.as_slice(),
            [Step::Replace { ordinal: o, id }, Step::Promote { ordinal: p, .. }, Step::Steady]
                if *id == old_id && *o == ordinal && *p == ordinal
        ),
        "{steps:?}\n{}",
        std::fs::read_to_string(pods.log(ordinal)).unwrap_or_default()
    );
    let v = pods.members().observe().await.unwrap();
    let new = v.by_ordinal(&pods.layout, ordinal).unwrap();
    assert_ne!(new.id, old_id);
    assert!(new.healthy && !new.learner);
    assert_eq!(v.voters().count(), pods.replicas as usize);
    let mut c2 = etcd_client::Client::connect([pods.layout.client_url(ordinal)], None)
        .await
        .unwrap();
    let r = c2
        .get(
            "before",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"loss");
}
