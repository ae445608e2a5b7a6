//! Backups: a member's snapshot (Maintenance.Snapshot, through `etcd-client`) streamed straight
//! into a multipart upload with its SHA-256 computed on the way, so memory stays flat whatever
//! the snapshot's size; a manifest next to it; retention that only ever deletes this cluster's
//! own backups; schedules; and the download, verified, that a restore starts from.
//!
//! Object layout under a destination's prefix:
//! `<prefix>/<namespace>/<cluster>/<cluster uid>/<UTC time>.snap` and `<UTC time>.json` (the
//! manifest: key, size, revision, SHA-256, time); on-demand backups (EtcdBackup objects) under
//! `.../<cluster uid>/on-demand/<EtcdBackup name>/`. Retention lists the scheduled directory only
//! (not its subdirectories) and touches only names of that exact form: it never deletes an
//! on-demand backup.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::crd::{BackupDestination, BackupRecord, RetentionSpec, Store};
use crate::seal::{BackupKey, Opener, SealError, Sealer};

/// The subdirectory of a cluster's directory that holds its on-demand backups.
pub const ON_DEMAND_DIR: &str = "on-demand";

/// Size of each uploaded part (S3 wants at least 5 MiB but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once; with the part being filled, this bounds the memory a backup uses.
const PARTS_IN_FLIGHT: usize = 2;

/// Errors of backups and restores.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("backup destination: {0}")]
    Destination(String),
    #[error("object storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("snapshot from {endpoint}: {source}")]
    Snapshot {
        endpoint: String,
        source: etcd_client::Error,
    },
    #[error("no member answered a snapshot request at {0:?}")]
    NoMember(Vec<String>),
    #[error("backup {key}: checksum mismatch (expected sha256 {expected}, got {actual})")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("backup {0}: no manifest")]
    NoManifest(String),
    #[error("no backup found under {0:?}")]
    NoBackup(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("backup {key}: {source}")]
    Seal { key: String, source: SealError },
    #[error("backup {key} is sealed with key {id:?}: {why}")]
    KeyMismatch {
        key: String,
        id: String,
        why: String,
    },
}

/// Credentials for an object store, from a Secret: its keys (the store's
/// [`Store::credential_keys`]) and values.
pub type Credentials = std::collections::BTreeMap<String, String>;

/// An opened destination: the store and the key prefix inside it, and the key that seals what
/// is written there (client-side encryption), if any.
#[derive(Clone, Debug)]
pub struct Destination {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: String,
    pub key: Option<BackupKey>,
}

