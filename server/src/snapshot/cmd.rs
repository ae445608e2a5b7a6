//! `cairn snapshot save | restore | status`: etcdctl's `snapshot save` and etcdutl's
//! `snapshot restore` / `snapshot status`, for cairn's snapshot files ([`crate::snapshot`]).
//!
//! Restore writes a data directory from which a member starts as the first member of a new
//! cluster (a new cluster ID from `--initial-cluster` and `--initial-cluster-token`), with the
//! snapshot's keys, values, leases and revisions; nothing of the old cluster's Raft state or
//! membership is kept. A file whose checksum does not match is refused before anything is
//! written. Restore also takes etcd's snapshot files ([`crate::snapshot::etcd`]): a migration
//! from etcd that keeps every revision.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

use crate::config::{Config, Flags};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::SnapshotRequest;
use crate::raft::{check_file, Install, KvState};
use crate::storage::{Engine, Identity};

/// `cairn snapshot ...`
#[derive(Parser, Debug)]
#[command(
    name = "cairn snapshot",
    about = "Saves, restores and inspects snapshots"
)]
pub struct SnapshotCommand {
    #[command(subcommand)]
    pub cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Streams a member's snapshot into FILE (written to FILE.part, verified, then renamed).
    Save {
        file: PathBuf,
        /// The one member to take the snapshot from.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoints: String,
    },
    /// Writes a data directory from FILE for the first member of a new cluster.
    Restore {
        file: PathBuf,
        /// Path to the data directory (default: "${name}.etcd"); must not exist yet.
        #[arg(long)]
        data_dir: Option<String>,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// Default: this member's URLs in --initial-cluster.
        #[arg(long)]
        initial_advertise_peer_urls: Option<String>,
        /// Do not verify the snapshot's SHA-256 checksum.
        #[arg(long)]
        skip_hash_check: bool,
        /// For init containers: do nothing when the data dir exists already or FILE does not;
        /// remove FILE once restored.
        #[arg(long)]
        if_needed: bool,
    },
    /// Checks that FILE restores into a member that opens and holds what the backup's record
    /// says: a scratch member with no peers is restored from it (its SHA-256 checked) and
    /// started, then its revision, key count and HashKV at that revision are compared with the
    /// given ones. The scratch data dir is removed afterwards. Exits non-zero on any mismatch.
    Verify {
        file: PathBuf,
        /// The revision the backup was taken at.
        #[arg(long)]
        revision: i64,
        /// The number of keys at that revision.
        #[arg(long)]
        keys: Option<i64>,
        /// HashKV at that revision, as the member that took the backup answered.
        #[arg(long)]
        hash: Option<u32>,
        /// The compaction revision that member's HashKV was taken at (it may have compacted
        /// since the snapshot): the scratch member is compacted to it before its own HashKV.
        #[arg(long)]
        hash_compact_revision: Option<i64>,
        /// Where the scratch member's data dir goes (default: beside FILE).
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
    },
    /// Prints a snapshot's hash, revision, number of keys (revisions) and size.
    Status {
        file: PathBuf,
        /// simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
}

/// Runs a snapshot subcommand; returns what to print.
pub async fn run(cmd: SnapshotCmd) -> Result<String> {
    match cmd {
        SnapshotCmd::Save { file, endpoints } => save(&endpoints, &file).await,
        SnapshotCmd::Restore {
            file,
            data_dir,
            name,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check,
            if_needed,
        } => {
            let advertise = initial_advertise_peer_urls.unwrap_or_else(|| {
                initial_cluster
                    .split(',')
                    .filter_map(|e| e.split_once('='))
                    .filter(|(n, _)| *n == name)
                    .map(|(_, u)| u)
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let mut args = vec![
                "cairn".to_string(),
                format!("--name={name}"),
                format!("--initial-cluster={initial_cluster}"),
                format!("--initial-cluster-token={initial_cluster_token}"),
                format!("--initial-advertise-peer-urls={advertise}"),
            ];
            if let Some(d) = &data_dir {
                args.push(format!("--data-dir={d}"));
            }
            let flags =
                Flags::try_parse_from(args).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let cfg =
                Config::from_flags(flags).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            if if_needed {
                if cfg.data_dir.exists() {
                    return Ok(format!(
                        "{} exists: nothing to restore",
                        cfg.data_dir.display()
                    ));
                }
                if !file.exists() {
                    return Ok(format!(
                        "{} does not exist: nothing to restore",
                        file.display()
                    ));
                }
            }
            let out = restore(&file, &cfg, skip_hash_check)?;
            if if_needed {
                std::fs::remove_file(&file)
                    .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))?;
            }
            Ok(out)
        }
        SnapshotCmd::Verify {
            file,
            revision,
            keys,
            hash,
            hash_compact_revision,
            scratch_dir,
        } => {
            let scratch = scratch_dir.unwrap_or_else(|| {
                let mut name = file.file_name().unwrap_or_default().to_os_string();
                name.push(format!(".verify.{}", std::process::id()));
                file.with_file_name(name)
            });
            let expected = Expected {
                revision,
                keys,
                hash,
                hash_compact_revision,
            };
            let result = verify(&file, &scratch, &expected).await;
            let _ = std::fs::remove_dir_all(&scratch);
            result
        }
        SnapshotCmd::Status { file, write_out } => {
            let st = status(&file)?;
            st.render(&write_out)
        }
    }
}

/// Streams the snapshot of the member at `endpoint` into `file`.
pub async fn save(endpoint: &str, file: &Path) -> Result<String> {
    let endpoints: Vec<&str> = endpoint.split(',').filter(|e| !e.is_empty()).collect();
    if endpoints.len() != 1 {
        return Err(Error::InvalidArgument(
            "snapshot must be requested to one selected node, not multiple".into(),
        ));
    }
    let url = if endpoints[0].contains("://") {
        endpoints[0].to_string()
    } else {
        format!("http://{}", endpoints[0])
    };
    let channel = crate::raft::connect(&url, None)?;
    let mut client = MaintenanceClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|s| Error::Internal(format!("{url}: {}", s.message())))?
        .into_inner();
    let part = file.with_extension(
        file.extension()
            .map(|e| format!("{}.part", e.to_string_lossy()))
            .unwrap_or_else(|| "part".into()),
    );
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", part.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&part).map_err(io)?);
    // The checksum is computed on the way: everything but the last 32 bytes is hashed.
    let mut hasher = Sha256::new();
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    let mut size = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| Error::Internal(format!("{url}: {}", s.message())))?
    {
        size += msg.blob.len() as u64;
        out.write_all(&msg.blob).map_err(io)?;
        tail.extend_from_slice(&msg.blob);
        if tail.len() > 32 {
            let keep = tail.split_off(tail.len() - 32);
            hasher.update(&tail);
            tail = keep;
        }
    }
    let file_handle = out.into_inner().map_err(|e| io(e.into_error()))?;
    file_handle.sync_all().map_err(io)?;
    if tail.len() != 32 || hasher.finalize().as_slice() != tail.as_slice() {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Internal(
            "snapshot: sha256 checksum mismatch in the received stream".into(),
        ));
    }
    std::fs::rename(&part, file).map_err(io)?;
    Ok(format!(
        "Snapshot saved at {} ({size} bytes)",
        file.display()
    ))
}

