//! cairn: an etcd v3 compatible key-value server on openraft and RocksDB.
//!
//! Data path: `api` (gRPC) → `server` (validation, group-commit proposals,
//! read index) → `raft` (openraft log on `storage`) → `raft::StateMachine`
//! → `mvcc` (revisions, index, txn) → `storage` (RocksDB), and from there to
//! `watch` (event fan-out) and `lease` (expiry clocks).
#![allow(clippy::result_large_err)]

pub mod api;
pub mod auth;
pub mod codec;
pub mod config;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod proto;
pub mod raft;
pub mod run;
pub mod server;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod watch;

pub use config::{Config, Flags};
pub use run::serve;
