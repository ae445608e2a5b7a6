//! Real cairn members on loopback for the operator's tests: a [`Loopback`] layout (each ordinal
//! on its own free ports) and [`Pods`], which plays the StatefulSet and kubelet: a cairn process
//! per ordinal started with the flags the bootstrap ConfigMap gives a pod, a data dir per ordinal
//! as its volume.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use cairn_operator::layout::Layout;
use cairn_operator::members::Members;
use cairn_operator::plan::bootstrap;
use cairn_operator::resources::Bootstrap;

const SLOTS: usize = 8;

/// Members on loopback: ordinal `o` listens on its own pair of free ports.
#[derive(Clone)]
pub struct Loopback {
    pub cluster: String,
    pub client: Vec<u16>,
    pub peer: Vec<u16>,
}

impl Layout for Loopback {
    fn member(&self, o: i32) -> String {
        format!("{}-{o}", self.cluster)
    }
    fn peer_url(&self, o: i32) -> String {
        self.peer
            .get(o as usize)
            .map_or_else(String::new, |p| format!("http://127.0.0.1:{p}"))
    }
    fn client_url(&self, o: i32) -> String {
        self.client
            .get(o as usize)
            .map_or_else(String::new, |p| format!("http://127.0.0.1:{p}"))
    }
}

pub fn cairn_binary() -> PathBuf {
    // target/<profile>/deps/operator-<hash> -> target/<profile>/cairn
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("cairn");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "cairn", "--bin", "cairn"])
            .status()
            .unwrap();
        assert!(status.success(), "building cairn failed");
    }
    bin
}

/// The "StatefulSet": one cairn process per ordinal below `replicas`, a data dir per ordinal.
pub struct Pods {
    pub layout: Loopback,
    root: tempfile::TempDir,
    bin: PathBuf,
    /// Ordinals that run another binary than this workspace's cairn (an upgrade's "image").
    pub binaries: BTreeMap<i32, PathBuf>,
    procs: BTreeMap<i32, Child>,
    pub replicas: i32,
    /// `--initial-cluster-token` of the members (a pod reads it from the ConfigMap).
    pub token: String,
    /// Further flags every member gets (e.g. a small `--snapshot-count`).
    pub extra: Vec<String>,
    /// The URL (and TLS) flags of an ordinal, where they are not the layout's plain ones (a
    /// pod template's, with loopback addresses).
    pub urls: BTreeMap<i32, Vec<String>>,
    /// Environment every member starts with (a pod's variables from the ConfigMap).
    pub env: BTreeMap<String, String>,
}

