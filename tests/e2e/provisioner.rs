//! The e2e cluster's storage, played by the node agent: two StorageClasses, a volume for every
//! claim, and the external resizer.
//!
//! - `e2e` (the default class) allows volume expansion; `e2e-fixed` does not. Both name the
//!   provisioner [`PROVISIONER`], which is this module.
//! - Provisioner: a claim not bound gets a PersistentVolume of its class, size and access
//!   modes, pre-bound to it (`claimRef` with the claim's UID); kube-controller-manager's
//!   PersistentVolume controller then binds the two as for any provisioned volume (the claim
//!   `Bound`, its `status.capacity` the volume's). The data itself is the Docker volume the
//!   agent mounts per claim; the PersistentVolume's `hostPath` is never read. Reclaim policy
//!   `Retain`: a volume whose claim is gone (or is another claim of that name) is deleted here,
//!   as a provisioner's `Delete` would.
//! - Resizer: Kubernetes 1.20 resizes only bound claims of a class that allows expansion (the
//!   API server's PersistentVolumeClaimResize admission); kube-controller-manager's expand
//!   controller (not started here) would find no in-tree plugin for the volume and leave it to
//!   an external resizer. This one grows the PersistentVolume's capacity to the claim's
//!   request, then the claim's `status.capacity`, as the CSI external-resizer does for a driver
//!   that needs no node step.

use cairn_operator::storage::bytes;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// The provisioner the e2e's StorageClasses name.
pub const PROVISIONER: &str = "e2e.cairn.dev/agent";
/// The default class: volumes grow.
pub const EXPANDABLE: &str = "e2e";
/// A class whose volumes cannot grow.
pub const FIXED: &str = "e2e-fixed";

/// Creates the two StorageClasses.
pub async fn install_classes(client: &Client) {
    let classes: Api<StorageClass> = Api::all(client.clone());
    for (name, expands, default) in [(EXPANDABLE, true, true), (FIXED, false, false)] {
        let class: StorageClass = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {
                "storageclass.kubernetes.io/is-default-class": default.to_string()}},
            "provisioner": PROVISIONER,
            "allowVolumeExpansion": expands,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        }))
        .unwrap();
        if let Err(e) = classes.create(&PostParams::default(), &class).await {
            eprintln!("agent: create StorageClass {name}: {e}");
        }
    }
}

/// The PersistentVolume of a claim.
fn volume_name(claim: &PersistentVolumeClaim) -> String {
    format!("pv-{}", claim.uid().unwrap_or_default())
}

/// The storage a claim asks for.
fn requested(claim: &PersistentVolumeClaim) -> Option<Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .cloned()
}

/// One round: a volume for every claim of the e2e's classes that has none, the volumes of
/// claims gone deleted, and claims that ask for more than they have grown.
pub async fn round(client: &Client) -> Result<(), String> {
    let claims: Vec<PersistentVolumeClaim> = Api::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list claims: {e}"))?
        .items;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let volumes = pvs
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list volumes: {e}"))?
        .items;
    for claim in &claims {
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        if ![EXPANDABLE, FIXED].contains(&class.as_str())
            || claim.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let name = volume_name(claim);
        match volumes.iter().find(|v| v.name_any() == name) {
            None => provision(&pvs, claim, &name, &class).await,
            Some(pv) => resize(client, &pvs, claim, pv).await,
        }
    }
    // Volumes of the e2e's classes whose claim is gone.
    for pv in &volumes {
        let spec = pv.spec.as_ref();
        let ours = spec
            .and_then(|s| s.storage_class_name.as_deref())
            .is_some_and(|c| [EXPANDABLE, FIXED].contains(&c));
        let claim_uid = spec
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone());
        let claimed = claims.iter().any(|c| c.uid() == claim_uid);
        if ours && !claimed && pv.metadata.deletion_timestamp.is_none() {
            if let Err(e) = pvs.delete(&pv.name_any(), &DeleteParams::default()).await {
                eprintln!("agent: delete volume {}: {e}", pv.name_any());
            }
        }
    }
    Ok(())
}

async fn provision(
    pvs: &Api<PersistentVolume>,
    claim: &PersistentVolumeClaim,
    name: &str,
    class: &str,
) {
    let Some(size) = requested(claim) else {
        return;
    };
    let modes = claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_else(|| vec!["ReadWriteOnce".to_string()]);
    let ns = claim.namespace().unwrap_or_default();
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {
            "pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": size.0},
            "accessModes": modes,
            "storageClassName": class,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": format!("/var/lib/cairn-e2e/{ns}/{}", claim.name_any())},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": ns, "name": claim.name_any(), "uid": claim.uid()},
        },
    }))
    .unwrap();
    if let Err(e) = pvs.create(&PostParams::default(), &pv).await {
        eprintln!("agent: provision {ns}/{}: {e}", claim.name_any());
    }
}

/// Grows a bound claim's volume, then the claim's capacity, to what the claim asks.
async fn resize(
    client: &Client,
    pvs: &Api<PersistentVolume>,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) {
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let (Some(asked), true) = (requested(claim), bound) else {
        return;
    };
    let Some(asked_bytes) = bytes(&asked.0) else {
        return;
    };
    let capacity = |c: Option<&std::collections::BTreeMap<String, Quantity>>| {
        c.and_then(|c| c.get("storage"))
            .and_then(|q| bytes(&q.0))
            .unwrap_or(0.0)
    };
    let ns = claim.namespace().unwrap_or_default();
    if capacity(pv.spec.as_ref().and_then(|s| s.capacity.as_ref())) < asked_bytes {
        let patch = json!({"spec": {"capacity": {"storage": asked.0}}});
        if let Err(e) = pvs
            .patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            eprintln!("agent: resize volume {}: {e}", pv.name_any());
            return;
        }
    }
    if capacity(claim.status.as_ref().and_then(|s| s.capacity.as_ref())) < asked_bytes {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let patch = json!({"status": {"capacity": {"storage": asked.0}}});
        if let Err(e) = claims
            .patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            eprintln!("agent: resize claim {ns}/{}: {e}", claim.name_any());
        }
    }
}
