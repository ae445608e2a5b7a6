//! Multi-member clusters for the replication tests: each member runs in a
//! network namespace of its own, all joined by a bridge in a "switch"
//! namespace, so that a member's link can be cut or slowed (`ip link`,
//! `tc netem`) while the others and the test (in the root namespace, over
//! an uplink to the same bridge) keep talking. Needs root (CI runs as root).
//!
//! Also: a load of concurrent clients that records every operation for the
//! linearizability checker.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

use crate::harness::Kind;
use crate::linearizability::{Kind as OpKind, Op};

static NEXT_NET: AtomicU64 = AtomicU64::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The namespaces and links of one cluster.
pub struct Net {
    id: u64,
}

impl Net {
    /// A fresh network number for this process: 16 per process, more than
    /// the test binary ever makes (a number used twice at once would have
    /// the second cluster tear down the first one's network: with 4, the
    /// seventh cluster did that to one still running).
    pub fn next_id() -> u64 {
        (std::process::id() as u64 % 14) * 16 + NEXT_NET.fetch_add(1, Ordering::Relaxed) % 16 + 20
    }

    fn new(id: u64) -> Self {
        let net = Net { id };
        net.teardown();
        let sw = net.switch();
        sh(&["ip", "netns", "add", &sw]);
        sh(&["ip", "netns", "exec", &sw, "ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip", "netns", "exec", &sw, "ip", "link", "add", "br0", "type", "bridge",
        ]);
        sh(&["ip", "netns", "exec", &sw, "ip", "link", "set", "br0", "up"]);
        let up = net.uplink();
        sh(&[
            "ip", "link", "add", &up, "type", "veth", "peer", "name", "up0", "netns", &sw,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", net.ip(0)),
            "dev",
            &up,
        ]);
        sh(&["ip", "link", "set", &up, "up"]);
        sh(&[
            "ip", "netns", "exec", &sw, "ip", "link", "set", "up0", "master", "br0", "up",
        ]);
        net
    }

    fn switch(&self) -> String {
        format!("cairn{}-sw", self.id)
    }

    fn uplink(&self) -> String {
        format!("cairn{}up", self.id)
    }

    fn ns(&self, i: usize) -> String {
        format!("cairn{}-m{i}", self.id)
    }

    fn port(&self, i: usize) -> String {
        format!("c{}p{i}", self.id)
    }

