//! Prometheus metrics of the operator: reconciles (count, errors, duration) and membership
//! operations. Served on `/metrics` next to `/healthz`.

use std::time::Instant;

use prometheus::{
    histogram_opts, opts, Encoder, HistogramVec, IntCounterVec, Registry, TextEncoder,
};

/// The operator's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub membership_operations: IntCounterVec,
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
        for c in [&reconciles, &reconcile_errors, &membership_operations] {
            registry.register(Box::new(c.clone())).unwrap();
        }
        registry
            .register(Box::new(reconcile_duration.clone()))
            .unwrap();
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            membership_operations,
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
