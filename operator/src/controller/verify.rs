//! Backup verification (`spec.backup.verify`): after every Nth scheduled backup (or at the
//! times of its own schedule, the latest backup) a Job
//! ([`resources::verify_job`]) restores it into a scratch member with no peers and checks it
//! against its record. One verification at a time; its outcome is read back from the Job (and
//! the reason of a failure from its pod's termination message) in a later reconcile.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;

use super::cluster::Reconciler;
use super::*;
use crate::backup::{wait_until, Due};
use crate::crd::{BackupSpec, BackupStatus};

impl Reconciler<'_> {
    /// Reads back the verification under way, if any, and starts the next one when due (after
    /// every Nth backup, or at `verify.schedule`'s times); says when a schedule wants a look.
    pub(super) async fn verify_backups(
        &self,
        spec: &BackupSpec,
        st: &mut BackupStatus,
        status: &mut EtcdClusterStatus,
    ) -> Result<Option<Duration>, Error> {
        let jobs: Api<Job> = self.api();
        let generation = self.ec.metadata.generation;
        if let Some(rec) = st.verifying.clone() {
            let name = resources::verify_job_name(&self.names.cluster, &rec.key);
            let job = jobs.get_opt(&name).await?;
            let job_status = job.as_ref().and_then(|j| j.status.as_ref());
            let succeeded = job_status.and_then(|s| s.succeeded).unwrap_or(0) > 0;
            let failed = job_status.and_then(|s| s.failed).unwrap_or(0) > 0
                || job_status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
            let metric = |result: &str| {
                self.ctx
                    .metrics
                    .backup_verifications
                    .with_label_values(&[self.ns, &self.names.cluster, result])
                    .inc();
            };
            if succeeded {
                metric("ok");
                let msg = format!(
                    "{} restored into a scratch member as recorded (revision {}{}{})",
                    rec.key,
                    rec.revision,
                    rec.keys.map(|k| format!(", {k} keys")).unwrap_or_default(),
                    rec.hash
                        .map(|h| format!(", HashKV {h}"))
                        .unwrap_or_default(),
                );
                self.event(EventType::Normal, "BackupVerified", "Verify", msg.clone())
                    .await;
                status.set_condition(
                    condition::BACKUP_VERIFIED,
                    true,
                    "BackupVerified",
                    msg,
                    generation,
                    &now(),
                );
                st.last_verified_backup = Some(rec);
                st.verifying = None;
            } else if job.is_none() {
                // Gone before its outcome was read (deleted, or its TTL passed): run again.
                info!(backup = %rec.key, "the verification Job is gone: running it again");
                st.verifying = None;
                st.unverified = st.unverified.max(spec.verify.every.max(1));
            } else if failed {
                metric("failed");
                let why = self
                    .verify_failure(&name)
                    .await
                    .unwrap_or_else(|| "its Job failed".to_string());
                let msg = format!("{} failed verification: {why}", rec.key);
                self.event(
                    EventType::Warning,
                    "BackupVerificationFailed",
                    "Verify",
                    msg.clone(),
                )
                .await;
                status.set_condition(
                    condition::BACKUP_VERIFIED,
                    false,
                    "VerificationFailed",
                    msg,
                    generation,
                    &now(),
                );
                st.verifying = None;
            }
        }
        if !spec.verify.enabled || st.verifying.is_some() {
            // A verification under way: its Job's changes wake the controller.
            return Ok(None);
        }
        let Some(rec) = st.last_backup.clone() else {
            return Ok(None);
        };
        let done = st
            .last_verified_backup
            .as_ref()
            .is_some_and(|v| v.key == rec.key);
        let mut wake = None;
        // The scheduled time this run is for: recorded once its Job is made (a Job that could
        // not be made is tried again, not skipped until the next time).
        let mut slot = None;
        match &spec.verify.schedule {
            Some(schedule) => {
                let schedule = match crate::backup::parse_schedule(schedule) {
                    Ok(s) => s,
                    Err(msg) => {
                        status.set_condition(
                            condition::BACKUP_VERIFIED,
                            false,
                            "InvalidSchedule",
                            format!("spec.backup.verify.schedule: {msg}"),
                            generation,
                            &now(),
                        );
                        return Ok(None);
                    }
                };
                let t = now().0;
                let last = st
                    .last_verify_schedule_time
                    .clone()
                    .unwrap_or(rec.time.clone());
                match crate::backup::due(&schedule, last.0, t) {
                    Due::At(next) => return Ok(Some(wait_until(t, next))),
                    Due::Now(scheduled) => {
                        slot = Some(Time(scheduled));
                        if let Due::At(next) = crate::backup::due(&schedule, scheduled, t) {
                            wake = Some(wait_until(t, next));
                        }
                    }
                }
                if done {
                    st.last_verify_schedule_time = slot;
                    return Ok(wake);
                }
            }
            None if done || st.unverified < spec.verify.every.max(1) => {
                st.last_verify_schedule_time = None;
                return Ok(None);
            }
            None => st.last_verify_schedule_time = None,
        }
        let restore = resources::Restore {
            key: rec.key.clone(),
            destination: spec.destination.clone(),
            operator_image: self.ctx.operator_image.clone(),
            etcd_snapshot: false,
            identity: self.ctx.backup_identity.clone(),
        };
        // The operator's own cairn release (it has `snapshot verify`), whatever release the
        // members run.
        let image = self.ctx.default_image.clone();
        let job = resources::verify_job(self.ec, &restore, &rec, &image);
        self.backup_identity(&restore).await?;
        apply(&jobs, &job).await?;
        self.event(
            EventType::Normal,
            "BackupVerifying",
            "Verify",
            format!(
                "verifying {} in Job {}",
                rec.key,
                job.metadata.name.clone().unwrap_or_default()
            ),
        )
        .await;
        st.verifying = Some(rec);
        st.unverified = 0;
        if slot.is_some() {
            st.last_verify_schedule_time = slot;
        }
        Ok(wake)
    }

    /// The cluster's backup ServiceAccount, when a pod about to be made downloads with
    /// ambient credentials.
    pub(super) async fn backup_identity(&self, r: &resources::Restore) -> Result<(), Error> {
        if r.ambient() {
            let sa = resources::backup_service_account(self.ec, &r.identity);
            apply(&self.api::<ServiceAccount>(), &sa).await?;
        }
        Ok(())
    }

    /// Why a verification Job failed: the termination message of its pod's failed container.
    async fn verify_failure(&self, job: &str) -> Option<String> {
        let pods: Api<Pod> = self.api();
        let lp = ListParams::default().labels(&format!("{}={job}", resources::VERIFY_LABEL));
        let list = pods.list(&lp).await.ok()?;
        list.items.iter().find_map(|p| {
            let s = p.status.as_ref()?;
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
                .find_map(|c| {
                    let t = c.state.as_ref()?.terminated.as_ref()?;
                    (t.exit_code != 0).then(|| {
                        let msg = t.message.clone().unwrap_or_default();
                        let last = msg.trim().lines().last().unwrap_or_default().to_string();
                        format!("{}: {last}", c.name)
                    })
                })
        })
    }
}
