//! The RocksDB handle, key encodings and typed reads/writes per column family.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mvcc::{Record, Revision, RevisionReader, WriteSet};
use crate::proto::etcdserverpb::AlarmMember;
use crate::proto::mvccpb::KeyValue;

pub const CF_LOG: &str = "log";
pub(crate) const CF_RAFT: &str = "raft";
const CF_KV: &str = "kv";
const CF_LEASE: &str = "lease";
const CF_META: &str = "meta";
const ALL_CFS: [&str; 5] = [CF_LOG, CF_RAFT, CF_KV, CF_LEASE, CF_META];

const META_STATE: &[u8] = b"state";
const META_IDENTITY: &[u8] = b"identity";

/// Which cluster this data belongs to; written once at bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// The state machine's position, persisted atomically with its data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMeta {
    /// bincode of `Option<LogId<u64>>` and `StoredMembership`, kept opaque here.
    pub applied: Vec<u8>,
    pub membership: Vec<u8>,
    pub revision: i64,
    pub compacted: i64,
    pub alarms: Vec<(u64, i32)>,
}

/// The RocksDB database behind a member.
pub struct Engine {
    pub(crate) db: DB,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("in-memory serialization cannot fail")
}

/// Decodes a bincode value written by the engine.
pub fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    bincode::deserialize(b).map_err(|e| Error::Internal(format!("storage: corrupt record: {e}")))
}

fn rocks(e: rocksdb::Error) -> Error {
    Error::Internal(format!("storage: {e}"))
}

/// A history record as stored: one flag byte, then the protobuf KeyValue.
pub fn encode_record(r: &Record) -> Vec<u8> {
    use prost::Message;
    let mut b = Vec::with_capacity(1 + r.kv.encoded_len());
    b.push(r.tombstone as u8);
    r.kv.encode(&mut b).expect("vec has room");
    b
}

pub fn decode_record(b: &[u8]) -> Result<Record> {
    use prost::Message;
    let (flag, rest) = b
        .split_first()
        .ok_or_else(|| Error::Internal("storage: empty kv record".into()))?;
    let kv = KeyValue::decode(rest)
        .map_err(|e| Error::Internal(format!("storage: corrupt kv record: {e}")))?;
    Ok(Record {
        kv,
        tombstone: *flag == 1,
    })
}

