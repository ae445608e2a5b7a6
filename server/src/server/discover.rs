//! A joining member (`--initial-cluster-state existing`) finds its member
//! and cluster IDs in the membership the running members report.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::proto::peerpb::peer_client::PeerClient;
use crate::proto::peerpb::MembersRequest;
use crate::storage::Identity;

/// A joining member (`--initial-cluster-state existing`) asks the members
/// in `--initial-cluster` for the cluster's membership and finds itself in
/// it by its peer URLs (it must have been added with MemberAdd).
pub(super) async fn discover(
    cfg: &Config,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Identity> {
    let mut mine = cfg.advertise_peer_urls.clone();
    mine.sort();
    let mut last = String::from("no other member in --initial-cluster");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        for (name, urls) in &cfg.initial_cluster {
            if *name == cfg.name {
                continue;
            }
            for url in urls {
                let mut client = PeerClient::new(crate::raft::connect(url, tls)?);
                let call = client.members(MembersRequest { id: 0 });
                let resp = match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(e)) => {
                        last = format!("{url}: {}", e.message());
                        continue;
                    }
                    Err(_) => {
                        last = format!("{url}: timed out");
                        continue;
                    }
                };
                for m in &resp.members {
                    let mut theirs = m.peer_ur_ls.clone();
                    theirs.sort();
                    if theirs == mine {
                        // A member that already ran (it published its client
                        // URLs) has a log this empty data dir lost: it must be
                        // removed and added again, as etcd requires. One of the
                        // initial members that never ran has a name but no
                        // client URLs, and joins (etcd's isMemberBootstrapped).
                        if !m.client_ur_ls.is_empty() {
                            return Err(Error::Internal(format!(
                                "member {:x} has already been bootstrapped",
                                m.id
                            )));
                        }
                        return Ok(Identity {
                            cluster_id: resp.cluster_id,
                            member_id: m.id,
                        });
                    }
                }
                return Err(Error::Internal(format!(
                    "member with peer URLs {} is not in the cluster's membership (add it with `etcdctl member add` first)",
                    mine.join(",")
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Internal(format!(
        "cannot fetch the cluster's membership from --initial-cluster: {last}"
    )))
}
