//! Runs a member: starts it and serves the API on its URLs until shutdown
//! or removal. Above both `server` and `api`, so that neither calls the other
//! to start.

use std::future::Future;
use std::time::Duration;

use tracing::{error, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::server::EtcdServer;

/// How long a stopping member waits for open requests and streams to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Runs a member until `shutdown` resolves: the library entry point of the
/// `cairn` binary.
///
/// A member whose Raft core stops (storage failure) exits the process with code 1 at once.
///
/// Stopping is graceful for at most [`STOP_GRACE`], as etcd's (bounded) graceful stop:
/// long-lived streams (watches, lease keep-alives, peers' Raft streams) would otherwise hold
/// the member up until it is killed (a pod's whole termination grace period).
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let server = EtcdServer::start(cfg).await?;
    let mut removed = server.removed.subscribe();
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    // Watched from the start: a member still waiting to join stops too.
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = removed.wait_for(|r| *r) => {}
        }
        let _ = stopping_tx.send(true);
    });
    // A member whose Raft core stopped (a storage write or fsync failed, an entry could not
    // be applied) makes no progress: it exits at once and non-zero, as etcd does, so that it
    // is restarted, without touching storage again (RocksDB aborts on a sync after a failed
    // one).
    let mut raft = server.raft.metrics();
    let stopped = server.clone();
    tokio::spawn(async move {
        // (A shutdown stops it too, as Fatal::Stopped: that is no failure.)
        let failed = |m: &openraft::RaftMetrics<u64, crate::raft::Member>| matches!(&m.running_state, Err(e) if !matches!(e, openraft::error::Fatal::Stopped));
        if raft.wait_for(failed).await.is_ok() {
            let why = stopped.raft_stopped().unwrap_or_default();
            error!("raft stopped: {why}; exiting");
            eprintln!("cairn: raft stopped: {why}");
            std::process::exit(1);
        }
    });
    let mut stopped = stopping.clone();
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    if server.cfg.initial_corrupt_check {
        // As etcd: once the member knows its peers and leader, before serving clients.
        server.wait_joined().await;
        let _ = server.wait_leader().await;
        if let Err(e) = server.initial_corrupt_check().await {
            error!("{e}");
            eprintln!("cairn: {e}");
            server.shutdown().await;
            return Err(e);
        }
    }
    let serving = crate::api::serve(server.clone(), stop);
    let result = tokio::select! {
        r = serving => r,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            warn!("connections still open {STOP_GRACE:?} after the stop signal: closing them");
            Ok(())
        }
    };
    server.shutdown().await;
    if *server.removed.borrow() {
        return Err(Error::Removed(server.member_id));
    }
    result
}
