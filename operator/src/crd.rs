//! The `EtcdCluster` custom resource (group `cairn.dev`, version `v1alpha1`): spec, status and
//! conditions. Pure types and small helpers; nothing here talks to Kubernetes or to members.
//!
//! The schema is generated from these types (`crdgen`), so the API server itself refuses bad
//! objects: `size` outside 1..9, storage sizes that are not quantities, unknown enum values.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Kubernetes quantity syntax (`resource.Quantity`): `1Gi`, `500M`, `0.5`, `1e3`.
pub const QUANTITY_PATTERN: &str =
    r"^([+-]?[0-9]+(\.[0-9]*)?|[+-]?\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$";

/// Desired state of a cairn cluster.
// Each `printcolumn(...)` repeats `type_ = …`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "EtcdCluster",
    plural = "etcdclusters",
    shortname = "etcd",
    category = "cairn",
    namespaced,
    status = "EtcdClusterStatus",
    derive = "PartialEq",
    scale = r#"{"specReplicasPath": ".spec.size", "statusReplicasPath": ".status.size"}"#,
    doc = "An etcd-compatible cairn cluster: a StatefulSet of members, their Services and a PodDisruptionBudget.",
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyMembers"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EtcdClusterSpec {
    /// Number of voting members. Even sizes are allowed but tolerate no more failures than the
    /// odd size below them.
    #[serde(default = "default_size")]
    #[schemars(range(min = 1, max = 9))]
    pub size: i32,
    /// Container image of cairn; wins over `version`. Default: the cairn image of `version`,
    /// else of the operator's own release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The cairn release to run (`0.2.0`): the operator's cairn image repository with this tag.
    /// Changing it upgrades (or reverts) the members one at a time, followers first, each
    /// healthy and caught up before the next; an upgrade whose release cannot read the data
    /// format the members keep is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9A-Za-z_][0-9A-Za-z_.-]{0,127}$"))]
    pub version: Option<String>,
    /// How changes of the members' pods (a new version or image, resources, ...) roll out.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// How members are added when `size` grows.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Persistent storage: one PersistentVolumeClaim per member.
    #[serde(default)]
    pub storage: StorageSpec,
    /// CPU and memory of each member's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// How members are spread across the topology (by default one per node, preferred).
    #[serde(default)]
    pub anti_affinity: AntiAffinitySpec,
    /// Additions to the members' pods.
    #[serde(default)]
    pub pod_template: PodTemplateSpec,
    /// The PodDisruptionBudget that keeps voluntary disruptions from breaking quorum.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,
    /// The members' NetworkPolicy: the peer port only for members and the operator; the client
    /// port open unless `clients` says who may reach it.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// While true the operator changes nothing (it still reports status).
    #[serde(default)]
    pub paused: bool,
    /// Scheduled backups to object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// How a new cluster starts: empty, or from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
    /// etcd's authentication, managed: the root user and its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// TLS of client and peer traffic, managed: certificates made by the operator, by
    /// cert-manager, or given in Secrets. Without it members serve plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Settings of the members (cairn's flags, etcd's names). A change rolls out one member at
    /// a time.
    #[serde(default)]
    pub server: ServerSpec,
    /// Scheduled maintenance of the members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceSpec>,
    /// What happens when a majority of the voters is lost.
    #[serde(default)]
    pub recovery: RecoverySpec,
}

/// Recovery from quorum loss: when a majority of the voters cannot be reached, the cluster
/// serves nothing and no membership change can be made. The operator can then restart the
/// member with the most data as a one-member cluster from its own data (`--force-new-cluster`:
/// member and cluster IDs kept, its data up to its commit index kept, writes it had not seen
/// lost), after deleting the other members' pods and volumes so that they cannot come back and
/// form a second cluster; they then join again as new members, one at a time.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// `Manual` (default): only when the annotation `cairn.dev/recover` is set to a new value
    /// (a token of 1-63 letters, digits, `.`, `_` or `-`, acted on once; one set while a
    /// quorum answers is used up without effect). `Automatic`: also once a majority of the voters has not
    /// answered for `after` and none of their pods is merely Pending (it may come back with its
    /// data).
    #[serde(default)]
    pub quorum_loss: QuorumLossMode,
    /// How long a majority of the voters must be unreachable before an automatic recovery: a
    /// number with a unit, `s`, `m` or `h` (default `5m`; at least `10s` is waited).
    #[serde(default = "default_recovery_after")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub after: String,
}

impl RecoveryStatus {
    /// Whether `token` was acted on or used up already.
    pub fn used(&self, token: &str) -> bool {
        self.last_token.as_deref() == Some(token) || self.used_tokens.iter().any(|t| t == token)
    }
}

impl Default for RecoverySpec {
    fn default() -> Self {
        RecoverySpec {
            quorum_loss: QuorumLossMode::default(),
            after: default_recovery_after(),
        }
    }
}

fn default_recovery_after() -> String {
    "5m".to_string()
}

/// Who starts a quorum-loss recovery.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuorumLossMode {
    /// Only the annotation `cairn.dev/recover=<token>`.
    #[default]
    Manual,
    /// The operator, after `after`; the annotation too.
    Automatic,
}

/// The annotation that asks for a quorum-loss recovery now: its value is a token, acted on once
/// (set a new value for another recovery).
pub const RECOVER_ANNOTATION: &str = "cairn.dev/recover";

/// The annotation that asks, when no member answers, to discard every member's volume and
/// start the cluster again from the latest verified backup: its value is a token, acted on once.
pub const RECOVER_FROM_BACKUP_ANNOTATION: &str = "cairn.dev/recover-from-backup";

/// Quorum-loss recovery as it went.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryStatus {
    /// When the operator first saw a majority of the voters unreachable; cleared once a quorum
    /// answers again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum_lost_since: Option<Time>,
    /// Why no recovery is made now (while the quorum is lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The recovery under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<RecoveryRun>,
    /// The token of the last recovery made (an annotation's, or the operator's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token: Option<String>,
    /// When the last recovery finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovered: Option<Time>,
    /// The highest applied index a member reported when the loss was first seen: a member
    /// that applies more since shows a quorum exists that the operator cannot reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at_loss: Option<u64>,
    /// Annotation tokens used up without a recovery (set while a quorum answered), newest
    /// last, at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_tokens: Vec<String>,
    /// The backup the cluster was last started again from (its members' template keeps
    /// restoring from it, as a cluster bootstrapped from a backup does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from_backup: Option<FromBackup>,
}

