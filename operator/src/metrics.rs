//! Prometheus metrics of the operator: reconciles (count, errors, duration), membership
//! operations, and per cluster what the chart's alerts watch (members desired and ready, the
//! last scheduled backup, failures in a row, when the members' certificates expire). Served on
//! `/metrics` next to `/healthz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    histogram_opts, opts, Encoder, GaugeVec, HistogramVec, IntCounterVec, Registry, TextEncoder,
};

use crate::crd::{EtcdClusterSpec, EtcdClusterStatus};

/// A cluster not reported for this long is gone (deleted): its gauges are dropped (on the next
/// report or scrape), so no alert fires for it. Reconciles run at least every few minutes, and
/// report even when a part of them fails.
const STALE: Duration = Duration::from_secs(60 * 60);

/// The operator's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub membership_operations: IntCounterVec,
    /// Backup verifications by result (`ok`, `failed`).
    pub backup_verifications: IntCounterVec,
    /// Per cluster (`namespace`, `cluster`): gauges from its spec and status.
    pub cluster: ClusterGauges,
}

/// Gauges per cluster, set from the status each reconcile writes.
#[derive(Clone)]
pub struct ClusterGauges {
    desired_members: GaugeVec,
    ready_members: GaugeVec,
    backup_last_success: GaugeVec,
    backup_failures: GaugeVec,
    backup_interval: GaugeVec,
    certificate_expiry: GaugeVec,
    /// When each cluster was last reported.
    seen: Arc<Mutex<BTreeMap<(String, String), Instant>>>,
}

/// The longest gap between consecutive runs of `schedule` after `now`: over the coming week
/// (which covers daily and weekday patterns), or, for a schedule with fewer than two runs in
/// it, until two runs are found within the coming year. At most 10,000 runs are looked at (a
/// schedule that dense has short gaps anyway). `None` if it never runs twice in a year.
pub fn schedule_interval(
    schedule: &croner::Cron,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let week = now + chrono::Duration::days(8);
    let year = now + chrono::Duration::days(400);
    let mut prev: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut longest: Option<chrono::Duration> = None;
    for t in schedule.iter_after(now).take(10_000) {
        if t > year || (t > week && longest.is_some()) {
            break;
        }
        if let Some(p) = prev {
            longest = longest.max(Some(t - p));
        }
        prev = Some(t);
    }
    longest.and_then(|d| d.to_std().ok())
}

impl ClusterGauges {
    fn new(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(opts!(name, help), labels).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let l = ["namespace", "cluster"];
        ClusterGauges {
            desired_members: gauge(
                "cairn_operator_cluster_desired_members",
                "spec.size of the EtcdCluster",
                &l,
            ),
            ready_members: gauge(
                "cairn_operator_cluster_ready_members",
                "Members that answer (status.readyMembers)",
                &l,
            ),
            backup_last_success: gauge(
                "cairn_operator_backup_last_success_timestamp_seconds",
                "Unix time of the last scheduled backup that succeeded (the cluster's creation before the first); only while scheduled backups are on",
                &l,
            ),
            backup_failures: gauge(
                "cairn_operator_backup_consecutive_failures",
                "Consecutive failures of the current scheduled backup",
                &l,
            ),
            backup_interval: gauge(
                "cairn_operator_backup_schedule_interval_seconds",
                "The longest time between two runs of the backup schedule (over the coming week, or the coming year for sparser schedules); only while scheduled backups are on",
                &l,
            ),
            certificate_expiry: gauge(
                "cairn_operator_certificate_expiry_timestamp_seconds",
                "Unix time the members' certificates issued by the operator expire (the earliest)",
                &["namespace", "cluster", "certificate"],
            ),
            seen: Arc::default(),
        }
    }

