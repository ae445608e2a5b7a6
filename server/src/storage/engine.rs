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
/// The column families of the state (etcd's backend): everything but the Raft log, which is
/// etcd's WAL. The space quota and `dbSize` count these only, as etcd counts its bbolt file
/// and not its WAL: a log that holds big writes until the next snapshot must not raise a
/// NOSPACE alarm that compaction and defragmentation cannot clear.
const STATE_CFS: [&str; 4] = [CF_RAFT, CF_KV, CF_LEASE, CF_META];

const META_STATE: &[u8] = b"state";
const META_IDENTITY: &[u8] = b"identity";
/// The data format the directory was last opened with (a little-endian u32; absent: 1).
const META_FORMAT: &[u8] = b"format";

/// The data format this build writes. Versions of the data directory, with the cairn release
/// that introduced each:
/// - 1, cairn 0.1.0: history records, leases and the state's position in `kv`; the Raft log in
///   the journal; identity in `meta`.
/// - 2, cairn 0.2.0: adds the auth state (`kv`), the member history and the marks of a
///   snapshot being installed or owed (`raft`), and compacts in the background, so compacted
///   records may remain on disk for a while (0.1.0 would take them back into its index).
///
/// A build reads every format from [`OLDEST_DATA_FORMAT`] to its own and marks the directory
/// with its own when it opens it; a directory of a newer format is refused at start.
pub const DATA_FORMAT: u32 = 2;
/// The oldest data format this build reads (and moves to [`DATA_FORMAT`]).
pub const OLDEST_DATA_FORMAT: u32 = 1;

// The state machine lives in the `kv` column family alone, so that RocksDB
// persists it as one unit (a flush of one column family is atomic): history
// records under their 16-byte revision keys (the first byte is below 0x80,
// revisions being positive i64s), leases under `LEASE_PREFIX` + id, and the
// state's position under `STATE_KEY`, after everything else.
const LEASE_PREFIX: u8 = 0xfe;
const STATE_KEY: &[u8] = b"\xffstate";
/// The auth state (`raftpb.AuthState`), beside the position it is current at.
const AUTH_KEY: &[u8] = b"\xffauth";
/// Every revision key sorts below this.
const RECORDS_END: &[u8] = &[0x80];