impl Destination {
    /// Opens a destination. Settings come from the environment first (in a pod, the
    /// credentials Secret's keys arrive as variables of the same names), then from
    /// `credentials`; with neither, the ambient identity of the store's platform is used
    /// (web identity / workload identity tokens, instance metadata).
    pub fn open(d: &BackupDestination, credentials: Option<&Credentials>) -> Result<Self, Error> {
        let store = d.store().map_err(Error::Destination)?;
        let bad = |e: object_store::Error| Error::Destination(e.to_string());
        // Only the keys this store documents are taken from a Secret: anything else in it
        // (another store's keys, a stray endpoint) is ignored, not applied.
        let settings = || {
            let allowed = store.credential_keys();
            credentials
                .into_iter()
                .flatten()
                .filter(move |(k, _)| allowed.iter().any(|(a, _)| a == k))
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        };
        let built: Arc<dyn ObjectStore> = match store {
            Store::S3(s3) => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(s3.region.clone().unwrap_or_else(|| "us-east-1".into()))
                    .with_virtual_hosted_style_request(!s3.force_path_style);
                if let Some(e) = &s3.endpoint {
                    b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                }
                for (k, v) in settings() {
                    b = b.with_config(k.parse().map_err(bad)?, v);
                }
                if let Some(sse) = &s3.server_side_encryption {
                    use object_store::aws::AmazonS3ConfigKey;
                    b = match (sse.kind.as_str(), &sse.kms_key_id) {
                        ("aws:kms", Some(id)) => b.with_sse_kms_encryption(id),
                        (kind @ ("AES256" | "aws:kms"), _) => {
                            let key: AmazonS3ConfigKey =
                                "aws_server_side_encryption".parse().map_err(bad)?;
                            b.with_config(key, kind)
                        }
                        (other, _) => {
                            return Err(Error::Destination(format!(
                                "serverSideEncryption.type {other:?}: AES256 or aws:kms"
                            )))
                        }
                    };
                }
                Arc::new(b.build().map_err(bad)?)
            }
            Store::Gcs(gcs) => {
                // With a Secret's keys, nothing from the process's environment (the operator's
                // own identity) mixes in.
                let b = match credentials {
                    Some(_) => GoogleCloudStorageBuilder::new(),
                    None => GoogleCloudStorageBuilder::from_env(),
                };
                let mut b = b.with_bucket_name(&gcs.bucket);
                let mut keyed = false;
                for (k, v) in settings() {
                    keyed = true;
                    b = b.with_config(k.parse().map_err(bad)?, v);
                }
                if let Some(e) = &gcs.endpoint {
                    b = b
                        .with_base_url(e.trim_end_matches('/'))
                        .with_client_options(
                            object_store::ClientOptions::new()
                                .with_allow_http(e.starts_with("http://")),
                        );
                    let ambient = credentials.is_none()
                        && [
                            "GOOGLE_SERVICE_ACCOUNT",
                            "GOOGLE_SERVICE_ACCOUNT_PATH",
                            "GOOGLE_SERVICE_ACCOUNT_KEY",
                            "GOOGLE_APPLICATION_CREDENTIALS",
                            "SERVICE_ACCOUNT",
                        ]
                        .iter()
                        .any(|v| std::env::var_os(v).is_some());
                    if !keyed && !ambient {
                        // An endpoint and no key: an emulator, asked without OAuth tokens (there
                        // is no metadata server to get one from).
                        b = b.with_credentials(Arc::new(
                            object_store::StaticCredentialProvider::new(
                                object_store::gcp::GcpCredential {
                                    bearer: String::new(),
                                },
                            ),
                        ));
                    }
                }
                Arc::new(b.build().map_err(bad)?)
            }
            Store::Azure(az) => {
                let b = match credentials {
                    Some(_) => MicrosoftAzureBuilder::new(),
                    None => MicrosoftAzureBuilder::from_env(),
                };
                let mut b = b
                    .with_account(&az.account)
                    .with_container_name(&az.container);
                for (k, v) in settings() {
                    b = b.with_config(k.parse().map_err(bad)?, v);
                }
                if let Some(e) = &az.endpoint {
                    b = b
                        .with_endpoint(e.trim_end_matches('/').to_string())
                        .with_allow_http(e.starts_with("http://"));
                }
                Arc::new(b.build().map_err(bad)?)
            }
            Store::Pvc(p) => {
                // In a pod, from its environment (the token Secret's keys); in the operator,
                // from the Secret read.
                let setting = |k: &str| {
                    std::env::var(k)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .or_else(|| credentials.and_then(|c| c.get(k).cloned()))
                        .ok_or_else(|| {
                            Error::Destination(format!(
                                "pvc {}: no {k} (the Secret {} has it)",
                                p.claim_name,
                                p.server_name()
                            ))
                        })
                };
                Arc::new(
                    crate::store::client::PvcStore::new(
                        &setting(crate::store::URL_ENV)?,
                        &setting(crate::store::TOKEN_ENV)?,
                    )
                    .map_err(Error::Destination)?,
                )
            }
        };
        Ok(Destination {
            store: built,
            prefix: store.prefix().trim_matches('/').to_string(),
            key: None,
        })
    }

    /// A destination on a local filesystem (a mounted volume) rooted at `root`.
    pub fn local(root: &FsPath, prefix: &str) -> Result<Self, Error> {
        let fs = object_store::local::LocalFileSystem::new_with_prefix(root)?;
        Ok(Destination {
            store: Arc::new(fs),
            prefix: prefix.trim_matches('/').to_string(),
            key: None,
        })
    }

    /// This destination, sealing what it writes (and opening what it reads) with `key`.
    pub fn with_key(mut self, key: Option<BackupKey>) -> Self {
        self.key = key;
        self
    }

    /// The directory of one cluster's scheduled backups.
    pub fn cluster_dir(&self, namespace: &str, cluster: &str, uid: &str) -> String {
        join(&[&self.prefix, namespace, cluster, uid])
    }

    /// The directory of the on-demand backup `name` (an EtcdBackup) of a cluster: below the
    /// cluster's, so that a restore from the cluster's latest backup finds it, but apart from
    /// the scheduled ones, so that their retention (which lists the cluster's directory only)
    /// never deletes it.
    pub fn on_demand_dir(&self, namespace: &str, cluster: &str, uid: &str, name: &str) -> String {
        join(&[
            &self.cluster_dir(namespace, cluster, uid),
            ON_DEMAND_DIR,
            name,
        ])
    }
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// The object name of a backup taken at `t` (second precision, sortable).
pub fn object_name(t: Timestamp) -> String {
    format!("{}.snap", t.strftime("%Y%m%dT%H%M%SZ"))
}

