//! Member configuration from etcd's command-line flags and `ETCD_*`
//! environment variables, with etcd's defaults, plus the member and cluster
//! IDs derived from them exactly as etcd derives them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sha1::{Digest, Sha1};
use url::Url;

/// What `--version` prints: cairn's release, the etcd API version it speaks, and the data
/// formats it writes and reads.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use crate::storage::{DATA_FORMAT, OLDEST_DATA_FORMAT};
    format!(
        "{}\netcd API version: {}\ndata format: {DATA_FORMAT} (reads {OLDEST_DATA_FORMAT} to {DATA_FORMAT})",
        env!("CARGO_PKG_VERSION"),
        crate::server::ETCD_VERSION
    )
});

/// etcd-compatible flags. Every flag also reads `ETCD_<NAME>` (upper case,
/// dashes as underscores), as etcd does.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "cairn",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "An etcd v3 compatible key-value server"
)]
pub struct Flags {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: "${name}.etcd").
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<String>,
    /// List of URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// List of this member's client URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// List of URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (default: "${name}=${initial-advertise-peer-urls}").
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new", value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// Initial cluster token for the etcd cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// List of additional URLs to listen on that serve /metrics and /health.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,
    /// Interpret 'auto-compaction-retention' as a duration ('periodic') or a revision count ('revision').
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic", value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,
    /// Auto compaction retention: a duration ('1h', '30m'; a bare number means hours) for
    /// 'periodic', a revision count for 'revision'. 0 disables auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: usize,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,
    /// Duration of periodic watch progress notifications.
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_go_duration)]
    pub experimental_watch_progress_notify_interval: Duration,
    /// cairn: threads serving client connections, each a single-threaded
    /// runtime sharing the listen addresses (SO_REUSEPORT). 0: half the CPUs, at least 1.
    #[arg(long, env = "ETCD_EXPERIMENTAL_CLIENT_IO_THREADS", default_value_t = 0)]
    pub experimental_client_io_threads: usize,
    /// cairn: an `https://` peer URL also serves connections that do not start a TLS
    /// handshake, in plaintext. Such peers are not authenticated (as on an `http://` peer URL):
    /// `--peer-client-cert-auth` and `--peer-cert-allowed-cn` hold for TLS connections only.
    /// For moving a live cluster's peer traffic to or from TLS member by member; turn it off
    /// once every member's peer URL is `https://`.
    #[arg(long, env = "ETCD_EXPERIMENTAL_PEER_ACCEPT_PLAINTEXT", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub experimental_peer_accept_plaintext: bool,
    /// Force to create a new one member cluster: a member with data starts as the only voter
    /// of its cluster, keeping its member and cluster IDs and its data up to its commit index
    /// (entries past it are dropped; the other members are left behind). Every start with
    /// the flag does it again: remove it once the member runs. Ignored without data.
    #[arg(long, env = "ETCD_FORCE_NEW_CLUSTER", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub force_new_cluster: bool,
    /// cairn: `<name>:<token>`: as --force-new-cluster, on the member whose --name is <name>
    /// only, and once per <token> (the token done is kept in the data dir). One flag for every
    /// member of a StatefulSet, harmless on restarts. Empty: never.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_FORCE_NEW_CLUSTER_ONCE",
        default_value = ""
    )]
    pub experimental_force_new_cluster_once: String,
    /// Check the data's consistency with the peers' before serving clients: a member whose
    /// key-space hash at a revision differs from a peer's (same compaction) does not start.
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub experimental_initial_corrupt_check: bool,
    /// How often the leader checks the members' key-space hashes against its own; a member
    /// that differs gets a CORRUPT alarm. 0s: never.
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s", value_parser = parse_go_duration)]
    pub experimental_corrupt_check_time: Duration,
    /// Logger: 'zap' or 'capnslog' (accepted for compatibility; cairn logs with tracing).
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap", value_parser = ["zap", "capnslog"])]
    pub logger: String,
    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info", value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    /// Log outputs: 'stderr', 'stdout' or 'default' (stderr).
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,
    /// The v2 API is not served; only 'false' is accepted.
    #[arg(long, env = "ETCD_ENABLE_V2", default_value = "false", num_args = 0..=1, default_missing_value = "true",
          value_parser = parse_false_only)]
    pub enable_v2: bool,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE", default_value = "")]
    pub cert_file: String,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE", default_value = "")]
    pub key_file: String,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", default_value = "")]
    pub trusted_ca_file: String,
    /// Enable client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub client_cert_auth: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE", default_value = "")]
    pub peer_cert_file: String,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE", default_value = "")]
    pub peer_key_file: String,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", default_value = "")]
    pub peer_trusted_ca_file: String,
    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub peer_client_cert_auth: bool,
    /// Client TLS using generated certificates.
    #[arg(long, env = "ETCD_AUTO_TLS", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub auto_tls: bool,
    /// Peer TLS using generated certificates.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub peer_auto_tls: bool,
    /// The validity period of the client and peer certificates that are automatically generated
    /// by etcd when you specify ClientAutoTLS and PeerAutoTLS, the unit is year, and the default
    /// is 1.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,
    /// Allowed CN for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN", default_value = "")]
    pub peer_cert_allowed_cn: String,
    /// Comma-separated list of supported TLS cipher suites between client/server and peers
    /// (empty: Go's defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,
    /// Specify auth token: 'simple' or 'jwt,pub-key=<file>,priv-key=<file>,sign-method=<alg>[,ttl=<duration>]'.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// The lifetime in seconds of a simple auth token (renewed on every use).
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// Specify bcrypt algorithm cost factor for auth password hashing (4 to 31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
}

