//! EtcdBackup reconciles: an on-demand backup waits for its cluster to be free of other
//! backups, is taken, and its outcome recorded; and the store credentials backups use.

use super::cluster::Reconciler;
use super::*;

/// The data of a Secret the destination names (its absence is a credentials error).
async fn secret_data(
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
) -> Result<std::collections::BTreeMap<String, k8s_openapi::ByteString>, Error> {
    let secret = api
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::Credentials(format!("Secret {name} not found")))?;
    Ok(secret.data.unwrap_or_default())
}

/// Reads a store's credentials from a Secret: the keys the store documents
/// ([`crate::crd::Store::credential_keys`]), the required ones checked, the others ignored.
pub async fn read_credentials(
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    store: crate::crd::Store<'_>,
) -> Result<Credentials, Error> {
    let data = secret_data(api, name).await?;
    store
        .check_credentials(data.keys().map(String::as_str))
        .map_err(|why| Error::Credentials(format!("Secret {name} {why}")))?;
    Ok(store
        .credential_keys()
        .iter()
        .filter_map(|(key, _)| {
            let v = data.get(*key)?;
            Some((
                key.to_string(),
                String::from_utf8_lossy(&v.0).trim().to_string(),
            ))
        })
        .collect())
}

/// The key of a destination's client-side encryption, from its Secret (key `key`).
pub async fn read_backup_key(
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    e: &crate::crd::BackupEncryption,
) -> Result<crate::seal::BackupKey, Error> {
    let name = &e.secret_name;
    let data = secret_data(api, name).await?;
    let value = data.get(crate::crd::BACKUP_KEY_SECRET_KEY).ok_or_else(|| {
        Error::Credentials(format!(
            "Secret {name} has no key {:?}",
            crate::crd::BACKUP_KEY_SECRET_KEY
        ))
    })?;
    crate::seal::BackupKey::parse(&e.id(), &value.0)
        .map_err(|err| Error::Credentials(format!("Secret {name}: {err}")))
}

/// How many times an on-demand backup is tried before it is marked Failed.
const ON_DEMAND_ATTEMPTS: i32 = 5;

/// Reconciles one EtcdBackup: waits for its cluster to be free of other backups, takes the
/// backup, and records the outcome. A Succeeded or Failed backup is never taken again.
pub async fn reconcile_backup(eb: Arc<EtcdBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = eb.namespace().ok_or(Error::NoNamespace)?;
    let uid = eb.uid().unwrap_or_default();
    let mut st = eb.status.clone().unwrap_or_default();
    if matches!(st.phase, Some(BackupPhase::Succeeded | BackupPhase::Failed)) {
        return Ok(Action::await_change());
    }
    let api: Api<EtcdBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = eb.object_ref(&());
    let publish = |type_, reason: &'static str, note: String| {
        let ctx = ctx.clone();
        let reference = reference.clone();
        async move {
            let ev = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Backup".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
                warn!(error = %e, "could not publish an event");
            }
        }
    };
    let cluster_key = format!("{ns}/{}", eb.spec.cluster_name);
    let mut requeue = STEP_REQUEUE;
    if let Some((_, result)) = ctx.backups.take_on_demand(&uid) {
        st.attempts += 1;
        match result {
            Ok(rec) => {
                publish(
                    EventType::Normal,
                    "BackupSucceeded",
                    format!(
                        "{} ({} bytes, revision {})",
                        rec.key, rec.size, rec.revision
                    ),
                )
                .await;
                st.phase = Some(BackupPhase::Succeeded);
                st.message = None;
                st.completion_time = Some(now());
                st.set_condition(
                    "Complete",
                    true,
                    "BackupSucceeded",
                    format!("stored {}", rec.key),
                    &now(),
                );
                st.backup = Some(rec);
            }
            Err(msg) => {
                publish(EventType::Warning, "BackupFailed", msg.clone()).await;
                st.message = Some(msg.clone());
                if st.attempts >= ON_DEMAND_ATTEMPTS {
                    st.phase = Some(BackupPhase::Failed);
                    st.completion_time = Some(now());
                    st.set_condition("Failed", true, "BackupFailed", msg, &now());
                } else {
                    st.phase = Some(BackupPhase::Pending);
                    requeue = crate::backup::retry_backoff(st.attempts);
                }
            }
        }
    } else if ctx.backups.running(&cluster_key) == Some(RunOwner::OnDemand(uid.clone())) {
        st.phase = Some(BackupPhase::Running);
    } else if ctx.backups.running(&cluster_key).is_some() {
        st.phase = Some(BackupPhase::Pending);
        st.message = Some("another backup of this cluster is running".into());
    } else {
        let clusters: Api<EtcdCluster> = Api::namespaced(ctx.client.clone(), &ns);
        match clusters.get_opt(&eb.spec.cluster_name).await? {
            None => {
                st.phase = Some(BackupPhase::Pending);
                st.message = Some(format!("EtcdCluster {} not found", eb.spec.cluster_name));
                requeue = WAIT_REQUEUE;
            }
            Some(ec) => {
                let mut r = Reconciler::new(&ec, &ctx, &ns);
                r.access = r.root_access().await?;
                // Over TLS where the members serve it (the cluster's reconcile issues the
                // certificates; this only reads them).
                r.prepare_tls(false).await?;
                let endpoints = (0..ec.spec.size.max(1))
                    .map(|o| r.layout.client_url(o))
                    .collect();
                match r.destination(&eb.spec.destination).await {
                    Ok(dest) => {
                        let dir = dest.on_demand_dir(
                            &ns,
                            &r.names.cluster,
                            &ec.uid().unwrap_or_default(),
                            &eb.name_any(),
                        );
                        let work = crate::backup::backup_and_prune(
                            endpoints,
                            r.access.clone(),
                            dest,
                            dir,
                            None,
                            None,
                        );
                        if ctx
                            .backups
                            .start(&cluster_key, RunOwner::OnDemand(uid.clone()), work)
                        {
                            st.phase = Some(BackupPhase::Running);
                            st.message = None;
                            st.start_time.get_or_insert_with(now);
                        }
                    }
                    // Not an attempt: the backup waits (a pvc destination's server starting).
                    Err(Error::NotReady(msg)) => {
                        st.phase = Some(BackupPhase::Pending);
                        st.message = Some(msg);
                        requeue = Duration::from_secs(5);
                    }
                    Err(e) => {
                        st.attempts += 1;
                        st.message = Some(e.to_string());
                        st.start_time.get_or_insert_with(now);
                        if st.attempts >= ON_DEMAND_ATTEMPTS {
                            st.phase = Some(BackupPhase::Failed);
                            st.completion_time = Some(now());
                            st.set_condition("Failed", true, "BackupFailed", e.to_string(), &now());
                        } else {
                            st.phase = Some(BackupPhase::Pending);
                        }
                        requeue = crate::backup::retry_backoff(st.attempts);
                    }
                }
            }
        }
    }
    let patch = serde_json::json!({
        "apiVersion": "cairn.dev/v1alpha1",
        "kind": "EtcdBackup",
        "status": st,
    });
    api.patch_status(&eb.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(match st.phase {
        Some(BackupPhase::Succeeded | BackupPhase::Failed) => Action::await_change(),
        _ => Action::requeue(requeue),
    })
}

/// Error policy of the EtcdBackup controller.
pub fn backup_error_policy(eb: Arc<EtcdBackup>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(backup = %eb.name_any(), error = %err, "backup reconcile failed");
    Action::requeue(WAIT_REQUEUE)
}
