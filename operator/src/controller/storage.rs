//! Storage of one EtcdCluster: an edit of `spec.storage` against the StatefulSet's claim
//! template (which cannot change) and the members' claims, grown in place.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use super::cluster::Reconciler;
use super::*;
use crate::storage::{self, Change};

/// Condition reasons of `Storage`.
pub mod reason {
    pub const AS_REQUESTED: &str = "AsRequested";
    pub const EXPANDING: &str = "Expanding";
    pub const EXPANDED: &str = "Expanded";
    pub const EXPANSION_NOT_SUPPORTED: &str = "ExpansionNotSupported";
    pub const SHRINK_REFUSED: &str = "ShrinkRefused";
    pub const STORAGE_CLASS_IMMUTABLE: &str = "StorageClassImmutable";
}

impl Reconciler<'_> {
    /// Keeps the claim template of the StatefulSet `current` in `desired` (the API server
    /// refuses to change it) and grows the claims of members `0..replicas` as `spec.storage`
    /// asks. Returns the `Storage` condition, none while nothing was asked of the volumes.
    pub(super) async fn storage(
        &self,
        current: Option<&StatefulSet>,
        desired: &mut StatefulSet,
        replicas: i32,
    ) -> Option<(bool, &'static str, String)> {
        let templates = current?.spec.as_ref()?.volume_claim_templates.clone()?;
        let claim = templates.first()?.spec.clone()?;
        if let Some(s) = desired.spec.as_mut() {
            s.volume_claim_templates = Some(templates);
        }
        match storage::change(&claim, &self.ec.spec.storage) {
            Change::Same => None,
            Change::Shrink { from, to } => Some((
                false,
                reason::SHRINK_REFUSED,
                format!("spec.storage.size {to} is smaller than the members' volumes ({from}): a volume cannot shrink; nothing was changed"),
            )),
            Change::OtherClass { from, to } => Some((
                false,
                reason::STORAGE_CLASS_IMMUTABLE,
                format!(
                    "spec.storage.storageClassName {} differs from the volumes' {}: a volume cannot move to another class; nothing was changed",
                    to.unwrap_or_default(),
                    from.as_deref().unwrap_or("(the default class)")
                ),
            )),
            Change::Grow { from, to } => Some(self.grow_claims(&from, &to, replicas).await),
        }
    }

    /// Asks every member's claim smaller than `to` for `to`; says whether all have it.
    async fn grow_claims(
        &self,
        from: &str,
        to: &str,
        replicas: i32,
    ) -> (bool, &'static str, String) {
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let mut pending = Vec::new();
        for o in 0..replicas {
            let name = self.names.pvc(o);
            let pvc = match pvcs.get_opt(&name).await {
                Ok(Some(p)) => p,
                // Not made yet (the StatefulSet makes it with the pod): grown next round.
                Ok(None) => continue,
                Err(e) => return (false, reason::EXPANDING, format!("reading {name}: {e}")),
            };
            let asked = pvc.spec.as_ref().and_then(storage::requested);
            if storage::must_grow(asked.as_deref(), to) {
                let patch =
                    serde_json::json!({"spec": {"resources": {"requests": {"storage": to}}}});
                match pvcs
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        self.member_event(
                            EventType::Normal,
                            "VolumeExpanding",
                            "Expand",
                            format!("asked for {to} for volume claim {name} (was {})", asked.unwrap_or_default()),
                            &self.names.member(o),
                        )
                        .await;
                        pending.push(name);
                    }
                    Err(kube::Error::Api(e)) => {
                        return (
                            false,
                            reason::EXPANSION_NOT_SUPPORTED,
                            format!("volume claim {name} cannot grow to {to}: {} (the StorageClass must allow volume expansion)", e.message),
                        )
                    }
                    Err(e) => return (false, reason::EXPANDING, format!("growing {name}: {e}")),
                }
                continue;
            }
            let capacity = pvc
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone());
            if storage::must_grow(capacity.as_deref(), to) {
                pending.push(name);
            }
        }
        if pending.is_empty() {
            (
                true,
                reason::EXPANDED,
                format!("every member's volume has {to}; the StatefulSet's claim template keeps {from} (it cannot change), so a member added later starts at {from} and is grown the same way"),
            )
        } else {
            (
                false,
                reason::EXPANDING,
                format!("growing {} to {to}", pending.join(", ")),
            )
        }
    }
}