    /// Member `i`'s address (0: the test's uplink).
    pub fn ip(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.id, if i == 0 { 1 } else { 10 + i })
    }

    fn add_member(&self, i: usize) {
        let ns = self.ns(i);
        sh_quiet(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns]);
        let sw = self.switch();
        let port = self.port(i);
        sh(&[
            "ip", "netns", "exec", &sw, "ip", "link", "add", &port, "type", "veth", "peer", "name",
            "eth0", "netns", &ns,
        ]);
        sh(&[
            "ip", "netns", "exec", &sw, "ip", "link", "set", &port, "master", "br0", "up",
        ]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.ip(i)),
            "dev",
            "eth0",
        ]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
        ]);
    }

    /// Cuts member `i` off from everyone (members and clients).
    pub fn cut(&self, i: usize) {
        self.link(i, "down");
    }

    pub fn heal(&self, i: usize) {
        self.link(i, "up");
    }

    fn link(&self, i: usize, state: &str) {
        let (sw, port) = (self.switch(), self.port(i));
        sh(&[
            "ip", "netns", "exec", &sw, "ip", "link", "set", &port, state,
        ]);
    }

    /// Slows member `i`'s link: 150 ms of delay with `tc netem`, or where
    /// the kernel has no netem, a 512 kbit/s rate limit with `tc tbf`.
    /// Returns what was applied.
    pub fn slow(&self, i: usize) -> &'static str {
        let sw = self.switch();
        let port = self.port(i);
        let tc = |q: &[&str]| {
            let mut args = vec![
                "netns", "exec", &sw, "tc", "qdisc", "replace", "dev", &port, "root",
            ];
            args.extend_from_slice(q);
            Command::new("ip")
                .args(&args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if tc(&["netem", "delay", "150ms"]) {
            "netem delay 150ms"
        } else if tc(&[
            "tbf", "rate", "512kbit", "burst", "16kbit", "latency", "300ms",
        ]) {
            "tbf rate 512kbit"
        } else {
            panic!("tc can neither delay (netem) nor rate-limit (tbf) here");
        }
    }

    pub fn undelay(&self, i: usize) {
        sh_quiet(&[
            "ip",
            "netns",
            "exec",
            &self.switch(),
            "tc",
            "qdisc",
            "del",
            "dev",
            &self.port(i),
            "root",
        ]);
    }

    fn teardown(&self) {
        for i in 1..=8 {
            sh_quiet(&["ip", "netns", "del", &self.ns(i)]);
        }
        sh_quiet(&["ip", "netns", "del", &self.switch()]);
        sh_quiet(&["ip", "link", "del", &self.uplink()]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// One member process.
pub struct Node {
    pub slot: usize,
    pub name: String,
    pub dir: std::path::PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

/// A cluster of cairn (or etcd) members, one namespace each.
pub struct Cluster {
    pub kind: Kind,
    pub net: Net,
    pub nodes: Vec<Node>,
    pub root: tempfile::TempDir,
    /// Writes of earlier loads on this cluster whose outcome is unknown.
    pub unknown_writes: Vec<crate::linearizability::Op>,
    extra: Vec<String>,
    /// `https` when members talk over TLS (their `--peer-*` flags are in `extra`).
    peer_scheme: &'static str,
}

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

impl Cluster {
    /// Starts `n` members bootstrapped together with `--initial-cluster`.
    pub fn start(kind: Kind, n: usize, extra: &[&str]) -> Self {
        Self::start_on(Net::next_id(), kind, n, extra)
    }

    /// Starts a cluster on network number `net` (same addresses, hence the
    /// same member and cluster IDs, as another cluster started on it).
    pub fn start_on(net: u64, kind: Kind, n: usize, extra: &[&str]) -> Self {
        Self::start_with_scheme(net, kind, n, extra, "http")
    }

    /// Starts a cluster whose members talk over mutual TLS; `peer_tls` gives the `--peer-*`
    /// flags for the members' addresses on network `net` ([`Net::ip`]).
    pub fn start_peer_tls(
        net: u64,
        kind: Kind,
        n: usize,
        extra: &[&str],
        peer_tls: &[String],
    ) -> Self {
        let mut all: Vec<&str> = extra.to_vec();
        all.extend(peer_tls.iter().map(String::as_str));
        Self::start_with_scheme(net, kind, n, &all, "https")
    }

    fn start_with_scheme(
        net: u64,
        kind: Kind,
        n: usize,
        extra: &[&str],
        peer_scheme: &'static str,
    ) -> Self {
        let mut c = Cluster {
            kind,
            net: Net::new(net),
            nodes: Vec::new(),
            root: tempfile::tempdir().unwrap(),
            unknown_writes: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            peer_scheme,
        };
        let initial: Vec<String> = (1..=n).map(|i| format!("m{i}={}", c.peer_url(i))).collect();
        let initial = initial.join(",");
        for i in 1..=n {
            c.net.add_member(i);
            c.spawn_new(i, &initial, "new");
        }
        for i in 1..=n {
            c.wait_healthy_blocking(i);
        }
        c
    }

    pub fn peer_url(&self, slot: usize) -> String {
        format!("{}://{}:{PEER_PORT}", self.peer_scheme, self.net.ip(slot))
    }

    pub fn client_url(&self, slot: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.net.ip(slot))
    }

    pub fn endpoint(&self, slot: usize) -> String {
        format!("{}:{CLIENT_PORT}", self.net.ip(slot))
    }

    /// Slots of the members that are running.
    pub fn live(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.slot)
            .collect()
    }

    /// The process ID of the member in `slot`, while it runs (`ip netns exec` execs it).
    pub fn pid(&self, slot: usize) -> Option<u32> {
        let node = self.nodes.iter().find(|n| n.slot == slot)?;
        node.child.as_ref().map(Child::id)
    }

    fn node(&mut self, slot: usize) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.slot == slot).unwrap()
    }

    fn spawn_new(&mut self, slot: usize, initial: &str, state: &str) {
        let name = format!("m{slot}");
        let dir = self.root.path().join(&name);
        let mut args: Vec<String> = [
            "--name",
            &name,
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--listen-client-urls",
            &self.client_url(slot),
            "--advertise-client-urls",
            &self.client_url(slot),
            "--listen-peer-urls",
            &self.peer_url(slot),
            "--initial-advertise-peer-urls",
            &self.peer_url(slot),
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            "cairn-faults",
            "--initial-cluster-state",
            state,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        std::fs::create_dir_all(&dir).unwrap();
        self.nodes.push(Node {
            slot,
            name,
            dir,
            child: None,
            args,
        });
        self.spawn(slot);
    }

    fn spawn(&mut self, slot: usize) {
        let ns = self.net.ns(slot);
        let bin = self.kind.binary();
        let node = self.node(slot);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("server.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, bin])
            .args(&node.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    pub fn log(&self, slot: usize) -> String {
        let n = self.nodes.iter().find(|n| n.slot == slot).unwrap();
        std::fs::read_to_string(n.dir.join("server.log")).unwrap_or_default()
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = self.log(n.slot);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "--- {} (last lines)\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether member `slot` answers /health with a leader; panics if its
    /// process exited.
    fn healthy_now(&mut self, slot: usize) -> bool {
        if let Some(Ok(Some(status))) = self.node(slot).child.as_mut().map(|c| c.try_wait()) {
            panic!("m{slot} exited with {status}:\n{}", self.log(slot));
        }
        http_get(&self.net.ip(slot), CLIENT_PORT, "/health")
            .is_some_and(|b| b.contains(r#""health":"true""#))
    }

    fn wait_healthy_blocking(&mut self, slot: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.healthy_now(slot) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("m{slot} not healthy after 30s:\n{}", self.logs());
    }

    /// Waits until member `slot` answers /health with a leader.
    pub async fn wait_healthy(&mut self, slot: usize) {
        tokio::task::block_in_place(|| self.wait_healthy_blocking(slot));
    }

    pub fn kill9(&mut self, slot: usize) {
        if let Some(mut c) = self.node(slot).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped member again on its data directory.
    pub fn restart(&mut self, slot: usize) {
        self.kill9(slot);
        self.spawn(slot);
    }

    /// Adds (`on`) or removes a flag of member `slot` for its next start.
    pub fn set_flag(&mut self, slot: usize, flag: &str, on: bool) {
        let node = self.node(slot);
        node.args.retain(|a| a != flag);
        if on {
            node.args.push(flag.to_string());
        }
    }

    /// Whether member `slot`'s process has exited (e.g. after removal).
    pub fn exited(&mut self, slot: usize) -> bool {
        matches!(
            self.node(slot).child.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_)))
        )
    }

    /// etcdctl against the given members.
    pub fn ctl(&self, slots: &[usize], args: &[&str]) -> crate::harness::Out {
        let eps: Vec<String> = slots.iter().map(|s| self.endpoint(*s)).collect();
        let run = || {
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(eps.join(","))
                .arg("--command-timeout=15s")
                .args(args)
                .output()
                .unwrap()
                .into()
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }

    /// `etcdctl member add` then starts the new member with
    /// `--initial-cluster-state existing` and the environment etcdctl printed.
    pub fn add_member(&mut self, slot: usize, learner: bool) -> crate::harness::Out {
        self.net.add_member(slot);
        let name = format!("m{slot}");
        let peer = self.peer_url(slot);
        let mut args = vec!["member", "add", &name, "--peer-urls", &peer];
        if learner {
            args.push("--learner");
        }
        let live = self.live();
        let out = self.ctl(&live, &args);
        if out.code != 0 {
            return out;
        }
        let initial = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
            .expect("etcdctl prints ETCD_INITIAL_CLUSTER")
            .trim_matches('"')
            .to_string();
        self.spawn_new(slot, &initial, "existing");
        out
    }

    /// A client of the given members (etcd-client fails over between them).
    pub async fn client(&self, slots: &[usize]) -> Client {
        let eps: Vec<String> = slots.iter().map(|s| self.client_url(*s)).collect();
        Client::connect(
            eps,
            Some(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(10)),
            ),
        )
        .await
        .unwrap()
    }

    /// The member that leads, as the live members report it.
    pub async fn leader(&self) -> Option<usize> {
        for slot in self.live() {
            let Ok(c) = tokio::time::timeout(Duration::from_secs(2), self.client(&[slot])).await
            else {
                continue;
            };
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), c.maintenance_client().status()).await
            {
                let leader = s.leader();
                let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                if leader != 0 && leader == me {
                    return Some(slot);
                }
            }
        }
        None
    }

    /// Waits for a leader; returns it and how long it took.
    pub async fn wait_leader(&self, within: Duration) -> (usize, Duration) {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(l) = self.leader().await {
                return (l, t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader within {within:?}:\n{}", self.logs());
    }

    /// Waits until every live member has applied the same revision and
    /// reports the same HashKV at it.
    pub async fn converge(&self) -> (i64, u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.hashes().await {
                Ok(h) if h.windows(2).all(|w| w[0] == w[1]) && !h.is_empty() => return h[0],
                Ok(h) => last = format!("{h:?}"),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("members did not converge: {last}\n{}", self.logs());
    }

    /// (revision, HashKV) of every live member.
    async fn hashes(&self) -> Result<Vec<(i64, u32)>, String> {
        let mut out = Vec::new();
        for slot in self.live() {
            let mut c = self.client(&[slot]).await;
            let get = c
                .get(
                    "",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_all_keys()
                            .with_serializable()
                            .with_count_only(),
                    ),
                )
                .await
                .map_err(|e| format!("m{slot}: {e}"))?;
            let rev = get.header().map(|h| h.revision()).unwrap_or(0);
            let h = c
                .maintenance_client()
                .hash_kv(rev)
                .await
                .map_err(|e| format!("m{slot}: {e}"))?;
            out.push((rev, h.hash()));
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A minimal HTTP/1.1 GET; the body, if the server answered.
pub fn http_get(ip: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{ip}:{port}").parse().ok()?,
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

/// The load value a get returned (None: key absent).
pub fn value_of(resp: &etcd_client::GetResponse) -> Option<u64> {
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().parse::<u64>().unwrap())
}

/// Concurrent clients doing linearizable gets and puts of unique values on
/// a set of keys, each bound to one member, recording every operation.
pub struct Load {
    /// The origin of every recorded time.
    pub started: Instant,
    /// The first value this load writes (values are unique across loads).
    pub first_value: u64,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Op>>>,
    pub acked: Arc<AtomicU64>,
}

pub const LOAD_KEYS: u32 = 64;

/// Values are unique across every load of a test run.
static NEXT_VALUE: AtomicU64 = AtomicU64::new(1 << 32);

impl Load {
    pub async fn start(c: &Cluster, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let next_value = Arc::new(AtomicU64::new(0));
        let first_value = NEXT_VALUE.fetch_add(1 << 32, Ordering::Relaxed) + 1;
        next_value.store(first_value, Ordering::Relaxed);
        let live = c.live();
        let mut tasks = Vec::new();
        for w in 0..workers {
            let url = c.client_url(live[w % live.len()]);
            let stop = stop.clone();
            let acked = acked.clone();
            let next_value = next_value.clone();
            tasks.push(tokio::spawn(async move {
                worker(url, w as u64, started, stop, acked, next_value).await
            }));
        }
        Load {
            started,
            first_value,
            stop,
            tasks,
            acked,
        }
    }

    /// Stops the clients and returns the history.
    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for t in self.tasks {
            ops.extend(t.await.unwrap());
        }
        ops
    }
}

async fn worker(
    url: String,
    seed: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    next_value: Arc<AtomicU64>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut client: Option<Client> = None;
    let now = || started.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            let opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(3));
            match Client::connect([url.clone()], Some(opts)).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let c = client.as_mut().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = (rng % LOAD_KEYS as u64) as u32;
        let k = format!("lin/{key:03}");
        let call = now();
        if rng & (1 << 40) == 0 {
            let v = next_value.fetch_add(1, Ordering::Relaxed);
            let r =
                tokio::time::timeout(Duration::from_secs(4), c.put(k, v.to_string(), None)).await;
            let ok = matches!(r, Ok(Ok(_)));
            if ok {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            ops.push(Op {
                key,
                kind: OpKind::Put(v),
                call,
                ret: ok.then(now),
            });
            if !ok {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        } else {
            let r = tokio::time::timeout(Duration::from_secs(4), c.get(k, None)).await;
            match r {
                Ok(Ok(resp)) => {
                    let seen = value_of(&resp);
                    ops.push(Op {
                        key,
                        kind: OpKind::Get(seen),
                        call,
                        ret: Some(now()),
                    });
                }
                // A failed read changed nothing: it is left out.
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
    ops
}
