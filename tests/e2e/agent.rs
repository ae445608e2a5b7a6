//! A node agent written for the tests: it plays the scheduler and the kubelet of a few fake
//! nodes, running pods on the machine's Docker engine.
//!
//! - Scheduling: pending pods are bound (the `binding` subresource) to the node with the fewest
//!   pods of the same labels that satisfies the pod's nodeSelector and required pod
//!   anti-affinity on `kubernetes.io/hostname`.
//! - A pod is a sandbox container (a `sleep` on `cairn-base`) holding the pod's network
//!   namespace on one user-defined Docker network, plus one container per container of the pod
//!   joined to it. The pod IP is the sandbox's. Its hostname and the DNS names
//!   `hostname.subdomain.ns.svc[.cluster.local]` and those of every Service of the namespace
//!   that selects it (`svc.ns`, `svc.ns.svc[.cluster.local]`) are network aliases, so Docker's
//!   DNS answers them as cluster DNS would; `kubernetes.default.svc` is the API server.
//! - Volumes: a PVC is a Docker volume per claim (it survives the pod and is removed once the
//!   claim is gone), bound to a PersistentVolume and grown by [`crate::provisioner`]; emptyDir a volume per pod; Secrets and ConfigMaps (also projected) files
//!   written from the API. fsGroup is applied to writable volumes.
//! - Env (`value`, `fieldRef`, `configMapKeyRef`, `secretKeyRef`, `envFrom`, the
//!   `KUBERNETES_SERVICE_*` variables) and `$(VAR)` in command and args, as the kubelet does.
//! - Init containers in order, then the containers; restartPolicy with a back-off (shorter than
//!   the kubelet's); httpGet, tcpSocket and exec readiness and liveness probes; status (phase,
//!   IPs, conditions, container statuses with restart counts, last state and the termination
//!   message, FallbackToLogsOnError); graceful deletion (SIGTERM, the grace period, then the
//!   pod object is removed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Node, PersistentVolumeClaim, Pod, Probe, Secret, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::docker::{self, docker};

/// The image of pod sandboxes (it only needs `sleep`).
pub const SANDBOX_IMAGE: &str = "cairn-base:bookworm";

pub struct AgentConfig {
    pub client: Client,
    /// Prefix of every container and volume name, and value of their `cairn-e2e.run` label.
    pub run: String,
    pub network: String,
    /// The API server as containers reach it.
    pub api_host: String,
    pub api_port: u16,
    pub nodes: Vec<String>,
    /// Secret and ConfigMap volumes are written under here.
    pub files: std::path::PathBuf,
}

struct PodTask {
    tx: watch::Sender<Pod>,
    handle: JoinHandle<()>,
}

