//! TLS managed by the operator, against real cairn members on loopback: the members run with
//! the flags of the operator's own template ([`Serving::args`], loopback addresses in place of
//! pod DNS names, a directory per member in place of the mounted Secrets), and the test plays
//! the kubelet (writing the Secrets' files, restarting a "pod" onto a new template) while the
//! operator's planners decide: certificates and CA rotated by [`tls::next_ca`] /
//! [`tls::next_leaf`] under a writer, and a live cluster moved to TLS and back by
//! [`tls::next_peer`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_operator::layout::{Layout, Schemed};
use cairn_operator::members::{Access, ClientTls, Members};
use cairn_operator::pki::{self, Pair, Profile};
use cairn_operator::plan::bootstrap;
use cairn_operator::resources::Bootstrap;
use cairn_operator::tls::{self, Data, PeerStep, Serving, Settings};

use crate::cluster::Pods;

/// The files of a member's mounted Secrets: `<dir>/<side>/{tls.crt,tls.key,ca.crt}`, replaced
/// atomically as the kubelet does.
fn write_secret(dir: &Path, side: &str, data: &Data) {
    let d = dir.join(side);
    std::fs::create_dir_all(&d).unwrap();
    for key in [tls::TLS_CRT, tls::TLS_KEY, tls::CA_CRT] {
        let tmp = d.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, &data[key]).unwrap();
        std::fs::rename(&tmp, d.join(key)).unwrap();
    }
}

/// A member's URL and TLS flags from the operator's template, on loopback.
fn loopback_flags(pods: &Pods, o: i32, s: &Serving, tls_dir: &Path, metrics: u16) -> Vec<String> {
    let l = &pods.layout;
    let (client, peer) = (l.client[o as usize], l.peer[o as usize]);
    s.args("HOST")
        .into_iter()
        .map(|a| {
            a.replace("0.0.0.0:2379", &format!("127.0.0.1:{client}"))
                .replace("HOST:2379", &format!("127.0.0.1:{client}"))
                .replace("0.0.0.0:2380", &format!("127.0.0.1:{peer}"))
                .replace("HOST:2380", &format!("127.0.0.1:{peer}"))
                .replace("0.0.0.0:2381", &format!("127.0.0.1:{metrics}"))
                .replace(tls::MOUNT, tls_dir.to_str().unwrap())
        })
        .collect()
}

/// The operator's access over TLS: trusting `ca`, presenting `client`.
fn access(ca: &str, client: &Data) -> Access {
    Access {
        root_password: None,
        tls: Some(ClientTls {
            ca: ca.to_string(),
            identities: vec![Pair {
                cert: client[tls::TLS_CRT].clone(),
                key: client[tls::TLS_KEY].clone(),
            }],
        }),
    }
}

fn https(url: String) -> String {
    url.replacen("http://", "https://", 1)
}

/// A linearizable read through member `endpoint` with `access`.
async fn reads(access: &Access, endpoint: &str) -> Result<(), String> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    let mut c = access
        .connect(&[endpoint.to_string()], opts)
        .await
        .map_err(|e| e.to_string())?;
    c.get(
        "load/",
        Some(etcd_client::GetOptions::new().with_count_only()),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Every acknowledged key is on every member (read with `access` at `endpoints`).
async fn assert_all_present(access: &Access, endpoints: &[String], acked: &[String]) {
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    for e in endpoints {
        let mut c = access
            .connect(std::slice::from_ref(e), etcd_client::ConnectOptions::new())
            .await
            .unwrap();
        crate::membership::assert_member_has(&mut c, e, acked).await;
    }
}

/// Puts `load/NNNNNNNN` keys through the first endpoint that takes them, reconnecting (with
/// TLS at `https://` endpoints) after a failure, until `stop`. Returns the acknowledged keys.
fn resilient_writer(
    endpoints: Arc<std::sync::Mutex<Vec<String>>>,
    access: Access,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let mut acked = Vec::new();
        let mut client: Option<etcd_client::Client> = None;
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if client.is_none() {
                let eps = endpoints.lock().unwrap().clone();
                for e in eps {
                    if let Ok(c) = access.connect(&[e], opts.clone()).await {
                        client = Some(c);
                        break;
                    }
                }
            }
            let key = format!("load/{i:08}");
            let ok = match client.as_mut() {
                Some(c) => c.put(key.clone(), "v", None).await.is_ok(),
                None => false,
            };
            if ok {
                acked.push(key);
                progress.fetch_add(1, Ordering::SeqCst);
            } else {
                client = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked
    })
}

