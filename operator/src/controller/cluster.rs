//! One EtcdCluster's reconcile: observe (StatefulSet, pods, the member list through the etcd
//! API) -> plan ([`crate::plan::next_step`]) -> apply (builders, the step's etcd calls) ->
//! report (status, Events), and its error policy.

use super::*;

/// Ordinals whose member pod says its data cannot serve, and why (its termination message, now
/// or last time). A pod being deleted is not asked: it has been dealt with.
pub(super) fn pods_reporting_unusable(pods: &[Pod], names: &Names) -> Vec<(i32, plan::Unusable)> {
    let mut out: Vec<(i32, plan::Unusable)> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let statuses = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref());
            let why = statuses.into_iter().flatten().find_map(|c| {
                [c.state.as_ref(), c.last_state.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.terminated.as_ref()?.message.as_deref())
                    .find_map(plan::unusable)
            })?;
            Some((names.ordinal(&p.name_any())?, why))
        })
        .collect();
    out.sort_unstable_by_key(|(o, _)| *o);
    out
}

/// Member pods that wait, unscheduled, for a claim that was deleted under them (Kubernetes
/// 1.20's StatefulSet controller makes a missing claim only with a new pod): deleting such a
/// pod has the StatefulSet make both again.
fn pods_waiting_for_a_claim(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
        })
        .map(|p| p.name_any())
        .collect()
}

/// Why the init containers of `pod` failed, if they did.
fn init_failure(pods: &[Pod], pod: &str) -> Option<String> {
    let p = pods.iter().find(|p| p.name_any() == pod)?;
    let statuses = p.status.as_ref()?.init_container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        [c.state.as_ref(), c.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .find(|t| t.exit_code != 0)
            .map(|t| {
                format!(
                    "{} of {pod} failed: {}",
                    c.name,
                    t.message.as_deref().unwrap_or("(no message)").trim()
                )
            })
    })
}

/// Whether a step adds (or replaces) a member: its pod must advertise the peer URL it is added
/// with, so the template's TLS waits until the step is done.
fn adds_a_member(step: &Step) -> bool {
    matches!(
        step,
        Step::AddLearner { .. }
            | Step::Grow { .. }
            | Step::WaitLearner { .. }
            | Step::Promote { .. }
            | Step::Replace { .. }
            | Step::Wipe { .. }
    )
}

/// Reconciles one EtcdCluster.
pub async fn reconcile(ec: Arc<EtcdCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ec.namespace().ok_or(Error::NoNamespace)?;
    let name = ec.name_any();
    let _timer = ctx.metrics.reconcile(&ns, &name);
    let span = tracing::info_span!("reconcile", namespace = %ns, cluster = %name);
    async {
        let mut r = Reconciler::new(&ec, &ctx, &ns);
        r.access = r.root_access().await?;
        let tls = r.prepare_tls(true).await?;
        r.run(&tls).await
    }
    .instrument(span)
    .await
}

/// The operator's answer to a failed reconcile: count it, log it, try again soon.
pub fn error_policy(ec: Arc<EtcdCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let ns = ec.namespace().unwrap_or_default();
    warn!(namespace = %ns, cluster = %ec.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[&ns, &ec.name_any(), err.metric_label()])
        .inc();
    Action::requeue(WAIT_REQUEUE)
}

pub(super) struct Reconciler<'a> {
    pub(super) ec: &'a EtcdCluster,
    pub(super) ctx: &'a Context,
    pub(super) ns: &'a str,
    pub(super) names: Names,
    pub(super) layout: Arc<dyn Layout>,
    /// How the members are reached (as root once the cluster has auth on).
    pub(super) access: Access,
}

impl<'a> Reconciler<'a> {
    pub(super) fn new(ec: &'a EtcdCluster, ctx: &'a Context, ns: &'a str) -> Self {
        Reconciler {
            ec,
            ctx,
            ns,
            names: Names::of(ec),
            layout: (ctx.layout)(ec),
            access: Access::default(),
        }
    }

    /// The members `view` lists, reached at their client URLs with this reconcile's access.
    pub(super) fn members_of(&self, view: &ClusterView) -> Members {
        Members::new(
            view.members
                .iter()
                .filter_map(|m| view.ordinal(self.layout.as_ref(), m))
                .map(|o| self.layout.client_url(o))
                .collect(),
        )
        .with_access(self.access.clone())
    }

