//! cairn-operator: runs cairn clusters on Kubernetes from `EtcdCluster` objects.
//!
//! - [`crd`]: the `EtcdCluster` types and status.
//! - [`layout`]: how members and children are named and reached.
//! - [`resources`]: pure builders of the children (Services, ConfigMap, StatefulSet, PDB).
//! - [`plan`]: pure membership planning: observed cluster in, next step out.
//! - [`rollout`]: pure rollout planning: which member to restart into a new template, when.
//! - [`status`]: pure status derivation: observations and the step in, the status out.
//! - [`pki`]: the certificates of TLS managed by the operator (CA, members, clients, renewal).
//! - [`maintenance`]: which member a defragmentation run does next.
//! - [`storage`]: quantities compared; what an edit of `spec.storage` asks of the volumes.
//! - [`tls`]: TLS managed: Secrets per side, what a member serves, the peer migration, renewal
//!   and CA rollover.
//! - [`network`]: the members' NetworkPolicy (who reaches the peer and client ports).
//! - [`store`]: the `pvc` backup destination: a claim served over HTTP, and its client.
//! - [`members`]: membership calls through the etcd API (etcd-client).
//! - [`controller`]: the reconcile loop that ties them together.
//! - [`leader`], [`metrics`]: leader election between replicas; Prometheus metrics.

pub mod backup;
pub mod controller;
pub mod crd;
pub mod layout;
pub mod leader;
pub mod maintenance;
pub mod members;
pub mod metrics;
pub mod network;
pub mod pki;
pub mod plan;
pub mod recovery;
pub mod resources;
pub mod rollout;
pub mod seal;
pub mod status;
pub mod storage;
pub mod store;
pub mod tls;
