//! The operator's binary: flags, the HTTP endpoint (`/healthz`, `/metrics`), leader election,
//! then the controller. Runs in a pod (in-cluster config) or from a kubeconfig (`KUBECONFIG`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use cairn_operator::backup::{self, Destination};
use cairn_operator::controller::{self, Context};
use cairn_operator::crd::{BackupDestination, S3Destination};
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
    /// The operator's own image, which restores run to download a backup.
    #[arg(long, env = "CAIRN_OPERATOR_IMAGE")]
    operator_image: Option<String>,
    /// The operator's own pods' labels (`key=value,...`; the chart sets them): members'
    /// NetworkPolicies let pods with them in the operator's namespace reach every port.
    #[arg(long, env = "CAIRN_OPERATOR_SELECTOR")]
    operator_selector: Option<String>,
    /// Annotations of the ServiceAccount the operator makes for each cluster's pods that reach
    /// object storage with ambient credentials (a restore's download, a verification Job), as
    /// a JSON object: workload identity's (`{"eks.amazonaws.com/role-arn": "..."}`). The chart
    /// passes its `backupIdentity.annotations`, by default the operator's own ServiceAccount's.
    #[arg(long, env = "CAIRN_BACKUP_SA_ANNOTATIONS", value_parser = json_map)]
    backup_sa_annotations: Option<BTreeMap<String, String>>,
    /// Labels of those pods, as a JSON object (`{"azure.workload.identity/use": "true"}`).
    #[arg(long, env = "CAIRN_BACKUP_POD_LABELS", value_parser = json_map)]
    backup_pod_labels: Option<BTreeMap<String, String>>,
    /// How long a Lease lasts without renewal before another replica takes over.
    #[arg(long, env = "CAIRN_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The first field of `given` (an object, as JSON) that `parsed` (what it was read into, written
/// back) does not have, unless its value is empty (written back, an empty value is left out): a
/// misspelt field would otherwise be dropped without a word.
fn unknown_field(
    given: &serde_json::Value,
    parsed: &serde_json::Value,
    at: &str,
) -> Option<String> {
    let (serde_json::Value::Object(g), serde_json::Value::Object(p)) = (given, parsed) else {
        return None;
    };
    let empty = |v: &serde_json::Value| match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::Number(_) | serde_json::Value::Bool(true) => false,
    };
    g.iter().find_map(|(k, v)| match p.get(k) {
        None if empty(v) => None,
        None => Some(format!("{at}{k}")),
        Some(pv) => unknown_field(v, pv, &format!("{at}{k}.")),
    })
}

/// A JSON object (an empty value is an empty object: a chart that sets nothing); numbers and
/// booleans become their text (`true` as YAML gives it for `"true"` unquoted).
fn json_map(s: &str) -> Result<BTreeMap<String, String>, String> {
    if s.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(s).map_err(|e| format!("a JSON object: {e}"))?;
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Ok((k, v.to_string())),
            other => Err(format!("{k}: a string, not {other}")),
        })
        .collect()
}

/// A destination on the command line: an S3 bucket by flags, or any store as `--destination`.
/// Credentials come from the environment (the credentials Secret's keys: `AWS_ACCESS_KEY_ID`,
/// `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, ...) or the ambient identity.
#[derive(clap::Args, Debug)]
struct S3Args {
    /// The destination as JSON, in the form of an EtcdCluster's `spec.backup.destination`
    /// (`{"gcs":{"bucket":"b"}}`); instead of `--bucket` and the S3 flags.
    #[arg(long, conflicts_with_all = ["bucket", "prefix", "region", "endpoint", "force_path_style"])]
    destination: Option<String>,
    /// An S3 bucket.
    #[arg(long, required_unless_present = "destination")]
    bucket: Option<String>,
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    force_path_style: bool,
    /// The id of the client-side encryption key (backups are sealed with it, or must have been).
    #[arg(long, requires = "encryption_key")]
    encryption_key_id: Option<String>,
    /// The 256-bit key itself, base64 (from the environment in a pod, as a Secret's value).
    #[arg(
        long,
        env = "CAIRN_BACKUP_KEY",
        hide_env_values = true,
        requires = "encryption_key_id"
    )]
    encryption_key: Option<String>,
}

