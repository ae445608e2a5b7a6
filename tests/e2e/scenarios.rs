//! The scenarios: each starts its own control plane and leaves nothing running.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_operator::crd::EtcdCluster;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::agent::{claim_volume_name, SANDBOX_IMAGE};
use crate::docker::docker_sync;
use crate::plane::{ControlPlane, Storage};

/// Runs `script` (sh) in a throw-away container with claim `claim`'s volume at /v.
fn in_claim_volume(
    cp: &ControlPlane,
    ns: &str,
    claim: &str,
    script: &str,
) -> Result<String, String> {
    let vol = claim_volume_name(&cp.run, ns, claim);
    docker_sync(&[
        "run",
        "--rm",
        "--mount",
        &format!("type=volume,source={vol},target=/v"),
        "--entrypoint",
        "sh",
        SANDBOX_IMAGE,
        "-c",
        script,
    ])
}

/// `kubectl apply -f -` of a manifest; its output, or its error output.
fn apply(cp: &ControlPlane, ns: &str, manifest: &str) -> Result<String, String> {
    kubectl_apply(cp, ns, manifest, &[])
}

fn kubectl_apply(
    cp: &ControlPlane,
    ns: &str,
    manifest: &str,
    extra: &[&str],
) -> Result<String, String> {
    use std::io::Write;
    let mut child = cp
        .kubectl()
        .args(["apply", "-n", ns, "-f", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into())
    }
}

/// Polls `check` every `period` until it gives a value; after `timeout` fails with its last
/// complaint.
async fn eventually<T>(
    timeout: Duration,
    period: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) if Instant::now() > deadline => panic!("not within {timeout:?}: {why}"),
            Err(_) => tokio::time::sleep(period).await,
        }
    }
}

fn create_namespace(cp: &ControlPlane, ns: &str) {
    let out = cp
        .kubectl()
        .args(["create", "namespace", ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn cluster_yaml(name: &str, size: i32, extra: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: EtcdCluster\nmetadata:\n  name: {name}\nspec:\n  size: {size}\n  storage:\n    size: 1Gi\n{extra}"
    )
}

/// Runs `entrypoint args` in a throwaway container on the pods' network, with the host's
/// etcdctl (Debian's etcd-client) mounted, so that it resolves Service and pod names as a pod
/// would. `$EP` is `endpoint`.
fn on_network(
    cp: &ControlPlane,
    endpoint: &str,
    entrypoint: &str,
    args: &[&str],
) -> Result<String, String> {
    on_network_with(cp, endpoint, None, entrypoint, args)
}

/// As [`on_network`], with a host directory of certificates mounted at `/certs`.
fn on_network_with(
    cp: &ControlPlane,
    endpoint: &str,
    certs: Option<&std::path::Path>,
    entrypoint: &str,
    args: &[&str],
) -> Result<String, String> {
    let label = crate::docker::run_label(&cp.run);
    let ep = format!("EP={endpoint}");
    let mount = certs.map(|d| format!("{}:/certs:ro", d.display()));
    let mut a = vec![
        "run",
        "--rm",
        "--label",
        &label,
        "--network",
        &cp.network,
        "-v",
        "/usr/bin/etcdctl:/usr/bin/etcdctl:ro",
        "-e",
        "ETCDCTL_API=3",
        "-e",
        &ep,
    ];
    if let Some(m) = &mount {
        a.extend(["-v", m.as_str()]);
    }
    a.extend(["--entrypoint", entrypoint, SANDBOX_IMAGE]);
    a.extend(args);
    docker_sync(&a)
}

/// Real etcdctl against `endpoint`.
fn etcdctl(cp: &ControlPlane, endpoint: &str, args: &[&str]) -> Result<String, String> {
    let ep = format!("--endpoints={endpoint}");
    let mut a = vec![ep.as_str(), "--command-timeout=10s"];
    a.extend(args);
    on_network(cp, endpoint, "etcdctl", &a)
}

/// A shell script using etcdctl: many requests in one container.
fn etcdctl_sh(cp: &ControlPlane, endpoint: &str, script: &str) -> Result<String, String> {
    on_network(cp, endpoint, "sh", &["-ec", script])
}

/// Puts `writer/00000000..n` (value `v<i>`) through `endpoint`; the keys.
fn put_many(cp: &ControlPlane, endpoint: &str, n: usize) -> Vec<String> {
    etcdctl_sh(
        cp,
        endpoint,
        &format!(
            "for i in $(seq 0 {}); do etcdctl --endpoints=$EP put $(printf writer/%08d $i) v$i >/dev/null; done",
            n - 1
        ),
    )
    .unwrap();
    (0..n).map(|i| format!("writer/{i:08}")).collect()
}

struct Cluster<'a> {
    cp: &'a ControlPlane,
    ns: String,
    name: String,
    api: Api<EtcdCluster>,
}

impl<'a> Cluster<'a> {
    fn new(cp: &'a ControlPlane, ns: &str, name: &str) -> Cluster<'a> {
        Cluster {
            cp,
            ns: ns.into(),
            name: name.into(),
            api: Api::namespaced(cp.client.clone(), ns),
        }
    }

    async fn status(&self) -> Value {
        match self.api.get(&self.name).await {
            Ok(ec) => serde_json::to_value(ec.status).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    async fn condition(&self, type_: &str) -> (String, String, String) {
        let st = self.status().await;
        st["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                    c["message"].as_str().unwrap_or_default().to_string(),
                )
            })
            .unwrap_or_default()
    }

    /// Waits until the cluster has `size` ready voters, no operation in progress, and is
    /// Available; returns how long that took.
    async fn until_settled(&self, size: i32, timeout: Duration) -> Duration {
        let t = Instant::now();
        let generation = self
            .api
            .get(&self.name)
            .await
            .ok()
            .and_then(|ec| ec.metadata.generation)
            .unwrap_or(1);
        eventually(timeout, Duration::from_millis(500), async || {
            let st = self.status().await;
            let seen = st["observedGeneration"].as_i64().unwrap_or(0) >= generation;
            let voters = st["members"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter(|m| m["learner"] != json!(true) && m["healthy"] == json!(true))
                        .count()
                })
                .unwrap_or(0);
            let available = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Available" && c["status"] == "True");
            if seen
                && st["readyMembers"] == json!(size)
                && voters == size as usize
                && st["members"].as_array().map(|m| m.len()) == Some(size as usize)
                && st["operation"].is_null()
                && available
            {
                return Ok(t.elapsed());
            }
            Err(format!(
                "{}/{} did not settle at {size} members: {st:#}\n{}",
                self.ns,
                self.name,
                self.cp.operator_logs()
            ))
        })
        .await
    }

    fn service(&self) -> String {
        format!("http://{}.{}.svc:2379", self.name, self.ns)
    }

    fn member_endpoint(&self, ordinal: i32) -> String {
        format!(
            "http://{}-{ordinal}.{}-peer.{}.svc:2379",
            self.name, self.name, self.ns
        )
    }

    /// The member pods (not a backup verification's).
    async fn pods(&self) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.cp.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!(
            "app.kubernetes.io/name=cairn,app.kubernetes.io/instance={}",
            self.name
        ));
        api.list(&lp).await.map(|l| l.items).unwrap_or_default()
    }

    async fn pod_ip(&self, ordinal: i32) -> String {
        let api: Api<Pod> = Api::namespaced(self.cp.client.clone(), &self.ns);
        let pod = api.get(&format!("{}-{ordinal}", self.name)).await.unwrap();
        pod.status.unwrap().pod_ip.unwrap()
    }

    /// The `writer/` keys in one member's own store (a serializable read).
    fn local_keys(&self, ordinal: i32) -> Vec<String> {
        let out = etcdctl(
            self.cp,
            &self.member_endpoint(ordinal),
            &[
                "get",
                "writer/",
                "--prefix",
                "--keys-only",
                "--consistency=s",
            ],
        )
        .unwrap();
        out.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Waits until member `ordinal` is in the member list under another ID than in `before`,
    /// the cluster settled at 3 members with a `MemberReplaced` Event.
    async fn until_replaced(&self, ordinal: i32, before: &BTreeMap<String, String>) {
        let name = format!("{}-{ordinal}", self.name);
        eventually(
            Duration::from_secs(240),
            Duration::from_secs(1),
            async || {
                let now = self.members();
                if now.get(&name).is_some_and(|id| *id != before[&name]) && now.len() == 3 {
                    return Ok(());
                }
                Err(format!(
                    "{name} not replaced: {now:?}\n{}",
                    self.cp.operator_logs()
                ))
            },
        )
        .await;
        self.until_settled(3, Duration::from_secs(180)).await;
        let reasons = self.event_reasons().await;
        assert!(
            reasons.iter().any(|r| r == "MemberReplaced"),
            "events: {reasons:?}"
        );
    }

    /// Deletes a member's pod and waits for the StatefulSet to make a new one.
    async fn delete_pod(&self, ordinal: i32) {
        let pods: Api<Pod> = Api::namespaced(self.cp.client.clone(), &self.ns);
        let name = format!("{}-{ordinal}", self.name);
        let old = pods.get(&name).await.unwrap().uid();
        pods.delete(&name, &DeleteParams::default()).await.unwrap();
        eventually(
            Duration::from_secs(120),
            Duration::from_millis(300),
            async || match pods.get(&name).await {
                Ok(p) if p.uid() != old => Ok(()),
                _ => Err(format!("{name} was not recreated")),
            },
        )
        .await
    }

    async fn resize(&self, size: i32) {
        self.api
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"size": size}})),
            )
            .await
            .unwrap();
    }

    /// The reasons of the Events about this cluster, oldest first.
    async fn event_reasons(&self) -> Vec<String> {
        let api: Api<Event> = Api::namespaced(self.cp.client.clone(), &self.ns);
        let mut evs: Vec<Event> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(&self.name))
            .collect();
        // eventTime has microseconds; creationTimestamp only seconds.
        evs.sort_by_key(|e| {
            (
                e.event_time.clone().map(|t| t.0),
                e.metadata.creation_timestamp.clone().map(|t| t.0),
            )
        });
        evs.into_iter().filter_map(|e| e.reason).collect()
    }

    /// name -> member ID, from etcdctl through the client Service.
    fn members(&self) -> BTreeMap<String, String> {
        let out = etcdctl(self.cp, &self.service(), &["member", "list", "-w", "json"]).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    format!("{:x}", m["ID"].as_u64().unwrap()),
                )
            })
            .collect()
    }
}

