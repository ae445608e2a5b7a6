//! Durable storage: the Raft log in files of its own ([`LogWriter`], as
//! etcd keeps its WAL), everything else in one RocksDB database, a column
//! family per concern:
//!
//! - `log`: unused since the log moved to its own files (a log found there,
//!   written by an earlier version, is moved out at open);
//! - `raft`: the vote and the purged log id (the committed index is not
//!   stored: after a restart entries are applied once a leader confirms them);
//! - `kv`: MVCC history by revision (main, sub), see [`crate::mvcc`];
//! - `lease`: lease id to granted TTL;
//! - `meta`: applied log id, membership, current and compacted revision,
//!   cluster identity, alarms.
//!
//! State-machine writes are not fsynced as they are applied: a crash before
//! they reach the disk is repaired by re-applying the (durable) log from the
//! persisted applied id, which is written in the same batch as the data.
//! Before log entries are purged, the synced write of the purge mark syncs
//! RocksDB's WAL, and with it every state-machine write before it.

mod engine;
mod log_writer;

pub use engine::{dec, decode_record, encode_record, Engine, Identity, StateMeta, View, CF_LOG};
pub use log_writer::{LogOp, LogWriter};
