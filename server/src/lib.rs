//! cairn: an etcd v3 compatible key-value server on openraft and RocksDB.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod lease;
pub mod mvcc;
pub mod proto;
pub mod raft;
pub mod storage;
pub mod watch;
