//! Quorum-loss recovery with `--force-new-cluster`, side by side on etcd 3.4 and cairn: a
//! 3-member cluster loses two members (killed, data wiped); the survivor restarts with the flag
//! and serves alone with its member and cluster IDs and every key, and a new member joins it.
//! Plus cairn's own once-per-token form.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;

use crate::cluster::Cluster;
use crate::harness::Kind;

/// Every key of one member, serializable (a member without quorum answers it too):
/// key, value, create and mod revision, version.
async fn keys(c: &Cluster, slot: usize) -> (i64, Vec<(String, String, i64, i64, i64)>) {
    let mut client = c.client(&[slot]).await;
    let r = client
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_serializable()),
        )
        .await
        .unwrap();
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
            )
        })
        .collect();
    (r.header().unwrap().revision(), kvs)
}

/// (member ID, cluster ID) as member `slot` reports them.
async fn ids(c: &Cluster, slot: usize) -> (u64, u64) {
    let mut client = c.client(&[slot]).await;
    let s = client.status().await.unwrap();
    let h = s.header().unwrap();
    (h.member_id(), h.cluster_id())
}

/// The member list's (name, is learner), sorted.
async fn member_list(c: &Cluster, slot: usize) -> Vec<(String, bool)> {
    let mut client = c.client(&[slot]).await;
    let mut l: Vec<(String, bool)> = client
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .map(|m| (m.name().to_string(), m.is_learner()))
        .collect();
    l.sort();
    l
}

