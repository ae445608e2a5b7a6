//! Durable storage on RocksDB: one database, a column family per concern.
//!
//! - `log`: Raft entries by index (big-endian), each append fsynced before
//!   it is acknowledged;
//! - `raft`: the vote and the purged log id (the committed index is not
//!   stored: after a restart entries are applied once a leader confirms them);
//! - `kv`: MVCC history by revision (main, sub), see [`crate::mvcc`];
//! - `lease`: lease id to granted TTL;
//! - `meta`: applied log id, membership, current and compacted revision,
//!   cluster identity, alarms.
//!
//! State-machine writes are not fsynced themselves: they share the RocksDB
//! WAL with the log, so the next synced log write makes them durable, and a
//! crash before that is repaired by re-applying the (durable) log from the
//! persisted applied id, which is written in the same batch as the data.
//!
//! [`log_files`] reads the Raft log that some earlier builds kept in files
//! of their own, to move it back into RocksDB at open.

mod engine;
pub mod log_files;
mod log_writer;

pub use engine::{dec, decode_record, encode_record, Engine, Identity, StateMeta, View, CF_LOG};
pub use log_writer::{LogOp, LogWriter};
