//! The peer port under hostile input (issue 21, in part): requests from outside the cluster
//! are refused, and a raw proposal that the API would have refused is applied without
//! crashing the member, now and after a restart.

use cairn::proto::etcdserverpb::LeaseGrantRequest;
use cairn::proto::peerpb::peer_client::PeerClient;
use cairn::proto::raftpb::{internal_request::Request, Batch, InternalRequest};

use crate::harness::{http_get, Kind, Member};

/// Sends `batch` as a raw peer Propose with the given cluster and sender IDs (0: none).
async fn propose_raw(
    m: &Member,
    cluster_id: u64,
    sender: u64,
    batch: Batch,
) -> Result<(), tonic::Status> {
    let mut client = PeerClient::connect(format!("http://127.0.0.1:{}", m.peer_port))
        .await
        .unwrap();
    let mut req = tonic::Request::new(batch);
    for (key, id) in [
        (cairn::raft::CLUSTER_ID_HEADER, cluster_id),
        (cairn::raft::MEMBER_ID_HEADER, sender),
    ] {
        if id != 0 {
            req.metadata_mut()
                .insert(key, format!("{id:x}").parse().unwrap());
        }
    }
    client.propose(req).await.map(|_| ())
}

#[tokio::test]
async fn a_raw_lease_grant_with_a_huge_ttl_crashes_no_member() {
    let mut m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    let header = c.status().await.unwrap().header().unwrap().clone();
    let (cluster_id, member_id) = (header.cluster_id(), header.member_id());
    let grant = |id: i64, ttl: i64| InternalRequest {
        request: Some(Request::LeaseGrant(LeaseGrantRequest { ttl, id })),
        ..Default::default()
    };
    let batch = |proposer| Batch {
        requests: vec![grant(5, i64::MAX), grant(0, 10), grant(6, 60)],
        proposer,
        seq: 1,
    };
    // Not a member: no cluster ID, another cluster's, no sender or one that is not a member,
    // a batch another member proposed: refused before Raft.
    for (cluster, sender, proposer) in [
        (0, 0, 0),
        (cluster_id ^ 1, member_id, member_id),
        (cluster_id, 0, 0),
        (cluster_id, 0x1234, 0x1234),
        (cluster_id, member_id, 0x1234),
    ] {
        let e = propose_raw(&m, cluster, sender, batch(proposer))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    }
    assert!(c.leases().await.unwrap().leases().is_empty());
    // As the member itself (what peer TLS is to keep others from doing), the proposal goes to
    // Raft. The API refuses both bad grants; a TTL of i64::MAX once panicked the lessor when
    // applied (`overflow when adding duration to instant`) and stopped Raft.
    propose_raw(&m, cluster_id, member_id, batch(member_id))
        .await
        .unwrap();
    for round in ["after the proposal", "after a restart"] {
        let mut c = m.client().await;
        c.put("still", "writable", None)
            .await
            .unwrap_or_else(|e| panic!("{round}: {e}\n{}", m.log()));
        let leases: Vec<i64> = c
            .leases()
            .await
            .unwrap()
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        assert_eq!(leases, vec![6], "{round}: only the valid grant applied");
        let health = http_get(m.client_port, "/health").unwrap_or_default();
        assert!(health.contains(r#""health":"true""#), "{round}: {health}");
        // The entry is still in the log: applying it again at start must not crash either.
        m.restart();
    }
    assert!(!m.log().contains("panicked"), "{}", m.log());
}
