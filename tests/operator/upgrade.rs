//! The operator's rollout against real cairn clusters on loopback: the test plays the
//! StatefulSet's part with `OnDelete` (a "pod" restarted by the planner comes back on the new
//! binary, its data dir kept) and drives the same planner ([`rollout::next_roll`]) and etcd calls
//! as the controller. The first release, cairn 0.1.0 (built from its commit by
//! tests/delivery/first-release.sh), is upgraded to this build under a writer; an upgrade to a
//! build that cannot start stalls on its first member and is reverted by going back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_operator::plan::bootstrap;
use cairn_operator::rollout::{self, Restarting, Roll, Rollout};

use crate::cluster::{cairn_binary, Pods};

/// cairn 0.1.0's binary, built once by tests/delivery/first-release.sh.
fn first_release() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/delivery/first-release.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "building cairn 0.1.0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A "build" of cairn that cannot start: it says so and exits, as a broken image would.
fn broken_build(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("cairn-broken");
    std::fs::write(
        &p,
        "#!/bin/sh\necho 'cairn: this build cannot start' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Runs the rollout towards `target` (as the controller would, each "pod" restarted onto it)
/// until it is steady or stalls. Returns the steps taken. On every observation, at most one
/// voter may be down.
async fn roll_to(pods: &mut Pods, target: &Path, deadline: Duration) -> Vec<Roll> {
    let give_up = Instant::now() + Duration::from_secs(180);
    let mut steps: Vec<Roll> = Vec::new();
    let mut restarting: Option<Restarting> = None;
    let revision = target.display().to_string();
    loop {
        assert!(Instant::now() < give_up, "no end after {steps:?}");
        let Ok(view) = pods.members().observe().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let down = view.voters().filter(|m| !m.healthy).count();
        assert!(down <= 1, "{down} voters down at once: {view:?}");
        let outdated = (0..pods.replicas)
            .filter(|o| pods.binary(*o) != target)
            .collect();
        let input = Rollout {
            view: &view,
            revision: &revision,
            outdated,
            restarting: restarting.clone(),
            now: jiff::Timestamp::now(),
            deadline,
        };
        let roll = rollout::next_roll(&pods.layout, &input);
        if !matches!(roll, Roll::Wait { .. } | Roll::Blocked { .. }) {
            steps.push(roll.clone());
        }
        match &roll {
            Roll::Steady | Roll::Stalled { .. } | Roll::Refused { .. } => return steps,
            Roll::Restart { ordinal, id } => {
                restarting = Some(Restarting {
                    ordinal: *ordinal,
                    id: *id,
                    revision: revision.clone(),
                    started: jiff::Timestamp::now(),
                });
                pods.stop(*ordinal);
                pods.binaries.insert(*ordinal, target.to_path_buf());
                pods.start(*ordinal, &bootstrap(&pods.layout, 0, Some(&view)));
            }
            Roll::MoveLeader { from, to } => {
                if let Err(e) = pods.members().move_leader(*from, *to).await {
                    eprintln!("{roll:?}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Roll::Done { .. } => restarting = None,
            Roll::Wait { .. } | Roll::Blocked { .. } => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every key the writer had acknowledged is on every member (and it got some through: how
/// many depends on the machine's load, 50 in one parallel CI run here).
async fn assert_all_present(pods: &Pods, acked: &[String]) {
    assert!(
        acked.len() >= 10,
        "only {} writes acknowledged",
        acked.len()
    );
    crate::membership::assert_all_present(pods, acked).await;
}

async fn steady_on(pods: &Pods, release: &str, format: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = pods.members().observe().await.unwrap();
        let versions: Vec<Option<(String, u32)>> = view
            .members
            .iter()
            .map(|m| {
                m.version
                    .as_ref()
                    .map(|v| (v.release.clone(), v.data_format))
            })
            .collect();
        if versions.iter().all(|v| {
            v.as_ref()
                .is_some_and(|(r, f)| r == release && *f == format)
        }) && view.members.iter().all(|m| m.healthy)
        {
            return;
        }
        assert!(Instant::now() < deadline, "members say {versions:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tests' writer (`load/` keys every 5 ms) through the members of `pods`.
pub(crate) fn start_writer(
    pods: &Pods,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, usize)> {
    crate::writer::spawn(
        pods.endpoints(),
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5)),
        "load/",
        Duration::from_millis(5),
        stop.clone(),
    )
}

/// cairn 0.1.0 -> this build, member by member under a writer: followers first (from the top),
/// leadership moved, the old leader last; never two members down; each member back with its ID
/// and caught up before the next; every acknowledged write on every member; every member then
/// says this release and data format 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_release_upgrades_member_by_member_under_a_writer() {
    let old = first_release();
    let new = cairn_binary();
    let mut pods = Pods::new("upgrade");
    for o in 0..3 {
        pods.binaries.insert(o, old.clone());
    }
    pods.bootstrap(3);
    crate::cluster::wait_leader(&pods).await;
    steady_on(&pods, "0.1.0", 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&pods, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steps = roll_to(&mut pods, &new, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, failed) = writer.await.unwrap();
    eprintln!(
        "upgrade 0.1.0 -> this build: {steps:?}; writer: {} acknowledged, {failed} failed",
        acked.len()
    );

    let restarts: Vec<u64> = steps
        .iter()
        .filter_map(|s| match s {
            Roll::Restart { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(restarts.len(), 3, "{steps:?}");
    // The last one restarted was the leader, once leadership had been moved away from it
    // (unless leadership had passed to an upgraded member by itself meanwhile).
    let last_restart = steps
        .iter()
        .rposition(|s| matches!(s, Roll::Restart { .. }))
        .unwrap();
    if let Some(from) = steps[..last_restart].iter().rev().find_map(|s| match s {
        Roll::MoveLeader { from, .. } => Some(*from),
        _ => None,
    }) {
        assert_eq!(restarts.last(), Some(&from), "{steps:?}");
    }
    assert_eq!(steps.last(), Some(&Roll::Steady), "{steps:?}");
    steady_on(&pods, env!("CARGO_PKG_VERSION"), 2).await;
    assert_all_present(&pods, &acked).await;
}

/// An upgrade to a build that cannot start stalls on the first member it restarts and touches
/// no other (the other two keep serving the writer on the old build); setting the old build
/// back restarts that member onto it, and the cluster is whole again with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upgrade_touches_nothing_else_and_is_reverted() {
    let mut pods = Pods::new("stall");
    let good = cairn_binary();
    pods.bootstrap(3);
    crate::cluster::wait_leader(&pods).await;
    // Every member answers before the rollout counts the members down (a leader can be
    // elected before the third member answers).
    steady_on(&pods, env!("CARGO_PKG_VERSION"), 2).await;
    let broken = broken_build(&pods.scratch());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&pods, &stop);

    let steps = roll_to(&mut pods, &broken, Duration::from_secs(3)).await;
    eprintln!("towards a build that cannot start: {steps:?}");
    let restarted: Vec<i32> = steps
        .iter()
        .filter_map(|s| match s {
            Roll::Restart { ordinal, .. } => Some(*ordinal),
            _ => None,
        })
        .collect();
    assert_eq!(restarted.len(), 1, "{steps:?}");
    let stalled = restarted[0];
    assert!(
        matches!(steps.last(), Some(Roll::Stalled { ordinal, .. }) if *ordinal == stalled),
        "{steps:?}"
    );
    for o in (0..3).filter(|o| *o != stalled) {
        assert_eq!(pods.binary(o), good.as_path(), "member {o} was touched");
    }
    let log = std::fs::read_to_string(pods.log(stalled)).unwrap();
    assert!(log.contains("this build cannot start"), "{log}");

    // The way back: the same rollout towards the old build.
    let back = roll_to(&mut pods, &good, Duration::from_secs(60)).await;
    eprintln!("back: {back:?}");
    assert_eq!(
        back.first(),
        Some(&Roll::Restart {
            ordinal: stalled,
            id: pods
                .members()
                .observe()
                .await
                .unwrap()
                .by_ordinal(&pods.layout, stalled)
                .unwrap()
                .id
        }),
        "{back:?}"
    );
    assert_eq!(back.last(), Some(&Roll::Steady), "{back:?}");
    stop.store(true, Ordering::SeqCst);
    let (acked, _) = writer.await.unwrap();
    steady_on(&pods, env!("CARGO_PKG_VERSION"), 2).await;
    assert_all_present(&pods, &acked).await;
}
