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

/// Issue 25 (migration): an etcd 3.4 snapshot of varied content — thousands of keys over
/// several bbolt pages, values bigger than a page (overflow pages), overwrites, deletes, a
/// compaction, leases with keys, users and roles with auth on — restored by etcd
/// (`etcdctl snapshot restore`) and by cairn (`cairn snapshot restore` of the same file), then
/// read the same way from both: every key with its create/mod revisions, versions and lease,
/// reads at past revisions (compacted ones refused alike), leases, users and roles, and the
/// revision of the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_snapshot_restored_by_cairn_as_by_etcd() {
    use etcd_client::PutOptions;
    let src = Member::start(Kind::Etcd);
    let lease_id = write_history(&src);
    let mut c = src.client().await;
    // Many keys: the key bucket spans many leaf pages and a branch level.
    for i in 0..3000 {
        c.put(format!("many/{i:05}"), format!("value-{i}"), None)
            .await
            .unwrap();
    }
    // Values of several pages each.
    for i in 0..4 {
        let big = vec![b'a' + i as u8; 20_000 + i * 7_000];
        c.put(format!("big/{i}"), big, None).await.unwrap();
    }
    // Overwrites and deletes, then a compaction in the middle of them.
    for i in 0..200 {
        c.put(format!("many/{i:05}"), format!("again-{i}"), None)
            .await
            .unwrap();
    }
    let mid = c.put("mid", "m", None).await.unwrap();
    let compact_at = mid.header().unwrap().revision();
    c.delete(
        "many/0001",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    c.compact(compact_at, None).await.unwrap();
    let lease2 = c.lease_grant(7200, None).await.unwrap().id();
    c.put(
        "leased/two",
        "y",
        Some(PutOptions::new().with_lease(lease2)),
    )
    .await
    .unwrap();
    for i in 200..260 {
        c.put(format!("many/{i:05}"), "late", None).await.unwrap();
    }
    let last = c
        .put("last", "z", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // Users and roles, auth on.
    for args in [
        vec!["role", "add", "reader"],
        vec![
            "role",
            "grant-permission",
            "reader",
            "read",
            "many/",
            "--prefix",
        ],
        vec!["user", "add", "alice:secret"],
        vec!["user", "grant-role", "alice", "reader"],
        vec!["user", "add", "root:rootpw"],
        vec!["user", "grant-role", "root", "root"],
        vec!["auth", "enable"],
    ] {
        let out = src.ctl(&args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let file = src.dir.path().join("etcd.snap");
    let out = src.ctl(&[
        "--user=root:rootpw",
        "snapshot",
        "save",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    drop(c);
    let path = file.to_str().unwrap();
    // `snapshot status` of etcd's file gives etcd's numbers (a CRC-32C over every bucket's
    // keys and values: the reader walked the same bbolt pages).
    let theirs = src.ctl(&["snapshot", "status", path, "-w", "json"]);
    let ours = cairn(&["snapshot", "status", path, "-w", "json"]);
    assert_eq!(theirs.code, 0, "{theirs:?}");
    assert_eq!(ours.stdout, theirs.stdout, "{ours:?}");
    // A damaged copy is refused before anything is written.
    let damaged = src.dir.path().join("damaged.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&damaged, bytes).unwrap();
    let target = src.dir.path().join("never");
    let out = cairn(&[
        "snapshot",
        "restore",
        damaged.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("sha256 checksum mismatch"), "{out:?}");
    assert!(!target.exists());
    // As etcdctl's restore does, a data dir whose parents do not exist yet is made; nothing
    // of the conversion is left beside it.
    let deeper = src.dir.path().join("deeper/still");
    let out = cairn(&[
        "snapshot",
        "restore",
        path,
        "--data-dir",
        deeper.join("data").to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let left: Vec<_> = std::fs::read_dir(&deeper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["data"], "{left:?}");

    let root = ["--user=root:rootpw"];
    let reads = |m: &Member| -> Vec<String> {
        // etcdctl's output and its errors, without its client's JSON log lines (which hold
        // times and addresses).
        let said = |out: Out| {
            let errors: String = out
                .stderr
                .lines()
                .filter(|l| !l.starts_with('{'))
                .map(|l| format!("{l}\n"))
                .collect();
            format!("{}{errors}", out.stdout)
        };
        let ctl = |args: &[&str]| {
            let all: Vec<&str> = root.iter().chain(args).copied().collect();
            said(m.ctl(&all))
        };
        let mask = regex::Regex::new(r#""(cluster_id|member_id|raft_term)":\d+"#).unwrap();
        let remaining = regex::Regex::new(r"remaining\(\d+s\)").unwrap();
        let compacted_rev = (compact_at - 1).to_string();
        let mid_rev = (compact_at + 5).to_string();
        let last_rev = last.to_string();
        vec![
            mask.replace_all(&ctl(&["get", "", "--from-key", "-w", "json"]), "\"$1\":_")
                .into_owned(),
            ctl(&["get", "many/", "--prefix", "--rev", &mid_rev, "--keys-only"]),
            ctl(&["get", "many/00005", "--rev", &compacted_rev]),
            ctl(&["get", "big/3", "--rev", &last_rev, "--print-value-only"])
                .len()
                .to_string(),
            ctl(&["lease", "list"]),
            remaining
                .replace(
                    &ctl(&["lease", "timetolive", &lease_id, "--keys"]),
                    "remaining(_)",
                )
                .into_owned(),
            ctl(&["user", "list"]),
            ctl(&["user", "get", "alice"]),
            ctl(&["role", "get", "reader"]),
            ctl(&["auth", "status"]).replace(char::is_numeric, "N"),
            // alice's password and permissions came along.
            said(m.ctl(&["--user=alice:secret", "get", "many/00300"])),
            said(m.ctl(&["--user=alice:secret", "put", "many/x", "1"])),
            ctl(&["put", "after", "restore", "-w", "json"])
                .split("\"revision\":")
                .nth(1)
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("")
                .to_string(),
        ]
    };
    let mut results = Vec::new();
    for kind in [Kind::Etcd, Kind::Cairn] {
        let m = Member::start_from_snapshot(kind, &file)
            .unwrap_or_else(|o| panic!("{kind:?} restore: {o:?}"));
        results.push(reads(&m));
    }
    let (etcd, cairn) = (&results[0], &results[1]);
    assert!(
        etcd[0].contains("\"count\":"),
        "{}",
        &etcd[0][..200.min(etcd[0].len())]
    );
    assert!(etcd[2].contains("compacted"), "{}", etcd[2]);
    for (i, (e, c)) in etcd.iter().zip(cairn).enumerate() {
        assert_eq!(
            e, c,
            "read {i}: etcd (left) and cairn (right) differ after restoring etcd's snapshot"
        );
    }
}

/// Hostile input: a real etcd 3.4 snapshot damaged every which way (bytes flipped in meta,
/// branch and leaf pages and values, cut short at many lengths) is never a panic and never
/// an endless walk: the converter either refuses it with an error or writes a cairn snapshot
/// that `cairn snapshot restore`'s own checks then read through (hash checking off, so that
/// the reader meets the damage).
#[test]
fn damaged_etcd_snapshots_are_errors_not_panics() {
    use rand::{Rng, SeedableRng};
    let src = Member::start(Kind::Etcd);
    write_history(&src);
    for i in 0..300 {
        let v = if i % 50 == 0 {
            "x".repeat(9000)
        } else {
            format!("v{i}")
        };
        assert_eq!(src.ctl(&["put", &format!("k/{i:04}"), &v]).code, 0);
    }
    let file = save(&src, "etcd.snap");
    let good = std::fs::read(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (damaged, out) = (dir.path().join("damaged"), dir.path().join("out"));
    let convert = |bytes: &[u8]| {
        std::fs::write(&damaged, bytes).unwrap();
        let r = cairn::snapshot::etcd::convert(&damaged, &out, false);
        if r.is_ok() {
            // What came out is read through by the restore's own checks (every record
            // decoded): accepted or refused, never a panic.
            let _ =
                cairn::raft::check_file(&out, cairn::raft::Install::Restore { check_hash: true });
        }
        r.is_ok()
    };
    assert!(convert(&good), "the undamaged file converts");
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    let (mut refused, mut accepted) = (0, 0);
    for round in 0..1500 {
        let mut bytes = good.clone();
        match round % 3 {
            // One byte anywhere.
            0 => {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] ^= 1 << rng.gen_range(0..8);
            }
            // Page headers and element tables, where offsets and counts live.
            1 => {
                let page = rng.gen_range(0..bytes.len() / 4096);
                let at = page * 4096 + rng.gen_range(0..64);
                bytes[at] = rng.gen();
            }
            // Cut short.
            _ => bytes.truncate(rng.gen_range(0..bytes.len())),
        }
        if convert(&bytes) {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("damaged etcd snapshots: {refused} refused, {accepted} converted");
    // Most damage is noticed; damage inside a value's bytes need not be (the hash check,
    // off here, is what catches it).
    assert!(refused > 500, "{refused} refused, {accepted} accepted");
}

/// A restored data dir starts whatever `--initial-cluster-token` the start is given: the
/// member keeps the ID the restore gave it (etcd's restored WAL holds its membership; cairn
/// records the restored membership and bootstraps it on the first start). Found by the e2e
/// cutover, whose restore named a token its start did not.
#[test]
fn a_restored_member_starts_with_other_bootstrap_flags() {
    let src = Member::start(Kind::Etcd);
    assert_eq!(src.ctl(&["put", "a", "1"]).code, 0);
    let file = save(&src, "etcd.snap");
    for kind in [Kind::Etcd, Kind::Cairn] {
        let mut m = Member::new(kind, &[]);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let restore = match kind {
            Kind::Etcd => "etcdctl",
            Kind::Cairn => kind.binary(),
        };
        let out: Out = Command::new(restore)
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(&file)
            .arg(format!("--data-dir={}", m.data_dir().display()))
            .args(["--name=m1", "--initial-cluster-token=restored-elsewhere"])
            .arg(format!("--initial-cluster=m1={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .output()
            .unwrap()
            .into();
        assert_eq!(out.code, 0, "{kind:?}: {out:?}");
        // Started with the harness's flags: token cairn-test.
        m.launch();
        assert_eq!(
            m.ctl(&["get", "a", "--print-value-only"]).stdout,
            "1\n",
            "{kind:?}"
        );
        let list = m.ctl(&["member", "list", "-w", "json"]).stdout;
        let id: u64 = list
            .split("\"ID\":")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or_default()
            .parse()
            .unwrap();
        // cairn's restore names the member it made: the one that serves.
        if kind == Kind::Cairn {
            let made = out
                .stdout
                .split("for member ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(|h| u64::from_str_radix(h, 16).unwrap());
            assert_eq!(made, Some(id), "{out:?} {list}");
        }
    }
}

/// `cairn snapshot verify`: a snapshot restores into a scratch member that opens and holds the
/// revision, key count and HashKV its member answered when it was taken; a wrong count or
/// hash, or a damaged file, is an error that says what differs; the scratch dir is removed.
#[test]
fn snapshot_verify_checks_what_a_restore_holds() {
    let m = Member::start(Kind::Cairn);
    write_history(&m);
    m.ctl(&["compact", "3"]);
    let file = save(&m, "v.snap");
    let status = m.ctl(&["endpoint", "status", "-w", "json"]).stdout;
    let revision: i64 = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap()
        .parse()
        .unwrap();
    let keys = m
        .ctl(&["get", "", "--prefix", "--keys-only"])
        .stdout
        .lines()
        .filter(|l| !l.is_empty())
        .count() as i64;
    let hashkv = m
        .ctl(&["endpoint", "hashkv", "--rev", &revision.to_string()])
        .stdout;
    let hash = hashkv.trim().rsplit(", ").next().unwrap().to_string();
    let scratch = m.dir.path().join("scratch");
    let verify = |keys: &str, hash: &str, f: &Path| {
        cairn(&[
            "snapshot",
            "verify",
            f.to_str().unwrap(),
            &format!("--revision={revision}"),
            &format!("--keys={keys}"),
            &format!("--hash={hash}"),
            &format!("--scratch-dir={}", scratch.display()),
        ])
    };
    let ok = verify(&keys.to_string(), &hash, &file);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout
            .contains(&format!("revision {revision}, {keys} keys, HashKV {hash}")),
        "{ok:?}"
    );
    assert!(!scratch.exists());
    let wrong = verify(&(keys + 1).to_string(), "12345", &file);
    assert_ne!(wrong.code, 0);
    assert!(
        wrong
            .stderr
            .contains(&format!("{keys} keys, recorded {}", keys + 1))
            && wrong
                .stderr
                .contains(&format!("HashKV {hash}, recorded 12345")),
        "{wrong:?}"
    );
    assert!(!scratch.exists());
    // The member compacts after the snapshot: its HashKV at the snapshot's revision then covers
    // fewer revisions; the scratch member is compacted to the same point before it compares.
    m.ctl(&["compact", &(revision - 1).to_string()]);
    let json = m
        .ctl(&[
            "endpoint",
            "hashkv",
            "--rev",
            &revision.to_string(),
            "-w",
            "json",
        ])
        .stdout;
    let field = |name: &str| -> String {
        json.split(&format!("\"{name}\":"))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or_else(|| panic!("{name} in {json}"))
            .to_string()
    };
    let (later_hash, compacted) = (field("hash"), field("compact_revision"));
    assert_eq!(compacted, (revision - 1).to_string());
    let without = verify(&keys.to_string(), &later_hash, &file);
    assert_ne!(
        without.code, 0,
        "a HashKV taken after a compaction differs: {without:?}"
    );
    let with = cairn(&[
        "snapshot",
        "verify",
        file.to_str().unwrap(),
        &format!("--revision={revision}"),
        &format!("--keys={keys}"),
        &format!("--hash={later_hash}"),
        &format!("--hash-compact-revision={compacted}"),
        &format!("--scratch-dir={}", scratch.display()),
    ]);
    assert_eq!(with.code, 0, "{with:?}");
    // A damaged copy never opens.
    let damaged = m.dir.path().join("damaged.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x10;
    std::fs::write(&damaged, bytes).unwrap();
    let bad = verify(&keys.to_string(), &hash, &damaged);
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(!scratch.exists());
}
