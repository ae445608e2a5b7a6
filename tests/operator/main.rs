//! The operator's tests beyond unit tests: membership steps against real cairn clusters on
//! loopback, and reconciles against a mock Kubernetes API server.

mod membership;
