//! A writer for tests that change a cluster under load, for tests/operator and tests/e2e (each
//! includes this file).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Puts unique keys `{prefix}{i:08}` one after another through `endpoints` until `stop` is
/// set, waiting `pause` between puts and 100 ms after a failed one. Returns the acknowledged
/// keys and how many puts failed (their outcome is unknown).
pub fn spawn(
    endpoints: Vec<String>,
    opts: etcd_client::ConnectOptions,
    prefix: &'static str,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, usize)> {
    tokio::spawn(async move {
        let mut client = etcd_client::Client::connect(&endpoints, Some(opts))
            .await
            .unwrap();
        let (mut acked, mut failed) = (Vec::new(), 0);
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let key = format!("{prefix}{i:08}");
            match client.put(key.clone(), format!("v{i}"), None).await {
                Ok(_) => acked.push(key),
                Err(_) => {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            i += 1;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        (acked, failed)
    })
}
