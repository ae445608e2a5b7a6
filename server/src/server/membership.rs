//! Cluster membership as etcd's Cluster API exposes it, on Raft's
//! membership config: add (voter or learner), remove, update, promote, and
//! each member publishing its name and client URLs once it runs.
//!
//! Changes run on the leader, one at a time; any other member forwards them
//! there through the peer service.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    Member as PbMember, MemberAddRequest, MemberAddResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use crate::proto::peerpb::{PublishRequest, PublishResponse};
use crate::raft::Member;
use crate::server::EtcdServer;

/// etcd allows one learner at a time (`maxLearners`).
const MAX_LEARNERS: usize = 1;
/// A learner may be promoted once it has this share of the leader's log.
const LEARNER_READY_PERCENT: f64 = 0.9;

/// A majority of `voters`.
fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

impl EtcdServer {
    /// Members in etcd's wire form.
    pub fn member_list(&self) -> Vec<PbMember> {
        self.members()
            .into_iter()
            .map(|(id, m, learner)| PbMember {
                id,
                name: m.name,
                peer_ur_ls: m.peer_urls,
                client_ur_ls: m.client_urls,
                is_learner: learner,
            })
            .collect()
    }

    /// Voters that answered the leader recently (the leader counts itself).
    fn started_voters(&self, voters: impl Iterator<Item = u64>) -> usize {
        let within = 2 * self.cfg.election_timeout;
        voters
            .filter(|id| *id == self.member_id || self.peers.active(*id, within))
            .count()
    }

