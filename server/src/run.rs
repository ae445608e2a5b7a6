//! Runs a member: starts it and serves the API on its URLs until shutdown
//! or removal. Above both `server` and `api`, so that neither calls the other
//! to start.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::server::EtcdServer;

/// How long a stopping member waits for open requests and streams to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Runs a member until `shutdown` resolves: the library entry point of the
/// `cairn` binary.
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
    let mut stopped = stopping.clone();
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
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