/// One quorum-loss recovery.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryRun {
    /// What started it: the annotation's token, or `auto-<time the quorum was lost>`.
    pub token: String,
    /// The member restarted as a one-member cluster.
    pub survivor: String,
    /// Its member ID (hex).
    pub survivor_id: String,
    /// Its applied index when it was chosen (the highest of the members that answered).
    pub applied_index: u64,
    /// The highest revision any member had reported before the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_revision: Option<i64>,
    pub started: Time,
    /// The step it is at.
    pub phase: RecoveryPhase,
    /// Since when it is at that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,
    /// The UIDs of the pods and claims deleted by the fencing, waited for until they are gone
    /// (unset until the fencing started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Vec<String>>,
    /// Whether it was reported as stuck.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stuck: bool,
    /// No member had data: the cluster starts again from this verified backup (`survivor` is
    /// then the member that restores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<BackupRecord>,
    /// Where that backup is (`spec.backup.destination` when the recovery started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<BackupDestination>,
}

/// The steps of a quorum-loss recovery, in order.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RecoveryPhase {
    /// Deleting every other member's pod and volume.
    Fencing,
    /// Restarting the survivor with `--force-new-cluster` (once, by token).
    Restarting,
    /// Waiting for the survivor to lead alone.
    Forcing,
    /// No member had data: the StatefulSet is made again with its first member restoring the
    /// latest verified backup, as a cluster that starts from a backup.
    Rebootstrapping,
}

/// Scheduled maintenance of the members.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceSpec {
    /// Defragmentation: one member at a time, followers first, the leader last, only while
    /// every voter is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defrag: Option<DefragSpec>,
}

/// When the members are defragmented.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragSpec {
    /// A cron expression in UTC, e.g. `0 3 * * 0`.
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// Start no run (one under way finishes).
    #[serde(default)]
    pub suspend: bool,
}

/// Scheduled maintenance as it went.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceStatus {
    /// A defragmentation run under way: when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defrag_started: Option<Time>,
    /// The members (IDs, hex) the run under way, or the last one, defragmented.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub defragmented: Vec<String>,
    /// When the last run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_defrag: Option<Time>,
    /// The scheduled time of the last run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_defrag_schedule: Option<Time>,
    /// When the next run is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_defrag: Option<Time>,
}

/// Settings of the members, as cairn's (etcd's) flags.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// `--auto-compaction-mode`: `periodic` (default) or `revision`.
    #[serde(default = "default_compaction_mode")]
    #[schemars(regex(pattern = r"^(periodic|revision)$"))]
    pub auto_compaction_mode: String,
    /// `--auto-compaction-retention`: a duration (`1h`, the default; `30m`) or hours for
    /// `periodic`, revisions for `revision`; `0` turns compaction off.
    #[serde(default = "default_compaction_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h)?$"))]
    pub auto_compaction_retention: String,
    /// `--quota-backend-bytes` (cairn's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub quota_backend_bytes: Option<i64>,
    /// `--snapshot-count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub snapshot_count: Option<i64>,
    /// `--heartbeat-interval`, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub heartbeat_interval: Option<i64>,
    /// `--election-timeout`, milliseconds (at least five heartbeats, as etcd requires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub election_timeout: Option<i64>,
    /// `--max-request-bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_request_bytes: Option<i64>,
    /// `--log-level`: `debug`, `info`, `warn` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(debug|info|warn|error)$"))]
    pub log_level: Option<String>,
    /// `--experimental-initial-corrupt-check`: a member whose data differs from its peers'
    /// does not start, and the operator replaces it (cairn 0.2.0 and later; off by default,
    /// so that members on 0.1.0, which lacks the flag, start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub initial_corrupt_check: bool,
    /// `--experimental-corrupt-check-time`: how often the leader compares the members' data
    /// (`30m`, `1h`); a member that differs gets a CORRUPT alarm and the operator replaces it.
    /// Unset: never (cairn 0.2.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub corrupt_check_time: Option<String>,
    /// Further flags (`--name=value` or `--flag`), an escape hatch: checked against cairn's
    /// flags at reconcile time; the flags the operator sets itself (names, URLs, data dir,
    /// cluster, TLS) are refused. Refused arguments are left out and said in the `Server`
    /// condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            auto_compaction_mode: default_compaction_mode(),
            auto_compaction_retention: default_compaction_retention(),
            quota_backend_bytes: None,
            snapshot_count: None,
            heartbeat_interval: None,
            election_timeout: None,
            max_request_bytes: None,
            log_level: None,
            initial_corrupt_check: false,
            corrupt_check_time: None,
            extra_args: Vec::new(),
        }
    }
}

fn default_compaction_mode() -> String {
    "periodic".to_string()
}

fn default_compaction_retention() -> String {
    "1h".to_string()
}

/// TLS of a cluster's client traffic (port 2379) and peer traffic (port 2380).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Serve TLS (default true). Turning it on or off on a live cluster moves the members one at
    /// a time, quorum kept: peer URLs change from `http://` to `https://` (or back) through
    /// MemberUpdate while the members accept both.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the members' certificate for clients comes from.
    #[serde(default)]
    pub client: TlsSide,
    /// Where the members' certificate for each other comes from.
    #[serde(default)]
    pub peer: TlsSide,
    /// Clients must present a certificate signed by the client CA (`--client-cert-auth`,
    /// default true). Health probes then use a plain metrics port (2381).
    #[serde(default = "yes")]
    pub client_cert_auth: bool,
    /// `Operator` mode: lifetime of the certificates issued (default `2160h`, 90 days).
    #[serde(default = "default_certificate_lifetime")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub certificate_lifetime: String,
    /// `Operator` mode: lifetime of the cluster's CA (default `43800h`, 5 years).
    #[serde(default = "default_ca_lifetime")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub ca_lifetime: String,
    /// `Operator` mode: a certificate (and the CA) is renewed after this percentage of its
    /// lifetime (default 66: two thirds, leaving a third to notice and fix a failed renewal).
    /// A replaced CA stays trusted next to the new one until it expires.
    #[serde(default = "default_renew_percent")]
    #[schemars(range(min = 10, max = 95))]
    pub renew_at_percent: i32,
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec {
            enabled: true,
            client: TlsSide::default(),
            peer: TlsSide::default(),
            client_cert_auth: true,
            certificate_lifetime: default_certificate_lifetime(),
            ca_lifetime: default_ca_lifetime(),
            renew_at_percent: default_renew_percent(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_certificate_lifetime() -> String {
    "2160h".to_string()
}

fn default_ca_lifetime() -> String {
    "43800h".to_string()
}

fn default_renew_percent() -> i32 {
    66
}

/// Where one side's certificates come from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSide {
    #[serde(default)]
    pub mode: TlsMode,
    /// `Secret` mode: a Secret in the cluster's namespace with `tls.crt` and `tls.key` (the
    /// members' certificate: valid for every member's DNS name under the peer Service and, on
    /// the client side, the client Service's names; with the clientAuth usage too, since members
    /// and the operator present it as clients) and `ca.crt` (the CAs trusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// `CertManager` mode: the Issuer (same namespace) or ClusterIssuer that signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// Who makes a side's certificates.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TlsMode {
    /// The operator: a CA per cluster, member and client certificates, renewal, CA rollover.
    #[default]
    Operator,
    /// cert-manager: the operator creates `Certificate` objects and mounts their Secrets.
    CertManager,
    /// Secrets the user provides and renews (`secretName`).
    Secret,
}

/// A cert-manager issuer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    #[schemars(regex(pattern = r"^(Issuer|ClusterIssuer)$"))]
    pub kind: String,
    /// Default `cert-manager.io`.
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".to_string()
}

