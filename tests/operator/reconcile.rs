//! Reconciles against a mock Kubernetes API server (kube-rs's tower-test pattern): a task answers
//! the client's requests from an in-memory object store, like a tiny API server, and logs every
//! request so tests can check method, path, field manager and body. Members are real cairn
//! processes on loopback, started and stopped by the test as the StatefulSet says (the kubelet's
//! part), with the flags the operator's ConfigMap gives them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_operator::controller::{reconcile, Context};
use cairn_operator::crd::EtcdCluster;
use cairn_operator::layout::Layout;
use cairn_operator::metrics::Metrics;
use cairn_operator::resources::Bootstrap;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

use crate::cluster::{dump, KeyState, Pods};

const NS: &str = "db";

/// One request the operator made.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// The mock API server's state: objects by path, and the request log.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Value>,
    calls: Vec<Call>,
    next_version: u64,
    /// API path prefixes this server does not serve (like an old Kubernetes).
    unserved: Vec<String>,
    /// Paths whose PATCH is refused as the API server refuses to grow a claim whose
    /// StorageClass does not allow expansion.
    unexpandable: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<Store>>);

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": message})
}

impl FakeApi {
    fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    fn put(&self, path: &str, v: Value) {
        self.0.lock().unwrap().objects.insert(path.to_string(), v);
    }

    fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    fn clear_calls(&self) {
        self.0.lock().unwrap().calls.clear();
    }

    /// Answers one request like the API server would, for the verbs the operator uses.
    fn answer(&self, method: Method, path: &str, query: &str, body: Value) -> (StatusCode, Value) {
        let mut st = self.0.lock().unwrap();
        st.calls.push(Call {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
            body: body.clone(),
        });
        st.next_version += 1;
        let version = st.next_version.to_string();
        if st.unserved.iter().any(|p| path.starts_with(p.as_str())) {
            return (
                StatusCode::NOT_FOUND,
                status_json(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        let (base, sub) = match path.strip_suffix("/status") {
            Some(b) => (b.to_string(), true),
            None => (path.to_string(), false),
        };
        match method {
            Method::GET => {
                if let Some(o) = st.objects.get(&base) {
                    return (StatusCode::OK, o.clone());
                }
                // A collection: every object directly under it.
                let prefix = format!("{base}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .collect();
                if base.ends_with("/pods") {
                    return (
                        StatusCode::OK,
                        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": version}, "items": items}),
                    );
                }
                (
                    StatusCode::NOT_FOUND,
                    status_json(404, "NotFound", &format!("{base} not found")),
                )
            }
            Method::PATCH => {
                if st.unexpandable.contains(&base) {
                    return (
                        StatusCode::FORBIDDEN,
                        status_json(403, "Forbidden", &format!("persistentvolumeclaims \"{}\" is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize", base.rsplit('/').next().unwrap_or_default())),
                    );
                }
                // A StatefulSet's claim templates cannot change, as the API server says.
                if base.contains("/statefulsets/") && !sub {
                    if let Some(old) = st.objects.get(&base) {
                        let before = &old["spec"]["volumeClaimTemplates"];
                        let after = &body["spec"]["volumeClaimTemplates"];
                        if before != after {
                            return (
                                StatusCode::UNPROCESSABLE_ENTITY,
                                status_json(422, "Invalid", "StatefulSet.apps is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"),
                            );
                        }
                    }
                }
                let mut obj = st.objects.get(&base).cloned().unwrap_or_else(|| json!({}));
                if sub {
                    obj["status"] = body["status"].clone();
                } else {
                    let status = obj.get("status").cloned();
                    obj = body;
                    if let Some(s) = status {
                        obj["status"] = s;
                    }
                }
                obj["metadata"]["resourceVersion"] = json!(version);
                st.objects.insert(base, obj.clone());
                (StatusCode::OK, obj)
            }
            Method::PUT => {
                // Optimistic concurrency, as the API server does it.
                let current = st
                    .objects
                    .get(&base)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                if current != Some(body["metadata"]["resourceVersion"].clone()) {
                    return (
                        StatusCode::CONFLICT,
                        status_json(409, "Conflict", "the object has been modified"),
                    );
                }
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = json!(version);
                st.objects.insert(base, obj.clone());
                (StatusCode::OK, obj)
            }
            Method::POST => {
                let mut obj = body;
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("gen-{version}"));
                if st.objects.contains_key(&format!("{base}/{name}")) {
                    return (
                        StatusCode::CONFLICT,
                        status_json(409, "AlreadyExists", &format!("{name} already exists")),
                    );
                }
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["resourceVersion"] = json!(version);
                st.objects.insert(format!("{base}/{name}"), obj.clone());
                (StatusCode::CREATED, obj)
            }
            Method::DELETE => match st.objects.remove(&base) {
                Some(o) => (StatusCode::OK, o),
                None => (
                    StatusCode::NOT_FOUND,
                    status_json(404, "NotFound", &format!("{base} not found")),
                ),
            },
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_json(405, "MethodNotAllowed", ""),
            ),
        }
    }

    /// A kube Client whose requests this store answers.
    fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                };
                let (code, out) = me.answer(
                    parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    body,
                );
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        Client::new(svc, NS)
    }
}

