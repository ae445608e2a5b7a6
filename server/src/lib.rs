//! cairn: an etcd v3 compatible key-value server on openraft and RocksDB.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod mvcc;
pub mod proto;