fn default_issuer_group() -> String {
    "cert-manager.io".to_string()
}

/// Authentication of a cluster's clients (etcd's users and roles).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Turn auth on: the operator creates the `root` user (with the `root` role) with the
    /// password of `rootSecret`, enables auth and makes its own calls as root. Setting it back to
    /// false turns auth off again; users and roles are left as they are (they are the users'
    /// business, through etcdctl).
    #[serde(default)]
    pub enabled: bool,
    /// A Secret in the cluster's namespace whose key `password` is root's password. Without
    /// one, the operator creates `<cluster>-root` with a generated password (kept when the
    /// EtcdCluster is deleted, as the members' volumes are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_secret: Option<String>,
}

/// How the operator rolls changes of the pod template out to the members: one member at a
/// time, only while every other voter is healthy and caught up, the leader last.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// How long a restarted member has to come back with its member ID and catch up with the
    /// leader: a number with a unit, `s`, `m` or `h` (default `5m`). Past it the rollout stops
    /// (`Progressing=False`, reason `UpgradeStalled`) and touches no other member; setting the
    /// previous version (or image) back reverts the member the same way, unless the new release
    /// already moved its data to a data format the previous one does not read (then the
    /// previous version is refused, as etcd refuses downgrades).
    #[serde(default = "default_member_deadline")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub member_deadline: String,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            member_deadline: default_member_deadline(),
        }
    }
}

fn default_member_deadline() -> String {
    "5m".to_string()
}

/// How members are added.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// How long a new member (a learner until it has caught up) has to be promoted: a number
    /// with a unit, `s`, `m` or `h` (default `10m`). Past it the learner is removed from the
    /// cluster with its pod and volume (`Progressing=False`, reason `ScaleUpStalled`, a Warning
    /// Event): its pod could not be scheduled, or it could not catch up. The next one is added
    /// once the deadline has passed again. `0s` for none.
    #[serde(default = "default_learner_deadline")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub learner_deadline: String,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        ScalingSpec {
            learner_deadline: default_learner_deadline(),
        }
    }
}

fn default_learner_deadline() -> String {
    "10m".to_string()
}

/// Scheduled backups of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When to take a backup: a cron expression in UTC (`minute hour day-of-month month
    /// day-of-week`, optionally with a leading seconds field), e.g. `0 */6 * * *`.
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// Where backups go.
    pub destination: BackupDestination,
    /// Which backups to keep; older ones of this cluster are deleted.
    #[serde(default)]
    pub retention: RetentionSpec,
    /// Stop scheduling backups (a running one finishes).
    #[serde(default)]
    pub suspend: bool,
    /// Verification of the backups taken: a Job restores one into a scratch member with no
    /// peers and checks it against what was recorded when it was taken.
    #[serde(default)]
    pub verify: VerifySpec,
}

/// Which scheduled backups are verified.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// Verify backups (default true). A Job restores the backup into a scratch member with no
    /// peers: its SHA-256 is checked against the manifest and the file's own, the member must
    /// open, and its revision, key count and HashKV at that revision must be those recorded
    /// when the backup was taken. The result is `status.backup.lastVerifiedBackup`, the
    /// `BackupVerified` condition, an Event and `cairn_operator_backup_verifications_total`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Verify every Nth scheduled backup (default 1: each). Not used with `schedule`.
    #[serde(default = "default_every")]
    #[schemars(range(min = 1))]
    pub every: i32,
    /// Verify on a schedule instead (a cron expression in UTC, as `spec.backup.schedule`): at
    /// each scheduled time the latest backup, unless it is verified already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub schedule: Option<String>,
}

impl Default for VerifySpec {
    fn default() -> Self {
        VerifySpec {
            enabled: true,
            every: 1,
            schedule: None,
        }
    }
}

fn default_every() -> i32 {
    1
}

/// Which backups to keep. Both limits apply when both are set; the newest backup is always kept.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Keep at most this many backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep_last: Option<i32>,
    /// Delete backups older than this: a number with a unit, `s`, `m`, `h` or `d` (`30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h|d)$"))]
    pub max_age: Option<String>,
}

/// An object store location: exactly one of `s3`, `gcs`, `azure` and `pvc`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = destination_rules)]
pub struct BackupDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<GcsDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcDestination>,
    /// Client-side encryption: backups are sealed before they leave the operator (and opened
    /// by a restore or a verification) with a key from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<BackupEncryption>,
}

/// The CEL rule of a backup destination: one store. The operator refuses none or several
/// itself too, on API servers that do not run the rule.
pub const DESTINATION_RULE: (&str, &str) = (
    "(has(self.s3) ? 1 : 0) + (has(self.gcs) ? 1 : 0) + (has(self.azure) ? 1 : 0) + (has(self.pvc) ? 1 : 0) == 1",
    "exactly one of s3, gcs, azure and pvc must be given",
);

fn destination_rules(schema: &mut schemars::Schema) {
    let (rule, message) = DESTINATION_RULE;
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": rule, "message": message}]),
    );
}