/// What a backup was recorded to hold when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub revision: i64,
    pub keys: Option<i64>,
    pub hash: Option<u32>,
    /// The compaction revision `hash` was taken at.
    pub hash_compact_revision: Option<i64>,
}

/// Restores `file` into `scratch` (which must not exist), starts a member on it with no peers
/// and compares what it holds with `expected`.
pub async fn verify(file: &Path, scratch: &Path, expected: &Expected) -> Result<String> {
    let args = [
        "cairn".to_string(),
        "--name=verify".to_string(),
        format!("--data-dir={}", scratch.display()),
        "--initial-cluster=verify=http://127.0.0.1:2380".to_string(),
        "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_string(),
        "--initial-cluster-token=cairn-verify".to_string(),
    ];
    let flags = Flags::try_parse_from(args).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let cfg = Config::from_flags(flags).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    restore(file, &cfg, false)?;
    // The scratch member takes no members: the Raft snapshot a restored member makes of its
    // data for them (a full copy) is not wanted.
    {
        let engine = Engine::open(&cfg.data_dir.join("member").join("cairn"))?;
        engine.raft_put(crate::storage::RESTORED_NEEDS_SNAPSHOT, &false)?;
    }
    let server = crate::server::EtcdServer::start(cfg).await?;
    let checked = check_restored(&server, expected).await;
    // Closed before the caller removes the scratch dir: the database's last holder gone (its
    // background work stopped), then dropped.
    let engine = server.state.engine.clone();
    server.shutdown().await;
    drop(server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::sync::Arc::strong_count(&engine) > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(engine);
    let (revision, keys, hash) = checked?;
    let mut wrong = Vec::new();
    if revision != expected.revision {
        wrong.push(format!(
            "revision {revision}, recorded {}",
            expected.revision
        ));
    }
    if let Some(k) = expected.keys.filter(|k| *k != keys) {
        wrong.push(format!("{keys} keys, recorded {k}"));
    }
    if let Some(h) = expected.hash.filter(|h| *h != hash) {
        wrong.push(format!("HashKV {hash}, recorded {h}"));
    }
    if !wrong.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "backup {} does not hold what was recorded when it was taken: {}",
            file.display(),
            wrong.join("; ")
        )));
    }
    Ok(format!(
        "verified {}: it restores and opens; revision {revision}, {keys} keys, HashKV {hash} at {revision}{}",
        file.display(),
        if expected.hash.is_none() {
            " (no hash recorded to compare)"
        } else {
            ", as recorded"
        }
    ))
}

