//! Integration tests of the cairn server against real etcd 3.4, real
//! etcdctl and the `etcd-client` crate. Requires `etcd` and `etcdctl` on
//! PATH (Debian's etcd-server and etcd-client; `tests/run` installs them).

mod cluster;
mod harness;
mod linearizability;
#[path = "../common/ports.rs"]
mod ports;

mod auth;
mod client_diff;
mod crash;
mod ctl_diff;
mod disk_full;
mod faults;
mod gateway;
mod limits;
mod members;
mod memory;
mod peer;
mod recovery;
mod runner;
mod snapshot;
mod tls;
#[path = "../common/writer.rs"]
mod writer;