/// Whether `name` (the last path segment) is one of ours, and its time.
fn parse_object_name(name: &str) -> Option<Timestamp> {
    let stamp = name.strip_suffix(".snap")?;
    if stamp.len() != 16 {
        return None;
    }
    let dt = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", stamp).ok()?;
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

fn manifest_key(snapshot_key: &str) -> String {
    format!("{}.json", snapshot_key.trim_end_matches(".snap"))
}

/// Streams a snapshot from the first member of `endpoints` that answers into
/// `<dir>/<time>.snap`, then writes the manifest. Returns the record of the backup.
pub async fn stream_backup(
    endpoints: &[String],
    access: &crate::members::Access,
    dest: &Destination,
    dir: &str,
    now: Timestamp,
) -> Result<BackupRecord, Error> {
    let mut stream = None;
    let mut last_err = None;
    'endpoints: for e in endpoints {
        for access in access.variants() {
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
            let attempt = async {
                let mut c = access.connect(std::slice::from_ref(e), opts).await?;
                c.snapshot().await
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(s)) => {
                    stream = Some((e.clone(), s));
                    break 'endpoints;
                }
                Ok(Err(err)) => last_err = Some((e.clone(), err)),
                Err(_) => {}
            }
        }
    }
    let Some((endpoint, mut stream)) = stream else {
        return Err(match last_err {
            Some((endpoint, source)) => Error::Snapshot { endpoint, source },
            None => Error::NoMember(endpoints.to_vec()),
        });
    };

    let key = join(&[dir, &object_name(now)]);
    let mut writer = Upload::new(dest.store.clone(), Path::from(key.as_str()));
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut revision = 0;
    let seal_err = |source| Error::Seal {
        key: key.clone(),
        source,
    };
    let mut sealer = match &dest.key {
        Some(k) => Some(Sealer::new(k).map_err(seal_err)?),
        None => None,
    };
    // What is stored: the snapshot's bytes, or their sealed segments.
    let mut count = |bytes: &[u8]| {
        hasher.update(bytes);
        size += bytes.len() as u64;
    };
    if let Some(s) = &sealer {
        let header = s.header();
        count(&header);
        writer.write(&header).await?;
    }
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(source) => {
                writer.abort().await;
                return Err(Error::Snapshot { endpoint, source });
            }
        };
        if revision == 0 {
            revision = msg.header().map_or(0, |h| h.revision());
        }
        let sealed;
        let bytes = match sealer.as_mut() {
            Some(s) => {
                sealed = s.update(msg.blob()).map_err(seal_err)?;
                &sealed[..]
            }
            None => msg.blob(),
        };
        count(bytes);
        writer.write(bytes).await?;
    }
    if let Some(s) = sealer.take() {
        let last = s.finish().map_err(seal_err)?;
        count(&last);
        writer.write(&last).await?;
    }
    writer.finish().await?;
    let (keys, hash, hash_compact_revision) = contents_at(&endpoint, access, revision).await;
    let record = BackupRecord {
        time: Time(now),
        key: key.clone(),
        size: size as i64,
        revision,
        sha256: hex(&hasher.finalize()),
        keys,
        hash,
        hash_compact_revision,
        encryption_key_id: dest.key.as_ref().map(|k| k.id.clone()),
    };
    let manifest = serde_json::to_vec_pretty(&record).expect("a record serializes");
    dest.store
        .put(
            &Path::from(manifest_key(&key).as_str()),
            PutPayload::from(manifest),
        )
        .await?;
    Ok(record)
}