/// The store of a destination, once it is known to name exactly one.
#[derive(Clone, Copy, Debug)]
pub enum Store<'a> {
    S3(&'a S3Destination),
    Gcs(&'a GcsDestination),
    Azure(&'a AzureDestination),
    Pvc(&'a PvcDestination),
}

impl BackupDestination {
    /// The one store this destination names ([`DESTINATION_RULE`]'s message otherwise).
    pub fn store(&self) -> Result<Store<'_>, String> {
        match (&self.s3, &self.gcs, &self.azure, &self.pvc) {
            (Some(s), None, None, None) => Ok(Store::S3(s)),
            (None, Some(g), None, None) => Ok(Store::Gcs(g)),
            (None, None, Some(a), None) => Ok(Store::Azure(a)),
            (None, None, None, Some(p)) => Ok(Store::Pvc(p)),
            _ => Err(format!("backup destination: {}", DESTINATION_RULE.1)),
        }
    }

    /// The Secret with the store's credentials, if one is named. A `pvc` store's is the
    /// token Secret the operator makes for its server.
    pub fn credentials_secret(&self) -> Option<String> {
        match self.store().ok()? {
            Store::S3(s) => s.credentials_secret.clone(),
            Store::Gcs(g) => g.credentials_secret.clone(),
            Store::Azure(a) => a.credentials_secret.clone(),
            Store::Pvc(p) => Some(p.server_name()),
        }
    }
}

impl Store<'_> {
    /// The keys of a credentials Secret this store reads (each also the environment variable a
    /// pod that reaches the store is given, and object_store's name for the setting), and
    /// whether each must be present.
    pub fn credential_keys(&self) -> &'static [(&'static str, bool)] {
        match self {
            Store::S3(_) => &[
                ("AWS_ACCESS_KEY_ID", true),
                ("AWS_SECRET_ACCESS_KEY", true),
                ("AWS_SESSION_TOKEN", false),
            ],
            Store::Gcs(_) => &[("GOOGLE_SERVICE_ACCOUNT_KEY", true)],
            Store::Azure(_) => &[
                ("AZURE_STORAGE_ACCOUNT_KEY", false),
                ("AZURE_STORAGE_SAS_KEY", false),
                ("AZURE_CLIENT_ID", false),
                ("AZURE_CLIENT_SECRET", false),
                ("AZURE_TENANT_ID", false),
            ],
            Store::Pvc(_) => &[
                (crate::store::TOKEN_ENV, true),
                (crate::store::URL_ENV, true),
            ],
        }
    }

    /// Whether `keys` (a credentials Secret's keys) hold one complete set of this store's
    /// credentials; the message names what is missing.
    pub fn check_credentials<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k str> + Clone,
    ) -> Result<(), String> {
        let has = |k: &str| keys.clone().into_iter().any(|x| x == k);
        if let Some((missing, _)) = self
            .credential_keys()
            .iter()
            .find(|(k, required)| *required && !has(k))
        {
            return Err(format!("has no {missing}"));
        }
        if let Store::Azure(_) = self {
            let principal = ["AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"];
            if !has("AZURE_STORAGE_ACCOUNT_KEY")
                && !has("AZURE_STORAGE_SAS_KEY")
                && !principal.iter().all(|k| has(k))
            {
                return Err("has none of AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, or all of AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID".into());
            }
        }
        Ok(())
    }

    /// The key prefix inside the bucket or container.
    pub fn prefix(&self) -> &str {
        match self {
            Store::S3(s) => &s.prefix,
            Store::Gcs(g) => &g.prefix,
            Store::Azure(a) => &a.prefix,
            Store::Pvc(p) => &p.prefix,
        }
    }
}

/// A PersistentVolumeClaim in the cluster's namespace. Backups, restores and verifications
/// reach it through a small server the operator runs for the claim (`cairn-store-<claim>`: a
/// Deployment of one pod that mounts it, a Service, and a Secret with the token every request
/// carries), shared by every cluster of the namespace that names the claim. The claim is
/// yours: the operator never makes or deletes it, and deleting it deletes its server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcDestination {
    /// The claim's name: a DNS label that leaves room for the server's name
    /// (`cairn-store-<claim>`, 63 characters at most).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,49}[a-z0-9])?$"))]
    pub claim_name: String,
    /// Directory in the volume under which this cluster's backups go.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl PvcDestination {
    /// The name of the claim's server: its Deployment, Service and token Secret.
    pub fn server_name(&self) -> String {
        format!("cairn-store-{}", self.claim_name)
    }
}

/// A Google Cloud Storage bucket.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsDestination {
    #[schemars(length(min = 1))]
    pub bucket: String,
    /// Object name prefix under which this cluster's backups go.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Base URL of a GCS-compatible server other than Google's (an emulator:
    /// `http://gcs.storage:9023`); with no service account key, requests to it carry no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A Secret in the cluster's namespace whose key `GOOGLE_SERVICE_ACCOUNT_KEY` holds a
    /// service account's JSON key. Without one the ambient identity is used (GKE workload
    /// identity or the instance's, through the metadata server; `GOOGLE_APPLICATION_CREDENTIALS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// An Azure Blob Storage container.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureDestination {
    /// The storage account.
    #[schemars(length(min = 1))]
    pub account: String,
    #[schemars(length(min = 1))]
    pub container: String,
    /// Blob name prefix under which this cluster's backups go.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Blob endpoint other than `https://<account>.blob.core.windows.net` (a sovereign cloud,
    /// a private endpoint, Azurite's `http://azurite:10000/<account>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A Secret in the cluster's namespace with the credentials: `AZURE_STORAGE_ACCOUNT_KEY`
    /// (a shared key), or `AZURE_STORAGE_SAS_KEY` (a SAS token), or a service principal's
    /// `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET` and `AZURE_TENANT_ID`. Without one the ambient
    /// identity is used (Azure workload identity's federated token, managed identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Client-side encryption of backups: AES-256-GCM in 64 KiB segments, streamed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupEncryption {
    /// A Secret in the cluster's namespace whose key `key` holds the 256-bit key: 32 bytes, or
    /// their base64 (`head -c32 /dev/urandom | base64`).
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// The key's name, recorded with each backup (default: the Secret's name). A backup is
    /// opened only with the key of its id: rotate by a new Secret and id, keeping the old
    /// Secret while backups sealed with it are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,63}$"))]
    pub key_id: Option<String>,
}

impl BackupEncryption {
    /// The id recorded with the backups it seals.
    pub fn id(&self) -> String {
        self.key_id
            .clone()
            .unwrap_or_else(|| self.secret_name.clone())
    }
}

/// The Secret key that holds a backup encryption key.
pub const BACKUP_KEY_SECRET_KEY: &str = "key";

/// An S3-compatible bucket.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    #[schemars(length(min = 1))]
    pub bucket: String,
    /// Key prefix under which this cluster's backups go (`<prefix>/<namespace>/<name>/...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint URL of an S3-compatible server other than AWS (`http://minio.storage:9000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`.
    #[serde(default)]
    pub force_path_style: bool,
    /// A Secret in the cluster's namespace with the credentials (keys `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`). Without one the operator's
    /// ambient identity is used (environment, web identity, instance metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Server-side encryption of the objects written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_side_encryption: Option<ServerSideEncryption>,
}

