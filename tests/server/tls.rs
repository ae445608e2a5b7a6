//! TLS on the client port (issue 21, in part): the same etcdctl and curl steps against etcd 3.4
//! and cairn, both started with etcd's TLS flags and certificates the test makes with openssl;
//! and certificates replaced on disk the way Kubernetes updates a mounted Secret (a `..data`
//! symlink swapped) being used for the next handshake while open connections go on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Kind, Member};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A CA, and a certificate it signs for `cn` (`server`: for 127.0.0.1), in `dir`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

fn signed(dir: &Path, ca: &str, name: &str, cn: &str) {
    let sans = if cn == "server" {
        &["127.0.0.1".to_string()][..]
    } else {
        &[]
    };
    signed_for(dir, ca, name, cn, sans);
}

/// A certificate `name` signed by `ca` for `cn`; with IP addresses `sans` it also serves them.
fn signed_for(dir: &Path, ca: &str, name: &str, cn: &str, sans: &[String]) {
    let ext = if sans.is_empty() {
        "extendedKeyUsage=clientAuth\n".to_string()
    } else {
        let ips: Vec<String> = sans.iter().map(|ip| format!("IP:{ip}")).collect();
        format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
            ips.join(",")
        )
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
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
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("{}", rand_serial()),
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn rand_serial() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_000
}

struct Pki {
    dir: tempfile::TempDir,
}

/// A CA and one peer certificate for the members at `ips`, and the `--peer-*` flags that use
/// them with client certificate authentication (the directory lives as long as the result).
pub fn peer_tls(ips: &[String]) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path(), "ca");
    signed_for(dir.path(), "ca", "peer", "member", ips);
    let at = |f: &str| dir.path().join(f).display().to_string();
    let flags = vec![
        "--peer-cert-file".to_string(),
        at("peer.crt"),
        "--peer-key-file".into(),
        at("peer.key"),
        "--peer-trusted-ca-file".into(),
        at("ca.crt"),
        "--peer-client-cert-auth".into(),
    ];
    (dir, flags)
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "ca");
        ca(d, "other-ca");
        signed(d, "ca", "server", "server");
        signed(d, "ca", "client", "root");
        signed(d, "ca", "tu", "test-user");
        signed(d, "other-ca", "stranger", "root");
        Pki { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    /// The `--peer-*` flags of members presenting `server.crt` both ways, client certificates
    /// required.
    fn peer_flags(&self) -> Vec<String> {
        vec![
            "--peer-cert-file".to_string(),
            self.path("server.crt"),
            "--peer-key-file".into(),
            self.path("server.key"),
            "--peer-trusted-ca-file".into(),
            self.path("ca.crt"),
            "--peer-client-cert-auth".into(),
        ]
    }

    /// etcdctl's (and curl's) flags for a client presenting certificate `name`.
    fn client_flags(&self, name: &str) -> Vec<String> {
        vec![
            "--cacert".to_string(),
            self.path("ca.crt"),
            "--cert".into(),
            self.path(&format!("{name}.crt")),
            "--key".into(),
            self.path(&format!("{name}.key")),
        ]
    }

    /// A member serving clients over TLS with `server.crt`, client certificates required
    /// (found through `at`: the files or where a Secret mounts them), ready when `client.crt`
    /// gets in.
    fn member(&self, kind: Kind, at: &dyn Fn(&str) -> String) -> Member {
        let server = [
            "--cert-file".to_string(),
            at("server.crt"),
            "--key-file".into(),
            at("server.key"),
            "--trusted-ca-file".into(),
            at("ca.crt"),
            "--client-cert-auth".into(),
        ];
        let client = self.client_flags("client");
        let server: Vec<&str> = server.iter().map(String::as_str).collect();
        let client: Vec<&str> = client.iter().map(String::as_str).collect();
        let mut m = Member::new_tls(kind, &server, &client);
        m.launch();
        m
    }
}