/// An object written as it is produced: held in memory until it outgrows one part, then a
/// multipart upload with at most [`PARTS_IN_FLIGHT`] parts in flight. An object smaller than
/// one part is one PUT: fewer requests, and stores without multipart uploads (GCS emulators)
/// take small backups too.
struct Upload {
    store: Arc<dyn ObjectStore>,
    path: Path,
    held: Vec<u8>,
    multipart: Option<WriteMultipart>,
}

impl Upload {
    fn new(store: Arc<dyn ObjectStore>, path: Path) -> Self {
        Upload {
            store,
            path,
            held: Vec::new(),
            multipart: None,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.multipart.is_none() {
            if self.held.len() + bytes.len() < PART_SIZE {
                self.held.extend_from_slice(bytes);
                return Ok(());
            }
            let upload = self.store.put_multipart(&self.path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            w.write(&std::mem::take(&mut self.held));
            self.multipart = Some(w);
        }
        let w = self.multipart.as_mut().expect("started above");
        w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        w.write(bytes);
        Ok(())
    }

    async fn finish(mut self) -> Result<(), Error> {
        match self.multipart.take() {
            Some(w) => {
                w.finish().await?;
            }
            None => {
                let held = std::mem::take(&mut self.held);
                self.store.put(&self.path, PutPayload::from(held)).await?;
            }
        }
        Ok(())
    }

    async fn abort(mut self) {
        if let Some(w) = self.multipart.take() {
            let _ = w.abort().await;
        }
    }
}

/// An upload dropped unfinished (a write failed, sealing failed, the backup was cancelled)
/// aborts its multipart upload, so that no parts are left in the store.
impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(w) = self.multipart.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = w.abort().await;
                });
            }
        }
    }
}

/// What the member at `endpoint` holds at `revision`, for a verification to compare with: its
/// key count, HashKV and the compaction revision of that HashKV (each `None` when it cannot
/// say, e.g. compacted past it meanwhile).
async fn contents_at(
    endpoint: &str,
    access: &crate::members::Access,
    revision: i64,
) -> (Option<i64>, Option<u32>, Option<i64>) {
    for access in access.variants() {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(60));
        let Ok(mut c) = access.connect(&[endpoint.to_string()], opts).await else {
            continue;
        };
        let count = c
            .get(
                vec![0],
                Some(
                    etcd_client::GetOptions::new()
                        .with_from_key()
                        .with_count_only()
                        .with_serializable()
                        .with_revision(revision),
                ),
            )
            .await;
        let Ok(count) = count else { continue };
        let hash = c.hash_kv(revision).await.ok();
        return (
            Some(count.count()),
            hash.as_ref().map(|h| h.hash()),
            hash.as_ref().map(|h| h.compact_version()),
        );
    }
    (None, None, None)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The backups in one cluster's directory, oldest first: (object key, time).
pub async fn list_backups(
    dest: &Destination,
    dir: &str,
) -> Result<Vec<(String, Timestamp)>, Error> {
    let prefix = Path::from(dir);
    let mut out = Vec::new();
    let listing = dest.store.list_with_delimiter(Some(&prefix)).await?;
    for o in listing.objects {
        let Some(name) = o.location.filename() else {
            continue;
        };
        if let Some(t) = parse_object_name(name) {
            out.push((o.location.to_string(), t));
        }
    }
    out.sort_by_key(|(_, t)| *t);
    Ok(out)
}