impl S3Args {
    fn destination(&self) -> anyhow::Result<Destination> {
        let d = match &self.destination {
            Some(json) => {
                let d: BackupDestination = serde_json::from_str(json)
                    .map_err(|e| anyhow::anyhow!("--destination: {e}"))?;
                let given: serde_json::Value = serde_json::from_str(json)?;
                if let Some(field) = unknown_field(&given, &serde_json::to_value(&d)?, "") {
                    anyhow::bail!("--destination: unknown field {field}");
                }
                anyhow::ensure!(
                    d.encryption.is_none(),
                    "--destination: give the encryption key by --encryption-key-id and CAIRN_BACKUP_KEY"
                );
                d
            }
            None => BackupDestination {
                s3: Some(S3Destination {
                    bucket: self.bucket.clone().unwrap_or_default(),
                    prefix: self.prefix.clone().unwrap_or_default(),
                    region: self.region.clone(),
                    endpoint: self.endpoint.clone(),
                    force_path_style: self.force_path_style,
                    ..S3Destination::default()
                }),
                ..BackupDestination::default()
            },
        };
        let key = match (&self.encryption_key_id, &self.encryption_key) {
            (Some(id), Some(k)) => Some(cairn_operator::seal::BackupKey::parse(id, k.as_bytes())?),
            _ => None,
        };
        Ok(Destination::open(&d, None)?.with_key(key))
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Streams one backup from a member into object storage, as the operator does, and prints
    /// its record (key, size, revision, SHA-256) as JSON.
    Backup {
        #[command(flatten)]
        s3: S3Args,
        /// Client URL(s) of the member(s) to take it from, first that answers.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Directory under the prefix (the operator uses `<namespace>/<cluster>/<uid>`).
        #[arg(long, default_value = "manual")]
        dir: String,
        /// root's password, for a cluster with auth on.
        #[arg(long, env = "CAIRN_ROOT_PASSWORD", hide_env_values = true)]
        root_password: Option<String>,
        /// The CAs to verify `https://` members with (PEM), as etcdctl's `--cacert`.
        #[arg(long)]
        cacert: Option<std::path::PathBuf>,
        /// The client certificate to present (PEM), as etcdctl's `--cert`.
        #[arg(long, requires = "key")]
        cert: Option<std::path::PathBuf>,
        /// Its private key (PEM), as etcdctl's `--key`.
        #[arg(long, requires = "cert")]
        key: Option<std::path::PathBuf>,
    },
    /// Downloads a backup and verifies its SHA-256 (the init step of a restore). Does nothing
    /// when `--data-dir` exists or the pod is not the cluster's first member.
    FetchBackup {
        #[command(flatten)]
        s3: S3Args,
        /// Object key of the backup.
        #[arg(long)]
        key: String,
        #[arg(long)]
        out: std::path::PathBuf,
        /// The member's data dir: if it exists there is nothing to restore.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// The pod's name: only ordinal 0 restores (the others join it).
        #[arg(long, env = "POD_NAME")]
        pod_name: Option<String>,
        /// An etcd snapshot to migrate from: no manifest (the restore checks the SHA-256 the
        /// file ends with).
        #[arg(long)]
        etcd_snapshot: bool,
    },
    /// Serves a directory (a mounted PersistentVolumeClaim) as the store of `pvc` backup
    /// destinations, to requests that carry the token. Run by the operator as the claim's
    /// `cairn-store-<claim>` Deployment.
    ServeStore {
        /// The directory served.
        #[arg(long)]
        root: std::path::PathBuf,
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// The bearer token every request must carry (16 characters at least).
        #[arg(long, env = "CAIRN_STORE_TOKEN", hide_env_values = true)]
        token: String,
    },
}

async fn command(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Backup {
            s3,
            endpoints,
            dir,
            root_password,
            cacert,
            cert,
            key,
        } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let tls = match (&cacert, &cert, &key) {
                (None, None, None) => None,
                _ => Some(cairn_operator::members::ClientTls {
                    ca: cacert.as_deref().map(read).transpose()?.unwrap_or_default(),
                    identities: match (&cert, &key) {
                        (Some(c), Some(k)) => vec![cairn_operator::pki::Pair {
                            cert: read(c)?,
                            key: read(k)?,
                        }],
                        _ => Vec::new(),
                    },
                }),
            };
            let dest = s3.destination()?;
            let dir = [dest.prefix.as_str(), dir.as_str()]
                .iter()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/");
            let rec = backup::stream_backup(
                &endpoints,
                &cairn_operator::members::Access { root_password, tls },
                &dest,
                &dir,
                jiff::Timestamp::now(),
            )
            .await?;
            println!("{}", serde_json::to_string(&rec)?);
        }
        Command::FetchBackup {
            s3,
            key,
            out,
            data_dir,
            pod_name,
            etcd_snapshot,
        } => {
            if data_dir.as_ref().is_some_and(|d| d.exists()) {
                println!("data dir exists: nothing to restore");
                return Ok(());
            }
            if pod_name.as_deref().is_some_and(|p| !p.ends_with("-0")) {
                println!("not the first member: it joins the restored one");
                return Ok(());
            }
            if etcd_snapshot {
                let rec = backup::fetch_etcd_snapshot(&s3.destination()?, &key, &out).await?;
                println!(
                    "fetched etcd snapshot {} ({} bytes; the restore checks its SHA-256)",
                    rec.key, rec.size
                );
                return Ok(());
            }
            let rec = backup::fetch(&s3.destination()?, &key, &out).await?;
            println!(
                "fetched {} ({} bytes, revision {}, sha256 {} verified)",
                rec.key, rec.size, rec.revision, rec.sha256
            );
        }
        Command::ServeStore {
            root,
            listen,
            token,
        } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            tracing::info!(root = %root.display(), %listen, "serving the backup store");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            cairn_operator::store::server::serve(root, token, listener, shutdown).await?;
        }
    }
    Ok(())
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
    if let Some(cmd) = flags.command {
        return command(cmd).await;
    }
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

    let mut ctx = Context::new(client.clone(), metrics, Some(identity.clone()));
    if let Some(image) = flags.cairn_image {
        ctx.default_image = image;
    }
    if let Some(image) = flags.operator_image {
        ctx.operator_image = image;
    }
    ctx.backup_identity = cairn_operator::resources::BackupIdentity {
        annotations: flags.backup_sa_annotations.clone().unwrap_or_default(),
        pod_labels: flags.backup_pod_labels.clone().unwrap_or_default(),
    };
    ctx.operator_pod = cairn_operator::network::OperatorPod::from_env(
        Some(flags.lease_namespace.clone()),
        flags.operator_selector.clone(),
    );
    let ctx = Arc::new(ctx);
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