    /// Sets the gauges of one cluster from its spec and the status being written; drops those
    /// of clusters not reported for [`STALE`].
    pub fn report(
        &self,
        namespace: &str,
        cluster: &str,
        spec: &EtcdClusterSpec,
        status: &EtcdClusterStatus,
        created: Option<f64>,
    ) {
        let l = [namespace, cluster];
        self.desired_members
            .with_label_values(&l)
            .set(spec.size as f64);
        self.ready_members
            .with_label_values(&l)
            .set(status.ready_members as f64);
        let scheduled = spec.backup.as_ref().is_some_and(|b| !b.suspend);
        let backup = status.backup.as_ref();
        let last = backup
            .and_then(|b| b.last_backup.as_ref())
            .map(|r| r.time.0.as_millisecond() as f64 / 1000.0)
            .or(created);
        let interval = spec
            .backup
            .as_ref()
            .and_then(|b| crate::backup::parse_schedule(&b.schedule).ok())
            .and_then(|c| schedule_interval(&c, chrono::Utc::now()));
        match (scheduled, last, interval) {
            (true, Some(t), Some(interval)) => {
                self.backup_last_success.with_label_values(&l).set(t);
                self.backup_failures
                    .with_label_values(&l)
                    .set(backup.map_or(0, |b| b.failures) as f64);
                self.backup_interval
                    .with_label_values(&l)
                    .set(interval.as_secs_f64());
            }
            _ => {
                let _ = self.backup_last_success.remove_label_values(&l);
                let _ = self.backup_failures.remove_label_values(&l);
                let _ = self.backup_interval.remove_label_values(&l);
            }
        }
        let member = [namespace, cluster, "member"];
        match status.tls.as_ref().and_then(|t| t.not_after.as_ref()) {
            Some(t) => self
                .certificate_expiry
                .with_label_values(&member)
                .set(t.0.as_millisecond() as f64 / 1000.0),
            None => {
                let _ = self.certificate_expiry.remove_label_values(&member);
            }
        }
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.to_string(), cluster.to_string()), Instant::now());
        self.prune();
    }

    /// Drops the gauges of clusters not reported for [`STALE`].
    pub fn prune(&self) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<(String, String)> = seen
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > STALE)
            .map(|(k, _)| k.clone())
            .collect();
        for (ns, c) in gone {
            seen.remove(&(ns.clone(), c.clone()));
            let l = [ns.as_str(), c.as_str()];
            for g in [
                &self.desired_members,
                &self.ready_members,
                &self.backup_last_success,
                &self.backup_failures,
                &self.backup_interval,
            ] {
                let _ = g.remove_label_values(&l);
            }
            let _ =
                self.certificate_expiry
                    .remove_label_values(&[ns.as_str(), c.as_str(), "member"]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            opts!("cairn_operator_reconciles_total", "Reconciles run"),
            &["namespace", "cluster"],
        )
        .unwrap();
        let reconcile_errors = IntCounterVec::new(
            opts!(
                "cairn_operator_reconcile_errors_total",
                "Reconciles that failed"
            ),
            &["namespace", "cluster", "error"],
        )
        .unwrap();
        let reconcile_duration = HistogramVec::new(
            histogram_opts!(
                "cairn_operator_reconcile_duration_seconds",
                "How long a reconcile took",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
            ),
            &["namespace", "cluster"],
        )
        .unwrap();
        let membership_operations = IntCounterVec::new(
            opts!(
                "cairn_operator_membership_operations_total",
                "Membership operations (add, promote, move_leader, remove, replace) by result"
            ),
            &["namespace", "cluster", "operation", "result"],
        )
        .unwrap();
        let backup_verifications = IntCounterVec::new(
            opts!(
                "cairn_operator_backup_verifications_total",
                "Backups verified by restoring them into a scratch member, by result (ok, failed)"
            ),
            &["namespace", "cluster", "result"],
        )
        .unwrap();
        for c in [
            &reconciles,
            &reconcile_errors,
            &membership_operations,
            &backup_verifications,
        ] {
            registry.register(Box::new(c.clone())).unwrap();
        }
        registry
            .register(Box::new(reconcile_duration.clone()))
            .unwrap();
        let cluster = ClusterGauges::new(&registry);
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            membership_operations,
            backup_verifications,
            cluster,
        }
    }
}

