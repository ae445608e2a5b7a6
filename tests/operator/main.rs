//! The operator's tests beyond unit tests: membership steps against real cairn clusters on
//! loopback, and reconciles against a mock Kubernetes API server (kube-rs's tower-test pattern)
//! with real cairn members behind it.

mod backup;
mod cluster;
mod maintenance;
mod membership;
#[path = "../common/ports.rs"]
mod ports;
mod reconcile;
mod s3;
mod stores;
mod tls;
mod upgrade;
#[path = "../common/writer.rs"]
mod writer;
