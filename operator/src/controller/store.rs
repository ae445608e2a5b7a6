//! The server of a `pvc` backup destination's claim ([`crate::store`]): made when a
//! destination is opened, so that backups, restores and verifications find it.

use super::cluster::Reconciler;
use super::*;
use crate::crd::PvcDestination;
use crate::store::{deploy, TOKEN_ENV};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;

impl Reconciler<'_> {
    /// Makes (or keeps) the server of `p`'s claim: its token Secret (made once, never
    /// rotated under running clients), Service and Deployment. The claim must exist.
    pub(super) async fn store_server(&self, p: &PvcDestination) -> Result<(), Error> {
        let claim = self
            .api::<PersistentVolumeClaim>()
            .get_opt(&p.claim_name)
            .await?
            .ok_or_else(|| {
                Error::Credentials(format!(
                    "pvc destination: PersistentVolumeClaim {} not found (the claim is made by you, in the cluster's namespace)",
                    p.claim_name
                ))
            })?;
        let secrets = self.api::<Secret>();
        let name = p.server_name();
        let existing = secrets.get_opt(&name).await?;
        let token = if let Some(s) = existing {
            s.data
                .as_ref()
                .and_then(|d| d.get(TOKEN_ENV))
                .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
                .ok_or_else(|| Error::Credentials(format!("Secret {name} has no {TOKEN_ENV}")))?
        } else {
            let token = format!(
                "{:032x}{:032x}",
                rand::random::<u128>(),
                rand::random::<u128>()
            );
            match secrets
                .create(
                    &PostParams::default(),
                    &deploy::secret(p, &claim, &token),
                )
                .await
            {
                Ok(_) => {
                    self.event(
                        EventType::Normal,
                        "StoreServerCreated",
                        "Backup",
                        format!(
                            "serving PersistentVolumeClaim {} for backups as {name} (its token in Secret {name}, key {TOKEN_ENV})",
                            p.claim_name
                        ),
                    )
                    .await
                }
                // Made meanwhile (another cluster naming the claim): that one's token holds,
                // and the next round applies the Deployment with it.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Err(Error::Credentials(format!(
                        "Secret {name} was made meanwhile: next round"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
            token
        };
        apply(&self.api(), &deploy::service(p, &claim)).await?;
        apply(
            &self.api::<Deployment>(),
            &deploy::deployment(p, &claim, &self.ctx.operator_image, &token),
        )
        .await?;
        // Used once its pod is ready (a backup started before would fail on a connection).
        let ready = self
            .api::<Deployment>()
            .get_opt(&name)
            .await?
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            >= 1;
        if !ready {
            return Err(Error::NotReady(format!(
                "the store server {name} of PersistentVolumeClaim {} is not ready yet",
                p.claim_name
            )));
        }
        Ok(())
    }
}
