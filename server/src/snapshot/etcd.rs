//! Migration from etcd: an etcd v3 snapshot (`etcdctl snapshot save`'s file: etcd's bbolt
//! backend followed by its SHA-256, or a bare `member/snap/db`) turned into a cairn snapshot
//! file with the same history, which `cairn snapshot restore` then loads as any other.
//!
//! What etcd 3.4 keeps in its backend, and what becomes of it:
//! - bucket `key`: one entry per revision, keyed by the revision (main, big-endian u64, `_`,
//!   sub, big-endian u64; a trailing `t` marks a deletion), valued by an `mvccpb.KeyValue`.
//!   Every entry becomes a record at that revision (a deletion carries only its key; cairn
//!   records its revision too, as etcd's watchers patch it in).
//! - bucket `meta`: `scheduledCompactRev` / `finishedCompactRev` (revisions as above) give the
//!   compacted revision (an unfinished compaction is finished here after the restore, as etcd
//!   does at start). The revision is the last entry's, or the compacted one if later (etcd's
//!   rule at start): the next write is at that revision + 1.
//! - bucket `lease`: `leasepb.Lease` by ID (big-endian): each lease with its granted TTL.
//! - buckets `auth` (`authEnabled`, `authRevision`), `authUsers` and `authRoles`: the auth
//!   state, users and roles as etcd stores them (`authpb`), bcrypt hashes included.
//! - `members`, `members_removed`, `cluster`, `alarm`: not kept (a restore starts a new
//!   cluster with its own members and no alarms, as etcd's restore does).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use prost::Message;

use super::bbolt::{self, Bolt};
use crate::error::{Error, Result};
use crate::mvcc::Record;
use crate::proto::authpb;
use crate::proto::mvccpb::KeyValue;
use crate::storage::{encode_record, StateMeta};

/// etcd's `leasepb.Lease` as its backend stores it.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdLease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// What a conversion found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub revision: i64,
    pub compacted: i64,
    /// Entries of the `key` bucket (revisions), deletions included.
    pub records: u64,
    pub leases: usize,
    pub users: usize,
    pub roles: usize,
    pub auth_enabled: bool,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("etcd snapshot: {what}"))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("{}: {e}", path.display()))
}

/// The cairn snapshot file being written, and how many bytes so far.
struct Out<'a> {
    w: BufWriter<File>,
    written: u64,
    path: &'a Path,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.written += b.len() as u64;
        self.w.write_all(b).map_err(io(self.path))
    }
}

/// Whether the file at `path` is an etcd (bbolt) snapshot.
pub fn is_etcd_snapshot(path: &Path) -> Result<bool> {
    let mut head = [0u8; bbolt::HEAD];
    let mut f = File::open(path).map_err(io(path))?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]).map_err(io(path))? {
            0 => break,
            n => got += n,
        }
    }
    // A cairn snapshot's own magic first: its payload may hold anything at bbolt's offsets.
    Ok(!head[..got].starts_with(super::MAGIC) && bbolt::is_bbolt(&head[..got]))
}

/// An etcd revision key: (main, sub, deletion).
fn revision_key(k: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    let main = i64::try_from(u64::from_be_bytes(k[0..8].try_into().ok()?)).ok()?;
    let sub = i64::try_from(u64::from_be_bytes(k[9..17].try_into().ok()?)).ok()?;
    Some((main, sub, tombstone))
}

/// Checks the trailing SHA-256 (etcd's restore does, unless told to skip it); returns the
/// length of the database before it.
fn check_hash(file: &mut File, path: &Path, len: u64, check: bool) -> Result<u64> {
    // etcd's rule: a file of 512-byte blocks plus 32 bytes carries its hash.
    let has_hash = len % 512 == 32;
    if !has_hash {
        if check {
            return Err(bad("snapshot missing hash but --skip-hash-check=false"));
        }
        return Ok(len);
    }
    if check && !super::ends_in_its_sha256(file, len).map_err(io(path))? {
        return Err(bad("sha256 checksum mismatch"));
    }
    Ok(len - 32)
}

/// The messages of bucket `bucket`, each stored under its own name (etcd's users and roles).
fn by_name<M: Message + Default>(
    db: &Bolt,
    bucket: &str,
    what: &str,
    name: fn(&M) -> &[u8],
) -> Result<Vec<M>> {
    let mut all = Vec::new();
    if let Some(b) = db.bucket(bucket.as_bytes()) {
        db.each(&b, &mut |_, k, v| {
            let m = M::decode(v).map_err(|e| bad(format!("a {what}: {e}")))?;
            if name(&m) != k {
                return Err(bad(format!("a {what} stored under another name")));
            }
            all.push(m);
            Ok(true)
        })?;
    }
    Ok(all)
}