impl Engine {
    /// Opens (creating if needed) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // The log column family is written with sync=true; the WAL is what is
        // synced, so all column families share its durability order.
        opts.set_manual_wal_flush(false);
        // The WAL grows as it is written, so a sync that grew it also writes
        // the file's inode. WAL recycling would avoid that, but RocksDB 7.x
        // turns it off (recycle_log_file_num reset to 0, as its LOG shows)
        // under the point-in-time recovery used here, and the one recovery
        // mode it allows skips damaged records anywhere in the WAL.
        // Debian's librocksdb logs at DEBUG by default: a line in LOG for
        // every WAL sync, which cost ~12% of the sync thread's CPU.
        opts.set_log_level(rocksdb::LogLevel::Info);
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(rocks)?;
        Ok(Arc::new(Self { db }))
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub fn identity(&self) -> Result<Option<Identity>> {
        match self
            .db
            .get_cf(self.cf(CF_META), META_IDENTITY)
            .map_err(rocks)?
        {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    pub fn save_identity(&self, id: &Identity) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_META), META_IDENTITY, enc(id), &wo)
            .map_err(rocks)
    }

    /// Reads a bincode value from the `raft` column family.
    pub fn raft_get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        match self.db.get_cf(self.cf(CF_RAFT), key).map_err(rocks)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    /// Writes a bincode value to the `raft` column family, fsynced.
    pub fn raft_put<T: Serialize>(&self, key: &[u8], v: &T) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_RAFT), key, enc(v), &wo)
            .map_err(rocks)
    }

    pub fn state_meta(&self) -> Result<StateMeta> {
        match self
            .db
            .get_cf(self.cf(CF_META), META_STATE)
            .map_err(rocks)?
        {
            Some(b) => dec(&b),
            None => Ok(StateMeta {
                revision: 1,
                ..Default::default()
            }),
        }
    }

    /// Persists a batch of applied changes with the new position, atomically.
    /// Not fsynced: see the module documentation.
    pub fn write_state(&self, ws: &WriteSet, meta: &StateMeta) -> Result<()> {
        let mut b = WriteBatch::default();
        let kv = self.cf(CF_KV);
        for (rev, rec) in &ws.records {
            b.put_cf(kv, rev.to_bytes(), encode_record(rec));
        }
        for rev in &ws.removed {
            b.delete_cf(kv, rev.to_bytes());
        }
        let lease = self.cf(CF_LEASE);
        for (id, ttl) in &ws.leases {
            match ttl {
                Some(ttl) => b.put_cf(lease, id.to_be_bytes(), ttl.to_be_bytes()),
                None => b.delete_cf(lease, id.to_be_bytes()),
            }
        }
        b.put_cf(self.cf(CF_META), META_STATE, enc(meta));
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(b, &wo).map_err(rocks)
    }

    /// Every stored history record, in revision order.
    pub fn records(&self) -> impl Iterator<Item = Result<(Revision, Record)>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_KV), IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(rocks)?;
                let rev = Revision::from_bytes(&k)
                    .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
                Ok((rev, decode_record(&v)?))
            })
    }

    /// Every lease and its TTL.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LEASE), IteratorMode::Start) {
            let (k, v) = item.map_err(rocks)?;
            out.push(decode_lease(&k, &v)?);
        }
        Ok(out)
    }

    /// History records with `from <= main <= to`, read from a point-in-time
    /// view taken now (compaction running meanwhile does not disturb it).
    pub fn history(&self, from: i64, to: i64) -> Result<Vec<(Revision, Record)>> {
        let snap = self.db.snapshot();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(&snap);
        let start = Revision::new(from, 0).to_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_KV),
            ro,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item.map_err(rocks)?;
            let rev = Revision::from_bytes(&k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            if rev.main > to {
                break;
            }
            out.push((rev, decode_record(&v)?));
        }
        Ok(out)
    }

    /// Replaces the whole state machine (snapshot install).
    pub fn replace_state(
        &self,
        records: &[(Revision, Record)],
        leases: &[(i64, i64)],
        meta: &StateMeta,
    ) -> Result<()> {
        let mut b = WriteBatch::default();
        for cf in [CF_KV, CF_LEASE] {
            let h = self.cf(cf);
            b.delete_range_cf(h, [0u8; 1].as_slice(), [0xffu8; 17].as_slice());
        }
        let kv = self.cf(CF_KV);
        for (rev, rec) in records {
            b.put_cf(kv, rev.to_bytes(), encode_record(rec));
        }
        let lease = self.cf(CF_LEASE);
        for (id, ttl) in leases {
            b.put_cf(lease, id.to_be_bytes(), ttl.to_be_bytes());
        }
        b.put_cf(self.cf(CF_META), META_STATE, enc(meta));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(rocks)
    }

    /// Sums RocksDB integer properties over every column family.
    fn sum_properties(&self, props: &[&str]) -> i64 {
        let mut total = 0u64;
        for cf in ALL_CFS {
            for p in props {
                total += self
                    .db
                    .property_int_value_cf(self.cf(cf), *p)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        total as i64
    }

    /// Approximate bytes on disk and in memory tables.
    pub fn size(&self) -> i64 {
        self.sum_properties(&[
            "rocksdb.total-sst-files-size",
            "rocksdb.size-all-mem-tables",
        ])
    }

    /// Bytes of live data (estimate), for `dbSizeInUse`.
    pub fn size_in_use(&self) -> i64 {
        self.sum_properties(&[
            "rocksdb.estimate-live-data-size",
            "rocksdb.size-all-mem-tables",
        ])
    }

    /// Rewrites every column family, dropping deleted data (etcd's defrag).
    pub fn defragment(&self) -> Result<()> {
        for cf in ALL_CFS {
            self.db
                .compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Alarms as stored in the state meta.
    pub fn alarms_of(meta: &StateMeta) -> Vec<AlarmMember> {
        meta.alarms
            .iter()
            .map(|(m, a)| AlarmMember {
                member_id: *m,
                alarm: *a,
            })
            .collect()
    }
}

/// A point-in-time view of the database: whole-state reads (snapshots,
/// hashes) go through one, so they need no lock while they run and writers
/// carry on meanwhile.
pub struct View<'a> {
    engine: &'a Engine,
    snap: rocksdb::Snapshot<'a>,
}

impl Engine {
    /// A view of the database as it is now. Take it while holding whatever
    /// keeps the state consistent (the store lock); read it after releasing.
    pub fn view(&self) -> View<'_> {
        View {
            engine: self,
            snap: self.db.snapshot(),
        }
    }
}

impl View<'_> {
    fn each(&self, cf: &str, mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
        for item in self
            .snap
            .iterator_cf(self.engine.cf(cf), IteratorMode::Start)
        {
            let (k, v) = item.map_err(rocks)?;
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Calls `f` with every history record (main, sub, stored bytes), in revision order, until
    /// it returns false; nothing is collected.
    pub fn each_record(&self, mut f: impl FnMut(i64, i64, &[u8]) -> Result<bool>) -> Result<()> {
        self.each(CF_KV, |k, v| {
            let rev = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            f(rev.main, rev.sub, v)
        })
    }

    /// Every history record as (main, sub, stored bytes).
    pub fn records(&self) -> Result<Vec<(i64, i64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.each(CF_KV, |k, v| {
            let rev = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            out.push((rev.main, rev.sub, v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every lease and its TTL.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let mut out = Vec::new();
        self.each(CF_LEASE, |k, v| {
            out.push(decode_lease(k, v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// A CRC32 over every history record up to `rev` (etcd's HashKV idea:
    /// equal on members with the same history).
    pub fn hash_kv(&self, rev: i64) -> Result<u32> {
        let mut h = crc32fast::Hasher::new();
        self.each(CF_KV, |k, v| {
            let r = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            if r.main > rev {
                return Ok(false);
            }
            h.update(k);
            h.update(v);
            Ok(true)
        })?;
        Ok(h.finalize())
    }

    /// A CRC32 over the state machine's column families.
    pub fn hash_all(&self) -> Result<u32> {
        let mut h = crc32fast::Hasher::new();
        for cf in [CF_KV, CF_LEASE] {
            h.update(cf.as_bytes());
            self.each(cf, |k, v| {
                h.update(k);
                h.update(v);
                Ok(true)
            })?;
        }
        Ok(h.finalize())
    }
}

fn decode_lease(k: &[u8], v: &[u8]) -> Result<(i64, i64)> {
    let id = i64::from_be_bytes(
        k.try_into()
            .map_err(|_| Error::Internal("storage: bad lease key".into()))?,
    );
    let ttl = i64::from_be_bytes(
        v.try_into()
            .map_err(|_| Error::Internal("storage: bad lease".into()))?,
    );
    Ok((id, ttl))
}

impl RevisionReader for Engine {
    fn read(&self, rev: Revision) -> Result<Option<Record>> {
        match self
            .db
            .get_cf(self.cf(CF_KV), rev.to_bytes())
            .map_err(rocks)?
        {
            Some(b) => Ok(Some(decode_record(&b)?)),
            None => Ok(None),
        }
    }
}
