//! Scheduled maintenance of one EtcdCluster (`spec.maintenance`): defragmentation runs, one
//! member per round (`crate::maintenance` says which), only while the cluster is steady.

use super::cluster::Reconciler;
use super::*;
use crate::backup::Due;
use crate::maintenance::{next_defrag, Defrag};

impl Reconciler<'_> {
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