/// Go's `strconv.ParseBool`, as etcd's boolean flags take it.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

fn parse_false_only(s: &str) -> Result<bool, String> {
    match s {
        "false" | "0" => Ok(false),
        "true" | "1" => Err("the v2 API is not supported by cairn".into()),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

/// Parses a Go duration such as `10m`, `1h30m`, `500ms`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest == "0" {
        return Ok(total);
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(format!("missing unit in duration {s:?}"))?;
        let value: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => return Err(format!("unknown unit {unit:?} in duration {s:?}")),
        };
        total += Duration::from_secs_f64(value * secs);
        rest = &rest[u..];
    }
    Ok(total)
}

/// A validated member configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub data_dir: std::path::PathBuf,
    pub listen_client: Vec<SocketAddr>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer: Vec<SocketAddr>,
    pub advertise_peer_urls: Vec<String>,
    /// Member name to peer URLs, from `--initial-cluster`.
    pub initial_cluster: BTreeMap<String, Vec<String>>,
    pub initial_cluster_new: bool,
    pub initial_cluster_token: String,
    pub listen_metrics: Vec<SocketAddr>,
    /// Which `listen_metrics` addresses serve TLS (with the client port's certificates).
    pub listen_metrics_tls: Vec<bool>,
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    pub snapshot_count: u64,
    pub quota_backend_bytes: i64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub progress_notify_interval: Duration,
    pub log_level: String,
    pub auto_compaction: Option<AutoCompaction>,
    pub client_io_threads: usize,
    /// Which `listen_client` addresses serve TLS (an `https://` URL).
    pub listen_client_tls: Vec<bool>,
    /// The client port's TLS files, when any client URL is `https://`.
    pub client_tls: Option<TlsFiles>,
    /// Which `listen_peer` addresses serve TLS.
    pub listen_peer_tls: Vec<bool>,
    /// `--experimental-peer-accept-plaintext`: TLS peer addresses serve plaintext too.
    pub peer_accept_plaintext: bool,
    /// `--experimental-initial-corrupt-check`.
    pub initial_corrupt_check: bool,
    /// `--force-new-cluster`, or `--experimental-force-new-cluster-once` naming this member.
    pub force_new_cluster: ForceNewCluster,
    /// `--experimental-corrupt-check-time` (`None`: off).
    pub corrupt_check_every: Option<Duration>,
    /// The peer port's TLS files (`--peer-*`): served on `https://` peer URLs and presented
    /// when calling other members.
    pub peer_tls: Option<TlsFiles>,
    /// `--auth-token`: how tokens are issued (read when the member starts).
    pub auth_token: String,
    /// `--auth-token-ttl`, seconds.
    pub auth_token_ttl: u64,
    /// `--bcrypt-cost`; out of bcrypt's 4..=31 it is etcd's default, 10.
    pub bcrypt_cost: u32,
}

