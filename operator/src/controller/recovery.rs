//! Quorum-loss recovery of one EtcdCluster, carried out (`crate::recovery` decides). A
//! recovery goes through its phases one reconcile at a time, each recorded in
//! `status.recovery.inProgress` before the next starts, so that an operator restarted midway
//! goes on where it was:
//! 1. `Fencing`: the pod and volume of every member but the survivor are deleted (a majority
//!    coming back with its data could otherwise elect a leader of its own next to the
//!    survivor's one-member cluster). Their pods start again empty, and cannot join: they are
//!    no longer, or never were, in the survivor's member list.
//! 2. `Restarting`: the bootstrap ConfigMap names the survivor and the recovery's token
//!    (`--experimental-force-new-cluster-once`, read by every member, acted on by the survivor
//!    once per token) and the survivor's pod is deleted; it starts again as a one-member cluster
//!    from its own data, with its member and cluster IDs.
//! 3. `Forcing`: once the survivor leads alone the recovery is done: `Recovered` says what was
//!    kept, the ConfigMap no longer names anyone, and the membership plan grows the cluster
//!    back (learners first, one at a time) as after any loss of members.

use super::cluster::Reconciler;
use super::*;
use crate::crd::{
    QuorumLossMode, RecoveryPhase, RecoveryRun, RecoveryStatus, RECOVER_ANNOTATION,
    RECOVER_FROM_BACKUP_ANNOTATION,
};
use crate::recovery::{decide, has_quorum, Decision, Facts};

/// Condition reasons of a recovery.
const RECOVERING: &str = "RecoveringQuorum";
/// The shortest outage an automatic recovery waits for, whatever `spec.recovery.after` says.
const MIN_AFTER: Duration = Duration::from_secs(10);
/// How long a survivor that answers but does not lead alone is given before it is restarted
/// again.
const RESTART_AGAIN: Duration = Duration::from_secs(60);
/// When a recovery that has not finished is reported stuck.
const STUCK: Duration = Duration::from_secs(600);

/// Records the recovery of `token` as done and the outage as over.
fn finished(rec: &mut RecoveryStatus, token: &str) {
    rec.last_token = Some(token.to_string());
    rec.last_recovered = Some(now());
    rec.in_progress = None;
    rec.quorum_lost_since = None;
    rec.applied_at_loss = None;
    rec.waiting = None;
}

/// The highest applied index the members that answer report.
fn max_applied(view: Option<&ClusterView>) -> Option<u64> {
    view.and_then(|v| {
        v.members
            .iter()
            .filter(|m| m.healthy)
            .map(|m| m.applied_index)
            .max()
    })
}

