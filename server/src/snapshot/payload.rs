//! The serialized state machine that Raft snapshots and snapshot files carry.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{StateMeta, View};

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
        let mut rest = bytes;
        let mut payload: SnapshotPayload =
            bincode::deserialize_from(&mut rest).map_err(|e| bad(e.to_string()))?;
        payload.auth = parse_auth_extension(rest)?;
        Ok(payload)
    }

    /// Refuses a payload whose positions this member could not go on from: revisions out of
    /// range (the next write would overflow, or a record would sort among the leases), a
    /// compaction past the revision, more alarms than are ever kept. Lease TTLs over etcd's
    /// maximum (kept by builds before it was checked at apply) are lowered to it.
    pub fn check(&mut self) -> Result<()> {
        check_meta(&self.meta)?;
        for (main, sub, _) in &self.records {
            check_record(&self.meta, *main, *sub)?;
        }
        clamp_leases(&mut self.leases);
        Ok(())
    }
}

fn bad(what: String) -> Error {
    Error::InvalidArgument(format!("snapshot: undecodable content: {what}"))
}

/// The auth state in what follows a payload's key space: empty, or the extension.
fn parse_auth_extension(rest: &[u8]) -> Result<Vec<u8>> {
    if rest.is_empty() {
        return Ok(Vec::new());
    }
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
    Ok(auth.to_vec())
}

/// See [`SnapshotPayload::check`].
pub fn check_meta(meta: &StateMeta) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(format!("snapshot: {what}")));
    let rev = meta.revision;
    if !(1..=i64::MAX / 2).contains(&rev) {
        return bad(format!("revision {rev} out of range"));
    }
    if !(0..=rev).contains(&meta.compacted) {
        return bad(format!(
            "compacted revision {} past revision {rev}",
            meta.compacted
        ));
    }
    if meta.alarms.len() > crate::mvcc::MAX_ALARMS {
        return bad(format!("{} alarms", meta.alarms.len()));
    }
    Ok(())
}

/// A record's revision must lie within the payload's.
pub fn check_record(meta: &StateMeta, main: i64, sub: i64) -> Result<()> {
    if !(1..=meta.revision).contains(&main) || sub < 0 {
        return Err(Error::InvalidArgument(format!(
            "snapshot: record at revision {main}/{sub} out of range"
        )));
    }
    Ok(())
}

fn clamp_leases(leases: &mut [(i64, i64)]) {
    for (_, ttl) in leases {
        *ttl = (*ttl).clamp(0, crate::lease::MAX_LEASE_TTL);
    }
}

/// More bytes than any auth state takes (users and roles are a few KiB each).
const MAX_AUTH_EXTENSION: u64 = 64 << 20;

/// More bytes than any stored record takes: a key and a value, each within the largest
/// request a member accepts (`--max-request-bytes` is capped at 64 MiB), and a few numbers.
pub(crate) const MAX_RECORD: u64 = 130 << 20;

/// A record is sent as two i64s, a u64 length and its bytes.
const RECORD_HEAD: u64 = 24;

/// The payload of a [`View`], produced piece by piece with at most one record in hand: the
/// same bytes as [`SnapshotPayload::encode`] of the same state. Its length needs a pass over
/// the records (bincode puts their count first), made once, on first need.
pub struct PayloadSource<'a> {
    view: View<'a>,
    meta: Vec<u8>,
    leases: Vec<u8>,
    auth: Vec<u8>,
    /// How many records and their encoded bytes, once counted.
    sized: Option<(u64, u64)>,
}

impl<'a> PayloadSource<'a> {
    pub fn new(view: View<'a>, meta: &StateMeta) -> Result<Self> {
        Ok(Self {
            meta: bincode::serialize(meta).map_err(Error::internal)?,
            leases: bincode::serialize(&view.leases()?).map_err(Error::internal)?,
            auth: auth_extension(&view.auth_state()?),
            view,
            sized: None,
        })
    }

    /// Counts the records and their bytes (a pass over the view), unless `go` says to
    /// stop first (it is asked every 1024 records): then None.
    fn sized(&mut self, go: &dyn Fn() -> bool) -> Result<Option<(u64, u64)>> {
        if let Some(s) = self.sized {
            return Ok(Some(s));
        }
        let (mut count, mut size, mut stopped) = (0u64, 0u64, false);
        self.view.each_record(|_, _, v| {
            if count % 1024 == 0 && !go() {
                stopped = true;
                return Ok(false);
            }
            count += 1;
            size += RECORD_HEAD + v.len() as u64;
            Ok(true)
        })?;
        if stopped {
            return Ok(None);
        }
        self.sized = Some((count, size));
        Ok(Some((count, size)))
    }

