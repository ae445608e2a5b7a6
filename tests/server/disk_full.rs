//! A member whose filesystem fills up (a small tmpfs the test mounts as its data dir) stops
//! reporting healthy and exits non-zero, as etcd does, so that Kubernetes restarts it; given
//! space again it starts with every acknowledged write.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{http_get, Kind, Member};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs (root needed): {out:?}");
        Tmpfs(dir)
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_member_and_loses_no_acknowledged_write() {
    let mut m = Member::new(Kind::Cairn, &[]);
    let fs = Tmpfs::mount(m.data_dir(), "96m");
    m.launch();
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(10));
    let mut c = etcd_client::Client::connect([m.url()], Some(opts))
        .await
        .unwrap();
    let value = vec![b'x'; 256 << 10];
    let mut acked = Vec::new();
    let mut failed = None;
    for i in 0..2000 {
        let key = format!("fill/{i:05}");
        match c.put(key.clone(), value.clone(), None).await {
            Ok(_) => acked.push(key),
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let failed = failed.expect("96 MiB never filled up");
    assert!(
        !acked.is_empty(),
        "nothing was written before the disk filled"
    );

    // Unhealthy (or already gone), then exited non-zero.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = m.exit_status() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the member did not exit on a full disk (put failed with: {failed}):\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success(), "{status}\n{}", m.log());
    assert!(
        http_get(m.client_port, "/health").is_none(),
        "still answering"
    );
    assert!(
        m.log().contains("raft stopped") && m.log().contains("No space left on device"),
        "{}",
        m.log()
    );

    // With space again it starts, and every acknowledged write is there.
    fs.resize("1g");
    m.restart();
    let mut c = m.client().await;
    let r = c
        .get(
            "fill/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let have: std::collections::HashSet<&str> =
        r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|k| !have.contains(k.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(3)]
    );
    c.put("after", "space", None).await.unwrap();
}
