//! openraft wiring: the type configuration, the RocksDB log store, the
//! state machine that applies batches to MVCC, and the peer network.

mod force;
mod history;
mod log_store;
mod network;
mod snapshot;
mod state_machine;

pub use force::{force_new_cluster, ForceError, Forced};
pub use history::MemberHistory;
pub use log_store::{AppliedNow, Durable, LogStore, RestoredLeadership};
pub use network::{
    connect, decode, encode, Network, Peers, CLUSTER_ID_HEADER, MAX_PEER_MESSAGE, MEMBER_ID_HEADER,
    SNAPSHOT_END, TARGET_ID_HEADER,
};

/// Whether a failed peer call never reached the peer (no connection could
/// be made), so that the request is known not to have been delivered.
pub fn not_connected(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            );
        }
        source = e.source();
    }
    status.message().contains("tcp connect error")
}
pub use snapshot::{check_file, Install};
pub use state_machine::{KvState, OnApplied, Position, StateMachine};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::mvcc::Applied;
use crate::proto::raftpb::Batch;

/// A Raft entry's payload: a batch of client requests. Shared, so that
/// openraft's clones of entries (log cache, apply) copy no request bytes;
/// serialized as the protobuf encoding of the batch, one byte string.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal(pub std::sync::Arc<Batch>);

impl Serialize for Proposal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use prost::Message;
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Proposal;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a protobuf-encoded raftpb.Batch")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Proposal, E> {
                use prost::Message;
                Batch::decode(b)
                    .map(|b| Proposal(std::sync::Arc::new(b)))
                    .map_err(E::custom)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A member as Raft's membership records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// One result per request of an applied batch.
pub type BatchResult = Vec<Result<Applied, Error>>;

openraft::declare_raft_types!(
    /// cairn's Raft types: entries carry batches of etcd requests.
    pub TypeConfig:
        D = Proposal,
        R = BatchResult,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, Member>;
pub type StorageError = openraft::StorageError<u64>;

fn io_err(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::error(e.to_string())).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().map_err(io_err)?;
            let engine = crate::storage::Engine::open(dir.path()).map_err(io_err)?;
            let log = LogStore::new(engine.clone(), &dir.path().join("cairn-wal"), 1, |_| {})?;
            let state = Arc::new(KvState::open(engine, 2, 1).map_err(io_err)?);
            // The suite applies entries it never appended to the log: the
            // state machine is tested on its own, every index durable.
            let durable = Durable::new(u64::MAX);
            Ok((dir, log, StateMachine::new(state, durable)))
        }
    }

    /// openraft's storage conformance suite on our RocksDB log and state machine.
    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }
}