fn cluster_path(name: &str) -> String {
    format!("/apis/cairn.dev/v1alpha1/namespaces/{NS}/etcdclusters/{name}")
}
fn sts_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}")
}
fn cm_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/{name}-bootstrap")
}
fn pdb_path(name: &str) -> String {
    format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{name}")
}
fn events(api: &FakeApi) -> Vec<(String, String)> {
    api.calls()
        .into_iter()
        .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
        .map(|c| {
            (
                c.body["reason"].as_str().unwrap_or("").to_string(),
                c.body["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The test's world: the mock API server, a context on it, members on loopback.
struct World {
    api: FakeApi,
    ctx: Arc<Context>,
    pods: Pods,
    name: String,
    /// Whether the kubelet restarts the pods the operator deletes (with an empty volume if
    /// their claim was deleted too), as a StatefulSet's controller and kubelet would.
    restart_deleted: bool,
    /// How many of the API's calls the kubelet has looked at.
    calls_seen: usize,
    /// Whether Jobs wait (are not run) for now.
    hold_jobs: bool,
}

impl World {
    fn new(name: &str, spec: Value) -> World {
        let api = FakeApi::default();
        let pods = Pods::new(name);
        let layout: Arc<dyn Layout> = Arc::new(pods.layout.clone());
        let mut ctx = Context::new(api.client(), Metrics::default(), Some("test".into()));
        ctx.layout = Box::new(move |_: &EtcdCluster| layout.clone());
        api.put(
            &cluster_path(name),
            json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
                "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
                             "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
                "spec": spec,
            }),
        );
        World {
            api,
            ctx: Arc::new(ctx),
            pods,
            name: name.to_string(),
            restart_deleted: false,
            calls_seen: 0,
            hold_jobs: false,
        }
    }

    /// Forgets the calls so far (events included).
    fn clear_calls_for_test(&mut self) {
        self.api.clear_calls();
        self.calls_seen = 0;
    }

    fn annotate(&self, key: &str, value: &str) {
        let mut o = self.api.get(&cluster_path(&self.name)).unwrap();
        o["metadata"]["annotations"][key] = json!(value);
        self.api.put(&cluster_path(&self.name), o);
    }

    /// The kubelet's part for pods and claims the operator deleted (see `restart_deleted`).
    fn restart_deleted_pods(&mut self) {
        let calls = self.api.calls();
        if calls.len() < self.calls_seen {
            self.calls_seen = 0;
        }
        let mut wiped = Vec::new();
        let mut restart = Vec::new();
        for c in &calls[self.calls_seen..] {
            if c.method != Method::DELETE {
                continue;
            }
            let Some(name) = c.path.rsplit('/').next() else {
                continue;
            };
            if c.path.contains("/persistentvolumeclaims/") {
                if let Some(o) =
                    (0..8).find(|o| name == format!("data-{}", self.pods.layout.member(*o)))
                {
                    wiped.push(o);
                }
            } else if c.path.contains("/pods/") {
                if let Some(o) = (0..8).find(|o| name == self.pods.layout.member(*o)) {
                    restart.push(o);
                }
            }
        }
        self.calls_seen = calls.len();
        // The StatefulSet makes a deleted pod again only while it exists and covers it.
        let want = self.sts_replicas().unwrap_or(0) as i32;
        for o in wiped {
            if o >= self.pods.replicas || o >= want || restart.contains(&o) {
                self.pods.stop(o);
                let _ = std::fs::remove_dir_all(self.pods.volume(o));
            }
        }
        for o in restart {
            if o >= want {
                self.pods.stop(o);
            } else if o < self.pods.replicas {
                self.pods.stop(o);
                self.set_pod_env();
                let b = self.configmap();
                self.pods.start(o, &b);
            }
        }
    }

    /// What a pod reads from the ConfigMap besides its bootstrap flags.
    fn set_pod_env(&mut self) {
        let cm = self.api.get(&cm_path(&self.name)).unwrap();
        let force = cm["data"]["force-new-cluster-once"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.pods.env.insert(
            "ETCD_EXPERIMENTAL_FORCE_NEW_CLUSTER_ONCE".to_string(),
            force,
        );
    }

    fn object(&self) -> EtcdCluster {
        serde_json::from_value(self.api.get(&cluster_path(&self.name)).unwrap()).unwrap()
    }

    fn set_spec(&self, f: impl FnOnce(&mut Value)) {
        let mut o = self.api.get(&cluster_path(&self.name)).unwrap();
        f(&mut o["spec"]);
        let g = o["metadata"]["generation"].as_i64().unwrap();
        o["metadata"]["generation"] = json!(g + 1);
        self.api.put(&cluster_path(&self.name), o);
    }

    async fn reconcile(&self) -> Result<(), String> {
        // Boxed: a reconcile's future is big in a debug build, and the test's own future
        // lives on the test thread's stack.
        Box::pin(reconcile(Arc::new(self.object()), self.ctx.clone()))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn status(&self) -> Value {
        self.api.get(&cluster_path(&self.name)).unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let st = self.status();
        let c = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {st}"))
            .clone();
        (
            c["status"].as_str().unwrap().to_string(),
            c["reason"].as_str().unwrap().to_string(),
        )
    }

    fn sts_replicas(&self) -> Option<i64> {
        self.api
            .get(&sts_path(&self.name))
            .map(|s| s["spec"]["replicas"].as_i64().unwrap())
    }

    /// What the members read from the ConfigMap.
    fn configmap(&self) -> Bootstrap {
        let cm = self
            .api
            .get(&cm_path(&self.name))
            .expect("bootstrap ConfigMap");
        Bootstrap {
            initial_cluster: cm["data"]["initial-cluster"].as_str().unwrap().to_string(),
            new_cluster: cm["data"]["initial-cluster-state"] == "new",
        }
    }

    /// Ordinal `o` loses its volume and its pod comes back empty: the member refuses to start
    /// (`has already been bootstrapped`) and the pod's status carries its termination message,
    /// as a crash-looping pod's does.
    async fn lose_data(&mut self, o: i32) {
        self.pods.stop(o);
        std::fs::remove_dir_all(self.pods.volume(o)).unwrap();
        let b = self.configmap();
        self.pods.start(o, &b);
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = loop {
            if let Some(log) = self.pods.exited_log(o) {
                break log;
            }
            assert!(
                Instant::now() < deadline,
                "member {o} did not refuse to start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            cairn_operator::plan::reports_lost_data(&log),
            "member {o}: {log}"
        );
        let name = self.pods.layout.member(o);
        self.api.put(
            &format!("/api/v1/namespaces/{NS}/pods/{name}"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                   "status": {"phase": "Running", "containerStatuses": [{
                       "name": "cairn", "image": "", "imageID": "", "ready": false, "restartCount": 1,
                       "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                       "lastState": {"terminated": {"exitCode": 1, "message": log}}}]}}),
        );
    }

    /// The kubelet's part: run a member per StatefulSet replica, with the ConfigMap's flags.
    fn kubelet(&mut self) {
        if self.restart_deleted {
            self.restart_deleted_pods();
        }
        self.run_jobs();
        let want = self.sts_replicas().unwrap_or(0) as i32;
        for o in self.pods.replicas..want {
            if let Err(message) = self.init_containers(o) {
                // The pod stays in its init phase; its status says why, as a kubelet's would.
                let name = self.pods.layout.member(o);
                self.api.put(
                    &format!("/api/v1/namespaces/{NS}/pods/{name}"),
                    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                           "status": {"phase": "Pending", "initContainerStatuses": [{
                               "name": message.0, "image": "", "imageID": "", "ready": false, "restartCount": 0,
                               "state": {"terminated": {"exitCode": 1, "message": message.1}}}]}}),
                );
                return;
            }
            let b = self.configmap();
            self.set_pod_env();
            let cm = self.api.get(&cm_path(&self.name)).unwrap();
            self.pods.token = cm["data"]["initial-cluster-token"]
                .as_str()
                .unwrap()
                .to_string();
            self.pods.start(o, &b);
        }
        for o in want..self.pods.replicas {
            self.pods.stop(o);
        }
        self.pods.replicas = want;
    }

    /// Runs the StatefulSet's init containers for ordinal `o` with this workspace's binaries:
    /// the kubelet's expansion of `$(VAR)` from the pod's env (field, ConfigMap and Secret
    /// references), the volume at /var/lib/cairn. Returns the failed container and its output.
    fn init_containers(&self, o: i32) -> Result<(), (String, String)> {
        let sts = self.api.get(&sts_path(&self.name)).unwrap();
        let Some(inits) = sts["spec"]["template"]["spec"]["initContainers"].as_array() else {
            return Ok(());
        };
        let volume = self.pods.volume(o);
        std::fs::create_dir_all(&volume).unwrap();
        self.run_containers(
            inits,
            Some(self.pods.layout.member(o)),
            "/var/lib/cairn",
            &volume,
        )
    }

    /// The Jobs' part (a Job controller and kubelet): runs each verification Job not run yet,
    /// its containers with this workspace's binaries and a scratch directory as its volume,
    /// then sets its status, and for a failure puts its pod with the container's message.
    fn run_jobs(&self) {
        if self.hold_jobs {
            return;
        }
        let prefix = format!("/apis/batch/v1/namespaces/{NS}/jobs/");
        let jobs: Vec<(String, Value)> = self
            .api
            .0
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, v)| k.starts_with(&prefix) && v.get("status").is_none())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (path, mut job) in jobs {
            let spec = &job["spec"]["template"]["spec"];
            let mut all: Vec<Value> = spec["initContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            all.extend(spec["containers"].as_array().cloned().unwrap_or_default());
            let scratch = self
                .pods
                .scratch()
                .join(format!("job-{}", path.rsplit('/').next().unwrap()));
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&scratch).unwrap();
            let result = self.run_containers(&all, None, "/scratch", &scratch);
            let name = job["metadata"]["name"].as_str().unwrap().to_string();
            match result {
                Ok(()) => job["status"] = json!({"succeeded": 1}),
                Err((container, message)) => {
                    job["status"] =
                        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]});
                    self.api.put(
                        &format!("/api/v1/namespaces/{NS}/pods/{name}-run"),
                        json!({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": format!("{name}-run"), "namespace": NS,
                                            "labels": {"cairn.dev/verify": name}},
                               "status": {"phase": "Failed", "containerStatuses": [{
                                   "name": container, "image": "", "imageID": "", "ready": false, "restartCount": 0,
                                   "state": {"terminated": {"exitCode": 1, "message": message}}}]}}),
                    );
                }
            }
            self.api.put(&path, job);
        }
    }

    /// Runs `containers` in order with this workspace's binaries: the kubelet's expansion of
    /// `$(VAR)` from the pod's env (field, ConfigMap and Secret references; `metadata.name` is
    /// `pod`), the volume mounted at `mount` being `dir`. Returns the failed container and its
    /// output.
    fn run_containers(
        &self,
        containers: &[Value],
        pod: Option<String>,
        mount: &str,
        dir: &std::path::Path,
    ) -> Result<(), (String, String)> {
        let cm = self.api.get(&cm_path(&self.name)).unwrap_or(Value::Null);
        for c in containers {
            let mut env: Vec<(String, String)> = Vec::new();
            for e in c["env"].as_array().into_iter().flatten() {
                let from = &e["valueFrom"];
                let value = if let Some(v) = e["value"].as_str() {
                    Some(v.to_string())
                } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
                    pod.clone()
                } else if let Some(k) = from["configMapKeyRef"]["key"].as_str() {
                    cm["data"][k].as_str().map(str::to_string)
                } else if let Some(k) = from["secretKeyRef"]["key"].as_str() {
                    use base64::Engine as _;
                    let secret = self
                        .api
                        .get(&format!(
                            "/api/v1/namespaces/{NS}/secrets/{}",
                            from["secretKeyRef"]["name"].as_str().unwrap()
                        ))
                        .unwrap();
                    secret["data"][k].as_str().map(|b| {
                        String::from_utf8(
                            base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                        )
                        .unwrap()
                    })
                } else {
                    None
                };
                if let Some(v) = value {
                    env.push((e["name"].as_str().unwrap().to_string(), v));
                }
            }
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    let mut a = a.as_str().unwrap().to_string();
                    for (k, v) in &env {
                        a = a.replace(&format!("$({k})"), v);
                    }
                    a.replace(mount, dir.to_str().unwrap())
                })
                .collect();
            let image = c["image"].as_str().unwrap();
            let bin = if image.starts_with("cairn-operator:") {
                std::path::PathBuf::from(env!("CARGO_BIN_EXE_cairn-operator"))
            } else {
                crate::cluster::cairn_binary()
            };
            let out = std::process::Command::new(bin)
                .args(&args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .output()
                .unwrap();
            if !out.status.success() {
                let name = c["name"].as_str().unwrap().to_string();
                return Err((name, String::from_utf8_lossy(&out.stderr).into_owned()));
            }
        }
        Ok(())
    }

    /// Reconciles (and runs members) until `done` holds.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&World) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Err(e) = self.reconcile().await {
                eprintln!("reconcile: {e}");
            }
            self.kubelet();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: status {}",
                self.status()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn every_patch_uses_our_field_manager(api: &FakeApi) {
    // Events are the recorder's business (it patches a repeated event's series).
    let patches: Vec<Call> = api
        .calls()
        .into_iter()
        .filter(|c| c.method == Method::PATCH && !c.path.contains("/events/"))
        .collect();
    assert!(!patches.is_empty());
    for c in patches {
        assert!(
            c.query.contains("fieldManager=cairn-operator") && c.query.contains("force=true"),
            "{} {}?{}",
            c.method,
            c.path,
            c.query
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_children_then_reports_the_bootstrapped_cluster() {
    let mut w = World::new("alpha", json!({"size": 3, "image": "cairn:test"}));
    w.reconcile().await.unwrap();

    // Children, by server-side apply, owned by the EtcdCluster.
    let sts = w.api.get(&sts_path("alpha")).expect("StatefulSet applied");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["metadata"]["ownerReferences"][0]["kind"], "EtcdCluster");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "cairn:test"
    );
    assert!(w
        .api
        .get(&format!("/api/v1/namespaces/{NS}/services/alpha"))
        .is_some());
    let peer = w
        .api
        .get(&format!("/api/v1/namespaces/{NS}/services/alpha-peer"))
        .unwrap();
    assert_eq!(peer["spec"]["clusterIP"], "None");
    assert_eq!(
        w.api.get(&pdb_path("alpha")).unwrap()["spec"]["maxUnavailable"],
        1
    );
    // The members' NetworkPolicy, on by default: the peer port for members (and the operator,
    // whose pod this test's Context does not know), the client port for anyone.
    let np = w
        .api
        .get(&format!(
            "/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/alpha-members"
        ))
        .expect("NetworkPolicy applied");
    assert_eq!(np["metadata"]["ownerReferences"][0]["kind"], "EtcdCluster");
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress[0]["ports"][0]["port"], 2380);
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "alpha"
    );
    assert_eq!(ingress[1]["ports"][0]["port"], 2379);
    assert!(ingress[1].get("from").is_none(), "{np}");
    assert_eq!(
        w.condition("NetworkPolicy"),
        ("True".into(), "Applied".into())
    );
    let b = w.configmap();
    assert!(b.new_cluster);
    assert_eq!(b.initial_cluster.matches('=').count(), 3);
    every_patch_uses_our_field_manager(&w.api);
    assert_eq!(
        w.condition("Progressing"),
        ("True".into(), "Bootstrapping".into())
    );
    assert_eq!(
        w.condition("Available"),
        ("False".into(), "Bootstrapping".into())
    );
    assert_eq!(w.status()["observedGeneration"], 1);
    assert!(events(&w.api).iter().any(|(r, _)| r == "Bootstrapping"));

    // The members start (kubelet) and the next reconciles see them.
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 3)
        .await;
    let st = w.status();
    assert_eq!(st["size"], 3);
    assert!(st["clusterID"].as_str().is_some_and(|s| !s.is_empty()));
    let members = st["members"].as_array().unwrap();
    let names: Vec<&str> = members
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alpha-0", "alpha-1", "alpha-2"]);
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);
    assert_eq!(
        st["leader"],
        members.iter().find(|m| m["leader"] == true).unwrap()["name"]
    );
    assert_eq!(
        w.condition("Available"),
        ("True".into(), "QuorumAvailable".into())
    );
    assert_eq!(
        w.condition("Progressing"),
        ("False".into(), "Steady".into())
    );
    assert_eq!(
        w.condition("Degraded"),
        ("False".into(), "AllHealthy".into())
    );
    assert_eq!(
        w.condition("DisruptionBudget"),
        ("True".into(), "Applied".into())
    );
    // From now on a starting member joins instead of founding a cluster.
    assert!(!w.configmap().new_cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_up_then_down() {
    let mut w = World::new("beta", json!({"size": 3}));
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 3)
        .await;
    let id = w.status()["clusterID"].clone();
    assert!(id.as_str().is_some_and(|s| s.len() >= 8), "{id}");

    w.set_spec(|s| s["size"] = json!(4));
    w.api.clear_calls();
    w.reconcile().await.unwrap();
    // First the learner, while the StatefulSet still has 3 pods.
    let st = w.status();
    assert_eq!(st["operation"]["kind"], "ScaleUp");
    assert_eq!(st["operation"]["member"], "beta-3");
    assert_eq!(w.sts_replicas(), Some(3));
    assert!(events(&w.api)
        .iter()
        .any(|(r, n)| r == "MemberAdded" && n.contains("beta-3")));
    assert_eq!(
        w.condition("Progressing"),
        ("True".into(), "ScalingUp".into())
    );
    // Then the pod, which joins with the member list it reads from the ConfigMap.
    w.reconcile().await.unwrap();
    assert_eq!(w.sts_replicas(), Some(4));
    let b = w.configmap();
    assert!(!b.new_cluster && b.initial_cluster.contains(&w.pods.layout.peer_url(3)));
    w.until("promoted", |w| {
        let st = w.status();
        st["size"] == 4 && st["readyMembers"] == 4 && st.get("operation").is_none()
    })
    .await;
    assert!(events(&w.api).iter().any(|(r, _)| r == "MemberPromoted"));
    assert_eq!(
        w.api.get(&pdb_path("beta")).unwrap()["spec"]["maxUnavailable"],
        1
    );
    assert_eq!(w.status()["clusterID"], id);

    w.set_spec(|s| s["size"] = json!(3));
    w.api.clear_calls();
    w.until("shrunk", |w| {
        w.status()["size"] == 3 && w.sts_replicas() == Some(3)
    })
    .await;
    let ev = events(&w.api);
    assert!(
        ev.iter()
            .any(|(r, n)| r == "MemberRemoved" && n.contains("beta-3")),
        "{ev:?}"
    );
    let deleted: Vec<String> = w
        .api
        .calls()
        .into_iter()
        .filter(|c| c.method == Method::DELETE)
        .map(|c| c.path)
        .collect();
    assert!(
        deleted.contains(&format!(
            "/api/v1/namespaces/{NS}/persistentvolumeclaims/data-beta-3"
        )),
        "{deleted:?}"
    );
    w.until("steady", |w| w.condition("Progressing").1 == "Steady")
        .await;
    assert_eq!(w.status()["members"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_changes_nothing_but_status() {
    let mut w = World::new("gamma", json!({"size": 3}));
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 3)
        .await;
    w.set_spec(|s| {
        s["size"] = json!(5);
        s["paused"] = json!(true);
        s["image"] = json!("cairn:other");
    });
    w.api.clear_calls();
    w.reconcile().await.unwrap();
    let writes: Vec<String> = w
        .api
        .calls()
        .into_iter()
        .filter(|c| c.method != Method::GET)
        .map(|c| c.path)
        .collect();
    assert_eq!(writes, vec![format!("{}/status", cluster_path("gamma"))]);
    assert_eq!(
        w.condition("Progressing"),
        ("False".into(), "Paused".into())
    );
    assert_eq!(w.status()["observedGeneration"], 2);
    let v = w.pods.members().observe().await.unwrap();
    assert_eq!(v.members.len(), 3, "no member was added while paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_is_reported_and_left_alone() {
    let mut w = World::new("delta", json!({"size": 3}));
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 3)
        .await;
    for o in 0..3 {
        w.pods.stop(o);
    }
    w.set_spec(|s| s["size"] = json!(1));
    w.api.clear_calls();
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Degraded"),
        ("True".into(), "Unreachable".into())
    );
    assert_eq!(
        w.condition("Available"),
        ("False".into(), "Unreachable".into())
    );
    assert_eq!(w.sts_replicas(), Some(3), "never shrunk while unreachable");
    assert!(events(&w.api).iter().any(|(r, _)| r == "Unreachable"));
    // The ConfigMap is not rewritten without a member list to write.
    assert!(!w
        .api
        .calls()
        .iter()
        .any(|c| c.method == Method::PATCH && c.path == cm_path("delta")));
    // Members were last seen as three: the status keeps that size.
    assert_eq!(w.status()["size"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_among_operator_replicas() {
    use cairn_operator::leader::LeaderElection;
    use k8s_openapi::api::coordination::v1::Lease;
    let api = FakeApi::default();
    let candidate = |id: &str| {
        LeaderElection::new(
            kube::Api::<Lease>::namespaced(api.client(), "ops"),
            "cairn-operator",
            id,
            Duration::from_secs(2),
        )
    };
    let (a, b) = (candidate("a"), candidate("b"));
    // Both try at once: exactly one wins.
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "a: {ra}, b: {rb}");
    let (leader, other) = if ra { (&a, &b) } else { (&b, &a) };
    // The holder renews; the other is refused while the lease is fresh.
    assert!(leader.try_acquire_or_renew().await.unwrap());
    assert!(!other.try_acquire_or_renew().await.unwrap());
    // The holder stops renewing (it died): once the lease expired the other takes over.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(other.try_acquire_or_renew().await.unwrap());
    assert!(!leader.try_acquire_or_renew().await.unwrap());
    let lease = api
        .get("/apis/coordination.k8s.io/v1/namespaces/ops/leases/cairn-operator")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(lease["spec"]["holderIdentity"], if ra { "b" } else { "a" });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_pdb_api_is_reported_not_fatal() {
    let mut w = World::new("eps", json!({"size": 1}));
    w.api.0.lock().unwrap().unserved.extend([
        "/apis/policy/v1/".to_string(),
        "/apis/networking.k8s.io/v1/".to_string(),
    ]);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    assert_eq!(w.sts_replicas(), Some(1));
    assert_eq!(
        w.condition("Available"),
        ("True".into(), "QuorumAvailable".into())
    );
    assert_eq!(
        w.condition("DisruptionBudget"),
        ("False".into(), "APINotServed".into())
    );
    assert!(events(&w.api)
        .iter()
        .any(|(r, _)| r == "PodDisruptionBudgetUnsupported"));
    assert_eq!(
        w.condition("NetworkPolicy"),
        ("False".into(), "APINotServed".into())
    );
}

fn backup_spec(moto: &crate::s3::Moto, schedule: &str) -> Value {
    json!({
        "schedule": schedule,
        "destination": {"s3": {
            "bucket": "scheduled", "prefix": "etcd", "endpoint": moto.url(),
            "region": "us-east-1", "forcePathStyle": true, "credentialsSecret": "s3-creds"
        }},
        "retention": {"keepLast": 2}
    })
}

fn put_credentials(api: &FakeApi) {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.put(
        &format!("/api/v1/namespaces/{NS}/secrets/s3-creds"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
               "data": {"AWS_ACCESS_KEY_ID": b64("testing"), "AWS_SECRET_ACCESS_KEY": b64("testing")}}),
    );
}

fn last_key(w: &World) -> Option<String> {
    w.status()["backup"]["lastBackup"]["key"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_land_prune_fail_visibly_and_recover() {
    let mut moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let mut w = World::new(
        "zeta",
        json!({"size": 1, "backup": backup_spec(&moto, "*/2 * * * * *")}),
    );
    put_credentials(&w.api);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    w.until("first backup", |w| last_key(w).is_some()).await;
    let st = w.status();
    assert_eq!(w.condition("BackupSucceeded").0, "True");
    let rec = &st["backup"]["lastBackup"];
    assert!(rec["sha256"].as_str().unwrap().len() == 64 && rec["size"].as_i64().unwrap() > 0);
    assert!(rec["key"]
        .as_str()
        .unwrap()
        .starts_with(&format!("etcd/{NS}/zeta/uid-zeta/")));
    assert!(st["backup"]["nextBackupTime"].is_string());
    // On time: taken within a few seconds of the scheduled time it is for.
    let ts = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let late = ts(&rec["time"]).duration_since(ts(&st["backup"]["lastScheduleTime"]));
    assert!(
        late.as_secs_f64() >= 0.0 && late.as_secs_f64() < 5.0,
        "taken {late:?} after its scheduled time"
    );
    // More backups on schedule; retention keeps the last two.
    let mut seen = std::collections::BTreeSet::new();
    w.until("three more backups", |w| {
        if let Some(k) = last_key(w) {
            seen.insert(k);
        }
        seen.len() >= 4
    })
    .await;
    let dest = moto.open("scheduled", "etcd");
    let dir = dest.cluster_dir(NS, "zeta", "uid-zeta");
    let kept = cairn_operator::backup::list_backups(&dest, &dir)
        .await
        .unwrap();
    assert!((2..=3).contains(&kept.len()), "retention: {kept:?}");
    let oldest = seen.iter().next().unwrap();
    assert!(
        !kept.iter().any(|(k, _)| k == oldest),
        "the oldest backup {oldest} survived retention: {kept:?}"
    );
    assert!(events(&w.api).iter().any(|(r, _)| r == "BackupSucceeded"));

    // The object store goes away: the failure shows in status and an Event, the cluster is fine.
    moto.stop();
    w.until("failure visible", |w| {
        w.condition("BackupSucceeded") == ("False".into(), "BackupFailed".into())
    })
    .await;
    assert!(w.status()["backup"]["failures"].as_i64().unwrap() >= 1);
    assert!(events(&w.api).iter().any(|(r, _)| r == "BackupFailed"));
    assert_eq!(w.condition("Available").0, "True");
    // It comes back (empty): backups resume.
    moto.restart();
    moto.create_bucket("scheduled");
    w.until("recovered", |w| w.condition("BackupSucceeded").0 == "True")
        .await;
    assert!(w.status()["backup"].get("failures").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_missed_while_the_operator_was_down_runs_when_it_is_back() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    // Yearly, on January 1st: never due during a test, unless one was missed.
    let mut w = World::new(
        "eta",
        json!({"size": 1, "backup": backup_spec(&moto, "0 0 1 1 *")}),
    );
    put_credentials(&w.api);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let next = w.status()["backup"]["nextBackupTime"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.ends_with("-01-01T00:00:00Z"), "{next}");
    assert!(last_key(&w).is_none());
    // The operator was down across January 1st: its last scheduled backup is two years old.
    let mut o = w.api.get(&cluster_path("eta")).unwrap();
    o["status"]["backup"]["lastScheduleTime"] = json!("2024-06-01T00:00:00Z");
    w.api.put(&cluster_path("eta"), o);
    // A new operator process (nothing in memory) takes over.
    let mut ctx = Context::new(w.api.client(), Metrics::default(), Some("restarted".into()));
    let layout: Arc<dyn Layout> = Arc::new(w.pods.layout.clone());
    ctx.layout = Box::new(move |_: &EtcdCluster| layout.clone());
    w.ctx = Arc::new(ctx);
    w.reconcile().await.unwrap();
    assert!(events(&w.api).iter().any(|(r, _)| r == "BackupStarted"));
    w.until("missed backup taken", |w| last_key(w).is_some())
        .await;
    let st = w.status();
    let last = st["backup"]["lastScheduleTime"].as_str().unwrap();
    assert!(
        last.ends_with("-01-01T00:00:00Z") && !last.starts_with("2024-06"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_backup_runs_once_and_reports() {
    use cairn_operator::controller::reconcile_backup;
    use cairn_operator::crd::EtcdBackup;
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let mut w = World::new("theta", json!({"size": 1}));
    put_credentials(&w.api);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let dest = backup_spec(&moto, "@yearly")["destination"].clone();
    let path = |n: &str| format!("/apis/cairn.dev/v1alpha1/namespaces/{NS}/etcdbackups/{n}");
    for (name, cluster) in [("now", "theta"), ("orphan", "missing")] {
        w.api.put(
            &path(name),
            json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdBackup",
                   "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
                   "spec": {"clusterName": cluster, "destination": dest}}),
        );
    }
    let get = |name: &str| -> EtcdBackup {
        serde_json::from_value(w.api.get(&path(name)).unwrap()).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        reconcile_backup(Arc::new(get("now")), w.ctx.clone())
            .await
            .unwrap();
        if w.api.get(&path("now")).unwrap()["status"]["phase"] == "Succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            w.api.get(&path("now")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = w.api.get(&path("now")).unwrap()["status"].clone();
    let key = st["backup"]["key"].as_str().unwrap().to_string();
    // Apart from the scheduled backups (the cluster's directory), under the EtcdBackup's name.
    assert!(
        key.starts_with(&format!("etcd/{NS}/theta/uid-theta/on-demand/now/")),
        "{key}"
    );
    let dest = moto.open("scheduled", "etcd");
    let rec = cairn_operator::backup::record(&dest, &key).await.unwrap();
    assert_eq!(rec.sha256, st["backup"]["sha256"].as_str().unwrap());
    // Start and completion times, and a Job's Complete condition.
    let (started, completed) = (
        st["startTime"].as_str().unwrap(),
        st["completionTime"].as_str().unwrap(),
    );
    assert!(started <= completed, "{st}");
    let complete = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Complete")
        .unwrap();
    assert_eq!(complete["status"], "True");
    assert_eq!(complete["reason"], "BackupSucceeded");
    // Retention of scheduled backups never sees it: even keeping none of them leaves it.
    let dir = dest.cluster_dir(NS, "theta", "uid-theta");
    assert!(cairn_operator::backup::list_backups(&dest, &dir)
        .await
        .unwrap()
        .is_empty());
    let keep_none: cairn_operator::crd::RetentionSpec =
        serde_json::from_value(json!({"maxAge": "1s"})).unwrap();
    cairn_operator::backup::apply_retention(
        &dest,
        &dir,
        &keep_none,
        jiff::Timestamp::now() + std::time::Duration::from_secs(3600),
        None,
    )
    .await
    .unwrap();
    assert!(cairn_operator::backup::record(&dest, &key).await.is_ok());
    // A restore from the cluster's latest backup finds it.
    assert_eq!(
        cairn_operator::backup::latest(&dest, &dir)
            .await
            .unwrap()
            .key,
        key
    );
    assert!(events(&w.api)
        .iter()
        .any(|(r, n)| r == "BackupSucceeded" && n.contains(&key)));
    // Done is done: reconciling again takes no second backup.
    let calls = w.api.calls().len();
    reconcile_backup(Arc::new(get("now")), w.ctx.clone())
        .await
        .unwrap();
    assert_eq!(w.api.calls().len(), calls);
    // A backup of a cluster that does not exist waits and says why.
    reconcile_backup(Arc::new(get("orphan")), w.ctx.clone())
        .await
        .unwrap();
    let st = w.api.get(&path("orphan")).unwrap()["status"].clone();
    assert_eq!(st["phase"], "Pending");
    assert_eq!(st["message"], "EtcdCluster missing not found");
}

fn restore_spec(moto: &crate::s3::Moto, from: Value) -> Value {
    let mut from = from;
    from["destination"] = backup_spec(moto, "@yearly")["destination"].clone();
    json!({"size": 3, "bootstrap": {"fromBackup": from}})
}

/// A one-member source cluster with keys, and a backup of it.
async fn source_with_backup(
    moto: &crate::s3::Moto,
    name: &str,
) -> (World, cairn_operator::crd::BackupRecord, Vec<KeyState>) {
    let mut w = World::new(name, json!({"size": 1}));
    w.until("source bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let mut c = etcd_client::Client::connect([w.pods.layout.client_url(0)], None)
        .await
        .unwrap();
    for i in 0..150 {
        c.put(format!("k/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.delete("k/000", None).await.unwrap();
    let kvs = dump(&mut c).await;
    let dest = moto.open("scheduled", "etcd");
    let dir = dest.cluster_dir(NS, name, &format!("uid-{name}"));
    let rec = cairn_operator::backup::stream_backup(
        &[w.pods.layout.client_url(0)],
        &cairn_operator::members::Access::default(),
        &dest,
        &dir,
        jiff::Timestamp::now(),
    )
    .await
    .unwrap();
    (w, rec, kvs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_starts_from_the_latest_backup() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let (_source, rec, kvs) = source_with_backup(&moto, "iota").await;
    let mut w = World::new(
        "kappa",
        restore_spec(&moto, json!({"prefix": format!("etcd/{NS}/iota")})),
    );
    put_credentials(&w.api);
    restored_on_every_member(&mut w, &kvs, rec.revision + 1).await;
    let st = w.status();
    assert_eq!(st["restoredFrom"], json!(rec.key));
    assert!(events(&w.api)
        .iter()
        .any(|(r, n)| r == "Restoring" && n.contains(&rec.key)));
    let sts = w.api.get(&sts_path("kappa")).unwrap();
    let inits: Vec<&str> = sts["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(inits, vec!["fetch-backup", "restore"]);
}

/// Waits until the restored cluster `w` has grown to 3 members, then checks that every member
/// has `kvs` (keys, values, revisions) and that the next write is at `next_revision`.
async fn restored_on_every_member(w: &mut World, kvs: &[KeyState], next_revision: i64) {
    w.until("restored and grown to 3", |w| {
        let st = w.status();
        st["size"] == 3 && st["readyMembers"] == 3 && st.get("operation").is_none()
    })
    .await;
    for o in 0..3 {
        let mut c = etcd_client::Client::connect([w.pods.layout.client_url(o)], None)
            .await
            .unwrap();
        assert_eq!(dump(&mut c).await, kvs, "member {o}");
    }
    let mut c = etcd_client::Client::connect([w.pods.layout.client_url(0)], None)
        .await
        .unwrap();
    let r = c.put("after", "restore", None).await.unwrap();
    assert_eq!(
        r.header().unwrap().revision(),
        next_revision,
        "revisions continue from the source's"
    );
}

/// Issue 25 (migration): `spec.bootstrap.fromEtcdSnapshot` takes `etcdctl snapshot save`'s
/// file of a real etcd 3.4 from object storage: the first member restores it (fetched without a
/// manifest, its own SHA-256 checked by `cairn snapshot restore`), the others join; every key
/// comes back with etcd's revisions and versions, and the next write is at etcd's revision + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_migrates_from_an_etcd_snapshot() {
    use object_store::ObjectStoreExt;
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    // A real etcd with history: overwrites, a delete, a compaction.
    let dir = tempfile::tempdir().unwrap();
    let ports = crate::ports::free_ports(2);
    let (client, peer) = (
        format!("http://127.0.0.1:{}", ports[0]),
        format!("http://127.0.0.1:{}", ports[1]),
    );
    let mut etcd = std::process::Command::new("etcd")
        .args(["--name", "e", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("e={peer}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcd 3.4 runs");
    let mut c = loop {
        if let Ok(mut c) = etcd_client::Client::connect([client.clone()], None).await {
            if c.status().await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..120 {
        c.put(format!("k/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in 0..30 {
        c.put(format!("k/{i:03}"), format!("again{i}"), None)
            .await
            .unwrap();
    }
    let mid = c.put("mid", "m", None).await.unwrap();
    c.compact(mid.header().unwrap().revision(), None)
        .await
        .unwrap();
    c.delete("k/007", None).await.unwrap();
    let kvs = dump(&mut c).await;
    let revision = c.status().await.unwrap().header().unwrap().revision();
    let file = dir.path().join("etcd.snap");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &client, "snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _ = etcd.kill();
    let _ = etcd.wait();
    let key = "migrate/etcd.snap";
    let dest = moto.open("scheduled", "");
    dest.store
        .put(
            &object_store::path::Path::from(key),
            std::fs::read(&file).unwrap().into(),
        )
        .await
        .unwrap();

    let mut from = json!({"key": key});
    from["destination"] = backup_spec(&moto, "@yearly")["destination"].clone();
    let mut w = World::new(
        "migrated",
        json!({"size": 3, "bootstrap": {"fromEtcdSnapshot": from}}),
    );
    put_credentials(&w.api);
    restored_on_every_member(&mut w, &kvs, revision + 1).await;
    assert_eq!(w.status()["restoredFrom"], json!(key));
    assert!(events(&w.api)
        .iter()
        .any(|(r, n)| r == "Restoring" && n.contains("etcd snapshot")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_missing_backup_never_bootstraps() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let (_source, rec, _) = source_with_backup(&moto, "lambda").await;
    let dest = moto.open("scheduled", "etcd");
    crate::s3::corrupt(&dest, &rec.key, 700, 0x10).await;

    let mut w = World::new("mu", restore_spec(&moto, json!({"key": rec.key})));
    put_credentials(&w.api);
    w.until("restore refused", |w| {
        w.condition("Degraded").1 == "RestoreFailed"
    })
    .await;
    let msg = w.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert_eq!(w.condition("Available").0, "False");
    assert!(
        w.pods.members().observe().await.is_err(),
        "nothing serves from a bad backup"
    );
    assert!(!w.pods.data_dir(0).exists());

    // A backup that does not exist: nothing is created at all.
    let w = World::new(
        "nu",
        restore_spec(&moto, json!({"key": "etcd/db/none/20200101T000000Z.snap"})),
    );
    put_credentials(&w.api);
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Degraded"),
        ("True".into(), "RestoreFailed".into())
    );
    assert!(w.api.get(&sts_path("nu")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_api_server_gets_no_fields_it_does_not_know() {
    let w = World::new("xi", json!({"size": 1}));
    w.api.put(
        "/version",
        json!({"major": "1", "minor": "20", "gitVersion": "v1.20.15", "gitCommit": "", "gitTreeState": "",
               "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}),
    );
    w.reconcile().await.unwrap();
    let sts = w.api.get(&sts_path("xi")).unwrap();
    assert!(
        sts["spec"]
            .get("persistentVolumeClaimRetentionPolicy")
            .is_none(),
        "{sts}"
    );
    // A current server gets it.
    let w = World::new("omicron", json!({"size": 1}));
    w.reconcile().await.unwrap();
    let sts = w.api.get(&sts_path("omicron")).unwrap();
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
        "Delete"
    );
}

/// The root password the operator made for `cluster`, from its Secret.
fn root_password(api: &FakeApi, cluster: &str) -> String {
    use base64::Engine as _;
    let s = api
        .get(&format!("/api/v1/namespaces/{NS}/secrets/{cluster}-root"))
        .expect("root Secret made");
    let b = s["data"]["password"].as_str().unwrap();
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
}

/// A request without a user: `Ok` with auth off, etcd's refusal with auth on.
async fn anonymous_user_list(w: &World) -> Result<(), String> {
    let mut c = etcd_client::Client::connect([w.pods.layout.client_url(0)], None)
        .await
        .unwrap();
    c.user_list().await.map(|_| ()).map_err(|e| e.to_string())
}

/// `spec.auth.enabled`: the operator makes root's password Secret, root and auth on the real
/// members, and keeps working as root (status, membership); users get in as root with that
/// password and not without a user. Turned off again, requests without a user work again. A
/// Secret that is named but missing is reported, and auth stays off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_turned_on_and_off_with_a_managed_root_password() {
    let mut w = World::new("locked", json!({"size": 1, "auth": {"enabled": true}}));
    w.until("auth on", |w| w.status()["authEnabled"] == true)
        .await;
    let password = root_password(&w.api, "locked");
    assert_eq!(password.len(), 32);
    assert_eq!(w.status()["rootSecret"], "locked-root");
    assert_eq!(w.condition("Auth"), ("True".into(), "Enabled".into()));
    let refused = anonymous_user_list(&w).await.unwrap_err();
    assert!(refused.contains("user name is empty"), "{refused}");
    let mut root = etcd_client::Client::connect(
        [w.pods.layout.client_url(0)],
        Some(etcd_client::ConnectOptions::new().with_user("root", password.as_str())),
    )
    .await
    .unwrap();
    root.put("k", "v", None).await.unwrap();
    let reasons: Vec<String> = events(&w.api).into_iter().map(|(r, _)| r).collect();
    assert!(
        reasons.contains(&"RootSecretCreated".to_string()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"AuthEnabled".to_string()), "{reasons:?}");
    // The operator still sees the members (as root) on later rounds.
    w.reconcile().await.unwrap();
    assert_eq!(w.status()["readyMembers"], 1);
    assert_eq!(w.status()["authEnabled"], true);

    w.set_spec(|s| s["auth"]["enabled"] = json!(false));
    w.until("auth off", |w| w.status()["authEnabled"] == false)
        .await;
    anonymous_user_list(&w).await.unwrap();
    assert_eq!(w.condition("Auth"), ("True".into(), "Disabled".into()));
    assert!(events(&w.api).iter().any(|(r, _)| r == "AuthDisabled"));

    let mut w = World::new(
        "named",
        json!({"size": 1, "auth": {"enabled": true, "rootSecret": "nowhere"}}),
    );
    w.until("reported", |w| {
        w.status()["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Auth"))
    })
    .await;
    assert_eq!(
        w.condition("Auth"),
        ("False".into(), "RootSecretMissing".into())
    );
    assert_eq!(w.status()["authEnabled"], false);
    anonymous_user_list(&w).await.unwrap();
}

fn secret_data(api: &FakeApi, name: &str) -> Option<BTreeMap<String, String>> {
    use base64::Engine as _;
    let s = api.get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))?;
    Some(
        s["data"]
            .as_object()?
            .iter()
            .map(|(k, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                (k.clone(), String::from_utf8(bytes).unwrap())
            })
            .collect(),
    )
}

fn template_args(w: &World) -> Vec<String> {
    let sts = w.api.get(&sts_path(&w.name)).expect("StatefulSet");
    sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// `spec.tls` in Operator mode on a new cluster: the CA and four certificates in Secrets owned
/// by the cluster (the members' for clients and peers, chained to the CA and naming the
/// members; the operator's and the users' client certificates), the template serving both
/// sides over TLS from the mounted Secrets, peer URLs `https://` from the first bootstrap, the
/// users' Secret in status; a second round reissues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_operator_mode_makes_the_ca_and_certificates_and_serves_from_them() {
    let w = World::new("sealed", json!({"size": 1, "tls": {"enabled": true}}));
    w.reconcile().await.unwrap();
    let ca = secret_data(&w.api, "sealed-ca").expect("CA Secret");
    assert!(ca["ca.crt"].contains("BEGIN CERTIFICATE") && ca["ca.key"].contains("PRIVATE KEY"));
    // Peers have a CA of their own: no client certificate gets onto the peer port.
    let peer_ca = secret_data(&w.api, "sealed-peer-ca").expect("peer CA Secret");
    assert_ne!(peer_ca["ca.crt"], ca["ca.crt"]);
    let mut issued = BTreeMap::new();
    for name in [
        "sealed-server-tls",
        "sealed-peer-tls",
        "sealed-operator-tls",
        "sealed-client-tls",
    ] {
        let ca = if name == "sealed-peer-tls" {
            &peer_ca
        } else {
            &ca
        };
        let raw = w
            .api
            .get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))
            .unwrap_or_else(|| panic!("no Secret {name}"));
        assert_eq!(raw["type"], "kubernetes.io/tls", "{name}");
        assert_eq!(
            raw["metadata"]["ownerReferences"][0]["name"], "sealed",
            "{name}"
        );
        let d = secret_data(&w.api, name).unwrap();
        assert!(
            cairn_operator::pki::signed_by(&d["tls.crt"], &ca["ca.crt"]),
            "{name}"
        );
        assert_eq!(d["ca.crt"].trim(), ca["ca.crt"].trim(), "{name}");
        issued.insert(name, d["tls.crt"].clone());
    }
    let args = template_args(&w);
    for want in [
        "--listen-client-urls=https://0.0.0.0:2379",
        "--listen-peer-urls=https://0.0.0.0:2380",
        "--cert-file=/etc/cairn/tls/client/tls.crt",
        "--peer-trusted-ca-file=/etc/cairn/tls/peer/ca.crt",
        "--client-cert-auth",
        "--listen-metrics-urls=http://0.0.0.0:2381",
    ] {
        assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
    }
    assert!(!args
        .iter()
        .any(|a| a == "--experimental-peer-accept-plaintext"));
    let sts = w.api.get(&sts_path("sealed")).unwrap();
    let volumes = &sts["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "sealed-server-tls");
    assert_eq!(volumes[1]["secret"]["secretName"], "sealed-peer-tls");
    let probe = &sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"], 2381);
    // A new cluster starts with https:// peer URLs: no migration.
    assert!(
        w.configmap()
            .initial_cluster
            .contains("=https://127.0.0.1:"),
        "{}",
        w.configmap().initial_cluster
    );
    assert_eq!(w.status()["tls"]["clientSecret"], "sealed-client-tls");
    let reasons: Vec<String> = events(&w.api).into_iter().map(|(r, _)| r).collect();
    assert!(
        reasons.contains(&"CertificateAuthority".to_string()),
        "{reasons:?}"
    );
    // Nothing is due: the next round writes no certificate.
    w.reconcile().await.unwrap();
    for (name, cert) in issued {
        assert_eq!(
            secret_data(&w.api, name).unwrap()["tls.crt"],
            cert,
            "{name} reissued"
        );
    }
}

/// `spec.tls` in CertManager mode: with no cert-manager API the TLS condition says so and no
/// StatefulSet is made; with it, a Certificate per Secret (the members' for each side with
/// their DNS names, the operator's and the users' client certificates) names the issuer, and
/// the cluster waits until their Secrets are filled; a cert-manager stand-in (cert-manager's
/// controller cannot run here) fills them from its own CA, and the members then mount them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cert_manager_mode_waits_for_certificates_and_mounts_their_secrets() {
    let issuer = json!({"name": "ca-issuer", "kind": "ClusterIssuer"});
    let w = World::new(
        "managed",
        json!({"size": 1, "tls": {"client": {"mode": "CertManager", "issuerRef": issuer},
                                   "peer": {"mode": "CertManager", "issuerRef": issuer}}}),
    );
    w.api
        .0
        .lock()
        .unwrap()
        .unserved
        .push("/apis/cert-manager.io/".into());
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("TLS"),
        ("False".into(), "CertManagerMissing".into())
    );
    assert!(
        w.sts_replicas().is_none(),
        "a StatefulSet without its certificates"
    );

    w.api.0.lock().unwrap().unserved.clear();
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("TLS"),
        ("False".into(), "WaitingForCertificates".into())
    );
    assert!(w.sts_replicas().is_none());
    let certs = format!("/apis/cert-manager.io/v1/namespaces/{NS}/certificates");
    let mut found = Vec::new();
    for name in [
        "managed-server",
        "managed-peer",
        "managed-operator",
        "managed-client",
    ] {
        let c = w
            .api
            .get(&format!("{certs}/{name}"))
            .unwrap_or_else(|| panic!("no Certificate {name}"));
        assert_eq!(c["spec"]["issuerRef"]["name"], "ca-issuer");
        assert_eq!(c["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        assert_eq!(c["spec"]["secretName"], format!("{name}-cm-tls"));
        found.push(c);
    }
    assert!(found[0]["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .contains(&json!("*.managed-peer.db.svc")));
    assert_eq!(found[2]["spec"]["commonName"], "cairn-operator");

    // The stand-in: cert-manager's part, a Secret per Certificate signed by its CA.
    let now = jiff::Timestamp::now();
    let ca = cairn_operator::pki::new_ca("stand-in", now, Duration::from_secs(86400)).unwrap();
    for c in &found {
        let profile = match c["spec"]["commonName"].as_str() {
            Some(cn) => cairn_operator::pki::Profile::Client {
                common_name: cn.to_string(),
            },
            None => cairn_operator::pki::member_profile(&cairn_operator::layout::Names {
                cluster: "managed".into(),
                namespace: NS.into(),
            }),
        };
        let leaf =
            cairn_operator::pki::issue(&ca, &profile, now, Duration::from_secs(3600)).unwrap();
        use base64::Engine as _;
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let secret = c["spec"]["secretName"].as_str().unwrap();
        w.api.put(
            &format!("/api/v1/namespaces/{NS}/secrets/{secret}"),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                   "metadata": {"name": secret, "namespace": NS},
                   "data": {"tls.crt": b(&leaf.cert), "tls.key": b(&leaf.key), "ca.crt": b(&ca.cert)}}),
        );
    }
    w.reconcile().await.unwrap();
    assert_eq!(w.sts_replicas(), Some(1));
    let sts = w.api.get(&sts_path("managed")).unwrap();
    let volumes = &sts["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "managed-server-cm-tls");
    assert_eq!(volumes[1]["secret"]["secretName"], "managed-peer-cm-tls");
    assert!(template_args(&w).contains(&"--client-cert-auth".to_string()));
    assert_eq!(w.status()["tls"]["clientSecret"], "managed-client-cm-tls");
    // The operator makes no certificate of its own in this mode.
    assert!(secret_data(&w.api, "managed-ca").is_none());
}

/// `spec.tls` in Secret mode: the cluster waits for the user's Secrets (saying which is
/// missing), then mounts them as they are; the operator makes no certificate and names no
/// users' Secret (the user has theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_secret_mode_waits_for_the_users_secrets_and_mounts_them() {
    let w = World::new(
        "own",
        json!({"size": 1, "tls": {"client": {"mode": "Secret", "secretName": "own-certs"},
                                   "peer": {"mode": "Secret", "secretName": "own-peer-certs"}}}),
    );
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("TLS"),
        ("False".into(), "WaitingForCertificates".into())
    );
    let msg = w.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "TLS")
        .unwrap()["message"]
        .clone();
    assert!(msg.as_str().unwrap().contains("own-certs"), "{msg}");
    assert!(w.sts_replicas().is_none());
    let now = jiff::Timestamp::now();
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (name, ca_name) in [("own-certs", "user CA"), ("own-peer-certs", "user peer CA")] {
        let ca = cairn_operator::pki::new_ca(ca_name, now, Duration::from_secs(86400)).unwrap();
        let profile = cairn_operator::pki::member_profile(&cairn_operator::layout::Names {
            cluster: "own".into(),
            namespace: NS.into(),
        });
        let leaf =
            cairn_operator::pki::issue(&ca, &profile, now, Duration::from_secs(3600)).unwrap();
        w.api.put(
            &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                   "data": {"tls.crt": b(&leaf.cert), "tls.key": b(&leaf.key), "ca.crt": b(&ca.cert)}}),
        );
    }
    w.reconcile().await.unwrap();
    assert_eq!(w.sts_replicas(), Some(1));
    let sts = w.api.get(&sts_path("own")).unwrap();
    let volumes = &sts["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "own-certs");
    assert_eq!(volumes[1]["secret"]["secretName"], "own-peer-certs");
    assert!(secret_data(&w.api, "own-ca").is_none());
    assert!(secret_data(&w.api, "own-client-tls").is_none());
    assert!(w.status()["tls"]["clientSecret"].is_null());
}

/// Growing `spec.storage.size`: the StatefulSet keeps its claim template (the API server
/// refuses to change it, as the mock does), so the reconcile goes on; each member's claim asks
/// for the new size, `Storage` says Expanding until the claims' capacity has it, then
/// Expanded; a claim whose StorageClass cannot expand is said in the condition; shrinking and
/// another StorageClass are refused and change nothing; status and the members stay served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_grows_in_place_and_shrinking_is_refused() {
    let mut w = World::new("vol", json!({"size": 1, "storage": {"size": "1Gi"}}));
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let claim = format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/data-vol-0");
    let put_claim = |w: &World, asked: &str, capacity: &str| {
        w.api.put(
            &claim,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "data-vol-0", "namespace": NS},
                   "spec": {"resources": {"requests": {"storage": asked}}},
                   "status": {"capacity": {"storage": capacity}}}),
        )
    };
    let asked = |w: &World| {
        w.api.get(&claim).unwrap()["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let template_size = |w: &World| {
        w.api.get(&sts_path("vol")).unwrap()["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]
            ["requests"]["storage"]
            .clone()
    };
    // The StatefulSet controller's part: the member's claim.
    put_claim(&w, "1Gi", "1Gi");

    w.set_spec(|s| s["storage"]["size"] = json!("2Gi"));
    w.api.clear_calls();
    w.reconcile().await.unwrap();
    assert_eq!(asked(&w), "2Gi");
    assert_eq!(w.condition("Storage"), ("False".into(), "Expanding".into()));
    assert!(w.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["type"] != "StatefulSet"));
    // Not re-created while a claim has not grown: it cannot be taken back.
    let sts_deletes = |w: &World| -> Vec<Call> {
        w.api
            .calls()
            .into_iter()
            .filter(|c| c.method == Method::DELETE && c.path == sts_path("vol"))
            .collect()
    };
    assert!(sts_deletes(&w).is_empty());
    assert_eq!(template_size(&w), "1Gi");
    // The resizer's part: the volume has grown. The StatefulSet is then deleted with its pods
    // orphaned and made again with the new claim template (the API server refuses to change
    // it in place), so members added later start at 2Gi.
    put_claim(&w, "2Gi", "2Gi");
    w.reconcile().await.unwrap();
    assert_eq!(w.condition("Storage"), ("True".into(), "Expanded".into()));
    assert_eq!(w.status()["readyMembers"], 1);
    assert_eq!(w.status()["observedGeneration"], 2);
    let deletes = sts_deletes(&w);
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].body["propagationPolicy"], "Orphan");
    assert_eq!(template_size(&w), "2Gi");
    assert_eq!(w.sts_replicas(), Some(1));
    assert!(events(&w.api)
        .iter()
        .any(|(r, _)| r == "StatefulSetRecreated"));
    w.reconcile().await.unwrap();
    assert_eq!(sts_deletes(&w).len(), 1, "re-created once");

    // Smaller: refused, nothing touched.
    w.set_spec(|s| s["storage"]["size"] = json!("512Mi"));
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Storage"),
        ("False".into(), "ShrinkRefused".into())
    );
    assert_eq!(asked(&w), "2Gi");
    assert_eq!(template_size(&w), "2Gi");
    // Another class: refused.
    w.set_spec(|s| s["storage"] = json!({"size": "2Gi", "storageClassName": "elsewhere"}));
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Storage"),
        ("False".into(), "StorageClassImmutable".into())
    );
    // A class that cannot expand: the API server's refusal is in the condition.
    w.api.0.lock().unwrap().unexpandable.push(claim.clone());
    w.set_spec(|s| s["storage"] = json!({"size": "4Gi"}));
    w.reconcile().await.unwrap();
    let (ok, reason) = w.condition("Storage");
    assert_eq!(
        (ok.as_str(), reason.as_str()),
        ("False", "ExpansionNotSupported")
    );
    assert_eq!(asked(&w), "2Gi");
    // Back to what the volumes have: as requested.
    w.set_spec(|s| s["storage"] = json!({"size": "2Gi"}));
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Storage"),
        ("True".into(), "AsRequested".into())
    );
    assert_eq!(w.status()["readyMembers"], 1);

    // The StatefulSet deleted by hand (its pods orphaned): made again for the member that is
    // listed, not bootstrapped anew.
    w.api.0.lock().unwrap().objects.remove(&sts_path("vol"));
    w.reconcile().await.unwrap();
    assert_eq!(w.sts_replicas(), Some(1));
    assert!(!w.configmap().new_cluster);
    assert_eq!(w.status()["readyMembers"], 1);
}

/// `spec.server.extraArgs` that cairn does not take, or that the operator sets itself, are
/// left out of the members' flags and said in the `Server` condition; the rest (compaction on
/// by default) is in the template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_reach_the_template_and_bad_extra_args_are_refused() {
    let w = World::new(
        "tuned",
        json!({"size": 1, "server": {"snapshotCount": 5000,
               "extraArgs": ["--max-txn-ops=256", "--data-dir=/tmp/elsewhere", "--bogus"]}}),
    );
    w.reconcile().await.unwrap();
    let args = template_args(&w);
    for want in [
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1h",
        "--snapshot-count=5000",
        "--max-txn-ops=256",
    ] {
        assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
    }
    assert!(!args
        .iter()
        .any(|a| a == "--data-dir=/tmp/elsewhere" || a == "--bogus"));
    assert_eq!(
        w.condition("Server"),
        ("False".into(), "ExtraArgsRefused".into())
    );
    w.set_spec(|s| s["server"]["extraArgs"] = json!(["--max-txn-ops=256"]));
    w.reconcile().await.unwrap();
    assert_eq!(w.condition("Server"), ("True".into(), "Applied".into()));
}

/// `spec.maintenance.defrag` on a schedule that is due at once: the members are defragmented
/// one per round, the leader last, with an Event each, and the run is recorded in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_defragmentation_runs_member_by_member_leader_last() {
    let mut w = World::new(
        "tidy",
        json!({"size": 3, "maintenance": {"defrag": {"schedule": "* * * * * *"}}}),
    );
    w.until("defragmented", |w| {
        w.status()["maintenance"]["lastDefrag"].is_string()
    })
    .await;
    let evs: Vec<(String, String)> = events(&w.api)
        .into_iter()
        .filter(|(r, _)| r.starts_with("Defrag") || r == "MemberDefragmented")
        .collect();
    let reasons: Vec<&str> = evs.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons[..5],
        [
            "DefragStarted",
            "MemberDefragmented",
            "MemberDefragmented",
            "MemberDefragmented",
            "DefragCompleted"
        ],
        "{evs:?}"
    );
    assert!(
        evs[1].1.contains("a follower") && evs[2].1.contains("a follower"),
        "{evs:?}"
    );
    assert!(evs[3].1.contains("the leader"), "{evs:?}");
    let st = w.status();
    assert_eq!(
        st["maintenance"]["defragmented"].as_array().unwrap().len(),
        3,
        "{st}"
    );
    assert_eq!(
        w.condition("Maintenance"),
        ("True".into(), "Completed".into())
    );
}

/// Writes values of 100 kB to `key(i)` until the member refuses with NOSPACE. The values are
/// noise: RocksDB compresses, and a run of one byte would take no space once compacted.
async fn fill_until_nospace(c: &mut etcd_client::Client, key: impl Fn(usize) -> String) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..400 {
        let value: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if let Err(e) = c.put(key(i), value, None).await {
            assert!(e.to_string().contains("database space exceeded"), "{e}");
            return;
        }
        // The size the quota sees is refreshed twice a second.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no NOSPACE after 400 writes of 100 kB");
}

/// A NOSPACE alarm is handled, not just reported: when the space went to history, the
/// reconcile compacts, defragments and disarms (Event NoSpaceRecovered) and writes work again;
/// when live data fills the quota, the alarm stays, the Space condition says why, and the next
/// attempt waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nospace_alarm_is_cleared_by_compacting_and_defragmenting() {
    let mut w = World::new(
        "full",
        json!({"size": 1, "server": {"quotaBackendBytes": 3_000_000}}),
    );
    w.pods.extra = vec!["--quota-backend-bytes=3000000".to_string()];
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let mut c = etcd_client::Client::connect([w.pods.layout.client_url(0)], None)
        .await
        .unwrap();
    let nospace = |alarms: &etcd_client::AlarmResponse| {
        alarms
            .alarms()
            .iter()
            .any(|a| a.alarm() == etcd_client::AlarmType::Nospace)
    };

    fill_until_nospace(&mut c, |_| "history".to_string()).await;
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Space"),
        ("True".into(), "Recovered".into()),
        "{}",
        w.status()
    );
    let recovered: Vec<String> = events(&w.api)
        .into_iter()
        .filter(|(r, _)| r == "NoSpaceRecovered")
        .map(|(_, m)| m)
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert!(
        recovered[0].contains("compacted at revision"),
        "{}",
        recovered[0]
    );
    let alarms = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .unwrap();
    assert!(!nospace(&alarms));
    // At once: the quota check does not refuse on the size it read before the recovery.
    c.put("after", "ok", None).await.unwrap();

    // Live data over the quota: nothing to reclaim. (The back-off after the first attempt
    // has passed.) The member is restarted with a quota above spec's, as one still running
    // with its flags from before spec.server.quotaBackendBytes was lowered: a member that
    // refuses writes at its own quota can hold live data just under it (27 of the 30 values
    // measured here), and its alarm is then rightly cleared.
    let mut o = w.api.get(&cluster_path("full")).unwrap();
    o["status"]["lastNoSpaceRecovery"] = json!("2026-01-01T00:00:00Z");
    w.api.put(&cluster_path("full"), o);
    w.pods.stop(0);
    w.pods.extra = vec!["--quota-backend-bytes=4500000".to_string()];
    let b = w.configmap();
    w.pods.start(0, &b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status().await.is_err() {
        assert!(Instant::now() < deadline, "the member did not start again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fill_until_nospace(&mut c, |i| format!("live/{i}")).await;
    w.reconcile().await.unwrap();
    assert_eq!(
        w.condition("Space"),
        ("False".into(), "QuotaExceeded".into()),
        "{}",
        w.status()
    );
    assert!(events(&w.api)
        .iter()
        .any(|(r, m)| r == "QuotaExceeded" && m.contains("quotaBackendBytes")));
    let alarms = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .unwrap();
    assert!(nospace(&alarms), "the alarm of a full member stays");
    // The next rounds do not compact and defragment again before the back-off: the time of
    // the last attempt stays.
    let attempt = w.status()["lastNoSpaceRecovery"].clone();
    assert!(attempt.is_string(), "{}", w.status());
    for _ in 0..2 {
        w.reconcile().await.unwrap();
        assert_eq!(w.status()["lastNoSpaceRecovery"], attempt);
    }
    assert_eq!(
        w.condition("Space"),
        ("False".into(), "QuotaExceeded".into())
    );
}

/// Waits until the three members answer with a leader; returns a client of them.
async fn three_ready(w: &mut World) -> etcd_client::Client {
    w.until("3 members ready", |w| {
        let st = w.status();
        st["readyMembers"] == 3 && st["leader"].is_string()
    })
    .await;
    etcd_client::Client::connect(w.pods.endpoints(), None)
        .await
        .unwrap()
}

/// Issue 25 (quorum-loss recovery): two of three members lost with their data. `Manual`: the
/// operator says what it would do and waits; the annotation's token starts it: the other two
/// are fenced (pods and volumes deleted), the survivor restarts as a one-member cluster from
/// its own data (member and cluster IDs kept), `Recovered` says the revision kept and the
/// highest one reported before, and the cluster grows back to three with every acknowledged
/// write on every member. The same token again does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quorum_is_recovered_on_a_token_from_the_member_with_the_most_data() {
    let mut w = World::new("lost", json!({"size": 3}));
    w.restart_deleted = true;
    let mut c = three_ready(&mut w).await;
    for i in 0..50 {
        c.put(format!("k/{:02}", i % 30), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let kvs = dump(&mut c).await;
    let revision = c.status().await.unwrap().header().unwrap().revision();
    let cluster_id = w.status()["clusterID"].clone();
    let survivor_id = w.status()["members"][0]["id"].clone();
    // The operator learns the revision from the members' Status.
    w.until("the revision reported", |w| {
        w.status()["revision"] == revision
    })
    .await;
    // A token set while the quorum answers is used up, not kept for the next outage.
    w.annotate("cairn.dev/recover", "early");
    w.until("the early token used up", |w| {
        w.status()["recovery"]["usedTokens"][0] == "early"
    })
    .await;
    assert!(events(&w.api).iter().any(|(r, _)| r == "RecoveryNotNeeded"));
    for o in [1, 2] {
        w.pods.stop(o);
        std::fs::remove_dir_all(w.pods.volume(o)).unwrap();
    }
    w.until("quorum loss seen", |w| {
        w.status()["recovery"]["waiting"]
            .as_str()
            .is_some_and(|m| m.contains("cairn.dev/recover=") && m.contains("lost-0"))
    })
    .await;
    // Manual: rounds go by, nothing is done.
    for _ in 0..3 {
        w.reconcile().await.unwrap();
    }
    let seen: Vec<String> = events(&w.api).into_iter().map(|(r, _)| r).collect();
    assert!(seen.contains(&"QuorumLost".to_string()), "{seen:?}");
    assert!(!seen.contains(&"RecoveryStarted".to_string()), "{seen:?}");
    assert!(
        w.pods.exit_status(0).is_none(),
        "the survivor was not touched"
    );

    w.annotate("cairn.dev/recover", "outage-1");
    w.until("recovered", |w| {
        w.status()["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Recovered" && c["status"] == "True")
        })
    })
    .await;
    let st = w.status();
    assert_eq!(st["recovery"]["lastToken"], "outage-1", "{st}");
    assert_eq!(st["clusterID"], cluster_id);
    let recovered = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Recovered")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        recovered.contains(&format!("revision {revision} kept"))
            && recovered.contains(&format!("before the loss was {revision}")),
        "{recovered}"
    );
    let seen: Vec<(String, String)> = events(&w.api);
    let reasons: Vec<&str> = seen.iter().map(|(r, _)| r.as_str()).collect();
    let at = |r: &str| {
        reasons
            .iter()
            .position(|x| *x == r)
            .unwrap_or_else(|| panic!("no {r}: {reasons:?}"))
    };
    assert!(at("RecoveryStarted") < at("MemberFenced"));
    assert!(at("MemberFenced") < at("ForcingNewCluster"));
    assert!(at("ForcingNewCluster") < at("Recovered"));
    assert_eq!(reasons.iter().filter(|r| **r == "MemberFenced").count(), 2);
    // The survivor kept its member ID; the ConfigMap no longer names it.
    restored_on_every_member(&mut w, &kvs, revision + 1).await;
    let st = w.status();
    assert_eq!(st["members"][0]["id"], survivor_id, "{st}");
    let cm = w.api.get(&cm_path("lost")).unwrap();
    assert_eq!(cm["data"]["force-new-cluster-once"], "");
    // The same token again: nothing more.
    w.clear_calls_for_test();
    for _ in 0..3 {
        w.reconcile().await.unwrap();
        w.kubelet();
    }
    assert!(events(&w.api).iter().all(|(r, _)| r != "RecoveryStarted"));
}

/// `Automatic`: two members killed with their data are recovered from without a token once
/// `after` has passed; a majority that was only frozen for less than `after` is never
/// "recovered".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quorum_is_recovered_automatically_and_a_slow_one_is_not() {
    let mut w = World::new(
        "auto",
        json!({"size": 3, "recovery": {"quorumLoss": "Automatic", "after": "8s"}}),
    );
    w.restart_deleted = true;
    let mut c = three_ready(&mut w).await;
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    // Frozen (SIGSTOP) for about half of `after`: the quorum is lost and comes back untouched.
    for o in [1, 2] {
        w.pods.freeze(o);
    }
    let frozen = Instant::now();
    w.until("quorum loss seen", |w| {
        w.status()["recovery"]["quorumLostSince"].is_string()
    })
    .await;
    while frozen.elapsed() < Duration::from_secs(4) {
        w.reconcile().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for o in [1, 2] {
        w.pods.thaw(o);
    }
    w.until("quorum back", |w| {
        w.status()["readyMembers"] == 3 && w.status()["recovery"]["quorumLostSince"].is_null()
    })
    .await;
    assert!(events(&w.api).iter().all(|(r, _)| r != "RecoveryStarted"));
    let kvs = dump(&mut c).await;
    let revision = c.status().await.unwrap().header().unwrap().revision();
    // Their data lost, their pods back empty and refusing to start: recovered once `after`
    // has passed, with no token. (The survivor still calls itself leader: the repair of a
    // member whose data is gone must not be tried without a quorum, or the reconcile fails
    // on it and the outage's clock is never saved.)
    for o in [1, 2] {
        w.lose_data(o).await;
    }
    let lost = Instant::now();
    w.until("recovered", |w| {
        w.status()["recovery"]["lastToken"]
            .as_str()
            .is_some_and(|t| t.starts_with("auto-"))
    })
    .await;
    assert!(
        lost.elapsed() >= Duration::from_secs(8),
        "{:?}",
        lost.elapsed()
    );
    restored_on_every_member(&mut w, &kvs, revision + 1).await;
}

/// Issue 25 (any object store, `pvc`): a cluster backing up to a claim. Without the claim the
/// backup fails and says so; with it the operator makes the claim's server (a Deployment that
/// mounts the claim, a Service, a token Secret, all owned by the claim), the backups land in
/// the claim's directory (served here by `serve-store` on loopback with the Secret's token) and
/// the verification Job reads them back through the server with the Secret's keys as its
/// environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_to_a_pvc_go_through_the_claims_server() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut w = World::new(
        "pvcb",
        json!({"size": 1, "backup": {"schedule": "*/2 * * * * *",
               "destination": {"pvc": {"claimName": "backups", "prefix": "etcd"}}}}),
    );
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    w.until("the missing claim reported", |w| {
        w.status()["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "BackupSucceeded"
                    && c["status"] == "False"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("PersistentVolumeClaim backups not found"))
            })
        })
    })
    .await;
    let secret_path = format!("/api/v1/namespaces/{NS}/secrets/cairn-store-backups");
    assert!(w.api.get(&secret_path).is_none());
    w.api.put(
        &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/backups"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "backups", "namespace": NS, "uid": "claim-uid"}}),
    );
    w.until("the claim's server made", |w| {
        w.api.get(&secret_path).is_some()
    })
    .await;
    let dep_path = format!("/apis/apps/v1/namespaces/{NS}/deployments/cairn-store-backups");
    let mut dep = w.api.get(&dep_path).expect("the server's Deployment");
    // Not used before its pod is ready.
    assert!(
        w.status()["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| {
                c["type"] == "BackupSucceeded"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("is not ready yet"))
            })),
        "{}",
        w.status()
    );
    // Its pod ready, as the Deployment controller would say.
    dep["status"] = json!({"replicas": 1, "readyReplicas": 1});
    w.api.put(&dep_path, dep.clone());
    assert_eq!(dep["metadata"]["ownerReferences"][0]["uid"], "claim-uid");
    assert_eq!(
        dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "backups"
    );
    assert!(w
        .api
        .get(&format!(
            "/api/v1/namespaces/{NS}/services/cairn-store-backups"
        ))
        .is_some());
    let mut secret = w.api.get(&secret_path).unwrap();
    let token = String::from_utf8(
        b64.decode(secret["data"]["CAIRN_STORE_TOKEN"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(token.len(), 64);
    let url = String::from_utf8(
        b64.decode(secret["data"]["CAIRN_STORE_URL"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(url, format!("http://cairn-store-backups.{NS}.svc:8080"));
    // The claim, as its server would serve it; the Secret's URL pointed at it.
    let root = w.pods.scratch().join("claim");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cairn_operator::store::server::serve(
        root.clone(),
        token,
        listener,
        std::future::pending(),
    ));
    secret["data"]["CAIRN_STORE_URL"] = json!(b64.encode(&local));
    w.api.put(&secret_path, secret);
    w.until("a backup verified", |w| {
        w.status()["backup"]["lastVerifiedBackup"]["key"].is_string()
    })
    .await;
    let key = w.status()["backup"]["lastVerifiedBackup"]["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(key.starts_with(&format!("etcd/{NS}/pvcb/")), "{key}");
    assert!(root.join(&key).is_file(), "{key} is not in the claim");
    assert_eq!(
        w.condition("BackupVerified"),
        ("True".into(), "BackupVerified".into())
    );
}

/// Issue 25 (verified backups): every scheduled backup is verified by a Job that restores it
/// into a scratch member with no peers (`cairn snapshot verify` on what `fetch-backup`
/// downloaded): `lastVerifiedBackup`, `BackupVerified`, an Event and the metric. A backup
/// corrupted in the store before its Job runs fails verification, says why, and is not
/// `lastVerifiedBackup`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_verified_and_a_corrupted_one_fails_verification() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let mut w = World::new(
        "vera",
        json!({"size": 1, "backup": backup_spec(&moto, "*/2 * * * * *")}),
    );
    put_credentials(&w.api);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    let mut c = etcd_client::Client::connect(w.pods.endpoints(), None)
        .await
        .unwrap();
    for i in 0..40 {
        c.put(format!("k{i}"), vec![b'v'; 1000], None)
            .await
            .unwrap();
    }
    w.until("a backup verified", |w| {
        w.status()["backup"]["lastVerifiedBackup"]["key"].is_string()
    })
    .await;
    let st = w.status();
    let verified = st["backup"]["lastVerifiedBackup"].clone();
    assert!(
        verified["keys"].as_i64().is_some() && verified["hash"].as_u64().is_some(),
        "{st}"
    );
    assert_eq!(
        w.condition("BackupVerified"),
        ("True".into(), "BackupVerified".into())
    );
    assert!(events(&w.api)
        .iter()
        .any(|(r, m)| r == "BackupVerified" && m.contains(verified["key"].as_str().unwrap())));
    let ok = w
        .ctx
        .metrics
        .backup_verifications
        .with_label_values(&[NS, "vera", "ok"])
        .get();
    assert!(ok >= 1);

    // The next one is corrupted in the store before its Job runs.
    w.hold_jobs = true;
    let verified_key = verified["key"].as_str().unwrap().to_string();
    w.until("the next verification started", |w| {
        w.status()["backup"]["verifying"]["key"]
            .as_str()
            .is_some_and(|k| k != verified_key)
    })
    .await;
    let held = w.status()["backup"]["verifying"]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let dest = moto.open("scheduled", "etcd");
    crate::s3::corrupt(&dest, &held, 5000, 0x40).await;
    w.hold_jobs = false;
    w.until("the verification failed", |w| {
        w.status()["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "BackupVerified" && c["status"] == "False")
        })
    })
    .await;
    assert_eq!(w.condition("BackupVerified").1, "VerificationFailed");
    let failed: Vec<String> = events(&w.api)
        .into_iter()
        .filter(|(r, _)| r == "BackupVerificationFailed")
        .map(|(_, m)| m)
        .collect();
    assert!(
        failed
            .iter()
            .any(|m| m.contains(&held) && m.contains("checksum mismatch")),
        "{failed:?}"
    );
    assert_ne!(
        w.status()["backup"]["lastVerifiedBackup"]["key"].as_str(),
        Some(held.as_str()),
        "a backup that failed verification is never the last verified one"
    );
    let failures = w
        .ctx
        .metrics
        .backup_verifications
        .with_label_values(&[NS, "vera", "failed"])
        .get();
    assert_eq!(failures, 1);
}

/// Issue 25 (verification on a schedule): backups every 2 s, verifications at the seconds of
/// `verify.schedule` (multiples of 7) only, each of the latest backup; the scheduled time is
/// recorded. With a credentials Secret no backup ServiceAccount is made (the Job's pod runs as
/// the namespace's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_on_its_own_schedule() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let mut spec = backup_spec(&moto, "*/2 * * * * *");
    spec["verify"] = json!({"schedule": "*/7 * * * * *"});
    let mut w = World::new("sched", json!({"size": 1, "backup": spec}));
    put_credentials(&w.api);
    w.until("bootstrapped", |w| w.status()["readyMembers"] == 1)
        .await;
    // Every backup and every verification seen, by key.
    let seen = std::sync::Mutex::new((
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    ));
    w.until("two scheduled verifications", |w| {
        let st = w.status();
        let mut seen = seen.lock().unwrap();
        if let Some(k) = st["backup"]["lastBackup"]["key"].as_str() {
            seen.0.insert(k.to_string());
        }
        if let Some(k) = st["backup"]["verifying"]["key"].as_str() {
            seen.1.insert(k.to_string());
        }
        w.ctx
            .metrics
            .backup_verifications
            .with_label_values(&[NS, "sched", "ok"])
            .get()
            >= 2
    })
    .await;
    let st = w.status();
    let at = st["backup"]["lastVerifyScheduleTime"]
        .as_str()
        .expect("the scheduled time is recorded");
    let second: u32 = at[17..19].parse().unwrap();
    assert_eq!(second % 7, 0, "{at}");
    let (backups, verified) = seen.into_inner().unwrap();
    assert!(
        verified.len() < backups.len() && verified.is_subset(&backups),
        "verified {verified:?} of backups {backups:?}: not one per backup"
    );
    assert!(w
        .api
        .calls()
        .iter()
        .all(|c| !c.path.contains("/serviceaccounts")));
}

/// Issue 25: every member's data gone. A newer backup that failed verification is never used:
/// on the token the cluster starts again from the latest verified backup (every member's pod
/// and volume deleted first, the StatefulSet made again, its first member restoring it), with
/// that backup's keys and revisions on every member once it has grown back to three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_data_left_the_latest_verified_backup_is_restored_never_a_failed_one() {
    let moto = crate::s3::Moto::start();
    moto.create_bucket("scheduled");
    let mut w = World::new(
        "gone",
        json!({"size": 3, "backup": backup_spec(&moto, "*/2 * * * * *")}),
    );
    w.restart_deleted = true;
    put_credentials(&w.api);
    let mut c = three_ready(&mut w).await;
    for i in 0..30 {
        c.put(format!("k/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let written = c.status().await.unwrap().header().unwrap().revision();
    w.until("a backup of every write verified", |w| {
        w.status()["backup"]["lastVerifiedBackup"]["revision"]
            .as_i64()
            .is_some_and(|r| r >= written)
    })
    .await;
    let verified = w.status()["backup"]["lastVerifiedBackup"].clone();
    let at: i64 = verified["revision"].as_i64().unwrap();
    let kvs = {
        let r = c
            .get(
                "",
                Some(
                    etcd_client::GetOptions::new()
                        .with_all_keys()
                        .with_revision(at),
                ),
            )
            .await
            .unwrap();
        crate::cluster::key_states(&r)
    };
    // Later writes, and a later backup that fails its verification (corrupted in the store).
    for i in 0..5 {
        c.put(format!("late/{i}"), "x", None).await.unwrap();
    }
    w.hold_jobs = true;
    w.until("a later backup being verified", |w| {
        w.status()["backup"]["verifying"]["key"]
            .as_str()
            .is_some_and(|k| Some(k) != verified["key"].as_str())
    })
    .await;
    let bad = w.status()["backup"]["verifying"]["key"]
        .as_str()
        .unwrap()
        .to_string();
    crate::s3::corrupt(&moto.open("scheduled", "etcd"), &bad, 1000, 0x40).await;
    w.hold_jobs = false;
    w.until("the later backup failed verification", |w| {
        w.status()["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "BackupVerified" && c["status"] == "False")
        })
    })
    .await;
    w.set_spec(|s| s["backup"]["suspend"] = json!(true));
    assert_eq!(w.status()["backup"]["lastVerifiedBackup"], verified);
    // Every member's data gone.
    for o in 0..3 {
        w.pods.stop(o);
        std::fs::remove_dir_all(w.pods.volume(o)).unwrap();
    }
    w.until("the loss seen", |w| {
        w.status()["recovery"]["waiting"]
            .as_str()
            .is_some_and(|m| m.contains(verified["key"].as_str().unwrap()))
    })
    .await;
    // cairn.dev/recover restarts a member that has data: never a restore from a backup.
    w.annotate("cairn.dev/recover", "not-this-one");
    for _ in 0..2 {
        w.reconcile().await.unwrap();
    }
    assert!(events(&w.api).iter().all(|(r, _)| r != "RecoveryStarted"));
    assert!(w.status()["recovery"]["waiting"]
        .as_str()
        .is_some_and(|m| m.contains("cairn.dev/recover-from-backup=")));
    w.annotate("cairn.dev/recover-from-backup", "all-gone");
    w.until("restored from the verified backup", |w| {
        w.status()["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Recovered"
                    && c["status"] == "True"
                    && c["reason"] == "RestoredFromBackup"
            })
        })
    })
    .await;
    let reasons: Vec<String> = events(&w.api).into_iter().map(|(r, _)| r).collect();
    for r in [
        "RecoveryStarted",
        "MemberFenced",
        "Rebootstrapping",
        "Restoring",
        "Recovered",
    ] {
        assert!(reasons.iter().any(|x| x == r), "no {r}: {reasons:?}");
    }
    let restoring: Vec<String> = events(&w.api)
        .into_iter()
        .filter(|(r, _)| r == "Restoring")
        .map(|(_, m)| m)
        .collect();
    assert!(
        restoring.iter().all(|m| !m.contains(&bad))
            && restoring
                .iter()
                .any(|m| m.contains(verified["key"].as_str().unwrap())),
        "{restoring:?}"
    );
    restored_on_every_member(&mut w, &kvs, at + 1).await;
}
