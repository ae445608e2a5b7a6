//! Membership and per-member maintenance with etcdctl, side by side: the
//! same steps against a 3-member etcd 3.4 cluster and a 3-member cairn
//! cluster (each member in its own network namespace) give the same output
//! once addresses, generated IDs, hashes and timings are masked. Plus what
//! a learner refuses, and the `--cluster` commands.

use regex::Regex;

use crate::cluster::Cluster;
use crate::harness::Kind;

fn mask(s: &str) -> String {
    let rules = [
        (r"10\.231\.\d+\.", "10.231.N."),
        // clientv3's retry warnings: time and client ID.
        (r#""ts":"[^"]*""#, r#""ts":"T""#),
        (r"client-[0-9a-f-]+", "client-ID"),
        // The endpoint a warning names: move-leader dials whichever member leads.
        (
            r#""target":"endpoint://client-ID/[^"]*""#,
            r#""target":"EP""#,
        ),
        (r"took = [0-9.]+[µmn]?s", "took = T"),
        // HashKV values differ by design (cairn hashes its own encoding).
        (r", \d{3,}\n", ", HASH\n"),
    ];
    let mut s = s.to_string();
    for (re, to) in rules {
        s = Regex::new(re).unwrap().replace_all(&s, to).into_owned();
    }
    s
}

/// Runs the steps against a fresh cluster of `kind`; one transcript line per step.
fn transcript(net: u64, kind: Kind) -> Vec<String> {
    let c = Cluster::start_on(net, kind, 3, &[]);
    // etcd refuses membership changes until its leader has been connected
    // to a quorum for 5 s ("unhealthy cluster").
    std::thread::sleep(std::time::Duration::from_secs(6));
    let all = c.live();
    let ctl = |args: &[&str]| {
        let o = c.ctl(&all, args);
        format!(
            "$ etcdctl {}\n{}{}[{}]",
            args.join(" "),
            o.stdout,
            o.stderr,
            o.code
        )
    };
    let id_of = |peer: &str| -> String {
        c.ctl(&all, &["member", "list"])
            .stdout
            .lines()
            .find(|l| l.contains(peer))
            .and_then(|l| l.split(',').next())
            .unwrap_or_default()
            .to_string()
    };
    let m1 = id_of(&c.peer_url(1));
    let learner_url = format!("http://{}:2380", c.net.ip(9));
    let learner2_url = format!("http://{}:2380", c.net.ip(8));
    let moved_url = format!("http://{}:2380", c.net.ip(7));
    let mut out = vec![
        ctl(&["member", "list"]),
        ctl(&["member", "remove", "1234"]),
        ctl(&["member", "promote", &m1]),
        ctl(&["member", "update", "1234", "--peer-urls", &moved_url]),
        ctl(&["member", "add", "dup", "--peer-urls", &c.peer_url(2)]),
    ];
    // A learner that never starts: promotion must wait for it.
    let added = c.ctl(
        &all,
        &[
            "member",
            "add",
            "m9",
            "--learner",
            "--peer-urls",
            &learner_url,
        ],
    );
    let new_id = id_of(&learner_url);
    assert_eq!(added.code, 0, "{kind:?}: {added:?}");
    out.push(format!(
        "member add --learner: [{}] {}",
        added.code,
        added
            .stdout
            .replace(&new_id, "NEWID")
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("|")
    ));
    out.push(ctl(&[
        "member",
        "add",
        "m8",
        "--learner",
        "--peer-urls",
        &learner2_url,
    ]));
    out.push(ctl(&["member", "promote", &new_id]).replace(&new_id, "NEWID"));
    out.push(ctl(&["member", "list"]).replace(&new_id, "NEWID"));
    out.push(
        ctl(&["member", "update", &new_id, "--peer-urls", &moved_url]).replace(&new_id, "NEWID"),
    );
    // (etcd 3.4 then lists the updated learner as a voter, a bug cairn does
    // not copy: no list here.)
    out.push(ctl(&["member", "remove", &new_id]).replace(&new_id, "NEWID"));
    out.push(ctl(&["member", "list"]));
    // Every member, found through the member list.
    let mut health: Vec<String> = c
        .ctl(&all, &["endpoint", "health", "--cluster"])
        .stdout
        .lines()
        .map(String::from)
        .collect();
    health.sort();
    out.push(format!("health --cluster:\n{}", health.join("\n")));
    let hashes = c.ctl(&all, &["endpoint", "hashkv", "--cluster"]).stdout;
    let values: std::collections::HashSet<&str> = hashes
        .lines()
        .filter_map(|l| l.split(", ").nth(1))
        .collect();
    out.push(format!(
        "hashkv --cluster: {} members, {} distinct hash(es)",
        hashes.lines().count(),
        values.len()
    ));
    let status = c.ctl(&all, &["endpoint", "status", "--cluster"]).stdout;
    let leaders = status
        .lines()
        .filter(|l| l.contains(", true, false, "))
        .count();
    out.push(format!(
        "status --cluster: {} members, {} leader(s)",
        status.lines().count(),
        leaders
    ));
    // MoveLeader to a follower: etcdctl finds the leader among the endpoints.
    let leader_id = status
        .lines()
        .find(|l| l.contains(", true, false, "))
        .and_then(|l| l.split(", ").nth(1))
        .unwrap_or_default()
        .to_string();
    let target = status
        .lines()
        .find(|l| l.contains(", false, false, "))
        .and_then(|l| l.split(", ").nth(1))
        .unwrap_or_default()
        .to_string();
    let moved = ctl(&["move-leader", &target])
        .replace(&leader_id, "LEADER")
        .replace(&target, "TARGET");
    out.push(moved);
    out.push(ctl(&["move-leader", "1234"]));
    let after = c.ctl(&all, &["endpoint", "status", "--cluster"]).stdout;
    out.push(format!(
        "after move-leader, the target leads: {}",
        after
            .lines()
            .any(|l| l.contains(&target) && l.contains(", true, false, "))
    ));
    out.into_iter().map(|s| mask(&tidy(&s, &new_id))).collect()
}

/// The added member's random ID (and its padding) as NEWID; member lines and the
/// ETCD_INITIAL_CLUSTER entries (printed in Go's map order) sorted.
fn tidy(s: &str, new_id: &str) -> String {
    let s = s.replace(new_id, "NEWID");
    // etcdctl prints "Member %16x": an ID under 16 hex digits comes padded.
    let s = Regex::new(" +NEWID")
        .unwrap()
        .replace_all(&s, " NEWID")
        .into_owned();
    let s = Regex::new(r#"ETCD_INITIAL_CLUSTER="([^"]*)""#)
        .unwrap()
        .replace(&s, |c: &regex::Captures| {
            let mut parts: Vec<&str> = c[1].split(',').collect();
            parts.sort();
            format!("ETCD_INITIAL_CLUSTER=\"{}\"", parts.join(","))
        })
        .into_owned();
    if !s.starts_with("$ etcdctl member list") {
        return s;
    }
    let mut lines: Vec<&str> = s.lines().collect();
    let n = lines.len();
    lines[1..n - 1].sort();
    lines.join("\n")
}

#[test]
fn membership_commands_match_etcd() {
    // One after the other on the same addresses: same member and cluster IDs.
    let net = crate::cluster::Net::next_id();
    let etcd = transcript(net, Kind::Etcd);
    let cairn = transcript(net, Kind::Cairn);
    assert_eq!(etcd.len(), cairn.len());
    let mut diffs = Vec::new();
    for (e, c) in etcd.iter().zip(&cairn) {
        if e != c {
            diffs.push(format!("etcd:\n{e}\ncairn:\n{c}\n"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    eprintln!("{} membership steps identical", etcd.len());
}

#[test]
fn a_learner_serves_only_what_etcd_learners_serve() {
    let mut c = Cluster::start(Kind::Cairn, 3, &[]);
    let out = c.add_member(4, true);
    assert_eq!(out.code, 0, "{out:?}");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(c.wait_healthy(4));
    let put = c.ctl(&[4], &["put", "k", "v"]);
    assert!(
        put.stderr
            .contains("etcdserver: rpc not supported for learner"),
        "{put:?}"
    );
    let get = c.ctl(&[4], &["get", "k"]);
    assert!(
        get.stderr
            .contains("etcdserver: rpc not supported for learner"),
        "{get:?}"
    );
    assert_eq!(c.ctl(&[1], &["put", "k", "v"]).code, 0);
    // Serializable reads, status and the member list are served.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let get = c.ctl(&[4], &["get", "k", "--consistency=s"]);
        if get.stdout == "k\nv\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{get:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = c.ctl(&[4], &["endpoint", "status"]);
    assert!(status.stdout.contains(", false, true, "), "{status:?}");
    // etcd's /readyz is ready; cairn's `?voter` (the operator's readiness probe, which keeps
    // learners out of a Service's endpoints) is not, and is on a voter.
    let readyz = |slot: usize, path: &str| {
        let ip = c.net.ip(slot);
        crate::cluster::http_get(&ip, crate::cluster::CLIENT_PORT, path).unwrap_or_default()
    };
    assert!(readyz(4, "/readyz").starts_with("HTTP/1.1 200"));
    let learner = readyz(4, "/readyz?voter");
    assert!(
        learner.starts_with("HTTP/1.1 503")
            && learner.contains("[-]voter failed: this member is a learner"),
        "{learner}"
    );
    for slot in [1, 2, 3] {
        let voter = readyz(slot, "/readyz?voter");
        assert!(voter.starts_with("HTTP/1.1 200"), "{slot}: {voter}");
    }
    assert_eq!(c.ctl(&[4], &["member", "list"]).code, 0);

    // Its data lost, the member may not rejoin under the same ID (as etcd:
    // it must be removed and added again).
    c.kill9(4);
    let dir = c
        .nodes
        .iter()
        .find(|n| n.slot == 4)
        .unwrap()
        .dir
        .join("data");
    std::fs::remove_dir_all(&dir).unwrap();
    c.restart(4);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !c.exited(4) {
        assert!(std::time::Instant::now() < deadline, "{}", c.log(4));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        c.log(4).contains("has already been bootstrapped"),
        "{}",
        c.log(4)
    );
}

/// Changes the stored value of `key` in the (stopped) member's data directory, behind Raft's
/// back: the member's state now differs from its peers' at every later revision.
fn tamper(data_dir: &std::path::Path, key: &[u8]) {
    use cairn::mvcc::{Revision, RevisionReader};
    let engine = cairn::storage::Engine::open(&data_dir.join("member").join("cairn")).unwrap();
    let meta = engine.state_meta().unwrap();
    let (rev, mut rec) = (1..=meta.revision)
        .find_map(|main| {
            let rev = Revision { main, sub: 0 };
            let rec = engine.view().read(rev).unwrap()?;
            (rec.kv.key == key).then_some((rev, rec))
        })
        .expect("the key's record");
    rec.kv.value = b"tampered".to_vec();
    let ws = cairn::mvcc::WriteSet {
        records: vec![(rev, rec)],
        ..Default::default()
    };
    engine.write_state(&ws, &meta, None).unwrap();
}

/// etcd 3.4's corruption checks: a member whose data differs from its peers' does not start
/// with `--experimental-initial-corrupt-check`, and without it the leader's periodic check
/// (`--experimental-corrupt-check-time`) raises a CORRUPT alarm for it, after which the
/// cluster refuses reads and writes with etcd's "etcdserver: corrupt cluster".
#[test]
fn a_member_whose_data_differs_is_refused_at_start_and_alarmed_by_the_leader() {
    // Snapshots every 5 entries persist the applied state (written without a WAL of its own),
    // so that the tampered record is not applied again from the log at the restart.
    let mut c = Cluster::start(
        Kind::Cairn,
        3,
        &[
            "--experimental-corrupt-check-time",
            "1s",
            "--snapshot-count",
            "5",
        ],
    );
    for i in 0..20 {
        let out = c.ctl(&[1, 2, 3], &["put", &format!("k{i}"), "v"]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let leader = rt.block_on(c.leader()).expect("a leader");
    let follower = [1, 2, 3].into_iter().find(|s| *s != leader).unwrap();
    // Consistent so far: the leader's periodic check raises nothing.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let alarms = c.ctl(&[leader], &["alarm", "list"]);
    assert_eq!(alarms.stdout, "", "{alarms:?}");

    c.kill9(follower);
    let dir = c
        .nodes
        .iter()
        .find(|n| n.slot == follower)
        .unwrap()
        .dir
        .join("data");
    tamper(&dir, b"k3");

    c.set_flag(follower, "--experimental-initial-corrupt-check", true);
    c.restart(follower);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !c.exited(follower) {
        assert!(std::time::Instant::now() < deadline, "{}", c.log(follower));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        c.log(follower)
            .contains("found data inconsistency with peers"),
        "{}",
        c.log(follower)
    );
    // Nothing was raised by a member that did not start; the others serve.
    assert_eq!(c.ctl(&[leader], &["put", "still", "ok"]).code, 0);

    c.set_flag(follower, "--experimental-initial-corrupt-check", false);
    c.restart(follower);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let alarms = loop {
        let out = c.ctl(&[leader], &["alarm", "list"]);
        if out.stdout.contains("alarm:CORRUPT") {
            break out.stdout;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no CORRUPT alarm: {out:?}\n{}",
            c.log(leader)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // One alarm, for the tampered member only.
    assert_eq!(alarms.lines().count(), 1, "{alarms}");
    let status = c.ctl(&[follower], &["endpoint", "status", "-w", "json"]);
    let id = Regex::new(r#""member_id":(\d+)"#)
        .unwrap()
        .captures(&status.stdout)
        .map(|m| m[1].to_string())
        .unwrap_or_else(|| panic!("{status:?}"));
    assert_eq!(alarms.trim(), format!("memberID:{id} alarm:CORRUPT"));
    for args in [&["put", "x", "y"][..], &["get", "x"][..]] {
        let out = c.ctl(&[leader], args);
        assert!(
            out.stderr.contains("etcdserver: corrupt cluster"),
            "{args:?}: {out:?}"
        );
    }
}
