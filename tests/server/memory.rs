//! Memory bounded by design (issue 22): a database larger than a set limit moves to a new
//! member by a Raft snapshot, and is restored from a snapshot file, with the processes' peak
//! resident memory checked (`VmHWM` from /proc, reset on the leader through `clear_refs`;
//! the restore's from `getrusage`). A design that held the snapshot in memory, whole or
//! serialized, would pass the limit by the database's size.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::harness::Kind;

/// Keys of 1 MiB written: a database half again the limit.
const KEYS: usize = 200;
const VALUE: usize = 1 << 20;
/// The limit on peak memory growth (issue 22: 128 MiB for a 1 GiB database).
const LIMIT_KIB: u64 = 128 << 10;

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Distinct bytes that do not compress: RocksDB and the transfer see them as they are.
fn value(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VALUE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// `"revision":N` of `etcdctl endpoint status -w json` on `slot`.
fn revision(c: &Cluster, slot: usize) -> Option<i64> {
    let out = c.ctl(&[slot], &["endpoint", "status", "-w", "json"]);
    let at = out.stdout.find("\"revision\":")? + "\"revision\":".len();
    let digits: String = out.stdout[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn snapshots_move_and_restore_in_bounded_memory() {
    // A snapshot count this small makes the leader snapshot and purge its log during the
    // load, so the new member can only catch up by snapshot.
    let mut c = Cluster::start(Kind::Cairn, 1, &["--snapshot-count", "10"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = c.client(&[1]).await;
        let mut tasks = Vec::new();
        for w in 0..4 {
            let mut kv = client.kv_client();
            tasks.push(tokio::spawn(async move {
                for i in (w..KEYS).step_by(4) {
                    kv.put(format!("k{i:04}"), value(i as u64), None)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let want = revision(&c, 1).unwrap();
    assert_eq!(want, KEYS as i64 + 1);

    let leader = c.pid(1).unwrap();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{leader}/comm")).unwrap(),
        "cairn\n"
    );
    // Writing 5 to clear_refs resets the peak to the resident size now.
    std::fs::write(format!("/proc/{leader}/clear_refs"), "5").unwrap();
    let leader_before = status_kib(leader, "VmRSS");

    let started = Instant::now();
    let out = c.add_member(2, true);
    assert_eq!(out.code, 0, "{out:?}");
    let learner = c.pid(2).unwrap();
    while revision(&c, 2) != Some(want) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "learner not caught up: {}",
            c.log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.log(2).contains("snapshot loaded"),
        "caught up without a snapshot: {}",
        c.log(2)
    );
    let leader_growth = status_kib(leader, "VmHWM").saturating_sub(leader_before);
    let learner_peak = status_kib(learner, "VmHWM");
    eprintln!(
        "{KEYS} MiB moved in {:?}: leader peak growth {} KiB, learner peak {} KiB",
        started.elapsed(),
        leader_growth,
        learner_peak
    );
    assert!(leader_growth < LIMIT_KIB, "leader grew {leader_growth} KiB");
    // The learner's whole peak, start included, stays under the limit.
    assert!(
        learner_peak < LIMIT_KIB,
        "learner peaked at {learner_peak} KiB"
    );
    let got = rt.block_on(async {
        let mut client = c.client(&[2]).await;
        let opts = etcd_client::GetOptions::new().with_serializable();
        client.get("k0123", Some(opts)).await.unwrap()
    });
    assert!(
        got.kvs()[0].value() == value(123).as_slice(),
        "k0123 differs on the learner"
    );

    // A snapshot file of the same database, restored: the restore's peak stays under the
    // limit too.
    let file = c.root.path().join("db.snap");
    let out = c.ctl(&[1], &["snapshot", "save", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(std::fs::metadata(&file).unwrap().len() > (KEYS * VALUE) as u64);
    let dir = c.root.path().join("restored");
    let restore = Command::new("python3")
        .args([
            "-c",
            "import resource, subprocess, sys\n\
             subprocess.run(sys.argv[1:], check=True, capture_output=True)\n\
             print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
            Kind::Cairn.binary(),
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(restore.status.success(), "{restore:?}");
    let restore_peak: u64 = String::from_utf8_lossy(&restore.stdout)
        .trim()
        .parse()
        .unwrap();
    eprintln!("restore of {KEYS} MiB: peak {restore_peak} KiB");
    assert!(
        restore_peak < LIMIT_KIB,
        "restore peaked at {restore_peak} KiB"
    );
    assert!(dir.join("member").is_dir());
}