/// Whether `port` speaks plaintext HTTP/2 (the peer port is gRPC): the client preface and an
/// empty SETTINGS frame are answered with a SETTINGS frame; a port serving TLS alone answers
/// with a TLS alert (or closes). Panics when nothing listens or nothing answers.
async fn answers_plaintext(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("nothing listens on {port}: {e}"));
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut head = [0u8; 9];
        match s.read(&mut head).await {
            Ok(0) | Err(_) => false,
            // A TLS record of type alert.
            Ok(_) if head[0] == 0x15 => false,
            Ok(n) => {
                s.read_exact(&mut head[n..]).await.unwrap();
                head[3] == 0x04
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| panic!("{port} answered nothing"))
}

/// A TLS handshake with the peer port `port` trusting `ca` and presenting `client`, then an
/// HTTP/2 preface: whether the member let it in (with TLS 1.3 a refused client certificate
/// shows as an alert on the first read).
async fn peer_handshake(port: u16, ca: &str, client: &Data) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()).flatten() {
        roots.add(c).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(client[tls::TLS_CRT].as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(client[tls::TLS_KEY].as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut head)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// The cluster's PKI as the operator keeps it in Secrets (a CA for clients, one for peers),
/// advanced on the real clock.
struct Pki {
    ca: Data,
    peer_ca: Data,
    leaves: BTreeMap<&'static str, Data>,
}

impl Pki {
    fn member() -> Profile {
        pki::member_profile(&cairn_operator::layout::Names {
            cluster: "tls".into(),
            namespace: "test".into(),
        })
    }

    fn profiles() -> [(&'static str, Profile); 3] {
        [
            ("server", Self::member()),
            ("peer", Self::member()),
            (
                "operator",
                Profile::Client {
                    common_name: tls::OPERATOR_CN.into(),
                },
            ),
        ]
    }

    fn ca_of(&self, leaf: &str) -> &Data {
        if leaf == "peer" {
            &self.peer_ca
        } else {
            &self.ca
        }
    }

    fn new(ca_s: &Settings, leaf_s: &Settings) -> Pki {
        let now = jiff::Timestamp::now();
        let mut pki = Pki {
            ca: tls::next_ca("tls", None, None, now, ca_s).unwrap().0,
            peer_ca: tls::next_ca("tls-peer", None, None, now, ca_s).unwrap().0,
            leaves: BTreeMap::new(),
        };
        for (name, p) in Self::profiles() {
            let d = tls::next_leaf(None, pki.ca_of(name), &p, now, leaf_s)
                .unwrap()
                .unwrap();
            pki.leaves.insert(name, d);
        }
        pki
    }

    /// One round of the operator's renewal at the current time; whether anything changed.
    fn advance(&mut self, ca_s: &Settings, leaf_s: &Settings) -> bool {
        let now = jiff::Timestamp::now();
        let (ca, a) = tls::next_ca("tls", Some(&self.ca), None, now, ca_s).unwrap();
        let (peer_ca, b) = tls::next_ca("tls-peer", Some(&self.peer_ca), None, now, ca_s).unwrap();
        self.ca = ca;
        self.peer_ca = peer_ca;
        let mut changed = a || b;
        for (name, p) in Self::profiles() {
            let next = tls::next_leaf(self.leaves.get(name), self.ca_of(name), &p, now, leaf_s);
            if let Some(d) = next.unwrap() {
                self.leaves.insert(name, d);
                changed = true;
            }
        }
        changed
    }

    /// The kubelet's part: every member's files, one member after the other.
    async fn mount(&self, dirs: &[PathBuf], skew: Duration) {
        for d in dirs {
            write_secret(d, "client", &self.leaves["server"]);
            write_secret(d, "peer", &self.leaves["peer"]);
            tokio::time::sleep(skew).await;
        }
    }

    /// Whether every certificate is signed by its side's current CA.
    fn settled(&self) -> bool {
        Self::profiles().iter().all(|(name, _)| {
            pki::signed_by(
                &self.leaves[name][tls::TLS_CRT],
                &self.ca_of(name)[tls::CA_CRT],
            )
        })
    }
}

/// A TLS cluster (mutual TLS for clients and peers, the operator's template) whose certificates
/// are renewed every few seconds and whose CA is replaced three times, under a writer: the
/// writer never stalls, members reload their files without a restart (new handshakes see the
/// new certificates: a client trusting only the newest CA is served, one trusting only the
/// first is refused), a member restarted at the end rejoins its peers over the new
/// certificates, and every acknowledged write is on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_the_ca_rotate_under_a_writer_with_nothing_lost() {
    // Short lifetimes on the real clock (certificates are valid from a minute before they are
    // made): certificates renewed every ~10 s, the CA every ~15 s, the new CA used for
    // certificates 5 s after it is in every bundle.
    let leaf_s = Settings {
        lifetime: Duration::from_secs(40),
        ca_lifetime: Duration::from_secs(40),
        renew_fraction: 0.7,
        propagation: Duration::from_secs(5),
    };
    let ca_s = Settings {
        renew_fraction: 0.75,
        ..leaf_s
    };
    let mut pods = Pods::new("tls");
    let serving = Serving {
        client: Some("tls-server-tls".into()),
        client_cert_auth: true,
        peer: Some("tls-peer-tls".into()),
        peer_plaintext: false,
    };
    let mut pki = Pki::new(&ca_s, &leaf_s);
    let first_ca = pki.ca[tls::CA_CRT].clone();
    let dirs: Vec<PathBuf> = (0..3)
        .map(|o| pods.scratch().join(format!("tls-{o}")))
        .collect();
    pki.mount(&dirs, Duration::ZERO).await;
    let metrics = crate::ports::free_ports(3);
    for o in 0..3 {
        let flags = loopback_flags(&pods, o, &serving, &dirs[o as usize], metrics[o as usize]);
        pods.urls.insert(o, flags);
    }
    let layout = Schemed {
        inner: Arc::new(pods.layout.clone()),
        client_https: (0..3).collect(),
        peer_https: true,
    };
    let b = Bootstrap {
        initial_cluster: layout.initial_cluster(&[0, 1, 2]),
        new_cluster: true,
    };
    for o in 0..3 {
        pods.start(o, &b);
    }
    pods.replicas = 3;
    let endpoints: Vec<String> = (0..3).map(|o| layout.client_url(o)).collect();
    let first = access(&tls::trust(&pki.ca), &pki.leaves["operator"]);
    let members = Members::new(endpoints.clone()).with_access(first.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while members
        .observe()
        .await
        .ok()
        .and_then(|v| v.leader)
        .is_none()
    {
        assert!(Instant::now() < deadline, "no leader over TLS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = resilient_writer(
        Arc::new(std::sync::Mutex::new(vec![endpoints[0].clone()])),
        first.clone(),
        stop.clone(),
        progress.clone(),
    );
    let mut cas = vec![first_ca.clone()];
    let mut reissued = 0;
    let started = Instant::now();
    // The writer is never held up: its count grows in every 3-second window.
    let mut last_progress = (0, Instant::now());
    while cas.len() < 4 || started.elapsed() < Duration::from_secs(50) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the CA was replaced {} times only",
            cas.len() - 1
        );
        let before = pki.leaves["server"][tls::TLS_CRT].clone();
        if pki.advance(&ca_s, &leaf_s) {
            // The kubelet updates pods one after another, within the propagation time.
            pki.mount(&dirs, Duration::from_millis(500)).await;
        }
        if pki.leaves["server"][tls::TLS_CRT] != before {
            reissued += 1;
        }
        if !cas.contains(&pki.ca[tls::CA_CRT]) {
            cas.push(pki.ca[tls::CA_CRT].clone());
        }
        // Every member keeps serving new connections: trusting the bundle the operator
        // publishes, with its current certificate.
        let now = access(&tls::trust(&pki.ca), &pki.leaves["operator"]);
        for e in &endpoints {
            reads(&now, e)
                .await
                .unwrap_or_else(|err| panic!("{e} after rotation: {err}"));
        }
        let n = progress.load(Ordering::SeqCst);
        if n > last_progress.0 {
            last_progress = (n, Instant::now());
        }
        assert!(
            last_progress.1.elapsed() < Duration::from_secs(3),
            "the writer made no progress for 3 s at {n} writes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(reissued >= 4, "certificates reissued {reissued} times");

    // Settle: certificates of the newest CA everywhere.
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        pki.advance(&ca_s, &leaf_s);
        pki.mount(&dirs, Duration::ZERO).await;
        if pki.settled() {
            break;
        }
        assert!(
            Instant::now() < settle,
            "certificates never moved to the newest CA"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let acked = writer.await.unwrap();

    // Members present certificates of the newest CA: a client trusting only the previous one
    // (still valid, still in the bundle) is refused by every member, one trusting only the
    // newest is served.
    let newest = Pair {
        cert: pki.ca[tls::CA_CRT].clone(),
        key: String::new(),
    };
    let previous = pki.ca[tls::PREVIOUS_CRT].clone();
    assert!(pki::valid_between(&previous).is_ok_and(|(_, until)| until > jiff::Timestamp::now()));
    let only_newest = access(&pki::bundle(&newest, None), &pki.leaves["operator"]);
    let only_previous = access(&previous, &pki.leaves["operator"]);
    for e in &endpoints {
        reads(&only_newest, e)
            .await
            .unwrap_or_else(|err| panic!("{e} with the newest CA: {err}"));
        let refused = reads(&only_previous, e).await.unwrap_err();
        assert!(
            refused.to_lowercase().contains("certificate") || refused.contains("transport"),
            "{e}: {refused}"
        );
    }
    // The peer port lets members in (the peer CA's certificate) and not clients: the
    // operator's certificate is of the client CA.
    let peer_port = pods.layout.peer[1];
    let peer_trust = tls::trust(&pki.peer_ca);
    peer_handshake(peer_port, &peer_trust, &pki.leaves["peer"])
        .await
        .unwrap_or_else(|e| panic!("a member's certificate refused on the peer port: {e}"));
    let refused = peer_handshake(peer_port, &peer_trust, &pki.leaves["operator"])
        .await
        .unwrap_err();
    // The member's alert: the client CA is not the peer CA.
    assert!(refused.contains("UnknownCA"), "{refused}");
    // A member restarted now meets its peers over the newest certificates only.
    pods.stop(0);
    pods.start(0, &b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads(&only_newest, &endpoints[0]).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "member 0 did not come back over the new certificates"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_all_present(&only_newest, &endpoints, &acked).await;
}

/// A live plaintext cluster moved to TLS (clients and peers) and back by the operator's peer
/// planner under a writer: members restarted one at a time onto each template the planner
/// asks for, peer URLs moved by MemberUpdate while the peer ports take both; never more than
/// one member down, the peer ports refusing plaintext once done, and every acknowledged write
/// on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_cluster_moves_to_tls_and_back_member_by_member() {
    let s = Settings {
        lifetime: Duration::from_secs(3600),
        ca_lifetime: Duration::from_secs(36000),
        renew_fraction: 0.66,
        propagation: Duration::from_secs(5),
    };
    let mut pods = Pods::new("migrate");
    pods.bootstrap(3);
    crate::cluster::wait_leader(&pods).await;
    let pki = Pki::new(&s, &s);
    let dirs: Vec<PathBuf> = (0..3)
        .map(|o| pods.scratch().join(format!("tls-{o}")))
        .collect();
    pki.mount(&dirs, Duration::ZERO).await;
    let metrics = crate::ports::free_ports(3);
    let access = access(&tls::trust(&pki.ca), &pki.leaves["operator"]);

    // What each "pod" runs, and the template.
    let mut running: BTreeMap<i32, Serving> = (0..3).map(|o| (o, Serving::default())).collect();
    let mut template = Serving::default();
    let endpoints_of = |running: &BTreeMap<i32, Serving>, pods: &Pods| -> Vec<String> {
        running
            .iter()
            .map(|(o, s)| {
                let url = pods.layout.client_url(*o);
                if s.client.is_some() {
                    https(url)
                } else {
                    url
                }
            })
            .collect()
    };
    let shared = Arc::new(std::sync::Mutex::new(endpoints_of(&running, &pods)));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = resilient_writer(shared.clone(), access.clone(), stop.clone(), progress);

    for want in [Some(("migrate-server-tls", "migrate-peer-tls")), None] {
        let mut steps = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(240);
        loop {
            assert!(Instant::now() < give_up, "no end after {steps:?}");
            let eps = endpoints_of(&running, &pods);
            *shared.lock().unwrap() = eps.clone();
            let Ok(view) = Members::new(eps)
                .with_access(access.clone())
                .observe()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            // Every member that runs serves a linearizable read (so it reaches a quorum of
            // peers) after every step: none is cut off from the others by the step.
            for (o, url) in endpoints_of(&running, &pods).iter().enumerate() {
                let back = Instant::now() + Duration::from_secs(15);
                while let Err(e) = reads(&access, url).await {
                    assert!(
                        Instant::now() < back,
                        "member {o} cut off after {steps:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let rolled = running
                .values()
                .all(|r| r.peer_part() == template.peer_part());
            let urls: Vec<(u64, Vec<String>)> = view
                .members
                .iter()
                .map(|m| (m.id, m.peer_urls.clone()))
                .collect();
            let step = tls::next_peer(want.map(|w| w.1), &template.peer_part(), rolled, &urls);
            match &step {
                PeerStep::Template(p) => {
                    template.peer = p.secret.clone();
                    template.peer_plaintext = p.plaintext;
                }
                PeerStep::Update { id, urls } => {
                    Members::new(endpoints_of(&running, &pods))
                        .with_access(access.clone())
                        .update_peer_urls(*id, urls)
                        .await
                        .unwrap();
                }
                PeerStep::Rolling | PeerStep::Steady => {}
            }
            template.client = want.map(|w| w.0.to_string());
            template.client_cert_auth = want.is_some();
            if step != PeerStep::Rolling {
                steps.push(step.clone());
            }
            // The rollout: one member whose pod runs another template, when all are healthy.
            let outdated = (0..3).rev().find(|o| running[o] != template);
            match outdated {
                Some(o) if view.members.iter().all(|m| m.healthy) => {
                    let flags =
                        loopback_flags(&pods, o, &template, &dirs[o as usize], metrics[o as usize]);
                    pods.urls.insert(o, flags);
                    pods.stop(o);
                    pods.start(o, &bootstrap(&pods.layout, 0, Some(&view)));
                    running.insert(o, template.clone());
                    // Back and answering before anything else happens.
                    let url = endpoints_of(&running, &pods)[o as usize].clone();
                    let back = Instant::now() + Duration::from_secs(30);
                    while reads(&access, &url).await.is_err() {
                        assert!(
                            Instant::now() < back,
                            "{url} did not come back on {template:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                None if step == PeerStep::Steady => break,
                None => {}
            }
        }
        let view = Members::new(endpoints_of(&running, &pods))
            .with_access(access.clone())
            .observe()
            .await
            .unwrap();
        for m in &view.members {
            assert_eq!(tls::urls_https(&m.peer_urls), want.is_some(), "{m:?}");
        }
        for o in 0..3 {
            let port = pods.layout.peer[o];
            assert_eq!(
                answers_plaintext(port).await,
                want.is_none(),
                "peer port of member {o} after {steps:?}"
            );
        }
        // Through both kinds, then the URLs one member at a time (a member list read just
        // before the update applied everywhere may ask for the same one again: harmless), then
        // one kind alone.
        let updated: std::collections::BTreeSet<u64> = steps
            .iter()
            .filter_map(|s| match s {
                PeerStep::Update { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(updated.len(), 3, "{steps:?}");
        let kinds: Vec<&PeerStep> = steps
            .iter()
            .filter(|s| !matches!(s, PeerStep::Update { .. } | PeerStep::Steady))
            .collect();
        assert_eq!(kinds.len(), 2, "{steps:?}");
        assert!(
            matches!(kinds[0], PeerStep::Template(p) if p.plaintext),
            "{steps:?}"
        );
        assert!(
            matches!(kinds[1], PeerStep::Template(p) if !p.plaintext),
            "{steps:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let acked = writer.await.unwrap();
    assert_all_present(&access, &endpoints_of(&running, &pods), &acked).await;
}