/// The TLS files of a port: `--cert-file`, `--key-file`, `--trusted-ca-file`,
/// `--client-cert-auth` (or the `--peer-*` ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// Client certificates are verified against it when they are sent.
    pub trusted_ca_file: Option<std::path::PathBuf>,
    /// A client certificate is required.
    pub client_cert_auth: bool,
    /// `--peer-cert-allowed-cn`: a member's certificate must name this CN, both ways.
    pub allowed_cn: Option<String>,
    /// `--auto-tls`/`--peer-auto-tls`: the certificate and key are made at start (if their
    /// files are not there yet), self-signed, and other members' are not verified (as etcd).
    pub self_signed: Option<SelfSigned>,
    /// `--cipher-suites`: Go's names of the TLS 1.2 cipher suites allowed (empty: all that
    /// rustls has; TLS 1.3's are not chosen, as in Go).
    pub cipher_suites: Vec<String>,
}

/// A self-signed certificate to make: for these hosts, valid this many years.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfSigned {
    pub hosts: Vec<String>,
    pub validity_years: u32,
}

/// What auto compaction keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions of history.
    Revision(i64),
}

fn parse_auto_compaction(
    mode: &str,
    retention: &str,
) -> Result<Option<AutoCompaction>, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "invalid auto-compaction-retention {retention:?} for mode {mode:?}"
        ))
    };
    let ac = match mode {
        "revision" => AutoCompaction::Revision(retention.parse::<i64>().map_err(|_| bad())?),
        _ => AutoCompaction::Periodic(match retention.parse::<u64>() {
            Ok(hours) => Duration::from_secs(hours * 3600),
            Err(_) => parse_go_duration(retention).map_err(|_| bad())?,
        }),
    };
    Ok(match ac {
        AutoCompaction::Revision(n) if n <= 0 => None,
        AutoCompaction::Periodic(d) if d.is_zero() => None,
        ac => Some(ac),
    })
}

/// A configuration error, reported as etcd reports them.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Whether this start forces a new one-member cluster from the member's data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ForceNewCluster {
    #[default]
    No,
    /// `--force-new-cluster`: on every start with data.
    Always,
    /// `--experimental-force-new-cluster-once` naming this member: once for this token.
    Once(String),
}

fn split_urls(flag: &str, s: &str) -> Result<Vec<Url>, ConfigError> {
    s.split(',')
        .filter(|u| !u.trim().is_empty())
        .map(|u| {
            let url = Url::parse(u.trim())
                .map_err(|e| ConfigError(format!("invalid value {u:?} for flag -{flag}: {e}")))?;
            match url.scheme() {
                "http" => Ok(url),
                "https" => Ok(url),
                "unixs" => Err(ConfigError(format!(
                    "{u}: unix sockets are not supported (flag -{flag})"
                ))),
                other => Err(ConfigError(format!(
                    "URL scheme must be http, https, unix, or unixs: {other}"
                ))),
            }
        })
        .collect()
}

fn url_string(u: &Url) -> String {
    // Url adds a trailing slash to an empty path; etcd prints URLs without it.
    u.as_str().trim_end_matches('/').to_string()
}

