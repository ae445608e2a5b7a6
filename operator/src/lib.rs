//! cairn-operator: runs cairn clusters on Kubernetes from `EtcdCluster` objects.
//!
//! - [`crd`]: the `EtcdCluster` types and status.
//! - [`resources`]: pure builders of the children (Services, ConfigMap, StatefulSet, PDB).
//! - [`plan`]: pure membership planning: observed cluster in, next step out.
//! - [`members`]: membership calls through the etcd API (etcd-client).

pub mod crd;
pub mod members;
pub mod plan;
pub mod resources;