/// Loads keys, loses m2 and m3 for good, forces a new cluster on m1 and grows it again with a
/// learner m4 (promoted). Returns what was observed, one fact a line.
async fn lose_two_and_force(net: u64, kind: Kind) -> Vec<String> {
    let mut c = Cluster::start_on(net, kind, 3, &[]);
    let mut client = c.client(&[1, 2, 3]).await;
    for i in 0..60 {
        client
            .put(format!("k/{:02}", i % 40), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in 0..5 {
        client
            .delete(format!("k/{:02}", i * 7), None)
            .await
            .unwrap();
    }
    drop(client);
    c.converge().await;
    let before = keys(&c, 1).await;
    let ids_before = ids(&c, 1).await;
    for slot in [2, 3] {
        c.kill9(slot);
        let data = c
            .nodes
            .iter()
            .find(|n| n.slot == slot)
            .unwrap()
            .dir
            .join("data");
        std::fs::remove_dir_all(&data).unwrap();
    }
    c.kill9(1);
    c.set_flag(1, "--force-new-cluster", true);
    c.restart(1);
    c.wait_healthy(1).await;
    let mut out = vec![
        format!("members after the force: {:?}", member_list(&c, 1).await),
        format!(
            "same member and cluster IDs: {}",
            ids(&c, 1).await == ids_before
        ),
    ];
    let after = keys(&c, 1).await;
    out.push(format!(
        "same keys, values, revisions: {} ({} keys, revision {} then {})",
        after.1 == before.1,
        after.1.len(),
        before.0,
        after.0
    ));
    let mut client = c.client(&[1]).await;
    let put = client.put("k/next", "after", None).await.unwrap();
    out.push(format!(
        "the next write's revision is the old one + 1: {}",
        put.header().unwrap().revision() == before.0 + 1
    ));
    drop(client);
    if kind == Kind::Etcd {
        // What etcd is compared on ends here (its regrowth below is cairn's check: an etcd
        // learner added right after the force was seen to stay one write behind for 30 s
        // under CI's load).
        return out;
    }
    // The flag is for one start; the member then runs as any other (etcd's advice).
    c.kill9(1);
    c.set_flag(1, "--force-new-cluster", false);
    c.restart(1);
    c.wait_healthy(1).await;
    // etcd refuses membership changes until its leader has been up with a quorum for 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let added = c.add_member(4, true);
    assert_eq!(added.code, 0, "{kind:?}: {added:?}\n{}", c.logs());
    let id4 = {
        let mut client = c.client(&[1]).await;
        let l = client.member_list().await.unwrap();
        l.members()
            .iter()
            .find(|m| m.name() == "m4" || m.peer_urls().contains(&c.peer_url(4)))
            .map(|m| m.id())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut client = c.client(&[1]).await;
        match client.member_promote(id4).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{kind:?}: m4 not promoted: {e}\n{}",
                c.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.wait_healthy(4).await;
    c.converge().await;
    out.push(format!(
        "members grown again: {:?}",
        member_list(&c, 1).await
    ));
    let on4 = keys(&c, 4).await;
    out.push(format!(
        "the new member has every key: {}",
        on4.1 == keys(&c, 1).await.1 && on4.1.len() == before.1.len() + 1
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn force_new_cluster_recovers_a_survivor_as_etcd_does() {
    let net = crate::cluster::Net::next_id();
    let etcd = lose_two_and_force(net, Kind::Etcd).await;
    let cairn = lose_two_and_force(net, Kind::Cairn).await;
    // cairn keeps every write the survivor had applied and acknowledged, and grows again.
    assert_eq!(
        cairn,
        [
            r#"members after the force: [("m1", false)]"#,
            "same member and cluster IDs: true",
            "same keys, values, revisions: true (35 keys, revision 66 then 66)",
            "the next write's revision is the old one + 1: true",
            r#"members grown again: [("m1", false), ("m4", false)]"#,
            "the new member has every key: true",
        ]
    );
    // etcd 3.4 does the same membership and IDs. Its data can come back shorter: it drops the
    // entries past the commit index its WAL last recorded, which lags what it applied (and
    // acknowledged) when it is killed; seen here: the last delete lost, revision 66 then 65.
    assert_eq!(etcd.len(), 4, "{etcd:#?}");
    for i in [0, 1] {
        assert_eq!(cairn[i], etcd[i], "etcd: {etcd:#?}");
    }
    eprintln!("etcd 3.4 after the same steps: {etcd:#?}");
}

/// `--experimental-force-new-cluster-once=<name>:<token>`: every member may carry it (one
/// StatefulSet template); only the named one forces, once per token, so a restart with the
/// flag still set leaves the members added since alone.
#[tokio::test(flavor = "multi_thread")]
async fn force_once_acts_on_the_named_member_once_per_token() {
    let mut c = Cluster::start(Kind::Cairn, 3, &[]);
    let mut client = c.client(&[1, 2, 3]).await;
    for i in 0..20 {
        client.put(format!("k{i}"), "v", None).await.unwrap();
    }
    drop(client);
    c.converge().await;
    for slot in [1, 2, 3] {
        c.kill9(slot);
    }
    // m2's start with a flag naming m1 changes nothing: with m3 it has a quorum again.
    for slot in [1, 2, 3] {
        c.set_flag(
            slot,
            "--experimental-force-new-cluster-once=m1:outage-1",
            true,
        );
    }
    let data3 = c
        .nodes
        .iter()
        .find(|n| n.slot == 3)
        .unwrap()
        .dir
        .join("data");
    std::fs::remove_dir_all(data3).unwrap();
    c.restart(2);
    c.restart(1);
    c.wait_healthy(1).await;
    assert_eq!(
        member_list(&c, 1).await,
        [("m1".to_string(), false)],
        "m1:\n{}\nm2:\n{}",
        c.log(1),
        c.log(2)
    );
    // m2 was left behind: told so, it stops (as etcd's removed members do).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.exited(2) {
        assert!(Instant::now() < deadline, "m2 still runs:\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.log(2).contains("permanently removed"), "{}", c.log(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let added = c.add_member(4, true);
    assert_eq!(added.code, 0, "{added:?}");
    // Restarted with the same token: not forced again, the learner m4 stays (it may not have
    // published its name yet).
    c.restart(1);
    c.wait_healthy(1).await;
    let members = member_list(&c, 1).await;
    assert_eq!(members.len(), 2, "{members:?}\n{}", c.log(1));
    assert!(members.contains(&("m1".to_string(), false)), "{members:?}");
    assert_eq!(members.iter().filter(|(_, learner)| *learner).count(), 1);
    assert!(c.log(1).contains("done before, not again"), "{}", c.log(1));
    let (rev, kvs) = keys(&c, 1).await;
    assert_eq!((rev, kvs.len()), (21, 20));
    // A malformed value is refused at start, as any bad flag.
    let out = std::process::Command::new(Kind::Cairn.binary())
        .arg("--experimental-force-new-cluster-once=no-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected <name>:<token>"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The applied index a member reports survives its restart, also with no quorum to commit
/// anything new: what the operator picks a quorum-loss survivor by. (The applied state is
/// flushed lazily; at start the member re-applies its log up to the commit index it saved.)
#[tokio::test(flavor = "multi_thread")]
async fn the_applied_index_survives_a_restart_without_quorum() {
    let mut c = Cluster::start(Kind::Cairn, 3, &[]);
    let mut client = c.client(&[1, 2, 3]).await;
    for i in 0..100 {
        client.put(format!("k/{i}"), "v", None).await.unwrap();
    }
    drop(client);
    c.converge().await;
    let before = c.client(&[1]).await.status().await.unwrap();
    assert!(before.raft_applied_index() >= 100, "{before:?}");
    for slot in [2, 3, 1] {
        c.kill9(slot);
    }
    c.restart(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Ok(mut client) = tokio::time::timeout(Duration::from_secs(2), c.client(&[1])).await {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), client.status()).await {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no status after the restart\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        after.raft_applied_index(),
        before.raft_applied_index(),
        "applied index before {before:?}, after {after:?}"
    );
}
