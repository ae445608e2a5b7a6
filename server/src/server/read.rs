//! Linearizable reads: read-index rounds on the leader (a quorum heartbeat)
//! or through it, batched so that one round serves every read that arrived
//! before it started.

use std::time::Duration;

use openraft::error::RaftError;
use tokio::sync::{mpsc, oneshot};

use super::EtcdServer;
use crate::error::{Error, Result};
use crate::proto::peerpb::ReadIndexRequest;
use crate::raft::Member;

/// How far behind the leader's log a member may be and still count as caught
/// up (the operator's rule before restarting or promoting members is the same).
pub const CAUGHT_UP_ENTRIES: u64 = 1000;
/// How long `/readyz?voter` reuses the leader's read index it last asked for.
pub const CAUGHT_UP_FRESH: Duration = Duration::from_secs(1);

pub(super) type ReadWaiter = oneshot::Sender<Result<()>>;

impl EtcdServer {
    /// Returns once this member has applied everything committed before the
    /// call: a linearizable read may then be served locally.
    pub async fn read_index(&self) -> Result<()> {
        self.not_learner()?;
        self.wait_leader().await?;
        let (tx, rx) = oneshot::channel();
        self.reads
            .send(tx)
            .map_err(|_| Error::Internal("server stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("server stopped".into()))?
    }

    /// One read-index round, for every read waiting: on the leader a
    /// heartbeat round to a quorum; on any other member the leader's read
    /// index, then waiting until this member has applied up to it.
    pub(super) async fn confirm_reads(&self) -> Result<()> {
        let timeout = self.request_timeout();
        let until = tokio::time::Instant::now() + timeout;
        let rounds = async {
            loop {
                match self.read_round(timeout).await {
                    // A round that did not hear from a quorum in time (one
                    // slow or lost heartbeat) is tried again until the request
                    // times out, as etcd's read loop retries its ReadIndex.
                    Err(Error::Timeout) => tokio::time::sleep(Duration::from_millis(20)).await,
                    r => return r,
                }
            }
        };
        match tokio::time::timeout_at(until, rounds).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    /// One read-index round (see [`Self::confirm_reads`]).
    pub(super) async fn read_round(&self, timeout: Duration) -> Result<()> {
        if self.is_leader() {
            let index = self.leader_read_index().await?;
            return self.wait_applied(index, timeout).await;
        }
        let index = self.read_index_of_leader().await?;
        self.wait_applied(index, timeout).await
    }

    /// The leader's read index, asked through the peer service (from another member).
    async fn read_index_of_leader(&self) -> Result<u64> {
        let mut leader = self.leader_client()?;
        Ok(leader
            .read_index(self.peers.request(ReadIndexRequest {}))
            .await
            .map_err(|s| Error::from_peer(&s))?
            .into_inner()
            .index)
    }

    /// Waits until this member has applied log index `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        if self.state.applied().0.map(|l| l.index).unwrap_or(0) >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(wait_err)
    }

    /// The leader's read index (called by other members through the peer
    /// service): confirms leadership with a quorum first.
    pub async fn leader_read_index(&self) -> Result<u64> {
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let _gate = self.transfer_gate.read().await;
        // The term is taken before leadership is confirmed: the index then
        // comes from a leadership of this term or a later one.
        let term = self.raft.metrics().borrow().current_term;
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => {
                Ok(self.read_index_floor(term, read.map(|l| l.index).unwrap_or(0)))
            }
            Err(e) => Err(check_leader_err(e)),
        }
    }

    /// Why this member should not take client traffic behind a load balancer, if
    /// it should not: it is a learner (which refuses most client calls), it knows
    /// no leader, or its applied index is more than [`CAUGHT_UP_ENTRIES`] behind
    /// the leader's commit index (asked of the leader, as a read index is).
    /// Lines in `/readyz`'s format (`[-]<check> failed: <why>`).
    pub async fn not_caught_up(&self) -> Option<String> {
        if self.is_learner() {
            return Some("[-]voter failed: this member is a learner\n".into());
        }
        if self.leader() == 0 {
            return Some("[-]caught_up failed: no leader\n".into());
        }
        // The leader serves what it has committed: it is caught up by definition (its log may
        // run ahead of its applied index by entries not committed yet, in a burst).
        if self.is_leader() {
            return None;
        }
        let mut cached = self.caught_up_head.lock().await;
        let head = match *cached {
            Some((at, index)) if at.elapsed() < CAUGHT_UP_FRESH => index,
            _ => {
                let asked = std::time::Instant::now();
                let index =
                    match tokio::time::timeout(Duration::from_secs(2), self.read_index_of_leader())
                        .await
                    {
                        Ok(Ok(index)) => index,
                        Ok(Err(e)) => return Some(format!("[-]caught_up failed: leader: {e}\n")),
                        Err(_) => {
                            return Some("[-]caught_up failed: the leader did not answer\n".into())
                        }
                    };
                *cached = Some((asked, index));
                index
            }
        };
        drop(cached);
        let applied = self.state.applied().0.map(|l| l.index).unwrap_or(0);
        (head.saturating_sub(applied) > CAUGHT_UP_ENTRIES)
            .then(|| format!("[-]caught_up failed: applied index {applied}, the leader's {head}\n"))
    }

    /// Raises openraft's read index `index`, given while leading `term`, to
    /// the last entry this member had at start if `term` is the leadership
    /// openraft restored then, without an election (see
    /// [`crate::raft::LogStore::restored_leadership`]). Any later
    /// leadership begins with an entry after its whole log.
    pub(super) fn read_index_floor(&self, term: u64, index: u64) -> u64 {
        match self.restored_leadership {
            Some(r) if r.term == term => index.max(r.last_index),
            _ => index,
        }
    }
}

/// Batches linearizable reads (as etcd's read loop does): one read-index
/// round serves every read that arrived before it started; reads arriving
/// meanwhile wait for the next round.
pub(super) async fn read_batcher(
    server: std::sync::Weak<EtcdServer>,
    mut rx: mpsc::UnboundedReceiver<ReadWaiter>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let Some(s) = server.upgrade() else { return };
        let result = s.confirm_reads().await;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// What a timed-out or interrupted wait on Raft's metrics means to clients.
pub(super) fn wait_err(e: openraft::metrics::WaitError) -> Error {
    match e {
        openraft::metrics::WaitError::Timeout(..) => Error::Timeout,
        openraft::metrics::WaitError::ShuttingDown => Error::Internal("server stopped".into()),
    }
}

pub(super) fn check_leader_err(
    e: RaftError<u64, openraft::error::CheckIsLeaderError<u64, Member>>,
) -> Error {
    use openraft::error::CheckIsLeaderError;
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => Error::LeaderChanged,
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => Error::Timeout,
        RaftError::Fatal(e) => Error::Internal(format!("raft stopped: {e}")),
    }
}