/// Starts the agent: registers the nodes, then schedules and runs pods until aborted.
pub async fn start(cfg: AgentConfig) -> JoinHandle<()> {
    let cfg = Arc::new(cfg);
    register_nodes(&cfg).await;
    crate::provisioner::install_classes(&cfg.client).await;
    tokio::spawn(async move {
        let mut tasks: HashMap<String, PodTask> = HashMap::new();
        let mut tick = 0u64;
        loop {
            if let Err(e) = crate::provisioner::round(&cfg.client).await {
                eprintln!("agent: {e}");
            }
            if let Err(e) = round(&cfg, &mut tasks).await {
                eprintln!("agent: {e}");
            }
            if tick % 4 == 0 {
                collect_volumes(&cfg).await;
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

async fn register_nodes(cfg: &AgentConfig) {
    let nodes: Api<Node> = Api::all(cfg.client.clone());
    for name in &cfg.nodes {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": name}},
        }))
        .unwrap();
        if let Err(e) = nodes.create(&PostParams::default(), &node).await {
            eprintln!("agent: create node {name}: {e}");
        }
        let status = json!({"status": {
            "capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": cfg.api_host},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "cairn e2e node agent",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                         "osImage": "docker", "containerRuntimeVersion": "docker://",
                         "kubeletVersion": "v1.20.0-e2e", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"}}});
        if let Err(e) = nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            eprintln!("agent: node {name} status: {e}");
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn round(cfg: &Arc<AgentConfig>, tasks: &mut HashMap<String, PodTask>) -> Result<(), String> {
    let pods: Api<Pod> = Api::all(cfg.client.clone());
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list pods: {e}"))?
        .items;
    let claims: Vec<PersistentVolumeClaim> = Api::all(cfg.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list claims: {e}"))?
        .items;
    for pod in &list {
        let Some(spec) = &pod.spec else { continue };
        match &spec.node_name {
            None if pod.metadata.deletion_timestamp.is_none() => {
                // As the scheduler: a pod whose claim is missing or being deleted stays
                // Pending (Kubernetes 1.20's StatefulSet controller does not make the claim
                // again for a pod that exists).
                if !claims_usable(pod, &claims) {
                    continue;
                }
                if let Some(node) = choose_node(cfg, pod, &list) {
                    bind(cfg, pod, &node).await;
                }
            }
            Some(node) if cfg.nodes.contains(node) => {
                let uid = pod.uid().unwrap_or_default();
                match tasks.get(&uid) {
                    Some(t) => {
                        t.tx.send_replace(pod.clone());
                    }
                    None if pod_finished(pod) => {}
                    None => {
                        let (tx, rx) = watch::channel(pod.clone());
                        let handle = tokio::spawn(run_pod(cfg.clone(), rx));
                        tasks.insert(uid, PodTask { tx, handle });
                    }
                }
            }
            _ => {}
        }
    }
    // A pod object gone (deleted with no grace, or by its namespace) ends its task too.
    let live: std::collections::HashSet<String> = list.iter().filter_map(|p| p.uid()).collect();
    tasks.retain(|uid, t| {
        if !live.contains(uid) {
            let mut gone = t.tx.borrow().clone();
            gone.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
            );
            gone.metadata.deletion_grace_period_seconds = Some(0);
            t.tx.send_replace(gone);
        }
        !t.handle.is_finished()
    });
    Ok(())
}

/// Whether every claim the pod mounts exists and is not being deleted.
fn claims_usable(pod: &Pod, claims: &[PersistentVolumeClaim]) -> bool {
    let ns = pod.namespace().unwrap_or_default();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .all(|pvc| {
            claims.iter().any(|c| {
                c.namespace().as_deref() == Some(ns.as_str())
                    && c.name_any() == pvc.claim_name
                    && c.metadata.deletion_timestamp.is_none()
            })
        })
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) && pod.metadata.deletion_timestamp.is_none()
}

/// Whether `selector` selects `labels` (matchLabels and matchExpressions).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = selector.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => !labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    ml && me
}

fn choose_node(cfg: &AgentConfig, pod: &Pod, all: &[Pod]) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let ns = pod.namespace().unwrap_or_default();
    let labels = pod.labels().clone();
    let on = |node: &str| -> Vec<&Pod> {
        all.iter()
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    && p.metadata.deletion_timestamp.is_none()
            })
            .collect()
    };
    let required: Vec<LabelSelector> = spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flatten()
        .filter(|t| t.topology_key == "kubernetes.io/hostname")
        .filter_map(|t| t.label_selector.clone())
        .collect();
    cfg.nodes
        .iter()
        .filter(|node| {
            spec.node_selector.iter().flatten().all(|(k, v)| {
                (k == "kubernetes.io/hostname" && v == *node)
                    || (k == "kubernetes.io/os" && v == "linux")
                    || (k == "topology.kubernetes.io/zone" && v == *node)
            })
        })
        .filter(|node| {
            !required.iter().any(|sel| {
                on(node)
                    .iter()
                    .any(|p| p.namespace().unwrap_or_default() == ns && selects(sel, p.labels()))
            })
        })
        .min_by_key(|node| {
            let pods = on(node);
            let same = pods.iter().filter(|p| p.labels() == &labels).count();
            (same, pods.len())
        })
        .cloned()
}

async fn bind(cfg: &AgentConfig, pod: &Pod, node: &str) {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(cfg.client.clone(), &ns);
    let body = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod.name_any(), "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    let res: Result<Value, _> = api
        .create_subresource("binding", &pod.name_any(), &PostParams::default(), &body)
        .await;
    if let Err(e) = res {
        eprintln!("agent: bind {ns}/{}: {e}", pod.name_any());
    }
}

/// Removes the Docker volume of every claim that no longer exists (once no container uses it).
async fn collect_volumes(cfg: &AgentConfig) {
    let filter = format!("label=cairn-e2e.claim-of={}", cfg.run);
    let Ok(out) = docker(&[
        "volume",
        "ls",
        "--filter",
        &filter,
        "--format",
        "{{.Name}} {{.Labels}}",
    ])
    .await
    else {
        return;
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::all(cfg.client.clone());
    let Ok(claims) = pvcs.list(&ListParams::default()).await else {
        return;
    };
    let existing: std::collections::HashSet<String> = claims
        .items
        .iter()
        .map(|c| {
            let name = claim_volume(cfg, &c.namespace().unwrap_or_default(), &c.name_any());
            format!("{name} {}", c.uid().unwrap_or_default())
        })
        .collect();
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let uid = line
            .split(CLAIM_UID_LABEL)
            .nth(1)
            .and_then(|r| r.strip_prefix('='))
            .map(|r| r.split([',', ' ']).next().unwrap_or_default())
            .unwrap_or_default();
        if !name.is_empty() && !existing.contains(&format!("{name} {uid}")) {
            let _ = docker(&["volume", "rm", name]).await;
        }
    }
}

/// The label that ties a Docker volume to one claim: a claim deleted and made again under the
/// same name gets a new, empty volume, as from a real provisioner.
const CLAIM_UID_LABEL: &str = "cairn-e2e.claim-uid";

pub fn claim_volume(cfg: &AgentConfig, ns: &str, claim: &str) -> String {
    claim_volume_name(&cfg.run, ns, claim)
}

/// The Docker volume of a PersistentVolumeClaim.
pub fn claim_volume_name(run: &str, ns: &str, claim: &str) -> String {
    format!("{run}-pvc-{ns}-{claim}")
}

// ---------------------------------------------------------------------------------------------
// One pod.

/// What is known of one container of the pod.
#[derive(Default, Clone)]
struct Track {
    restarts: i32,
    last: Option<Value>,
    ready: bool,
    /// Consecutive probe results.
    ready_ok: i32,
    ready_fail: i32,
    live_fail: i32,
    next_ready_probe: Option<tokio::time::Instant>,
    next_live_probe: Option<tokio::time::Instant>,
    /// When a stopped container may start again.
    restart_at: Option<tokio::time::Instant>,
    /// Terminated for good (restartPolicy).
    done: Option<Value>,
    started: Option<tokio::time::Instant>,
}

struct PodRun {
    cfg: Arc<AgentConfig>,
    api: Api<Pod>,
    pod: Pod,
    prefix: String,
    ip: String,
    mounts: Vec<(String, String, bool)>,
    /// emptyDir volumes and written file dirs, removed with the pod.
    scratch_volumes: Vec<String>,
    scratch_dirs: Vec<std::path::PathBuf>,
    init: Vec<Value>,
    initialized: bool,
    tracks: Vec<Track>,
    last_status: Value,
    start_time: String,
}

async fn run_pod(cfg: Arc<AgentConfig>, mut rx: watch::Receiver<Pod>) {
    let pod = rx.borrow().clone();
    let ns = pod.namespace().unwrap_or_default();
    let uid = pod.uid().unwrap_or_default();
    let prefix = format!(
        "{}-{}-{}-{}",
        cfg.run,
        ns,
        pod.name_any(),
        &uid[..8.min(uid.len())]
    );
    let mut run = PodRun {
        api: Api::namespaced(cfg.client.clone(), &ns),
        cfg,
        pod,
        prefix,
        ip: String::new(),
        mounts: vec![],
        scratch_volumes: vec![],
        scratch_dirs: vec![],
        init: vec![],
        initialized: false,
        tracks: vec![],
        last_status: Value::Null,
        start_time: now(),
    };
    let result = run.run(&mut rx).await;
    if let Err(e) = &result {
        eprintln!("agent: pod {ns}/{}: {e}", run.pod.name_any());
    }
    run.teardown().await;
}

impl PodRun {
    fn spec(&self) -> &k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.as_ref().unwrap()
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    async fn run(&mut self, rx: &mut watch::Receiver<Pod>) -> Result<(), String> {
        self.start_sandbox().await?;
        self.prepare_volumes().await?;
        let containers = self.spec().containers.clone();
        self.tracks = vec![Track::default(); containers.len()];
        let policy = self
            .spec()
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let init_containers = self.spec().init_containers.clone().unwrap_or_default();
        self.init = init_containers
            .iter()
            .map(|c| {
                json!({"name": c.name, "image": c.image, "ready": false, "restartCount": 0,
                            "state": {"waiting": {"reason": "PodInitializing"}}})
            })
            .collect();
        self.report().await;

        // Init containers, in order; a failure is retried with a back-off (unless Never).
        for (i, c) in init_containers.iter().enumerate() {
            let mut backoff = Duration::from_secs(1);
            loop {
                let name = format!("{}-init-{}", self.prefix, c.name);
                let _ = docker(&["rm", "-f", &name]).await;
                self.create(c, &name).await?;
                docker(&["start", &name]).await?;
                self.init[i]["state"] = json!({"running": {"startedAt": now()}});
                self.report().await;
                let wait_args = ["wait".to_string(), name.clone()];
                let wait = docker(&wait_args);
                tokio::pin!(wait);
                let code = loop {
                    tokio::select! {
                        r = &mut wait => break r?.parse::<i32>().unwrap_or(-1),
                        _ = rx.changed() => {
                            self.pod = rx.borrow().clone();
                            if self.deleting() { return Ok(()); }
                        }
                    }
                };
                let st = docker::inspect(&name).await?;
                let term = self.terminated(c, &name, &st).await;
                self.init[i]["state"] = json!({"terminated": term});
                if code == 0 {
                    self.init[i]["ready"] = json!(true);
                    self.report().await;
                    break;
                }
                let n = self.init[i]["restartCount"].as_i64().unwrap_or(0) + 1;
                self.init[i]["restartCount"] = json!(n);
                self.init[i]["lastState"] = json!({"terminated": term});
                if policy == "Never" {
                    self.report_failed().await;
                    return self.wait_deletion(rx).await;
                }
                self.init[i]["state"] = json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}});
                self.report().await;
                if self.sleep_or_deleted(rx, backoff).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(Duration::from_secs(20));
            }
        }
        self.initialized = true;

        for (i, c) in containers.iter().enumerate() {
            let name = self.container_name(c);
            let _ = docker(&["rm", "-f", &name]).await;
            self.create(c, &name).await?;
            docker(&["start", &name]).await?;
            self.started(i, c);
        }
        self.report().await;

        loop {
            if self.sleep_or_deleted(rx, Duration::from_millis(500)).await {
                return Ok(());
            }
            for (i, c) in containers.iter().enumerate() {
                self.tend(i, c, &policy).await;
            }
            if policy != "Always" && self.tracks.iter().all(|t| t.done.is_some()) {
                self.report().await;
                return self.wait_deletion(rx).await;
            }
            self.report().await;
        }
    }

    fn container_name(&self, c: &Container) -> String {
        format!("{}-{}", self.prefix, c.name)
    }

    fn started(&mut self, i: usize, c: &Container) {
        let t = &mut self.tracks[i];
        let now = tokio::time::Instant::now();
        t.started = Some(now);
        t.ready = c.readiness_probe.is_none();
        t.ready_ok = 0;
        t.ready_fail = 0;
        t.live_fail = 0;
        t.restart_at = None;
        let delay = |p: &Option<Probe>| {
            p.as_ref().map(|p| {
                now + Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64)
            })
        };
        t.next_ready_probe = delay(&c.readiness_probe);
        t.next_live_probe = delay(&c.liveness_probe);
    }

    /// One look at a container: restart it if it stopped, run its probes.
    async fn tend(&mut self, i: usize, c: &Container, policy: &str) {
        if self.tracks[i].done.is_some() {
            return;
        }
        let name = self.container_name(c);
        let Ok(st) = docker::inspect(&name).await else {
            return;
        };
        let now = tokio::time::Instant::now();
        if !st.running {
            if let Some(at) = self.tracks[i].restart_at {
                if now >= at {
                    if docker(&["start", &name]).await.is_ok() {
                        self.tracks[i].restarts += 1;
                        self.started(i, c);
                    }
                }
                return;
            }
            let term = self.terminated(c, &name, &st).await;
            let restart = match policy {
                "Always" => true,
                "OnFailure" => st.exit_code != 0,
                _ => false,
            };
            if !restart {
                self.tracks[i].done = Some(term);
                self.tracks[i].ready = false;
                return;
            }
            let t = &mut self.tracks[i];
            t.last = Some(term);
            t.ready = false;
            // The kubelet's back-off, shortened: 1 s doubling up to 20 s, reset by a run of
            // at least a minute.
            let ran = t.started.map(|s| now.duration_since(s)).unwrap_or_default();
            let backoff = if ran > Duration::from_secs(60) || t.restarts == 0 {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(1 << t.restarts.min(5) as u32).min(Duration::from_secs(20))
            };
            t.restart_at = Some(now + backoff);
            return;
        }
        if let Some(p) = &c.readiness_probe {
            if self.tracks[i].next_ready_probe.is_some_and(|at| now >= at) {
                let ok = self.probe(p, c).await;
                let t = &mut self.tracks[i];
                if ok {
                    t.ready_ok += 1;
                    t.ready_fail = 0;
                    if t.ready_ok >= p.success_threshold.unwrap_or(1) {
                        t.ready = true;
                    }
                } else {
                    t.ready_fail += 1;
                    t.ready_ok = 0;
                    if t.ready_fail >= p.failure_threshold.unwrap_or(3) {
                        t.ready = false;
                    }
                }
                t.next_ready_probe = Some(now + period(p));
            }
        }
        if let Some(p) = &c.liveness_probe {
            if self.tracks[i].next_live_probe.is_some_and(|at| now >= at) {
                let ok = self.probe(p, c).await;
                let t = &mut self.tracks[i];
                t.live_fail = if ok { 0 } else { t.live_fail + 1 };
                t.next_live_probe = Some(now + period(p));
                if t.live_fail >= p.failure_threshold.unwrap_or(3) {
                    eprintln!("agent: {name}: liveness probe failed, restarting");
                    let grace = self.spec().termination_grace_period_seconds.unwrap_or(30);
                    let _ = docker(&["stop", "-t", &grace.to_string(), &name]).await;
                }
            }
        }
    }

    async fn probe(&self, p: &Probe, c: &Container) -> bool {
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
        let port_of = |port: &IntOrString| -> Option<u16> {
            match port {
                IntOrString::Int(n) => Some(*n as u16),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port as u16),
            }
        };
        if let Some(h) = &p.http_get {
            let Some(port) = port_of(&h.port) else {
                return false;
            };
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let addr = format!("{}:{port}", self.ip);
            let check = async {
                let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
                s.write_all(
                    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.20\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .ok()?;
                let mut buf = vec![0u8; 64];
                let n = s.read(&mut buf).await.ok()?;
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some((200..400).contains(&code))
            };
            return tokio::time::timeout(timeout, check)
                .await
                .ok()
                .flatten()
                .unwrap_or(false);
        }
        if let Some(t) = &p.tcp_socket {
            let Some(port) = port_of(&t.port) else {
                return false;
            };
            let addr = format!("{}:{port}", self.ip);
            return matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
        }
        if let Some(e) = &p.exec {
            let mut args = vec!["exec".to_string(), self.container_name(c)];
            args.extend(e.command.clone().unwrap_or_default());
            return matches!(
                tokio::time::timeout(timeout, docker(&args)).await,
                Ok(Ok(_))
            );
        }
        false
    }

    /// A container's `terminated` state, with its termination message.
    async fn terminated(&self, c: &Container, name: &str, st: &docker::State) -> Value {
        let reason = if st.oom_killed {
            "OOMKilled"
        } else if st.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let mut term = json!({"exitCode": st.exit_code, "reason": reason,
            "startedAt": st.started_at, "finishedAt": st.finished_at,
            "containerID": format!("docker://{}", st.id)});
        if st.exit_code != 0
            && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        {
            // The kubelet's fallback: the last 80 lines of the log, at most 2048 bytes.
            let msg = docker::logs_tail(name, 80, 2048).await;
            if !msg.is_empty() {
                term["message"] = json!(msg);
            }
        }
        term
    }

    async fn sleep_or_deleted(&mut self, rx: &mut watch::Receiver<Pod>, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return self.deleting(),
                r = rx.changed() => {
                    if r.is_err() { return true; }
                    self.pod = rx.borrow().clone();
                    if self.deleting() { return true; }
                }
            }
        }
    }

    async fn wait_deletion(&mut self, rx: &mut watch::Receiver<Pod>) -> Result<(), String> {
        while !self.sleep_or_deleted(rx, Duration::from_secs(3600)).await {}
        Ok(())
    }

    async fn start_sandbox(&mut self) -> Result<(), String> {
        let cfg = self.cfg.clone();
        let ns = self.pod.namespace().unwrap_or_default();
        let spec = self.spec().clone();
        let hostname = spec.hostname.clone().unwrap_or_else(|| self.pod.name_any());
        let name = format!("{}-sandbox", self.prefix);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            docker::run_label(&cfg.run),
            "--network".into(),
            cfg.network.clone(),
            "--hostname".into(),
            hostname.clone(),
        ];
        let mut aliases = vec![];
        if let Some(sub) = &spec.subdomain {
            aliases.push(format!("{hostname}.{sub}.{ns}.svc"));
            aliases.push(format!("{hostname}.{sub}.{ns}.svc.cluster.local"));
        }
        let services: Api<Service> = Api::namespaced(cfg.client.clone(), &ns);
        if let Ok(list) = services.list(&ListParams::default()).await {
            for svc in list.items {
                let sel = svc.spec.as_ref().and_then(|s| s.selector.clone());
                let Some(sel) = sel.filter(|s| !s.is_empty()) else {
                    continue;
                };
                if sel.iter().all(|(k, v)| self.pod.labels().get(k) == Some(v)) {
                    let s = svc.name_any();
                    aliases.push(format!("{s}.{ns}"));
                    aliases.push(format!("{s}.{ns}.svc"));
                    aliases.push(format!("{s}.{ns}.svc.cluster.local"));
                }
            }
        }
        for a in aliases {
            args.push("--network-alias".into());
            args.push(a);
        }
        for d in [
            format!("{ns}.svc.cluster.local"),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ] {
            args.push("--dns-search".into());
            args.push(d);
        }
        for h in [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            args.push("--add-host".into());
            args.push(format!("{h}:{}", cfg.api_host));
        }
        args.extend([
            "--entrypoint".into(),
            "sleep".into(),
            SANDBOX_IMAGE.into(),
            "infinity".into(),
        ]);
        let _ = docker(&["rm", "-f", &name]).await;
        docker(&args).await?;
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            cfg.network
        );
        self.ip = docker(&["inspect", "-f", &fmt, &name]).await?;
        Ok(())
    }

    /// The pod's volumes as `docker -v` mounts (name → source), created and owned as needed.
    async fn prepare_volumes(&mut self) -> Result<(), String> {
        let cfg = self.cfg.clone();
        let ns = self.pod.namespace().unwrap_or_default();
        let spec = self.spec().clone();
        let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group);
        let mut sources: HashMap<String, (String, bool)> = HashMap::new();
        for v in spec.volumes.iter().flatten() {
            if let Some(pvc) = &v.persistent_volume_claim {
                let vol = claim_volume(&cfg, &ns, &pvc.claim_name);
                let claims: Api<PersistentVolumeClaim> = Api::namespaced(cfg.client.clone(), &ns);
                let uid = claims
                    .get(&pvc.claim_name)
                    .await
                    .map_err(|e| format!("claim {}: {e}", pvc.claim_name))?
                    .uid()
                    .unwrap_or_default();
                let mine = format!("{CLAIM_UID_LABEL}={uid}");
                // A volume left by an earlier claim of this name is not this claim's.
                if let Ok(labels) =
                    docker(&["volume", "inspect", "-f", "{{json .Labels}}", &vol]).await
                {
                    if !labels.contains(&format!("\"{CLAIM_UID_LABEL}\":\"{uid}\"")) {
                        docker(&["volume", "rm", &vol]).await?;
                    }
                }
                ensure_volume(
                    &vol,
                    &[format!("cairn-e2e.claim-of={}", cfg.run), mine],
                    &cfg.run,
                )
                .await?;
                own(&vol, fs_group).await?;
                sources.insert(v.name.clone(), (vol, true));
            } else if v.empty_dir.is_some() {
                let vol = format!("{}-{}", self.prefix, v.name);
                ensure_volume(&vol, &[], &cfg.run).await?;
                own(&vol, fs_group).await?;
                self.scratch_volumes.push(vol.clone());
                sources.insert(v.name.clone(), (vol, true));
            } else {
                let mut files: Vec<(String, Vec<u8>)> = vec![];
                if let Some(s) = &v.secret {
                    let name = s.secret_name.as_deref().unwrap_or_default();
                    files.extend(pick(self.data(Source::Secret, name).await?, &s.items));
                } else if let Some(c) = &v.config_map {
                    files.extend(pick(self.data(Source::ConfigMap, &c.name).await?, &c.items));
                } else if let Some(p) = &v.projected {
                    for src in p.sources.iter().flatten() {
                        if let Some(s) = &src.secret {
                            files.extend(pick(self.data(Source::Secret, &s.name).await?, &s.items));
                        }
                        if let Some(c) = &src.config_map {
                            files.extend(pick(
                                self.data(Source::ConfigMap, &c.name).await?,
                                &c.items,
                            ));
                        }
                    }
                } else {
                    eprintln!(
                        "agent: volume {} of {}: unsupported kind, left empty",
                        v.name, self.prefix
                    );
                }
                let dir = cfg.files.join(format!("{}-{}", self.prefix, v.name));
                let _ = std::fs::remove_dir_all(&dir);
                for (path, data) in files {
                    let p = dir.join(path);
                    std::fs::create_dir_all(p.parent().unwrap()).map_err(|e| e.to_string())?;
                    std::fs::write(&p, data).map_err(|e| e.to_string())?;
                }
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                chmod_tree(&dir);
                self.scratch_dirs.push(dir.clone());
                sources.insert(v.name.clone(), (dir.display().to_string(), false));
            }
        }
        self.mounts = sources
            .into_iter()
            .map(|(k, (src, rw))| (k, src, rw))
            .collect();
        Ok(())
    }

    /// The data of a ConfigMap or Secret in the pod's namespace.
    async fn data(&self, kind: Source, name: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let client = self.cfg.client.clone();
        let got = match kind {
            Source::ConfigMap => Api::<ConfigMap>::namespaced(client, &ns)
                .get(name)
                .await
                .map(|c| {
                    let data = c.data.unwrap_or_default().into_iter();
                    data.map(|(k, v)| (k, v.into_bytes())).collect()
                }),
            Source::Secret => Api::<Secret>::namespaced(client, &ns)
                .get(name)
                .await
                .map(|s| {
                    let data = s.data.unwrap_or_default().into_iter();
                    data.map(|(k, v)| (k, v.0)).collect()
                }),
        };
        got.map_err(|e| format!("{kind:?} {ns}/{name}: {e}"))
    }

    /// The container's environment, resolved as the kubelet does.
    async fn env(&self, c: &Container) -> Result<Vec<(String, String)>, String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let mut env: Vec<(String, String)> = vec![
            ("KUBERNETES_SERVICE_HOST".into(), self.cfg.api_host.clone()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                self.cfg.api_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".into(),
                self.cfg.api_port.to_string(),
            ),
            (
                "KUBERNETES_PORT".into(),
                format!("tcp://{}:{}", self.cfg.api_host, self.cfg.api_port),
            ),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let refs = [
                (
                    Source::ConfigMap,
                    from.config_map_ref.as_ref().map(|r| (&r.name, r.optional)),
                ),
                (
                    Source::Secret,
                    from.secret_ref.as_ref().map(|r| (&r.name, r.optional)),
                ),
            ];
            for (kind, r) in refs {
                let Some((name, optional)) = r else { continue };
                match self.data(kind, name).await {
                    Ok(data) => {
                        for (k, v) in data {
                            let v = String::from_utf8_lossy(&v).into_owned();
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    Err(e) if optional != Some(true) => return Err(e),
                    Err(_) => {}
                }
            }
        }
        for EnvVar {
            name,
            value,
            value_from,
            ..
        } in c.env.iter().flatten()
        {
            let v = if let Some(v) = value {
                Some(expand(v, &env))
            } else if let Some(from) = value_from {
                if let Some(f) = &from.field_ref {
                    Some(self.field(&f.field_path))
                } else if let Some((kind, name, key, optional)) = from
                    .config_map_key_ref
                    .as_ref()
                    .map(|r| (Source::ConfigMap, &r.name, &r.key, r.optional))
                    .or_else(|| {
                        let r = from.secret_key_ref.as_ref()?;
                        Some((Source::Secret, &r.name, &r.key, r.optional))
                    })
                {
                    let got =
                        self.data(kind, name).await.ok().and_then(|d| {
                            d.get(key).map(|b| String::from_utf8_lossy(b).into_owned())
                        });
                    match got {
                        Some(v) => Some(v),
                        None if optional == Some(true) => None,
                        None => {
                            return Err(format!("couldn't find key {key} in {kind:?} {ns}/{name}"))
                        }
                    }
                } else {
                    None
                }
            } else {
                Some(String::new())
            };
            if let Some(v) = v {
                set(&mut env, name.clone(), v);
            }
        }
        Ok(env)
    }

    fn field(&self, path: &str) -> String {
        let m = &self.pod.metadata;
        let spec = self.spec();
        match path {
            "metadata.name" => m.name.clone().unwrap_or_default(),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.uid" => m.uid.clone().unwrap_or_default(),
            "spec.nodeName" => spec.node_name.clone().unwrap_or_default(),
            "spec.serviceAccountName" => spec.service_account_name.clone().unwrap_or_default(),
            "status.podIP" => self.ip.clone(),
            "status.hostIP" => self.cfg.api_host.clone(),
            p => {
                let lookup = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
                    p.strip_prefix(prefix)
                        .and_then(|k| k.strip_prefix("['"))
                        .and_then(|k| k.strip_suffix("']"))
                        .and_then(|k| map.as_ref().and_then(|m| m.get(k).cloned()))
                };
                lookup("metadata.labels", &m.labels)
                    .or_else(|| lookup("metadata.annotations", &m.annotations))
                    .unwrap_or_default()
            }
        }
    }

    /// `docker create` for one container of the pod.
    async fn create(&self, c: &Container, name: &str) -> Result<(), String> {
        let env = self.env(c).await?;
        let spec = self.spec();
        let psc = spec.security_context.clone().unwrap_or_default();
        let csc = c.security_context.clone().unwrap_or_default();
        let mut args: Vec<String> = vec![
            "create".into(),
            "--name".into(),
            name.into(),
            "--label".into(),
            docker::run_label(&self.cfg.run),
            "--network".into(),
            format!("container:{}-sandbox", self.prefix),
        ];
        let user = csc.run_as_user.or(psc.run_as_user);
        let group = csc.run_as_group.or(psc.run_as_group);
        if let Some(u) = user {
            args.push("--user".into());
            args.push(match group {
                Some(g) => format!("{u}:{g}"),
                None => u.to_string(),
            });
        }
        if let Some(g) = psc.fs_group {
            args.push("--group-add".into());
            args.push(g.to_string());
        }
        if csc.read_only_root_filesystem == Some(true) {
            args.push("--read-only".into());
        }
        if csc.allow_privilege_escalation == Some(false) {
            args.push("--security-opt".into());
            args.push("no-new-privileges".into());
        }
        if let Some(caps) = &csc.capabilities {
            for d in caps.drop.iter().flatten() {
                args.push(format!("--cap-drop={d}"));
            }
            for a in caps.add.iter().flatten() {
                args.push(format!("--cap-add={a}"));
            }
        }
        if let Some(mem) = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| memory_bytes(&q.0))
        {
            args.push(format!("--memory={mem}"));
        }
        for (k, v) in &env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        for m in c.volume_mounts.iter().flatten() {
            let Some((_, src, rw)) = self.mounts.iter().find(|(n, _, _)| *n == m.name) else {
                return Err(format!("volume {} not found", m.name));
            };
            let ro = !rw || m.read_only == Some(true);
            let kind = if src.starts_with('/') {
                "bind"
            } else {
                "volume"
            };
            let mut spec = format!("type={kind},source={src},target={}", m.mount_path);
            if let Some(sub) = &m.sub_path {
                if kind == "volume" {
                    spec.push_str(&format!(",volume-subpath={sub}"));
                } else {
                    spec = format!("type=bind,source={src}/{sub},target={}", m.mount_path);
                }
            }
            if ro {
                spec.push_str(",readonly");
            }
            args.push("--mount".into());
            args.push(spec);
        }
        if let Some(wd) = &c.working_dir {
            args.push("--workdir".into());
            args.push(wd.clone());
        }
        let command: Vec<String> = c
            .command
            .iter()
            .flatten()
            .map(|a| expand(a, &env))
            .collect();
        let cargs: Vec<String> = c.args.iter().flatten().map(|a| expand(a, &env)).collect();
        if let Some(first) = command.first() {
            args.push("--entrypoint".into());
            args.push(first.clone());
        }
        args.push(c.image.clone().unwrap_or_default());
        args.extend(command.into_iter().skip(1));
        args.extend(cargs);
        docker(&args).await.map(|_| ())
    }

    /// Writes the pod's status when it changed.
    async fn report(&mut self) {
        let containers = self.spec().containers.clone();
        let mut statuses = vec![];
        for (i, c) in containers.iter().enumerate() {
            let t = &self.tracks.get(i).cloned().unwrap_or_default();
            let state = if !self.initialized {
                json!({"waiting": {"reason": "PodInitializing"}})
            } else if let Some(done) = &t.done {
                json!({"terminated": done})
            } else if t.restart_at.is_some() {
                json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {}", c.name)}})
            } else {
                json!({"running": {"startedAt": self.start_time}})
            };
            let mut s = json!({"name": c.name, "image": c.image, "imageID": "",
                "ready": t.ready && t.done.is_none() && t.restart_at.is_none(),
                "restartCount": t.restarts, "started": self.initialized && t.restart_at.is_none() && t.done.is_none(),
                "state": state});
            if let Some(last) = &t.last {
                s["lastState"] = json!({"terminated": last});
            }
            statuses.push(s);
        }
        let ready = self.initialized && statuses.iter().all(|s| s["ready"] == json!(true));
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok {"True"} else {"False"}});
        let status = json!({
            "phase": self.phase(),
            "hostIP": self.cfg.api_host,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [cond("PodScheduled", true), cond("Initialized", self.initialized),
                           cond("ContainersReady", ready), cond("Ready", ready)],
            "initContainerStatuses": self.init,
            "containerStatuses": statuses,
        });
        if status == self.last_status {
            return;
        }
        let res = self
            .api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await;
        match res {
            Ok(_) => self.last_status = status,
            Err(e) => eprintln!("agent: status of {}: {e}", self.prefix),
        }
    }

    fn phase(&self) -> &'static str {
        if !self.initialized {
            return "Pending";
        }
        if !self.tracks.is_empty() && self.tracks.iter().all(|t| t.done.is_some()) {
            let ok = self
                .tracks
                .iter()
                .all(|t| t.done.as_ref().is_some_and(|d| d["exitCode"] == json!(0)));
            return if ok { "Succeeded" } else { "Failed" };
        }
        "Running"
    }

    async fn report_failed(&mut self) {
        let _ = self
            .api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(
                    &json!({"status": {"phase": "Failed", "initContainerStatuses": self.init}}),
                ),
            )
            .await;
    }

    /// Stops the containers (SIGTERM, then the grace period), removes them and the pod's
    /// scratch volumes, then the pod object if it is being deleted.
    async fn teardown(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(self.spec().termination_grace_period_seconds)
            .unwrap_or(30)
            .clamp(0, 30);
        let names: Vec<String> = self
            .spec()
            .containers
            .iter()
            .map(|c| self.container_name(c))
            .collect();
        let stops = names
            .iter()
            .map(|n| async move { docker(&["stop", "-t", &grace.to_string(), n]).await });
        futures::future::join_all(stops).await;
        let filter = format!("name=^{}-", self.prefix);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]).await {
            for id in ids.split_whitespace() {
                let _ = docker(&["rm", "-f", "-v", id]).await;
            }
        }
        for v in &self.scratch_volumes {
            let _ = docker(&["volume", "rm", "-f", v]).await;
        }
        for d in &self.scratch_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        if self.deleting() {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: self.pod.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(e) = self.api.delete(&self.pod.name_any(), &dp).await {
                if !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409) {
                    eprintln!("agent: delete {}: {e}", self.prefix);
                }
            }
        }
    }
}