/// Scenario 1 (and 5 on cairn): helm install the operator, apply a 3-member EtcdCluster, see
/// it become Available, write and read with etcdctl through its client Service.
async fn install_apply_use(storage: Storage) {
    let cp = ControlPlane::start(storage).await;
    cp.install_operator();
    create_namespace(&cp, "apps");
    let t = Instant::now();
    apply(&cp, "apps", &cluster_yaml("alpha", 3, "")).unwrap();
    let c = Cluster::new(&cp, "apps", "alpha");
    c.until_settled(3, Duration::from_secs(240)).await;
    eprintln!(
        "e2e[{storage:?}]: 3-member cluster Available {:.1}s after kubectl apply",
        t.elapsed().as_secs_f64()
    );
    // Through the client Service, with real etcdctl.
    etcdctl(&cp, &c.service(), &["put", "greeting", "hello"]).unwrap();
    let got = etcdctl(
        &cp,
        &c.service(),
        &["get", "greeting", "--print-value-only"],
    )
    .unwrap();
    assert_eq!(got, "hello");
    // Every member serves it, and they agree on who is in the cluster.
    for i in 0..3 {
        let got = etcdctl(
            &cp,
            &c.member_endpoint(i),
            &["get", "greeting", "--print-value-only", "--consistency=s"],
        )
        .unwrap();
        assert_eq!(got, "hello", "member {i}");
    }
    let members = c.members();
    assert_eq!(
        members.keys().cloned().collect::<Vec<_>>(),
        vec!["alpha-0", "alpha-1", "alpha-2"]
    );
    let st = c.status().await;
    assert_eq!(st["size"], 3);
    assert!(st["leader"]
        .as_str()
        .is_some_and(|l| l.starts_with("alpha-")));
    assert!(st["clusterID"].is_string());
    // The operator's children are real objects of this API server.
    let out = cp
        .kubectl()
        .args([
            "get",
            "statefulset,service,configmap",
            "-n",
            "apps",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout);
    for n in [
        "statefulset.apps/alpha",
        "service/alpha",
        "service/alpha-peer",
        "configmap/alpha-bootstrap",
    ] {
        assert!(names.contains(n), "{n} missing: {names}");
    }
    // Kubernetes 1.20 serves no policy/v1: the operator says so instead of failing.
    let (status, reason, _) = c.condition("DisruptionBudget").await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "APINotServed")
    );
    let reasons = c.event_reasons().await;
    assert!(
        reasons
            .iter()
            .any(|r| r == "PodDisruptionBudgetUnsupported"),
        "events: {reasons:?}"
    );
    if storage == Storage::Cairn {
        // The control plane's own data is in the cairn member: a namespace made above is
        // under /registry there.
        // Over mutual TLS: the storage is three cairn members serving only clients with a
        // certificate of the control plane's CA, as kube-apiserver is.
        let out = Command::new("etcdctl")
            .arg(format!("--endpoints={}", cp.storage_url))
            .args(cp.storage_ctl_flags())
            .args(["get", "/registry/namespaces/apps", "--keys-only"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "/registry/namespaces/apps"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_install_apply_and_use_on_etcd() {
    install_apply_use(Storage::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_control_plane_on_cairn() {
    install_apply_use(Storage::Cairn).await;
}

/// Every acknowledged key is readable (linearizable read through the Service).
fn assert_all_present(cp: &ControlPlane, c: &Cluster<'_>, acked: &[String]) {
    let out = etcdctl(
        cp,
        &c.service(),
        &["get", "writer/", "--prefix", "--keys-only"],
    )
    .unwrap();
    let present: std::collections::HashSet<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_resize_3_5_3_under_a_writer() {
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    create_namespace(&cp, "grow");
    apply(&cp, "grow", &cluster_yaml("beta", 3, "")).unwrap();
    let c = Cluster::new(&cp, "grow", "beta");
    c.until_settled(3, Duration::from_secs(240)).await;
    let mut eps = vec![];
    for i in 0..3 {
        eps.push(format!("http://{}:2379", c.pod_ip(i).await));
    }
    // A writer on the host, through members 0..2 (which stay through the resizes).
    let stop = Arc::new(AtomicBool::new(false));
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2));
    let writer = crate::writer::spawn(
        eps,
        opts,
        "writer/",
        Duration::from_millis(20),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    grow_volumes_in_place(&cp, &c).await;

    c.resize(5).await;
    let up = c.until_settled(5, Duration::from_secs(300)).await;
    eprintln!("e2e: resize 3 -> 5 took {:.1}s", up.as_secs_f64());
    assert_eq!(c.members().len(), 5);
    // Members added after the growth have the new size from their StatefulSet.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cp.client.clone(), "grow");
    for i in 3..5 {
        let claim = pvcs.get(&format!("data-beta-{i}")).await.unwrap();
        assert_eq!(
            claim_size(&claim, false).as_deref(),
            Some("2Gi"),
            "data-beta-{i}"
        );
    }
    let volume = |i: i32| claim_volume_name(&cp.run, "grow", &format!("data-beta-{i}"));
    for i in 0..5 {
        assert!(
            docker_sync(&["volume", "inspect", &volume(i)]).is_ok(),
            "member {i} has no volume"
        );
    }

    let t = Instant::now();
    c.resize(3).await;
    let down = c.until_settled(3, Duration::from_secs(300)).await;
    eprintln!("e2e: resize 5 -> 3 took {:.1}s", down.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, failed) = writer.await.unwrap();
    eprintln!(
        "e2e: writer: {} acknowledged, {failed} failed during the resizes",
        acked.len()
    );
    assert!(
        acked.len() > 50,
        "the writer made no progress: {}",
        acked.len()
    );
    assert_all_present(&cp, &c, &acked);
    assert_eq!(
        c.members().keys().cloned().collect::<Vec<_>>(),
        vec!["beta-0", "beta-1", "beta-2"]
    );

    // The removed members' pods, claims and volumes are gone.
    eventually(
        Duration::from_secs(60),
        Duration::from_millis(500),
        async || {
            let names: Vec<String> = pvcs
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            let pods: Vec<String> = c.pods().await.iter().map(|p| p.name_any()).collect();
            let vols_gone = [3, 4]
                .iter()
                .all(|i| docker_sync(&["volume", "inspect", &volume(*i)]).is_err());
            if names == ["data-beta-0", "data-beta-1", "data-beta-2"]
                && pods.len() == 3
                && vols_gone
            {
                return Ok(());
            }
            Err(format!(
                "claims {names:?}, pods {pods:?}, volumes gone: {vols_gone}"
            ))
        },
    )
    .await;
    eprintln!(
        "e2e: removed members' pods, claims and volumes gone {:.1}s after the resize",
        t.elapsed().as_secs_f64()
    );
    // Events tell the story, in order.
    let reasons = c.event_reasons().await;
    let story: Vec<&str> = reasons
        .iter()
        .map(String::as_str)
        .filter(|r| ["MemberAdded", "MemberPromoted", "MemberRemoved"].contains(r))
        .collect();
    assert_eq!(
        story,
        [
            "MemberAdded",
            "MemberPromoted",
            "MemberAdded",
            "MemberPromoted",
            "MemberRemoved",
            "MemberRemoved"
        ],
        "events: {reasons:?}"
    );
    assert_eq!(c.status().await["size"], 3);

    // Issue 26: after the resizes, member 2 loses its volume the way a node loss does (its
    // claim and pod deleted; the StatefulSet makes a new, empty claim and pod). The operator
    // replaces it (new ID, learner first), and it becomes a voter with every write.
    let before = c.members();
    let t = Instant::now();
    pvcs.delete("data-beta-2", &DeleteParams::default())
        .await
        .unwrap();
    c.delete_pod(2).await;
    c.until_replaced(2, &before).await;
    eprintln!(
        "e2e: member with a lost volume replaced after the resizes, cluster Available in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // Its own store (a serializable read) holds every acknowledged write once it caught up.
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(500),
        async || {
            let local: std::collections::HashSet<String> = c.local_keys(2).into_iter().collect();
            match acked.iter().filter(|k| !local.contains(*k)).count() {
                0 => Ok(()),
                n => Err(format!("beta-2 lacks {n} acknowledged writes")),
            }
        },
    )
    .await;
    assert_all_present(&cp, &c, &acked);
}

/// A claim's requested storage (`capacity`: what its volume has).
fn claim_size(claim: &PersistentVolumeClaim, capacity: bool) -> Option<String> {
    if capacity {
        claim
            .status
            .as_ref()?
            .capacity
            .as_ref()?
            .get("storage")
            .map(|q| q.0.clone())
    } else {
        let requests = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
        requests.get("storage").map(|q| q.0.clone())
    }
}

/// Issue 24: `spec.storage.size` 1Gi -> 2Gi on a cluster under a writer, on the e2e's default
/// StorageClass (volume expansion allowed; the node agent binds volumes and plays the external
/// resizer): every member's claim is grown in place, the StatefulSet is re-created with the new
/// claim template while its pods are orphaned and adopted again: no pod is replaced.
async fn grow_volumes_in_place(cp: &ControlPlane, c: &Cluster<'_>) {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cp.client.clone(), &c.ns);
    let sts: Api<StatefulSet> = Api::namespaced(cp.client.clone(), &c.ns);
    let uids = |pods: Vec<Pod>| -> BTreeMap<String, String> {
        pods.iter()
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect()
    };
    let before = uids(c.pods().await);
    assert_eq!(before.len(), 3);
    let old_sts = sts.get(&c.name).await.unwrap().uid();
    for i in 0..3 {
        let claim = pvcs.get(&format!("data-{}-{i}", c.name)).await.unwrap();
        let phase = claim.status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(phase.as_deref(), Some("Bound"), "claim {i} not bound");
        assert_eq!(claim_size(&claim, true).as_deref(), Some("1Gi"));
    }
    let t = Instant::now();
    let patch = Patch::Merge(json!({"spec": {"storage": {"size": "2Gi"}}}));
    c.api
        .patch(&c.name, &PatchParams::default(), &patch)
        .await
        .unwrap();
    let msg = eventually(
        Duration::from_secs(180),
        Duration::from_secs(1),
        async || {
            let (ok, reason, msg) = c.condition("Storage").await;
            let mut sizes = vec![];
            for i in 0..3 {
                let claim = pvcs.get(&format!("data-{}-{i}", c.name)).await.unwrap();
                sizes.push(claim_size(&claim, true));
            }
            let set = sts.get_opt(&c.name).await.unwrap();
            let template = set
                .as_ref()
                .and_then(|s| s.spec.as_ref()?.volume_claim_templates.clone())
                .and_then(|t| claim_size(t.first()?, false));
            let recreated = set.as_ref().is_some_and(|s| s.uid() != old_sts);
            // Expanded, then (the template has the size) AsRequested.
            if ok == "True"
                && ["Expanded", "AsRequested"].contains(&reason.as_str())
                && sizes.iter().all(|s| s.as_deref() == Some("2Gi"))
                && template.as_deref() == Some("2Gi")
                && recreated
            {
                return Ok(msg);
            }
            Err(format!(
                "Storage {ok}/{reason}: {msg}; capacities {sizes:?}; template {template:?}, re-created {recreated}"
            ))
        },
    )
    .await;
    eprintln!(
        "e2e: volumes grown 1Gi -> 2Gi in place, StatefulSet re-created, in {:.1}s: {msg}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(uids(c.pods().await), before, "a member pod was replaced");
    let reasons = c.event_reasons().await;
    for r in ["VolumeExpanding", "StatefulSetRecreated"] {
        assert!(reasons.iter().any(|e| e == r), "no {r}: {reasons:?}");
    }
    let (avail, _, _) = c.condition("Available").await;
    assert_eq!(avail, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_deleted_or_killed_member_returns_and_wiped_member_is_replaced() {
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    create_namespace(&cp, "heal");
    apply(&cp, "heal", &cluster_yaml("gamma", 3, "")).unwrap();
    let c = Cluster::new(&cp, "heal", "gamma");
    c.until_settled(3, Duration::from_secs(240)).await;
    let acked = put_many(&cp, &c.service(), 20);
    let before = c.members();

    // A deleted pod comes back as the same member.
    let t = Instant::now();
    c.delete_pod(1).await;
    c.until_settled(3, Duration::from_secs(180)).await;
    eprintln!(
        "e2e: deleted pod back and the cluster Available in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(c.members(), before, "a restarted pod is the same member");
    assert_eq!(c.local_keys(1), acked);

    // kill -9 of a member's process: its container is restarted in place (restartCount 1,
    // lastState Error 137), and it is the same member with every write.
    let filter = format!("name=^{}-heal-gamma-0-.*-cairn$", cp.run);
    let id = docker_sync(&["ps", "-q", "--filter", &filter]).unwrap();
    assert!(
        !id.is_empty() && !id.contains('\n'),
        "one cairn container of gamma-0: {id:?}"
    );
    let t = Instant::now();
    docker_sync(&["kill", "--signal", "KILL", &id]).unwrap();
    let pods: Api<Pod> = Api::namespaced(cp.client.clone(), "heal");
    let last = eventually(
        Duration::from_secs(120),
        Duration::from_millis(300),
        async || {
            let pod = pods.get("gamma-0").await.map_err(|e| e.to_string())?;
            let cs = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .ok_or("no container status")?;
            match (
                cs.restart_count,
                cs.ready,
                cs.last_state.and_then(|l| l.terminated),
            ) {
                (1, true, Some(term)) => Ok(term),
                (n, ready, _) => Err(format!("restartCount {n}, ready {ready}")),
            }
        },
    )
    .await;
    assert_eq!(last.exit_code, 137);
    c.until_settled(3, Duration::from_secs(120)).await;
    eprintln!(
        "e2e: killed member restarted and the cluster Available in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(c.members(), before, "a killed member comes back as itself");
    assert_eq!(c.local_keys(0), acked);

    // A wiped volume: the member is removed and added again under the same name.
    in_claim_volume(&cp, "heal", "data-gamma-2", "rm -rf /v/* /v/.[!.]*").unwrap();
    let t = Instant::now();
    c.delete_pod(2).await;
    c.until_replaced(2, &before).await;
    eprintln!(
        "e2e: wiped member replaced and the cluster Available in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // The new member has every write.
    assert_eq!(c.local_keys(2), acked);
    assert_all_present(&cp, &c, &acked);
}

/// moto_server on the Docker network's gateway, so that pods reach it.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Moto {
    fn start(cp: &ControlPlane) -> Moto {
        let port = crate::ports::free_port();
        let child = Command::new("moto_server")
            .args(["-H", &cp.gateway, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]')");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((cp.gateway.as_str(), port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let url = format!("http://{}:{port}", cp.gateway);
        let out = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{url}/backups")])
            .output()
            .unwrap();
        assert!(out.status.success());
        Moto { child, url }
    }

    /// The object keys under a prefix.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let out = Command::new("curl")
            .args([
                "-sf",
                &format!("{}/backups?list-type=2&prefix={prefix}", self.url),
            ])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CREDENTIALS: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s3\nstringData:\n  AWS_ACCESS_KEY_ID: e2e\n  AWS_SECRET_ACCESS_KEY: e2e\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_scheduled_backups_verified_restored_and_quorum_loss_recovered() {
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    let moto = Moto::start(&cp);
    create_namespace(&cp, "keep");
    apply(&cp, "keep", CREDENTIALS).unwrap();
    let backup = format!(
        "  backup:\n    schedule: \"*/20 * * * * *\"\n    destination:\n      s3:\n        bucket: backups\n        prefix: e2e\n        region: us-east-1\n        endpoint: {}\n        forcePathStyle: true\n        credentialsSecret: s3\n    retention:\n      keepLast: 2\n",
        moto.url
    );
    apply(&cp, "keep", &cluster_yaml("delta", 3, &backup)).unwrap();
    let c = Cluster::new(&cp, "keep", "delta");
    c.until_settled(3, Duration::from_secs(240)).await;
    let acked = put_many(&cp, &c.service(), 50);
    // Backups land on schedule (every 20 s); retention keeps the last two.
    let t = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut first = None;
    eventually(
        Duration::from_secs(150),
        Duration::from_secs(1),
        async || {
            let st = c.status().await;
            if let Some(k) = st["backup"]["lastBackup"]["key"].as_str() {
                if seen.insert(k.to_string()) {
                    // On time: taken within a few seconds of the scheduled time it is for.
                    let ts = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
                    let late = ts(&st["backup"]["lastBackup"]["time"])
                        .duration_since(ts(&st["backup"]["lastScheduleTime"]));
                    assert!(
                        (0.0..10.0).contains(&late.as_secs_f64()),
                        "{k} taken {late:?} after its scheduled time"
                    );
                }
                first.get_or_insert(t.elapsed());
            }
            if seen.len() >= 4 {
                return Ok(());
            }
            Err(format!(
                "backups seen: {seen:?}, status {st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    eprintln!(
        "e2e: first scheduled backup recorded {:.1}s after the writes, four in {:.1}s",
        first.unwrap().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let (ok, _, _) = c.condition("BackupSucceeded").await;
    assert_eq!(ok, "True");
    // Verified: a Job (the operator's image fetches, cairn's restores into a scratch member and
    // compares revision, key count and HashKV) on this control plane's Job controller.
    let t = Instant::now();
    let verified = eventually(
        Duration::from_secs(180),
        Duration::from_secs(1),
        async || {
            let st = c.status().await;
            let v = &st["backup"]["lastVerifiedBackup"];
            if v["key"].is_string() {
                return Ok(v.clone());
            }
            Err(format!(
                "no verified backup: {st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    eprintln!(
        "e2e: a backup verified by its Job {:.1}s after four backups",
        t.elapsed().as_secs_f64()
    );
    assert!(
        verified["keys"].as_i64().is_some_and(|k| k >= 50),
        "{verified}"
    );
    assert_eq!(
        c.condition("BackupVerified").await.0,
        "True",
        "{:#}",
        c.status().await
    );
    let snaps: Vec<String> = moto
        .keys("e2e/keep/delta/")
        .into_iter()
        .filter(|k| k.ends_with(".snap"))
        .collect();
    assert!(
        (1..=3).contains(&snaps.len()),
        "retention keeps the last 2 (one more may be in flight): {snaps:?}"
    );
    // Suspend the schedule so the source stops changing, then restore into a new cluster.
    c.api
        .patch(
            "delta",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"backup": {"suspend": true}}})),
        )
        .await
        .unwrap();
    let restore = "  bootstrap:\n    fromBackup:\n      destination:\n        s3:\n          bucket: backups\n          prefix: e2e\n          region: us-east-1\n          endpoint: URL\n          forcePathStyle: true\n          credentialsSecret: s3\n      prefix: e2e/keep/delta/\n"
        .replace("URL", &moto.url);
    let t = Instant::now();
    apply(&cp, "keep", &cluster_yaml("epsilon", 3, &restore)).unwrap();
    let r = Cluster::new(&cp, "keep", "epsilon");
    r.until_settled(3, Duration::from_secs(300)).await;
    eprintln!(
        "e2e: 3-member cluster restored from the latest backup and Available in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let st = r.status().await;
    assert!(
        st["restoredFrom"]
            .as_str()
            .is_some_and(|k| k.starts_with("e2e/keep/delta/")),
        "{st:#}"
    );
    let src = etcdctl(&cp, &c.service(), &["get", "writer/", "--prefix"]).unwrap();
    let dst = etcdctl(&cp, &r.service(), &["get", "writer/", "--prefix"]).unwrap();
    assert_eq!(src, dst, "the restored cluster has the same data");
    assert_eq!(dst.lines().count(), 100);
    // A new cluster: its own ID.
    assert_ne!(c.status().await["clusterID"], r.status().await["clusterID"]);

    // A pvc destination: an on-demand backup of delta into a claim, through the claim's server
    // (`cairn-store-etcd-backups`: a Deployment of the operator's image running serve-store,
    // reached by the operator at its Service).
    let t = Instant::now();
    apply(
        &cp,
        "keep",
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: etcd-backups\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 256Mi\n---\napiVersion: cairn.dev/v1alpha1\nkind: EtcdBackup\nmetadata:\n  name: to-pvc\nspec:\n  clusterName: delta\n  destination:\n    pvc:\n      claimName: etcd-backups\n      prefix: e2e\n",
    )
    .unwrap();
    let done = eventually(
        Duration::from_secs(240),
        Duration::from_secs(2),
        async || {
            let out = cp
                .kubectl()
                .args(["get", "etcdbackup", "to-pvc", "-n", "keep", "-o", "json"])
                .output()
                .unwrap();
            let eb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            match eb["status"]["phase"].as_str() {
                Some("Succeeded") => Ok(eb["status"]["backup"].clone()),
                _ => Err(format!(
                    "not done: {:#}\n{}",
                    eb["status"],
                    cp.operator_logs()
                )),
            }
        },
    )
    .await;
    let key = done["key"].as_str().unwrap().to_string();
    eprintln!(
        "e2e: on-demand backup into a pvc ({} bytes) done {:.1}s after the claim was made: {key}",
        done["size"],
        t.elapsed().as_secs_f64()
    );
    assert!(key.starts_with("e2e/keep/delta/"), "{key}");
    let listed = in_claim_volume(
        &cp,
        "keep",
        "etcd-backups",
        &format!("ls -l /v/{key} /v/{}", key.replace(".snap", ".json")),
    )
    .unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");

    // Quorum loss: two of delta's three members lose their data at once (both volumes wiped,
    // then both pods deleted together, as in s3 for one: one at a time, the first would be
    // repaired from the quorum the other two still make, as a lost member is). They
    // crash-loop on "has already been bootstrapped"; automatic recovery fences them, restarts
    // delta-0 alone from its own data and grows back to three.
    c.api
        .patch(
            "delta",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"recovery": {"quorumLoss": "Automatic", "after": "10s"}}}),
            ),
        )
        .await
        .unwrap();
    let before = c.members();
    let mut wipe = vec!["run".to_string(), "--rm".to_string()];
    for o in [1, 2] {
        let vol = claim_volume_name(&cp.run, "keep", &format!("data-delta-{o}"));
        wipe.extend([
            "--mount".to_string(),
            format!("type=volume,source={vol},target=/v{o}"),
        ]);
    }
    wipe.extend(
        [
            "--entrypoint",
            "sh",
            SANDBOX_IMAGE,
            "-c",
            "rm -rf /v1/* /v1/.[!.]* /v2/* /v2/.[!.]*; ls -A /v1 /v2",
        ]
        .map(String::from),
    );
    let left = docker_sync(&wipe.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(
        left.lines()
            .all(|l| l.ends_with(':') || l.trim().is_empty()),
        "the volumes still hold: {left}"
    );
    let t = Instant::now();
    let pods: Api<Pod> = Api::namespaced(cp.client.clone(), "keep");
    for o in [1, 2] {
        pods.delete(&format!("delta-{o}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    let recovered = eventually(
        Duration::from_secs(300),
        Duration::from_secs(1),
        async || match c.condition("Recovered").await {
            (status, reason, msg) if status == "True" => Ok((reason, msg)),
            _ => Err(format!(
                "not recovered: {:#}\n{}",
                c.status().await,
                cp.operator_logs()
            )),
        },
    )
    .await;
    eprintln!(
        "e2e: quorum loss (2 of 3 wiped) recovered {:.1}s after the loss: {}",
        t.elapsed().as_secs_f64(),
        recovered.1
    );
    assert_eq!(recovered.0, "QuorumRestored");
    assert!(recovered.1.contains("delta-0"), "{}", recovered.1);
    c.until_settled(3, Duration::from_secs(300)).await;
    eprintln!(
        "e2e: grown back to 3 members {:.1}s after the loss",
        t.elapsed().as_secs_f64()
    );
    let after = c.members();
    assert_eq!(
        after["delta-0"], before["delta-0"],
        "the survivor keeps its member ID"
    );
    for o in [1, 2] {
        let name = format!("delta-{o}");
        assert_ne!(
            after[&name], before[&name],
            "{name} joined again as a new member"
        );
    }
    assert_all_present(&cp, &c, &acked);
    let reasons = c.event_reasons().await;
    for r in [
        "QuorumLost",
        "RecoveryStarted",
        "MemberFenced",
        "ForcingNewCluster",
        "Recovered",
    ] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_bad_input_is_refused_and_unreachable_backups_show_in_status() {
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    create_namespace(&cp, "bad");
    // Refused by the API server, with the schema's message.
    let cases = [
        (cluster_yaml("zero", 0, ""), "spec.size"),
        (cluster_yaml("huge", 10, ""), "spec.size"),
        (
            "apiVersion: cairn.dev/v1alpha1\nkind: EtcdCluster\nmetadata:\n  name: disk\nspec:\n  size: 3\n  storage:\n    size: lots\n".to_string(),
            "spec.storage.size",
        ),
        (cluster_yaml("aff", 3, "  antiAffinity:\n    mode: sometimes\n"), "spec.antiAffinity.mode"),
        (
            cluster_yaml("res", 3, "  resources:\n    limits:\n      memory: plenty\n"),
            "spec.resources.limits.memory",
        ),
    ];
    for (manifest, field) in &cases {
        // kubectl's own schema check off: the API server is the one refusing.
        let err = kubectl_apply(&cp, "bad", manifest, &["--validate=false"])
            .expect_err("an invalid EtcdCluster was accepted");
        assert!(
            err.contains("is invalid") && err.contains(field),
            "error for {field} does not name it: {err}"
        );
        eprintln!("e2e: refused by the API server: {}", err.trim());
    }
    // A misspelt field: Kubernetes 1.20 prunes unknown fields of custom resources instead of
    // refusing them (server-side field validation came in 1.25); kubectl, which reads the
    // CRD's published schema, refuses the manifest.
    let err = apply(&cp, "bad", &cluster_yaml("typo", 3, "  sise: 3\n"))
        .expect_err("a misspelt field was accepted");
    assert!(err.contains("unknown field \"sise\""), "{err}");
    eprintln!("e2e: refused by kubectl: {}", err.trim());
    let all: Api<EtcdCluster> = Api::namespaced(cp.client.clone(), "bad");
    assert!(all
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // A backup destination nobody listens on: the failure is in status and Events, the
    // cluster stays Available and writable.
    let dead = crate::ports::free_port();
    apply(&cp, "bad", CREDENTIALS).unwrap();
    let backup = format!(
        "  backup:\n    schedule: \"*/10 * * * * *\"\n    destination:\n      s3:\n        bucket: nowhere\n        region: us-east-1\n        endpoint: http://{}:{dead}\n        forcePathStyle: true\n        credentialsSecret: s3\n",
        cp.gateway
    );
    // On the e2e's StorageClass whose volumes cannot grow (the storage edit below).
    let backup = format!(
        "    storageClassName: {}\n{backup}",
        crate::provisioner::FIXED
    );
    apply(&cp, "bad", &cluster_yaml("omega", 3, &backup)).unwrap();
    let c = Cluster::new(&cp, "bad", "omega");
    c.until_settled(3, Duration::from_secs(240)).await;
    let (reason, msg) = eventually(
        Duration::from_secs(120),
        Duration::from_secs(1),
        async || {
            let (status, reason, msg) = c.condition("BackupSucceeded").await;
            let st = c.status().await;
            if status == "False" && st["backup"]["failures"].as_i64().unwrap_or(0) >= 1 {
                return Ok((reason, msg));
            }
            Err(format!("no backup failure in status: {st:#}"))
        },
    )
    .await;
    eprintln!("e2e: unreachable destination in status: {reason}: {msg}");
    assert!(
        msg.contains(&dead.to_string()),
        "the message names the endpoint: {msg}"
    );
    let reasons = c.event_reasons().await;
    assert!(
        reasons.iter().any(|r| r == "BackupFailed"),
        "events: {reasons:?}"
    );
    let (avail, _, _) = c.condition("Available").await;
    assert_eq!(avail, "True");
    etcdctl(&cp, &c.service(), &["put", "still", "writable"]).unwrap();

    day_two_on_a_real_api_server(&cp, &c).await;
}

/// Issue 24's edits on Kubernetes 1.20, on a 3-member cluster whose scheduled backups fail:
/// the NetworkPolicy as the API server took it; a bigger `spec.storage.size` on a StorageClass
/// that does not allow expansion (the API server refuses to resize the claims) said in the Storage condition
/// while status and scheduled backups go on; a smaller one refused by the operator (1.20 does
/// not run the CRD's CEL rules); a learner held out of the client Service's endpoints while it
/// is one; the chart's monitoring objects installed by `helm upgrade`.
async fn day_two_on_a_real_api_server(cp: &ControlPlane, c: &Cluster<'_>) {
    use k8s_openapi::api::core::v1::Endpoints;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    // The members' NetworkPolicy, accepted by the API server.
    let nps: Api<NetworkPolicy> = Api::namespaced(cp.client.clone(), &c.ns);
    let np = nps.get(&format!("{}-members", c.name)).await.unwrap();
    let ingress = np.spec.unwrap().ingress.unwrap();
    let port = |i: usize| ingress[i].ports.as_ref().unwrap()[0].port.clone();
    assert_eq!(port(0), Some(IntOrString::Int(2380)));
    assert!(ingress[0].from.as_ref().is_some_and(|f| !f.is_empty()));
    assert_eq!(port(1), Some(IntOrString::Int(2379)));
    assert!(
        ingress[1].from.is_none(),
        "the client port is open by default"
    );
    assert_eq!(c.condition("NetworkPolicy").await.0, "True");

    // Bigger volumes on an API server that cannot grow them.
    let failures = |st: &Value| st["backup"]["failures"].as_i64().unwrap_or(0);
    let before = failures(&c.status().await);
    let storage = |size: &str| Patch::Merge(json!({"spec": {"storage": {"size": size}}}));
    c.api
        .patch(&c.name, &PatchParams::default(), &storage("2Gi"))
        .await
        .unwrap();
    let generation = c.api.get(&c.name).await.unwrap().metadata.generation;
    let msg = eventually(
        Duration::from_secs(90),
        Duration::from_secs(1),
        async || {
            let (ok, reason, msg) = c.condition("Storage").await;
            let st = c.status().await;
            if ok == "False"
                && reason == "ExpansionNotSupported"
                && st["observedGeneration"].as_i64() == generation
                && failures(&st) > before
            {
                return Ok(msg);
            }
            Err(format!("Storage {ok}/{reason}: {msg}; status {st:#}"))
        },
    )
    .await;
    eprintln!("e2e: storage edit without expansion: {msg}");
    assert!(msg.contains("volume claim"), "{msg}");
    assert_eq!(c.condition("Available").await.0, "True");
    // Smaller than the volumes: refused by the operator, nothing changed.
    c.api
        .patch(&c.name, &PatchParams::default(), &storage("512Mi"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        Duration::from_secs(1),
        async || match c.condition("Storage").await {
            (ok, reason, _) if ok == "False" && reason == "ShrinkRefused" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    c.api
        .patch(&c.name, &PatchParams::default(), &storage("1Gi"))
        .await
        .unwrap();

    // A learner is not in the client Service's ready endpoints. The endpoints are read before
    // the member list: a member that is a learner in the later list was one at the earlier read.
    let endpoints: Api<Endpoints> = Api::namespaced(cp.client.clone(), &c.ns);
    let pods: Api<Pod> = Api::namespaced(cp.client.clone(), &c.ns);
    c.resize(4).await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut held_out = 0;
    loop {
        let ep = endpoints.get(&c.name).await.unwrap();
        let ips = |ready: bool| -> Vec<String> {
            ep.subsets
                .iter()
                .flatten()
                .flat_map(|s| {
                    if ready {
                        s.addresses.clone()
                    } else {
                        s.not_ready_addresses.clone()
                    }
                })
                .flatten()
                .map(|a| a.ip)
                .collect()
        };
        let (ready, not_ready) = (ips(true), ips(false));
        let Ok(list) = etcdctl(cp, &c.service(), &["member", "list", "-w", "json"]) else {
            continue;
        };
        let list: Value = serde_json::from_str(&list).unwrap();
        let members = list["members"].as_array().cloned().unwrap_or_default();
        let learners: Vec<String> = members
            .iter()
            .filter(|m| m["isLearner"] == true)
            .filter_map(|m| m["peerURLs"][0].as_str())
            .filter_map(|u| u.split("//").nth(1)?.split('.').next().map(str::to_string))
            .collect();
        for l in &learners {
            let Some(ip) = pods
                .get_opt(l)
                .await
                .unwrap()
                .and_then(|p| p.status?.pod_ip)
            else {
                continue;
            };
            assert!(
                !ready.contains(&ip),
                "learner {l} ({ip}) is in the client Service's ready endpoints {ready:?}"
            );
            if not_ready.contains(&ip) {
                held_out += 1;
            }
        }
        if learners.is_empty() && members.len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no 4th voter: {list:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        held_out > 0,
        "the learner's pod was never seen running and held out of the endpoints"
    );
    eprintln!("e2e: the learner was seen {held_out} times running and out of the endpoints");
    c.until_settled(4, Duration::from_secs(120)).await;

    // The chart's monitoring, with the Prometheus Operator's CRDs (stand-ins: their schema
    // is not what is tested here).
    let crds = ["PodMonitor", "ServiceMonitor", "PrometheusRule"]
        .map(|kind| stand_in_crd("monitoring.coreos.com", kind))
        .join("---\n");
    apply(cp, "default", &crds).unwrap();
    let out = cp
        .helm()
        .args([
            "upgrade",
            "cairn-operator",
            &crate::plane::repo()
                .join("charts/cairn-operator")
                .display()
                .to_string(),
            "--namespace",
            "cairn-system",
            "--reuse-values",
            "--server-side=false",
            "--set",
            "monitoring.enabled=true",
            "--set",
            "monitoring.labels.release=prometheus",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm upgrade with monitoring: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = cp
        .kubectl()
        .args([
            "get",
            "-n",
            "cairn-system",
            "podmonitors,servicemonitors,prometheusrules,configmaps",
            "-l",
            "release=prometheus",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&got.stdout).to_string();
    for want in [
        "podmonitor.monitoring.coreos.com/cairn-operator-members",
        "servicemonitor.monitoring.coreos.com/cairn-operator",
        "prometheusrule.monitoring.coreos.com/cairn-operator",
    ] {
        assert!(names.contains(want), "{want} not in {names}");
    }
    let cm = cp
        .kubectl()
        .args([
            "get",
            "-n",
            "cairn-system",
            "configmap",
            "cairn-operator-dashboard",
            "-o",
            "jsonpath={.data.cairn\\.json}",
        ])
        .output()
        .unwrap();
    let board: Value = serde_json::from_slice(&cm.stdout).expect("the dashboard is JSON");
    assert!(board["panels"].as_array().is_some_and(|p| !p.is_empty()));
    // The members serve what the PodMonitor scrapes: /metrics on the `metrics` port (the
    // pods' Docker network is reachable from the host).
    let metrics = {
        use std::io::{Read, Write};
        let addr = format!("{}:2381", c.pod_ip(0).await);
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).unwrap();
        body
    };
    assert!(metrics.contains("etcd_server_has_leader 1"), "{metrics}");
    assert!(
        metrics.contains("etcd_server_quota_backend_bytes"),
        "{metrics}"
    );
    eprintln!(
        "e2e: monitoring objects installed: {}",
        names.trim().replace('\n', ", ")
    );
}

/// A stand-in CustomResourceDefinition of a third-party `kind` (namespaced, version `v1`)
/// that takes any object: for CRDs whose schema the tests do not exercise (cert-manager's,
/// the Prometheus Operator's), which cannot be fetched here.
fn stand_in_crd(group: &str, kind: &str) -> String {
    let singular = kind.to_lowercase();
    let plural = format!("{singular}s");
    format!(
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.{group}
spec:
  group: {group}
  names: {{kind: {kind}, listKind: {kind}List, plural: {plural}, singular: {singular}}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"
    )
}

/// A writer inside the pods' network for `seconds`: puts `writer/<i>` through `endpoint` (a
/// Service name, which keeps working while pods are re-created) one after another with
/// etcdctl; returns the keys whose put was acknowledged.
fn writer_on_network(
    cp: &ControlPlane,
    endpoint: &str,
    seconds: u64,
) -> std::thread::JoinHandle<Vec<String>> {
    let label = crate::docker::run_label(&cp.run);
    let network = cp.network.clone();
    let ep = format!("EP={endpoint}");
    let script = format!(
        "end=$(( $(date +%s) + {seconds} )); i=0; \
         while [ $(date +%s) -lt $end ]; do k=$(printf 'writer/%08d' $i); \
         if etcdctl --endpoints=$EP --command-timeout=3s put $k v$i >/dev/null 2>&1; \
         then echo $k; else sleep 0.2; fi; i=$((i+1)); done"
    );
    std::thread::spawn(move || {
        let out = docker_sync(&[
            "run",
            "--rm",
            "--label",
            &label,
            "--network",
            &network,
            "-v",
            "/usr/bin/etcdctl:/usr/bin/etcdctl:ro",
            "-e",
            "ETCDCTL_API=3",
            "-e",
            &ep,
            "--entrypoint",
            "sh",
            SANDBOX_IMAGE,
            "-c",
            &script,
        ])
        .unwrap();
        out.lines()
            .filter(|l| l.starts_with("writer/"))
            .map(str::to_string)
            .collect()
    })
}

/// The images of each member's pod, by ordinal.
async fn pod_images(c: &Cluster<'_>) -> BTreeMap<String, String> {
    c.pods()
        .await
        .iter()
        .map(|p| {
            let image = p
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            (p.name_any(), image)
        })
        .collect()
}

/// Scenario 7: a cluster on cairn 0.1.0 (the first release) is upgraded by editing
/// `spec.version` under a writer: the operator restarts members one at a time (followers first,
/// the leader last after a leader move), `status.version` ends at this release; then an image
/// that cannot start stalls the rollout on one member (`UpgradeStalled`) with the other two
/// untouched, and removing it again reverts that member. Nothing acknowledged is lost. Last,
/// auth is turned on with `spec.auth` and etcdctl needs root's password from the Secret; and a
/// one-member cluster, which has no quorum while its member restarts, gets out of an image that
/// does not start when it is set back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_upgrade_by_version_stall_and_revert() {
    let new = env!("CARGO_PKG_VERSION");
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    create_namespace(&cp, "up");
    apply(
        &cp,
        "up",
        &cluster_yaml(
            "gamma",
            3,
            "  version: \"0.1.0\"\n  rollout:\n    memberDeadline: 60s\n",
        ),
    )
    .unwrap();
    let c = Cluster::new(&cp, "up", "gamma");
    c.until_settled(3, Duration::from_secs(240)).await;
    eventually(
        Duration::from_secs(60),
        Duration::from_secs(1),
        async || {
            let st = c.status().await;
            (st["version"] == "0.1.0" && st["dataFormat"] == 1)
                .then_some(())
                .ok_or(format!("status: {st:#}"))
        },
    )
    .await;
    // A writer through the client Service for the first 90 s of the rollout.
    let writer = writer_on_network(&cp, &c.service(), 90);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t = Instant::now();
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"version": new}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(420),
        Duration::from_secs(1),
        async || {
            let st = c.status().await;
            let images = pod_images(&c).await;
            let (p, reason, _) = c.condition("Progressing").await;
            if st["version"] == new
                && st["dataFormat"] == 2
                && images.values().all(|i| *i == format!("cairn:{new}"))
                && p == "False"
                && reason == "Steady"
            {
                return Ok(());
            }
            Err(format!(
                "not upgraded: images {images:?}, status {st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    eprintln!(
        "e2e: upgrade 0.1.0 -> {new} of 3 members took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let acked = writer.join().unwrap();
    eprintln!("e2e: writer: {} acknowledged in its 90 s", acked.len());
    assert!(
        acked.len() > 100,
        "the writer made no progress: {}",
        acked.len()
    );
    assert_all_present(&cp, &c, &acked);
    // Events: three restarts, each back before the next; a leader move (unless leadership had
    // already passed to an upgraded member) right before the last.
    let reasons = c.event_reasons().await;
    let story: Vec<&str> = reasons
        .iter()
        .map(String::as_str)
        .filter(|r| ["MemberRestarting", "MemberRestarted", "LeaderMoved"].contains(r))
        .collect();
    let restarts: Vec<&str> = story
        .iter()
        .copied()
        .filter(|r| *r != "LeaderMoved")
        .collect();
    assert_eq!(
        restarts,
        [
            "MemberRestarting",
            "MemberRestarted",
            "MemberRestarting",
            "MemberRestarted",
            "MemberRestarting",
            "MemberRestarted"
        ],
        "events: {reasons:?}"
    );
    if let Some(i) = story.iter().position(|r| *r == "LeaderMoved") {
        assert_eq!(story.len(), 7, "events: {reasons:?}");
        assert_eq!(
            i, 4,
            "the leader move comes before the last restart: {reasons:?}"
        );
    }

    // An image that cannot start: the first member restarted onto it never comes back.
    let before = pod_images(&c).await;
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": "cairn:broken"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(240),
        Duration::from_secs(1),
        async || {
            let (p, reason, msg) = c.condition("Progressing").await;
            if p == "False" && reason == "UpgradeStalled" {
                return Ok(msg);
            }
            Err(format!(
                "not stalled: {p} {reason} {msg}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    let stalled = pod_images(&c).await;
    let changed: Vec<&String> = stalled
        .iter()
        .filter(|(pod, image)| before.get(*pod) != Some(image))
        .map(|(pod, _)| pod)
        .collect();
    assert_eq!(changed.len(), 1, "pods: {stalled:?}");
    assert!(c
        .event_reasons()
        .await
        .iter()
        .any(|r| r == "UpgradeStalled"));
    // The way back: the image unset, the version as before.
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": null}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(240),
        Duration::from_secs(1),
        async || {
            let images = pod_images(&c).await;
            let (p, reason, _) = c.condition("Progressing").await;
            if images.values().all(|i| *i == format!("cairn:{new}"))
                && reason == "Steady"
                && p == "False"
            {
                return Ok(());
            }
            Err(format!("not reverted: {images:?} {p} {reason}"))
        },
    )
    .await;
    c.until_settled(3, Duration::from_secs(120)).await;
    assert_all_present(&cp, &c, &acked);

    // Auth, managed: root's password in a Secret the operator makes, auth on; etcdctl gets in
    // as root through the client Service and not without a user.
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"auth": {"enabled": true}}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(120),
        Duration::from_secs(1),
        async || {
            let st = c.status().await;
            let (a, reason, msg) = c.condition("Auth").await;
            if st["authEnabled"] == true && a == "True" && reason == "Enabled" {
                return Ok(());
            }
            Err(format!(
                "auth not on: {a} {reason} {msg}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(cp.client.clone(), "up");
    let secret = secrets.get("gamma-root").await.unwrap();
    let password = String::from_utf8(secret.data.unwrap()["password"].0.clone()).unwrap();
    let user = format!("--user=root:{password}");
    let out = etcdctl(&cp, &c.service(), &[&user, "put", "secured", "yes"]).unwrap();
    assert!(out.contains("OK"), "{out}");
    let refused = etcdctl(&cp, &c.service(), &["get", "secured"]).unwrap_err();
    assert!(refused.contains("user name is empty"), "{refused}");
    // The operator still acts as root: status keeps coming.
    c.until_settled(3, Duration::from_secs(60)).await;

    // A one-member cluster has no quorum while its member restarts: onto an image that does
    // not start, it stays down; set back, the member (down, on the old template) is restarted
    // onto the current one all the same.
    apply(&cp, "up", &cluster_yaml("solo", 1, "")).unwrap();
    let solo = Cluster::new(&cp, "up", "solo");
    solo.until_settled(1, Duration::from_secs(120)).await;
    let patch = |image: Value| {
        let api = solo.api.clone();
        async move {
            api.patch(
                "solo",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"image": image}})),
            )
            .await
            .unwrap();
        }
    };
    patch(json!("cairn:broken")).await;
    eventually(
        Duration::from_secs(120),
        Duration::from_secs(1),
        async || {
            let images = pod_images(&solo).await;
            let (a, reason, _) = solo.condition("Available").await;
            if images.get("solo-0").map(String::as_str) == Some("cairn:broken") && a == "False" {
                return Ok(());
            }
            Err(format!(
                "solo not down on the broken image: {images:?} {a} {reason}"
            ))
        },
    )
    .await;
    patch(Value::Null).await;
    eventually(
        Duration::from_secs(120),
        Duration::from_secs(1),
        async || {
            let images = pod_images(&solo).await;
            if images.get("solo-0") == Some(&format!("cairn:{new}")) {
                return Ok(());
            }
            Err(format!("solo not back: {images:?}\n{}", cp.operator_logs()))
        },
    )
    .await;
    solo.until_settled(1, Duration::from_secs(120)).await;
    assert!(solo
        .event_reasons()
        .await
        .iter()
        .any(|r| r == "MemberRestarting"));
}

/// TLS managed by the operator, turned on for a live three-member cluster: the operator makes
/// the CA and certificates, restarts the members one at a time onto TLS (peer URLs moved to
/// `https://` member by member), reports `TLS=True`; then real etcdctl reaches the cluster over
/// mutual TLS through the client Service with the users' certificate Secret, and is refused
/// without a certificate or in plaintext. Every key written before is still there. Then TLS
/// is turned off again the same way. Then CertManager mode: `CertManagerMissing` while the API
/// server does not serve cert-manager's Certificates; once their CRD is there, a stand-in
/// fills the Secrets of the operator's Certificates and the cluster serves mutual TLS with
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_tls_turned_on_for_a_live_cluster() {
    let cp = ControlPlane::start(Storage::Etcd).await;
    cp.install_operator();
    create_namespace(&cp, "sec");
    apply(&cp, "sec", &cluster_yaml("delta", 3, "")).unwrap();
    let c = Cluster::new(&cp, "sec", "delta");
    c.until_settled(3, Duration::from_secs(240)).await;
    let before = put_many(&cp, &c.service(), 200);

    let t = Instant::now();
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tls": {"enabled": true}}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(600),
        Duration::from_secs(2),
        async || {
            let st = c.status().await;
            let (ok, reason, msg) = c.condition("TLS").await;
            if ok == "True"
                && st["tls"]["client"] == "TLS"
                && st["tls"]["peer"] == "TLS"
                && st["tls"]["clientSecret"] == "delta-client-tls"
            {
                return Ok(());
            }
            Err(format!(
                "TLS not on: {ok} {reason} {msg}\n{st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    eprintln!(
        "s8: TLS on for a live 3-member cluster in {:?}",
        t.elapsed()
    );
    c.until_settled(3, Duration::from_secs(120)).await;
    let reasons = c.event_reasons().await;
    for want in [
        "CertificateAuthority",
        "CertificateIssued",
        "PeerURLsUpdated",
        "MemberRestarting",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} Event in {reasons:?}"
        );
    }

    // The users' certificate, as a user would take it from the Secret.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cp.client.clone(), "sec");
    let dir = certificate_files(&secrets, "delta-client-tls").await;
    let https = format!("https://{}.{}.svc:2379", c.name, c.ns);
    let mtls = |args: &[&str]| etcdctl_mtls(&cp, &https, dir.path(), args);
    let out = mtls(&["put", "over-tls", "yes"]).unwrap();
    assert!(out.contains("OK"), "{out}");
    let out = mtls(&["get", "writer/", "--prefix", "--keys-only"]).unwrap();
    let present: std::collections::HashSet<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    let missing = before
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} keys written before TLS missing",
        before.len()
    );
    // Every member by its own DNS name (the member list's https:// client URLs): the
    // members' certificate names each of them. etcdctl 3.4 reports health on stderr.
    let health = on_network_with(
        &cp,
        &https,
        Some(dir.path()),
        "sh",
        &[
            "-ec",
            "etcdctl --endpoints=$EP --cacert=/certs/ca.crt --cert=/certs/tls.crt --key=/certs/tls.key endpoint health --cluster 2>&1",
        ],
    )
    .unwrap();
    assert_eq!(health.matches("is healthy").count(), 3, "{health}");
    assert_eq!(health.matches("https://delta-").count(), 3, "{health}");
    // No client certificate: refused by the members (clientCertAuth).
    let ep = format!("--endpoints={https}");
    let refused = on_network_with(
        &cp,
        &https,
        Some(dir.path()),
        "etcdctl",
        &[
            &ep,
            "--command-timeout=5s",
            "--cacert=/certs/ca.crt",
            "get",
            "over-tls",
        ],
    );
    assert!(
        refused.is_err(),
        "served without a client certificate: {refused:?}"
    );
    // Plaintext: nothing served on the client port any more.
    assert!(etcdctl(&cp, &c.service(), &["get", "over-tls"]).is_err());

    // And off again, the same way backwards: plain HTTP, every key there.
    let t = Instant::now();
    c.api
        .patch(
            &c.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tls": {"enabled": false}}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(600),
        Duration::from_secs(2),
        async || {
            let st = c.status().await;
            let (ok, reason, msg) = c.condition("TLS").await;
            if reason == "Disabled"
                && st["tls"]["client"] == "Plain"
                && st["tls"]["peer"] == "Plain"
            {
                return Ok(());
            }
            Err(format!(
                "TLS not off: {ok} {reason} {msg}\n{st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    eprintln!("s8: TLS off again in {:?}", t.elapsed());
    c.until_settled(3, Duration::from_secs(120)).await;
    let out = etcdctl(
        &cp,
        &c.service(),
        &["get", "over-tls", "--print-value-only"],
    )
    .unwrap();
    assert_eq!(out, "yes");
    assert_all_present(&cp, &c, &before);

    // CertManager mode. cert-manager's own controller cannot run here (its images cannot be
    // pulled, and Debian does not package it): a stand-in in the test fills the Certificates'
    // Secrets from a CA of its own, as a cert-manager CA issuer would.
    let issuer = "      issuerRef: {name: stand-in, kind: ClusterIssuer}\n";
    let spec = format!(
        "  tls:\n    client:\n      mode: CertManager\n{issuer}    peer:\n      mode: CertManager\n{issuer}"
    );
    apply(&cp, "sec", &cluster_yaml("echo", 1, &spec)).unwrap();
    let e = Cluster::new(&cp, "sec", "echo");
    eventually(
        Duration::from_secs(60),
        Duration::from_secs(1),
        async || {
            let (ok, reason, msg) = e.condition("TLS").await;
            (ok == "False" && reason == "CertManagerMissing" && msg.contains("cert-manager"))
                .then_some(())
                .ok_or(format!("{ok} {reason} {msg}"))
        },
    )
    .await;
    kubectl_apply(
        &cp,
        "sec",
        &stand_in_crd("cert-manager.io", "Certificate"),
        &[],
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stand_in = tokio::spawn(cert_manager_stand_in(
        cp.client.clone(),
        "sec",
        stop.clone(),
    ));
    eventually(
        Duration::from_secs(180),
        Duration::from_secs(1),
        async || {
            let st = e.status().await;
            let (ok, reason, msg) = e.condition("TLS").await;
            if ok == "True" && st["tls"]["clientSecret"] == "echo-client-cm-tls" {
                return Ok(());
            }
            Err(format!(
                "{ok} {reason} {msg}\n{st:#}\n{}",
                cp.operator_logs()
            ))
        },
    )
    .await;
    e.until_settled(1, Duration::from_secs(120)).await;
    stop.store(true, Ordering::SeqCst);
    stand_in.await.unwrap();
    let dir = certificate_files(&secrets, "echo-client-cm-tls").await;
    let https = format!("https://{}.{}.svc:2379", e.name, e.ns);
    let out = etcdctl_mtls(&cp, &https, dir.path(), &["put", "issued-by", "stand-in"]).unwrap();
    assert!(out.contains("OK"), "{out}");
}

/// The `tls.crt`, `tls.key` and `ca.crt` of Secret `name`, as files a container can read.
async fn certificate_files(
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let data = secrets.get(name).await.unwrap().data.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let p = dir.path().join(key);
        std::fs::write(&p, &data[key].0).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

/// Real etcdctl against `https` over mutual TLS with the certificate files in `certs`.
fn etcdctl_mtls(
    cp: &ControlPlane,
    https: &str,
    certs: &std::path::Path,
    args: &[&str],
) -> Result<String, String> {
    let ep = format!("--endpoints={https}");
    let mut a = vec![
        ep.as_str(),
        "--command-timeout=10s",
        "--cacert=/certs/ca.crt",
        "--cert=/certs/tls.crt",
        "--key=/certs/tls.key",
    ];
    a.extend(args);
    on_network_with(cp, https, Some(certs), "etcdctl", &a)
}

/// cert-manager's part for the tests: every Certificate of `ns` whose Secret is missing gets
/// one (`tls.crt`, `tls.key`, `ca.crt`) signed by the stand-in's CA, with the Certificate's
/// common name or DNS names and IP addresses.
async fn cert_manager_stand_in(client: kube::Client, ns: &'static str, stop: Arc<AtomicBool>) {
    use cairn_operator::pki;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    );
    let certs: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, ns);
    let now = jiff::Timestamp::now();
    let ca = pki::new_ca("stand-in", now, Duration::from_secs(86400)).unwrap();
    while !stop.load(Ordering::SeqCst) {
        for c in certs
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let spec = &c.data["spec"];
            let Some(name) = spec["secretName"].as_str() else {
                continue;
            };
            if secrets.get_opt(name).await.ok().flatten().is_some() {
                continue;
            }
            let strings = |k: &str| -> Vec<String> {
                spec[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            };
            let profile = match spec["commonName"].as_str() {
                Some(cn) => pki::Profile::Client {
                    common_name: cn.to_string(),
                },
                None => pki::Profile::Member {
                    dns: strings("dnsNames"),
                    ips: strings("ipAddresses")
                        .iter()
                        .filter_map(|i| i.parse().ok())
                        .collect(),
                },
            };
            let leaf = pki::issue(&ca, &profile, now, Duration::from_secs(3600)).unwrap();
            let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": name, "namespace": ns},
                "stringData": {"tls.crt": leaf.cert, "tls.key": leaf.key, "ca.crt": ca.cert},
            }))
            .unwrap();
            let _ = secrets.create(&PostParams::default(), &secret).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What a watch from `rv` on ConfigMaps of `api` delivered within a few seconds: events as
/// (type, name, resourceVersion), or the error (HTTP code and message) it ended with.
async fn watch_from(
    api: &Api<k8s_openapi::api::core::v1::ConfigMap>,
    rv: &str,
    want: usize,
) -> Result<Vec<(String, String, String)>, String> {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let params = WatchParams::default().labels("e2e=mig").timeout(5);
    let stream = match api.watch(&params, rv).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) => return Err(format!("{}: {}", e.code, e.message)),
        Err(e) => return Err(e.to_string()),
    };
    let mut stream = Box::pin(stream);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while seen.len() < want {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(Some(item)) = next else { break };
        let event = item.map_err(|e| e.to_string())?;
        let (kind, cm) = match event {
            WatchEvent::Added(cm) => ("ADDED", cm),
            WatchEvent::Modified(cm) => ("MODIFIED", cm),
            WatchEvent::Deleted(cm) => ("DELETED", cm),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(s) => return Err(format!("{}: {}", s.code, s.message)),
        };
        seen.push((
            kind.to_string(),
            cm.name_any(),
            cm.resource_version().unwrap_or_default(),
        ));
    }
    Ok(seen)
}

/// Issue 25 (migration): kube-apiserver moves from etcd to cairn with its objects'
/// resourceVersions. On etcd it creates, updates and deletes ConfigMaps, and etcd's history
/// is compacted partway; then README's cutover (API server stopped, `etcdctl snapshot save`,
/// `cairn snapshot restore`, API server started on cairn). On cairn the same objects have the
/// same resourceVersions and data, a watch from a resourceVersion after the compaction
/// replays the same events as it did on etcd, one from before it gets the same 410, and new
/// objects get later resourceVersions. The API server runs without its watch cache, so the
/// watches are answered by the storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_kube_apiserver_moves_from_etcd_to_cairn_with_its_resource_versions() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::PostParams;
    let mut cp = ControlPlane::start_with(Storage::Etcd, &["--watch-cache=false"]).await;
    create_namespace(&cp, "mig");
    let api: Api<ConfigMap> = Api::namespaced(cp.client.clone(), "mig");
    let cm = |i: usize, v: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": format!("cm-{i:02}"),
                                                   "labels": {"e2e": "mig"}},
                                      "data": {"v": v}}))
        .unwrap()
    };
    let mut created = Vec::new();
    for i in 0..30 {
        let c = api
            .create(&PostParams::default(), &cm(i, "first"))
            .await
            .unwrap();
        created.push(c.resource_version().unwrap());
    }
    let after_creates = created.last().unwrap().clone();
    for i in 0..10 {
        api.replace(&format!("cm-{i:02}"), &PostParams::default(), &{
            let mut c = api.get(&format!("cm-{i:02}")).await.unwrap();
            c.data = Some([("v".to_string(), "second".to_string())].into());
            c
        })
        .await
        .unwrap();
    }
    for i in 20..30 {
        api.delete(&format!("cm-{i:02}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    // etcd's history compacted at the 16th create: watches from before it are refused.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &cp.storage_url, "compact", &created[15]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let objects = |api: Api<ConfigMap>| async move {
        // Ours only (the namespace also has kube-root-ca.crt).
        let list = api
            .list(&ListParams::default().labels("e2e=mig"))
            .await
            .unwrap();
        list.items
            .iter()
            .map(|c| {
                (
                    c.name_any(),
                    c.resource_version().unwrap_or_default(),
                    c.metadata.uid.clone().unwrap_or_default(),
                    c.data.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let on_etcd = objects(api.clone()).await;
    assert_eq!(on_etcd.len(), 20);
    let replay_etcd = watch_from(&api, &after_creates, 20).await;
    let too_old_etcd = watch_from(&api, &created[3], 1).await;
    assert_eq!(
        replay_etcd.as_ref().map(Vec::len),
        Ok(20),
        "{replay_etcd:?}"
    );
    assert!(
        too_old_etcd.as_ref().is_err_and(|e| e.starts_with("410")),
        "{too_old_etcd:?}"
    );

    let t = Instant::now();
    let restored = cp.migrate_storage_to_cairn().await;
    eprintln!(
        "e2e: kube-apiserver moved to cairn in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        restored.trim()
    );
    let api: Api<ConfigMap> = Api::namespaced(cp.client.clone(), "mig");
    assert_eq!(
        objects(api.clone()).await,
        on_etcd,
        "objects on cairn (right) differ from etcd's (left)"
    );
    assert_eq!(watch_from(&api, &after_creates, 20).await, replay_etcd);
    assert_eq!(watch_from(&api, &created[3], 1).await, too_old_etcd);
    // Writes go on from etcd's revision.
    let newest: i64 = on_etcd
        .iter()
        .map(|o| o.1.parse::<i64>().unwrap())
        .max()
        .unwrap();
    let c = api
        .create(&PostParams::default(), &cm(99, "on cairn"))
        .await
        .unwrap();
    let rv: i64 = c.resource_version().unwrap().parse().unwrap();
    assert!(rv > newest, "resourceVersion {rv} after etcd's {newest}");
    eprintln!(
        "e2e: 20 objects with their resourceVersions, a 20-event watch replay and the 410 of a compacted one the same on cairn; the next object at {rv}"
    );
}
