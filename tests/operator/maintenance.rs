//! Scheduled maintenance against real cairn members on loopback: a defragmentation run driven
//! by the operator's planner ([`next_defrag`]) and its Defragment calls, under a writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_operator::layout::Layout;
use cairn_operator::maintenance::{next_defrag, Defrag};

use crate::cluster::{wait_leader, Pods};

/// Every member of a 3-member cluster holding deleted and overwritten data is defragmented,
/// one at a time, followers first and the leader last, while a writer writes: the run never
/// proceeds past a member that did not answer, each member serves afterwards, and every
/// acknowledged write is on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragmentation_of_every_member_under_a_writer_leader_last() {
    let mut pods = Pods::new("defrag");
    pods.bootstrap(3);
    wait_leader(&pods).await;
    // Something to rewrite: keys written, overwritten and deleted, then compacted.
    let mut c = etcd_client::Client::connect(pods.endpoints(), None)
        .await
        .unwrap();
    for round in 0..3 {
        for i in 0..300 {
            c.put(format!("bulk/{i:04}"), vec![round as u8; 2048], None)
                .await
                .unwrap();
        }
    }
    c.delete(
        "bulk/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = crate::upgrade::start_writer(&pods, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut done = Vec::new();
    let mut order = Vec::new();
    let leader_at_start = pods.members().observe().await.unwrap().leader.unwrap();
    loop {
        let view = pods.members().observe().await.unwrap();
        match next_defrag(&pods.layout, &view, &done) {
            Defrag::Member {
                id,
                ordinal,
                leader,
            } => {
                pods.members()
                    .defragment(&pods.layout.client_url(ordinal))
                    .await
                    .unwrap();
                order.push((id, leader));
                done.push(id);
                // The member serves again right after.
                let mut m = etcd_client::Client::connect([pods.layout.client_url(ordinal)], None)
                    .await
                    .unwrap();
                m.get(
                    "load/",
                    Some(etcd_client::GetOptions::new().with_count_only()),
                )
                .await
                .unwrap();
            }
            Defrag::Done => break,
            Defrag::Wait(why) => panic!("the run waits on a healthy cluster: {why}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (acked, _) = writer.await.unwrap();
    assert_eq!(order.len(), 3, "{order:?}");
    assert!(order[..2].iter().all(|(_, leader)| !leader), "{order:?}");
    assert!(order[2].1, "the leader is not last: {order:?}");
    assert_eq!(order[2].0, leader_at_start);
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    crate::membership::assert_all_present(&pods, &acked).await;
}
