//! Crash test: concurrent writers, `kill -9` mid-stream, restart. Every
//! acknowledged write must be there with the revision it was acknowledged
//! at, and the revisions must be gap-free. Half the writers put 16 KiB
//! values, so the Raft log's journal fills segments, rolls over and retires
//! old ones while the writes go on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use parking_lot::Mutex;

use crate::harness::{Kind, Member};

const WRITERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_loses_no_acknowledged_write() {
    let mut m = Member::start(Kind::Cairn);
    // key -> revision at which the write was acknowledged
    let acked: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    for round in 0..3 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = m.client().await;
            let acked = acked.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                let size = if w % 2 == 0 { 100 } else { 16 << 10 };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("crash/{round}/{w}/{seq:06}");
                    match c.put(key.clone(), vec![b'v'; size], None).await {
                        Ok(r) => {
                            acked.lock().insert(key, r.header().unwrap().revision());
                        }
                        Err(_) => return,
                    }
                    seq += 1;
                }
            }));
        }
        let journal = m.data_dir().join("member").join("cairn-journal");
        let opened_at = newest_segment(&journal);
        // At least 1.5 s of writes, and until the journal has moved on to
        // another segment.
        let start = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        while newest_segment(&journal) <= opened_at && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        m.kill9();
        let killed_at = newest_segment(&journal);
        eprintln!(
            "round {round}: journal segments {opened_at:?} at start, {killed_at:?} at the kill"
        );
        assert!(
            killed_at > opened_at,
            "round {round}: the journal never rolled over"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        m.restart();
        let mut c = m.client().await;
        let resp = c
            .get(
                "crash/",
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .unwrap();
        let current = resp.header().unwrap().revision();
        let stored: BTreeMap<String, i64> = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
            .collect();
        let acked = acked.lock().clone();
        assert!(
            acked.len() > 100 * (round + 1),
            "round {round}: only {} writes acknowledged",
            acked.len()
        );
        for (k, rev) in &acked {
            assert_eq!(
                stored.get(k),
                Some(rev),
                "round {round}: acknowledged write {k}@{rev} lost or changed"
            );
        }
        // Every write is a put of a new key: revisions 2..=current, no gaps.
        let mut revs: Vec<i64> = stored.values().copied().collect();
        revs.sort();
        let expected: Vec<i64> = (2..=current).collect();
        assert_eq!(revs, expected, "round {round}: revisions are not gap-free");
        eprintln!(
            "round {round}: {} acknowledged, {} stored, revision {current}",
            acked.len(),
            stored.len()
        );
    }
}

/// The sequence number of the newest segment of the log's journal.
fn newest_segment(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            u64::from_str_radix(name.to_str()?.strip_suffix(".wal")?, 16).ok()
        })
        .max()
}
