//! The serialized state machine that Raft snapshots and snapshot files carry.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::StateMeta;

/// A whole state machine, serialized: what a Raft snapshot and the
/// Maintenance.Snapshot stream carry. The bincode of `meta`, `records` and
/// `leases` comes first, as builds before auth wrote it whole; the auth state
/// follows as a versioned extension ([`AUTH_EXTENSION`], a little-endian u64
/// length, the `raftpb.AuthState` bytes), which those builds never read and
/// whose absence means "auth never changed".
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub meta: StateMeta,
    /// (main, sub, encoded record)
    pub records: Vec<(i64, i64, Vec<u8>)>,
    pub leases: Vec<(i64, i64)>,
    /// The encoded auth state (empty: never changed).
    #[serde(skip)]
    pub auth: Vec<u8>,
}

/// Marks the auth state after a snapshot payload's first part (version 1).
pub const AUTH_EXTENSION: &[u8; 8] = b"cairnAU1";

/// The auth extension of a snapshot payload.
pub fn auth_extension(auth: &[u8]) -> Vec<u8> {
    if auth.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(16 + auth.len());
    out.extend_from_slice(AUTH_EXTENSION);
    out.extend_from_slice(&(auth.len() as u64).to_le_bytes());
    out.extend_from_slice(auth);
    out
}

impl SnapshotPayload {
    /// The payload's bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut bytes = bincode::serialize(self).map_err(Error::internal)?;
        bytes.extend_from_slice(&auth_extension(&self.auth));
        Ok(bytes)
    }

    /// Reads a payload, with or without the auth extension.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |e: String| Error::InvalidArgument(format!("snapshot: undecodable content: {e}"));
        let mut rest = bytes;
        let mut payload: SnapshotPayload =
            bincode::deserialize_from(&mut rest).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            let ext = rest
                .strip_prefix(AUTH_EXTENSION.as_slice())
                .ok_or_else(|| bad("unknown content after the key space".into()))?;
            let (len, auth) = ext
                .split_at_checked(8)
                .ok_or_else(|| bad("short auth".into()))?;
            let len = u64::from_le_bytes(len.try_into().map_err(Error::internal)?);
            if len != auth.len() as u64 {
                return Err(bad(format!("auth of {len} bytes, {} present", auth.len())));
            }
            <crate::proto::raftpb::AuthState as prost::Message>::decode(auth)
                .map_err(|e| bad(format!("auth: {e}")))?;
            payload.auth = auth.to_vec();
        }
        Ok(payload)
    }

    /// Refuses a payload whose positions this member could not go on from: revisions out of
    /// range (the next write would overflow, or a record would sort among the leases), a
    /// compaction past the revision, more alarms than are ever kept. Lease TTLs over etcd's
    /// maximum (kept by builds before it was checked at apply) are lowered to it.
    pub fn check(&mut self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("snapshot: {what}")));
        let rev = self.meta.revision;
        if !(1..=i64::MAX / 2).contains(&rev) {
            return bad(format!("revision {rev} out of range"));
        }
        if !(0..=rev).contains(&self.meta.compacted) {
            return bad(format!(
                "compacted revision {} past revision {rev}",
                self.meta.compacted
            ));
        }
        if let Some((main, sub, _)) = self
            .records
            .iter()
            .find(|(main, sub, _)| !(1..=rev).contains(main) || *sub < 0)
        {
            return bad(format!("record at revision {main}/{sub} out of range"));
        }
        if self.meta.alarms.len() > crate::mvcc::MAX_ALARMS {
            return bad(format!("{} alarms", self.meta.alarms.len()));
        }
        for (_, ttl) in &mut self.leases {
            *ttl = (*ttl).clamp(0, crate::lease::MAX_LEASE_TTL);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotPayload;
    use crate::storage::StateMeta;

    fn payload(
        revision: i64,
        compacted: i64,
        records: Vec<(i64, i64, Vec<u8>)>,
    ) -> SnapshotPayload {
        SnapshotPayload {
            meta: StateMeta {
                applied: vec![],
                membership: vec![],
                revision,
                compacted,
                alarms: vec![],
            },
            records,
            leases: vec![(7, i64::MAX)],
            auth: vec![],
        }
    }

    #[test]
    fn payloads_with_and_without_auth_decode() {
        // Without auth, the bytes are what builds before auth wrote (and read).
        let old = payload(10, 5, vec![(3, 0, b"r".to_vec())]);
        let bytes = old.encode().unwrap();
        assert_eq!(bytes, bincode::serialize(&old).unwrap());
        let back = SnapshotPayload::decode(&bytes).unwrap();
        assert!(back.auth.is_empty() && back.records == old.records);
        // With auth, it comes back; a build before auth reads the rest alone.
        let auth = crate::proto::raftpb::AuthState {
            enabled: true,
            revision: 7,
            ..Default::default()
        };
        let mut new = payload(10, 5, vec![]);
        new.auth = prost::Message::encode_to_vec(&auth);
        let bytes = new.encode().unwrap();
        assert_eq!(SnapshotPayload::decode(&bytes).unwrap().auth, new.auth);
        let legacy: SnapshotPayload = bincode::deserialize(&bytes).unwrap();
        assert_eq!(legacy.meta.revision, 10);
        // Anything else after the key space, or a cut extension, is refused.
        let mut junk = old.encode().unwrap();
        junk.extend_from_slice(b"junk");
        assert!(SnapshotPayload::decode(&junk).is_err());
        assert!(SnapshotPayload::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn snapshot_payloads_out_of_range_are_refused() {
        let mut ok = payload(10, 5, vec![(3, 0, vec![])]);
        ok.check().unwrap();
        assert_eq!(ok.leases, vec![(7, crate::lease::MAX_LEASE_TTL)]);
        for mut bad in [
            payload(i64::MAX, 0, vec![]),
            payload(0, 0, vec![]),
            payload(10, 11, vec![]),
            payload(10, 0, vec![(11, 0, vec![])]),
            payload(10, 0, vec![(-2, 0, vec![])]),
            payload(10, 0, vec![(3, -1, vec![])]),
        ] {
            assert!(bad.check().is_err(), "{:?}", bad.meta);
        }
    }
}
