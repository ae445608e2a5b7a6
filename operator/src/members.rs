//! Membership through the etcd API, with the `etcd-client` crate, exactly as a user would do it
//! with etcdctl: observe (MemberList plus a Status per member), add a learner, promote it, move
//! leadership, remove a member. Deciding which of these to do is `plan`'s job, not this module's.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, MemberAddOptions, MemberListResponse};
use futures::future::join_all;

use crate::layout::Layout;
use crate::plan::{ClusterView, ObservedMember, Step};

/// How long one call to a member may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a connection to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// etcd's answer to promoting a learner that is still behind.
const NOT_IN_SYNC: &str = "can only promote a learner member which is in sync with leader";

/// Errors of membership calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no member answered at {endpoints:?}: {source}")]
    Unreachable {
        endpoints: Vec<String>,
        source: etcd_client::Error,
    },
    #[error("{op}: {source}")]
    Call {
        op: &'static str,
        source: etcd_client::Error,
    },
    #[error("the leader has no client URL")]
    LeaderUnknown,
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
}

async fn connect(endpoints: &[String]) -> Result<Client, Error> {
    Client::connect(endpoints, Some(options()))
        .await
        .map_err(|source| Error::Unreachable {
            endpoints: endpoints.to_vec(),
            source,
        })
}

/// The result of a step's membership calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The learner has not caught up with the leader yet (etcd refuses until it has).
    LearnerBehind,
}

/// A handle on one cluster, reached through any of `endpoints`.
pub struct Members {
    endpoints: Vec<String>,
}

impl Members {
    pub fn new(endpoints: Vec<String>) -> Members {
        Members { endpoints }
    }

    /// A client on the first endpoint whose member answers, with the member list it gave. One
    /// endpoint at a time: a balanced channel over all of them would send some calls to members
    /// that are down.
    async fn reach(&self) -> Result<(Client, MemberListResponse), Error> {
        let mut last = None;
        for e in &self.endpoints {
            let attempt = async {
                let mut c = Client::connect([e], Some(options())).await?;
                let list = c.member_list().await?;
                Ok::<_, etcd_client::Error>((c, list))
            };
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(err)) => last = Some(err),
                Err(_) => last = Some(etcd_client::Error::InvalidArgs(format!("{e}: timed out"))),
            }
        }
        Err(Error::Unreachable {
            endpoints: self.endpoints.clone(),
            source: last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no endpoints".into())),
        })
    }

    /// The member list, the leader and each member's health (its own Status answer).
    pub async fn observe(&self) -> Result<ClusterView, Error> {
        let (_, list) = self.reach().await?;
        let cluster_id = list.header().map_or(0, |h| h.cluster_id());
        let statuses = join_all(list.members().iter().map(|m| async move {
            if m.client_urls().is_empty() {
                return None;
            }
            let mut c = Client::connect(m.client_urls(), Some(options()))
                .await
                .ok()?;
            tokio::time::timeout(CALL_TIMEOUT, c.status())
                .await
                .ok()?
                .ok()
        }))
        .await;
        // The leader as it reports itself: the others may still name a leader that just died.
        let leader = list
            .members()
            .iter()
            .zip(&statuses)
            .find(|(m, s)| s.as_ref().is_some_and(|s| s.leader() == m.id()))
            .map(|(m, _)| m.id());
        let members = list
            .members()
            .iter()
            .zip(&statuses)
            .map(|(m, status)| ObservedMember {
                id: m.id(),
                name: m.name().to_string(),
                peer_urls: m.peer_urls().to_vec(),
                learner: m.is_learner(),
                healthy: status.is_some(),
            })
            .collect();
        Ok(ClusterView {
            cluster_id,
            leader,
            members,
        })
    }

    /// Makes the membership calls of a step (the pods and volumes of a step are the caller's).
    /// Steps without membership calls are no-ops here.
    pub async fn execute(&self, layout: &dyn Layout, step: &Step) -> Result<Outcome, Error> {
        match step {
            Step::Replace { id, ordinal } => {
                self.remove(*id).await?;
                self.add_learner(&layout.peer_url(*ordinal)).await?;
            }
            Step::AddLearner { ordinal } => {
                self.add_learner(&layout.peer_url(*ordinal)).await?;
            }
            Step::Promote { id, .. } => return self.promote(*id).await,
            Step::MoveLeader { from, to } => self.move_leader(*from, *to).await?,
            Step::Remove { id, .. } => self.remove(*id).await?,
            _ => {}
        }
        Ok(Outcome::Done)
    }

    /// Adds a learner with `peer_url`; returns its new member ID.
    pub async fn add_learner(&self, peer_url: &str) -> Result<u64, Error> {
        let (mut client, _) = self.reach().await?;
        let resp = client
            .member_add([peer_url], Some(MemberAddOptions::new().with_is_learner()))
            .await
            .map_err(|source| Error::Call {
                op: "MemberAdd",
                source,
            })?;
        Ok(resp.member().map_or(0, |m| m.id()))
    }

    /// Promotes a learner, or reports that it has not caught up yet.
    pub async fn promote(&self, id: u64) -> Result<Outcome, Error> {
        let (mut client, _) = self.reach().await?;
        match client.member_promote(id).await {
            Ok(_) => Ok(Outcome::Done),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains(NOT_IN_SYNC) => {
                Ok(Outcome::LearnerBehind)
            }
            Err(source) => Err(Error::Call {
                op: "MemberPromote",
                source,
            }),
        }
    }

    /// Removes a member.
    pub async fn remove(&self, id: u64) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        client
            .member_remove(id)
            .await
            .map_err(|source| Error::Call {
                op: "MemberRemove",
                source,
            })?;
        Ok(())
    }

    /// Moves leadership from the leader `from` to `to`. MoveLeader must be sent to the leader.
    pub async fn move_leader(&self, from: u64, to: u64) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        let list = client.member_list().await.map_err(|source| Error::Call {
            op: "MemberList",
            source,
        })?;
        let urls = list
            .members()
            .iter()
            .find(|m| m.id() == from)
            .map(|m| m.client_urls().to_vec())
            .filter(|u| !u.is_empty())
            .ok_or(Error::LeaderUnknown)?;
        let mut leader = connect(&urls).await?;
        leader.move_leader(to).await.map_err(|source| Error::Call {
            op: "MoveLeader",
            source,
        })?;
        Ok(())
    }
}