fn bind_addrs(flag: &str, urls: &[Url]) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out = Vec::new();
    for u in urls {
        let host = u
            .host_str()
            .ok_or_else(|| ConfigError(format!("{u}: no host in flag -{flag}")))?;
        let port = u
            .port()
            .ok_or_else(|| ConfigError(format!("{u}: missing port in flag -{flag}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = if host == "localhost" {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            host.parse()
                .map_err(|_| ConfigError(format!("expected IP in URL for binding ({u})")))?
        };
        out.push(SocketAddr::new(ip, port));
    }
    Ok(out)
}

impl Config {
    pub fn from_flags(f: Flags) -> Result<Self, ConfigError> {
        let client = split_urls("listen-client-urls", &f.listen_client_urls)?;
        let peer = split_urls("listen-peer-urls", &f.listen_peer_urls)?;
        let metrics = split_urls("listen-metrics-urls", &f.listen_metrics_urls)?;
        let adv_client: Vec<String> =
            split_urls("advertise-client-urls", &f.advertise_client_urls)?
                .iter()
                .map(url_string)
                .collect();
        let adv_peer: Vec<String> = split_urls(
            "initial-advertise-peer-urls",
            &f.initial_advertise_peer_urls,
        )?
        .iter()
        .map(url_string)
        .collect();
        let initial = f.initial_cluster.clone().unwrap_or_else(|| {
            adv_peer
                .iter()
                .map(|u| format!("{}={u}", f.name))
                .collect::<Vec<_>>()
                .join(",")
        });
        let mut initial_cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for item in initial.split(',').filter(|s| !s.is_empty()) {
            let (name, url) = item.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "invalid value {initial:?} for flag -initial-cluster"
                ))
            })?;
            let url = split_urls("initial-cluster", url)?;
            initial_cluster
                .entry(name.to_string())
                .or_default()
                .extend(url.iter().map(url_string));
        }
        let mine = initial_cluster.get(&f.name).cloned().unwrap_or_default();
        let mut a = adv_peer.clone();
        let mut b = mine.clone();
        a.sort();
        b.sort();
        if f.initial_cluster_state == "new" && a != b {
            return Err(ConfigError(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (\"{}\"(resolved from {:?}) != \"{}\"(resolved from {:?}))",
                f.name,
                mine.join(","),
                adv_peer.join(","),
                b.join(","),
                mine,
                a.join(","),
                adv_peer
            )));
        }
        let listen_client_tls: Vec<bool> = client.iter().map(|u| u.scheme() == "https").collect();
        let listen_peer_tls: Vec<bool> = peer.iter().map(|u| u.scheme() == "https").collect();
        let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
        let suites: Vec<String> = f
            .cipher_suites
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let files = |cert: &str, key: &str, ca: &str, auth: bool| match (path(cert), path(key)) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file,
                key_file,
                trusted_ca_file: path(ca),
                client_cert_auth: auth,
                allowed_cn: None,
                self_signed: None,
                cipher_suites: suites.clone(),
            }),
            _ => None,
        };
        let data_dir: std::path::PathBuf = f
            .data_dir
            .clone()
            .unwrap_or_else(|| format!("{}.etcd", f.name))
            .into();
        // etcd's --auto-tls/--peer-auto-tls: certificates made in <data-dir>/fixtures/<port>
        // for the hosts of the listen URLs, used only when no files are given.
        let auto = |on: bool, given: &Option<TlsFiles>, port: &str, urls: &[&Url]| {
            if !on || given.is_some() {
                return given.clone();
            }
            let dir = data_dir.join("fixtures").join(port);
            Some(TlsFiles {
                cert_file: dir.join("cert.pem"),
                key_file: dir.join("key.pem"),
                trusted_ca_file: None,
                client_cert_auth: false,
                allowed_cn: None,
                self_signed: Some(SelfSigned {
                    hosts: urls
                        .iter()
                        .filter_map(|u| u.host_str())
                        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                        .collect(),
                    validity_years: f.self_signed_cert_validity,
                }),
                cipher_suites: suites.clone(),
            })
        };
        let client_tls = files(
            &f.cert_file,
            &f.key_file,
            &f.trusted_ca_file,
            f.client_cert_auth,
        );
        let peer_tls = files(
            &f.peer_cert_file,
            &f.peer_key_file,
            &f.peer_trusted_ca_file,
            f.peer_client_cert_auth,
        )
        .map(|t| TlsFiles {
            allowed_cn: (!f.peer_cert_allowed_cn.is_empty())
                .then(|| f.peer_cert_allowed_cn.clone()),
            ..t
        });
        let client_hosts: Vec<&Url> = client.iter().chain(&metrics).collect();
        let client_tls = auto(f.auto_tls, &client_tls, "client", &client_hosts);
        let peer_hosts: Vec<&Url> = peer.iter().collect();
        let peer_tls = auto(f.peer_auto_tls, &peer_tls, "peer", &peer_hosts);
        if let Some(u) = metrics.iter().find(|u| u.scheme() == "https") {
            if client_tls.is_none() {
                return Err(ConfigError(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for metrics url {} with HTTPS scheme",
                    url_string(u)
                )));
            }
        }
        if let Some(u) = client.iter().find(|u| u.scheme() == "https") {
            if client_tls.is_none() {
                return Err(ConfigError(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme",
                    url_string(u)
                )));
            }
        }
        if let Some(u) = peer.iter().find(|u| u.scheme() == "https") {
            if peer_tls.is_none() {
                return Err(ConfigError(format!(
                    "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {} with HTTPS scheme",
                    url_string(u)
                )));
            }
        }
        for (t, flag) in [
            (&client_tls, "--client-cert-auth needs --trusted-ca-file"),
            (
                &peer_tls,
                "--peer-client-cert-auth needs --peer-trusted-ca-file",
            ),
        ] {
            if t.as_ref()
                .is_some_and(|t| t.client_cert_auth && t.trusted_ca_file.is_none())
            {
                return Err(ConfigError(format!(
                    "{flag} (the CA that client certificates are verified against)"
                )));
            }
        }
        // A request travels alone in a Raft entry at worst, and an entry
        // must fit a message between members with room to spare.
        const MAX_REQUEST_LIMIT: usize = 64 << 20;
        if f.max_request_bytes > MAX_REQUEST_LIMIT {
            return Err(ConfigError(format!(
                "--max-request-bytes {} is over cairn's limit of {MAX_REQUEST_LIMIT}",
                f.max_request_bytes
            )));
        }
        if !(1..=100).contains(&f.self_signed_cert_validity) {
            return Err(ConfigError(format!(
                "--self-signed-cert-validity {} is not between 1 and 100 (years)",
                f.self_signed_cert_validity
            )));
        }
        let force_new_cluster = match f.experimental_force_new_cluster_once.split_once(':') {
            _ if f.force_new_cluster => ForceNewCluster::Always,
            _ if f.experimental_force_new_cluster_once.is_empty() => ForceNewCluster::No,
            Some((name, token)) if !name.is_empty() && !token.is_empty() => {
                if name == f.name {
                    ForceNewCluster::Once(token.to_string())
                } else {
                    ForceNewCluster::No
                }
            }
            _ => {
                return Err(ConfigError(format!(
                    "invalid value {:?} for flag -experimental-force-new-cluster-once: expected <name>:<token>",
                    f.experimental_force_new_cluster_once
                )))
            }
        };
        if f.election_timeout < 5 * f.heartbeat_interval {
            return Err(ConfigError(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                f.election_timeout, f.heartbeat_interval
            )));
        }
        Ok(Self {
            data_dir,
            name: f.name,
            listen_client: bind_addrs("listen-client-urls", &client)?,
            listen_client_tls,
            client_tls,
            listen_peer_tls,
            peer_accept_plaintext: f.experimental_peer_accept_plaintext,
            initial_corrupt_check: f.experimental_initial_corrupt_check,
            force_new_cluster,
            corrupt_check_every: Some(f.experimental_corrupt_check_time).filter(|d| !d.is_zero()),
            peer_tls,
            advertise_client_urls: adv_client,
            listen_peer: bind_addrs("listen-peer-urls", &peer)?,
            advertise_peer_urls: adv_peer,
            initial_cluster,
            initial_cluster_new: f.initial_cluster_state == "new",
            initial_cluster_token: f.initial_cluster_token,
            listen_metrics: bind_addrs("listen-metrics-urls", &metrics)?,
            listen_metrics_tls: metrics.iter().map(|u| u.scheme() == "https").collect(),
            heartbeat: Duration::from_millis(f.heartbeat_interval),
            election_timeout: Duration::from_millis(f.election_timeout),
            snapshot_count: f.snapshot_count.max(1),
            quota_backend_bytes: if f.quota_backend_bytes <= 0 {
                2 << 30
            } else {
                f.quota_backend_bytes
            },
            max_request_bytes: f.max_request_bytes,
            max_txn_ops: f.max_txn_ops,
            progress_notify_interval: f.experimental_watch_progress_notify_interval,
            log_level: f.log_level,
            auto_compaction: parse_auto_compaction(
                &f.auto_compaction_mode,
                &f.auto_compaction_retention,
            )?,
            auth_token: f.auth_token,
            auth_token_ttl: f.auth_token_ttl,
            bcrypt_cost: if (4..=31).contains(&f.bcrypt_cost) {
                f.bcrypt_cost
            } else {
                crate::auth::DEFAULT_BCRYPT_COST
            },
            client_io_threads: match f.experimental_client_io_threads {
                0 => (std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    / 2)
                .max(1),
                n => n,
            },
        })
    }

    /// The smallest lease TTL: 1.5 election timeouts, in whole seconds (etcd's `minTTL`).
    pub fn min_lease_ttl(&self) -> i64 {
        ((3 * self.election_timeout.as_millis() as u64) / 2).div_ceil(1000) as i64
    }

    /// Member IDs of the initial cluster, by name.
    pub fn initial_member_ids(&self) -> BTreeMap<String, u64> {
        self.initial_cluster
            .iter()
            .map(|(name, urls)| (name.clone(), member_id(urls, &self.initial_cluster_token)))
            .collect()
    }

    /// The membership `--initial-cluster` describes, by member ID (client URLs are published
    /// by each member once it runs).
    pub fn initial_members(&self) -> BTreeMap<u64, crate::raft::Member> {
        self.initial_cluster
            .iter()
            .map(|(name, urls)| {
                (
                    member_id(urls, &self.initial_cluster_token),
                    crate::raft::Member {
                        name: name.clone(),
                        peer_urls: urls.clone(),
                        client_urls: Vec::new(),
                    },
                )
            })
            .collect()
    }
}