impl Reconciler<'_> {
    /// Runs before the membership plan of a bootstrapped cluster; updates `prev`'s recovery
    /// status (and `Recovered` condition) for the rest of the reconcile. Returns `Some(when)`
    /// if this reconcile belongs to a recovery under way: the plan must not run, and the status
    /// is patched here.
    pub(super) async fn recover(
        &self,
        prev: &mut EtcdClusterStatus,
        view: Option<&ClusterView>,
        cluster_id: Option<String>,
        replicas: i32,
        pods: &[Pod],
    ) -> Result<Option<Duration>, Error> {
        let ec = self.ec;
        let rec = prev.recovery.clone().unwrap_or_default();
        // Pods that may come back with their data: not started yet (Pending), on a node that
        // does not report (Unknown), or being deleted.
        let pending: Vec<i32> = pods
            .iter()
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                matches!(phase, Some("Pending" | "Unknown"))
                    || p.metadata.deletion_timestamp.is_some()
            })
            .filter_map(|p| self.names.ordinal(&p.name_any()))
            .collect();
        let spec = &ec.spec.recovery;
        let after = crate::backup::parse_age(&spec.after)
            .unwrap_or(Duration::from_secs(300))
            .max(MIN_AFTER);
        let since = rec.quorum_lost_since.clone();
        // Unique to the outage: its first sighting, to the millisecond.
        let auto_token = since.as_ref().map_or_else(
            || "auto".to_string(),
            |t| format!("auto-{}", t.0.as_millisecond()),
        );
        // Pods that say their data is gone (cairn's "has already been bootstrapped").
        let lost_data: Vec<i32> = super::cluster::pods_reporting_unusable(pods, &self.names)
            .into_iter()
            .filter(|(_, why)| matches!(why, crate::plan::Unusable::LostData { .. }))
            .map(|(o, _)| o)
            .collect();
        let verified = prev
            .backup
            .as_ref()
            .and_then(|b| b.last_verified_backup.clone());
        let facts = Facts {
            mode: spec.quorum_loss,
            after,
            requested: ec.annotations().get(RECOVER_ANNOTATION).map(String::as_str),
            prev: &rec,
            lost_for: since.as_ref().map(ago),
            view,
            pending: &pending,
            requested_backup: ec
                .annotations()
                .get(RECOVER_FROM_BACKUP_ANNOTATION)
                .map(String::as_str),
            lost_data: &lost_data,
            verified: verified.as_ref(),
            replicas,
        };
        let requested: Vec<String> = [facts.requested, facts.requested_backup]
            .into_iter()
            .flatten()
            .map(str::to_string)
            .collect();
        let decision = decide(self.layout.as_ref(), &facts, &auto_token);
        let outcome = self
            .decided(
                decision, prev, rec, requested, view, cluster_id, replicas, pods,
            )
            .await;
        // The recovery status is saved now if it changed (the outage's clock and baseline,
        // tokens used up): the rest of the reconcile may fail (an API call), and a baseline not
        // saved would have every later reconcile see the same "progress" again and never let
        // the recovery start.
        let saved = ec.status.as_ref().and_then(|s| s.recovery.as_ref());
        if matches!(outcome, Ok(None)) && prev.recovery.as_ref() != saved {
            self.patch_status(prev.clone()).await?;
        }
        outcome
    }

    /// Carries out `decision` (see [`Self::recover`]).
    #[allow(clippy::too_many_arguments)]
    async fn decided(
        &self,
        decision: Decision,
        prev: &mut EtcdClusterStatus,
        mut rec: RecoveryStatus,
        requested: Vec<String>,
        view: Option<&ClusterView>,
        cluster_id: Option<String>,
        replicas: i32,
        pods: &[Pod],
    ) -> Result<Option<Duration>, Error> {
        let ec = self.ec;
        let spec = &ec.spec.recovery;
        match decision {
            Decision::Quorum => {
                if rec.quorum_lost_since.take().is_some() {
                    info!("a quorum answers again");
                }
                rec.waiting = None;
                rec.applied_at_loss = None;
                // A token set while a quorum answers is used up: it must not fire at the next
                // outage without anyone deciding again.
                for t in requested {
                    let t: String = t.chars().take(63).collect();
                    if t.is_empty()
                        || rec.used(&t)
                        || rec.in_progress.as_ref().is_some_and(|r| r.token == t)
                    {
                        continue;
                    }
                    self.event(
                        EventType::Normal,
                        "RecoveryNotNeeded",
                        "Recover",
                        format!("a recovery token ({t}) is set while a quorum answers: nothing to recover; the token is used up"),
                    )
                    .await;
                    rec.used_tokens.push(t);
                    let extra = rec.used_tokens.len().saturating_sub(8);
                    rec.used_tokens.drain(..extra);
                }
                prev.recovery = Some(rec).filter(|r| *r != RecoveryStatus::default());
                Ok(None)
            }
            Decision::Progress(why) => {
                info!(why, "the quorum looks lost, but the cluster makes progress");
                rec.quorum_lost_since = Some(now());
                rec.applied_at_loss = max_applied(view);
                rec.waiting = Some(why);
                prev.recovery = Some(rec);
                Ok(None)
            }
            Decision::Wait(why) => {
                if rec.quorum_lost_since.is_none() {
                    rec.applied_at_loss = max_applied(view);
                    let mode = match spec.quorum_loss {
                        QuorumLossMode::Manual => "Manual",
                        QuorumLossMode::Automatic => "Automatic",
                    };
                    self.event(
                        EventType::Warning,
                        "QuorumLost",
                        "Observe",
                        format!("a majority of the voters does not answer (spec.recovery.quorumLoss: {mode}): {why}"),
                    )
                    .await;
                    rec.quorum_lost_since = Some(now());
                }
                rec.waiting = Some(why);
                prev.recovery = Some(rec);
                Ok(None)
            }
            Decision::Recover {
                survivor,
                fence,
                token,
            } => {
                let name = self.layout.member(survivor.ordinal);
                let fenced: Vec<String> = fence.iter().map(|o| self.layout.member(*o)).collect();
                self.event(
                    EventType::Warning,
                    "RecoveryStarted",
                    "Recover",
                    format!(
                        "recovering from quorum loss ({token}): keeping {name} (applied index {}, the highest of the members that answer); deleting the pods and volumes of {} first",
                        survivor.applied_index,
                        fenced.join(", ")
                    ),
                )
                .await;
                rec.quorum_lost_since.get_or_insert_with(now);
                rec.waiting = None;
                rec.in_progress = Some(RecoveryRun {
                    token,
                    survivor: name,
                    survivor_id: format!("{:x}", survivor.id),
                    applied_index: survivor.applied_index,
                    highest_revision: prev.revision,
                    started: now(),
                    phase: RecoveryPhase::Fencing,
                    phase_since: Some(now()),
                    fenced: None,
                    stuck: false,
                    from_backup: None,
                    destination: None,
                });
                self.recovery_step(prev, rec, view, cluster_id, replicas, pods)
                    .await
            }
            Decision::Restore { backup, token } => {
                // Checked before anything is deleted: the object is there, and its manifest is
                // the one that was verified.
                let Some(destination) = ec.spec.backup.as_ref().map(|b| b.destination.clone())
                else {
                    rec.waiting = Some("no spec.backup: nowhere to restore from".to_string());
                    prev.recovery = Some(rec);
                    return Ok(None);
                };
                let found = match self.destination(&destination).await {
                    Ok(dest) => crate::backup::record(&dest, &backup.key)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match found {
                    Ok(r) if r.sha256 == backup.sha256 => {}
                    Ok(r) => {
                        rec.waiting = Some(format!(
                            "the verified backup {} now has sha256 {} in its manifest, {} when it was verified: not restored",
                            backup.key, r.sha256, backup.sha256
                        ));
                        prev.recovery = Some(rec);
                        return Ok(None);
                    }
                    Err(e) => {
                        rec.waiting = Some(format!(
                            "the verified backup {} cannot be read: {e}",
                            backup.key
                        ));
                        prev.recovery = Some(rec);
                        return Ok(None);
                    }
                }
                self.event(
                    EventType::Warning,
                    "RecoveryStarted",
                    "Recover",
                    format!(
                        "no member answers ({token}): starting the cluster again from the verified backup {} (revision {}); deleting every member's pod and volume first",
                        backup.key, backup.revision
                    ),
                )
                .await;
                rec.quorum_lost_since.get_or_insert_with(now);
                rec.waiting = None;
                rec.in_progress = Some(RecoveryRun {
                    token,
                    survivor: self.layout.member(0),
                    survivor_id: String::new(),
                    applied_index: 0,
                    highest_revision: prev.revision,
                    started: now(),
                    phase: RecoveryPhase::Fencing,
                    phase_since: Some(now()),
                    fenced: None,
                    stuck: false,
                    from_backup: Some(backup),
                    destination: Some(destination),
                });
                self.recovery_step(prev, rec, view, cluster_id, replicas, pods)
                    .await
            }
            Decision::InProgress => {
                self.recovery_step(prev, rec, view, cluster_id, replicas, pods)
                    .await
            }
        }
    }

    /// One phase of the recovery in `rec.in_progress`.
    async fn recovery_step(
        &self,
        prev: &mut EtcdClusterStatus,
        mut rec: RecoveryStatus,
        view: Option<&ClusterView>,
        cluster_id: Option<String>,
        replicas: i32,
        pods: &[Pod],
    ) -> Result<Option<Duration>, Error> {
        let Some(mut run) = rec.in_progress.clone() else {
            prev.recovery = Some(rec);
            return Ok(None);
        };
        let layout = self.layout.as_ref();
        let survivor = self.names.ordinal(&run.survivor).unwrap_or(0);
        let survivor_id = u64::from_str_radix(&run.survivor_id, 16).unwrap_or(0);
        let since = run.phase_since.as_ref().map(ago).unwrap_or_default();
        let message = match run.phase {
            RecoveryPhase::Fencing => {
                let top = replicas.max(
                    view.and_then(|v| v.max_ordinal(layout))
                        .map_or(0, |o| o + 1),
                );
                let restoring = run.from_backup.is_some();
                let others: Vec<i32> = (0..top).filter(|o| restoring || *o != survivor).collect();
                self.fence(&mut run, &others, pods).await?
            }
            RecoveryPhase::Restarting if run.from_backup.is_some() => {
                // Every member and the StatefulSet are gone: the cluster is bootstrapped
                // again, its first member restoring the backup.
                let backup = run.from_backup.clone().expect("checked");
                self.event(
                    EventType::Warning,
                    "Rebootstrapping",
                    "Recover",
                    format!(
                        "starting the cluster again: {} restores {} (revision {})",
                        run.survivor, backup.key, backup.revision
                    ),
                )
                .await;
                run.phase = RecoveryPhase::Rebootstrapping;
                run.phase_since = Some(now());
                rec.in_progress = Some(run);
                prev.recovery = Some(rec);
                prev.cluster_id = None;
                prev.restored_from = None;
                prev.members.clear();
                let mut status =
                    self.status(prev, None, None, &Step::WaitBootstrap, &Roll::Steady, None);
                status.restored_from = None;
                status.set_condition(
                    condition::PROGRESSING,
                    true,
                    RECOVERING,
                    format!("starting again from the verified backup {}", backup.key),
                    self.ec.metadata.generation,
                    &now(),
                );
                self.patch_status(status).await?;
                return Ok(Some(STEP_REQUEUE));
            }
            RecoveryPhase::Rebootstrapping => {
                let Some(backup) = run.from_backup.clone() else {
                    // Not one this operator started (a status edited by hand): dropped.
                    warn!("a rebootstrap without its backup in status.recovery: dropped");
                    rec.in_progress = None;
                    prev.recovery = Some(rec);
                    return Ok(None);
                };
                if view.is_some_and(|v| v.leader.is_some()) {
                    let before = run
                        .highest_revision
                        .map_or_else(|| "unknown".to_string(), |r| r.to_string());
                    let msg = format!(
                        "no member had data: started again from the verified backup {} ({}): revision {} kept, what was written after it lost; the highest revision a member had reported before the loss was {before}",
                        backup.key, run.token, backup.revision
                    );
                    self.event(EventType::Normal, "Recovered", "Recover", msg.clone())
                        .await;
                    self.count_op("recover", "ok");
                    finished(&mut rec, &run.token);
                    // The members' template keeps restoring from it (as a cluster bootstrapped
                    // from a backup), so the cluster does not roll once it is back.
                    rec.restored_from_backup =
                        run.destination
                            .clone()
                            .map(|destination| crate::crd::FromBackup {
                                destination,
                                key: Some(backup.key.clone()),
                                prefix: None,
                            });
                    prev.recovery = Some(rec);
                    prev.set_condition(
                        condition::RECOVERED,
                        true,
                        "RestoredFromBackup",
                        msg,
                        self.ec.metadata.generation,
                        &now(),
                    );
                    return Ok(None);
                }
                // Bootstrapping again: the plan does it (see `run`).
                rec.in_progress = Some(run);
                prev.recovery = Some(rec);
                return Ok(None);
            }
            RecoveryPhase::Restarting if view.is_none() => {
                format!(
                    "waiting for {} to answer before it is restarted",
                    run.survivor
                )
            }
            RecoveryPhase::Restarting => {
                self.apply_bootstrap(view, Some(&run)).await?;
                let pod_api: Api<Pod> = self.api();
                delete_if_exists(&pod_api, &run.survivor).await?;
                self.member_event(
                    EventType::Warning,
                    "ForcingNewCluster",
                    "Recover",
                    format!(
                        "restarting {} as a one-member cluster from its own data (member {}, its cluster ID kept; entries past its commit index dropped)",
                        run.survivor, run.survivor_id
                    ),
                    &run.survivor,
                )
                .await;
                run.phase = RecoveryPhase::Forcing;
                run.phase_since = Some(now());
                format!("restarting {} as a one-member cluster", run.survivor)
            }
            RecoveryPhase::Forcing => {
                let alone = view.is_some_and(|v| {
                    v.leader == Some(survivor_id)
                        && v.members.iter().all(|m| m.id == survivor_id)
                        && has_quorum(v)
                });
                if alone {
                    let kept = view
                        .and_then(|v| v.members.iter().find(|m| m.id == survivor_id))
                        .map_or(0, |m| m.revision);
                    let before = run
                        .highest_revision
                        .map_or_else(|| "unknown".to_string(), |r| r.to_string());
                    let msg = format!(
                        "{} restarted as a one-member cluster from its own data ({}): revision {kept} kept; the highest revision a member had reported before the loss was {before}; the other members join again as new members",
                        run.survivor, run.token
                    );
                    self.event(EventType::Normal, "Recovered", "Recover", msg.clone())
                        .await;
                    self.count_op("recover", "ok");
                    finished(&mut rec, &run.token);
                    prev.recovery = Some(rec);
                    prev.set_condition(
                        condition::RECOVERED,
                        true,
                        "QuorumRestored",
                        msg,
                        self.ec.metadata.generation,
                        &now(),
                    );
                    // The plan takes over (the ConfigMap no longer names the survivor).
                    return Ok(None);
                }
                // The pod may have started before the ConfigMap named it (a restart by
                // someone else in between, a kubelet's stale copy): the apply is kept up, and a
                // survivor that answers but does not lead alone a minute on is restarted again.
                self.apply_bootstrap(view, Some(&run)).await?;
                let answers = view
                    .is_some_and(|v| v.members.iter().any(|m| m.id == survivor_id && m.healthy));
                if answers && since > RESTART_AGAIN {
                    let pod_api: Api<Pod> = self.api();
                    delete_if_exists(&pod_api, &run.survivor).await?;
                    run.phase_since = Some(now());
                    format!("{} does not lead alone: restarted it again", run.survivor)
                } else {
                    format!("waiting for {} to lead alone", run.survivor)
                }
            }
        };
        if !run.stuck && ago(&run.started) > STUCK {
            run.stuck = true;
            let msg = format!(
                "the recovery from {} ({}) has not finished after {} minutes ({message}); set {RECOVER_ANNOTATION} to a new token to start it over",
                run.survivor,
                run.token,
                STUCK.as_secs() / 60
            );
            self.report_stuck(prev, msg).await;
        }
        rec.in_progress = Some(run);
        prev.recovery = Some(rec);
        let step = Step::Refuse(plan::Refusal::NoLeader);
        let mut status = self.status(
            prev,
            view,
            cluster_id,
            &step,
            &Roll::Steady,
            prev.operation.clone(),
        );
        status.set_condition(
            condition::PROGRESSING,
            true,
            RECOVERING,
            message,
            self.ec.metadata.generation,
            &now(),
        );
        self.patch_status(status).await?;
        Ok(Some(STEP_REQUEUE))
    }

    /// While a cluster is bootstrapped again from a backup (`recover` does not run: the
    /// cluster has no ID yet), a bootstrap that does not come back within [`STUCK`] is said
    /// to be stuck: an Event and `Recovered=False/RecoveryStuck`.
    pub(super) async fn rebootstrap_watch(&self, prev: &mut EtcdClusterStatus) {
        let Some(rec) = prev.recovery.as_mut() else {
            return;
        };
        let Some(run) = rec.in_progress.as_mut() else {
            return;
        };
        if run.phase != RecoveryPhase::Rebootstrapping || run.stuck || ago(&run.started) <= STUCK {
            return;
        }
        run.stuck = true;
        let msg = format!(
            "the cluster has not come back from the verified backup {} after {} minutes: see the RestoreFailed condition and the first member's init containers",
            run.from_backup.as_ref().map_or("?", |b| b.key.as_str()),
            STUCK.as_secs() / 60
        );
        self.report_stuck(prev, msg).await;
    }

    /// A recovery that has not finished in [`STUCK`]: an Event and `Recovered=False`.
    async fn report_stuck(&self, prev: &mut EtcdClusterStatus, msg: String) {
        self.event(EventType::Warning, "RecoveryStuck", "Recover", msg.clone())
            .await;
        prev.set_condition(
            condition::RECOVERED,
            false,
            "RecoveryStuck",
            msg,
            self.ec.metadata.generation,
            &now(),
        );
    }

    /// The fencing phase: deletes the pods and volumes of `others`, keeping their UIDs, then in
    /// later rounds waits until every one of them is gone before the survivor restarts (a
    /// member still running could otherwise vote in a cluster beside the survivor's). Returns
    /// what is done or waited for.
    async fn fence(
        &self,
        run: &mut RecoveryRun,
        others: &[i32],
        pods: &[Pod],
    ) -> Result<String, Error> {
        let layout = self.layout.as_ref();
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let pod_api: Api<Pod> = self.api();
        let Some(uids) = run.fenced.clone() else {
            if run.from_backup.is_some() {
                // Every member goes: the StatefulSet first, or it would make their pods again
                // and a new pod's failed start leave a data dir in the new claim, which the
                // restore would then not replace.
                let sts: Api<StatefulSet> = self.api();
                delete_if_exists(&sts, &self.names.statefulset()).await?;
            }
            let mut uids = Vec::new();
            for &o in others {
                let member = layout.member(o);
                if let Some(c) = pvcs.get_opt(&self.names.pvc(o)).await? {
                    uids.extend(c.metadata.uid);
                }
                if let Some(p) = pods.iter().find(|p| p.name_any() == member) {
                    uids.extend(p.metadata.uid.clone());
                }
                delete_if_exists(&pvcs, &self.names.pvc(o)).await?;
                delete_if_exists(&pod_api, &member).await?;
                self.member_event(
                    EventType::Warning,
                    "MemberFenced",
                    "DeleteVolume",
                    format!("deleted the volume and pod of {member}: it cannot come back with its data and form a cluster beside {}; it joins again as a new member", run.survivor),
                    &member,
                )
                .await;
            }
            self.count_op("fence", "ok");
            run.fenced = Some(uids);
            return Ok(format!(
                "deleting the pods and volumes of every member but {}",
                run.survivor
            ));
        };
        let mut left = Vec::new();
        for &o in others {
            let member = layout.member(o);
            let old = |uid: Option<&String>| uid.is_some_and(|u| uids.contains(u));
            let pod = pod_api.get_opt(&member).await?;
            let claim = pvcs.get_opt(&self.names.pvc(o)).await?;
            if pod.as_ref().is_some_and(|p| old(p.metadata.uid.as_ref()))
                || claim.as_ref().is_some_and(|c| old(c.metadata.uid.as_ref()))
            {
                left.push(member);
            }
        }
        if !left.is_empty() {
            return Ok(format!(
                "waiting for the pods and volumes of {} to be gone (a pod on a node that does not answer stays until it is deleted with --force)",
                left.join(", ")
            ));
        }
        run.phase = RecoveryPhase::Restarting;
        run.phase_since = Some(now());
        Ok(format!("fenced every member but {}", run.survivor))
    }

    /// Applies the bootstrap ConfigMap for the members `view` lists, naming the survivor of
    /// `run` for `--experimental-force-new-cluster-once` (or nobody).
    pub(super) async fn apply_bootstrap(
        &self,
        view: Option<&ClusterView>,
        run: Option<&RecoveryRun>,
    ) -> Result<(), Error> {
        let Some(v) = view else { return Ok(()) };
        let b = bootstrap(self.layout.as_ref(), self.ec.spec.size, Some(v));
        let force = run.map(|r| format!("{}:{}", r.survivor, r.token));
        apply(
            &self.api::<ConfigMap>(),
            &resources::bootstrap_configmap(self.ec, &b, force.as_deref()),
        )
        .await
    }
}
