//! Storage of one EtcdCluster: an edit of `spec.storage` against the StatefulSet's claim
//! template (which cannot change in place: the StatefulSet is re-created, its pods orphaned)
//! and the members' claims, grown in place.

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

/// What [`Reconciler::storage`] found.
pub(super) struct StorageOutcome {
    /// The `Storage` condition, none while nothing was asked of the volumes.
    pub condition: Option<(bool, &'static str, String)>,
    /// Every member's claim has the new size (its capacity): the StatefulSet is to be
    /// re-created with it (its pods orphaned), so that members added later get it too.
    pub recreate: bool,
}

impl Reconciler<'_> {
    /// Keeps the claim template of the StatefulSet `current` in `desired` (the API server
    /// refuses to change it) and grows the claims of members `0..replicas` as `spec.storage`
    /// asks.
    pub(super) async fn storage(
        &self,
        current: Option<&StatefulSet>,
        desired: &mut StatefulSet,
        replicas: i32,
    ) -> StorageOutcome {
        let Some(templates) = current
            .and_then(|c| c.spec.as_ref())
            .and_then(|s| s.volume_claim_templates.clone())
        else {
            return StorageOutcome {
                condition: None,
                recreate: false,
            };
        };
        let Some(claim) = templates.first().and_then(|t| t.spec.clone()) else {
            return StorageOutcome {
                condition: None,
                recreate: false,
            };
        };
        if let Some(s) = desired.spec.as_mut() {
            s.volume_claim_templates = Some(templates);
        }
        let expanding = self
            .ec
            .status
            .as_ref()
            .and_then(|s| s.condition(condition::STORAGE))
            .is_some_and(|c| c.reason == reason::EXPANDING);
        let condition = match storage::change(&claim, &self.ec.spec.storage) {
            // The claim template already has the size (re-created): an expansion under way is
            // followed until every claim has it.
            Change::Same if expanding => {
                let size = &self.ec.spec.storage.size;
                Some(self.grow_claims(size, size, replicas).await.0)
            }
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
            Change::Grow { from, to } => {
                let (condition, asked_all) = self.grow_claims(&from, &to, replicas).await;
                return StorageOutcome {
                    condition: Some(condition),
                    recreate: asked_all,
                };
            }
        };
        StorageOutcome {
            condition,
            recreate: false,
        }
    }

    /// Re-creates the StatefulSet as `desired` (with the new claim template): deleted with
    /// its pods, claims and revisions orphaned, so no member stops; the new one adopts them
    /// (same selector, same pod template, so no pod is replaced). Waits up to 30 s for the old
    /// one to go (the garbage collector removes the orphans' owner references first); if it
    /// has not, the next round applies the StatefulSet (a missing StatefulSet of a
    /// bootstrapped cluster is made again for the listed members).
    pub(super) async fn recreate_statefulset(
        &self,
        desired: &StatefulSet,
        size: &str,
    ) -> Result<(), Error> {
        let api: Api<StatefulSet> = self.api();
        let name = self.names.statefulset();
        let orphan = DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
            ..DeleteParams::default()
        };
        match api.delete(&name, &orphan).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while api.get_opt(&name).await?.is_some() {
            if tokio::time::Instant::now() > until {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        apply(&api, desired).await?;
        self.event(
            EventType::Normal,
            "StatefulSetRecreated",
            "Expand",
            format!("re-created the StatefulSet with volume claims of {size} for members added later (its pods were orphaned and adopted again: none restarted)"),
        )
        .await;
        Ok(())
    }

    /// Asks every member's claim smaller than `to` for `to`; says whether all have it.
    async fn grow_claims(
        &self,
        from: &str,
        to: &str,
        replicas: i32,
    ) -> ((bool, &'static str, String), bool) {
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let mut pending = Vec::new();
        for o in 0..replicas {
            let name = self.names.pvc(o);
            let pvc = match pvcs.get_opt(&name).await {
                Ok(Some(p)) => p,
                // Not made yet (the StatefulSet makes it with the pod): grown next round.
                Ok(None) => continue,
                Err(e) => {
                    return (
                        (false, reason::EXPANDING, format!("reading {name}: {e}")),
                        false,
                    )
                }
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
                            (
                                false,
                                reason::EXPANSION_NOT_SUPPORTED,
                                format!("volume claim {name} cannot grow to {to}: {} (the StorageClass must allow volume expansion)", e.message),
                            ),
                            false,
                        )
                    }
                    Err(e) => {
                        return (
                            (false, reason::EXPANDING, format!("growing {name}: {e}")),
                            false,
                        )
                    }
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
        let condition = if pending.is_empty() {
            (
                true,
                reason::EXPANDED,
                if from == to {
                    format!("every member's volume has {to}")
                } else {
                    format!("every member's volume has {to} (the StatefulSet had {from} and is re-created with {to} for members added later)")
                },
            )
        } else {
            (
                false,
                reason::EXPANDING,
                format!("growing {} to {to}", pending.join(", ")),
            )
        };
        // Every claim has the size: members added later should get it too.
        (condition, pending.is_empty())
    }
}