/// The restored member's (revision, keys at it, HashKV at it).
async fn check_restored(
    server: &crate::server::EtcdServer,
    expected: &Expected,
) -> Result<(i64, i64, u32)> {
    let revision = server.state.store.read().revision();
    let at = expected.revision.min(revision);
    let count = server
        .state
        .range(&crate::proto::etcdserverpb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: at,
            count_only: true,
            serializable: true,
            ..Default::default()
        })?
        .count;
    // The member that took the backup may have compacted between the snapshot and its HashKV
    // (HashKV covers the revisions after the compaction): the scratch member does the same.
    let compacted = server.state.store.read().compacted();
    if let Some(c) = expected
        .hash_compact_revision
        .filter(|c| *c > compacted && *c <= revision)
    {
        server.wait_leader().await?;
        server
            .propose_as::<crate::proto::etcdserverpb::CompactionResponse>(
                crate::proto::raftpb::internal_request::Request::Compaction(
                    crate::proto::etcdserverpb::CompactionRequest {
                        revision: c,
                        physical: false,
                    },
                ),
                None,
            )
            .await?;
    }
    let hash = server.hash_kv(at).await?.hash;
    Ok((revision, count, hash))
}

/// Restores `file` into `cfg.data_dir` for member `cfg.name` of the new cluster
/// `cfg.initial_cluster`.
pub fn restore(file: &Path, cfg: &Config, skip_hash_check: bool) -> Result<String> {
    if !crate::snapshot::etcd::is_etcd_snapshot(file)? {
        return restore_cairn(file, cfg, skip_hash_check);
    }
    // An etcd snapshot: turned into a cairn snapshot file beside the data dir, then restored
    // as one (the conversion checked the etcd file's hash; the new file is not checked again).
    if cfg.data_dir.exists() {
        return Err(Error::InvalidArgument(format!(
            "data-dir {:?} exists",
            cfg.data_dir.display().to_string()
        )));
    }
    // The checks of a restore that need no file, before a conversion that may take minutes.
    if !cfg.initial_member_ids().contains_key(&cfg.name) {
        return Err(Error::InvalidArgument(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            cfg.name
        )));
    }
    // Beside the data dir (same file system), a name of this run's own.
    let parent = cfg
        .data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", parent.display())))?;
    let base = cfg
        .data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let converted = parent.join(format!(".{base}.from-etcd.{}.snap", std::process::id()));
    let result = crate::snapshot::etcd::convert(file, &converted, !skip_hash_check)
        .and_then(|c| Ok((c, restore_cairn(&converted, cfg, true)?)));
    let _ = std::fs::remove_file(&converted);
    let (c, done) = result?;
    Ok(format!(
        "{done} from an etcd snapshot: {} revisions (compacted at {}), {} leases, {} users, {} roles{}",
        c.records,
        c.compacted,
        c.leases,
        c.users,
        c.roles,
        if c.auth_enabled { ", auth enabled" } else { "" }
    ))
}

/// [`restore`] of a cairn snapshot file.
fn restore_cairn(file: &Path, cfg: &Config, skip_hash_check: bool) -> Result<String> {
    // The whole file is checked before anything is written, and read piece by piece.
    let revision = check_file(
        file,
        Install::Restore {
            check_hash: !skip_hash_check,
        },
    )?
    .revision;
    if cfg.data_dir.exists() {
        return Err(Error::InvalidArgument(format!(
            "data-dir {:?} exists",
            cfg.data_dir.display().to_string()
        )));
    }
    let ids = cfg.initial_member_ids();
    let member_id = *ids.get(&cfg.name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            cfg.name
        ))
    })?;
    let all: Vec<u64> = ids.values().copied().collect();
    // Written under a temporary name and renamed, so a crash never leaves a half-restored
    // data dir that a member would start from.
    let tmp = cfg.data_dir.with_extension("restoring");
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = tmp.join("member").join("cairn");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
    {
        let engine = Engine::open(&dir)?;
        engine.save_identity(&Identity {
            cluster_id: crate::config::cluster_id(&all),
            member_id,
        })?;
        engine.raft_put(crate::storage::RESTORED_NEEDS_SNAPSHOT, &true)?;
        engine.raft_put(crate::storage::RESTORED_MEMBERS, &cfg.initial_members())?;
        let state = KvState::open(engine, cfg.min_lease_ttl(), member_id)?;
        // Nothing of the old cluster's Raft position, membership or alarms: the member starts
        // a new Raft log with the new membership, on top of the restored keys.
        state.install_file(file, Install::Restore { check_hash: false }, None)?;
    }
    std::fs::rename(&tmp, &cfg.data_dir)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", cfg.data_dir.display())))?;
    Ok(format!(
        "restored snapshot (revision {revision}) into {} for member {:x} of cluster {:x}",
        cfg.data_dir.display(),
        member_id,
        crate::config::cluster_id(&all)
    ))
}