impl Metrics {
    /// Counts a reconcile; the returned guard records its duration when dropped.
    pub fn reconcile(&self, namespace: &str, cluster: &str) -> ReconcileTimer {
        self.reconciles
            .with_label_values(&[namespace, cluster])
            .inc();
        ReconcileTimer {
            hist: self
                .reconcile_duration
                .with_label_values(&[namespace, cluster]),
            start: Instant::now(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.cluster.prune();
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}

/// Records a reconcile's duration on drop, whichever way the reconcile ended.
pub struct ReconcileTimer {
    hist: prometheus::Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> EtcdClusterSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn cluster_gauges_follow_spec_and_status() {
        let m = Metrics::default();
        let backup = serde_json::json!({"size": 3, "backup": {
            "schedule": "0 * * * *",
            "destination": {"s3": {"bucket": "b"}}}});
        let mut status: EtcdClusterStatus = serde_json::from_value(serde_json::json!({
            "readyMembers": 2,
            "tls": {"client": "TLS", "peer": "TLS", "notAfter": "2027-01-01T00:00:00Z"}
        }))
        .unwrap();
        m.cluster
            .report("db", "a", &spec(backup.clone()), &status, Some(1000.0));
        let text = m.render();
        for line in [
            r#"cairn_operator_cluster_desired_members{cluster="a",namespace="db"} 3"#,
            r#"cairn_operator_cluster_ready_members{cluster="a",namespace="db"} 2"#,
            // No backup yet: the cluster's creation.
            r#"cairn_operator_backup_last_success_timestamp_seconds{cluster="a",namespace="db"} 1000"#,
            r#"cairn_operator_backup_consecutive_failures{cluster="a",namespace="db"} 0"#,
            r#"cairn_operator_backup_schedule_interval_seconds{cluster="a",namespace="db"} 3600"#,
            r#"cairn_operator_certificate_expiry_timestamp_seconds{certificate="member",cluster="a",namespace="db"} 1798761600"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        status.backup = Some(
            serde_json::from_value(serde_json::json!({"failures": 2,
                "lastBackup": {"time": "2026-12-07T00:00:00Z", "key": "k", "size": 1,
                               "revision": 1, "sha256": "x"}}))
            .unwrap(),
        );
        m.cluster
            .report("db", "a", &spec(backup), &status, Some(1000.0));
        let text = m.render();
        assert!(text.contains(
            r#"cairn_operator_backup_last_success_timestamp_seconds{cluster="a",namespace="db"} 1796601600"#
        ), "{text}");
        assert!(text.contains(
            r#"cairn_operator_backup_consecutive_failures{cluster="a",namespace="db"} 2"#
        ));
        // Backups and TLS off: those gauges go, so their alerts cannot fire.
        status.tls = None;
        m.cluster.report(
            "db",
            "a",
            &spec(serde_json::json!({"size": 3})),
            &status,
            None,
        );
        let text = m.render();
        assert!(!text.contains("cairn_operator_backup_last_success_timestamp_seconds{"));
        assert!(!text.contains("cairn_operator_backup_schedule_interval_seconds{"));
        assert!(!text.contains("cairn_operator_certificate_expiry_timestamp_seconds{"));
        assert!(text.contains("cairn_operator_cluster_desired_members"));
    }

    #[test]
    fn schedule_interval_is_the_longest_gap() {
        let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let gap = |cron: &str, now: &str| {
            let c = crate::backup::parse_schedule(cron).unwrap();
            schedule_interval(&c, at(now)).map(|d| d.as_secs())
        };
        let monday = "2026-12-07T10:00:00Z";
        assert_eq!(gap("0 * * * *", monday), Some(3600));
        assert_eq!(gap("*/10 * * * * *", monday), Some(10));
        assert_eq!(gap("0 2 * * *", monday), Some(86_400));
        // Weekdays only: the weekend's gap, Friday 02:00 to Monday 02:00.
        assert_eq!(gap("0 2 * * 1-5", monday), Some(3 * 86_400));
        assert_eq!(gap("0 3 * * 0", monday), Some(7 * 86_400));
        // Monthly: December 2026 to January 2027, January to February.
        assert_eq!(gap("0 0 1 * *", monday), Some(31 * 86_400));
        // Once a year at most: no interval.
        assert_eq!(gap("0 0 29 2 *", monday), None);
    }
}