/// S3 server-side encryption of what is written (reads need nothing).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSideEncryption {
    /// `AES256` (SSE-S3) or `aws:kms` (SSE-KMS).
    #[serde(rename = "type")]
    #[schemars(regex(pattern = r"^(AES256|aws:kms)$"))]
    pub kind: String,
    /// With `aws:kms`: the KMS key (default: the account's AWS-managed key for S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// How a new cluster starts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = bootstrap_rules)]
pub struct BootstrapSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackup>,
    /// Migration from etcd: an etcd v3 snapshot (`etcdctl snapshot save`'s file, which ends in
    /// its SHA-256) in object storage. The first member restores every key with its revisions
    /// (Kubernetes' resourceVersions go on), leases, users and roles; the others join it. Not
    /// together with `fromBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_etcd_snapshot: Option<FromEtcdSnapshot>,
}

impl BootstrapSpec {
    /// Where a new cluster's data comes from, as a backup to fetch: the object, and whether
    /// it is an etcd snapshot (checked by its own trailing SHA-256, not a cairn manifest).
    /// Both given is refused ([`BOOTSTRAP_RULE`]'s message).
    pub fn source(&self) -> Result<Option<(FromBackup, bool)>, String> {
        match (&self.from_backup, &self.from_etcd_snapshot) {
            (Some(_), Some(_)) => Err(BOOTSTRAP_RULE.1.to_string()),
            (Some(b), None) => Ok(Some((b.clone(), false))),
            (None, Some(e)) => Ok(Some((
                FromBackup {
                    destination: e.destination.clone(),
                    key: Some(e.key.clone()),
                    prefix: None,
                },
                true,
            ))),
            (None, None) => Ok(None),
        }
    }
}

/// The CEL rule of `spec.bootstrap`: one source. The operator refuses both itself too
/// (`RestoreFailed`), on API servers that do not run the rule.
pub const BOOTSTRAP_RULE: (&str, &str) = (
    "!(has(self.fromBackup) && has(self.fromEtcdSnapshot))",
    "spec.bootstrap: fromBackup and fromEtcdSnapshot cannot both be given",
);

fn bootstrap_rules(schema: &mut schemars::Schema) {
    let (rule, message) = BOOTSTRAP_RULE;
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": rule, "message": message}]),
    );
}

/// An etcd snapshot a new cluster starts from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromEtcdSnapshot {
    pub destination: BackupDestination,
    /// The object key of the snapshot file.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The backup a new cluster starts from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromBackup {
    pub destination: BackupDestination,
    /// The object key of the backup; without it, the latest backup under `prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// With no `key`: where to look for the latest backup (a prefix ending in
    /// `<namespace>/<name>/` of the cluster that made it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// One backup in object storage.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    pub time: Time,
    pub key: String,
    pub size: i64,
    pub revision: i64,
    /// SHA-256 of the object, hex.
    pub sha256: String,
    /// Keys at `revision`, as the member that took the backup counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    /// HashKV at `revision`, as the member that took the backup answered it: a verification
    /// restores the backup and compares its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u32>,
    /// The compaction revision of that HashKV (the member may have compacted since the
    /// snapshot; a verification compacts its scratch member to it first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_compact_revision: Option<i64>,
    /// The id of the key the backup is sealed with (client-side encryption); `sha256` and
    /// `size` are then those of the sealed object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
}

/// Backup progress of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,
    /// The scheduled time the last backup was taken for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup_time: Option<Time>,
    /// Consecutive failures of the current scheduled backup.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: i32,
    /// The newest backup that a verification restored and found as recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_backup: Option<BackupRecord>,
    /// The backup being verified now (its Job runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying: Option<BackupRecord>,
    /// Scheduled backups taken since the last verification started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unverified: i32,
    /// With `verify.schedule`: the scheduled time the last verification was due at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_schedule_time: Option<Time>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_size() -> i32 {
    3
}

/// Persistent storage of each member.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = storage_rules)]
pub struct StorageSpec {
    /// Requested size of each member's volume, a Kubernetes quantity such as `10Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,
    /// StorageClass of the volumes; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// The CEL rules of `spec.storage` ([`STORAGE_RULES`]) in the schema.
fn storage_rules(schema: &mut schemars::Schema) {
    let rules: Vec<serde_json::Value> = STORAGE_RULES
        .iter()
        .map(|(rule, message)| serde_json::json!({"rule": rule, "message": message}))
        .collect();
    schema.insert("x-kubernetes-validations".into(), rules.into());
}

/// Transition rules of `spec.storage` (CEL, `x-kubernetes-validations`): a volume cannot shrink
/// and cannot move to another StorageClass. API servers from Kubernetes 1.29 (CEL's quantity
/// library) refuse such edits; older ones ignore the rules, and the operator refuses the same
/// edits itself (the `Storage` condition, nothing applied: see [`crate::storage::change`]).
pub const STORAGE_RULES: [(&str, &str); 2] = [
    (
        "quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        "spec.storage.size cannot be reduced: a volume cannot shrink",
    ),
    (
        "!has(self.storageClassName) || (has(oldSelf.storageClassName) && self.storageClassName == oldSelf.storageClassName)",
        "spec.storage.storageClassName is immutable: a volume cannot move to another class (left out, the volumes keep theirs)",
    ),
];

fn default_storage_size() -> String {
    "8Gi".to_string()
}

/// Requests and limits of each member's container (`cpu`, `memory`, ...), as Kubernetes
/// quantities; the schema refuses anything that is not one.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ResourcesSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub limits: BTreeMap<String, Quantity>,
}

impl ResourcesSpec {
    /// The container's `resources`.
    pub fn requirements(&self) -> ResourceRequirements {
        let map = |m: &BTreeMap<String, Quantity>| (!m.is_empty()).then(|| m.clone());
        ResourceRequirements {
            requests: map(&self.requests),
            limits: map(&self.limits),
            claims: None,
        }
    }
}

/// A map of resource names to quantities: an integer, or a string in quantity syntax.
fn quantity_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {
            // The pattern applies to strings only; integers are quantities as they are.
            "x-kubernetes-int-or-string": true,
            "pattern": QUANTITY_PATTERN
        }
    })
}

/// Whether spreading members apart is a preference or a requirement of the scheduler.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AntiAffinityMode {
    /// Spread when possible; members may share a topology domain when nothing else fits.
    #[default]
    Preferred,
    /// Never place two members in one topology domain (pods stay Pending instead).
    Required,
}

/// Pod anti-affinity between the members of one cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AntiAffinitySpec {
    /// `preferred` (default) or `required`.
    #[serde(default)]
    pub mode: AntiAffinityMode,
    /// The node label that defines a failure domain.
    #[serde(default = "default_topology_key")]
    #[schemars(length(min = 1))]
    pub topology_key: String,
}