/// Reads the etcd snapshot at `src` and writes a cairn snapshot file of the same history to
/// `dst` (made anew, synced). With `check`, the etcd file's SHA-256 must be there and match.
/// Nothing of the source is trusted: every entry is checked before it is written.
pub fn convert(src: &Path, dst: &Path, check: bool) -> Result<Converted> {
    let mut file = File::open(src).map_err(io(src))?;
    let len = file.metadata().map_err(io(src))?.len();
    let db_len = check_hash(&mut file, src, len, check)?;
    let db = Bolt::open(file, db_len)?;
    let bucket = |name: &str| db.bucket(name.as_bytes());

    // Compaction.
    let mut compacted = 0i64;
    if let Some(meta) = bucket("meta") {
        db.each(&meta, &mut |_, k, v| {
            if k == b"scheduledCompactRev" || k == b"finishedCompactRev" {
                let (main, _, _) = revision_key(v).ok_or_else(|| {
                    bad(format!(
                        "meta {:?} is not a revision",
                        String::from_utf8_lossy(k)
                    ))
                })?;
                compacted = compacted.max(main);
            }
            Ok(true)
        })?;
    }

    let mut w = Out {
        w: BufWriter::with_capacity(
            1 << 20,
            // Read back for the checksum at the end.
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dst)
                .map_err(io(dst))?,
        ),
        written: 0,
        path: dst,
    };
    // Header and the payload's position, filled in once the records are read.
    let placeholder = |revision, compacted| StateMeta {
        applied: vec![],
        membership: vec![],
        revision,
        compacted,
        alarms: vec![],
    };
    let meta_len = bincode::serialize(&placeholder(0, 0))
        .map_err(Error::internal)?
        .len();
    w.put(super::MAGIC)?;
    w.put(&0u64.to_le_bytes())?;
    w.put(&vec![0u8; meta_len])?;
    w.put(&0u64.to_le_bytes())?;

    // The history, in revision order (bbolt's key order).
    let mut records = 0u64;
    let mut last: Option<(i64, i64)> = None;
    if let Some(keys) = bucket("key") {
        db.each(&keys, &mut |flags, k, v| {
            let (main, sub, tombstone) =
                revision_key(k).filter(|_| flags == 0).ok_or_else(|| {
                    bad(format!(
                        "an entry of bucket key that is not a revision: {k:?}"
                    ))
                })?;
            if last.is_some_and(|l| l >= (main, sub)) || main < 1 {
                return Err(bad(format!("revision {main}/{sub} out of order")));
            }
            last = Some((main, sub));
            let mut kv =
                KeyValue::decode(v).map_err(|e| bad(format!("revision {main}/{sub}: {e}")))?;
            if kv.key.is_empty() {
                return Err(bad(format!("revision {main}/{sub}: an empty key")));
            }
            if tombstone {
                kv = KeyValue {
                    key: kv.key,
                    mod_revision: main,
                    ..Default::default()
                };
            } else if kv.mod_revision != main
                || !(1..=main).contains(&kv.create_revision)
                || kv.version < 1
            {
                return Err(bad(format!(
                    "revision {main}/{sub}: a key modified at {}, created at {}, version {}",
                    kv.mod_revision, kv.create_revision, kv.version
                )));
            }
            let rec = encode_record(&Record { kv, tombstone });
            if rec.len() as u64 > super::payload::MAX_RECORD {
                return Err(bad(format!(
                    "revision {main}/{sub}: a key and value of {} bytes, more than cairn keeps ({} MiB)",
                    rec.len(),
                    super::payload::MAX_RECORD >> 20
                )));
            }
            w.put(&main.to_le_bytes())?;
            w.put(&sub.to_le_bytes())?;
            w.put(&(rec.len() as u64).to_le_bytes())?;
            w.put(&rec)?;
            records += 1;
            Ok(true)
        })?;
    }
    let revision = last.map_or(1, |(main, _)| main).max(compacted).max(1);

    // Leases.
    let mut leases: Vec<(i64, i64)> = Vec::new();
    if let Some(b) = bucket("lease") {
        db.each(&b, &mut |_, k, v| {
            let l = EtcdLease::decode(v).map_err(|e| bad(format!("a lease: {e}")))?;
            let id = <[u8; 8]>::try_from(k)
                .map(i64::from_be_bytes)
                .map_err(|_| bad("a lease whose key is not an ID"))?;
            if id != l.id || id == 0 {
                return Err(bad(format!("lease {id:x} holds ID {:x}", l.id)));
            }
            leases.push((id, l.ttl.clamp(0, crate::lease::MAX_LEASE_TTL)));
            Ok(true)
        })?;
    }
    w.put(&bincode::serialize(&leases).map_err(Error::internal)?)?;

    // Auth.
    let mut auth = crate::proto::raftpb::AuthState::default();
    let mut any_auth = false;
    if let Some(b) = bucket("auth") {
        db.each(&b, &mut |_, k, v| {
            match k {
                b"authEnabled" => auth.enabled = v == [1],
                b"authRevision" => {
                    auth.revision = <[u8; 8]>::try_from(v)
                        .map(u64::from_be_bytes)
                        .map_err(|_| bad("authRevision is not a number"))?
                }
                _ => {}
            }
            any_auth = true;
            Ok(true)
        })?;
    }
    auth.users = by_name(&db, "authUsers", "user", |u: &authpb::User| &u.name)?;
    auth.roles = by_name(&db, "authRoles", "role", |r: &authpb::Role| &r.name)?;
    any_auth |= !auth.users.is_empty() || !auth.roles.is_empty();
    let (users, roles, auth_enabled) = (auth.users.len(), auth.roles.len(), auth.enabled);
    let auth = if any_auth {
        auth.encode_to_vec()
    } else {
        Vec::new()
    };
    w.put(&super::auth_extension(&auth))?;

    // Padding, then the payload's length and position, then the checksum of it all.
    let payload_len = w.written - super::HEADER as u64;
    let padded = w.written.div_ceil(512) * 512;
    w.put(&vec![0u8; (padded - w.written) as usize])?;
    let mut out = w.w.into_inner().map_err(|e| io(dst)(e.into_error()))?;
    out.seek(SeekFrom::Start(super::MAGIC.len() as u64))
        .map_err(io(dst))?;
    out.write_all(&payload_len.to_le_bytes()).map_err(io(dst))?;
    let meta = bincode::serialize(&placeholder(revision, compacted)).map_err(Error::internal)?;
    debug_assert_eq!(meta.len(), meta_len);
    out.write_all(&meta).map_err(io(dst))?;
    out.write_all(&records.to_le_bytes()).map_err(io(dst))?;
    let digest = super::sha256_prefix(&mut out, padded).map_err(io(dst))?;
    out.write_all(&digest).map_err(io(dst))?;
    out.sync_all().map_err(io(dst))?;
    Ok(Converted {
        revision,
        compacted,
        records,
        leases: leases.len(),
        users,
        roles,
        auth_enabled,
    })
}