/// Parses a retention age: a number with `s`, `m`, `h` or `d`.
pub fn parse_age(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// Which of `backups` (oldest first) retention removes. The newest is always kept.
pub fn retention_victims(
    backups: &[(String, Timestamp)],
    retention: &RetentionSpec,
    now: Timestamp,
) -> Vec<String> {
    let n = backups.len();
    let mut victims = Vec::new();
    for (i, (key, t)) in backups.iter().enumerate() {
        if i + 1 == n {
            break;
        }
        let too_many = retention
            .keep_last
            .is_some_and(|k| n - i > k.max(1) as usize);
        let too_old = retention
            .max_age
            .as_deref()
            .and_then(parse_age)
            .is_some_and(|age| now.duration_since(*t).as_secs_f64() > age.as_secs_f64());
        if too_many || too_old {
            victims.push(key.clone());
        }
    }
    victims
}

/// Applies retention to one cluster's directory, never deleting `keep` (the last verified
/// backup: a quorum-loss recovery may need it); returns the deleted backups' keys.
pub async fn apply_retention(
    dest: &Destination,
    dir: &str,
    retention: &RetentionSpec,
    now: Timestamp,
    keep: Option<&str>,
) -> Result<Vec<String>, Error> {
    let backups = list_backups(dest, dir).await?;
    let mut victims = retention_victims(&backups, retention, now);
    victims.retain(|v| Some(v.as_str()) != keep);
    for key in &victims {
        dest.store.delete(&Path::from(key.as_str())).await?;
        match dest
            .store
            .delete(&Path::from(manifest_key(key).as_str()))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(victims)
}

/// The record (manifest) of a backup.
pub async fn record(dest: &Destination, key: &str) -> Result<BackupRecord, Error> {
    let got = match dest
        .store
        .get(&Path::from(manifest_key(key).as_str()))
        .await
    {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Err(Error::NoManifest(key.into())),
        Err(e) => return Err(e.into()),
    };
    let bytes = got.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|_| Error::NoManifest(key.into()))
}

/// The newest backup anywhere under `prefix` (by the time in its manifest).
pub async fn latest(dest: &Destination, prefix: &str) -> Result<BackupRecord, Error> {
    let mut newest: Option<(Timestamp, String)> = None;
    let mut listing = dest.store.list(Some(&Path::from(prefix)));
    while let Some(o) = listing.next().await {
        let o = o?;
        let Some(t) = o.location.filename().and_then(parse_object_name) else {
            continue;
        };
        if newest.as_ref().is_none_or(|(nt, _)| t > *nt) {
            newest = Some((t, o.location.to_string()));
        }
    }
    let (_, key) = newest.ok_or_else(|| Error::NoBackup(prefix.to_string()))?;
    record(dest, &key).await
}

/// Downloads a backup into `out`, streaming, and checks it against its manifest's SHA-256
/// (and size). On a mismatch `out` is removed and nothing is restored from it.
pub async fn fetch(dest: &Destination, key: &str, out: &FsPath) -> Result<BackupRecord, Error> {
    let rec = record(dest, key).await?;
    let backup_key = match (&rec.encryption_key_id, &dest.key) {
        (None, _) => None,
        (Some(id), None) => {
            return Err(Error::KeyMismatch {
                key: key.to_string(),
                id: id.clone(),
                why: "no key was given".to_string(),
            })
        }
        (Some(id), Some(k)) if k.id != *id => {
            return Err(Error::KeyMismatch {
                key: key.to_string(),
                id: id.clone(),
                why: format!("the key given is {:?}", k.id),
            })
        }
        (Some(_), Some(k)) => Some(k.clone()),
    };
    // A sealed backup is checked as stored, then opened into `out`.
    let stored = match &backup_key {
        Some(_) => out.with_extension("sealed"),
        None => out.to_path_buf(),
    };
    download(dest, key, &stored, |size, actual| {
        (actual != rec.sha256 || size as i64 != rec.size).then(|| Error::Checksum {
            key: key.to_string(),
            expected: rec.sha256.clone(),
            actual: actual.to_string(),
        })
    })
    .await?;
    if let Some(k) = backup_key {
        let opened = open_file(&stored, out, &k).await.map_err(|e| match e {
            Error::Seal { source, .. } => Error::Seal {
                key: key.to_string(),
                source,
            },
            e => e,
        });
        let _ = tokio::fs::remove_file(&stored).await;
        opened?;
    }
    Ok(rec)
}

/// Opens the sealed file `sealed` into `out` (through `out.part`, synced, renamed), streaming.
async fn open_file(sealed: &FsPath, out: &FsPath, key: &BackupKey) -> Result<(), Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seal_err = |source| Error::Seal {
        key: sealed.display().to_string(),
        source,
    };
    let mut input = tokio::fs::File::open(sealed).await?;
    let part = out.with_extension("part");
    let mut file = tokio::fs::File::create(&part).await?;
    let mut opener = Opener::new(key);
    let mut buf = vec![0u8; 1 << 20];
    let result = async {
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            file.write_all(&opener.update(&buf[..n]).map_err(seal_err)?)
                .await?;
        }
        file.write_all(&opener.finish().map_err(seal_err)?).await?;
        file.sync_all().await?;
        Ok::<(), Error>(())
    }
    .await;
    drop(file);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, out).await?;
    Ok(())
}