impl Pods {
    pub fn new(cluster: &str) -> Pods {
        let ports = crate::ports::free_ports(2 * SLOTS);
        Pods {
            layout: Loopback {
                cluster: cluster.to_string(),
                client: ports[..SLOTS].to_vec(),
                peer: ports[SLOTS..].to_vec(),
            },
            root: tempfile::tempdir().unwrap(),
            bin: cairn_binary(),
            binaries: BTreeMap::new(),
            procs: BTreeMap::new(),
            replicas: 0,
            token: "operator-test".to_string(),
            extra: Vec::new(),
            urls: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    /// A directory for the test's own files, removed with the cluster.
    pub fn scratch(&self) -> PathBuf {
        self.root.path().to_path_buf()
    }

    /// The volume of ordinal `o` (mounted at /var/lib/cairn in a pod).
    pub fn volume(&self, o: i32) -> PathBuf {
        self.root.path().join(format!("volume-{o}"))
    }

    /// The member's data dir, inside its volume.
    pub fn data_dir(&self, o: i32) -> PathBuf {
        self.volume(o).join("data")
    }

    pub fn log(&self, o: i32) -> PathBuf {
        self.root.path().join(format!("member-{o}.log"))
    }

    /// Starts ordinal `o` with the flags the bootstrap ConfigMap gives a pod.
    pub fn start(&mut self, o: i32, b: &Bootstrap) {
        let l = &self.layout;
        let log = std::fs::File::create(self.log(o)).unwrap();
        let urls = self.urls.get(&o).cloned().unwrap_or_else(|| {
            vec![
                format!("--listen-client-urls={}", l.client_url(o)),
                format!("--advertise-client-urls={}", l.client_url(o)),
                format!("--listen-peer-urls={}", l.peer_url(o)),
                format!("--initial-advertise-peer-urls={}", l.peer_url(o)),
            ]
        });
        let child = Command::new(self.binary(o))
            .arg(format!("--name={}", l.member(o)))
            .arg(format!("--data-dir={}", self.data_dir(o).display()))
            .args(urls)
            .arg(format!("--initial-cluster={}", b.initial_cluster))
            .arg(format!(
                "--initial-cluster-state={}",
                if b.new_cluster { "new" } else { "existing" }
            ))
            .arg(format!("--initial-cluster-token={}", self.token))
            .args(&self.extra)
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(o, child);
    }

    /// The binary ordinal `o` runs.
    pub fn binary(&self, o: i32) -> &std::path::Path {
        self.binaries.get(&o).unwrap_or(&self.bin)
    }

    pub fn stop(&mut self, o: i32) {
        if let Some(mut c) = self.procs.remove(&o) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes ordinal `o`'s process (SIGSTOP): it keeps its ports but never answers or
    /// catches up again; [`Self::stop`] still ends it.
    pub fn freeze(&self, o: i32) {
        let pid = self.procs[&o].id();
        let st = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Lets a frozen ordinal `o` run again (SIGCONT).
    pub fn thaw(&self, o: i32) {
        let pid = self.procs[&o].id();
        let st = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// How ordinal `o`'s process ended, if it did.
    pub fn exit_status(&mut self, o: i32) -> Option<std::process::ExitStatus> {
        self.procs.get_mut(&o)?.try_wait().ok()?
    }

    /// The pod's termination message: the log of a member that exited.
    pub fn exited_log(&mut self, o: i32) -> Option<String> {
        let c = self.procs.get_mut(&o)?;
        c.try_wait().ok()??;
        std::fs::read_to_string(self.log(o)).ok()
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.replicas.max(1))
            .map(|o| self.layout.client_url(o))
            .collect()
    }

    pub fn members(&self) -> Members {
        Members::new(self.endpoints())
    }

    pub fn bootstrap(&mut self, size: i32) {
        let b = bootstrap(&self.layout, size, None);
        for o in 0..size {
            self.start(o, &b);
        }
        self.replicas = size;
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for o in self.procs.keys().copied().collect::<Vec<_>>() {
            self.stop(o);
        }
    }
}

/// Waits until a member reports itself leader (after start, or after the old one was stopped).
pub async fn wait_leader(pods: &Pods) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pods
        .members()
        .observe()
        .await
        .ok()
        .and_then(|v| v.leader)
        .is_none()
    {
        assert!(std::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A key as two clusters compare it: key, value, create and mod revisions, version, lease.
pub type KeyState = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

/// The keys of a range response, as compared.
pub fn key_states(r: &etcd_client::GetResponse) -> Vec<KeyState> {
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

/// Every key of a member (a linearizable range), as compared.
pub async fn dump(c: &mut etcd_client::Client) -> Vec<KeyState> {
    let r = c
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    key_states(&r)
}

/// The operator's lists of cairn's flags (the ones it sets itself, the ones `extraArgs` may
/// carry) are exactly cairn's flags: a flag added to cairn must be sorted into one of them.
#[test]
fn the_operators_flag_lists_are_cairns_flags() {
    use cairn_operator::resources::{EXTRA_FLAGS, MANAGED_FLAGS};
    let out = Command::new(cairn_binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: std::collections::BTreeSet<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
        })
        .filter(|f| !["help", "version"].contains(f))
        .collect();
    let listed: std::collections::BTreeSet<&str> =
        MANAGED_FLAGS.iter().chain(EXTRA_FLAGS).copied().collect();
    assert_eq!(
        listed.len(),
        MANAGED_FLAGS.len() + EXTRA_FLAGS.len(),
        "a flag in both lists"
    );
    assert_eq!(flags, listed);
}
