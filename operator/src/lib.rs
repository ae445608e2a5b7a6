//! cairn-operator: runs cairn clusters on Kubernetes from `EtcdCluster` objects.
//!
//! - [`crd`]: the `EtcdCluster` types and status.
//! - [`resources`]: pure builders of the children (Services, ConfigMap, StatefulSet, PDB).
//! - [`plan`]: pure membership planning: observed cluster in, next step out.
//! - [`members`]: membership calls through the etcd API (etcd-client).
//! - [`controller`]: the reconcile loop that ties them together.
//! - [`leader`], [`metrics`]: leader election between replicas; Prometheus metrics.

pub mod backup;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod members;
pub mod metrics;
pub mod plan;
pub mod resources;