fn lease_key(id: i64) -> [u8; 9] {
    let mut k = [LEASE_PREFIX; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Write options for what skips RocksDB's WAL: applied state (the log is
/// re-applied after a crash) and the log itself (its journal is its WAL).
pub(crate) fn no_wal() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    wo
}

/// Read options that stop at the last history record.
fn records_only() -> rocksdb::ReadOptions {
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(RECORDS_END.to_vec());
    ro
}

/// Read options and start of a scan over exactly the leases.
fn leases_scan() -> (rocksdb::ReadOptions, IteratorMode<'static>) {
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(vec![LEASE_PREFIX + 1]);
    let from: &'static [u8] = &[LEASE_PREFIX];
    (ro, IteratorMode::From(from, rocksdb::Direction::Forward))
}

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

/// A page of stored history and the revision the next one starts at.
pub type HistoryPage = (Vec<(Revision, Record)>, Option<i64>);

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
        let engine = Self { db };
        engine.mark_format(dir)?;
        engine.move_state_into_kv()?;
        Ok(Arc::new(engine))
    }

    /// Refuses a directory of a data format newer than this build's, and marks an older one
    /// (or a new one) with this build's.
    fn mark_format(&self, dir: &Path) -> Result<()> {
        let meta = self.cf(CF_META);
        let stored = self.db.get_cf(meta, META_FORMAT).map_err(rocks)?;
        let found = match &stored {
            None => OLDEST_DATA_FORMAT,
            Some(v) => {
                let bytes: [u8; 4] = v.as_slice().try_into().map_err(|_| {
                    Error::Internal(format!(
                        "{}: the data format mark is {} bytes long, not 4",
                        dir.display(),
                        v.len()
                    ))
                })?;
                u32::from_le_bytes(bytes)
            }
        };
        if found > DATA_FORMAT {
            return Err(Error::Internal(format!(
                "{}: the data directory is in data format {found}, which this build (cairn {}) does not read: it reads data formats {OLDEST_DATA_FORMAT} to {DATA_FORMAT}",
                dir.display(),
                env!("CARGO_PKG_VERSION")
            )));
        }
        if stored.is_none() || found < DATA_FORMAT {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db
                .put_cf_opt(meta, META_FORMAT, DATA_FORMAT.to_le_bytes(), &wo)
                .map_err(rocks)?;
        }
        Ok(())
    }

    /// Data written before the state machine lived in the `kv` column family
    /// alone kept its position in `meta` and its leases in `lease`: both
    /// move into `kv` in one synced batch.
    fn move_state_into_kv(&self) -> Result<()> {
        let (meta, lease, kv) = (self.cf(CF_META), self.cf(CF_LEASE), self.cf(CF_KV));
        let Some(state) = self.db.get_cf(meta, META_STATE).map_err(rocks)? else {
            return Ok(());
        };
        let mut b = WriteBatch::default();
        b.put_cf(kv, STATE_KEY, state);
        b.delete_cf(meta, META_STATE);
        for item in self.db.iterator_cf(lease, IteratorMode::Start) {
            let (k, v) = item.map_err(rocks)?;
            let (id, _) = decode_lease(&k, &v)?;
            b.put_cf(kv, lease_key(id), v);
            b.delete_cf(lease, k);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(rocks)
    }

    /// Makes every applied change durable (it is written without the WAL):
    /// the state machine's column family is flushed, at once and whole.
    pub fn persist_state(&self) -> Result<()> {
        self.db.flush_cf(self.cf(CF_KV)).map_err(rocks)
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

    /// Writes a bincode value to the `raft` column family through the WAL, not synced: a
    /// process crash keeps it, a power loss may not.
    pub fn raft_put_unsynced<T: Serialize>(&self, key: &[u8], v: &T) -> Result<()> {
        self.db.put_cf(self.cf(CF_RAFT), key, enc(v)).map_err(rocks)
    }

    pub fn state_meta(&self) -> Result<StateMeta> {
        match self.db.get_cf(self.cf(CF_KV), STATE_KEY).map_err(rocks)? {
            Some(b) => dec(&b),
            None => Ok(StateMeta {
                revision: 1,
                ..Default::default()
            }),
        }
    }

    /// Writes a batch of applied changes with the new position, atomically,
    /// without the WAL: see the module documentation.
    /// `auth` is the encoded auth state when the batch changed it.
    pub fn write_state(&self, ws: &WriteSet, meta: &StateMeta, auth: Option<&[u8]>) -> Result<()> {
        let mut b = WriteBatch::default();
        let kv = self.cf(CF_KV);
        if let Some(auth) = auth {
            b.put_cf(kv, AUTH_KEY, auth);
        }
        for (rev, rec) in &ws.records {
            b.put_cf(kv, rev.to_bytes(), encode_record(rec));
        }
        // `ws.removed` (compacted away) is deleted in the background: `storage::compactor`.
        for (id, ttl) in &ws.leases {
            match ttl {
                Some(ttl) => b.put_cf(kv, lease_key(*id), ttl.to_be_bytes()),
                None => b.delete_cf(kv, lease_key(*id)),
            }
        }
        b.put_cf(kv, STATE_KEY, enc(meta));
        self.db.write_opt(b, &no_wal()).map_err(rocks)
    }

    /// Deletes the records of `revs` (compacted away), without the WAL.
    pub fn delete_records(&self, revs: &[Revision]) -> Result<()> {
        let mut b = WriteBatch::default();
        let kv = self.cf(CF_KV);
        for rev in revs {
            b.delete_cf(kv, rev.to_bytes());
        }
        self.db.write_opt(b, &no_wal()).map_err(rocks)
    }

    /// The encoded auth state; empty if it was never changed.
    pub fn auth_state(&self) -> Result<Vec<u8>> {
        Ok(self
            .db
            .get_cf(self.cf(CF_KV), AUTH_KEY)
            .map_err(rocks)?
            .unwrap_or_default())
    }

    /// Every stored history record, in revision order.
    pub fn records(&self) -> impl Iterator<Item = Result<(Revision, Record)>> + '_ {
        self.db
            .iterator_cf_opt(self.cf(CF_KV), records_only(), IteratorMode::Start)
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
        let (ro, from) = leases_scan();
        for item in self.db.iterator_cf_opt(self.cf(CF_KV), ro, from) {
            let (k, v) = item.map_err(rocks)?;
            out.push(decode_lease(&k[1..], &v)?);
        }
        Ok(out)
    }

    /// Writes a whole state machine into an SST file at `sst` (a snapshot load), holding
    /// nothing in memory: `fill` hands every history record, in ascending revision order, to
    /// the `put` it is given, then returns the leases and the auth state. Nothing of this
    /// database changes until [`Self::ingest_state`].
    pub fn write_state_file(
        &self,
        sst: &Path,
        meta: &StateMeta,
        fill: impl FnOnce(&mut dyn FnMut(Revision, &[u8]) -> Result<()>) -> Result<LeasesAndAuth>,
    ) -> Result<()> {
        let opts = Options::default();
        let mut w = rocksdb::SstFileWriter::create(&opts);
        // Never rewritten in place: a crash after an ingest that hard-linked it into the
        // database (before RocksDB removed this name) leaves it shared with a live file.
        match std::fs::remove_file(sst) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Internal(format!("{}: {e}", sst.display())))
            }
            _ => {}
        }
        w.open(sst).map_err(rocks)?;
        let (mut leases, auth) =
            fill(&mut |rev, bytes| w.put(rev.to_bytes(), bytes).map_err(rocks))?;
        // In key order, each once: the file takes keys only in ascending order.
        leases.sort_by_key(|(id, _)| lease_key(*id));
        leases.dedup_by_key(|(id, _)| *id);
        for (id, ttl) in &leases {
            w.put(lease_key(*id), ttl.to_be_bytes()).map_err(rocks)?;
        }
        if !auth.is_empty() {
            w.put(AUTH_KEY, &auth).map_err(rocks)?;
        }
        w.put(STATE_KEY, enc(meta)).map_err(rocks)?;
        w.finish().map_err(rocks)
    }

    /// Replaces the whole state machine with a file of [`Self::write_state_file`]: the old
    /// state is deleted and the file ingested, which RocksDB makes durable. A caller that may
    /// crash in between keeps what it loads from where it can load it again (see
    /// `raft::KvState::install_file`).
    pub fn ingest_state(&self, sst: &Path) -> Result<()> {
        let kv = self.cf(CF_KV);
        let mut b = WriteBatch::default();
        // Every key of the state sorts below 17 bytes of 0xff.
        b.delete_range_cf(kv, [0u8; 1].as_slice(), [0xffu8; 17].as_slice());
        self.db.write_opt(b, &no_wal()).map_err(rocks)?;
        // The deletion is flushed first (it overlaps the file), the file then takes the
        // newer sequence number, so it replaces everything.
        let mut io = rocksdb::IngestExternalFileOptions::default();
        io.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(kv, &io, vec![sst])
            .map_err(rocks)
    }

    /// Deletes a key of the `raft` column family, fsynced.
    pub fn raft_delete(&self, key: &[u8]) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_cf_opt(self.cf(CF_RAFT), key, &wo)
            .map_err(rocks)
    }

    /// The directory the database lives in.
    pub fn dir(&self) -> &Path {
        self.db.path()
    }

    /// Sums RocksDB integer properties over the state's column families.
    fn sum_properties(&self, props: &[&str]) -> i64 {
        let mut total = 0u64;
        for cf in STATE_CFS {
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

    /// Approximate bytes of the state on disk and in memory tables (the log not counted).
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

/// Lease IDs with their TTLs, and the encoded auth state.
pub type LeasesAndAuth = (Vec<(i64, i64)>, Vec<u8>);

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
    /// Calls `f` with every history record (`leases` false) or lease (true)
    /// as stored, in key order, until it returns false.
    fn each(&self, leases: bool, mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
        let (ro, mode) = if leases {
            leases_scan()
        } else {
            (records_only(), IteratorMode::Start)
        };
        for item in self.snap.iterator_cf_opt(self.engine.cf(CF_KV), ro, mode) {
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
        self.each(false, |k, v| {
            let rev = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            f(rev.main, rev.sub, v)
        })
    }

    /// Stored history from revision `from` through `to`, one page, as of this view
    /// (compaction or a snapshot load running meanwhile does not disturb it): records
    /// up to about `max_bytes` of stored values, cut between revisions (a
    /// revision's records stay together). Also the revision the next page
    /// starts at, if the history goes on past this page.
    pub fn history_page(&self, from: i64, to: i64, max_bytes: usize) -> Result<HistoryPage> {
        let start = Revision::new(from, 0).to_bytes();
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.snap.iterator_cf_opt(
            self.engine.cf(CF_KV),
            records_only(),
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item.map_err(rocks)?;
            let rev = Revision::from_bytes(&k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            if rev.main > to {
                break;
            }
            let last_main = out.last().map(|(r, _): &(Revision, Record)| r.main);
            if bytes >= max_bytes && last_main.is_some_and(|m| m != rev.main) {
                return Ok((out, Some(rev.main)));
            }
            bytes += v.len();
            out.push((rev, decode_record(&v)?));
        }
        Ok((out, None))
    }

    /// Every history record as (main, sub, stored bytes).
    pub fn records(&self) -> Result<Vec<(i64, i64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.each(false, |k, v| {
            let rev = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            out.push((rev.main, rev.sub, v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The encoded auth state as of this view; empty if never changed.
    pub fn auth_state(&self) -> Result<Vec<u8>> {
        Ok(self
            .snap
            .get_cf(self.engine.cf(CF_KV), AUTH_KEY)
            .map_err(rocks)?
            .unwrap_or_default())
    }

    /// Every lease and its TTL.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let mut out = Vec::new();
        self.each(true, |k, v| {
            out.push(decode_lease(&k[1..], v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// A CRC32 over the history records up to `rev` (etcd's HashKV: equal on members with
    /// the same history): of those at or before `compacted`, only the ones in `kept`, so
    /// records a compaction dropped count on no member, deleted yet or not.
    pub fn hash_kv(
        &self,
        rev: i64,
        compacted: i64,
        kept: &std::collections::HashSet<Revision>,
    ) -> Result<u32> {
        let mut h = crc32fast::Hasher::new();
        self.each(false, |k, v| {
            let r = Revision::from_bytes(k)
                .ok_or_else(|| Error::Internal("storage: bad revision key".into()))?;
            if r.main > rev {
                return Ok(false);
            }
            if r.main <= compacted && !kept.contains(&r) {
                return Ok(true);
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
        for (name, leases) in [(CF_KV, false), (CF_LEASE, true)] {
            h.update(name.as_bytes());
            self.each(leases, |k, v| {
                // Leases hashed by id, as when they had a column family.
                h.update(if leases { &k[1..] } else { k });
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

impl RevisionReader for View<'_> {
    fn read(&self, rev: Revision) -> Result<Option<Record>> {
        match self
            .snap
            .get_cf(self.engine.cf(CF_KV), rev.to_bytes())
            .map_err(rocks)?
        {
            Some(b) => Ok(Some(decode_record(&b)?)),
            None => Ok(None),
        }
    }

    /// Looked up together, in key order (RocksDB's batched MultiGet reads each index and
    /// data block once for all the keys in it).
    fn read_many(&self, revs: &[Revision]) -> Result<Vec<Option<Record>>> {
        let mut order: Vec<usize> = (0..revs.len()).collect();
        order.sort_unstable_by_key(|&i| revs[i]);
        let keys: Vec<[u8; 16]> = order.iter().map(|&i| revs[i].to_bytes()).collect();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(&self.snap);
        let got = self
            .engine
            .db
            .batched_multi_get_cf_opt(self.engine.cf(CF_KV), &keys, true, &ro);
        let mut out: Vec<Option<Record>> = (0..revs.len()).map(|_| None).collect();
        for (i, value) in order.into_iter().zip(got) {
            if let Some(v) = value.map_err(rocks)? {
                out[i] = Some(decode_record(&v)?);
            }
        }
        Ok(out)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(revision: i64) -> StateMeta {
        StateMeta {
            revision,
            compacted: 1,
            alarms: vec![(7, 1)],
            ..Default::default()
        }
    }

    /// A directory without a format mark (cairn 0.1.0's, or a new one) is marked with this
    /// build's format; one of a newer format is refused with what this build reads, and left as
    /// it was.
    #[test]
    fn data_format_is_marked_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mark = |e: &Engine| e.db.get_cf(e.cf(CF_META), META_FORMAT).unwrap();
        {
            let e = Engine::open(dir.path()).unwrap();
            assert_eq!(mark(&e), Some(DATA_FORMAT.to_le_bytes().to_vec()));
            // As cairn 0.1.0 left it: no mark.
            e.db.delete_cf(e.cf(CF_META), META_FORMAT).unwrap();
        }
        {
            let e = Engine::open(dir.path()).unwrap();
            assert_eq!(mark(&e), Some(DATA_FORMAT.to_le_bytes().to_vec()));
            e.db.put_cf(e.cf(CF_META), META_FORMAT, (DATA_FORMAT + 1).to_le_bytes())
                .unwrap();
        }
        let err = Engine::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&format!(
                "in data format {}, which this build (cairn {}) does not read: it reads data formats 1 to {DATA_FORMAT}",
                DATA_FORMAT + 1,
                env!("CARGO_PKG_VERSION")
            )),
            "{err}"
        );
        // Refused, not rewritten.
        assert_eq!(
            stored_format_mark(dir.path()),
            Some((DATA_FORMAT + 1).to_le_bytes().to_vec())
        );
    }

    /// The data format mark as stored, read without `Engine` (which would refuse or rewrite).
    fn stored_format_mark(dir: &std::path::Path) -> Option<Vec<u8>> {
        let e = DB::open_cf_descriptors(
            &Options::default(),
            dir,
            ALL_CFS
                .iter()
                .map(|n| ColumnFamilyDescriptor::new(*n, Options::default())),
        )
        .unwrap();
        e.get_cf(e.cf_handle(CF_META).unwrap(), META_FORMAT)
            .unwrap()
    }

    /// A format mark that is not 4 bytes (a damaged directory) is refused with what it is, and
    /// left as it was: never taken for a format and overwritten.
    #[test]
    fn a_malformed_data_format_mark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = Engine::open(dir.path()).unwrap();
            e.db.put_cf(e.cf(CF_META), META_FORMAT, [2u8, 0, 0])
                .unwrap();
        }
        let err = Engine::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("the data format mark is 3 bytes long, not 4"),
            "{err}"
        );
        assert_eq!(stored_format_mark(dir.path()), Some(vec![2u8, 0, 0]));
    }

    /// A data dir from before the state machine lived in `kv` alone: its
    /// position and leases move into `kv`, next to the records, and the old
    /// places are emptied.
    #[test]
    fn state_moves_into_kv_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let rev = Revision::new(2, 0);
        let rec = Record {
            kv: KeyValue {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 5,
            },
            tombstone: false,
        };
        {
            let e = Engine::open(dir.path()).unwrap();
            let mut b = WriteBatch::default();
            b.put_cf(e.cf(CF_KV), rev.to_bytes(), encode_record(&rec));
            b.put_cf(e.cf(CF_LEASE), 5i64.to_be_bytes(), 60i64.to_be_bytes());
            b.put_cf(e.cf(CF_LEASE), 9i64.to_be_bytes(), 30i64.to_be_bytes());
            b.put_cf(e.cf(CF_META), META_STATE, enc(&meta(2)));
            e.db.write(b).unwrap();
        }
        let e = Engine::open(dir.path()).unwrap();
        assert_eq!(e.state_meta().unwrap().revision, 2);
        assert_eq!(e.state_meta().unwrap().alarms, vec![(7, 1)]);
        assert_eq!(e.leases().unwrap(), vec![(5, 60), (9, 30)]);
        let records = e.records().collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(records, vec![(rev, rec)]);
        assert!(e.db.get_cf(e.cf(CF_META), META_STATE).unwrap().is_none());
        let old = e.db.iterator_cf(e.cf(CF_LEASE), IteratorMode::Start);
        assert_eq!(old.count(), 0);
        // Reads that walk the history stop at its last record.
        assert_eq!(
            e.view().history_page(0, i64::MAX, 1 << 20).unwrap().0.len(),
            1
        );
        assert_eq!(e.view().records().unwrap().len(), 1);
        assert_eq!(e.view().leases().unwrap(), vec![(5, 60), (9, 30)]);
    }

    /// Applied changes (written without the WAL) are on disk once persisted,
    /// and a snapshot install replaces records, leases and position alike.
    #[test]
    fn state_writes_persist_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |v: &[u8]| Record {
            kv: KeyValue {
                key: b"k".to_vec(),
                value: v.to_vec(),
                ..Default::default()
            },
            tombstone: false,
        };
        {
            let e = Engine::open(dir.path()).unwrap();
            let ws = WriteSet {
                records: vec![(Revision::new(2, 0), rec(b"x"))],
                leases: vec![(3, Some(10))],
                ..Default::default()
            };
            e.write_state(&ws, &meta(2), None).unwrap();
            e.persist_state().unwrap();
            assert_eq!(e.leases().unwrap(), vec![(3, 10)]);
        }
        let e = Engine::open(dir.path()).unwrap();
        assert_eq!(e.state_meta().unwrap().revision, 2);
        assert_eq!(e.leases().unwrap(), vec![(3, 10)]);
        let sst = dir.path().join("load.sst");
        let big = rec(&vec![b'z'; 100_000]);
        e.write_state_file(&sst, &meta(100), |put| {
            for main in 5..100 {
                put(Revision::new(main, 0), &encode_record(&big))?;
            }
            Ok((vec![(4, 20)], vec![]))
        })
        .unwrap();
        assert_eq!(
            e.state_meta().unwrap().revision,
            2,
            "nothing changes before the ingest"
        );
        e.ingest_state(&sst).unwrap();
        drop(e);
        let e = Engine::open(dir.path()).unwrap();
        let records = e.records().collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(records.len(), 95);
        assert_eq!(records[0], (Revision::new(5, 0), big.clone()));
        assert_eq!(e.leases().unwrap(), vec![(4, 20)]);
        assert_eq!(e.state_meta().unwrap().revision, 100);
        // Loaded again over it: nothing of the first load is left.
        let _ = std::fs::remove_file(&sst);
        e.write_state_file(&sst, &meta(5), |put| {
            put(Revision::new(5, 0), &encode_record(&rec(b"y")))?;
            Ok((vec![(4, 20)], vec![]))
        })
        .unwrap();
        e.ingest_state(&sst).unwrap();
        let records = e.records().collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(records, vec![(Revision::new(5, 0), rec(b"y"))]);
        assert_eq!(e.leases().unwrap(), vec![(4, 20)]);
        assert_eq!(e.state_meta().unwrap().revision, 5);
    }

    /// History is read in pages of bounded bytes, cut between revisions,
    /// and the pages together are the whole span.
    #[test]
    fn history_pages_cut_between_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path()).unwrap();
        let rec = |k: &str| Record {
            kv: KeyValue {
                key: k.as_bytes().to_vec(),
                value: vec![b'v'; 100],
                ..Default::default()
            },
            tombstone: false,
        };
        // A txn at 2 (two records), then one record a revision up to 9.
        let mut records = vec![
            (Revision::new(2, 0), rec("a")),
            (Revision::new(2, 1), rec("b")),
        ];
        records.extend((3..=9).map(|m| (Revision::new(m, 0), rec("c"))));
        let ws = WriteSet {
            records: records.clone(),
            ..Default::default()
        };
        e.write_state(&ws, &meta(9), None).unwrap();
        let (first, next) = e.view().history_page(2, 8, 150).unwrap();
        assert_eq!(first.len(), 2, "revision 2 stays whole");
        assert_eq!(next, Some(3));
        let mut all = first;
        let mut from = next;
        while let Some(f) = from {
            let (page, next) = e.view().history_page(f, 8, 150).unwrap();
            assert!(page.len() <= 2);
            all.extend(page);
            from = next;
        }
        assert_eq!(all, records[..8].to_vec());
    }
}