impl Default for AntiAffinitySpec {
    fn default() -> Self {
        AntiAffinitySpec {
            mode: AntiAffinityMode::default(),
            topology_key: default_topology_key(),
        }
    }
}

fn default_topology_key() -> String {
    "kubernetes.io/hostname".to_string()
}

/// What users may add to the members' pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    /// Extra pod labels (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity, merged with the members' own anti-affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// The PodDisruptionBudget of the members.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Create one (default true). Its maxUnavailable keeps a quorum of voters.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec { enabled: true }
    }
}

/// Who may reach the members (see [`crate::network`]).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy `<cluster>-members` (default true). Its peer-port rule lets
    /// only the cluster's members and the operator's pods in. It takes effect where the
    /// cluster's network plugin enforces NetworkPolicies.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may reach the client port (2379), as NetworkPolicy `from` peers; the members and the
    /// operator are always added. Unset: anyone. Without client TLS the members serve
    /// `/metrics` on the client port: include Prometheus here then (with client TLS the plain
    /// metrics port 2381 stays open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<NetworkPolicyPeer>>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        NetworkPolicySpec {
            enabled: true,
            clients: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Observed state of a cairn cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Voting members in the cluster's member list.
    #[serde(default)]
    pub size: i32,
    /// Members that answer their Status RPC.
    #[serde(default)]
    pub ready_members: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Name of the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The lowest cairn release the members run (as etcd's cluster version is the lowest of its
    /// members'), once every member said which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The newest data format a member keeps its data directory in (see `cairn --version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<i32>,
    /// The cluster ID (hex, as etcdctl prints it). Set once the first bootstrap succeeded.
    #[serde(default, rename = "clusterID", skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The membership step in progress; an edit of `spec.size` waits until it is finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// The backup object this cluster was bootstrapped from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// Whether the cluster has auth on (as the members answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_enabled: Option<bool>,
    /// The Secret holding root's password (key `password`), once auth is managed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_secret: Option<String>,
    /// TLS as the members serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
    /// Scheduled maintenance as it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceStatus>,
    /// When the operator last compacted and defragmented the members for a NOSPACE alarm (the
    /// next attempt waits 5 minutes after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_no_space_recovery: Option<Time>,
    /// The last learner removed for missing `spec.scaling.learnerDeadline`, until the size is
    /// reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_scale_up: Option<StalledScaleUp>,
    /// The highest revision a member has reported to the operator (kept through an outage: a
    /// recovery says how much of it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Quorum-loss recovery (`spec.recovery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One member as the cluster reports it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member (and pod) name; empty for a member added but not started yet.
    pub name: String,
    /// Member ID, hex.
    pub id: String,
    #[serde(default)]
    pub leader: bool,
    #[serde(default)]
    pub learner: bool,
    #[serde(default)]
    pub healthy: bool,
    /// The cairn release the member runs, as its `/version` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The data format of the member's data directory, as its `/version` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<i32>,
}

/// TLS as the members serve it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatus {
    /// Client traffic: `Plain`, `Migrating` or `TLS` (every member serves TLS).
    pub client: String,
    /// Peer traffic: `Plain`, `Migrating` or `TLS` (every member's peer URL is `https://`).
    pub peer: String,
    /// A Secret with a client certificate for users (`tls.crt`, `tls.key`, `ca.crt`), made in
    /// `Operator` and `CertManager` modes. Its common name is no etcd user: with auth on, give
    /// `--user` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// When the members' certificates the operator issued expire (the earliest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// When the operator renews them next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<Time>,
}

/// A learner removed for missing its deadline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StalledScaleUp {
    /// The member (pod) that was the learner.
    pub member: String,
    /// When it was removed.
    pub removed_at: Time,
}

/// The kind of a membership step.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OperationKind {
    /// A learner was added for the next ordinal; it is promoted once it caught up.
    ScaleUp,
    /// The highest ordinal was removed from the member list; its pod and volume go next.
    ScaleDown,
    /// A member that lost its data is being removed and added again as a new member.
    Replace,
    /// A member's pod was deleted to start again with the StatefulSet's current template (a new
    /// version or another change of the pod); the next member waits until it is back.
    Restart,
}

/// A membership step in progress.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub kind: OperationKind,
    /// The member (pod) the step is about.
    pub member: String,
    /// The size the step leads to.
    pub target_size: i32,
    pub started_at: Time,
    /// The member's ID (hex), for a restart: it must come back with the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<String>,
    /// The StatefulSet revision the member was restarted into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The UID of the pod deleted for the restart (its successor has another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// An on-demand backup of a cluster.
// Each `printcolumn(...)` repeats `type_ = …`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "EtcdBackup",
    plural = "etcdbackups",
    category = "cairn",
    namespaced,
    status = "EtcdBackupStatus",
    derive = "PartialEq",
    doc = "An on-demand backup of an EtcdCluster in the same namespace to object storage.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.clusterName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Key", type_ = "string", json_path = ".status.backup.key"),
    printcolumn(
        name = "Completed",
        type_ = "date",
        json_path = ".status.completionTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EtcdBackupSpec {
    /// The EtcdCluster (same namespace) to back up.
    #[schemars(length(min = 1))]
    pub cluster_name: String,
    pub destination: BackupDestination,
}

/// Where an on-demand backup stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// An optional phase: a plain string enum (schemars would list `null` among the values, which
/// kubectl's validation rejects).
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Where an on-demand backup stands.",
        "type": "string",
        "enum": ["Pending", "Running", "Succeeded", "Failed"]
    })
}

/// Observed state of an on-demand backup.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdBackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<BackupPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRecord>,
    /// Why the backup failed, or is still pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: i32,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it succeeded, or failed for the last time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// As a Job's: `Complete` (True once the backup is stored) or `Failed` (True once every
    /// attempt failed); `kubectl wait --for=condition=Complete etcdbackup/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl EtcdBackupStatus {
    /// Sets a condition, keeping its `lastTransitionTime` when the status did not change.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: String,
        now: &Time,
    ) {
        set_condition(
            &mut self.conditions,
            type_,
            status,
            reason,
            message,
            None,
            now,
        );
    }
}

