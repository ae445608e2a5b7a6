//! Faults on 3- and 5-member cairn clusters under concurrent load: kill -9
//! of the leader and of a follower, a restart of every member, a member
//! cut off and one slowed down, a member added and one removed while
//! writes continue. After each: every member converges to the same HashKV
//! at the same revision, and the recorded history (with writes whose
//! outcome is unknown treated as possibly applied) is linearizable, which
//! also fails on any acknowledged write that went missing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::{value_of, Cluster, Load, LOAD_KEYS};
use crate::harness::Kind;
use crate::linearizability::{self, Kind as OpKind, Op};

const WORKERS: usize = 8;

/// Runs the load around `fault`, then checks convergence and history.
async fn scenario<F>(c: &mut Cluster, name: &str, fault: F)
where
    F: AsyncFnOnce(&mut Cluster),
{
    // Each key's value before the load (left by earlier scenarios).
    let initial = read_all(c, c.live()[0]).await;
    let load = Load::start(c, WORKERS).await;
    let started = load.started;
    let load_first_value = load.first_value;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fault(c).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked = load.acked.clone();
    let mut ops = load.stop().await;
    let (rev, hash) = c.converge().await;
    // Final reads of every key on every member join the history: an
    // acknowledged write missing anywhere fails the check.
    let now = || started.elapsed().as_nanos() as u64;
    for slot in c.live() {
        let mut client = c.client(&[slot]).await;
        for key in 0..LOAD_KEYS {
            let call = now();
            let r = client.get(format!("lin/{key:03}"), None).await.unwrap();
            ops.push(Op {
                key,
                kind: OpKind::Get(value_of(&r)),
                call,
                ret: Some(now()),
            });
        }
    }
    let unknown = ops.iter().filter(|o| o.ret.is_none()).count();
    // Writes of earlier scenarios whose outcome is unknown may still take
    // effect now (a request held up by a cut link can reach a member
    // seconds after its client gave up): they join as invoked at the start.
    let carried: Vec<Op> = c
        .unknown_writes
        .iter()
        .map(|o| Op {
            call: 0,
            ..o.clone()
        })
        .collect();
    c.unknown_writes
        .extend(ops.iter().filter(|o| o.ret.is_none()).cloned());
    ops.extend(carried);
    let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{name}: {} ops, {acked} acknowledged writes, {unknown} unknown outcomes; converged at revision {rev} (hash {hash})",
        ops.len()
    );
    assert!(
        acked > 50,
        "{name}: too few writes succeeded ({acked})\n{}",
        c.logs()
    );
    if let Err(e) = linearizability::check(&ops, &initial) {
        panic!(
            "{name}: history not linearizable: {e} (this scenario's values start at {})\n{}",
            load_first_value,
            c.logs()
        );
    }
}