    /// Applies a membership change on the leader, retrying while another
    /// change is still in progress.
    async fn change(&self, changes: ChangeMembers<u64, Member>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.request_timeout();
        loop {
            if !self.is_leader() {
                return Err(Error::NotLeader);
            }
            match self.raft.change_membership(changes.clone(), false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(Error::LeaderChanged)
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) => return Err(Error::Timeout),
                Err(e) => return Err(Error::Internal(format!("membership change: {e}"))),
            }
        }
    }

    /// MemberAdd on the leader.
    pub async fn member_add(&self, req: MemberAddRequest) -> Result<MemberAddResponse> {
        let mut urls = Vec::new();
        for u in &req.peer_ur_ls {
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => {
                    urls.push(u.trim_end_matches('/').to_string())
                }
                _ => return Err(Error::BadUrls),
            }
        }
        if urls.is_empty() {
            return Err(Error::BadUrls);
        }
        if self
            .restore_pending
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Restored data is not in the Raft log yet: a new member would miss it.
            return Err(Error::Unhealthy);
        }
        let _guard = self.membership_lock.lock().await;
        let members = self.members();
        if members
            .iter()
            .any(|(_, m, _)| m.peer_urls.iter().any(|u| urls.contains(u)))
        {
            return Err(Error::PeerUrlExist);
        }
        if req.is_learner {
            if members.iter().filter(|(_, _, l)| *l).count() >= MAX_LEARNERS {
                return Err(Error::TooManyLearners);
            }
        } else {
            // etcd's strict reconfiguration check: the new voter has not
            // started, so the started voters must be a quorum of the new
            // configuration.
            let voters: Vec<u64> = members
                .iter()
                .filter(|(_, _, l)| !*l)
                .map(|(id, _, _)| *id)
                .collect();
            if self.started_voters(voters.iter().copied()) < quorum(voters.len() + 1) {
                return Err(Error::NotEnoughStartedMembers);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // etcd's ID: peer URLs, cluster token and the time. An ID that was ever a member here
        // is never handed out again (a replacement re-adds the same URLs, possibly within the
        // same second): removal is told apart from "not added yet" by ID.
        let fresh = |t: u64| {
            let id =
                crate::config::member_id(&urls, &format!("{}{t}", self.cfg.initial_cluster_token));
            (id != 0 && !members.iter().any(|(m, _, _)| *m == id) && !self.state.history.ever(id))
                .then_some(id)
        };
        let id = (now..now + 1000)
            .find_map(fresh)
            .ok_or(Error::MemberExist)?;
        let node = Member {
            name: String::new(),
            peer_urls: urls.clone(),
            client_urls: Vec::new(),
        };
        let nodes = BTreeMap::from([(id, node)]);
        let change = if req.is_learner {
            ChangeMembers::AddNodes(nodes)
        } else {
            ChangeMembers::AddVoters(nodes)
        };
        self.change(change).await?;
        info!(
            member = format!("{id:x}"),
            learner = req.is_learner,
            urls = urls.join(","),
            "added member"
        );
        Ok(MemberAddResponse {
            header: Some(self.header_without_revision()),
            member: Some(PbMember {
                id,
                name: String::new(),
                peer_ur_ls: urls,
                client_ur_ls: Vec::new(),
                is_learner: req.is_learner,
            }),
            members: self.member_list(),
        })
    }

    /// MemberRemove on the leader.
    pub async fn member_remove(&self, req: MemberRemoveRequest) -> Result<MemberRemoveResponse> {
        let _guard = self.membership_lock.lock().await;
        let members = self.members();
        let Some((_, _, learner)) = members.iter().find(|(id, _, _)| *id == req.id) else {
            return Err(Error::MemberNotFound);
        };
        let change = if *learner {
            ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))
        } else {
            let rest: Vec<u64> = members
                .iter()
                .filter(|(id, _, l)| !*l && *id != req.id)
                .map(|(id, _, _)| *id)
                .collect();
            if rest.is_empty() || self.started_voters(rest.iter().copied()) < quorum(rest.len()) {
                return Err(Error::Unhealthy);
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([req.id]))
        };
        self.change(change).await?;
        info!(member = format!("{:x}", req.id), "removed member");
        Ok(MemberRemoveResponse {
            header: Some(self.header_without_revision()),
            members: self.member_list(),
        })
    }

    /// MemberUpdate (new peer URLs) on the leader.
    pub async fn member_update(&self, req: MemberUpdateRequest) -> Result<MemberUpdateResponse> {
        let _guard = self.membership_lock.lock().await;
        let members = self.members();
        let Some((_, node, _)) = members.iter().find(|(id, _, _)| *id == req.id) else {
            return Err(Error::MemberNotFound);
        };
        if members.iter().any(|(id, m, _)| {
            *id != req.id && m.peer_urls.iter().any(|u| req.peer_ur_ls.contains(u))
        }) {
            return Err(Error::PeerUrlExist);
        }
        let node = Member {
            peer_urls: req.peer_ur_ls.clone(),
            ..node.clone()
        };
        self.change(ChangeMembers::SetNodes(BTreeMap::from([(req.id, node)])))
            .await?;
        Ok(MemberUpdateResponse {
            header: Some(self.header_without_revision()),
            members: self.member_list(),
        })
    }

    /// MemberPromote on the leader: only a learner that has caught up.
    pub async fn member_promote(&self, req: MemberPromoteRequest) -> Result<MemberPromoteResponse> {
        let _guard = self.membership_lock.lock().await;
        let Some((_, learner)) = self.member(req.id) else {
            return Err(Error::MemberNotFound);
        };
        if !learner {
            return Err(Error::MemberNotLearner);
        }
        let m = self.raft.metrics().borrow().clone();
        let leader_index = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&req.id).cloned().flatten())
            .map(|l| l.index)
            .unwrap_or(0);
        if (matched as f64) < (leader_index as f64) * LEARNER_READY_PERCENT {
            return Err(Error::LearnerNotReady);
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])))
            .await?;
        info!(member = format!("{:x}", req.id), "promoted learner");
        Ok(MemberPromoteResponse {
            header: Some(self.header_without_revision()),
            members: self.member_list(),
        })
    }

    /// Records a member's name and client URLs (on the leader).
    pub async fn publish_member(&self, req: PublishRequest) -> Result<()> {
        let _guard = self.membership_lock.lock().await;
        let Some((node, _)) = self.member(req.id) else {
            return Err(Error::MemberNotFound);
        };
        if node.name == req.name && node.client_urls == req.client_urls {
            return Ok(());
        }
        let node = Member {
            name: req.name,
            client_urls: req.client_urls,
            ..node
        };
        self.change(ChangeMembers::SetNodes(BTreeMap::from([(req.id, node)])))
            .await
    }
}