/// Streams object `key` into `out` (through `out.part`, synced, renamed); `refuse(size, sha256
/// hex)` may refuse what arrived, which is then removed.
async fn download(
    dest: &Destination,
    key: &str,
    out: &FsPath,
    refuse: impl FnOnce(u64, &str) -> Option<Error>,
) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    let got = dest.store.get(&Path::from(key)).await?;
    let mut stream = got.into_stream();
    let part = out.with_extension("part");
    let mut file = tokio::fs::File::create(&part).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    drop(file);
    if let Some(e) = refuse(size, &hex(&hasher.finalize())) {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, out).await?;
    Ok(())
}

/// An etcd snapshot to migrate from, as a record: its key, size and time (it has no manifest:
/// its own trailing SHA-256 is checked by `cairn snapshot restore`, which refuses a file
/// without one).
pub async fn etcd_snapshot(dest: &Destination, key: &str) -> Result<BackupRecord, Error> {
    let meta = dest.store.head(&Path::from(key)).await?;
    Ok(BackupRecord {
        time: Time(jiff_of(meta.last_modified)),
        key: key.to_string(),
        size: meta.size as i64,
        revision: 0,
        sha256: String::new(),
        keys: None,
        hash: None,
        hash_compact_revision: None,
        encryption_key_id: None,
    })
}

/// Downloads an etcd snapshot into `out`, streaming; its size must be what the store says.
pub async fn fetch_etcd_snapshot(
    dest: &Destination,
    key: &str,
    out: &FsPath,
) -> Result<BackupRecord, Error> {
    let rec = etcd_snapshot(dest, key).await?;
    download(dest, key, out, |size, _| {
        (size as i64 != rec.size).then(|| {
            Error::Io(std::io::Error::other(format!(
                "etcd snapshot {key}: {size} bytes received, {} stored",
                rec.size
            )))
        })
    })
    .await?;
    Ok(rec)
}

/// Who started a backup run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOwner {
    /// The cluster's schedule, for this scheduled time.
    Schedule(Timestamp),
    /// An EtcdBackup, by UID.
    OnDemand(String),
}

impl RunOwner {
    /// The key its result is kept under until its reconcile collects it.
    fn result_key(&self, cluster: &str) -> String {
        match self {
            RunOwner::Schedule(_) => schedule_result_key(cluster),
            RunOwner::OnDemand(uid) => on_demand_result_key(uid),
        }
    }
}

fn schedule_result_key(cluster: &str) -> String {
    format!("schedule/{cluster}")
}

fn on_demand_result_key(uid: &str) -> String {
    format!("backup/{uid}")
}

/// The result of a finished backup and who started it.
pub type Finished = (RunOwner, Result<BackupRecord, String>);

