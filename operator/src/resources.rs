//! Pure builders: an `EtcdCluster` (plus the few facts the controller observed) in, the desired
//! children out: the headless peer Service, the client Service, the bootstrap ConfigMap, the
//! StatefulSet and the PodDisruptionBudget. No I/O; every name is derived from the cluster's name,
//! so repeated reconciles apply the same objects.
//!
//! How a member learns its flags: `--name` and the advertised URLs come from the pod name
//! (`$(POD_NAME)`) and the peer Service's DNS name; `--initial-cluster`, `--initial-cluster-state`
//! and `--initial-cluster-token` come from the ConfigMap, read when the container starts. The
//! controller keeps that ConfigMap at `new` with the first members only until the first bootstrap
//! succeeded, then at `existing` with the current member list, so a member started later (scale
//! up, replacement) joins instead of founding a cluster of its own. Changing it never restarts a
//! running pod, and neither does a resize: the pod template does not depend on the member count.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{AntiAffinityMode, BackupRecord, EtcdCluster, Store};
use crate::layout::{Names, CLIENT_PORT, DATA_VOLUME, METRICS_PORT, PEER_PORT};
use crate::tls::{self, Serving};

/// Where each member's volume is mounted; the data dir lives below it.
pub const DATA_MOUNT: &str = "/var/lib/cairn";
/// ConfigMap keys read by the members at start.
pub const KEY_INITIAL_CLUSTER: &str = "initial-cluster";
pub const KEY_INITIAL_CLUSTER_STATE: &str = "initial-cluster-state";
/// The ConfigMap key read as `ETCD_EXPERIMENTAL_FORCE_NEW_CLUSTER_ONCE` (a quorum-loss
/// recovery's survivor and token; empty otherwise).
pub const KEY_FORCE_NEW_CLUSTER_ONCE: &str = "force-new-cluster-once";
pub const KEY_INITIAL_CLUSTER_TOKEN: &str = "initial-cluster-token";
/// The uid/gid cairn runs as (the image's user).
pub const RUN_AS: i64 = 65532;

/// The image members run when `spec.image` is unset: cairn of the operator's own version.
pub fn default_image() -> String {
    format!("cairn:{}", env!("CARGO_PKG_VERSION"))
}

/// Labels that select a cluster's member pods.
pub fn selector_labels(ec: &EtcdCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "cairn".to_string()),
        ("app.kubernetes.io/instance".to_string(), ec.name_any()),
    ])
}

/// The selector of a cluster's member pods (StatefulSet, PDB, anti-affinity, NetworkPolicy).
pub fn member_selector(ec: &EtcdCluster) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(ec)),
        match_expressions: None,
    }
}

/// Labels of every child object.
pub fn labels(ec: &EtcdCluster) -> BTreeMap<String, String> {
    let mut l = selector_labels(ec);
    l.insert(
        "app.kubernetes.io/managed-by".to_string(),
        "cairn-operator".to_string(),
    );
    l.insert(
        "app.kubernetes.io/component".to_string(),
        "etcd".to_string(),
    );
    l
}

/// The metadata of a child `name` of `ec`: its labels, owned by it (deleted with it).
pub fn owned_meta(ec: &EtcdCluster, name: String) -> ObjectMeta {
    meta(ec, name)
}

