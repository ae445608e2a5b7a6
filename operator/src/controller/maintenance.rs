//! Scheduled maintenance of one EtcdCluster (`spec.maintenance`): defragmentation runs, one
//! member per round (`crate::maintenance` says which), only while the cluster is steady.

use super::cluster::Reconciler;
use super::*;
use crate::backup::Due;
use crate::maintenance::{next_defrag, Defrag};

/// cairn's `--quota-backend-bytes` when none is given (etcd's 2 GiB).
const DEFAULT_QUOTA_BYTES: i64 = 2 << 30;

/// How long after an attempt to clear a NOSPACE alarm the next one may start (each compacts
/// away the history and defragments every member).
const NOSPACE_RETRY: Duration = Duration::from_secs(300);

impl Reconciler<'_> {
    /// Handles a NOSPACE alarm (the cluster takes no writes until space is reclaimed, as etcd's
    /// runbook says): compacts at the current revision (waiting until the records are gone),
    /// defragments every voter one at a time (followers first, the leader last), then disarms
    /// the alarm of each member whose database is back under the quota, and says so in an
    /// Event. A member still over it (its data does not fit the quota) keeps its alarm: the
    /// `Space` condition says so. Attempts are [`NOSPACE_RETRY`] apart
    /// (`status.lastNoSpaceRecovery`). Returns when to look again, `None` without an alarm.
    pub(super) async fn nospace(
        &self,
        prev: &EtcdClusterStatus,
        view: &ClusterView,
        alarms: &[(u64, etcd_client::AlarmType)],
        status: &mut EtcdClusterStatus,
    ) -> Option<Duration> {
        let generation = self.ec.metadata.generation;
        let t = now();
        let members = self.members_of(view);
        let alarmed: Vec<u64> = alarms
            .iter()
            .filter(|(_, a)| *a == etcd_client::AlarmType::Nospace)
            .map(|(id, _)| *id)
            .collect();
        let last = prev.condition(condition::SPACE);
        if alarmed.is_empty() {
            if last.is_some_and(|c| c.status != "True") {
                status.set_condition(
                    condition::SPACE,
                    true,
                    "NoAlarm",
                    "no NOSPACE alarm is raised".to_string(),
                    generation,
                    &t,
                );
            }
            return None;
        }
        // One attempt per back-off, whatever the last one did: each compacts away the history
        // and rewrites every member.
        if let Some(at) = &prev.last_no_space_recovery {
            let since = ago(at);
            if since < NOSPACE_RETRY {
                return Some(NOSPACE_RETRY - since);
            }
        }
        status.last_no_space_recovery = Some(t.clone());
        let quota = self
            .ec
            .spec
            .server
            .quota_backend_bytes
            .filter(|q| *q > 0)
            .unwrap_or(DEFAULT_QUOTA_BYTES);
        let started = std::time::Instant::now();
        let revision = match members.compact_to_current().await {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("NOSPACE alarm: compacting failed: {e}");
                return self.nospace_failed("Compact", msg, status).await;
            }
        };
        let mut done = Vec::new();
        loop {
            match next_defrag(self.layout.as_ref(), view, &done) {
                Defrag::Member { id, ordinal, .. } => {
                    if let Err(e) = members.defragment(&self.layout.client_url(ordinal)).await {
                        let msg = format!(
                            "NOSPACE alarm: defragmenting {}: {e}",
                            self.layout.member(ordinal)
                        );
                        return self.nospace_failed("Defragment", msg, status).await;
                    }
                    done.push(id);
                }
                Defrag::Wait(why) => {
                    let msg = format!("NOSPACE alarm: recovery waits: {why}");
                    status.set_condition(
                        condition::SPACE,
                        false,
                        "RecoveryWaiting",
                        msg,
                        generation,
                        &t,
                    );
                    return Some(WAIT_REQUEUE);
                }
                Defrag::Done => break,
            }
        }
        let mut disarmed = Vec::new();
        let mut full = Vec::new();
        for id in alarmed {
            let Some(m) = view.members.iter().find(|m| m.id == id) else {
                // A member no longer in the cluster: its alarm can go.
                if members
                    .disarm(id, etcd_client::AlarmType::Nospace)
                    .await
                    .is_ok()
                {
                    disarmed.push(format!("{id:x}"));
                }
                continue;
            };
            let name = view
                .ordinal(self.layout.as_ref(), m)
                .map_or_else(|| format!("{id:x}"), |o| self.layout.member(o));
            let size = match view.ordinal(self.layout.as_ref(), m) {
                Some(o) => members.db_size(&self.layout.client_url(o)).await.ok(),
                None => None,
            };
            match size {
                Some(size) if size < quota => {
                    match members.disarm(id, etcd_client::AlarmType::Nospace).await {
                        Ok(()) => disarmed.push(format!("{name} ({size} bytes)")),
                        Err(e) => full.push(format!("{name}: disarming failed: {e}")),
                    }
                }
                Some(size) => full.push(format!("{name} has {size} bytes")),
                None => full.push(format!("{name}: its size is unknown")),
            }
        }
        if !disarmed.is_empty() {
            self.event(
                EventType::Normal,
                "NoSpaceRecovered",
                "Defragment",
                format!(
                    "NOSPACE alarm: compacted at revision {revision}, defragmented {} members in {:.1?}, disarmed the alarm of {}",
                    done.len(),
                    started.elapsed(),
                    disarmed.join(", ")
                ),
            )
            .await;
        }
        if full.is_empty() {
            status.set_condition(
                condition::SPACE,
                true,
                "Recovered",
                format!("the NOSPACE alarm was cleared after compacting at revision {revision} and defragmenting"),
                generation,
                &t,
            );
            Some(STEP_REQUEUE)
        } else {
            let msg = format!(
                "NOSPACE alarm stays: after compacting at revision {revision} and defragmenting, {} (quota {quota} bytes): raise spec.server.quotaBackendBytes or delete data",
                full.join(", ")
            );
            self.event(
                EventType::Warning,
                "QuotaExceeded",
                "Defragment",
                msg.clone(),
            )
            .await;
            status.set_condition(
                condition::SPACE,
                false,
                "QuotaExceeded",
                msg,
                generation,
                &t,
            );
            Some(NOSPACE_RETRY)
        }
    }

    /// A NOSPACE recovery that failed at `action`: a Warning Event and `Space=False`,
    /// `RecoveryFailed`; look again soon (the next attempt waits out the back-off).
    async fn nospace_failed(
        &self,
        action: &'static str,
        msg: String,
        status: &mut EtcdClusterStatus,
    ) -> Option<Duration> {
        self.event(
            EventType::Warning,
            "NoSpaceRecoveryFailed",
            action,
            msg.clone(),
        )
        .await;
        status.set_condition(
            condition::SPACE,
            false,
            "RecoveryFailed",
            msg,
            self.ec.metadata.generation,
            &now(),
        );
        Some(WAIT_REQUEUE)
    }

    /// Starts a defragmentation run when its schedule is due and defragments its next member
    /// while every voter is healthy; fills `status.maintenance` and the `Maintenance`
    /// condition. Returns when to look again.
    pub(super) async fn maintenance(
        &self,
        prev: &EtcdClusterStatus,
        view: Option<&ClusterView>,
        status: &mut EtcdClusterStatus,
    ) -> Option<Duration> {
        let generation = self.ec.metadata.generation;
        let Some(spec) = self
            .ec
            .spec
            .maintenance
            .as_ref()
            .and_then(|m| m.defrag.as_ref())
        else {
            status.maintenance = None;
            return None;
        };
        let mut m = prev.maintenance.clone().unwrap_or_default();
        let t = now();
        let set = |status: &mut EtcdClusterStatus, ok: bool, reason: &str, msg: String| {
            status.set_condition(condition::MAINTENANCE, ok, reason, msg, generation, &t)
        };
        let schedule = match crate::backup::parse_schedule(&spec.schedule) {
            Ok(s) => s,
            Err(msg) => {
                set(status, false, "InvalidSchedule", msg);
                status.maintenance = Some(m);
                return None;
            }
        };
        if m.defrag_started.is_none() {
            if spec.suspend {
                m.next_defrag = None;
                set(
                    status,
                    true,
                    "Suspended",
                    "defragmentation is suspended".into(),
                );
                status.maintenance = Some(m);
                return None;
            }
            let last = m
                .last_defrag_schedule
                .clone()
                .or_else(|| self.ec.metadata.creation_timestamp.clone())
                .map_or(t.0, |x| x.0);
            match crate::backup::due(&schedule, last, t.0) {
                Due::At(next) => {
                    m.next_defrag = Some(Time(next));
                    if prev.condition(condition::MAINTENANCE).is_none() {
                        set(
                            status,
                            true,
                            "Scheduled",
                            format!("next defragmentation at {next}"),
                        );
                    }
                    status.maintenance = Some(m);
                    let secs = next.duration_since(t.0).as_secs_f64().clamp(0.5, 300.0);
                    return Some(Duration::from_secs_f64(secs));
                }
                Due::Now(scheduled) => {
                    m.defrag_started = Some(t.clone());
                    m.last_defrag_schedule = Some(Time(scheduled));
                    m.defragmented.clear();
                    self.event(
                        EventType::Normal,
                        "DefragStarted",
                        "Defragment",
                        format!("defragmenting the members one at a time (scheduled {scheduled})"),
                    )
                    .await;
                }
            }
        }
        let Some(view) = view else {
            set(
                status,
                false,
                "Waiting",
                "defragmentation waits: the members do not answer".into(),
            );
            status.maintenance = Some(m);
            return Some(WAIT_REQUEUE);
        };
        let done: Vec<u64> = m
            .defragmented
            .iter()
            .filter_map(|h| u64::from_str_radix(h, 16).ok())
            .collect();
        let after = match next_defrag(self.layout.as_ref(), view, &done) {
            Defrag::Wait(why) => {
                set(
                    status,
                    false,
                    "Waiting",
                    format!("defragmentation waits: {why}"),
                );
                WAIT_REQUEUE
            }
            Defrag::Member {
                id,
                ordinal,
                leader,
            } => {
                let member = self.layout.member(ordinal);
                let started = std::time::Instant::now();
                match self
                    .members_of(view)
                    .defragment(&self.layout.client_url(ordinal))
                    .await
                {
                    Ok(()) => {
                        m.defragmented.push(format!("{id:x}"));
                        let role = if leader { "the leader" } else { "a follower" };
                        self.member_event(
                            EventType::Normal,
                            "MemberDefragmented",
                            "Defragment",
                            format!(
                                "defragmented {member} ({role}) in {:.1?}",
                                started.elapsed()
                            ),
                            &member,
                        )
                        .await;
                        set(
                            status,
                            true,
                            "Defragmenting",
                            format!("defragmented {member}"),
                        );
                        STEP_REQUEUE
                    }
                    Err(e) => {
                        let msg = format!("defragmenting {member}: {e}");
                        self.member_event(
                            EventType::Warning,
                            "DefragFailed",
                            "Defragment",
                            msg.clone(),
                            &member,
                        )
                        .await;
                        set(status, false, "DefragFailed", msg);
                        WAIT_REQUEUE
                    }
                }
            }
            Defrag::Done => {
                m.last_defrag = Some(t.clone());
                m.defrag_started = None;
                self.event(
                    EventType::Normal,
                    "DefragCompleted",
                    "Defragment",
                    format!(
                        "defragmented {} members, the leader last",
                        m.defragmented.len()
                    ),
                )
                .await;
                set(
                    status,
                    true,
                    "Completed",
                    "the last defragmentation run completed".into(),
                );
                STEP_REQUEUE
            }
        };
        status.maintenance = Some(m);
        Some(after)
    }
}