/// What `snapshot status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStatus {
    /// CRC-32 (IEEE) of the snapshot's content.
    pub hash: u32,
    pub revision: i64,
    /// Key revisions in the snapshot (etcd counts its backend's keys the same way).
    pub total_key: usize,
    pub total_size: u64,
}

impl SnapshotStatus {
    fn render(&self, format: &str) -> Result<String> {
        let size = humanize_bytes(self.total_size);
        match format {
            "simple" => Ok(format!(
                "{:x}, {}, {}, {}",
                self.hash, self.revision, self.total_key, size
            )),
            "json" => Ok(format!(
                "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
                self.hash, self.revision, self.total_key, self.total_size
            )),
            "table" => {
                let cols = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
                let vals = [
                    format!("{:x}", self.hash),
                    self.revision.to_string(),
                    self.total_key.to_string(),
                    size,
                ];
                let widths: Vec<usize> = cols
                    .iter()
                    .zip(&vals)
                    .map(|(c, v)| c.len().max(v.len()) + 2)
                    .collect();
                let line = widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("+");
                let row = |cells: Vec<String>| {
                    cells
                        .iter()
                        .zip(&widths)
                        .map(|(c, w)| format!("{c:^w$}"))
                        .collect::<Vec<_>>()
                        .join("|")
                };
                Ok(format!(
                    "+{line}+\n|{}|\n+{line}+\n|{}|\n+{line}+",
                    row(cols.iter().map(|c| c.to_string()).collect()),
                    row(vals.to_vec())
                ))
            }
            other => Err(Error::InvalidArgument(format!(
                "unknown output format {other:?} (simple, table, json)"
            ))),
        }
    }
}

/// Reads and verifies a snapshot file, piece by piece.
pub fn status(file: &Path) -> Result<SnapshotStatus> {
    use std::io::{Read, Seek, SeekFrom};
    if crate::snapshot::etcd::is_etcd_snapshot(file)? {
        return crate::snapshot::etcd::status(file);
    }
    let open = || {
        std::fs::File::open(file)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", file.display())))
    };
    let io = |e: std::io::Error| Error::InvalidArgument(format!("{}: {e}", file.display()));
    let mut f = open()?;
    let total_size = f.metadata().map_err(io)?.len();
    let (at, len) = crate::snapshot::locate_payload(&mut f, total_size, true)?;
    f.seek(SeekFrom::Start(at)).map_err(io)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut payload = std::io::BufReader::with_capacity(1 << 20, f.take(len));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = payload.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let mut f = open()?;
    f.seek(SeekFrom::Start(at)).map_err(io)?;
    let (reader, meta) =
        crate::snapshot::PayloadReader::new(std::io::BufReader::new(f.take(len)), len)?;
    Ok(SnapshotStatus {
        hash: hasher.finalize(),
        revision: meta.revision,
        total_key: reader.records() as usize,
        total_size,
    })
}

/// Sizes as etcdctl prints them (go-humanize's SI units).
fn humanize_bytes(n: u64) -> String {
    if n < 10 {
        return format!("{n} B");
    }
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let v = n as f64 / 1000f64.powi(e as i32);
    if v < 10.0 {
        format!("{v:.1} {}", units[e])
    } else {
        format!("{v:.0} {}", units[e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_etcdctl_prints_them() {
        assert_eq!(humanize_bytes(0), "0 B");
        assert_eq!(humanize_bytes(512), "512 B");
        assert_eq!(humanize_bytes(20480), "20 kB");
        assert_eq!(humanize_bytes(2_100_000), "2.1 MB");
    }

    #[test]
    fn status_table() {
        let st = SnapshotStatus {
            hash: 0xfe01cf57,
            revision: 10,
            total_key: 7,
            total_size: 2_100_000,
        };
        assert_eq!(st.render("simple").unwrap(), "fe01cf57, 10, 7, 2.1 MB");
        assert_eq!(
            st.render("table").unwrap(),
            "+----------+----------+------------+------------+\n\
             |   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n\
             +----------+----------+------------+------------+\n\
             | fe01cf57 |    10    |     7      |   2.1 MB   |\n\
             +----------+----------+------------+------------+"
        );
        assert!(st.render("yaml").is_err());
    }
}