pub(crate) fn meta(ec: &EtcdCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ec.namespace(),
        labels: Some(labels(ec)),
        owner_references: ec.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The headless Service behind the members' DNS names. It publishes members before they are
/// ready: peers must find each other to become ready at all.
pub fn peer_service(ec: &EtcdCluster) -> Service {
    let names = Names::of(ec);
    Service {
        metadata: meta(ec, names.peer_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(ec)),
            ports: Some(vec![port("peer", PEER_PORT), port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The Service clients use: ready members only.
pub fn client_service(ec: &EtcdCluster) -> Service {
    let names = Names::of(ec);
    Service {
        metadata: meta(ec, names.client_service()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector_labels(ec)),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// What members read at start: `initial_cluster` for `--initial-cluster`, and whether they found
/// a new cluster (`new`, the first bootstrap only) or join one (`existing`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub initial_cluster: String,
    pub new_cluster: bool,
}

/// The `--initial-cluster-token`: unique per EtcdCluster object, so a cluster deleted and created
/// again under the same name gets a new cluster ID.
pub fn cluster_token(ec: &EtcdCluster) -> String {
    match ec.uid() {
        Some(uid) => format!("{}-{uid}", ec.name_any()),
        None => ec.name_any(),
    }
}

/// The ConfigMap the members read their bootstrap flags from; `force_once` is the value of
/// `--experimental-force-new-cluster-once` (`<member>:<token>`) while a quorum-loss recovery
/// restarts that member alone, else none.
pub fn bootstrap_configmap(ec: &EtcdCluster, b: &Bootstrap, force_once: Option<&str>) -> ConfigMap {
    let names = Names::of(ec);
    let state = if b.new_cluster { "new" } else { "existing" };
    ConfigMap {
        metadata: meta(ec, names.configmap()),
        data: Some(BTreeMap::from([
            (KEY_INITIAL_CLUSTER.to_string(), b.initial_cluster.clone()),
            (KEY_INITIAL_CLUSTER_STATE.to_string(), state.to_string()),
            (KEY_INITIAL_CLUSTER_TOKEN.to_string(), cluster_token(ec)),
            (
                KEY_FORCE_NEW_CLUSTER_ONCE.to_string(),
                force_once.unwrap_or_default().to_string(),
            ),
        ])),
        ..ConfigMap::default()
    }
}

fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_configmap(name: &str, configmap: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: configmap.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// An environment variable from key `key` of Secret `secret`.
fn env_from_secret(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(optional),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// `e` (a ConfigMap key reference) with the key optional.
fn optional(mut e: EnvVar) -> EnvVar {
    if let Some(r) = e
        .value_from
        .as_mut()
        .and_then(|f| f.config_map_key_ref.as_mut())
    {
        r.optional = Some(true);
    }
    e
}

/// cairn's flags the operator sets itself (names, URLs, data dir, cluster, TLS, compaction):
/// refused in `spec.server.extraArgs`.
pub const MANAGED_FLAGS: &[&str] = &[
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "listen-metrics-urls",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "peer-client-cert-auth",
    "experimental-peer-accept-plaintext",
    "force-new-cluster",
    "experimental-force-new-cluster-once",
    "auto-tls",
    "peer-auto-tls",
    "auto-compaction-mode",
    "auto-compaction-retention",
];

/// cairn's other flags (etcd's names), taken in `spec.server.extraArgs` (unless a field of
/// `spec.server` sets the same). The operator's tests check both lists against
/// `cairn --help`.
pub const EXTRA_FLAGS: &[&str] = &[
    "heartbeat-interval",
    "election-timeout",
    "snapshot-count",
    "quota-backend-bytes",
    "max-request-bytes",
    "max-txn-ops",
    "experimental-watch-progress-notify-interval",
    "experimental-client-io-threads",
    "logger",
    "log-level",
    "log-outputs",
    "enable-v2",
    "self-signed-cert-validity",
    "peer-cert-allowed-cn",
    "cipher-suites",
    "auth-token",
    "auth-token-ttl",
    "bcrypt-cost",
    "experimental-initial-corrupt-check",
    "experimental-corrupt-check-time",
];

/// The member flags of `spec.server`, and the `extraArgs` left out with why.
pub fn server_args(s: &crate::crd::ServerSpec) -> (Vec<String>, Vec<String>) {
    let mut args = vec![
        format!("--auto-compaction-mode={}", s.auto_compaction_mode),
        format!(
            "--auto-compaction-retention={}",
            s.auto_compaction_retention
        ),
    ];
    let fields = [
        (
            "quota-backend-bytes",
            s.quota_backend_bytes.map(|v| v.to_string()),
        ),
        ("snapshot-count", s.snapshot_count.map(|v| v.to_string())),
        (
            "heartbeat-interval",
            s.heartbeat_interval.map(|v| v.to_string()),
        ),
        (
            "election-timeout",
            s.election_timeout.map(|v| v.to_string()),
        ),
        (
            "max-request-bytes",
            s.max_request_bytes.map(|v| v.to_string()),
        ),
        ("log-level", s.log_level.clone()),
        (
            "experimental-initial-corrupt-check",
            s.initial_corrupt_check.then(|| "true".to_string()),
        ),
        (
            "experimental-corrupt-check-time",
            s.corrupt_check_time.clone(),
        ),
    ];
    let mut taken: Vec<&str> = Vec::new();
    for (flag, value) in &fields {
        if let Some(v) = value {
            args.push(format!("--{flag}={v}"));
            taken.push(flag);
        }
    }
    let mut refused = Vec::new();
    let mut given: Vec<&str> = Vec::new();
    for a in &s.extra_args {
        let name = a
            .strip_prefix("--")
            .map(|r| r.split_once('=').map_or(r, |(n, _)| n));
        let why = match name {
            None => Some("not a --flag or --flag=value".to_string()),
            Some(n) if MANAGED_FLAGS.contains(&n) => Some(format!("--{n} is set by the operator")),
            Some(n) if taken.contains(&n) => {
                Some(format!("--{n} is set by a field of spec.server"))
            }
            Some(n) if given.contains(&n) => Some(format!("--{n} is given twice")),
            Some(n) if !EXTRA_FLAGS.contains(&n) => Some(format!("cairn has no flag --{n}")),
            Some(_) => None,
        };
        match (why, name) {
            (Some(why), _) => refused.push(format!("{a:?}: {why}")),
            (None, Some(n)) => {
                given.push(n);
                args.push(a.clone());
            }
            (None, None) => {}
        }
    }
    (args, refused)
}

/// The flags of a member, as the container's arguments, serving TLS as `serving` says.
/// `$(VAR)` is expanded by the kubelet.
pub fn member_args(ec: &EtcdCluster, serving: &Serving) -> Vec<String> {
    let names = Names::of(ec);
    let host = format!(
        "$(POD_NAME).{}.{}.svc",
        names.peer_service(),
        names.namespace
    );
    let mut args = vec![
        "--name=$(POD_NAME)".to_string(),
        format!("--data-dir={DATA_MOUNT}/data"),
    ];
    args.extend(serving.args(&host));
    args.extend([
        "--initial-cluster=$(INITIAL_CLUSTER)".to_string(),
        "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".to_string(),
        "--initial-cluster-token=$(INITIAL_CLUSTER_TOKEN)".to_string(),
    ]);
    args.extend(server_args(&ec.spec.server).0);
    args
}

/// The Secret volumes and their mounts of a member serving TLS.
fn tls_volumes(serving: &Serving) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let sides = [
        (tls::CLIENT_VOLUME, "client", &serving.client),
        (tls::PEER_VOLUME, "peer", &serving.peer),
    ];
    for (volume, dir, secret) in sides {
        let Some(secret) = secret else { continue };
        volumes.push(Volume {
            name: volume.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                // Readable by the members' group (fsGroup), not by others.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume.to_string(),
            mount_path: format!("{}/{dir}", tls::MOUNT),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// The members' affinity: the user's, plus anti-affinity between this cluster's members.
pub fn affinity(ec: &EtcdCluster) -> Affinity {
    let spec = &ec.spec;
    let term = PodAffinityTerm {
        label_selector: Some(member_selector(ec)),
        topology_key: spec.anti_affinity.topology_key.clone(),
        ..PodAffinityTerm::default()
    };
    let mut affinity = spec.pod_template.affinity.clone().unwrap_or_default();
    let anti = affinity
        .pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default);
    match spec.anti_affinity.mode {
        AntiAffinityMode::Preferred => anti
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }),
        AntiAffinityMode::Required => anti
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(term),
    }
    affinity
}

fn probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Every container of a member pod: no privileges, read-only root, no capabilities.
pub(crate) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The image members run: `spec.image`; else `spec.version` of `default_image`'s repository;
/// else `default_image`.
pub fn image(ec: &EtcdCluster, default_image: &str) -> String {
    if let Some(image) = &ec.spec.image {
        return image.clone();
    }
    match &ec.spec.version {
        Some(version) => {
            // The repository: everything before the tag (a `:` after the last `/`).
            let slash = default_image.rfind('/').map_or(0, |i| i + 1);
            let repo = match default_image[slash..].find([':', '@']) {
                Some(i) => &default_image[..slash + i],
                None => default_image,
            };
            format!("{repo}:{version}")
        }
        None => default_image.to_string(),
    }
}

/// The cairn container's image in a StatefulSet built here.
pub fn image_of(sts: &StatefulSet) -> Option<&str> {
    sts.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == "cairn")?
        .image
        .as_deref()
}

/// Sets the cairn image: of the cairn container and of the init containers that run it.
pub fn set_image(sts: &mut StatefulSet, image: &str) {
    let Some(old) = image_of(sts).map(str::to_string) else {
        return;
    };
    let Some(pod) = sts.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    let inits = pod.init_containers.iter_mut().flatten();
    for c in pod.containers.iter_mut().chain(inits) {
        if c.image.as_deref() == Some(old.as_str()) {
            c.image = Some(image.to_string());
        }
    }
}

/// The members' StatefulSet with `replicas` pods, running [`image`].
/// The template does not depend on the size, so growing or shrinking it restarts no running
/// member.
pub fn statefulset(ec: &EtcdCluster, replicas: i32, default_image: &str) -> StatefulSet {
    statefulset_restoring(ec, replicas, default_image, None, &Serving::default())
}

/// Where the first member of a cluster restored from a backup gets its data.
#[derive(Clone, Debug, PartialEq)]
pub struct Restore {
    /// The backup's object key (resolved once: the template never changes afterwards).
    pub key: String,
    pub destination: crate::crd::BackupDestination,
    /// The operator's image, which downloads and verifies the backup.
    pub operator_image: String,
    /// An etcd snapshot (`spec.bootstrap.fromEtcdSnapshot`): no manifest; its own trailing
    /// SHA-256 is checked by the restore.
    pub etcd_snapshot: bool,
    /// The identity the downloading pod takes when the destination names no credentials
    /// Secret.
    pub identity: BackupIdentity,
}

impl Restore {
    /// Whether the downloading pod runs as the cluster's backup ServiceAccount
    /// ([`backup_service_account`]): the destination names no credentials Secret (ambient
    /// credentials) and the operator was given a backup identity.
    pub fn ambient(&self) -> bool {
        self.destination.credentials_secret().is_none() && self.identity.is_set()
    }
}

impl BackupIdentity {
    /// Whether one was configured (the chart's `backupIdentity`). Without one, pods that
    /// download with ambient credentials run as the namespace's default ServiceAccount.
    pub fn is_set(&self) -> bool {
        !self.annotations.is_empty() || !self.pod_labels.is_empty()
    }
}

/// Keeps a running StatefulSet's identity in `desired`: its pods' ServiceAccount, and of the
/// identity's pod labels only those its template has. A cluster made before the identity was
/// configured (or by an operator without it) is not rolled onto it, nor off it.
pub fn keep_identity(desired: &mut StatefulSet, running: &StatefulSet, id: &BackupIdentity) {
    let template = |s: &StatefulSet| s.spec.as_ref().map(|s| s.template.clone());
    let Some(old) = template(running) else { return };
    let Some(new) = desired.spec.as_mut().map(|s| &mut s.template) else {
        return;
    };
    if let Some(pod) = new.spec.as_mut() {
        pod.service_account_name = old.spec.and_then(|p| p.service_account_name);
    }
    let old_labels = old.metadata.and_then(|m| m.labels).unwrap_or_default();
    if let Some(labels) = new.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        for k in id.pod_labels.keys() {
            match old_labels.get(k) {
                Some(v) => {
                    labels.insert(k.clone(), v.clone());
                }
                None => {
                    labels.remove(k);
                }
            }
        }
    }
}

/// The identity of pods that reach object storage with ambient credentials (a restore's
/// download, a verification Job). Workload identity (EKS IRSA, GKE, Azure) binds a cloud
/// identity to a ServiceAccount through its annotations, so the operator makes one per cluster
/// with the annotations it is given (the chart's `backupIdentity`; none by default: an
/// identity that reads backups is the administrator's choice, and every pod of the namespace
/// could run as it), and gives those pods the labels some platforms ask for (Azure's
/// `azure.workload.identity/use: "true"`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupIdentity {
    pub annotations: BTreeMap<String, String>,
    pub pod_labels: BTreeMap<String, String>,
}

/// The ServiceAccount of a cluster's pods that reach object storage with ambient credentials.
/// It mounts no API token of its own: those pods never talk to Kubernetes (the platforms'
/// identity webhooks project their own tokens).
pub fn backup_service_account(ec: &EtcdCluster, id: &BackupIdentity) -> ServiceAccount {
    let names = Names::of(ec);
    let mut metadata = meta(ec, names.backup_service_account());
    metadata.annotations = (!id.annotations.is_empty()).then(|| id.annotations.clone());
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// Where a restore's download lands, inside the member's volume.
pub const RESTORE_FILE: &str = "/var/lib/cairn/restore.snap";

/// On the StatefulSet of a restored cluster: the backup key it started from. The controller
/// reads it back, so that the members' template keeps its restore containers even when it
/// reconciles from a stale status.
pub const RESTORED_FROM_ANNOTATION: &str = "cairn.dev/restored-from";

/// The init containers of a restored cluster's members. On ordinal 0 with no data yet, the
/// first downloads the backup and checks its SHA-256 (a mismatch stops the pod, with the reason
/// in its termination message), the second turns it into the data dir of the first member of a
/// new cluster; everywhere else both do nothing, and the other members join the first.
fn restore_containers(r: &Restore, cairn_image: &str, env: &[EnvVar]) -> Vec<Container> {
    let data_dir = format!("{DATA_MOUNT}/data");
    let mount = vec![VolumeMount {
        name: DATA_VOLUME.to_string(),
        mount_path: DATA_MOUNT.to_string(),
        ..VolumeMount::default()
    }];
    let security = Some(container_security());
    vec![
        fetch_container(r, RESTORE_FILE, Some(&data_dir), env, mount.clone()),
        Container {
            name: "restore".to_string(),
            image: Some(cairn_image.to_string()),
            args: Some(vec![
                "snapshot".to_string(),
                "restore".to_string(),
                RESTORE_FILE.to_string(),
                "--if-needed".to_string(),
                format!("--data-dir={data_dir}"),
                "--name=$(POD_NAME)".to_string(),
                "--initial-cluster=$(INITIAL_CLUSTER)".to_string(),
                "--initial-cluster-token=$(INITIAL_CLUSTER_TOKEN)".to_string(),
            ]),
            env: Some(env.to_vec()),
            volume_mounts: Some(mount),
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            security_context: security,
            ..Container::default()
        },
    ]
}

/// The container that downloads backup `r.key` into `out` (its SHA-256 checked against the
/// manifest), unless `data_dir` exists.
fn fetch_container(
    r: &Restore,
    out: &str,
    data_dir: Option<&str>,
    env: &[EnvVar],
    mount: Vec<VolumeMount>,
) -> Container {
    let mut fetch_args = vec![
        "fetch-backup".to_string(),
        format!("--key={}", r.key),
        format!("--out={out}"),
    ];
    if let Some(d) = data_dir {
        fetch_args.push(format!("--data-dir={d}"));
    }
    if r.etcd_snapshot {
        fetch_args.push("--etcd-snapshot".to_string());
    }
    let mut fetch_env = env.to_vec();
    if let Some(e) = &r.destination.encryption {
        fetch_args.push(format!("--encryption-key-id={}", e.id()));
        fetch_env.push(env_from_secret(
            "CAIRN_BACKUP_KEY",
            &e.secret_name,
            crate::crd::BACKUP_KEY_SECRET_KEY,
            false,
        ));
    }
    match r.destination.store() {
        // S3 as flags, as before other stores came: the pods of clusters restored from S3 keep
        // their template (no roll when the operator is upgraded).
        Ok(Store::S3(s3)) => {
            fetch_args.push(format!("--bucket={}", s3.bucket));
            if let Some(region) = &s3.region {
                fetch_args.push(format!("--region={region}"));
            }
            if let Some(e) = &s3.endpoint {
                fetch_args.push(format!("--endpoint={e}"));
            }
            if s3.force_path_style {
                fetch_args.push("--force-path-style".to_string());
            }
        }
        // Any other store as the destination itself (its encryption goes by the flags above).
        _ => {
            let plain = crate::crd::BackupDestination {
                encryption: None,
                ..r.destination.clone()
            };
            fetch_args.push(format!(
                "--destination={}",
                serde_json::to_string(&plain).expect("a destination serializes")
            ));
        }
    }
    if let (Some(secret), Ok(store)) = (r.destination.credentials_secret(), r.destination.store()) {
        for (key, required) in store.credential_keys() {
            fetch_env.push(env_from_secret(key, &secret, key, !required));
        }
    }
    Container {
        name: "fetch-backup".to_string(),
        image: Some(r.operator_image.clone()),
        args: Some(fetch_args),
        env: Some(fetch_env),
        volume_mounts: Some(mount),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// The pod security context of the operator's pods (members, verification Jobs): a fixed
/// non-root user and group owning the volumes, the runtime's seccomp profile.
pub(crate) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        run_as_non_root: Some(true),
        // The Pod Security "restricted" level asks for it.
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// Labels of a backup verification Job (and its pod).
pub const VERIFY_LABEL: &str = "cairn.dev/verify";

/// The name of the Job that verifies backup `key` of cluster `cluster`.
pub fn verify_job_name(cluster: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    // A Job's name is also a label value (its pods' `job-name`): 63 characters at most.
    let base: String = cluster.chars().take(63 - "-verify-".len() - 8).collect();
    format!("{}-verify-{short}", base.trim_end_matches(['-', '.']))
}

/// The Job that verifies backup `rec` (at `r`'s destination): the operator's image downloads
/// it into a scratch volume (SHA-256 checked against the manifest), then cairn's restores it
/// into a scratch member with no peers and compares its revision, key count and HashKV with
/// the record (`cairn snapshot verify`). It runs once (no retries), is given an hour, and is
/// deleted an hour after it finished.
pub fn verify_job(ec: &EtcdCluster, r: &Restore, rec: &BackupRecord, cairn_image: &str) -> Job {
    let names = Names::of(ec);
    let name = verify_job_name(&names.cluster, &rec.key);
    let scratch = "/scratch";
    let mount = vec![VolumeMount {
        name: "scratch".to_string(),
        mount_path: scratch.to_string(),
        ..VolumeMount::default()
    }];
    let file = format!("{scratch}/backup.snap");
    let mut args = vec![
        "snapshot".to_string(),
        "verify".to_string(),
        file.clone(),
        format!("--revision={}", rec.revision),
        format!("--scratch-dir={scratch}/member"),
    ];
    if let Some(k) = rec.keys {
        args.push(format!("--keys={k}"));
    }
    if let Some(h) = rec.hash {
        args.push(format!("--hash={h}"));
    }
    if let Some(c) = rec.hash_compact_revision {
        args.push(format!("--hash-compact-revision={c}"));
    }
    // Not the members' labels: nothing that selects members (the StatefulSet, the PDB, the
    // Services) may select this pod.
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "cairn-verify".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), ec.name_any()),
        (VERIFY_LABEL.to_string(), name.clone()),
    ]);
    let mut pod_labels = labels.clone();
    if r.ambient() {
        for (k, v) in &r.identity.pod_labels {
            pod_labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Job {
        metadata: ObjectMeta {
            labels: Some(labels),
            ..meta(ec, name)
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(3600),
            ttl_seconds_after_finished: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_string()),
                    service_account_name: r.ambient().then(|| names.backup_service_account()),
                    security_context: Some(pod_security()),
                    init_containers: Some(vec![fetch_container(
                        r,
                        &file,
                        None,
                        &[],
                        mount.clone(),
                    )]),
                    containers: vec![Container {
                        name: "verify".to_string(),
                        image: Some(cairn_image.to_string()),
                        args: Some(args),
                        volume_mounts: Some(mount),
                        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
                        security_context: Some(container_security()),
                        ..Container::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "scratch".to_string(),
                        empty_dir: Some(Default::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

/// [`statefulset`], with the init containers of a restore when `restore` is given.
pub fn statefulset_restoring(
    ec: &EtcdCluster,
    replicas: i32,
    default_image: &str,
    restore: Option<&Restore>,
    serving: &Serving,
) -> StatefulSet {
    let names = Names::of(ec);
    let spec = &ec.spec;
    let tmpl = &spec.pod_template;
    let configmap = names.configmap();

    let mut pod_labels = tmpl.labels.clone();
    let ambient = restore.filter(|r| r.ambient());
    if let Some(r) = ambient {
        pod_labels.extend(r.identity.pod_labels.clone());
    }
    pod_labels.extend(labels(ec));
    let (tls_volumes, tls_mounts) = tls_volumes(serving);
    // Probes (which present no certificate) and Prometheus use the plain metrics port.
    let probe_port = METRICS_PORT;
    let ports = vec![
        ContainerPort {
            name: Some("client".to_string()),
            container_port: CLIENT_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        },
        ContainerPort {
            name: Some("peer".to_string()),
            container_port: PEER_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        },
        ContainerPort {
            name: Some("metrics".to_string()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        },
    ];

    let container = Container {
        name: "cairn".to_string(),
        image: Some(image(ec, default_image)),
        args: Some(member_args(ec, serving)),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".to_string(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".to_string(),
                        api_version: None,
                    }),
                    ..EnvVarSource::default()
                }),
            },
            env_from_configmap("INITIAL_CLUSTER", &configmap, KEY_INITIAL_CLUSTER),
            env_from_configmap(
                "INITIAL_CLUSTER_STATE",
                &configmap,
                KEY_INITIAL_CLUSTER_STATE,
            ),
            env_from_configmap(
                "INITIAL_CLUSTER_TOKEN",
                &configmap,
                KEY_INITIAL_CLUSTER_TOKEN,
            ),
            // cairn reads it itself: empty (or, from a ConfigMap of an older operator, unset)
            // unless a quorum-loss recovery restarts one member alone.
            optional(env_from_configmap(
                "ETCD_EXPERIMENTAL_FORCE_NEW_CLUSTER_ONCE",
                &configmap,
                KEY_FORCE_NEW_CLUSTER_ONCE,
            )),
            // Keep the full backtrace of a crash in the termination message.
            env_value("RUST_BACKTRACE", "1"),
        ]),
        ports: Some(ports),
        // Ready = a voter that has caught up (cairn's `/readyz?voter`): a learner, or a member
        // far behind the leader, is kept out of the client Service's endpoints. Releases before
        // it ignore the query and answer as etcd's `/readyz`.
        readiness_probe: Some(probe("/readyz?voter", probe_port, 5, 3)),
        // Liveness only restarts a process that stopped answering HTTP; it never depends on
        // quorum, so a partitioned cluster is not restarted into a worse state.
        liveness_probe: Some(probe("/livez", probe_port, 10, 6)),
        resources: spec.resources.as_ref().map(|r| r.requirements()),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: DATA_VOLUME.to_string(),
                mount_path: DATA_MOUNT.to_string(),
                ..VolumeMount::default()
            })
            .chain(tls_mounts)
            .collect(),
        ),
        // A member that refuses to start (e.g. "member … has already been bootstrapped" after
        // losing its data) says why in the pod status; the controller reads it to repair.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(container_security()),
        ..Container::default()
    };

    let pvc = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(selector_labels(ec)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(spec.storage.size.clone()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    };

    let mut metadata = meta(ec, names.statefulset());
    if let Some(r) = restore {
        metadata
            .annotations
            .get_or_insert_default()
            .insert(RESTORED_FROM_ANNOTATION.to_string(), r.key.clone());
    }
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.peer_service()),
            // The first members must start together: none is ready before a quorum runs.
            pod_management_policy: Some("Parallel".to_string()),
            selector: member_selector(ec),
            // The operator restarts members into a new template itself, one at a time and only
            // while the others are healthy and caught up (see `rollout`).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                rolling_update: None,
            }),
            // The controller deletes a removed member's volume itself; deleting the
            // EtcdCluster keeps the data.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".to_string()),
                    when_scaled: Some("Delete".to_string()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!tmpl.annotations.is_empty()).then(|| tmpl.annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    init_containers: restore.map(|r| {
                        restore_containers(
                            r,
                            container.image.as_deref().unwrap_or_default(),
                            container.env.as_deref().unwrap_or_default(),
                        )
                    }),
                    containers: vec![container],
                    volumes: (!tls_volumes.is_empty()).then_some(tls_volumes),
                    affinity: Some(affinity(ec)),
                    node_selector: (!tmpl.node_selector.is_empty())
                        .then(|| tmpl.node_selector.clone()),
                    tolerations: (!tmpl.tolerations.is_empty()).then(|| tmpl.tolerations.clone()),
                    priority_class_name: tmpl.priority_class_name.clone(),
                    // A restore downloading with ambient credentials: the cluster's backup
                    // ServiceAccount (workload identity). Otherwise the namespace's default.
                    service_account_name: ambient.map(|_| names.backup_service_account()),
                    security_context: Some(pod_security()),
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// How many voters may be down at once without losing quorum.
pub fn tolerated_failures(voters: i32) -> i32 {
    (voters.max(1) - 1) / 2
}

/// The PodDisruptionBudget: at most as many members unavailable as the voters can spare. With 1
/// or 2 voters that is none: draining a node then waits for the cluster to be resized.
pub fn pdb(ec: &EtcdCluster, voters: i32) -> PodDisruptionBudget {
    let names = Names::of(ec);
    PodDisruptionBudget {
        metadata: meta(ec, names.pdb()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(tolerated_failures(voters))),
            selector: Some(member_selector(ec)),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EtcdClusterSpec;
    use crate::layout::Layout;
    use k8s_openapi::api::core::v1::{
        NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        ResourceRequirements, Toleration,
    };

    fn cluster(spec: serde_json::Value) -> EtcdCluster {
        let spec: EtcdClusterSpec = serde_json::from_value(spec).unwrap();
        let mut ec = EtcdCluster::new("demo", spec);
        ec.metadata.namespace = Some("prod".to_string());
        ec.metadata.uid = Some("0f5e".to_string());
        ec
    }

    fn pod_spec(s: &StatefulSet) -> &PodSpec {
        s.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn a_verification_job_checks_the_record_and_selects_no_member() {
        let ec = cluster(serde_json::json!({"size": 3}));
        let restore = Restore {
            key: "e2e/prod/demo/0f5e/20261121T000000Z.snap".into(),
            destination: crate::crd::BackupDestination::default(),
            operator_image: "cairn-operator:1".into(),
            etcd_snapshot: false,
            identity: Default::default(),
        };
        let rec = BackupRecord {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            key: restore.key.clone(),
            size: 10,
            revision: 42,
            sha256: "ab".into(),
            keys: Some(7),
            hash: Some(99),
            hash_compact_revision: Some(3),
            encryption_key_id: None,
        };
        let job = verify_job(&ec, &restore, &rec, "cairn:1");
        assert_eq!(job.metadata.name, Some(verify_job_name("demo", &rec.key)));
        assert_ne!(
            verify_job_name("demo", &rec.key),
            verify_job_name("demo", "other")
        );
        let long = "a".repeat(60);
        assert!(verify_job_name(&long, &rec.key).len() <= 63);
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        let pod = spec.template.spec.as_ref().unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        for a in [
            "verify",
            "--revision=42",
            "--keys=7",
            "--hash=99",
            "--hash-compact-revision=3",
        ] {
            assert!(args.contains(&a.to_string()), "{args:?}");
        }
        let fetch = &pod.init_containers.as_ref().unwrap()[0];
        assert!(fetch
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--key={}", rec.key)));
        // A sealed destination: the fetch gets the key's id and the key from its Secret.
        let sealed = Restore {
            destination: crate::crd::BackupDestination {
                encryption: Some(crate::crd::BackupEncryption {
                    secret_name: "backup-key".into(),
                    key_id: None,
                }),
                ..Default::default()
            },
            ..restore.clone()
        };
        let job = verify_job(&ec, &sealed, &rec, "cairn:1");
        let fetch = &job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()[0];
        assert!(fetch
            .args
            .as_ref()
            .unwrap()
            .contains(&"--encryption-key-id=backup-key".to_string()));
        let env = fetch
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CAIRN_BACKUP_KEY")
            .unwrap();
        let r = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("backup-key", "key"));
        let job = verify_job(&ec, &restore, &rec, "cairn:1");
        let spec = job.spec.as_ref().unwrap();
        // Nothing that selects the members (StatefulSet, PDB, Services) selects this pod.
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        let members = selector_labels(&ec);
        assert!(
            !members.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{labels:?}"
        );
    }

    #[test]
    fn a_restored_statefulset_names_its_backup() {
        let ec = cluster(serde_json::json!({"size": 3}));
        let restore = Restore {
            key: "e2e/prod/demo/0f5e/20261121T000000Z.snap".into(),
            destination: crate::crd::BackupDestination::default(),
            operator_image: "cairn-operator:1".into(),
            etcd_snapshot: false,
            identity: Default::default(),
        };
        let s = statefulset_restoring(&ec, 1, "cairn:1", Some(&restore), &Serving::default());
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(ann.get(RESTORED_FROM_ANNOTATION), Some(&restore.key));
        let init: Vec<&str> = pod_spec(&s)
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["fetch-backup", "restore"]);
        // An etcd snapshot is fetched without a manifest.
        let fetch_args = |r: &Restore| {
            let s = statefulset_restoring(&ec, 1, "cairn:1", Some(r), &Serving::default());
            pod_spec(&s).init_containers.clone().unwrap()[0]
                .args
                .clone()
                .unwrap()
        };
        let etcd = Restore {
            etcd_snapshot: true,
            ..restore.clone()
        };
        assert!(fetch_args(&etcd).contains(&"--etcd-snapshot".to_string()));
        assert!(!fetch_args(&restore).contains(&"--etcd-snapshot".to_string()));
        let plain = statefulset(&ec, 1, "cairn:1");
        assert!(plain.metadata.annotations.is_none());
        assert!(pod_spec(&plain).init_containers.is_none());
    }

    /// A restore from GCS or Azure passes the destination as JSON (S3 keeps its flags, so an
    /// S3-restored cluster's template does not change) and the credentials Secret's keys of
    /// that store as environment variables; with no Secret the pods run as the cluster's backup
    /// ServiceAccount, with the identity's labels, and that ServiceAccount carries the
    /// identity's annotations and mounts no token.
    #[test]
    fn restores_reach_any_store_with_its_keys_or_the_backup_identity() {
        let ec = cluster(serde_json::json!({"size": 3}));
        let identity = BackupIdentity {
            annotations: BTreeMap::from([(
                "iam.gke.io/gcp-service-account".to_string(),
                "backups@p.iam.gserviceaccount.com".to_string(),
            )]),
            pod_labels: BTreeMap::from([(
                "azure.workload.identity/use".to_string(),
                "true".to_string(),
            )]),
        };
        let gcs = crate::crd::BackupDestination {
            gcs: Some(crate::crd::GcsDestination {
                bucket: "b".into(),
                credentials_secret: Some("gcs-key".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let restore = Restore {
            key: "p/x.snap".into(),
            destination: gcs.clone(),
            operator_image: "cairn-operator:1".into(),
            etcd_snapshot: false,
            identity: identity.clone(),
        };
        let s = statefulset_restoring(&ec, 1, "cairn:1", Some(&restore), &Serving::default());
        let fetch = &pod_spec(&s).init_containers.clone().unwrap()[0];
        let args = fetch.args.clone().unwrap();
        let json = args
            .iter()
            .find_map(|a| a.strip_prefix("--destination="))
            .expect("the destination as JSON");
        let parsed: crate::crd::BackupDestination = serde_json::from_str(json).unwrap();
        assert_eq!(parsed, gcs);
        assert!(!args.iter().any(|a| a.starts_with("--bucket")));
        let env: Vec<(String, String, bool)> = fetch
            .env
            .iter()
            .flatten()
            .filter_map(|e| {
                let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
                Some((e.name.clone(), r.name.clone(), r.optional.unwrap_or(false)))
            })
            .collect();
        assert_eq!(
            env,
            [(
                "GOOGLE_SERVICE_ACCOUNT_KEY".to_string(),
                "gcs-key".to_string(),
                false
            )]
        );
        // A Secret: the namespace's default ServiceAccount, no identity labels.
        assert_eq!(pod_spec(&s).service_account_name, None);
        let labels = s
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone();
        assert!(!labels.unwrap().contains_key("azure.workload.identity/use"));

        // No Secret: the backup identity, here and in a verification Job.
        let ambient = Restore {
            destination: crate::crd::BackupDestination {
                azure: Some(crate::crd::AzureDestination {
                    account: "a".into(),
                    container: "c".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..restore.clone()
        };
        let s = statefulset_restoring(&ec, 1, "cairn:1", Some(&ambient), &Serving::default());
        assert_eq!(
            pod_spec(&s).service_account_name.as_deref(),
            Some("demo-backup")
        );
        let labels = s
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        assert_eq!(
            labels
                .get("azure.workload.identity/use")
                .map(String::as_str),
            Some("true")
        );
        // The selector's labels still win.
        for (k, v) in selector_labels(&ec) {
            assert_eq!(labels.get(&k), Some(&v));
        }
        let rec = BackupRecord {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            key: "p/x.snap".into(),
            size: 1,
            revision: 2,
            sha256: "00".into(),
            keys: None,
            hash: None,
            hash_compact_revision: None,
            encryption_key_id: None,
        };
        let job = verify_job(&ec, &ambient, &rec, "cairn:1");
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("demo-backup"));
        let job = verify_job(&ec, &restore, &rec, "cairn:1");
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name, None);

        let sa = backup_service_account(&ec, &identity);
        assert_eq!(sa.metadata.name.as_deref(), Some("demo-backup"));
        assert_eq!(sa.metadata.annotations, Some(identity.annotations.clone()));
        assert_eq!(sa.automount_service_account_token, Some(false));
        assert!(sa.metadata.owner_references.is_some());
        // No identity configured: the namespace's default ServiceAccount, no labels added.
        let unset = Restore {
            identity: BackupIdentity::default(),
            ..ambient.clone()
        };
        let plain = statefulset_restoring(&ec, 1, "cairn:1", Some(&unset), &Serving::default());
        assert_eq!(pod_spec(&plain).service_account_name, None);
        // A running StatefulSet keeps the identity its template has, with or without it: no
        // roll when the identity is configured later, or the operator upgraded.
        let mut desired = s.clone();
        keep_identity(&mut desired, &plain, &identity);
        assert_eq!(pod_spec(&desired).service_account_name, None);
        let labels = desired
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert!(!labels
            .labels
            .as_ref()
            .unwrap()
            .contains_key("azure.workload.identity/use"));
        assert_eq!(
            desired.spec.as_ref().unwrap().template,
            plain.spec.as_ref().unwrap().template
        );
        let mut desired = plain.clone();
        keep_identity(&mut desired, &s, &identity);
        assert_eq!(
            desired.spec.as_ref().unwrap().template,
            s.spec.as_ref().unwrap().template
        );
        // A plain cluster never names it.
        assert_eq!(
            pod_spec(&statefulset(&ec, 1, "cairn:1")).service_account_name,
            None
        );
    }

    #[test]
    fn names_are_derived_from_the_cluster() {
        let n = Names::of(&cluster(serde_json::json!({})));
        assert_eq!(n.member(2), "demo-2");
        assert_eq!(n.pvc(2), "data-demo-2");
        assert_eq!(n.peer_url(0), "http://demo-0.demo-peer.prod.svc:2380");
        assert_eq!(n.client_url(1), "http://demo-1.demo-peer.prod.svc:2379");
        assert_eq!(n.ordinal("demo-12"), Some(12));
        for not in [
            "demo", "demo-", "demo-x", "demo-01", "other-1", "demo-1-2", "demo-64",
        ] {
            assert_eq!(n.ordinal(not), None, "{not}");
        }
        assert_eq!(
            n.initial_cluster(&(0..2).collect::<Vec<_>>()),
            "demo-0=http://demo-0.demo-peer.prod.svc:2380,demo-1=http://demo-1.demo-peer.prod.svc:2380"
        );
    }

    #[test]
    fn every_child_is_owned_by_the_cluster_and_labelled() {
        let ec = cluster(serde_json::json!({}));
        let b = Bootstrap {
            initial_cluster: String::new(),
            new_cluster: true,
        };
        let metas = [
            peer_service(&ec).metadata,
            client_service(&ec).metadata,
            bootstrap_configmap(&ec, &b, None).metadata,
            statefulset(&ec, 3, &default_image()).metadata,
            pdb(&ec, 3).metadata,
        ];
        for m in metas {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.kind, "EtcdCluster");
            assert_eq!(owner.api_version, "cairn.dev/v1alpha1");
            assert_eq!(owner.name, "demo");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("prod"));
            let l = m.labels.unwrap();
            assert_eq!(l["app.kubernetes.io/instance"], "demo");
            assert_eq!(l["app.kubernetes.io/managed-by"], "cairn-operator");
        }
    }

    #[test]
    fn services_headless_peers_published_before_ready() {
        let ec = cluster(serde_json::json!({}));
        let peer = peer_service(&ec).spec.unwrap();
        assert_eq!(peer.cluster_ip.as_deref(), Some("None"));
        assert_eq!(peer.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = peer.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![2380, 2379]);
        let client = client_service(&ec);
        assert_eq!(client.metadata.name.as_deref(), Some("demo"));
        let spec = client.spec.unwrap();
        assert_eq!(spec.publish_not_ready_addresses, None);
        assert_eq!(spec.selector.unwrap(), selector_labels(&ec));
        assert_eq!(spec.ports.unwrap()[0].port, 2379);
    }

    #[test]
    fn bootstrap_configmap_new_then_existing() {
        let ec = cluster(serde_json::json!({}));
        let names = Names::of(&ec);
        let b = Bootstrap {
            initial_cluster: names.initial_cluster(&(0..3).collect::<Vec<_>>()),
            new_cluster: true,
        };
        let cm = bootstrap_configmap(&ec, &b, None);
        assert_eq!(cm.metadata.name.as_deref(), Some("demo-bootstrap"));
        let d = cm.data.unwrap();
        assert_eq!(d[KEY_INITIAL_CLUSTER_STATE], "new");
        assert_eq!(d[KEY_INITIAL_CLUSTER_TOKEN], "demo-0f5e");
        assert_eq!(d[KEY_INITIAL_CLUSTER].matches("=http://").count(), 3);
        let b = Bootstrap {
            new_cluster: false,
            ..b
        };
        assert_eq!(
            bootstrap_configmap(&ec, &b, None).data.unwrap()[KEY_INITIAL_CLUSTER_STATE],
            "existing"
        );
    }

    #[test]
    fn statefulset_carries_every_spec_field() {
        let ec = cluster(serde_json::json!({
            "size": 5,
            "image": "registry.local/cairn:test",
            "storage": {"size": "20Gi", "storageClassName": "fast"},
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
            "podTemplate": {
                "labels": {"team": "infra", "app.kubernetes.io/instance": "spoofed"},
                "annotations": {"prometheus.io/scrape": "true"},
                "nodeSelector": {"disk": "ssd"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "etcd", "effect": "NoSchedule"}],
                "priorityClassName": "system-cluster-critical"
            }
        }));
        let sts = statefulset(&ec, 4, &default_image());
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(4));
        assert_eq!(spec.service_name.as_deref(), Some("demo-peer"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap(),
            &selector_labels(&ec)
        );
        let meta = spec.template.metadata.as_ref().unwrap();
        let l = meta.labels.as_ref().unwrap();
        assert_eq!(l["team"], "infra");
        assert_eq!(
            l["app.kubernetes.io/instance"], "demo",
            "our selector label wins"
        );
        assert_eq!(
            meta.annotations.as_ref().unwrap()["prometheus.io/scrape"],
            "true"
        );
        let pod = pod_spec(&sts);
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "ssd");
        assert_eq!(
            pod.tolerations.as_ref().unwrap()[0],
            Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("etcd".into()),
                effect: Some("NoSchedule".into()),
                toleration_seconds: None
            }
        );
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-cluster-critical")
        );
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/cairn:test"));
        let want: ResourceRequirements = serde_json::from_value(serde_json::json!(
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
        ))
        .unwrap();
        assert_eq!(c.resources.as_ref(), Some(&want));
        let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(pvc.metadata.name.as_deref(), Some("data"));
        let pvc = pvc.spec.as_ref().unwrap();
        assert_eq!(pvc.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            pvc.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"],
            Quantity("20Gi".into())
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, DATA_MOUNT);
    }

    #[test]
    fn image_from_spec_image_or_version_of_the_default_repository() {
        let with = |spec| cluster(spec);
        let ec = with(serde_json::json!({}));
        assert_eq!(image(&ec, "cairn:0.2.0"), "cairn:0.2.0");
        let ec = with(serde_json::json!({"version": "0.1.0"}));
        assert_eq!(image(&ec, "cairn:0.2.0"), "cairn:0.1.0");
        assert_eq!(
            image(&ec, "registry:5000/team/cairn:0.2.0"),
            "registry:5000/team/cairn:0.1.0"
        );
        assert_eq!(
            image(&ec, "registry:5000/cairn@sha256:ab"),
            "registry:5000/cairn:0.1.0"
        );
        assert_eq!(image(&ec, "cairn"), "cairn:0.1.0");
        let ec = with(serde_json::json!({"version": "0.1.0", "image": "mine/cairn:dev"}));
        assert_eq!(image(&ec, "cairn:0.2.0"), "mine/cairn:dev");
        let mut sts = statefulset(&ec, 3, "cairn:0.2.0");
        assert_eq!(image_of(&sts), Some("mine/cairn:dev"));
        set_image(&mut sts, "cairn:0.1.0");
        assert_eq!(image_of(&sts), Some("cairn:0.1.0"));
        assert_eq!(
            sts.spec.unwrap().update_strategy.unwrap().type_.as_deref(),
            Some("OnDelete")
        );
    }

    #[test]
    fn statefulset_defaults_and_size_independent_template() {
        let ec = cluster(serde_json::json!({}));
        let a = statefulset(&ec, 1, &default_image());
        let b = statefulset(&ec, 7, &default_image());
        assert_eq!(
            a.spec.as_ref().unwrap().template,
            b.spec.as_ref().unwrap().template
        );
        let c = &pod_spec(&a).containers[0];
        assert_eq!(c.image.as_deref(), Some(default_image().as_str()));
        assert!(c.resources.is_none());
        let pvc = a
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
            .as_ref()
            .unwrap()[0]
            .spec
            .clone()
            .unwrap();
        assert_eq!(pvc.storage_class_name, None);
        assert_eq!(
            pvc.resources.unwrap().requests.unwrap()["storage"],
            Quantity("8Gi".into())
        );
        let policy = a
            .spec
            .as_ref()
            .unwrap()
            .persistent_volume_claim_retention_policy
            .clone()
            .unwrap();
        assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
    }

    #[test]
    fn server_settings_become_flags_and_extra_args_are_checked() {
        let ec = cluster(serde_json::json!({}));
        let (args, refused) = server_args(&ec.spec.server);
        // Compaction on by default: periodic, an hour.
        assert_eq!(
            args,
            vec![
                "--auto-compaction-mode=periodic",
                "--auto-compaction-retention=1h"
            ]
        );
        assert!(refused.is_empty());
        let ec = cluster(serde_json::json!({"server": {
            "autoCompactionMode": "revision", "autoCompactionRetention": "1000",
            "quotaBackendBytes": 8589934592i64, "snapshotCount": 5000, "heartbeatInterval": 200,
            "electionTimeout": 2000, "maxRequestBytes": 3145728, "logLevel": "warn",
            "extraArgs": ["--max-txn-ops=256", "--auth-token-ttl=600", "--name=evil",
                          "--snapshot-count=1", "--no-such-flag", "snapshot", "--max-txn-ops=1"]}}));
        let (args, refused) = server_args(&ec.spec.server);
        for want in [
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=1000",
            "--quota-backend-bytes=8589934592",
            "--snapshot-count=5000",
            "--heartbeat-interval=200",
            "--election-timeout=2000",
            "--max-request-bytes=3145728",
            "--log-level=warn",
            "--max-txn-ops=256",
            "--auth-token-ttl=600",
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
        assert_eq!(args.len(), 10, "{args:?}");
        assert_eq!(refused.len(), 5, "{refused:?}");
        for (arg, why) in [
            ("--name=evil", "set by the operator"),
            ("--snapshot-count=1", "set by a field of spec.server"),
            ("--no-such-flag", "cairn has no flag"),
            ("snapshot", "not a --flag"),
            ("--max-txn-ops=1", "given twice"),
        ] {
            assert!(
                refused.iter().any(|r| r.contains(arg) && r.contains(why)),
                "{arg}: {refused:?}"
            );
        }
        // They reach the members' flags, after the operator's own.
        let sts = statefulset(&ec, 3, "cairn:1");
        let c = &pod_spec(&sts).containers[0];
        let member = c.args.as_ref().unwrap();
        assert!(member.contains(&"--max-txn-ops=256".to_string()));
        assert!(!member.contains(&"--name=evil".to_string()));
        // And the pods run with the RuntimeDefault seccomp profile ("restricted").
        let sc = pod_spec(&sts).security_context.as_ref().unwrap();
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn probes_and_flags() {
        let ec = cluster(serde_json::json!({}));
        let sts = statefulset(&ec, 3, &default_image());
        let c = &pod_spec(&sts).containers[0];
        let path = |p: &Option<Probe>| {
            let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
            (g.path.clone().unwrap(), g.port.clone())
        };
        assert_eq!(
            path(&c.readiness_probe),
            ("/readyz?voter".to_string(), IntOrString::Int(2381))
        );
        assert_eq!(
            path(&c.liveness_probe),
            ("/livez".to_string(), IntOrString::Int(2381))
        );
        let args = c.args.as_ref().unwrap();
        for want in [
            "--name=$(POD_NAME)",
            "--data-dir=/var/lib/cairn/data",
            "--listen-client-urls=http://0.0.0.0:2379",
            "--advertise-client-urls=http://$(POD_NAME).demo-peer.prod.svc:2379",
            "--listen-peer-urls=http://0.0.0.0:2380",
            "--initial-advertise-peer-urls=http://$(POD_NAME).demo-peer.prod.svc:2380",
            "--initial-cluster=$(INITIAL_CLUSTER)",
            "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)",
            "--initial-cluster-token=$(INITIAL_CLUSTER_TOKEN)",
            "--listen-metrics-urls=http://0.0.0.0:2381",
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
        // Every $(VAR) in the flags is defined before use, as the kubelet requires.
        let env = c.env.as_ref().unwrap();
        for var in [
            "POD_NAME",
            "INITIAL_CLUSTER",
            "INITIAL_CLUSTER_STATE",
            "INITIAL_CLUSTER_TOKEN",
        ] {
            let e = env
                .iter()
                .find(|e| e.name == var)
                .unwrap_or_else(|| panic!("{var}"));
            if var != "POD_NAME" {
                let r = e
                    .value_from
                    .as_ref()
                    .unwrap()
                    .config_map_key_ref
                    .as_ref()
                    .unwrap();
                assert_eq!(r.name, "demo-bootstrap");
            }
        }
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn anti_affinity_preferred_by_default_required_on_request() {
        let ec = cluster(serde_json::json!({}));
        let a = affinity(&ec).pod_anti_affinity.unwrap();
        let p = &a
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(p.weight, 100);
        assert_eq!(p.pod_affinity_term.topology_key, "kubernetes.io/hostname");
        assert_eq!(
            p.pod_affinity_term
                .label_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap(),
            &selector_labels(&ec)
        );
        assert!(a
            .required_during_scheduling_ignored_during_execution
            .is_none());

        let ec = cluster(serde_json::json!({
            "antiAffinity": {"mode": "required", "topologyKey": "topology.kubernetes.io/zone"}
        }));
        let sts = statefulset(&ec, 3, &default_image());
        let a = pod_spec(&sts)
            .affinity
            .clone()
            .unwrap()
            .pod_anti_affinity
            .unwrap();
        assert!(a
            .preferred_during_scheduling_ignored_during_execution
            .is_none());
        let r = &a
            .required_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(r.topology_key, "topology.kubernetes.io/zone");
    }

    #[test]
    fn user_affinity_is_kept_and_merged() {
        let node = NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "arch".into(),
                        operator: "In".into(),
                        values: Some(vec!["amd64".into()]),
                    }]),
                    match_fields: None,
                }],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        };
        let user_anti = WeightedPodAffinityTerm {
            weight: 10,
            pod_affinity_term: PodAffinityTerm {
                topology_key: "rack".into(),
                ..PodAffinityTerm::default()
            },
        };
        let ec = cluster(serde_json::json!({"podTemplate": {"affinity": {
            "nodeAffinity": serde_json::to_value(&node).unwrap(),
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [serde_json::to_value(&user_anti).unwrap()]}
        }}}));
        let a = affinity(&ec);
        assert_eq!(a.node_affinity, Some(node));
        let pref = a
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(pref.len(), 2);
        assert_eq!(pref[0], user_anti);
        assert_eq!(
            pref[1].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
    }

    #[test]
    fn pdb_never_allows_losing_quorum() {
        let ec = cluster(serde_json::json!({}));
        for (voters, unavailable) in [
            (1, 0),
            (2, 0),
            (3, 1),
            (4, 1),
            (5, 2),
            (6, 2),
            (7, 3),
            (9, 4),
        ] {
            let p = pdb(&ec, voters).spec.unwrap();
            assert_eq!(
                p.max_unavailable,
                Some(IntOrString::Int(unavailable)),
                "{voters} voters"
            );
            assert_eq!(p.min_available, None);
            // Whatever is disrupted, the rest still holds a majority.
            assert!(voters - unavailable > voters / 2);
        }
    }
}