/// Condition types.
pub mod condition {
    pub const AVAILABLE: &str = "Available";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    /// Whether the PodDisruptionBudget is in place.
    pub const DISRUPTION_BUDGET: &str = "DisruptionBudget";
    /// Whether the last scheduled backup succeeded.
    pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
    /// Whether auth is as `spec.auth` asks.
    pub const AUTH: &str = "Auth";
    /// Whether TLS is as `spec.tls` asks.
    pub const TLS: &str = "TLS";
    /// Whether scheduled maintenance runs (a defragmentation waiting for health, a bad
    /// schedule).
    pub const MAINTENANCE: &str = "Maintenance";
    /// Whether `spec.server` could be applied as written (`extraArgs` checked).
    pub const SERVER: &str = "Server";
    /// Whether the members' volumes are as `spec.storage` asks.
    pub const STORAGE: &str = "Storage";
    /// Whether the StatefulSet could be applied (set once it could not).
    pub const STATEFUL_SET: &str = "StatefulSet";
    /// Whether the members' NetworkPolicy is in place.
    pub const NETWORK_POLICY: &str = "NetworkPolicy";
    /// Whether the members have space (set once a NOSPACE alarm was seen).
    pub const SPACE: &str = "Space";
    /// Whether the peer and client Services could be applied.
    pub const SERVICES: &str = "Services";
    /// The last quorum-loss recovery: the revision it kept, the highest one reported before.
    pub const RECOVERED: &str = "Recovered";
    /// Whether the last backup verified restored as recorded.
    pub const BACKUP_VERIFIED: &str = "BackupVerified";
}

/// Condition reasons of the rollout (on `Progressing`).
pub mod reason {
    /// Members are being restarted one at a time into the current template.
    pub const UPGRADING: &str = "Upgrading";
    /// A restarted member did not come back and catch up in time; nothing else is touched.
    pub const UPGRADE_STALLED: &str = "UpgradeStalled";
    /// The version asked for cannot read the members' data format; nothing was changed.
    pub const UPGRADE_REFUSED: &str = "UpgradeRefused";
    /// A voter other than the next one to restart is not healthy or not caught up.
    pub const UPGRADE_WAITING: &str = "UpgradeWaiting";
}

/// Sets a condition in `conditions`, keeping its `lastTransitionTime` when the status did not
/// change.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = now.clone();
        }
        c.status = status;
        c.reason = reason.to_string();
        c.message = message;
        c.observed_generation = generation;
    } else {
        conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        });
    }
}

