//! The rollout of one EtcdCluster's pod template, carried out: which image may go into the
//! template at all ([`crate::rollout::refuse_image`]), and the planner's next restart, leader move
//! or wait ([`crate::rollout::next_roll`]) with its Events.

use super::cluster::Reconciler;
use super::*;

/// The StatefulSet's current revision (`status.updateRevision`), once its status describes its
/// spec (a status that lags the spec names an old revision: wait for it).
fn current_revision(sts: &StatefulSet) -> Option<String> {
    let status = sts.status.as_ref()?;
    if status.observed_generation != sts.metadata.generation {
        return None;
    }
    status.update_revision.clone()
}

impl Reconciler<'_> {
    /// Why the image the spec asks for may not replace the running one (see
    /// [`crate::rollout::refuse_image`]): judged against the newest data format a member reports now
    /// or reported before.
    pub(super) fn refused_image(
        &self,
        prev: &EtcdClusterStatus,
        view: Option<&ClusterView>,
        running: Option<&str>,
    ) -> Option<String> {
        let desired = resources::image(self.ec, &self.ctx.default_image);
        if running.is_none_or(|r| r == desired) {
            return None;
        }
        let reported = view
            .into_iter()
            .flat_map(|v| v.members.iter())
            .filter_map(|m| m.version.as_ref().map(|v| v.data_format));
        let before = prev
            .members
            .iter()
            .filter_map(|m| m.data_format)
            .map(|f| f.max(0) as u32);
        let newest = reported.chain(before).max()?;
        crate::rollout::refuse_image(&desired, newest)
    }

    /// The rollout's next step (see [`crate::rollout::next_roll`]), carried out; with when to look
    /// again.
    pub(super) async fn roll(
        &self,
        prev: &EtcdClusterStatus,
        sts: &StatefulSet,
        pods: &[Pod],
        view: &ClusterView,
        operation: &mut Option<Operation>,
    ) -> Result<(Roll, Duration), Error> {
        let Some(revision) = current_revision(sts) else {
            return Ok((Roll::Steady, STEP_REQUEUE));
        };
        let op = operation
            .as_ref()
            .filter(|o| o.kind == OperationKind::Restart);
        let restarting = op.and_then(|o| {
            Some(crate::rollout::Restarting {
                ordinal: self.layout.ordinal(&o.member)?,
                id: u64::from_str_radix(o.member_id.as_deref()?, 16).ok()?,
                revision: o.revision.clone()?,
                started: o.started_at.0,
            })
        });
        // Not on the current template: a pod of another revision, one being deleted (its
        // process may still answer), and the pod of the member being restarted until the
        // StatefulSet made it anew (a pod of another UID than the one deleted).
        let mut outdated: Vec<i32> = pods
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_some()
                    || p.labels()
                        .get("controller-revision-hash")
                        .is_some_and(|h| *h != revision)
                    || op.is_some_and(|o| {
                        o.member == p.name_any() && o.pod_uid.as_deref() == p.uid().as_deref()
                    })
            })
            .filter_map(|p| self.names.ordinal(&p.name_any()))
            .collect();
        if let Some(r) = &restarting {
            let member = self.layout.member(r.ordinal);
            if !pods.iter().any(|p| p.name_any() == member) {
                outdated.push(r.ordinal);
            }
        }
        let deadline = crate::backup::parse_age(&self.ec.spec.rollout.member_deadline)
            .unwrap_or(Duration::from_secs(300));
        let input = crate::rollout::Rollout {
            view,
            revision: &revision,
            outdated,
            restarting,
            now: jiff::Timestamp::now(),
            deadline,
        };
        let roll = crate::rollout::next_roll(self.layout.as_ref(), &input);
        let image = resources::image(self.ec, &self.ctx.default_image);
        let after = match &roll {
            Roll::Steady => {
                if operation
                    .as_ref()
                    .is_some_and(|o| o.kind == OperationKind::Restart)
                {
                    *operation = None;
                }
                STEADY_REQUEUE
            }
            Roll::Restart { ordinal, id } => {
                // Recorded first: the pod is deleted once the status holds this (see `run`).
                let member = self.layout.member(*ordinal);
                let pod_uid = pods
                    .iter()
                    .find(|p| p.name_any() == member)
                    .and_then(|p| p.uid());
                *operation = Some(Operation {
                    kind: OperationKind::Restart,
                    member,
                    target_size: self.ec.spec.size,
                    started_at: now(),
                    member_id: Some(format!("{id:x}")),
                    revision: Some(revision.clone()),
                    pod_uid,
                });
                STEP_REQUEUE
            }
            Roll::MoveLeader { from, to } => {
                let members = self.members_of(view);
                let result = members.move_leader(*from, *to).await;
                self.count_op("move_leader", if result.is_ok() { "ok" } else { "error" });
                result?;
                self.event(
                    EventType::Normal,
                    "LeaderMoved",
                    "Upgrade",
                    format!("moved leadership from {from:x} to {to:x} before restarting {from:x}"),
                )
                .await;
                STEP_REQUEUE
            }
            Roll::Done { ordinal } => {
                let member = self.layout.member(*ordinal);
                self.member_event(
                    EventType::Normal,
                    "MemberRestarted",
                    "Upgrade",
                    format!("{member} is back on revision {revision} ({image}) and caught up"),
                    &member,
                )
                .await;
                *operation = None;
                STEP_REQUEUE
            }
            Roll::Wait { ordinal } => {
                // The pod recorded as deleted is still there, not being deleted: delete it (the
                // deletion after the status patch failed, or the operator stopped in between).
                let member = self.layout.member(*ordinal);
                let stale = pods.iter().any(|p| {
                    p.name_any() == member
                        && p.metadata.deletion_timestamp.is_none()
                        && op.is_some_and(|o| o.pod_uid.is_some() && o.pod_uid == p.uid())
                });
                if stale {
                    self.restart_pod(*ordinal, &revision).await?;
                }
                STEP_REQUEUE
            }
            Roll::Stalled { why, .. } => {
                if prev
                    .condition(condition::PROGRESSING)
                    .is_none_or(|c| c.reason != crate::crd::reason::UPGRADE_STALLED)
                {
                    self.event(
                        EventType::Warning,
                        "UpgradeStalled",
                        "Upgrade",
                        format!("{why}; no other member is touched until it is back or the previous version is set again"),
                    )
                    .await;
                }
                WAIT_REQUEUE
            }
            Roll::Blocked { .. } | Roll::Refused { .. } => WAIT_REQUEUE,
        };
        Ok((roll, after))
    }

    /// Deletes the pod of `ordinal` (the StatefulSet makes it again on the current template),
    /// with its Event.
    pub(super) async fn restart_pod(&self, ordinal: i32, revision: &str) -> Result<(), Error> {
        let member = self.layout.member(ordinal);
        let pods: Api<Pod> = self.api();
        delete_if_exists(&pods, &member).await?;
        self.count_op("restart", "ok");
        let image = resources::image(self.ec, &self.ctx.default_image);
        self.member_event(
            EventType::Normal,
            "MemberRestarting",
            "Upgrade",
            format!("restarting {member} into revision {revision} ({image})"),
            &member,
        )
        .await;
        Ok(())
    }

    /// With no quorum, restarts a member that is down on an older template (see
    /// [`crate::rollout::restart_without_quorum`]); says whether it did.
    pub(super) async fn restart_down_member(
        &self,
        sts: &StatefulSet,
        pods: &[Pod],
    ) -> Result<bool, Error> {
        let Some(revision) = current_revision(sts) else {
            return Ok(false);
        };
        let states: Vec<crate::rollout::PodState> = pods
            .iter()
            .filter_map(|p| {
                Some(crate::rollout::PodState {
                    ordinal: self.names.ordinal(&p.name_any())?,
                    revision: p.labels().get("controller-revision-hash").cloned(),
                    ready: p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        }),
                    deleting: p.metadata.deletion_timestamp.is_some(),
                })
            })
            .collect();
        match crate::rollout::restart_without_quorum(&states, &revision) {
            Some(ordinal) => {
                self.restart_pod(ordinal, &revision).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