/// CRC-32C (Castagnoli), as etcd hashes a snapshot for `snapshot status`.
fn crc32c(crc: u32, bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = !crc;
    for b in bytes {
        c = table[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// `snapshot status` of an etcd snapshot, computed as etcd 3.4 does: a CRC-32C of every
/// bucket's name and every key and value in it, the last revision of bucket `key`, how many
/// keys all buckets hold, and the database's size (its pages, without the trailing hash).
pub fn status(path: &Path) -> Result<super::cmd::SnapshotStatus> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    // As etcdctl: the trailing hash is cut off, not checked.
    let db_len = check_hash(&mut file, path, len, false)?;
    let db = Bolt::open(file, db_len)?;
    let (mut hash, mut revision, mut total_key) = (0u32, 0i64, 0usize);
    for (name, b) in db.buckets() {
        hash = crc32c(hash, name);
        let is_key = name == b"key";
        db.each(b, &mut |flags, k, v| {
            hash = crc32c(hash, k);
            // A nested bucket's value reads as nothing in etcd's walk.
            if flags & 0x01 == 0 {
                hash = crc32c(hash, v);
            }
            if is_key {
                revision = revision_key(k).map_or(revision, |(main, _, _)| main);
            }
            total_key += 1;
            Ok(true)
        })?;
    }
    Ok(super::cmd::SnapshotStatus {
        hash,
        revision,
        total_key,
        total_size: db.size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C check value of "123456789"; and hashing in pieces is hashing at once.
        assert_eq!(crc32c(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(crc32c(0, b"1234"), b"56789"), 0xE306_9283);
    }

    #[test]
    fn revision_keys_as_etcd_writes_them() {
        let mut k = 5u64.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&2u64.to_be_bytes());
        assert_eq!(revision_key(&k), Some((5, 2, false)));
        k.push(b't');
        assert_eq!(revision_key(&k), Some((5, 2, true)));
        k[17] = b'x';
        assert_eq!(revision_key(&k), None);
        assert_eq!(revision_key(b"short"), None);
        let mut neg = u64::MAX.to_be_bytes().to_vec();
        neg.push(b'_');
        neg.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(revision_key(&neg), None);
    }

    #[test]
    fn what_is_not_bbolt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x");
        std::fs::write(&src, vec![0u8; 4096 * 4]).unwrap();
        assert!(!is_etcd_snapshot(&src).unwrap());
        let err = convert(&src, &dir.path().join("y"), false).unwrap_err();
        assert!(err.to_string().contains("not a bbolt database"), "{err}");
    }
}