#[derive(Default)]
struct RunsInner {
    /// Cluster (`namespace/name`) -> the owner of the backup running for it.
    running: std::collections::HashMap<String, RunOwner>,
    /// Results not collected yet, by [`RunOwner::result_key`].
    results: std::collections::HashMap<String, Finished>,
}

/// The backups in progress, at most one per cluster: a scheduled and an on-demand backup of the
/// same cluster never run at once. A finished backup frees its cluster at once; its result
/// waits for the reconcile of whoever started it.
#[derive(Clone, Default)]
pub struct Runs(Arc<std::sync::Mutex<RunsInner>>);

impl Runs {
    /// Who runs a backup of `cluster` now, if anyone.
    pub fn running(&self, cluster: &str) -> Option<RunOwner> {
        self.0.lock().unwrap().running.get(cluster).cloned()
    }

    /// Takes the result of a finished scheduled backup of `cluster`.
    pub fn take_scheduled(&self, cluster: &str) -> Option<Finished> {
        self.0
            .lock()
            .unwrap()
            .results
            .remove(&schedule_result_key(cluster))
    }

    /// Takes the result of the finished on-demand backup `uid`.
    pub fn take_on_demand(&self, uid: &str) -> Option<Finished> {
        self.0
            .lock()
            .unwrap()
            .results
            .remove(&on_demand_result_key(uid))
    }

    /// Starts `work` as the backup of `cluster`; false if one already runs.
    pub fn start<F>(&self, cluster: &str, owner: RunOwner, work: F) -> bool
    where
        F: std::future::Future<Output = Result<BackupRecord, String>> + Send + 'static,
    {
        {
            let mut inner = self.0.lock().unwrap();
            if inner.running.contains_key(cluster) {
                return false;
            }
            inner.running.insert(cluster.to_string(), owner.clone());
        }
        let runs = self.clone();
        let cluster = cluster.to_string();
        tokio::spawn(async move {
            // A panic in the work is a failed backup, not a cluster blocked forever.
            let result = tokio::spawn(work)
                .await
                .unwrap_or_else(|e| Err(format!("backup task failed: {e}")));
            let mut inner = runs.0.lock().unwrap();
            inner.running.remove(&cluster);
            inner
                .results
                .insert(owner.result_key(&cluster), (owner, result));
        });
        true
    }
}

/// Takes one backup and applies retention to the cluster's directory (retention failures are
/// logged, not fatal: the backup itself succeeded).
pub async fn backup_and_prune(
    endpoints: Vec<String>,
    access: crate::members::Access,
    dest: Destination,
    dir: String,
    retention: Option<RetentionSpec>,
    keep: Option<String>,
) -> Result<BackupRecord, String> {
    let now = Timestamp::now();
    let rec = stream_backup(&endpoints, &access, &dest, &dir, now)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(r) = retention {
        match apply_retention(&dest, &dir, &r, now, keep.as_deref()).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(?deleted, "retention deleted old backups")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention"),
        }
    }
    Ok(rec)
}

/// When a schedule is due next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Run now, for this scheduled time (the latest one that passed).
    Now(Timestamp),
    /// Not before this time.
    At(Timestamp),
}

fn chrono_of(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
        .unwrap_or_default()
}

fn jiff_of(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Parses a cron schedule (5 fields, or 6 with seconds first), in UTC.
pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    s.parse::<croner::Cron>()
        .map_err(|e| format!("invalid schedule {s:?}: {e}"))
}

/// Whether a backup is due: the first scheduled time after `last` (the last scheduled time
/// handled, or the cluster's creation). A schedule missed while the operator was down is due at
/// once; several missed ones make one backup, for the latest.
pub fn due(schedule: &croner::Cron, last: Timestamp, now: Timestamp) -> Due {
    let Ok(next) = schedule.find_next_occurrence(&chrono_of(last), false) else {
        return Due::At(Timestamp::MAX);
    };
    let next = jiff_of(next);
    if next > now {
        return Due::At(next);
    }
    let latest = schedule
        .find_previous_occurrence(&chrono_of(now), true)
        .map(jiff_of)
        .unwrap_or(next);
    Due::Now(latest.max(next))
}