    /// The payload's length in bytes, or None if `go` stopped the count.
    pub fn byte_len(&mut self, go: &dyn Fn() -> bool) -> Result<Option<u64>> {
        let Some((_, size)) = self.sized(go)? else {
            return Ok(None);
        };
        let fixed = (self.meta.len() + 8 + self.leases.len() + self.auth.len()) as u64;
        Ok(Some(fixed + size))
    }

    /// Feeds the payload to `out`, in order, until it returns false (or `go` does, while
    /// the records are counted first).
    pub fn emit(
        &mut self,
        go: &dyn Fn() -> bool,
        mut out: impl FnMut(&[u8]) -> bool,
    ) -> Result<()> {
        let Some((count, _)) = self.sized(go)? else {
            return Ok(());
        };
        if !(out(&self.meta) && out(&count.to_le_bytes())) {
            return Ok(());
        }
        let (mut go, mut seen) = (true, 0u64);
        self.view.each_record(|main, sub, v| {
            seen += 1;
            go = out(&main.to_le_bytes())
                && out(&sub.to_le_bytes())
                && out(&(v.len() as u64).to_le_bytes())
                && out(v);
            Ok(go)
        })?;
        if !go {
            return Ok(());
        }
        if seen != count {
            return Err(Error::Internal(format!(
                "snapshot: {seen} records, {count} counted"
            )));
        }
        if out(&self.leases) {
            out(&self.auth);
        }
        Ok(())
    }
}

/// Lease IDs with their TTLs, and the encoded auth state.
pub type LeasesAndAuth = (Vec<(i64, i64)>, Vec<u8>);

/// Counts what a reader hands out.
struct Counted<R> {
    r: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Reads a payload of `len` bytes piece by piece, one record at a time. Every length in it is
/// checked against what is left of the input before anything is allocated for it, so a cut,
/// damaged or hostile payload is an error and never a large allocation.
pub struct PayloadReader<R> {
    r: Counted<R>,
    len: u64,
    records_left: u64,
}

impl<R: Read> PayloadReader<R> {
    /// Starts reading: the payload's position comes first.
    pub fn new(r: R, len: u64) -> Result<(Self, StateMeta)> {
        let mut this = Self {
            r: Counted { r, n: 0 },
            len,
            records_left: 0,
        };
        let meta: StateMeta = this.bincode()?;
        this.records_left = this.u64()?;
        if this.records_left > this.left() / RECORD_HEAD {
            return Err(bad(format!(
                "{} records in {} bytes",
                this.records_left,
                this.left()
            )));
        }
        Ok((this, meta))
    }

    /// How many records are still to come (all of them, before the first is read).
    pub fn records(&self) -> u64 {
        self.records_left
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.r.n)
    }

    fn io(e: std::io::Error) -> Error {
        bad(format!("cut short: {e}"))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        if self.left() < 8 {
            return Err(bad("cut short".into()));
        }
        self.r.read_exact(&mut b).map_err(Self::io)?;
        Ok(u64::from_le_bytes(b))
    }

    fn bincode<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        use bincode::Options;
        // bincode::serialize's encoding, never reading past the payload.
        let opts = bincode::options()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(self.left());
        opts.deserialize_from(&mut self.r)
            .map_err(|e| bad(e.to_string()))
    }

    /// The next record's revision, its bytes in `buf`; `None` after the last.
    pub fn next_record(&mut self, buf: &mut Vec<u8>) -> Result<Option<(i64, i64)>> {
        if self.records_left == 0 {
            return Ok(None);
        }
        self.records_left -= 1;
        let main = self.u64()? as i64;
        let sub = self.u64()? as i64;
        let n = self.u64()?;
        if n > self.left() || n > MAX_RECORD {
            return Err(bad(format!("a record of {n} bytes, {} left", self.left())));
        }
        buf.clear();
        let got = (&mut self.r).take(n).read_to_end(buf).map_err(Self::io)?;
        if got as u64 != n {
            return Err(bad("cut short".into()));
        }
        Ok(Some((main, sub)))
    }

    /// The leases (TTLs clamped as [`SnapshotPayload::check`] does) and the auth state, after
    /// the last record; the payload must end there.
    pub fn finish(mut self) -> Result<LeasesAndAuth> {
        let mut buf = Vec::new();
        while self.next_record(&mut buf)?.is_some() {}
        let mut leases: Vec<(i64, i64)> = self.bincode()?;
        clamp_leases(&mut leases);
        let left = self.left();
        if left > MAX_AUTH_EXTENSION {
            return Err(bad(format!("{left} bytes after the leases")));
        }
        let mut rest = Vec::new();
        (&mut self.r)
            .take(left)
            .read_to_end(&mut rest)
            .map_err(Self::io)?;
        if rest.len() as u64 != left {
            return Err(bad("cut short".into()));
        }
        Ok((leases, parse_auth_extension(&rest)?))
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
