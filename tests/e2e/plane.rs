//! A real Kubernetes control plane for one test: storage (etcd 3.4 from Debian, or a cairn
//! member), kube-apiserver and kube-controller-manager 1.20 (built by tests/e2e/k8s-build.sh),
//! a Docker network for the pods, the node agent, and the operator installed by `helm install`.
//! Everything is torn down when the value is dropped, even when the test panicked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::task::JoinHandle;

use crate::agent::{self, AgentConfig};
use crate::docker::{docker_sync, remove_labelled, run_label};
use crate::ports::{free_port, free_ports};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Storage {
    Etcd,
    Cairn,
}

pub struct ControlPlane {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub run: String,
    pub network: String,
    /// The Docker network's gateway: the host as containers reach it.
    pub gateway: String,
    pub storage: Storage,
    /// The storage's client URL.
    pub storage_url: String,
    /// kube-apiserver's secure port, and flags it gets besides the usual ones.
    api_port: u16,
    apiserver_args: Vec<String>,
    dir: tempfile::TempDir,
    procs: Vec<(String, Child)>,
    agent: Option<JoinHandle<()>>,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn k8s_bin(name: &str) -> PathBuf {
    let dir = std::env::var("CAIRN_K8S")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cairn-k8s"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run tests/e2e/run.sh (it builds the control plane first)",
        p.display()
    );
    p
}