/// How long until `until`, as a requeue: at least half a second, at most five minutes (a
/// schedule is looked at again at least that often).
pub fn wait_until(now: Timestamp, until: Timestamp) -> Duration {
    Duration::from_secs_f64(until.duration_since(now).as_secs_f64().clamp(0.5, 300.0))
}

/// How long to wait before retrying a failed backup: 10 s doubling up to 10 min.
pub fn retry_backoff(failures: i32) -> Duration {
    let exp = failures.clamp(1, 7) as u32 - 1;
    Duration::from_secs((10u64 << exp).min(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn object_names_sort_by_time_and_only_ours_parse() {
        let t = ts("2026-11-21T10:05:09Z");
        assert_eq!(object_name(t), "20261121T100509Z.snap");
        assert_eq!(parse_object_name("20261121T100509Z.snap"), Some(t));
        for not in [
            "20261121T100509Z.json",
            "notes.snap",
            "x20261121T100509Z.snap",
            "20261121T100509.snap",
        ] {
            assert_eq!(parse_object_name(not), None, "{not}");
        }
        assert_eq!(
            manifest_key("a/b/20261121T100509Z.snap"),
            "a/b/20261121T100509Z.json"
        );
    }

    #[test]
    fn retention_keeps_last_and_max_age_and_always_the_newest() {
        let now = ts("2026-11-21T12:00:00Z");
        let b: Vec<(String, Timestamp)> = (0..5)
            .map(|h| (format!("k{h}"), ts(&format!("2026-11-21T0{h}:00:00Z"))))
            .collect();
        let keep2 = RetentionSpec {
            keep_last: Some(2),
            max_age: None,
        };
        assert_eq!(retention_victims(&b, &keep2, now), vec!["k0", "k1", "k2"]);
        let age = RetentionSpec {
            keep_last: None,
            max_age: Some("10h".into()),
        };
        assert_eq!(retention_victims(&b, &age, now), vec!["k0", "k1"]);
        let both = RetentionSpec {
            keep_last: Some(4),
            max_age: Some("9h".into()),
        };
        assert_eq!(retention_victims(&b, &both, now), vec!["k0", "k1", "k2"]);
        let ancient = RetentionSpec {
            keep_last: None,
            max_age: Some("1s".into()),
        };
        assert_eq!(
            retention_victims(&b, &ancient, now),
            vec!["k0", "k1", "k2", "k3"]
        );
        assert!(retention_victims(&b, &RetentionSpec::default(), now).is_empty());
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d"), Some(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_age("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_age("10"), None);
        assert_eq!(parse_age(""), None);
    }

    #[test]
    fn schedules_due_and_missed() {
        let every6h = parse_schedule("0 */6 * * *").unwrap();
        let last = ts("2026-11-21T06:00:00Z");
        assert_eq!(
            due(&every6h, last, ts("2026-11-21T07:00:00Z")),
            Due::At(ts("2026-11-21T12:00:00Z"))
        );
        assert_eq!(
            due(&every6h, last, ts("2026-11-21T12:00:30Z")),
            Due::Now(ts("2026-11-21T12:00:00Z"))
        );
        // The operator was down for a day: one backup, for the latest missed time.
        assert_eq!(
            due(&every6h, last, ts("2026-11-22T13:00:00Z")),
            Due::Now(ts("2026-11-22T12:00:00Z"))
        );
        let every2s = parse_schedule("*/2 * * * * *").unwrap();
        assert_eq!(
            due(
                &every2s,
                ts("2026-11-21T06:00:00Z"),
                ts("2026-11-21T06:00:01Z")
            ),
            Due::At(ts("2026-11-21T06:00:02Z"))
        );
        assert!(parse_schedule("every day").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
    }

    #[test]
    fn backoff_doubles_to_ten_minutes() {
        let b: Vec<u64> = (1..=8).map(|f| retry_backoff(f).as_secs()).collect();
        assert_eq!(b, vec![10, 20, 40, 80, 160, 320, 600, 600]);
    }
}
