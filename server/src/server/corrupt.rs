//! Corruption checks (etcd's `--experimental-initial-corrupt-check` and
//! `--experimental-corrupt-check-time`): members compare their key-space hashes at one
//! revision (HashKV through the peer service). Hashes are only compared between members with
//! the same compaction revision, and a member that has not reached the revision yet is skipped,
//! as etcd does. At start a member that differs from a peer does not serve; on the leader, a
//! periodic check raises a CORRUPT alarm for each member that differs, after which the cluster
//! serves nothing but maintenance (etcd's `etcdserver: corrupt cluster`) until the member is
//! replaced and the alarm disarmed.

use std::time::Duration;

use tracing::{error, info, warn};

use super::EtcdServer;
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, HashKvRequest, HashKvResponse,
};
use crate::proto::raftpb::internal_request::Request as Internal;

/// How long a peer has to answer HashKV.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdServer {
    /// This member's key-space hash at `revision` (0: the current one), as HashKV answers.
    pub async fn hash_kv(&self, revision: i64) -> Result<HashKvResponse> {
        let state = self.state.clone();
        let (hash, compacted, rev, current) = tokio::task::spawn_blocking(move || {
            let (view, compacted, rev, current, kept) = {
                let store = state.store.read();
                let current = store.revision();
                let rev = if revision <= 0 { current } else { revision };
                if rev > current {
                    return Err(Error::FutureRev);
                }
                if rev < store.compacted() {
                    return Err(Error::Compacted);
                }
                let kept = store.kept_at_compacted();
                (state.engine.view(), store.compacted(), rev, current, kept)
            };
            Ok((
                view.hash_kv(rev, compacted, &kept)?,
                compacted,
                rev,
                current,
            ))
        })
        .await
        .map_err(Error::internal)??;
        Ok(HashKvResponse {
            header: Some(self.header(current)),
            hash,
            compact_revision: compacted,
            hash_revision: rev,
        })
    }

    /// The members (other than this one) whose hash at this member's current revision
    /// differs from this member's, with the same compaction; peers that do not answer, have
    /// not reached the revision or compacted differently are skipped.
    pub(crate) async fn peers_differing(&self) -> Result<Vec<(u64, String)>> {
        let own = self.hash_kv(0).await?;
        let mut differing = Vec::new();
        for (id, member, _learner) in self.members() {
            if id == self.member_id {
                continue;
            }
            let mut client = match self.peers.client(id, &member.peer_urls) {
                Ok(c) => c,
                Err(e) => {
                    warn!(peer = format!("{id:x}"), error = %e, "corruption check: peer not reachable");
                    continue;
                }
            };
            let ask = client.hash_kv(self.peers.request(HashKvRequest {
                revision: own.hash_revision,
            }));
            let theirs = match tokio::time::timeout(PEER_TIMEOUT, ask).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    info!(peer = format!("{id:x}"), status = %s.message(), "corruption check: peer skipped");
                    continue;
                }
                Err(_) => {
                    warn!(
                        peer = format!("{id:x}"),
                        "corruption check: peer did not answer"
                    );
                    continue;
                }
            };
            if theirs.compact_revision == own.compact_revision && theirs.hash != own.hash {
                differing.push((
                    id,
                    format!(
                        "member {id:x} has hash {} at revision {} (compacted at {}), member {:x} has {}",
                        theirs.hash, own.hash_revision, own.compact_revision, self.member_id, own.hash
                    ),
                ));
            }
        }
        Ok(differing)
    }

    /// `--experimental-initial-corrupt-check`: before serving clients, this member's hash at
    /// its revision against the peers'. A difference stops the member (etcd's "found data
    /// inconsistency with peers"); peers that cannot be asked are only logged.
    pub async fn initial_corrupt_check(&self) -> Result<()> {
        info!("checking the data's consistency with the peers before serving");
        let differing = self.peers_differing().await?;
        if differing.is_empty() {
            return Ok(());
        }
        for (_, why) in &differing {
            error!("{why}");
        }
        Err(Error::DataInconsistency(format!(
            "member {:x} found data inconsistency with peers: {}",
            self.member_id,
            differing
                .iter()
                .map(|(_, w)| w.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }

    /// Whether a CORRUPT alarm is raised for any member.
    pub fn corrupt(&self) -> bool {
        self.alarms()
            .iter()
            .any(|a| a.alarm == AlarmType::Corrupt as i32)
    }
}

/// `--experimental-corrupt-check-time`: on the leader, every `every`, the members' hashes
/// against the leader's; a CORRUPT alarm for each member that differs.
pub(super) async fn periodic(server: std::sync::Weak<EtcdServer>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(s) = server.upgrade() else { return };
        if !s.is_leader() {
            continue;
        }
        let differing = match s.peers_differing().await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "corruption check");
                continue;
            }
        };
        for (id, why) in differing {
            error!("{why}; raising a CORRUPT alarm for member {id:x}");
            let alarm = AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: id,
                alarm: AlarmType::Corrupt as i32,
            };
            if let Err(e) = s
                .propose_as::<crate::proto::etcdserverpb::AlarmResponse>(
                    Internal::Alarm(alarm),
                    None,
                )
                .await
            {
                warn!(error = %e, "raising the CORRUPT alarm");
            }
        }
    }
}
