//! Durable storage on RocksDB: one database, a column family per concern.
//!
//! - `log`: Raft entries by index (big-endian), written without RocksDB's
//!   WAL: each change is also recorded in the log's journal
//!   (`<data-dir>/member/cairn-journal`, see [`journal`]), fsynced before it
//!   is acknowledged;
//! - `raft`: the vote, the purged log id and the committed log id (written
//!   unsynced; read by `--force-new-cluster` only: after a restart entries
//!   are applied once a leader confirms them);
//! - `kv`: the whole state machine: MVCC history by revision (main, sub),
//!   see [`crate::mvcc`]; lease id to granted TTL; and the state's position
//!   (applied log id, membership, current and compacted revision, alarms);
//! - `meta`: the cluster identity;
//! - `lease`: empty (where leases were kept before they moved into `kv`).
//!
//! State-machine writes skip the WAL: the log they are applied from is
//! durable, so they need not be written twice. RocksDB persists them when
//! it flushes `kv` (one column family, so the records, leases and position
//! reach the disk together); a crash loses the changes not yet flushed,
//! and the log, re-applied from the persisted position, brings them back.
//! The log keeps every entry until then: a purge first flushes `kv`.
//!
//! [`log_files`] is the journal's record format; it also reads the Raft
//! log that some earlier builds kept in files of their own, to move it back
//! into RocksDB at open.

pub mod compactor;
mod engine;
mod journal;
pub mod log_files;
mod log_writer;

pub use compactor::Compactor;
pub use engine::{
    dec, decode_record, encode_record, Engine, Identity, LeasesAndAuth, StateMeta, View, CF_LOG,
    DATA_FORMAT, OLDEST_DATA_FORMAT,
};
pub use log_writer::{LogOp, LogWriter};

/// A key of the `raft` column family, set by `cairn snapshot restore`: the restored data came
/// from outside the Raft log, and must be put in a Raft snapshot before members may join.
pub const RESTORED_NEEDS_SNAPSHOT: &[u8] = b"restored_needs_snapshot";

/// A key of the `raft` column family, set by `cairn snapshot restore`: the membership the data
/// dir was restored for (`--initial-cluster` and `--initial-cluster-token` of the restore). The
/// first start bootstraps it whatever the start's own flags say, as etcd's restored WAL does.
pub const RESTORED_MEMBERS: &[u8] = b"restored_members";

/// A key of the `raft` column family: the token of the last
/// `--experimental-force-new-cluster-once` this member carried out (it is carried out once).
pub const FORCED_NEW_CLUSTER: &[u8] = b"forced_new_cluster";