/// etcd's member ID: the first 8 bytes of SHA-1 over the sorted peer URLs
/// and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 has 20 bytes"))
}

/// etcd's cluster ID: the first 8 bytes of SHA-1 over the sorted member IDs.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 has 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let f = Flags::try_parse_from(std::iter::once("cairn").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::from_flags(f).map_err(|e| e.to_string())
    }

    #[test]
    fn etcd_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen_client, vec!["127.0.0.1:2379".parse().unwrap()]);
        assert_eq!(c.data_dir, std::path::PathBuf::from("default.etcd"));
        assert_eq!(
            c.initial_cluster["default"],
            vec!["http://localhost:2380".to_string()]
        );
        assert_eq!(c.min_lease_ttl(), 2);
    }

    #[test]
    fn ids_match_etcd() {
        // `etcd` with default flags reports member 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let c = parse(&[]).unwrap();
        let id = c.initial_member_ids()["default"];
        assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
    }

    #[test]
    fn client_tls_flags() {
        let https = "--listen-client-urls=https://127.0.0.1:2379";
        assert_eq!(
            parse(&[https]).unwrap_err(),
            "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"
        );
        let c = parse(&[
            https,
            "--cert-file=s.crt",
            "--key-file=s.key",
            "--trusted-ca-file=ca.crt",
            "--client-cert-auth",
        ])
        .unwrap();
        assert_eq!(c.listen_client_tls, vec![true]);
        let t = c.client_tls.unwrap();
        assert!(t.client_cert_auth);
        assert_eq!(t.trusted_ca_file, Some("ca.crt".into()));
        assert!(parse(&[
            https,
            "--cert-file=s.crt",
            "--key-file=s.key",
            "--client-cert-auth"
        ])
        .unwrap_err()
        .contains("--trusted-ca-file"));
        assert!(parse(&["--client-cert-auth=maybe"]).is_err());
        let peer = "--listen-peer-urls=https://127.0.0.1:2380";
        assert!(parse(&[peer])
            .unwrap_err()
            .contains("(--peer-cert-file, --peer-key-file) must be provided for peer url"));
        let c = parse(&[peer, "--peer-cert-file=p.crt", "--peer-key-file=p.key"]).unwrap();
        assert_eq!(c.listen_peer_tls, vec![true]);
        assert!(c.peer_tls.is_some() && c.client_tls.is_none());
        // Metrics over TLS need the client port's certificate, or --auto-tls.
        let metrics = "--listen-metrics-urls=https://127.0.0.1:2381";
        assert!(parse(&[metrics])
            .unwrap_err()
            .contains("must be provided for metrics url https://127.0.0.1:2381"));
        let c = parse(&[metrics, "--auto-tls", "--data-dir=d"]).unwrap();
        assert_eq!(c.listen_metrics_tls, vec![true]);
        let t = c.client_tls.unwrap();
        assert_eq!(
            t.cert_file,
            std::path::Path::new("d/fixtures/client/cert.pem")
        );
        let made = t.self_signed.unwrap();
        assert_eq!(made.hosts, vec!["localhost", "127.0.0.1"]);
        assert_eq!(made.validity_years, 1);
        assert!(parse(&["--auto-tls", "--self-signed-cert-validity=0"]).is_err());
        assert!(parse(&["--self-signed-cert-validity=101"]).is_err());
        assert!(parse(&["--max-request-bytes=268435456"])
            .unwrap_err()
            .contains("over cairn's limit"));
        // Given files win over --auto-tls, as in etcd.
        let c = parse(&["--auto-tls", "--cert-file=c.crt", "--key-file=c.key"]).unwrap();
        assert!(c.client_tls.unwrap().self_signed.is_none());
    }

    #[test]
    fn bad_flags() {
        assert!(parse(&["--nope"]).is_err());
        assert!(parse(&["--heartbeat-interval", "x"]).is_err());
        assert!(
            parse(&["--initial-cluster", "default=http://10.0.0.1:2380"])
                .unwrap_err()
                .contains("initial-cluster")
        );
        assert!(parse(&["--enable-v2"]).is_err());
        assert!(parse(&["--enable-v2=false"]).is_ok());
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse(&["--auto-compaction-retention", "2"])
                .unwrap()
                .auto_compaction,
            Some(AutoCompaction::Periodic(Duration::from_secs(7200)))
        );
        assert_eq!(
            parse(&[
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "1000"
            ])
            .unwrap()
            .auto_compaction,
            Some(AutoCompaction::Revision(1000))
        );
        assert_eq!(parse(&[]).unwrap().auto_compaction, None);
        assert!(parse(&[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1h"
        ])
        .is_err());
    }
}
