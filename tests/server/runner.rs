//! etcd's own client checkers (`etcd-runner` from Debian's etcd 3.4 source,
//! built by `tests/bench/etcd-tools.sh`): election, lock-racer and watcher
//! against a 3-member cairn cluster, with clients spread over all members.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::harness::Kind;

fn runner() -> String {
    let dir = std::env::var("CAIRN_TOOLS")
        .unwrap_or_else(|_| format!("{}/.cache/cairn-tools", std::env::var("HOME").unwrap()));
    let bin = format!("{dir}/etcd-runner");
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} is missing: run tests/bench/etcd-tools.sh (tests/run.sh does)"
    );
    bin
}

fn run(c: &Cluster, args: &[&str]) {
    let eps: Vec<String> = c.live().iter().map(|s| c.endpoint(*s)).collect();
    let t = Instant::now();
    let out = Command::new("timeout")
        .arg("240")
        .arg(runner())
        .args(args)
        .arg(format!("--endpoints={}", eps.join(",")))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // clientv3 logs every cancelled call; the rest is the checker's word.
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("context canceled"))
        .collect();
    assert!(
        out.status.success(),
        "etcd-runner {args:?} failed ({}) after {:?}:\n{}\n{}",
        out.status,
        t.elapsed(),
        said.join("\n"),
        c.logs()
    );
    eprintln!("etcd-runner {args:?}: passed in {:?}", t.elapsed());
}

#[test]
fn etcd_runner_checkers_pass_on_three_members() {
    let c = Cluster::start(Kind::Cairn, 3, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && c.ctl(&c.live(), &["endpoint", "health"]).code != 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    run(
        &c,
        &[
            "election",
            "cairn-election",
            "--rounds=20",
            "--req-rate=1000",
        ],
    );
    run(
        &c,
        &["lock-racer", "cairn-lock", "--rounds=20", "--req-rate=1000"],
    );
    run(&c, &["watcher", "--rounds=3", "--req-rate=2000"]);
}