/// A tool (helm, kubectl) from tests/delivery/tools.sh's directory, or the PATH.
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("CAIRN_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cairn-tools")
        });
    let p = dir.join("bin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

/// The cairn binary of the storage mode: the release build the images are made from.
fn cairn_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/e2e-<hash> -> target/
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("cairn");
        if p.exists() {
            return p;
        }
    }
    panic!("no cairn binary under {}", target.display());
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl ControlPlane {
    /// Starts everything and installs the operator with Helm.
    pub async fn start(storage: Storage) -> ControlPlane {
        Self::start_with(storage, &[]).await
    }

    /// [`Self::start`], kube-apiserver with `apiserver_args` too.
    pub async fn start_with(storage: Storage, apiserver_args: &[&str]) -> ControlPlane {
        let t0 = Instant::now();
        let run = format!(
            "ce2e{}x{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::SeqCst)
        );
        let network = format!("{run}-net");
        // Leftovers of a killed run of this same process id would collide: remove them.
        remove_labelled(&run_label(&run), Some(&network));
        docker_sync(&["network", "create", "--label", &run_label(&run), &network])
            .expect("docker network create");
        let gateway = docker_sync(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            &network,
        ])
        .unwrap();
        assert!(!gateway.is_empty(), "network {network} has no gateway");
        let dir = tempfile::Builder::new()
            .prefix("cairn-e2e-")
            .tempdir()
            .unwrap();
        let mut cp = ControlPlane {
            client: Client::try_from(Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap(),
            kubeconfig: dir.path().join("kubeconfig"),
            run: run.clone(),
            network: network.clone(),
            gateway: gateway.clone(),
            storage,
            storage_url: String::new(),
            api_port: 0,
            apiserver_args: apiserver_args.iter().map(|a| a.to_string()).collect(),
            dir,
            procs: vec![],
            agent: None,
        };
        cp.certificates();
        cp.start_storage();
        let api_port = free_port();
        cp.api_port = api_port;
        cp.start_apiserver(api_port);
        cp.write_kubeconfig(api_port);
        let kc = Kubeconfig::read_from(&cp.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        cp.client = Client::try_from(config).unwrap();
        cp.wait_ready().await;
        cp.start_controller_manager();
        cp.wait_default_service_account().await;
        let files = cp.dir.path().join("volumes");
        std::fs::create_dir_all(&files).unwrap();
        cp.agent = Some(
            agent::start(AgentConfig {
                client: cp.client.clone(),
                run: run.clone(),
                network,
                api_host: gateway,
                api_port,
                nodes: (0..3).map(|i| format!("node-{i}")).collect(),
                files,
            })
            .await,
        );
        eprintln!(
            "e2e: control plane on {storage:?} up in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        cp
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn p(&self, f: &str) -> String {
        self.path(f).display().to_string()
    }

    /// A CA, the API server's serving certificate (for the host and the containers), the
    /// storage's certificates (cairn mode) and the service-account signing key.
    fn certificates(&self) {
        let ssl = |args: &[&str]| {
            sh(Command::new("openssl")
                .args(args)
                .current_dir(self.dir.path()));
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=cairn-e2e-ca",
        ]);
        let apiserver = format!(
            "subjectAltName=IP:127.0.0.1,IP:{},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n\
             extendedKeyUsage=serverAuth\n",
            self.gateway
        );
        // The API server's; the storage's members' (for 127.0.0.1, server and client: members
        // present it to each other); kube-apiserver's as the storage's client.
        for (name, cn, ext) in [
            ("server", "kube-apiserver", apiserver.as_str()),
            (
                "storage",
                "storage",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            (
                "storage-client",
                "kube-apiserver-etcd-client",
                "extendedKeyUsage=clientAuth\n",
            ),
        ] {
            std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
            ssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            ssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        ssl(&["genrsa", "-out", "sa.key", "2048"]);
        ssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(
            self.path("tokens.csv"),
            "e2e-admin-token,e2e-admin,e2e-admin,\"system:masters\"\n",
        )
        .unwrap();
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        self.procs.push((name.to_string(), child));
    }

    /// etcd: one member, plain text. cairn: three members, clients and members over mutual TLS,
    /// as kube-apiserver is run against etcd in production.
    fn start_storage(&mut self) {
        let (bin, members, tls) = match self.storage {
            Storage::Etcd => (PathBuf::from("etcd"), 1, false),
            Storage::Cairn => (cairn_binary(), 3, true),
        };
        let scheme = if tls { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = free_ports(2 * members)
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("storage{i}={scheme}://127.0.0.1:{p}"))
            .collect();
        let initial = initial.join(",");
        let urls: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("{scheme}://127.0.0.1:{c}"))
            .collect();
        self.storage_url = urls.join(",");
        for (i, (_, peer)) in ports.iter().enumerate() {
            let url = &urls[i];
            let mut args = vec![
                format!("--name=storage{i}"),
                format!("--data-dir={}", self.p(&format!("storage{i}"))),
                format!("--listen-client-urls={url}"),
                format!("--advertise-client-urls={url}"),
                format!("--listen-peer-urls={scheme}://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls={scheme}://127.0.0.1:{peer}"),
                format!("--initial-cluster={initial}"),
            ];
            if tls {
                let (crt, key, ca) = (
                    self.p("storage.crt"),
                    self.p("storage.key"),
                    self.p("ca.crt"),
                );
                args.extend([
                    format!("--cert-file={crt}"),
                    format!("--key-file={key}"),
                    format!("--trusted-ca-file={ca}"),
                    "--client-cert-auth".into(),
                    format!("--peer-cert-file={crt}"),
                    format!("--peer-key-file={key}"),
                    format!("--peer-trusted-ca-file={ca}"),
                    "--peer-client-cert-auth".into(),
                ]);
            }
            self.spawn(&format!("storage{i}"), Command::new(&bin).args(args));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, (client, _)) in ports.iter().enumerate() {
            while std::net::TcpStream::connect(("127.0.0.1", *client)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "storage did not start: {}",
                    self.logs(&format!("storage{i}"))
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// What etcdctl needs to reach the storage (its client certificate with cairn's mTLS).
    pub fn storage_ctl_flags(&self) -> Vec<String> {
        match self.storage {
            Storage::Etcd => vec![],
            Storage::Cairn => vec![
                format!("--cacert={}", self.p("ca.crt")),
                format!("--cert={}", self.p("storage-client.crt")),
                format!("--key={}", self.p("storage-client.key")),
            ],
        }
    }

    fn start_apiserver(&mut self, port: u16) {
        let mut args = vec![
            format!("--etcd-servers={}", self.storage_url),
            format!("--bind-address={}", self.gateway),
            format!("--advertise-address={}", self.gateway),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", self.p("server.crt")),
            format!("--tls-private-key-file={}", self.p("server.key")),
            format!("--client-ca-file={}", self.p("ca.crt")),
            format!("--token-auth-file={}", self.p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", self.p("sa.pub")),
            format!("--service-account-signing-key-file={}", self.p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", self.p("certs")),
        ];
        args.extend(self.apiserver_args.iter().cloned());
        if self.storage == Storage::Cairn {
            args.extend([
                format!("--etcd-cafile={}", self.p("ca.crt")),
                format!("--etcd-certfile={}", self.p("storage-client.crt")),
                format!("--etcd-keyfile={}", self.p("storage-client.key")),
            ]);
        }
        self.spawn(
            "kube-apiserver",
            Command::new(k8s_bin("kube-apiserver")).args(args),
        );
    }

    fn write_kubeconfig(&self, port: u16) {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(self.path("ca.crt")).unwrap());
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://{}:{port}\n    certificate-authority-data: {ca}\n\
             users:\n- name: admin\n  user:\n    token: e2e-admin-token\n\
             contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\ncurrent-context: e2e\n",
            self.gateway
        );
        std::fs::write(&self.kubeconfig, kc).unwrap();
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let req = http::Request::get("/readyz").body(vec![]).unwrap();
            match self.client.request_text(req).await {
                Ok(t) if t.trim() == "ok" => return,
                r => {
                    if Instant::now() > deadline {
                        panic!(
                            "kube-apiserver not ready: {r:?}\n{}",
                            self.logs("kube-apiserver")
                        );
                    }
                    if let Some(code) = self.exited("kube-apiserver") {
                        panic!(
                            "kube-apiserver exited ({code}):\n{}",
                            self.logs("kube-apiserver")
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn start_controller_manager(&mut self) {
        let args = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--service-account-private-key-file={}", self.p("sa.key")),
            format!("--root-ca-file={}", self.p("ca.crt")),
            // No node lifecycle (the agent's nodes send no heartbeats), no cloud, no volume
            // attachment, no certificate signing, no autoscaling metrics.
            "--controllers=*,-nodelifecycle,-attachdetach,-horizontalpodautoscaling,-csrsigning,\
             -persistentvolume-expander,-cloud-node-lifecycle,-route,-service"
                .replace(' ', ""),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--concurrent-statefulset-syncs=5".into(),
        ];
        self.spawn(
            "kube-controller-manager",
            Command::new(k8s_bin("kube-controller-manager")).args(args),
        );
    }

    async fn wait_default_service_account(&self) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(sa) = sas.get("default").await {
                if sa.secrets.is_some_and(|s| !s.is_empty()) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no default service account token:\n{}",
                self.logs("kube-controller-manager")
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops process `name` (SIGKILL) and forgets it; its log stays.
    fn stop(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.procs.remove(i);
            let _ = c.kill();
            let _ = c.wait();
            let log = self.path(&format!("{name}.log"));
            let _ = std::fs::rename(&log, log.with_extension("stopped.log"));
        }
    }

    /// The cutover of README's "Migrating from etcd" on this plane (storage etcd): the API
    /// server and controller manager stopped, `etcdctl snapshot save`, etcd stopped, the file
    /// restored by `cairn snapshot restore` into a one-member cairn (plain, as the etcd was),
    /// the API server and controller manager started again on it, same port, same flags.
    /// Returns what the restore printed.
    pub async fn migrate_storage_to_cairn(&mut self) -> String {
        assert_eq!(self.storage, Storage::Etcd);
        self.stop("kube-controller-manager");
        self.stop("kube-apiserver");
        let snap = self.path("migrate.db");
        let first = self.storage_url.split(',').next().unwrap().to_string();
        sh(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &first, "snapshot", "save"])
            .arg(&snap));
        self.stop("storage0");
        let ports = free_ports(2);
        let (client, peer) = (
            format!("http://127.0.0.1:{}", ports[0]),
            format!("http://127.0.0.1:{}", ports[1]),
        );
        let data = self.p("cairn-migrated");
        let restored = sh(Command::new(cairn_binary())
            .args(["snapshot", "restore"])
            .arg(&snap)
            .args([
                &format!("--data-dir={data}"),
                "--name=storage0",
                &format!("--initial-cluster=storage0={peer}"),
                "--initial-cluster-token=migrated",
            ]));
        let args = vec![
            "--name=storage0".to_string(),
            format!("--data-dir={data}"),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=storage0={peer}"),
        ];
        self.spawn("storage0", Command::new(cairn_binary()).args(args));
        self.storage_url = client;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_err() {
            assert!(
                Instant::now() < deadline,
                "cairn did not start: {}",
                self.logs("storage0")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.start_apiserver(self.api_port);
        self.wait_ready().await;
        self.start_controller_manager();
        restored
    }

    fn exited(&mut self, name: &str) -> Option<String> {
        let (_, c) = self.procs.iter_mut().find(|(n, _)| n == name)?;
        c.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// The last lines of a process's log.
    pub fn logs(&self, name: &str) -> String {
        let all = std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command with this plane's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(tool("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    pub fn helm(&self) -> Command {
        let mut c = Command::new(tool("helm"));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.path("helm/cache"))
            .env("HELM_CONFIG_HOME", self.path("helm/config"))
            .env("HELM_DATA_HOME", self.path("helm/data"));
        c
    }

    /// `helm install` of the operator from charts/, with the images built from this tree.
    ///
    /// For debugging, `CAIRN_E2E_OPERATOR_BINARY=target/debug/cairn-operator` runs that binary
    /// instead, with the control plane's kubeconfig (the chart then installs no replica): no
    /// image to rebuild. It runs in a container on the pods' network, since it reaches members
    /// by their DNS names.
    pub fn install_operator(&self) {
        let t = Instant::now();
        let binary = std::env::var("CAIRN_E2E_OPERATOR_BINARY").ok();
        let replicas = format!("replicaCount={}", if binary.is_some() { 0 } else { 1 });
        let out = self
            .helm()
            .args([
                "install",
                "cairn-operator",
                &repo().join("charts/cairn-operator").display().to_string(),
                "--namespace",
                "cairn-system",
                "--create-namespace",
                // Kubernetes 1.20's server-side apply refuses the CRD's CEL rules
                // (x-kubernetes-validations, a field it does not know); a plain create drops
                // them, as such an API server does (README: API servers before 1.25).
                "--server-side=false",
                "--set",
                "image.pullPolicy=Never",
                "--set",
                &replicas,
                "--set",
                "logLevel=info\\,kube=warn\\,cairn_operator=debug",
                "--wait",
                "--timeout",
                "3m",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm install: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.operator_logs()
        );
        eprintln!(
            "e2e: helm install --wait took {:.1}s",
            t.elapsed().as_secs_f64()
        );
        if let Some(bin) = binary {
            let bin = std::fs::canonicalize(bin).expect("CAIRN_E2E_OPERATOR_BINARY");
            let version = env!("CARGO_PKG_VERSION");
            docker_sync(&[
                "run",
                "-d",
                "--name",
                &format!("{}-cairn-system-cairn-operator-kubeconfig", self.run),
                "--label",
                &run_label(&self.run),
                "--network",
                &self.network,
                "-v",
                &format!("{}:/cairn-operator:ro", bin.display()),
                "-v",
                &format!("{}:/kubeconfig:ro", self.kubeconfig.display()),
                "-e",
                "KUBECONFIG=/kubeconfig",
                "-e",
                "POD_NAMESPACE=cairn-system",
                "-e",
                &format!("CAIRN_IMAGE=cairn:{version}"),
                "-e",
                &format!("CAIRN_OPERATOR_IMAGE=cairn-operator:{version}"),
                "-e",
                "RUST_LOG=info,kube=warn,cairn_operator=debug",
                "--entrypoint",
                "/cairn-operator",
                crate::agent::SANDBOX_IMAGE,
            ])
            .expect("the operator runs from its binary");
            eprintln!("e2e: operator running from {}", bin.display());
        }
    }

    /// The operator pod's output (for failure messages).
    pub fn operator_logs(&self) -> String {
        let filter = format!("name={}-cairn-system-cairn-operator", self.run);
        let ids = docker_sync(&["ps", "-aq", "--filter", &filter]).unwrap_or_default();
        let mut out = String::new();
        for id in ids.split_whitespace() {
            let logs = Command::new("docker")
                .args(["logs", "--tail", "60", id])
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default();
            out.push_str(&format!("--- container {id}\n{logs}\n"));
        }
        out
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort();
        }
        remove_labelled(&run_label(&self.run), Some(&self.network));
        for (_, c) in self.procs.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() || std::env::var_os("CAIRN_E2E_KEEP_LOGS").is_some() {
            let keep = std::env::temp_dir().join(format!("{}-logs", self.run));
            let _ = std::fs::create_dir_all(&keep);
            for (name, _) in &self.procs {
                let _ = std::fs::copy(
                    self.path(&format!("{name}.log")),
                    keep.join(format!("{name}.log")),
                );
            }
            eprintln!("e2e: control plane logs kept in {}", keep.display());
        }
    }
}