impl EtcdServer {
    /// MoveLeader on the leader. openraft 0.9 has no leadership transfer,
    /// and its voters refuse to vote while they heard from a leader within
    /// an election timeout; so: proposals and reads wait, the other voters
    /// hold off campaigning, the transferee catches up, the leader goes
    /// quiet for an election timeout, then the transferee campaigns. Writes
    /// pause for about one election timeout (etcd's transfer also waits for
    /// the transferee to catch up).
    pub async fn move_leader(&self, target: u64) -> Result<()> {
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        if target == self.member_id {
            return Ok(());
        }
        let members = self.members();
        let Some((_, node, false)) = members.iter().find(|(id, _, _)| *id == target) else {
            return Err(Error::BadLeaderTransferee);
        };
        let target_client = self.peers.client(target, &node.peer_urls)?;
        let others: Vec<(u64, Member)> = members
            .iter()
            .filter(|(id, _, learner)| !*learner && *id != target && *id != self.member_id)
            .map(|(id, m, _)| (*id, m.clone()))
            .collect();
        let _membership = self.membership_lock.lock().await;
        let _quiet = self.transfer_gate.write().await;
        let hold = |kind: crate::proto::peerpb::elect_request::Kind| {
            let others = others.clone();
            async move {
                for (id, m) in others {
                    if let Ok(mut c) = self.peers.client(id, &m.peer_urls) {
                        let mut r = self
                            .peers
                            .request(crate::proto::peerpb::ElectRequest { kind: kind as i32 });
                        r.set_timeout(Duration::from_secs(1));
                        let _ = c.elect(r).await;
                    }
                }
            }
        };
        use crate::proto::peerpb::elect_request::Kind;
        hold(Kind::Hold).await;
        let rc = self.raft.runtime_config();
        rc.elect(false);
        let result = self.transfer(target, target_client).await;
        rc.heartbeat(true);
        rc.elect(true);
        hold(Kind::Release).await;
        result
    }

    async fn transfer(
        &self,
        target: u64,
        mut client: crate::proto::peerpb::peer_client::PeerClient<tonic::transport::Channel>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.request_timeout();
        // The transferee catches up with the (now still) log.
        loop {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index.unwrap_or(0);
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&target).cloned().flatten())
                .map(|l| l.index)
                .unwrap_or(0);
            if matched >= last {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Quiet for an election timeout: the voters' leader leases run out.
        self.raft.runtime_config().heartbeat(false);
        tokio::time::sleep(self.cfg.election_timeout + self.cfg.heartbeat).await;
        let r = self.peers.request(crate::proto::peerpb::ElectRequest {
            kind: crate::proto::peerpb::elect_request::Kind::Campaign as i32,
        });
        client.elect(r).await.map_err(|s| Error::from_peer(&s))?;
        let mut rx = self.raft.metrics();
        let moved = async move {
            rx.wait_for(|m| m.current_leader == Some(target))
                .await
                .is_ok()
        };
        match tokio::time::timeout(2 * self.cfg.election_timeout, moved).await {
            Ok(true) => {
                info!(to = format!("{target:x}"), "leadership moved");
                Ok(())
            }
            _ => Err(Error::Timeout),
        }
    }
}

/// Publishes this member's name and client URLs into the membership once a
/// leader is known and something is applied (again whenever they differ, e.g.
/// after a restart with new flags), as etcd members do on start.
pub async fn publish(server: std::sync::Weak<EtcdServer>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(s) = server.upgrade() else { return };
        let Some((node, _)) = s.member(s.member_id) else {
            continue;
        };
        if node.name == s.cfg.name && node.client_urls == s.cfg.advertise_client_urls {
            return;
        }
        // Not before this member has applied anything (a new member, until its first
        // snapshot is loaded): the change makes openraft restart replication to every
        // member, and a snapshot transfer under way would start over.
        if s.leader() == 0 || s.state.applied().0.is_none() {
            continue;
        }
        let req = PublishRequest {
            id: s.member_id,
            name: s.cfg.name.clone(),
            client_urls: s.cfg.advertise_client_urls.clone(),
        };
        let forwarded = req.clone();
        let result = s
            .on_leader(
                async || s.publish_member(req).await.map(|()| PublishResponse {}),
                async |mut c| c.publish(s.peers.request(forwarded)).await,
            )
            .await;
        match result {
            Ok(_) => info!(name = s.cfg.name, "published member attributes"),
            Err(e) => warn!("publishing member attributes: {e}"),
        }
    }
}
