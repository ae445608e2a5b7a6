//! Snapshots side by side with etcd 3.4: the same writes, `etcdctl snapshot save`, a restore
//! (etcdctl's for etcd, `cairn snapshot restore` for cairn) into a new one-member cluster, then
//! the same reads: keys, values, create/mod revisions, versions and leases must come back as
//! etcd brings them back. Also `cairn snapshot save` and `status`, and refusals: a corrupted
//! file, an existing data dir.

use std::path::Path;
use std::process::Command;

use crate::harness::{Kind, Member, Out};

/// Writes that leave history behind: overwrites, a delete, a txn, a lease with a key.
fn write_history(m: &Member) -> String {
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3"), ("a", "4"), ("d", "5")] {
        assert_eq!(m.ctl(&["put", k, v]).stdout, "OK\n");
    }
    assert_eq!(m.ctl(&["del", "b"]).stdout, "1\n");
    let txn = m.ctl_stdin(
        &["txn"],
        "value(\"a\") = \"4\"\n\nput t yes\nput a 6\n\nput t no\n\n",
    );
    assert!(txn.stdout.starts_with("SUCCESS"), "{txn:?}");
    let lease = m.ctl(&["lease", "grant", "3000"]);
    let id = lease.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        m.ctl(&["put", "leased", "x", "--lease", &id]).stdout,
        "OK\n"
    );
    id
}

fn save(m: &Member, name: &str) -> std::path::PathBuf {
    let file = m.dir.path().join(name);
    let out = m.ctl(&["snapshot", "save", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    file
}

/// The reads compared after the restore, with cluster and member IDs masked.
fn reads(m: &Member, lease: &str) -> Vec<String> {
    let mask = |s: String| {
        let re = regex::Regex::new(r#""(cluster_id|member_id|raft_term)":\d+"#).unwrap();
        re.replace_all(&s, "\"$1\":_").into_owned()
    };
    vec![
        mask(m.ctl(&["get", "", "--prefix", "-w", "json"]).stdout),
        m.ctl(&["get", "a", "--rev", "4"]).stdout,
        m.ctl(&["lease", "list"]).stdout,
        m.ctl(&["lease", "timetolive", lease, "--keys"]).stdout,
        m.ctl(&["put", "after", "restore", "-w", "json"])
            .stdout
            .split("\"revision\":")
            .nth(1)
            .unwrap_or("")
            .split(',')
            .next()
            .unwrap_or("")
            .to_string(),
    ]
}

fn cairn(args: &[&str]) -> Out {
    Command::new(Kind::Cairn.binary())
        .args(args)
        .output()
        .unwrap()
        .into()
}

#[test]
fn restore_brings_back_what_etcd_brings_back() {
    let mut results = Vec::new();
    let remaining = regex::Regex::new(r"remaining\(\d+s\)").unwrap();
    for kind in [Kind::Etcd, Kind::Cairn] {
        let mut m = Member::start(kind);
        let lease = write_history(&m);
        let file = save(&m, "ctl.snap");
        let cluster_before = m.ctl(&["endpoint", "status", "-w", "json"]).stdout;
        // Stopped, not dropped: the snapshot file lives in its directory.
        m.kill9();
        let r =
            Member::start_from_snapshot(kind, &file).unwrap_or_else(|o| panic!("{kind:?}: {o:?}"));
        let cluster_after = r.ctl(&["endpoint", "status", "-w", "json"]).stdout;
        let id = |s: &str| {
            s.split("\"cluster_id\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_string()
        };
        assert_ne!(
            id(&cluster_before),
            id(&cluster_after),
            "{kind:?}: a restore makes a new cluster"
        );
        // Lease IDs are generated differently; mask them (hex in text, decimal in JSON).
        let dec = u64::from_str_radix(&lease, 16).unwrap().to_string();
        let mut got: Vec<String> = reads(&r, &lease)
            .into_iter()
            .map(|s| s.replace(&lease, "LEASE").replace(&dec, "LEASE"))
            .collect();
        // Remaining TTLs differ by the time the runs took.
        got[3] = remaining.replace(&got[3], "remaining(_)").into_owned();
        results.push(got);
    }
    assert_eq!(
        results[0], results[1],
        "etcd (left) and cairn (right) differ after a restore"
    );
}

#[test]
fn cairn_snapshot_save_status_and_refusals() {
    let m = Member::start(Kind::Cairn);
    write_history(&m);
    let file = m.dir.path().join("cairn.snap");
    let out = cairn(&[
        "snapshot",
        "save",
        file.to_str().unwrap(),
        "--endpoints",
        &m.endpoint(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("Snapshot saved at"), "{out:?}");
    // The same keys and revision as etcdctl's snapshot of it. (Not the same hash: the file also
    // holds the member's Raft position, which moves without writes, e.g. on publishes.)
    let ctl = save(&m, "ctl.snap");
    let status = |f: &Path| cairn(&["snapshot", "status", f.to_str().unwrap(), "-w", "json"]);
    let (a, b) = (status(&file), status(&ctl));
    assert_eq!(a.code, 0, "{a:?}");
    let without_hash = |s: &str| s.split_once(',').map(|(_, rest)| rest.to_string());
    assert_eq!(
        without_hash(&a.stdout),
        without_hash(&b.stdout),
        "{a:?} {b:?}"
    );
    assert!(without_hash(&a.stdout).is_some_and(|r| r.contains("\"totalKey\":")));
    let rev = m.ctl(&["endpoint", "status", "-w", "json"]).stdout;
    let rev = rev
        .split("\"revision\":")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    assert!(
        a.stdout.contains(&format!("\"revision\":{rev},")),
        "{a:?} vs revision {rev}"
    );

    // A corrupted file is refused, and nothing is written.
    let bad = m.dir.path().join("bad.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&bad, bytes).unwrap();
    let target = m.dir.path().join("restored");
    let out = cairn(&[
        "snapshot",
        "restore",
        bad.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr, "Error: snapshot: sha256 checksum mismatch\n");
    assert!(!target.exists());
    let out = cairn(&["snapshot", "status", bad.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    // An existing data dir is never overwritten.
    let out = cairn(&[
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        m.data_dir().to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("exists"), "{out:?}");
    // The restored member serves the data.
    let r = Member::start_from_snapshot(Kind::Cairn, &file).unwrap();
    assert_eq!(r.ctl(&["get", "a", "--print-value-only"]).stdout, "6\n");
}