    pub(super) fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), self.ns)
    }

    pub(super) async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        self.publish(type_, reason, action, note, None).await
    }

    /// An Event about one member: its pod is the related object, so that the same step on two
    /// members makes two Events rather than one series (the recorder groups by reason, action
    /// and objects, not by note).
    pub(super) async fn member_event(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        member: &str,
    ) {
        let pod = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(member.to_string()),
            namespace: Some(self.ns.to_string()),
            ..ObjectReference::default()
        };
        self.publish(type_, reason, action, note, Some(pod)).await
    }

    async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        secondary: Option<ObjectReference>,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&ev, &self.ec.object_ref(&()))
            .await
        {
            warn!(error = %e, "could not publish an event");
        }
    }

    /// Deletes member pods that wait for a claim that no longer exists (see
    /// [`pods_waiting_for_a_claim`]).
    async fn recreate_pods_without_claims(&self, pods: &[Pod]) -> Result<(), Error> {
        let waiting = pods_waiting_for_a_claim(pods);
        if waiting.is_empty() {
            return Ok(());
        }
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let pod_api: Api<Pod> = self.api();
        for pod in waiting {
            let Some(ordinal) = self.names.ordinal(&pod) else {
                continue;
            };
            if pvcs.get_opt(&self.names.pvc(ordinal)).await?.is_some() {
                continue;
            }
            delete_if_exists(&pod_api, &pod).await?;
            self.member_event(
                EventType::Normal,
                "PodRecreated",
                "DeletePod",
                format!("deleted {pod}, which waited for its deleted volume claim: the StatefulSet makes both again"),
                &pod,
            )
            .await;
        }
        Ok(())
    }

    pub(super) fn count_op(&self, op: &str, result: &str) {
        self.ctx
            .metrics
            .membership_operations
            .with_label_values(&[self.ns, &self.names.cluster, op, result])
            .inc();
    }

    async fn run(&self, tls: &super::tls::TlsPrep) -> Result<Action, Error> {
        let ec = self.ec;
        let spec = &ec.spec;
        let mut prev = ec.status.clone().unwrap_or_default();
        let sts_api: Api<StatefulSet> = self.api();
        // Read once, before the members were observed (to know how they serve).
        let sts = tls.statefulset.clone();
        let sts_replicas = sts
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.replicas);
        // A bootstrapped cluster whose StatefulSet is gone (re-created for a new claim size and
        // not back yet, or deleted by hand with its pods orphaned): its members are still there.
        let bootstrapped_before = prev.cluster_id.is_some();
        let look = sts_replicas
            .or_else(|| bootstrapped_before.then(|| (prev.members.len() as i32).max(spec.size)));

        // What the members say.
        let observed = match look {
            Some(r) => {
                let endpoints = (0..r.max(1)).map(|o| self.layout.client_url(o)).collect();
                Some(
                    Members::new(endpoints)
                        .with_access(self.access.clone())
                        .observe()
                        .await,
                )
            }
            None => None,
        };
        // With auth on, a wrong root password shuts the operator out: said in the Auth condition.
        let root_refused = observed
            .as_ref()
            .is_some_and(|o| o.as_ref().is_err_and(members::credentials_refused));
        let view = observed.and_then(Result::ok);
        // The StatefulSet that is gone is made again for the listed members (as the members
        // say, else as the last status listed them), never bootstrapped again.
        let replicas = sts_replicas.or_else(|| {
            if !bootstrapped_before {
                return None;
            }
            view.as_ref()
                .and_then(|v| v.max_ordinal(self.layout.as_ref()))
                .or_else(|| {
                    prev.members
                        .iter()
                        .filter_map(|m| self.names.ordinal(&m.name))
                        .max()
                })
                .map(|o| o + 1)
        });
        let pod_list = match replicas {
            Some(_) => tls.pod_list.clone(),
            None => Vec::new(),
        };
        let unusable = pods_reporting_unusable(&pod_list, &self.names);
        // A repair that cannot be made now is no reason to stop the reconcile.
        if let Err(e) = self.recreate_pods_without_claims(&pod_list).await {
            warn!(error = %e, "looking for pods waiting for a deleted volume claim");
        }

        // The first bootstrap is done once the members answer with a leader.
        let cluster_id = prev.cluster_id.clone().or_else(|| {
            view.as_ref()
                .filter(|v| v.leader.is_some())
                .map(|v| format!("{:x}", v.cluster_id))
        });
        let bootstrapped = cluster_id.is_some();
        if let (Some(want), Some(v)) = (&prev.cluster_id, &view) {
            if *want != format!("{:x}", v.cluster_id) {
                let msg = format!(
                    "members answer with cluster ID {:x}, expected {want}: not touching them",
                    v.cluster_id
                );
                self.event(
                    EventType::Warning,
                    "ClusterIDMismatch",
                    "Observe",
                    msg.clone(),
                )
                .await;
                let mut status = prev.clone();
                status.set_condition(
                    condition::DEGRADED,
                    true,
                    "ClusterIDMismatch",
                    msg,
                    ec.metadata.generation,
                    &now(),
                );
                self.patch_status(status).await?;
                return Ok(Action::requeue(WAIT_REQUEUE));
            }
        }

        // The alarms (NOSPACE is handled below; a CORRUPT member is replaced by the plan). The
        // CORRUPT alarm of a member no longer in the cluster (replaced, its disarm lost) would
        // keep the cluster refusing every request: disarmed here.
        let alarms = match view.as_ref().filter(|v| v.leader.is_some()) {
            Some(v) => {
                let members = self.members_of(v);
                let alarms = members.alarms().await.unwrap_or_else(|e| {
                    warn!(error = %e, "reading the alarms");
                    Vec::new()
                });
                for (id, a) in &alarms {
                    if *a == etcd_client::AlarmType::Corrupt
                        && !v.members.iter().any(|m| m.id == *id)
                    {
                        match members.disarm(*id, *a).await {
                            Ok(()) => info!(
                                member = format!("{id:x}"),
                                "disarmed the CORRUPT alarm of a removed member"
                            ),
                            Err(e) => {
                                warn!(error = %e, "disarming a removed member's CORRUPT alarm")
                            }
                        }
                    }
                }
                alarms
            }
            None => Vec::new(),
        };
        // Where a new cluster's data comes from (a backup, or an etcd snapshot to migrate).
        let source = spec.bootstrap.as_ref().map_or(Ok(None), |b| b.source());
        // A quorum-loss recovery with no member's data left starts the cluster again from the
        // latest verified backup, as a cluster that starts from a backup.
        // After it, its members' template keeps restoring from that backup.
        let recovery_source = prev.recovery.as_ref().and_then(|r| {
            r.in_progress
                .as_ref()
                .filter(|run| run.phase == crate::crd::RecoveryPhase::Rebootstrapping)
                .and_then(|run| {
                    run.from_backup
                        .as_ref()
                        .zip(run.destination.as_ref())
                        .map(|(b, d)| crate::crd::FromBackup {
                            destination: d.clone(),
                            key: Some(b.key.clone()),
                            prefix: None,
                        })
                })
                .or_else(|| r.restored_from_backup.clone())
        });
        let from_backup = recovery_source.as_ref().or(source
            .as_ref()
            .ok()
            .and_then(|s| s.as_ref().map(|(f, _)| f)));
        let from_etcd = recovery_source.is_none() && matches!(source, Ok(Some((_, true))));
        let obs = Observed {
            statefulset_replicas: replicas,
            view: view.clone(),
            unusable,
            from_backup: from_backup.is_some() || source.is_err(),
            learner_clock: self
                .learner_clock(prev.operation.as_ref(), prev.stalled_scale_up.as_ref()),
            corrupt: alarms
                .iter()
                .filter(|(_, a)| *a == etcd_client::AlarmType::Corrupt)
                .map(|(id, _)| *id)
                .collect(),
        };
        // Quorum loss (spec.recovery): a recovery under way comes before any membership step.
        if !bootstrapped {
            self.rebootstrap_watch(&mut prev).await;
        }
        if bootstrapped && !spec.paused {
            let top = replicas.unwrap_or(0);
            // Boxed: its state would make every reconcile's future bigger.
            if let Some(after) =
                Box::pin(self.recover(&mut prev, view.as_ref(), cluster_id.clone(), top, &pod_list))
                    .await?
            {
                return Ok(Action::requeue(after));
            }
        }
        let step = next_step(self.layout.as_ref(), spec.size, bootstrapped, &obs);
        // No quorum: the rollout cannot run, but a member down on an older template (an
        // upgrade to an image that does not start, set back) is restarted onto the current one.
        if let (
            Step::Refuse(
                plan::Refusal::Unreachable
                | plan::Refusal::NoLeader
                | plan::Refusal::NoQuorum { .. },
            ),
            Some(s),
        ) = (&step, sts.as_ref())
        {
            if !spec.paused && self.restart_down_member(s, &pod_list).await? {
                return Ok(Action::requeue(STEP_REQUEUE));
            }
        }

        if spec.paused {
            let status = self.status(
                &prev,
                view.as_ref(),
                cluster_id,
                &Step::Steady,
                &Roll::Steady,
                prev.operation.clone(),
            );
            self.patch_status(status).await?;
            return Ok(Action::requeue(STEADY_REQUEUE));
        }

        if spec.size % 2 == 0 && prev.observed_generation != ec.metadata.generation {
            self.event(
                EventType::Warning,
                "EvenSize",
                "Validate",
                format!(
                    "size {} tolerates no more failures than size {}",
                    spec.size,
                    spec.size - 1
                ),
            )
            .await;
        }

        // A cluster restored from a backup: the backup is resolved once, before anything is
        // created (the plan has the first member alone start from it).
        // The status may be stale (a reconcile can start before the status it wrote last is
        // in the cache): the StatefulSet's annotation says it too.
        let mut restored_from = prev.restored_from.clone().or_else(|| {
            sts.as_ref()
                .and_then(|s| s.metadata.annotations.as_ref())
                .and_then(|a| a.get(resources::RESTORED_FROM_ANNOTATION).cloned())
        });
        if (from_backup.is_some() || source.is_err())
            && restored_from.is_none()
            && replicas.is_none()
        {
            let resolved = match (&source, from_backup) {
                (Err(msg), _) => Err(format!("cannot restore: {msg}")),
                (Ok(_), Some(from)) => self.resolve_backup(from, from_etcd).await,
                (Ok(_), None) => Err("cannot restore: nothing to restore from".to_string()),
            };
            match resolved {
                Ok(rec) => {
                    let what = if from_etcd {
                        format!(
                            "starting from etcd snapshot {} ({} bytes; its own SHA-256 is checked by the restore)",
                            rec.key, rec.size
                        )
                    } else {
                        format!(
                            "starting from backup {} (revision {}, sha256 {})",
                            rec.key, rec.revision, rec.sha256
                        )
                    };
                    self.event(EventType::Normal, "Restoring", "Create", what)
                        .await;
                    restored_from = Some(rec.key);
                }
                Err(msg) => {
                    self.event(EventType::Warning, "RestoreFailed", "Create", msg.clone())
                        .await;
                    let mut status = prev.clone();
                    status.observed_generation = ec.metadata.generation;
                    status.restore_failed(msg, ec.metadata.generation, &now());
                    self.patch_status(status).await?;
                    return Ok(Action::requeue(WAIT_REQUEUE));
                }
            }
        }
        let restore =
            restored_from
                .clone()
                .zip(from_backup)
                .map(|(key, from)| resources::Restore {
                    key,
                    destination: from.destination.clone(),
                    operator_image: self.ctx.operator_image.clone(),
                    etcd_snapshot: from_etcd,
                    identity: self.ctx.backup_identity.clone(),
                });

        // A cluster made with TLS waits for its certificates rather than start without.
        let tls_wanted = spec.tls.as_ref().is_some_and(|t| t.enabled);
        if replicas.is_none()
            && tls_wanted
            && (tls.wanted.client.is_none() || tls.wanted.peer.is_none())
        {
            let mut status = prev.clone();
            let (reason, msg) = tls.problem.clone().unwrap_or((
                super::tls::reason::WAITING_FOR_CERTIFICATES,
                "waiting for the certificates".to_string(),
            ));
            status.set_condition(
                condition::TLS,
                false,
                reason,
                msg,
                ec.metadata.generation,
                &now(),
            );
            self.patch_status(status).await?;
            return Ok(Action::requeue(WAIT_REQUEUE));
        }

        // Children that do not depend on the step. Reported, not fatal: the peer Service is
        // there since the first round, and a member that starts without it only waits.
        let mut services = (
            true,
            "Applied",
            "the peer and client Services are in place".into(),
        );
        for svc in [resources::peer_service(ec), resources::client_service(ec)] {
            if let Err(e) = apply(&self.api::<Service>(), &svc).await {
                warn!(error = %e, service = ?svc.metadata.name, "applying a Service");
                services = (
                    false,
                    "ApplyFailed",
                    format!("{}: {e}", svc.metadata.name.unwrap_or_default()),
                );
            }
        }
        // What a member starting now must read: `new` only before the first bootstrap.
        let initial = replicas.unwrap_or(match step {
            Step::Bootstrap { replicas } => replicas,
            _ => spec.size,
        });
        let boot = match (&view, bootstrapped) {
            (Some(v), true) => Some(bootstrap(self.layout.as_ref(), initial, Some(v))),
            (_, false) => Some(bootstrap(self.layout.as_ref(), initial, None)),
            (None, true) => None,
        };
        if let Some(b) = &boot {
            apply(
                &self.api::<ConfigMap>(),
                &resources::bootstrap_configmap(ec, b, None),
            )
            .await?;
        }

        let mut operation = prev.operation.clone();
        let mut replicas_now = replicas.unwrap_or(0);
        let mut stalled = prev.stalled_scale_up.clone();
        let mut requeue = self
            .act(&step, &mut replicas_now, &mut operation, &mut stalled)
            .await?;

        // The pod template. Its changes (version, image, resources, ...) reach the members
        // through the rollout below, one member at a time (the StatefulSet is `OnDelete`); an
        // image that cannot read the members' data format is not put in it at all.
        let running_image = sts
            .as_ref()
            .and_then(resources::image_of)
            .map(str::to_string);
        let refused = self.refused_image(&prev, view.as_ref(), running_image.as_deref());
        let (serving, peer_step) =
            self.serving(tls, view.as_ref(), replicas_now, !adds_a_member(&step));
        let mut storage_condition = None;
        let mut sts_failure = None;
        if replicas.is_some() || matches!(step, Step::Bootstrap { .. }) {
            let mut desired = resources::statefulset_restoring(
                ec,
                replicas_now,
                &self.ctx.default_image,
                restore.as_ref(),
                &serving,
            );
            if let (Some(_), Some(running)) = (&refused, &running_image) {
                resources::set_image(&mut desired, running);
            }
            if let Some(running) = &sts {
                resources::keep_identity(&mut desired, running, &self.ctx.backup_identity);
            }
            let names_identity = desired
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.service_account_name.as_deref())
                == Some(self.names.backup_service_account().as_str());
            if let (Some(r), true) = (&restore, names_identity) {
                // Reported, not fatal: the members' pods wait for it, nothing else does.
                if let Err(e) = self.backup_identity(r).await {
                    warn!(error = %e, "applying the backup ServiceAccount");
                }
            }
            let with_new_claims = desired.clone();
            let outcome = self.storage(sts.as_ref(), &mut desired, replicas_now).await;
            storage_condition = outcome.condition;
            let terminating = sts
                .as_ref()
                .is_some_and(|s| s.metadata.deletion_timestamp.is_some());
            // Reported, not fatal: status, the PDB and scheduled backups go on.
            let applied = if outcome.recreate && step == Step::Steady && !terminating {
                // Members added later get the new size; only while membership is steady. If it
                // cannot be done (no delete permission, say), the template is still applied.
                match self
                    .recreate_statefulset(
                        &self.for_server(with_new_claims).await,
                        &spec.storage.size,
                    )
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        warn!(error = %e, "re-creating the StatefulSet with the new claim size");
                        apply(&sts_api, &self.for_server(desired).await).await
                    }
                }
            } else if terminating {
                // Being deleted (re-created above, its orphans not released yet): next round.
                Ok(())
            } else {
                apply(&sts_api, &self.for_server(desired).await).await
            };
            if let Err(e) = applied {
                warn!(error = %e, "applying the StatefulSet");
                sts_failure = Some(e.to_string());
            }
        }
        let roll = match (&refused, sts.as_ref(), view.as_ref()) {
            (Some(why), _, _) => {
                if prev
                    .condition(condition::PROGRESSING)
                    .is_none_or(|c| c.reason != crate::crd::reason::UPGRADE_REFUSED)
                {
                    self.event(EventType::Warning, "UpgradeRefused", "Upgrade", why.clone())
                        .await;
                }
                Roll::Refused { why: why.clone() }
            }
            (None, Some(sts), Some(v)) if step == Step::Steady && !spec.paused => {
                let (roll, after) = self.roll(&prev, sts, &pod_list, v, &mut operation).await?;
                requeue = requeue.min(after);
                roll
            }
            _ => Roll::Steady,
        };
        // The peer migration's MemberUpdate, once every pod runs the template that takes both.
        if let (PeerStep::Update { id, urls }, Some(v), Step::Steady) = (&peer_step, &view, &step) {
            self.members_of(v).update_peer_urls(*id, urls).await?;
            self.event(
                EventType::Normal,
                "PeerURLsUpdated",
                "TLS",
                format!("changed the peer URLs of member {id:x} to {urls:?}"),
            )
            .await;
            requeue = requeue.min(STEP_REQUEUE);
        }
        if matches!(peer_step, PeerStep::Template(_) | PeerStep::Rolling) {
            requeue = requeue.min(WAIT_REQUEUE);
        }
        // A shrunk StatefulSet no longer has the removed members' pods: delete their volumes,
        // or a later grow would start a member on stale data.
        if let Step::Shrink { delete_volumes, .. } = &step {
            let pvcs: Api<PersistentVolumeClaim> = self.api();
            for o in delete_volumes {
                delete_if_exists(&pvcs, &self.names.pvc(*o)).await?;
            }
            self.event(
                EventType::Normal,
                "VolumesDeleted",
                "ScaleDown",
                format!("deleted the volumes of removed members {delete_volumes:?}"),
            )
            .await;
        }
        let voters = view
            .as_ref()
            .map_or(replicas_now, |v| v.voters().count() as i32)
            .min(spec.size)
            .max(1);
        // Reported, not fatal (as the StatefulSet): status and backups go on.
        let pdb = self
            .disruption_budget(voters)
            .await
            .unwrap_or_else(|e| (false, "ApplyFailed", e.to_string()));
        let network_policy = self.network_policy().await;

        let mut status = self.status(&prev, view.as_ref(), cluster_id, &step, &roll, operation);
        status.restored_from = restored_from;
        status.stalled_scale_up = stalled;
        // A restore whose download or verification failed stops the first member in its init
        // containers; say why (the cluster never serves from a bad backup).
        if status.cluster_id.is_none() {
            if let Some(msg) = init_failure(&pod_list, &self.names.member(0)) {
                status.restore_failed(msg.clone(), ec.metadata.generation, &now());
                self.event(EventType::Warning, "RestoreFailed", "Create", msg)
                    .await;
            }
        }
        let auth = self
            .reconcile_auth(&prev, view.as_ref(), root_refused)
            .await;
        status.auth_enabled = auth.enabled;
        if let Some((ok, reason, msg)) = auth.condition {
            status.root_secret = Some(
                spec.auth
                    .as_ref()
                    .and_then(|a| a.root_secret.clone())
                    .unwrap_or_else(|| self.names.root_secret()),
            );
            status.set_condition(
                condition::AUTH,
                ok,
                reason,
                msg,
                ec.metadata.generation,
                &now(),
            );
        }
        let (tls_status, tls_condition) = self.tls_report(
            tls,
            view.as_ref(),
            &peer_step,
            replicas_now,
            prev.condition(condition::TLS).is_some(),
        );
        status.tls = tls_status;
        if let Some((ok, reason, msg)) = tls_condition {
            status.set_condition(
                condition::TLS,
                ok,
                reason,
                msg,
                ec.metadata.generation,
                &now(),
            );
        }
        match storage_condition {
            Some((ok, reason, msg)) => status.set_condition(
                condition::STORAGE,
                ok,
                reason,
                msg,
                ec.metadata.generation,
                &now(),
            ),
            None if prev.condition(condition::STORAGE).is_some() => status.set_condition(
                condition::STORAGE,
                true,
                super::storage::reason::AS_REQUESTED,
                "the volumes are as spec.storage asks",
                ec.metadata.generation,
                &now(),
            ),
            None => {}
        }
        let (_, refused_args) = resources::server_args(&spec.server);
        if !refused_args.is_empty() {
            status.set_condition(
                condition::SERVER,
                false,
                "ExtraArgsRefused",
                format!(
                    "left out of the members' flags: {}",
                    refused_args.join("; ")
                ),
                ec.metadata.generation,
                &now(),
            );
        } else if prev.condition(condition::SERVER).is_some() {
            status.set_condition(
                condition::SERVER,
                true,
                "Applied",
                "spec.server is in the members' flags",
                ec.metadata.generation,
                &now(),
            );
        }
        match sts_failure {
            Some(msg) => status.set_condition(
                condition::STATEFUL_SET,
                false,
                "ApplyFailed",
                msg,
                ec.metadata.generation,
                &now(),
            ),
            None if prev.condition(condition::STATEFUL_SET).is_some() => status.set_condition(
                condition::STATEFUL_SET,
                true,
                "Applied",
                "the StatefulSet is as the spec asks",
                ec.metadata.generation,
                &now(),
            ),
            None => {}
        }
        for (kind, (ok, reason, msg)) in [
            (condition::DISRUPTION_BUDGET, pdb),
            (condition::NETWORK_POLICY, network_policy),
            (condition::SERVICES, services),
        ] {
            status.set_condition(kind, ok, reason, msg, ec.metadata.generation, &now());
        }
        if let Some(after) = self
            .scheduled_backup(&prev, view.as_ref(), &mut status)
            .await?
        {
            requeue = requeue.min(after);
        }
        status.last_no_space_recovery = prev.last_no_space_recovery.clone();
        // A NOSPACE alarm stops every write: handled whatever else is under way.
        if let (Some(v), false) = (view.as_ref().filter(|v| v.leader.is_some()), spec.paused) {
            if let Some(after) = self.nospace(&prev, v, &alarms, &mut status).await {
                requeue = requeue.min(after);
            }
        }
        // Maintenance only while nothing else changes the members.
        if step == Step::Steady && roll == Roll::Steady && !spec.paused {
            if let Some(after) = self.maintenance(&prev, view.as_ref(), &mut status).await {
                requeue = requeue.min(after);
            }
        } else {
            status.maintenance = prev.maintenance.clone();
        }
        let restart = match (&roll, &status.operation) {
            (Roll::Restart { ordinal, .. }, Some(op)) => {
                Some((*ordinal, op.revision.clone().unwrap_or_default()))
            }
            _ => None,
        };
        self.patch_status(status).await?;
        // A restart is carried out once the status records it (so that a restart is never
        // lost: its deadline runs from then).
        if let Some((ordinal, revision)) = restart {
            self.restart_pod(ordinal, &revision).await?;
        }
        Ok(Action::requeue(requeue))
    }

    /// The scheduled backups: collects a finished run into the status, starts a due one, and
    /// says when to look again. Status and an Event tell every success and failure; a failure is
    /// retried with backoff for the same scheduled time.
    async fn scheduled_backup(
        &self,
        prev: &EtcdClusterStatus,
        view: Option<&ClusterView>,
        status: &mut EtcdClusterStatus,
    ) -> Result<Option<Duration>, Error> {
        let ec = self.ec;
        let generation = ec.metadata.generation;
        let key = format!("{}/{}", self.ns, self.names.cluster);
        let mut st = prev.backup.clone().unwrap_or_default();
        let Some(spec) = &ec.spec.backup else {
            status.backup = None;
            return Ok(None);
        };
        let t = now();
        if let Some((owner, result)) = self.ctx.backups.take_scheduled(&key) {
            match result {
                Ok(rec) => {
                    self.event(
                        EventType::Normal,
                        "BackupSucceeded",
                        "Backup",
                        format!(
                            "{} ({} bytes, revision {})",
                            rec.key, rec.size, rec.revision
                        ),
                    )
                    .await;
                    status.set_condition(
                        condition::BACKUP_SUCCEEDED,
                        true,
                        "BackupSucceeded",
                        rec.key.clone(),
                        generation,
                        &t,
                    );
                    if let RunOwner::Schedule(at) = owner {
                        st.last_schedule_time = Some(Time(at));
                    }
                    st.failures = 0;
                    st.last_backup = Some(rec);
                    st.unverified += 1;
                }
                Err(msg) => {
                    self.backup_failed(msg, &mut st, status, &t).await;
                }
            }
        }
        // A verification's failure is reported, never fatal to the backups.
        let verify_wake = match self.verify_backups(spec, &mut st, status).await {
            Ok(wake) => wake,
            Err(e) => {
                warn!(error = %e, "backup verification");
                None
            }
        };
        let next = self.next_backup(spec, st, view, status, &key).await?;
        Ok(match (next, verify_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Starts the scheduled backup when it is due (`st` is this reconcile's backup status, put
    /// into `status`), and says when to look again.
    async fn next_backup(
        &self,
        spec: &crate::crd::BackupSpec,
        mut st: crate::crd::BackupStatus,
        view: Option<&ClusterView>,
        status: &mut EtcdClusterStatus,
        key: &str,
    ) -> Result<Option<Duration>, Error> {
        let ec = self.ec;
        let generation = ec.metadata.generation;
        let t = now();
        if self.ctx.backups.running(key).is_some() {
            status.backup = Some(st);
            return Ok(Some(STEP_REQUEUE));
        }

        let schedule = match crate::backup::parse_schedule(&spec.schedule) {
            Ok(s) => s,
            Err(msg) => {
                status.set_condition(
                    condition::BACKUP_SUCCEEDED,
                    false,
                    "InvalidSchedule",
                    msg,
                    generation,
                    &t,
                );
                status.backup = Some(st);
                return Ok(None);
            }
        };
        if spec.suspend {
            st.next_backup_time = None;
            status.backup = Some(st);
            return Ok(None);
        }
        let last = st
            .last_schedule_time
            .clone()
            .or_else(|| ec.metadata.creation_timestamp.clone())
            .map_or(t.0, |x| x.0);
        let due = crate::backup::due(&schedule, last, t.0);
        let retry_at = (st.failures > 0)
            .then(|| st.next_backup_time.clone())
            .flatten();
        let wait = |until: jiff::Timestamp| crate::backup::wait_until(t.0, until);
        match due {
            Due::At(next) => {
                st.next_backup_time = Some(Time(next));
                status.backup = Some(st);
                Ok(Some(wait(next)))
            }
            Due::Now(_) if retry_at.as_ref().is_some_and(|r| r.0 > t.0) => {
                let r = retry_at.expect("checked").0;
                status.backup = Some(st);
                Ok(Some(wait(r)))
            }
            Due::Now(scheduled) => {
                // The healthiest source: a healthy follower first, the leader last.
                let mut endpoints: Vec<(bool, String)> = view
                    .map(|v| {
                        v.members
                            .iter()
                            .filter(|m| m.healthy && !m.learner)
                            .filter_map(|m| {
                                v.ordinal(self.layout.as_ref(), m)
                                    .map(|o| (v.leader == Some(m.id), self.layout.client_url(o)))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                endpoints.sort();
                let endpoints: Vec<String> = endpoints.into_iter().map(|(_, e)| e).collect();
                if endpoints.is_empty() && status.cluster_id.is_none() {
                    // Not bootstrapped yet: there is nothing to back up, and no failure either.
                    st.next_backup_time = Some(Time(scheduled));
                    status.backup = Some(st);
                    return Ok(Some(STEP_REQUEUE));
                }
                let dest = match self.destination(&spec.destination).await {
                    Ok(d) => d,
                    Err(e) => {
                        let after = self.backup_failed(e.to_string(), &mut st, status, &t).await;
                        status.backup = Some(st);
                        return Ok(Some(after));
                    }
                };
                let dir =
                    dest.cluster_dir(self.ns, &self.names.cluster, &ec.uid().unwrap_or_default());
                let work = crate::backup::backup_and_prune(
                    endpoints,
                    self.access.clone(),
                    dest,
                    dir,
                    Some(spec.retention.clone()),
                    st.last_verified_backup.as_ref().map(|b| b.key.clone()),
                );
                if self
                    .ctx
                    .backups
                    .start(key, RunOwner::Schedule(scheduled), work)
                {
                    info!(scheduled = %scheduled, "backup started");
                    self.event(
                        EventType::Normal,
                        "BackupStarted",
                        "Backup",
                        format!("scheduled for {scheduled}"),
                    )
                    .await;
                }
                st.next_backup_time = Some(Time(scheduled));
                status.backup = Some(st);
                Ok(Some(STEP_REQUEUE))
            }
        }
    }

    /// The backup a new cluster starts from: the named key, or the latest under the prefix;
    /// its manifest must exist (the members verify the object against it).
    async fn resolve_backup(
        &self,
        from: &crate::crd::FromBackup,
        etcd_snapshot: bool,
    ) -> Result<crate::crd::BackupRecord, String> {
        let dest = self
            .destination(&from.destination)
            .await
            .map_err(|e| e.to_string())?;
        let result = match &from.key {
            Some(key) if etcd_snapshot => crate::backup::etcd_snapshot(&dest, key).await,
            Some(key) => crate::backup::record(&dest, key).await,
            None => {
                let prefix = from.prefix.clone().unwrap_or_else(|| dest.prefix.clone());
                crate::backup::latest(&dest, &prefix).await
            }
        };
        result.map_err(|e| format!("cannot restore: {e}"))
    }

    /// Records a failed scheduled backup: Event, condition, one more failure, and the retry time
    /// (returned as how long to wait).
    async fn backup_failed(
        &self,
        msg: String,
        st: &mut crate::crd::BackupStatus,
        status: &mut EtcdClusterStatus,
        t: &Time,
    ) -> Duration {
        self.event(EventType::Warning, "BackupFailed", "Backup", msg.clone())
            .await;
        status.set_condition(
            condition::BACKUP_SUCCEEDED,
            false,
            "BackupFailed",
            msg,
            self.ec.metadata.generation,
            t,
        );
        st.failures += 1;
        let after = crate::backup::retry_backoff(st.failures);
        st.next_backup_time = Some(Time(
            t.0 + jiff::SignedDuration::try_from(after).unwrap_or_default(),
        ));
        after
    }

    /// Opens a backup destination with the credentials its Secret holds (if it names one).
    pub(super) async fn destination(
        &self,
        d: &crate::crd::BackupDestination,
    ) -> Result<Destination, Error> {
        let store = d.store().map_err(Error::Credentials)?;
        if let crate::crd::Store::Pvc(p) = store {
            self.store_server(p).await?;
        }
        let creds = match d.credentials_secret() {
            Some(name) => Some(
                read_credentials(
                    &self.api::<k8s_openapi::api::core::v1::Secret>(),
                    &name,
                    store,
                )
                .await?,
            ),
            None => None,
        };
        let key = match &d.encryption {
            Some(e) => {
                Some(read_backup_key(&self.api::<k8s_openapi::api::core::v1::Secret>(), e).await?)
            }
            None => None,
        };
        Destination::open(d, creds.as_ref())
            .map(|dest| dest.with_key(key))
            .map_err(|e| Error::Credentials(e.to_string()))
    }

    /// Applies (or, when disabled, deletes) the PodDisruptionBudget. An API server that does not
    /// serve `policy/v1` gets a warning, not a failed reconcile: the cluster matters more.
    async fn disruption_budget(&self, voters: i32) -> Result<(bool, &'static str, String), Error> {
        let pdb_api: Api<PodDisruptionBudget> = self.api();
        if !self.ec.spec.pod_disruption_budget.enabled {
            delete_if_exists(&pdb_api, &self.names.pdb()).await?;
            return Ok((
                false,
                "Disabled",
                "spec.podDisruptionBudget.enabled is false".into(),
            ));
        }
        match apply(&pdb_api, &resources::pdb(self.ec, voters)).await {
            Ok(()) => Ok((
                true,
                "Applied",
                format!(
                    "at most {} members may be disrupted",
                    resources::tolerated_failures(voters)
                ),
            )),
            // Server-side apply creates what is missing: a 404 means the API itself is not served.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => {
                let msg = "the API server does not serve policy/v1 PodDisruptionBudgets; voluntary disruptions are not limited".to_string();
                self.event(
                    EventType::Warning,
                    "PodDisruptionBudgetUnsupported",
                    "Apply",
                    msg.clone(),
                )
                .await;
                Ok((false, "APINotServed", msg))
            }
            Err(e) => Err(e),
        }
    }

    /// The members' NetworkPolicy as `spec.networkPolicy` asks; the NetworkPolicy condition.
    async fn network_policy(&self) -> (bool, &'static str, String) {
        let api: Api<NetworkPolicy> = self.api();
        if !self.ec.spec.network_policy.enabled {
            return match delete_if_exists(&api, &self.names.network_policy()).await {
                Ok(()) => (
                    false,
                    "Disabled",
                    "spec.networkPolicy.enabled is false".into(),
                ),
                Err(e) => (false, "DeleteFailed", e.to_string()),
            };
        }
        let np = crate::network::network_policy(self.ec, self.ctx.operator_pod.as_ref());
        let restricted = self.ec.spec.network_policy.clients.is_some();
        match apply(&api, &np).await {
            Ok(()) if restricted && self.ctx.operator_pod.is_none() => (
                false,
                "OperatorPodUnknown",
                "spec.networkPolicy.clients is not applied: the operator does not know its own pods' labels (CAIRN_OPERATOR_SELECTOR) and would cut itself off; the client port is open, the peer port only for the members".into(),
            ),
            Ok(()) => {
                let clients = if self.ec.spec.network_policy.clients.is_some() {
                    "the client port for the listed clients, the members and the operator"
                } else {
                    "the client port for anyone"
                };
                let operator = if self.ctx.operator_pod.is_some() {
                    ""
                } else {
                    " (the operator does not know its own pod's labels: members only)"
                };
                (
                    true,
                    "Applied",
                    format!("the peer port for the members and the operator{operator}; {clients}"),
                )
            }
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => (
                false,
                "APINotServed",
                "the API server does not serve networking.k8s.io/v1 NetworkPolicies".into(),
            ),
            Err(e) => (false, "ApplyFailed", e.to_string()),
        }
    }

    /// The StatefulSet as this API server can take it: servers before Kubernetes 1.27 do not
    /// know `persistentVolumeClaimRetentionPolicy`, and server-side apply refuses unknown fields
    /// (the operator deletes removed members' volumes itself either way).
    async fn for_server(&self, mut sts: StatefulSet) -> StatefulSet {
        let minor = *self
            .ctx
            .server_minor
            .get_or_init(|| async {
                match self.ctx.client.apiserver_version().await {
                    Ok(v) => v.minor.trim_end_matches('+').parse().unwrap_or(u32::MAX),
                    // Unknown: assume a current server.
                    Err(_) => u32::MAX,
                }
            })
            .await;
        if minor < 27 {
            if let Some(spec) = sts.spec.as_mut() {
                spec.persistent_volume_claim_retention_policy = None;
            }
        }
        sts
    }

    /// Carries out a step; returns when to look again.
    async fn act(
        &self,
        step: &Step,
        replicas: &mut i32,
        operation: &mut Option<Operation>,
        stalled: &mut Option<StalledScaleUp>,
    ) -> Result<Duration, Error> {
        let members = Members::new(
            (0..(*replicas).max(1))
                .map(|o| self.layout.client_url(o))
                .collect(),
        )
        .with_access(self.access.clone());
        let layout = self.layout.as_ref();
        let start = |kind, member| Some(self.operation(kind, member));
        match step {
            Step::Bootstrap { replicas: r } => {
                info!(members = r, "bootstrapping");
                *replicas = *r;
                self.event(
                    EventType::Normal,
                    "Bootstrapping",
                    "Create",
                    format!("starting {r} members"),
                )
                .await;
                Ok(STEP_REQUEUE)
            }
            Step::WaitBootstrap => Ok(STEP_REQUEUE),
            Step::WaitLearner { ordinal } => {
                // A learner nobody recorded adding (added by hand, or the status was lost):
                // its deadline runs from now.
                if operation.as_ref().is_none_or(|o| {
                    !matches!(o.kind, OperationKind::ScaleUp | OperationKind::Replace)
                }) {
                    *operation = start(OperationKind::ScaleUp, layout.member(*ordinal));
                }
                Ok(STEP_REQUEUE)
            }
            Step::RemoveCorrupt { id, ordinal } => {
                let result = members.execute(layout, step).await;
                self.count_op(
                    "remove_corrupt",
                    if result.is_ok() { "ok" } else { "error" },
                );
                result?;
                // The cluster serves nothing while a CORRUPT alarm stands; the member is gone.
                if let Err(e) = members.disarm(*id, etcd_client::AlarmType::Corrupt).await {
                    warn!(error = %e, "disarming the CORRUPT alarm");
                }
                let member = layout.member(*ordinal);
                self.member_event(
                    EventType::Warning,
                    "MemberCorrupt",
                    "Remove",
                    format!(
                        "{member} ({id:x}) has data that differs from its peers': removed it from the cluster; its volume is wiped and it joins again as a new member"
                    ),
                    &member,
                )
                .await;
                *operation = start(OperationKind::Replace, member);
                Ok(STEP_REQUEUE)
            }
            Step::RemoveLearner { id, ordinal } => {
                self.remove_stalled_learner(&members, *id, *ordinal, operation, stalled)
                    .await
            }
            Step::Grow { replicas: r } => {
                // A volume left from an earlier member of this ordinal would hand it stale data.
                let pvcs: Api<PersistentVolumeClaim> = self.api();
                for o in *replicas..*r {
                    delete_if_exists(&pvcs, &self.names.pvc(o)).await?;
                }
                *replicas = *r;
                Ok(STEP_REQUEUE)
            }
            Step::Shrink { replicas: r, .. } => {
                // The volumes go once the StatefulSet has shrunk (see `run`).
                *replicas = *r;
                *operation = None;
                Ok(STEP_REQUEUE)
            }
            Step::AddLearner { ordinal } | Step::Replace { ordinal, .. } => {
                let (op, kind, reason) = match step {
                    Step::Replace { .. } => ("replace", OperationKind::Replace, "MemberReplaced"),
                    _ => ("add", OperationKind::ScaleUp, "MemberAdded"),
                };
                let member = layout.member(*ordinal);
                match members.execute(layout, step).await {
                    Ok(_) => self.count_op(op, "ok"),
                    Err(e) => {
                        self.count_op(op, "error");
                        return Err(e.into());
                    }
                }
                self.member_event(
                    EventType::Normal,
                    reason,
                    "AddLearner",
                    format!(
                        "added {member} as a learner ({})",
                        layout.peer_url(*ordinal)
                    ),
                    &member,
                )
                .await;
                *operation = start(kind, member);
                if *ordinal < *replicas {
                    // Its pod exists (it lost its data or was removed by hand): restart it now
                    // so that it joins with the new member list instead of waiting out a
                    // crash-loop back-off.
                    let pods: Api<Pod> = self.api();
                    delete_if_exists(&pods, &layout.member(*ordinal)).await?;
                }
                Ok(STEP_REQUEUE)
            }
            Step::Wipe { ordinal } => {
                // The claim first: it goes once the pod is gone, and the StatefulSet then makes
                // a new pod and an empty claim (or the pod waits for one: see
                // `recreate_pods_without_claims`).
                let member = layout.member(*ordinal);
                let pvcs: Api<PersistentVolumeClaim> = self.api();
                delete_if_exists(&pvcs, &self.names.pvc(*ordinal)).await?;
                let pods: Api<Pod> = self.api();
                delete_if_exists(&pods, &member).await?;
                self.count_op("wipe", "ok");
                self.member_event(
                    EventType::Normal,
                    "MemberWiped",
                    "DeleteVolume",
                    format!(
                        "{member} was removed from the cluster and its data can never serve again: deleted its volume and pod; it joins again as a new member"
                    ),
                    &member,
                )
                .await;
                *operation = start(OperationKind::Replace, member);
                Ok(STEP_REQUEUE)
            }
            Step::Promote { ordinal, .. } => match members.execute(layout, step).await {
                Ok(Outcome::Done) => {
                    self.count_op("promote", "ok");
                    let member = layout.member(*ordinal);
                    self.member_event(
                        EventType::Normal,
                        "MemberPromoted",
                        "Promote",
                        format!("promoted {member} to voter"),
                        &member,
                    )
                    .await;
                    *operation = None;
                    *stalled = None;
                    Ok(STEP_REQUEUE)
                }
                // Still behind past its deadline: removed (the scale-up stalled).
                Ok(Outcome::LearnerBehind) if self.learner_overdue(operation.as_ref()) => {
                    let id = match step {
                        Step::Promote { id, .. } => *id,
                        _ => unreachable!("a promotion"),
                    };
                    self.remove_stalled_learner(&members, id, *ordinal, operation, stalled)
                        .await
                }
                Ok(Outcome::LearnerBehind) => Ok(STEP_REQUEUE),
                Err(e) => {
                    self.count_op("promote", "error");
                    Err(e.into())
                }
            },
            Step::MoveLeader { from, to } => {
                let result = members.execute(layout, step).await;
                self.count_op("move_leader", if result.is_ok() { "ok" } else { "error" });
                result?;
                self.event(
                    EventType::Normal,
                    "LeaderMoved",
                    "MoveLeader",
                    format!("moved leadership from {from:x} to {to:x} before removing {from:x}"),
                )
                .await;
                Ok(STEP_REQUEUE)
            }
            Step::Remove { id, ordinal } => {
                let result = members.execute(layout, step).await;
                self.count_op("remove", if result.is_ok() { "ok" } else { "error" });
                result?;
                let member = layout.member(*ordinal);
                self.member_event(
                    EventType::Normal,
                    "MemberRemoved",
                    "Remove",
                    format!("removed {member} ({id:x}) from the cluster"),
                    &member,
                )
                .await;
                *operation = start(OperationKind::ScaleDown, member);
                Ok(STEP_REQUEUE)
            }
            // The removal's Event said it; look again when the next learner may be added.
            Step::Refuse(plan::Refusal::ScaleUpStalled { retry_in, .. }) => {
                Ok((*retry_in).clamp(STEP_REQUEUE, WAIT_REQUEUE))
            }
            Step::Refuse(r) => {
                self.event(EventType::Warning, r.reason(), "Resize", r.message())
                    .await;
                Ok(WAIT_REQUEUE)
            }
            Step::Steady => {
                // A restart of the rollout is the rollout's to finish.
                if operation
                    .as_ref()
                    .is_some_and(|o| o.kind != OperationKind::Restart)
                {
                    *operation = None;
                }
                *stalled = None;
                Ok(STEADY_REQUEUE)
            }
        }
    }

    /// The status for this round (see [`status::derive`]).
    pub(super) fn status(
        &self,
        prev: &EtcdClusterStatus,
        view: Option<&ClusterView>,
        cluster_id: Option<String>,
        step: &Step,
        roll: &Roll,
        operation: Option<Operation>,
    ) -> EtcdClusterStatus {
        let t = now();
        let report = status::Report {
            generation: self.ec.metadata.generation,
            desired: self.ec.spec.size,
            paused: self.ec.spec.paused,
            layout: self.layout.as_ref(),
            now: &t,
        };
        status::derive(&report, prev, view, cluster_id, step, roll, operation)
    }

    /// Whether the learner added by `operation` is past `spec.scaling.learnerDeadline`.
    fn learner_overdue(&self, operation: Option<&Operation>) -> bool {
        let clock = self.learner_clock(operation, None);
        matches!((clock.deadline, clock.in_flight_for), (Some(d), Some(a)) if a > d)
    }

    /// A membership step starting now.
    fn operation(&self, kind: OperationKind, member: String) -> Operation {
        Operation {
            kind,
            member,
            target_size: self.ec.spec.size,
            started_at: now(),
            member_id: None,
            revision: None,
            pod_uid: None,
        }
    }

    /// Removes the learner `id` (ordinal `ordinal`) that missed its deadline: the scale-up
    /// stalled (Warning Event, `status.stalledScaleUp`); its pod and volume go next.
    async fn remove_stalled_learner(
        &self,
        members: &Members,
        id: u64,
        ordinal: i32,
        operation: &mut Option<Operation>,
        stalled: &mut Option<StalledScaleUp>,
    ) -> Result<Duration, Error> {
        let layout = self.layout.as_ref();
        let result = members
            .execute(layout, &Step::RemoveLearner { id, ordinal })
            .await;
        self.count_op(
            "remove_learner",
            if result.is_ok() { "ok" } else { "error" },
        );
        result?;
        let member = layout.member(ordinal);
        let waited = operation.as_ref().map_or(String::new(), |o| {
            format!(" in {}s", ago(&o.started_at).as_secs())
        });
        self.member_event(
            EventType::Warning,
            plan::SCALE_UP_STALLED,
            "Remove",
            format!(
                "{member} ({id:x}) was not promoted{waited} (spec.scaling.learnerDeadline {}): removed it from the cluster; its pod and volume go next",
                self.ec.spec.scaling.learner_deadline
            ),
            &member,
        )
        .await;
        *stalled = Some(StalledScaleUp {
            member: member.clone(),
            removed_at: now(),
        });
        *operation = Some(self.operation(OperationKind::ScaleDown, member));
        Ok(STEP_REQUEUE)
    }

    /// The learner deadline, how long the learner added by `operation` has had (the step in
    /// status) and how long ago one was last removed for missing it (`stalled`).
    fn learner_clock(
        &self,
        operation: Option<&Operation>,
        stalled: Option<&StalledScaleUp>,
    ) -> plan::LearnerClock {
        plan::LearnerClock {
            deadline: crate::backup::parse_age(&self.ec.spec.scaling.learner_deadline)
                .filter(|d| !d.is_zero()),
            in_flight_for: operation
                .filter(|o| matches!(o.kind, OperationKind::ScaleUp | OperationKind::Replace))
                .map(|o| ago(&o.started_at)),
            stalled_for: stalled.map(|s| ago(&s.removed_at)),
        }
    }

    pub(super) async fn patch_status(&self, status: EtcdClusterStatus) -> Result<(), Error> {
        let created = self
            .ec
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond() as f64 / 1000.0);
        self.ctx.metrics.cluster.report(
            self.ns,
            &self.names.cluster,
            &self.ec.spec,
            &status,
            created,
        );
        let api: Api<EtcdCluster> = self.api();
        let patch = serde_json::json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": "EtcdCluster",
            "status": status,
        });
        api.patch_status(&self.names.cluster, &apply_params(), &Patch::Apply(&patch))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"containerStatuses": [status]}
        }))
        .unwrap()
    }

    #[test]
    fn unusable_data_is_read_from_termination_messages() {
        let names = Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        };
        let refused = serde_json::json!({"terminated": {"exitCode": 1,
            "message": "cairn: member 9c819950b72cd2e2 has already been bootstrapped\n"}});
        let pods = [
            // Crash-looping after the refusal: the message is in lastState.
            pod(
                "demo-2",
                serde_json::json!({"name": "cairn", "image": "cairn", "imageID": "", "ready": false,
                "restartCount": 3, "lastState": refused, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
            ),
            // Just refused.
            pod(
                "demo-0",
                serde_json::json!({"name": "cairn", "image": "cairn", "imageID": "", "ready": false,
                "restartCount": 0, "state": refused}),
            ),
            // Other failures are not data loss: never replaced for them.
            pod(
                "demo-1",
                serde_json::json!({"name": "cairn", "image": "cairn", "imageID": "", "ready": false,
                "restartCount": 1, "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}),
            ),
            pod(
                "other-3",
                serde_json::json!({"name": "cairn", "image": "cairn", "imageID": "", "ready": false,
                "restartCount": 0, "state": refused}),
            ),
        ];
        let lost = |id| plan::Unusable::LostData { id };
        assert_eq!(
            pods_reporting_unusable(&pods, &names),
            vec![(0, lost(0x9c819950b72cd2e2)), (2, lost(0x9c819950b72cd2e2))]
        );
        // A pod being deleted is not asked again (it was replaced already).
        let mut deleting = pods[0].clone();
        deleting.metadata.deletion_timestamp = Some(now());
        assert_eq!(pods_reporting_unusable(&[deleting], &names), vec![]);
        let removed = serde_json::json!({"terminated": {"exitCode": 1,
            "message": "cairn: member 46a7171c4bc2cb5a: the member has been permanently removed from the cluster\n"}});
        let p = pod(
            "demo-1",
            serde_json::json!({"name": "cairn", "image": "cairn", "imageID": "", "ready": false,
            "restartCount": 2, "lastState": removed, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
        );
        assert_eq!(
            pods_reporting_unusable(&[p], &names),
            vec![(
                1,
                plan::Unusable::Removed {
                    id: 0x46a7171c4bc2cb5a
                }
            )]
        );
    }
}
