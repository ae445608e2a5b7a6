//! End-to-end tests on a real Kubernetes control plane (kube-apiserver and
//! kube-controller-manager 1.20 on etcd or on cairn), with pods run on Docker by a node agent
//! written for the tests, the operator installed by `helm install` and running in-cluster from
//! its image, and cairn members running from theirs. Run by tests/e2e/run.sh (after the images
//! are built), one scenario at a time.

mod agent;
mod docker;
mod plane;
#[path = "../common/ports.rs"]
mod ports;
mod provisioner;
mod scenarios;
#[path = "../common/writer.rs"]
mod writer;