impl EtcdClusterStatus {
    /// Sets a condition, keeping its `lastTransitionTime` when the status did not change.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
        now: &Time,
    ) {
        set_condition(
            &mut self.conditions,
            type_,
            status,
            reason,
            message.into(),
            generation,
            now,
        );
    }

    /// A restore that cannot go on: not available, not progressing, degraded, with why.
    pub fn restore_failed(&mut self, message: String, generation: Option<i64>, now: &Time) {
        for (type_, status) in [
            (condition::AVAILABLE, false),
            (condition::PROGRESSING, false),
            (condition::DEGRADED, true),
        ] {
            self.set_condition(
                type_,
                status,
                "RestoreFailed",
                message.clone(),
                generation,
                now,
            );
        }
    }

    /// The condition of a type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spec.bootstrap` takes one source: the CRD's rule (as an API server runs it) and the
    /// operator's [`BootstrapSpec::source`] check agree.
    #[test]
    fn bootstrap_takes_one_source() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(EtcdCluster::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let dest = serde_json::json!({"s3": {"bucket": "b"}});
        let object = |bootstrap: serde_json::Value| {
            serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
                               "metadata": {"name": "a"}, "spec": {"size": 3, "bootstrap": bootstrap}})
        };
        let validator = kube_cel::Validator::new();
        let backup = serde_json::json!({"destination": dest, "key": "k"});
        let etcd = serde_json::json!({"destination": dest, "key": "etcd.db"});
        for (bootstrap, ok) in [
            (serde_json::json!({"fromBackup": backup}), true),
            (serde_json::json!({"fromEtcdSnapshot": etcd}), true),
            (serde_json::json!({}), true),
            (
                serde_json::json!({"fromBackup": backup, "fromEtcdSnapshot": etcd}),
                false,
            ),
        ] {
            let said = validator.validate(schema, &object(bootstrap.clone()), None);
            assert_eq!(said.is_ok(), ok, "{bootstrap}: {said:?}");
            let spec: BootstrapSpec = serde_json::from_value(bootstrap.clone()).unwrap();
            assert_eq!(spec.source().is_ok(), ok, "{bootstrap}");
        }
        let spec: BootstrapSpec =
            serde_json::from_value(serde_json::json!({"fromEtcdSnapshot": etcd})).unwrap();
        let (from, is_etcd) = spec.source().unwrap().unwrap();
        assert!(is_etcd);
        assert_eq!(from.key.as_deref(), Some("etcd.db"));
    }

    /// A credentials Secret must hold one complete set of its store's credentials.
    #[test]
    fn credentials_are_checked_per_store() {
        let s3 = S3Destination::default();
        let gcs = GcsDestination::default();
        let azure = AzureDestination::default();
        let check = |store: Store<'_>, keys: &[&str]| store.check_credentials(keys.iter().copied());
        assert!(check(
            Store::S3(&s3),
            &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        )
        .is_ok());
        assert_eq!(
            check(Store::S3(&s3), &["AWS_ACCESS_KEY_ID"]),
            Err("has no AWS_SECRET_ACCESS_KEY".into())
        );
        assert!(check(Store::Gcs(&gcs), &["GOOGLE_SERVICE_ACCOUNT_KEY"]).is_ok());
        assert!(check(Store::Gcs(&gcs), &["AWS_ACCESS_KEY_ID"]).is_err());
        for ok in [
            &["AZURE_STORAGE_ACCOUNT_KEY"][..],
            &["AZURE_STORAGE_SAS_KEY"],
            &["AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"],
        ] {
            assert!(check(Store::Azure(&azure), ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &["AZURE_STORAGE_KEY"][..],
            &["AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"],
            &[],
        ] {
            assert!(check(Store::Azure(&azure), bad).is_err(), "{bad:?}");
        }
    }

    /// A backup destination names exactly one store: the CRD's CEL rule (as an API server runs
    /// it) and the operator's own check agree, with the same message.
    #[test]
    fn a_destination_names_exactly_one_store() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(EtcdCluster::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let validator = kube_cel::Validator::new();
        let s3 = serde_json::json!({"bucket": "b"});
        let gcs = serde_json::json!({"bucket": "b"});
        let azure = serde_json::json!({"account": "a", "container": "c"});
        let pvc = serde_json::json!({"claimName": "backups"});
        for (dest, ok) in [
            (serde_json::json!({"s3": s3}), true),
            (serde_json::json!({"gcs": gcs}), true),
            (serde_json::json!({"azure": azure}), true),
            (serde_json::json!({"pvc": pvc}), true),
            (serde_json::json!({}), false),
            (serde_json::json!({"s3": s3, "gcs": gcs}), false),
            (serde_json::json!({"gcs": gcs, "azure": azure}), false),
            (serde_json::json!({"pvc": pvc, "s3": s3}), false),
        ] {
            let object = serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
                "metadata": {"name": "a"},
                "spec": {"size": 3, "backup": {"schedule": "0 * * * *", "destination": dest}}});
            let cel = match validator.validate(schema, &object, None) {
                Ok(()) => None,
                Err(errors) => Some(errors.into_iter().map(|e| e.message).collect::<Vec<_>>()),
            };
            let parsed: BackupDestination = serde_json::from_value(dest.clone()).unwrap();
            let operator = parsed.store().err();
            assert_eq!(cel.is_none(), ok, "{dest}: {cel:?}");
            assert_eq!(operator.is_none(), ok, "{dest}: {operator:?}");
            if let (Some(cel), Some(op)) = (cel, operator) {
                assert!(cel.iter().any(|m| m == DESTINATION_RULE.1), "{cel:?}");
                assert!(op.ends_with(DESTINATION_RULE.1), "{op}");
            }
        }
    }

    /// The CRD's CEL rules for `spec.storage`, evaluated as an API server with Kubernetes'
    /// quantity library does (kube-cel), agree with the operator's own rule
    /// ([`crate::storage::change`]) on every edit: what CEL refuses the operator refuses too,
    /// on API servers that do not run the rules.
    #[test]
    fn storage_rules_refuse_shrinking_and_another_class_as_the_operator_does() {
        use crate::storage::{change, Change};
        use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};
        use kube::CustomResourceExt;

        let crd = serde_json::to_value(EtcdCluster::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let storage = &schema["properties"]["spec"]["properties"]["storage"];
        assert_eq!(
            storage["x-kubernetes-validations"]
                .as_array()
                .unwrap()
                .len(),
            STORAGE_RULES.len()
        );
        let object = |size: &str, class: Option<&str>| {
            let mut storage = serde_json::json!({"size": size});
            if let Some(c) = class {
                storage["storageClassName"] = c.into();
            }
            serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
                               "metadata": {"name": "a"}, "spec": {"size": 3, "storage": storage}})
        };
        let validator = kube_cel::Validator::new();
        let cel = |old: (&str, Option<&str>), new: (&str, Option<&str>)| -> Vec<String> {
            match validator.validate(schema, &object(new.0, new.1), Some(&object(old.0, old.1))) {
                Ok(()) => Vec::new(),
                Err(errors) => errors.into_iter().map(|e| e.message).collect(),
            }
        };
        // The operator compares with the volumes, which have what the old spec said.
        let operator = |old: (&str, Option<&str>), new: (&str, Option<&str>)| {
            let claim = PersistentVolumeClaimSpec {
                storage_class_name: old.1.map(str::to_string),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_string(), Quantity(old.0.to_string()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let wanted = StorageSpec {
                size: new.0.to_string(),
                storage_class_name: new.1.map(str::to_string),
            };
            change(&claim, &wanted)
        };
        let shrink = "spec.storage.size cannot be reduced: a volume cannot shrink";
        let class = STORAGE_RULES[1].1;
        for (old, new, refused) in [
            (("8Gi", None), ("8Gi", None), None),
            (("8Gi", None), ("16Gi", None), None),
            (("8Gi", None), ("8192Mi", None), None),
            (("1Gi", None), ("1.5Gi", None), None),
            (("10G", None), ("10Gi", None), None),
            (("8Gi", None), ("4Gi", None), Some(shrink)),
            (("1Ti", None), ("1000Gi", None), Some(shrink)),
            (("10Gi", None), ("10G", None), Some(shrink)),
            (("8Gi", Some("fast")), ("8Gi", Some("fast")), None),
            (("8Gi", Some("fast")), ("16Gi", Some("fast")), None),
            (("8Gi", Some("fast")), ("8Gi", None), None),
            (("8Gi", Some("fast")), ("8Gi", Some("slow")), Some(class)),
            (("8Gi", None), ("8Gi", Some("slow")), Some(class)),
        ] {
            let said = cel(old, new);
            assert_eq!(
                said,
                refused.map(str::to_string).into_iter().collect::<Vec<_>>(),
                "CEL on {old:?} -> {new:?}"
            );
            let ours = operator(old, new);
            let ours_refuses = match ours {
                Change::Shrink { .. } => Some(shrink),
                Change::OtherClass { .. } => Some(class),
                Change::Same | Change::Grow { .. } => None,
            };
            assert_eq!(
                ours_refuses, refused,
                "operator on {old:?} -> {new:?}: {ours:?}"
            );
        }
        // A new object (no old one): transition rules do not apply.
        assert!(validator
            .validate(schema, &object("1Gi", Some("any")), None)
            .is_ok());
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let spec: EtcdClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.size, 3);
        assert_eq!(spec.storage.size, "8Gi");
        assert_eq!(spec.anti_affinity.mode, AntiAffinityMode::Preferred);
        assert_eq!(spec.anti_affinity.topology_key, "kubernetes.io/hostname");
        assert!(spec.pod_disruption_budget.enabled);
        assert!(!spec.paused);
    }

    #[test]
    fn quantity_pattern_accepts_quantities_only() {
        let re = regex::Regex::new(QUANTITY_PATTERN).unwrap();
        for ok in [
            "1Gi", "500M", "10", "0.5", "1e3", "100Mi", "2Ti", "+1", ".5",
        ] {
            assert!(re.is_match(ok), "{ok}");
        }
        for bad in ["", "Gi", "1GB", "ten", "1 Gi", "-"] {
            assert!(!re.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let mut st = EtcdClusterStatus::default();
        let t0 = Time(jiff::Timestamp::from_second(1000).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(2000).unwrap());
        st.set_condition(condition::AVAILABLE, true, "QuorumUp", "ok", Some(1), &t0);
        st.set_condition(
            condition::AVAILABLE,
            true,
            "QuorumUp",
            "still",
            Some(2),
            &t1,
        );
        let c = st.condition(condition::AVAILABLE).unwrap();
        assert_eq!(c.last_transition_time, t0);
        assert_eq!(c.message, "still");
        st.set_condition(
            condition::AVAILABLE,
            false,
            "QuorumLost",
            "no",
            Some(2),
            &t1,
        );
        let c = st.condition(condition::AVAILABLE).unwrap();
        assert_eq!(c.last_transition_time, t1);
        assert_eq!(c.status, "False");
        assert_eq!(st.conditions.len(), 1);
    }
}
