//! The operator's controllers: EtcdCluster reconciles (`cluster`: read the world, ask
//! [`crate::plan`] for the next membership step, apply the builders of [`crate::resources`] with
//! server-side apply under one field manager, make the step's etcd calls, report in the status
//! and in Events) and EtcdBackup reconciles (`backup`). `run` starts both; `context` is what
//! every reconcile shares.
//!
//! It never derives membership from pods: a pod that is gone or crash-looping is reported, not
//! acted on, unless it says its data is unusable (then its member is replaced).

mod auth;
mod backup;
mod cluster;
mod context;
mod maintenance;
mod recovery;
mod rollout;
mod storage;
mod store;
mod tls;
mod verify;

pub use backup::{backup_error_policy, read_backup_key, read_credentials, reconcile_backup};
pub use cluster::{error_policy, reconcile};
pub use context::{Context, Error, LayoutFn};

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, warn, Instrument};

use crate::backup::{Credentials, Destination, Due, RunOwner, Runs};
use crate::crd::{
    condition, BackupPhase, EtcdBackup, EtcdCluster, EtcdClusterStatus, Operation, OperationKind,
    StalledScaleUp,
};
use crate::layout::{Layout, Names};
use crate::members::{self, Access, Members, Outcome};
use crate::metrics::Metrics;
use crate::plan::{self, bootstrap, next_step, ClusterView, Observed, Step};
use crate::resources;
use crate::rollout::Roll;
use crate::status;
use crate::tls::PeerStep;

/// The one field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "cairn-operator";

/// How often a steady cluster is looked at again (membership and health are not watched).
const STEADY_REQUEUE: Duration = Duration::from_secs(30);
/// How soon a step in progress is looked at again.
const STEP_REQUEUE: Duration = Duration::from_secs(2);
/// How soon a refused or waiting step is tried again.
const WAIT_REQUEUE: Duration = Duration::from_secs(10);

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await?;
    Ok(())
}

async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// How long ago `t` was (zero for a time to come).
fn ago(t: &Time) -> Duration {
    Duration::try_from(jiff::Timestamp::now().duration_since(t.0)).unwrap_or(Duration::ZERO)
}

/// Runs the controller until the stream of reconciles ends (on shutdown).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (clusters, stss, svcs, cms, pdbs) = match &namespace {
        Some(ns) => (
            Api::<EtcdCluster>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let backups = match &namespace {
        Some(ns) => Api::<EtcdBackup>::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let on_demand = Controller::new(backups, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile_backup, backup_error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "backup reconcile stream");
            }
        });
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=cairn-operator");
    // An API server without policy/v1 (Kubernetes before 1.21) cannot be watched for PDBs;
    // reconciles report that in each cluster's status instead.
    let pdbs_served = !matches!(
        pdbs.list(&ListParams::default().limit(1)).await,
        Err(kube::Error::Api(ref e)) if e.code == 404
    );
    let mut clusters = Controller::new(clusters, watcher::Config::default())
        .owns(stss, owned.clone())
        .owns(svcs, owned.clone())
        .owns(cms, owned.clone());
    if pdbs_served {
        clusters = clusters.owns(pdbs, owned);
    } else {
        warn!("policy/v1 PodDisruptionBudgets are not served: not watching them");
    }
    let clusters = clusters
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile stream");
            }
        });
    futures::future::join(clusters, on_demand).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_names() {
        let m = Metrics::default();
        drop(m.reconcile("ns", "demo"));
        m.membership_operations
            .with_label_values(&["ns", "demo", "add", "ok"])
            .inc();
        let text = m.render();
        for name in [
            "cairn_operator_reconciles_total{cluster=\"demo\",namespace=\"ns\"} 1",
            "cairn_operator_reconcile_duration_seconds_count{cluster=\"demo\",namespace=\"ns\"} 1",
            "cairn_operator_membership_operations_total{cluster=\"demo\",namespace=\"ns\",operation=\"add\",result=\"ok\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
