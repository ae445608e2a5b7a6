//! What every reconcile shares (the client, the event recorder, metrics, where members are
//! reached) and the errors a reconcile can end with.

use super::*;

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("membership: {0}")]
    Members(#[from] members::Error),
    #[error("the EtcdCluster has no namespace")]
    NoNamespace,
    #[error("backup credentials: {0}")]
    Credentials(String),
    /// Something the step needs is being made (a pvc destination's server starting).
    #[error("{0}")]
    NotReady(String),
}

impl Error {
    /// The `error` label of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Members(_) => "membership",
            Error::NoNamespace => "invalid",
            Error::Credentials(_) => "credentials",
            Error::NotReady(_) => "waiting",
        }
    }
}

/// Where the operator reaches a cluster's members: their pod DNS names in Kubernetes; tests
/// substitute loopback members.
pub type LayoutFn = dyn Fn(&EtcdCluster) -> Arc<dyn Layout> + Send + Sync;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub layout: Box<LayoutFn>,
    /// Backups in progress, one per cluster at most.
    pub backups: Runs,
    /// The API server's minor version, asked once.
    pub server_minor: tokio::sync::OnceCell<u32>,
    /// The image of members whose EtcdCluster names none.
    pub default_image: String,
    /// The operator's own image (restores download backups with it).
    pub operator_image: String,
    /// Where the operator's pods run, for the members' NetworkPolicy; `None` outside a pod.
    pub operator_pod: Option<crate::network::OperatorPod>,
    /// The identity of pods that reach object storage with ambient credentials.
    pub backup_identity: resources::BackupIdentity,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, instance: Option<String>) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_image: resources::default_image(),
            operator_image: format!("cairn-operator:{}", env!("CARGO_PKG_VERSION")),
            backups: Runs::default(),
            server_minor: tokio::sync::OnceCell::new(),
            operator_pod: None,
            backup_identity: resources::BackupIdentity::default(),
            layout: Box::new(|ec: &EtcdCluster| Arc::new(Names::of(ec)) as Arc<dyn Layout>),
        }
    }
}
