//! Multi-version concurrency control: revisions, the in-memory key index,
//! range/txn evaluation, leases' key attachments and compaction.
//!
//! Pure logic: values are read through [`RevisionReader`] and every change is
//! returned as a [`WriteSet`] for the caller to persist. Nothing here does I/O
//! or looks at the clock, so every member computes the same state.

mod index;
mod ranges;
mod store;
pub mod validate;

pub use index::{KeyAt, KeyIndex, KeyRange};
pub use ranges::RangeSet;
pub use store::{
    all_txn_ops, is_read_only, Applied, LeaseRecord, MvccStore, RangePlan, RangeSteps, Restorer,
    TxnPlan, TxnStep, TxnSteps, WriteSet, MAX_ALARMS,
};

use crate::error::Result;
use crate::proto::mvccpb::KeyValue;

/// A point in the store's history: `main` is the revision clients see; `sub`
/// orders the changes made by one request (a txn's writes share `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// Big-endian encoding: byte order equals revision order.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        b[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 16 {
            return None;
        }
        let main = u64::from_be_bytes(b[..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(b[8..].try_into().ok()?) as i64;
        Some(Self { main, sub })
    }
}

/// One record of history: a new value of a key, or its deletion.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kv: KeyValue,
    pub tombstone: bool,
}

/// Read access to stored history, by exact revision.
pub trait RevisionReader {
    /// The record written at `rev`, if it is (still) stored.
    fn read(&self, rev: Revision) -> Result<Option<Record>>;

    /// The records at `revs`, in the same order (a store may look them up together).
    fn read_many(&self, revs: &[Revision]) -> Result<Vec<Option<Record>>> {
        revs.iter().map(|r| self.read(*r)).collect()
    }
}

/// In-memory history, for tests and for callers that hold everything.
#[derive(Default, Debug)]
pub struct MemoryHistory {
    pub records: std::collections::BTreeMap<Revision, Record>,
}

impl MemoryHistory {
    /// Applies a write set as a storage engine would.
    pub fn persist(&mut self, ws: &WriteSet) {
        for (rev, rec) in &ws.records {
            self.records.insert(*rev, rec.clone());
        }
        for rev in &ws.removed {
            self.records.remove(rev);
        }
    }
}

impl RevisionReader for MemoryHistory {
    fn read(&self, rev: Revision) -> Result<Option<Record>> {
        Ok(self.records.get(&rev).cloned())
    }
}
