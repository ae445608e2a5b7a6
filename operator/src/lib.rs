//! cairn-operator: runs cairn clusters on Kubernetes from `EtcdCluster` objects.
//!
//! - [`crd`]: the `EtcdCluster` types and status.
//! - [`resources`]: pure builders of the children (Services, ConfigMap, StatefulSet, PDB).

pub mod crd;
pub mod resources;
