//! The operator's binary: flags, the HTTP endpoint (`/healthz`, `/metrics`), leader election,
//! then the controller. Runs in a pod (in-cluster config) or from a kubeconfig (`KUBECONFIG`).

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use cairn_operator::controller::{self, Context};
use cairn_operator::leader::LeaderElection;
use cairn_operator::metrics::Metrics;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

#[derive(Parser, Debug)]
#[command(
    name = "cairn-operator",
    version,
    about = "Runs cairn (etcd-compatible) clusters on Kubernetes"
)]
struct Flags {
    /// Address of the HTTP endpoint serving /healthz and /metrics.
    #[arg(
        long,
        env = "CAIRN_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: std::net::SocketAddr,
    /// Watch EtcdClusters in this namespace only (default: all namespaces).
    #[arg(long, env = "CAIRN_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Elect a leader among replicas through a Lease before reconciling.
    #[arg(long, env = "CAIRN_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "CAIRN_OPERATOR_LEASE_NAME",
        default_value = "cairn-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The cairn image of members whose EtcdCluster sets no `spec.image`.
    #[arg(long, env = "CAIRN_IMAGE")]
    cairn_image: Option<String>,
    /// How long a Lease lasts without renewal before another replica takes over.
    #[arg(long, env = "CAIRN_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let flags = Flags::parse();
    let client = Client::try_default().await?;
    let metrics = Metrics::default();
    let identity = flags.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("cairn-operator-{}", std::process::id()))
    });

    let m = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(move || async move { m.render() }));
    let listener = tokio::net::TcpListener::bind(flags.metrics_addr).await?;
    tracing::info!(addr = %flags.metrics_addr, "serving /healthz and /metrics");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics,
        Some(identity.clone()),
    ));
    if !flags.leader_elect {
        controller::run(ctx, flags.watch_namespace).await;
        return Ok(());
    }
    let election = LeaderElection::new(
        Api::<Lease>::namespaced(client, &flags.lease_namespace),
        &flags.lease_name,
        &identity,
        Duration::from_secs(flags.lease_seconds),
    );
    tracing::info!(lease = %flags.lease_name, %identity, "waiting for leadership");
    election.acquire().await?;
    tracing::info!(%identity, "leading");
    tokio::select! {
        _ = controller::run(ctx, flags.watch_namespace) => Ok(()),
        _ = election.hold() => {
            // Another replica may take over now: stop at once rather than race it.
            anyhow::bail!("lost the leader lease")
        }
    }
}