async fn fault_suite(n: usize, peer_tls: bool) {
    // A small snapshot count: members that fall behind catch up by snapshot.
    let extra = ["--snapshot-count", "500"];
    let (_pki, mut c) = if peer_tls {
        let net = crate::cluster::Net::next_id();
        let ips: Vec<String> = (1..=n + 4)
            .map(|i| format!("10.231.{net}.{}", 10 + i))
            .collect();
        let (pki, flags) = crate::tls::peer_tls(&ips);
        let c = Cluster::start_peer_tls(net, Kind::Cairn, n, &extra, &flags);
        (Some(pki), c)
    } else {
        (None, Cluster::start(Kind::Cairn, n, &extra))
    };
    c.wait_leader(Duration::from_secs(10)).await;

    scenario(&mut c, "kill -9 leader", async |c: &mut Cluster| {
        let (old, _) = c.wait_leader(Duration::from_secs(5)).await;
        c.kill9(old);
        let t = Instant::now();
        let others: Vec<usize> = c.live();
        let mut client = c.client(&others).await;
        loop {
            let r =
                tokio::time::timeout(Duration::from_secs(2), client.put("probe", "x", None)).await;
            if matches!(r, Ok(Ok(_))) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no write within 10s of killing the leader\n{}",
                c.logs()
            );
        }
        let (new, _) = c.wait_leader(Duration::from_secs(5)).await;
        assert_ne!(new, old);
        eprintln!(
            "leader m{old} killed: m{new} leads, first write after {:?}",
            t.elapsed()
        );
        c.restart(old);
        c.wait_healthy(old).await;
    })
    .await;

    scenario(
        &mut c,
        "kill -9 follower, restart",
        async |c: &mut Cluster| {
            let (leader, _) = c.wait_leader(Duration::from_secs(5)).await;
            let f = c.live().into_iter().find(|s| *s != leader).unwrap();
            c.kill9(f);
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.restart(f);
            c.wait_healthy(f).await;
        },
    )
    .await;

    scenario(&mut c, "restart every member", async |c: &mut Cluster| {
        for slot in c.live() {
            c.kill9(slot);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let slots: Vec<usize> = c.nodes.iter().map(|n| n.slot).collect();
        for slot in &slots {
            c.restart(*slot);
        }
        for slot in &slots {
            c.wait_healthy(*slot).await;
        }
    })
    .await;

    scenario(
        &mut c,
        "leader cut off, then healed",
        async |c: &mut Cluster| {
            let (leader, _) = c.wait_leader(Duration::from_secs(5)).await;
            c.net.cut(leader);
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.net.heal(leader);
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.wait_healthy(leader).await;
        },
    )
    .await;

    scenario(
        &mut c,
        "follower slowed, then cut off",
        async |c: &mut Cluster| {
            let (leader, _) = c.wait_leader(Duration::from_secs(5)).await;
            let f = c.live().into_iter().find(|s| *s != leader).unwrap();
            let how = c.net.slow(f);
            eprintln!("m{f} slowed: {how}");
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.net.cut(f);
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.net.heal(f);
            c.net.undelay(f);
            c.wait_healthy(f).await;
        },
    )
    .await;

    let new_slot = n + 1;
    scenario(
        &mut c,
        "member added while writes continue",
        async |c: &mut Cluster| {
            let out = c.add_member(new_slot, true);
            assert_eq!(out.code, 0, "member add: {out:?}");
            c.wait_healthy(new_slot).await;
            let id = member_id(c, new_slot);
            // Promotion waits until the learner has caught up.
            let t = Instant::now();
            loop {
                // Through the voters: like etcd's, a learner refuses it.
                let voters: Vec<usize> = c.live().into_iter().filter(|s| *s != new_slot).collect();
                let out = c.ctl(&voters, &["member", "promote", &id]);
                if out.code == 0 {
                    break;
                }
                // Not caught up yet, or (on a loaded machine) an election
                // under way: both are answers to retry on, as an operator would.
                let retry = [
                    "can only promote a learner member which is in sync with leader",
                    "etcdserver: no leader",
                    "etcdserver: leader changed",
                    "etcdserver: request timed out",
                ];
                assert!(
                    retry.iter().any(|r| out.stderr.contains(r)),
                    "promote: {out:?}"
                );
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "learner never caught up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // History far beyond the snapshot count: it caught up by snapshot.
            assert!(
                c.log(new_slot)
                    .contains("installed a snapshot from the leader"),
                "the new member did not catch up by snapshot:\n{}",
                c.log(new_slot)
            );
            let list = c.ctl(&c.live(), &["member", "list"]).stdout;
            assert_eq!(list.lines().count(), new_slot, "{list}");
            assert!(list.lines().all(|l| l.ends_with(", false")), "{list}");
        },
    )
    .await;

    scenario(
        &mut c,
        "member removed while writes continue",
        async |c: &mut Cluster| {
            let (leader, _) = c.wait_leader(Duration::from_secs(5)).await;
            let victim = c.live().into_iter().rev().find(|s| *s != leader).unwrap();
            let id = member_id(c, victim);
            let rest: Vec<usize> = c.live().into_iter().filter(|s| *s != victim).collect();
            let out = c.ctl(&rest, &["member", "remove", &id]);
            assert_eq!(out.code, 0, "member remove: {out:?}");
            // The removed member stops by itself.
            let t = Instant::now();
            while !c.exited(victim) {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "removed member still running\n{}",
                    c.log(victim)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.kill9(victim);
            let list = c.ctl(&rest, &["member", "list"]).stdout;
            assert!(!list.contains(&id), "{list}");
        },
    )
    .await;
}

/// Every load key's value, read linearizably from member `slot`.
async fn read_all(c: &Cluster, slot: usize) -> BTreeMap<u32, u64> {
    let mut client = c.client(&[slot]).await;
    let r = client
        .get("lin/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            let k = kv
                .key_str()
                .unwrap()
                .trim_start_matches("lin/")
                .parse()
                .unwrap();
            (k, kv.value_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// The hex ID `etcdctl member list` shows for the member at `slot`.
fn member_id(c: &Cluster, slot: usize) -> String {
    let peer = c.peer_url(slot);
    let list = c.ctl(&c.live(), &["member", "list"]);
    list.stdout
        .lines()
        .find(|l| l.contains(&peer))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("m{slot} not in {list:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_fault_suite() {
    fault_suite(3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_member_fault_suite() {
    fault_suite(5, false).await;
}

/// The same suite with the members talking over mutual TLS (issue 21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_fault_suite_over_peer_mtls() {
    fault_suite(3, true).await;
}