/// etcdctl over TLS against `m` with `flags`.
fn etcdctl(m: &Member, flags: &[String], args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(m.url())
        .args(["--dial-timeout=2s", "--command-timeout=3s"])
        .args(flags)
        .args(args)
        .output()
        .unwrap()
}

/// etcdctl over TLS against `m` with `flags`; "stdout[ok]" or "[failed]".
fn ctl(m: &Member, flags: &[String], args: &[&str]) -> String {
    let out = etcdctl(m, flags, args);
    if out.status.success() {
        format!("{}[ok]", String::from_utf8_lossy(&out.stdout))
    } else {
        "[failed]".to_string()
    }
}

fn curl(m: &Member, flags: &[String], path: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "3"])
        .args(flags)
        .arg(format!("{}{path}", m.url()))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), body.contains(r#""health":"true""#)) {
        // etcd 3.4's body has no "reason" (3.5's, and cairn's, do).
        (true, true) => "healthy[ok]".to_string(),
        (true, false) => format!("{body}[ok]"),
        (false, _) => "[failed]".to_string(),
    }
}

fn transcript(kind: Kind, pki: &Pki) -> Vec<String> {
    let m = pki.member(kind, &|f| pki.path(f));
    let client = pki.client_flags("client");
    let no_cert = vec!["--cacert".to_string(), pki.path("ca.crt")];
    let stranger = pki.client_flags("stranger");
    let plain = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(format!("http://127.0.0.1:{}", m.client_port))
        .args(["--dial-timeout=2s", "--command-timeout=3s", "get", "a"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    vec![
        format!("put: {}", ctl(&m, &client, &["put", "a", "b"])),
        format!("get: {}", ctl(&m, &client, &["get", "a"])),
        format!("no client cert: {}", ctl(&m, &no_cert, &["get", "a"])),
        format!("another CA's cert: {}", ctl(&m, &stranger, &["get", "a"])),
        format!("plain text: ok={}", plain.success()),
        format!("health: {}", curl(&m, &client, "/health")),
        format!("health, no client cert: {}", curl(&m, &no_cert, "/health")),
    ]
}

#[test]
fn etcdctl_and_curl_over_tls_as_with_etcd() {
    let pki = Pki::new();
    let etcd = transcript(Kind::Etcd, &pki);
    let cairn = transcript(Kind::Cairn, &pki);
    assert_eq!(etcd, cairn);
    // The steps mean something: the allowed ones worked, the others did not.
    assert_eq!(cairn[1], "get: a\nb\n[ok]");
    assert!(cairn[2].ends_with("[failed]") && cairn[3].ends_with("[failed]"));
    assert_eq!(cairn[4], "plain text: ok=false");
    eprintln!("{} TLS steps identical", cairn.len());
}

/// etcdctl over TLS: stdout, or the last line of stderr when it fails.
fn ctl_said(m: &Member, flags: &[String], args: &[&str]) -> String {
    let out = etcdctl(m, flags, args);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        format!("[failed] {}", err.lines().last().unwrap_or_default())
    }
}

/// The common name of a verified client certificate is the user when no
/// token is sent (etcd's `--client-cert-auth`; e2e TestCtlV3AuthCertCN*).
fn cn_transcript(kind: Kind, pki: &Pki) -> Vec<String> {
    let m = pki.member(kind, &|f| pki.path(f));
    let root = pki.client_flags("client");
    let tu = pki.client_flags("tu");
    let steps: [(&Vec<String>, &[&str]); 14] = [
        (&root, &["user", "add", "root", "--no-password"]),
        (&root, &["user", "grant-role", "root", "root"]),
        (&root, &["auth", "enable"]),
        (&root, &["put", "a", "by-root-cn"]),
        (&root, &["user", "add", "test-user", "--no-password"]),
        (&root, &["role", "add", "test-role"]),
        (
            &root,
            &["role", "grant-permission", "test-role", "readwrite", "hoo"],
        ),
        (&root, &["user", "grant-role", "test-user", "test-role"]),
        (&tu, &["put", "hoo", "by-test-user-cn"]),
        (&tu, &["get", "hoo"]),
        (&tu, &["put", "baz", "x"]),
        (&tu, &["user", "list"]),
        // A password login for a user without one; a token wins over the CN.
        (&tu, &["get", "hoo", "--user=test-user:x"]),
        (&root, &["get", "a"]),
    ];
    steps
        .iter()
        .map(|(flags, args)| format!("{}: {}", args.join(" "), ctl_said(&m, flags, args)))
        .collect()
}

#[test]
fn client_certificate_common_name_is_the_user_as_with_etcd() {
    let pki = Pki::new();
    let etcd = cn_transcript(Kind::Etcd, &pki);
    let cairn = cn_transcript(Kind::Cairn, &pki);
    assert_eq!(etcd, cairn);
    assert_eq!(cairn[3], "put a by-root-cn: OK\n");
    assert_eq!(cairn[9], "get hoo: hoo\nby-test-user-cn\n");
    assert_eq!(
        cairn[10],
        "put baz x: [failed] Error: etcdserver: permission denied"
    );
    eprintln!("{} certificate-user steps identical", cairn.len());
}

/// The serial number of the certificate a new TLS connection to `m` is served.
fn served_serial(m: &Member, client: &[String]) -> String {
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", m.client_port),
        ])
        .args(client.iter().map(|f| {
            f.replace("--cacert", "-CAfile")
                .replace("--cert", "-cert")
                .replace("--key", "-key")
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pem = s_client.stdout.take().unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(pem)
        .output()
        .unwrap();
    let _ = s_client.wait();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn serial_of(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Secret as the kubelet mounts it: `name -> ..data/name`, `..data -> <version dir>`.
fn mount_version(dir: &Path, version: &Path) {
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[test]
fn certificates_replaced_on_disk_are_used_for_the_next_handshake() {
    let pki = Pki::new();
    let p = pki.dir.path();
    // Version 2: a new server certificate, and a CA bundle that also trusts the other CA.
    let v1 = p.join("v1");
    let v2 = p.join("v2");
    for v in [&v1, &v2] {
        std::fs::create_dir(v).unwrap();
    }
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(p.join(f), v1.join(f)).unwrap();
    }
    signed(p, "ca", "server2", "server");
    std::fs::copy(p.join("server2.crt"), v2.join("server.crt")).unwrap();
    std::fs::copy(p.join("server2.key"), v2.join("server.key")).unwrap();
    let bundle = [
        std::fs::read(p.join("ca.crt")).unwrap(),
        std::fs::read(p.join("other-ca.crt")).unwrap(),
    ]
    .concat();
    std::fs::write(v2.join("ca.crt"), bundle).unwrap();
    let secret = p.join("secret");
    std::fs::create_dir(&secret).unwrap();
    mount_version(&secret, &v1);
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::os::unix::fs::symlink(PathBuf::from("..data").join(f), secret.join(f)).unwrap();
    }
    let m = pki.member(Kind::Cairn, &|f| secret.join(f).display().to_string());
    let client = pki.client_flags("client");
    let stranger = pki.client_flags("stranger");
    assert_eq!(
        served_serial(&m, &client),
        serial_of(&v1.join("server.crt"))
    );
    assert_eq!(ctl(&m, &stranger, &["get", "a"]), "[failed]");

    // A watch open across the swap.
    let mut watch = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(m.url())
        .args(&client)
        .args(["watch", "k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mount_version(&secret, &v2);
    assert_eq!(
        served_serial(&m, &client),
        serial_of(&v2.join("server.crt"))
    );
    // The new bundle lets the other CA's client in.
    assert_eq!(ctl(&m, &stranger, &["put", "k", "v"]), "OK\n[ok]");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = String::new();
    let mut out = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let n = out.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    if reader.is_finished() {
        seen = reader.join().unwrap();
    }
    assert!(
        seen.contains("PUT\nk\nv"),
        "the watch opened before the swap saw {seen:?}"
    );
    // A bundle that does not load (half written) leaves the certificates in use.
    std::fs::write(v2.join("ca.crt"), "-----BEGIN CERTIFICATE-----\nnot base64").unwrap();
    assert_eq!(
        ctl(&m, &client, &["get", "k", "--print-value-only"]),
        "v\n[ok]"
    );
}

/// A bad TLS setting stops the member before it starts, with the reason (as etcd does).
#[test]
fn bad_tls_settings_stop_the_member_at_start() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(Kind::Cairn.binary())
            .args(["--data-dir", &dir.path().join("d").display().to_string()])
            .args([
                "--listen-client-urls",
                "https://127.0.0.1:0",
                "--advertise-client-urls",
                "https://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:0",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cert = pki.path("server.crt");
    let key = pki.path("server.key");
    let (ok, err) = run(&[
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--cipher-suites",
        "TLS_RSA_WITH_RC4_128_SHA",
    ]);
    assert!(!ok && err.contains("unexpected TLS cipher suite"), "{err}");
    let (ok, err) = run(&["--cert-file", "/nonexistent.crt", "--key-file", &key]);
    assert!(!ok && err.contains("/nonexistent.crt"), "{err}");
    let (ok, err) = run(&[]);
    assert!(
        !ok && err.contains("must be provided for client url"),
        "{err}"
    );
}

/// Asks the membership of the member at `url` over peer TLS with `cert`/`key`.
async fn members_over_peer_tls(
    url: &str,
    pki: &Pki,
    cert: &str,
    key: &str,
) -> Result<usize, String> {
    let files = cairn::config::TlsFiles {
        cert_file: pki.path(cert).into(),
        key_file: pki.path(key).into(),
        trusted_ca_file: Some(pki.path("ca.crt").into()),
        client_cert_auth: false,
        allowed_cn: None,
        self_signed: None,
        cipher_suites: vec![],
    };
    let tls = cairn::tls::client_config(&files).map_err(|e| e.to_string())?;
    let channel = cairn::raft::connect(url, Some(&tls)).map_err(|e| e.to_string())?;
    let mut client = cairn::proto::peerpb::peer_client::PeerClient::new(channel);
    let call = client.members(cairn::proto::peerpb::MembersRequest { id: 0 });
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(r)) => Ok(r.into_inner().members.len()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Three single-process members of one cluster on loopback, clients on plain `http://`; by
/// default talking over `https://` peer URLs with `peer_flags`.
struct PeerTrio {
    kind: Kind,
    dir: tempfile::TempDir,
    /// (client, peer) port of each member.
    ports: Vec<(u16, u16)>,
    /// The scheme of the peer URLs the cluster was bootstrapped with.
    bootstrap: &'static str,
    /// Per member: the scheme its peer port listens with, and its `--peer-*` flags.
    listen: Vec<(&'static str, Vec<String>)>,
    procs: Vec<Option<std::process::Child>>,
}

impl PeerTrio {
    fn start(kind: Kind, peer_flags: &[String]) -> Self {
        Self::start_with(kind, "https", peer_flags)
    }

    /// Three members bootstrapped with `scheme://` peer URLs and `peer_flags`.
    fn start_with(kind: Kind, scheme: &'static str, peer_flags: &[String]) -> Self {
        let ports = (0..3)
            .map(|_| {
                let p = crate::ports::free_ports(2);
                (p[0], p[1])
            })
            .collect();
        let mut t = PeerTrio {
            kind,
            dir: tempfile::tempdir().unwrap(),
            ports,
            bootstrap: scheme,
            listen: vec![(scheme, peer_flags.to_vec()); 3],
            procs: Vec::new(),
        };
        t.procs = (0..3).map(|i| Some(t.spawn(i))).collect();
        t
    }

    fn peer_url(&self, scheme: &str, i: usize) -> String {
        format!("{scheme}://127.0.0.1:{}", self.ports[i].1)
    }

    fn spawn(&self, i: usize) -> std::process::Child {
        let initial: Vec<String> = (0..3)
            .map(|j| format!("m{j}={}", self.peer_url(self.bootstrap, j)))
            .collect();
        let c = self.ports[i].0;
        let (scheme, flags) = &self.listen[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{i}.log")))
            .unwrap();
        Command::new(self.kind.binary())
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &self.peer_url(scheme, i)])
            .args([
                "--initial-advertise-peer-urls",
                &self.peer_url(self.bootstrap, i),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(flags)
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    fn restart(&mut self, i: usize) {
        self.kill(i);
        self.procs[i] = Some(self.spawn(i));
    }

    /// A client of member `i`, once that member takes a write.
    async fn client(&self, i: usize) -> etcd_client::Client {
        let url = format!("http://127.0.0.1:{}", self.ports[i].0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([url.clone()], None).await {
                if c.put("probe", "x", None).await.is_ok() {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{:?} {url} never took a write:\n{}",
                self.kind,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("m{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for PeerTrio {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

/// Three members talking to each other over mutual TLS (`--peer-*`, the allowed CN checked
/// both ways): writes replicate, a member killed and restarted catches up over TLS, and a
/// peer presenting a certificate of another CA or another CN is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_over_mutual_tls() {
    let pki = Pki::new();
    signed(pki.dir.path(), "other-ca", "foreign", "server");
    let mut flags = pki.peer_flags();
    flags.extend(["--peer-cert-allowed-cn".to_string(), "server".to_string()]);
    let mut trio = PeerTrio::start(Kind::Cairn, &flags);
    let mut c0 = trio.client(0).await;
    c0.put("a", "1", None).await.unwrap();
    let mut c2 = trio.client(2).await;
    let r = c2.get("a", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"1", "{}", trio.logs());
    // A member killed, a write without it, the member back: it catches up over TLS.
    trio.kill(1);
    c0.put("b", "2", None).await.unwrap();
    trio.restart(1);
    let mut c1 = trio.client(1).await;
    let r = c1.get("b", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"2", "{}", trio.logs());
    // The peer port: this CA's certificate for the allowed CN is let in; this CA's for
    // another CN (`--peer-cert-allowed-cn`) and another CA's are refused.
    let url = format!("https://127.0.0.1:{}", trio.ports[0].1);
    assert_eq!(
        members_over_peer_tls(&url, &pki, "server.crt", "server.key").await,
        Ok(3)
    );
    let other_cn = members_over_peer_tls(&url, &pki, "client.crt", "client.key").await;
    assert!(other_cn.is_err(), "{other_cn:?}");
    let refused = members_over_peer_tls(&url, &pki, "stranger.crt", "stranger.key").await;
    assert!(refused.is_err(), "{refused:?}");
    // And a member must present a certificate at all.
    let plain = cairn::raft::connect(&url.replace("https", "http"), None).unwrap();
    let mut pc = cairn::proto::peerpb::peer_client::PeerClient::new(plain);
    assert!(pc
        .members(cairn::proto::peerpb::MembersRequest { id: 0 })
        .await
        .is_err());
}

/// What `openssl x509` says of a certificate file.
fn x509(cert: &Path, what: &str) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", what, "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The years a certificate file is valid for (by calendar year).
fn valid_years(cert: &Path) -> i32 {
    // notBefore=Dec  6 16:40:00 2026 GMT
    let year = |what: &str| -> i32 {
        x509(cert, what)
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|y| y.parse().ok())
            .unwrap_or_else(|| panic!("no {what} in {cert:?}"))
    };
    year("-enddate") - year("-startdate")
}

fn auto_tls_transcript(kind: Kind) -> Vec<String> {
    let metrics = crate::ports::free_port();
    let metrics_url = format!("https://127.0.0.1:{metrics}");
    let mut m = Member::new_tls(
        kind,
        &["--auto-tls", "--listen-metrics-urls", &metrics_url],
        &["--insecure"],
    );
    m.launch();
    let scraped = Command::new("curl")
        .args(["-sk", "--max-time", "3"])
        .arg(format!("{metrics_url}/metrics"))
        .output()
        .unwrap();
    let scraped = String::from_utf8_lossy(&scraped.stdout).contains("etcd_server_has_leader 1");
    let insecure = [
        "--insecure-transport=false".to_string(),
        "--insecure-skip-tls-verify".into(),
    ];
    let cert = m.data_dir().join("fixtures/client/cert.pem");
    let serial = x509(&cert, "-serial");
    let mut out = vec![
        format!("put: {}", ctl(&m, &insecure, &["put", "a", "b"])),
        format!("get: {}", ctl(&m, &insecure, &["get", "a"])),
        format!("verified: {}", ctl(&m, &[], &["get", "a"])),
        format!("subject: {}", x509(&cert, "-subject")),
        format!(
            "self-signed: {}",
            x509(&cert, "-issuer") == x509(&cert, "-subject")
        ),
        format!(
            "key file: {}",
            m.data_dir().join("fixtures/client/key.pem").exists()
        ),
        format!("metrics over TLS: {scraped}"),
    ];
    out.push(format!("valid for: {} years", valid_years(&cert)));
    // Kept across restarts.
    m.restart();
    out.push(format!(
        "same after restart: {}",
        x509(&cert, "-serial") == serial
    ));
    out
}

/// `--auto-tls`: both make a self-signed certificate in `<data-dir>/fixtures/client` and
/// serve with it; clients that skip verification get in, others do not.
#[test]
fn auto_tls_as_with_etcd() {
    let etcd = auto_tls_transcript(Kind::Etcd);
    let cairn = auto_tls_transcript(Kind::Cairn);
    assert_eq!(etcd, cairn);
    assert_eq!(cairn[1], "get: a\nb\n[ok]");
    assert_eq!(cairn[2], "verified: [failed]");
    assert_eq!(cairn[6], "metrics over TLS: true");
    assert_eq!(cairn[7], "valid for: 1 years");
    // etcd 3.5's --self-signed-cert-validity (3.4 has no such flag).
    let mut m = Member::new_tls(
        Kind::Cairn,
        &["--auto-tls", "--self-signed-cert-validity", "3"],
        &["--insecure"],
    );
    m.launch();
    let cert = m.data_dir().join("fixtures/client/cert.pem");
    assert_eq!(valid_years(&cert), 3);
}

/// `--peer-auto-tls`: three members over self-signed peer certificates replicate, with etcd
/// as with cairn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_auto_tls_as_with_etcd() {
    for kind in [Kind::Etcd, Kind::Cairn] {
        let trio = PeerTrio::start(kind, &["--peer-auto-tls".to_string()]);
        trio.client(0).await.put("a", "1", None).await.unwrap();
        let r = trio.client(2).await.get("a", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"1", "{kind:?}");
        let made = trio.dir.path().join("m1/fixtures/peer/cert.pem");
        assert!(made.exists(), "{kind:?}");
    }
}

/// Whether the peer port of member `i` answers a plaintext call.
async fn peer_port_serves_plaintext(trio: &PeerTrio, i: usize) -> bool {
    let url = trio.peer_url("http", i);
    let Ok(channel) = cairn::raft::connect(&url, None) else {
        return false;
    };
    let mut pc = cairn::proto::peerpb::peer_client::PeerClient::new(channel);
    let call = pc.members(cairn::proto::peerpb::MembersRequest { id: 0 });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call).await,
        Ok(Ok(_))
    )
}

/// Member `i` takes a write and answers a linearizable read of it: it reaches the leader and
/// the leader reaches it.
async fn serves(trio: &PeerTrio, i: usize) {
    let mut c = trio.client(i).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.get("probe", None).await {
            if r.count() == 1 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "m{i} never read:\n{}",
            trio.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sets every member's peer URL to `scheme://` (MemberUpdate through member 0), one after
/// another, each followed by a write and read through that member.
async fn move_peer_urls(trio: &PeerTrio, scheme: &str) {
    let mut c = trio.client(0).await;
    for i in 0..3 {
        let members = c.member_list().await.unwrap();
        let id = members
            .members()
            .iter()
            .find(|m| m.name() == format!("m{i}"))
            .unwrap()
            .id();
        c.member_update(id, vec![trio.peer_url(scheme, i)])
            .await
            .unwrap_or_else(|e| panic!("member update of m{i}: {e}\n{}", trio.logs()));
        serves(trio, i).await;
    }
    let urls: Vec<String> = c
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .flat_map(|m| m.peer_urls().to_vec())
        .collect();
    assert_eq!(urls.len(), 3);
    assert!(
        urls.iter().all(|u| u.starts_with(&format!("{scheme}://"))),
        "{urls:?}"
    );
}

/// A live cluster moves its peer traffic from plaintext to mutual TLS and back, one member at a
/// time, under a writer: restarted with `--experimental-peer-accept-plaintext` each member
/// serves TLS and plaintext on its peer port; MemberUpdate moves each peer URL to `https://`;
/// restarted without the flag each refuses plaintext. The way back is the same steps in
/// reverse. Every acknowledged write is then read back from every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_traffic_moves_to_tls_and_back_member_by_member() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pki = Pki::new();
    let tls = pki.peer_flags();
    let mut both = tls.clone();
    both.push("--experimental-peer-accept-plaintext".into());

    let mut trio = PeerTrio::start_with(Kind::Cairn, "http", &[]);
    serves(&trio, 0).await;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let endpoints = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", trio.ports[i].0))
        .collect();
    let writer = crate::writer::spawn(
        endpoints,
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5)),
        "w/",
        Duration::from_millis(5),
        stop.clone(),
    );

    // To TLS: both kinds served, URLs moved, plaintext off.
    for i in 0..3 {
        trio.listen[i] = ("https", both.clone());
        trio.restart(i);
        serves(&trio, i).await;
        assert!(peer_port_serves_plaintext(&trio, i).await, "m{i}");
    }
    // Hostile connections to a port serving both: a TLS record header followed by junk, plain
    // junk, one that sends nothing and hangs up, and one that sends nothing and stays. None of
    // them stops the port from serving plaintext and TLS peers, or the member from serving.
    let peer_addr = format!("127.0.0.1:{}", trio.ports[0].1);
    let mut idle = tokio::net::TcpStream::connect(&peer_addr).await.unwrap();
    for junk in [
        &[0x16u8, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3][..],
        b"GARBAGE \x00\xff not http/2 at all\r\n\r\n",
        b"",
    ] {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(&peer_addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        drop(s);
    }
    assert!(peer_port_serves_plaintext(&trio, 0).await);
    assert_eq!(
        members_over_peer_tls(&trio.peer_url("https", 0), &pki, "server.crt", "server.key").await,
        Ok(3)
    );
    serves(&trio, 0).await;
    // The silent one is cut once the handshake timeout (10 s) passes.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection that sends nothing was not cut: {read:?}"
    );
    move_peer_urls(&trio, "https").await;
    for i in 0..3 {
        trio.listen[i] = ("https", tls.clone());
        trio.restart(i);
        serves(&trio, i).await;
        assert!(!peer_port_serves_plaintext(&trio, i).await, "m{i}");
    }
    // And back.
    for i in 0..3 {
        trio.listen[i] = ("https", both.clone());
        trio.restart(i);
        serves(&trio, i).await;
    }
    move_peer_urls(&trio, "http").await;
    for i in 0..3 {
        trio.listen[i] = ("http", vec![]);
        trio.restart(i);
        serves(&trio, i).await;
        assert!(peer_port_serves_plaintext(&trio, i).await, "m{i}");
    }

    stop.store(true, Ordering::SeqCst);
    let (acked, _failed) = writer.await.unwrap();
    // Twelve restarts take seconds: a few dozen writes get through meanwhile.
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    for i in 0..3 {
        let mut c = trio.client(i).await;
        let r = c
            .get("w/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let held: std::collections::HashSet<&str> =
            r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
        let lost: Vec<&String> = acked
            .iter()
            .filter(|k| !held.contains(k.as_str()))
            .collect();
        assert!(lost.is_empty(), "m{i} lacks acknowledged writes {lost:?}");
    }
}