/// Where a volume's files or a container's env come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    ConfigMap,
    Secret,
}

fn period(p: &Probe) -> Duration {
    Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64)
}

fn pick(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        Some(items) => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|d| (i.path.clone(), d.clone())))
            .collect(),
        None => data.into_iter().collect(),
    }
}

fn chmod_tree(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                chmod_tree(&p);
            } else {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
            }
        }
    }
}

async fn ensure_volume(name: &str, labels: &[String], run: &str) -> Result<(), String> {
    if docker(&["volume", "inspect", name]).await.is_ok() {
        return Ok(());
    }
    let mut args = vec![
        "volume".to_string(),
        "create".into(),
        "--label".into(),
        docker::run_label(run),
    ];
    for l in labels {
        args.push("--label".into());
        args.push(l.clone());
    }
    args.push(name.into());
    docker(&args).await.map(|_| ())
}

/// fsGroup on a writable volume: group-owned and group-writable, as the kubelet leaves it.
async fn own(vol: &str, fs_group: Option<i64>) -> Result<(), String> {
    let Some(g) = fs_group else { return Ok(()) };
    docker(&[
        "run".to_string(),
        "--rm".into(),
        "--mount".into(),
        format!("type=volume,source={vol},target=/v"),
        "--entrypoint".into(),
        "sh".into(),
        SANDBOX_IMAGE.into(),
        "-c".into(),
        format!("chgrp -R {g} /v && chmod -R g+rwX /v && chmod g+s /v"),
    ])
    .await
    .map(|_| ())
}

/// `$(VAR)` references to earlier variables, `$$` escapes, as the kubelet expands them.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some((_, v)) = env.iter().rev().find(|(k, _)| k == name) {
                        out.push_str(v);
                    } else {
                        out.push_str(&s[i..i + 3 + end]);
                    }
                    i += 3 + end;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn memory_bytes(q: &str) -> Option<u64> {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<u64>().ok().map(|n| n * m);
        }
    }
    q.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("--name=$(A)", &env), "--name=x");
        assert_eq!(expand("$(B)-$$(A)", &env), "$(B)-$(A)");
        assert_eq!(expand("é$(A", &env), "é$(A");
        assert_eq!(memory_bytes("256Mi"), Some(256 << 20));
    }
}
