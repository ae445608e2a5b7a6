//! Runs real servers for the tests: cairn (the binary this package builds)
//! and etcd 3.4 from Debian, with the same flags, on free loopback ports,
//! each in its own temporary data directory.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::ports::free_ports;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cairn,
    Etcd,
}

impl Kind {
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Cairn => env!("CARGO_BIN_EXE_cairn"),
            Kind::Etcd => "etcd",
        }
    }
}

/// One single-member server process.
pub struct Member {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// With client TLS: the URLs say https, and readiness is asked with curl and these
    /// (`--cacert`, `--cert`, `--key`: the same flags for curl and etcdctl).
    tls_client: Option<Vec<String>>,
}

/// What a command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl From<Output> for Out {
    fn from(o: Output) -> Self {
        Out {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            code: o.status.code().unwrap_or(-1),
        }
    }
}

impl Member {
    pub fn start(kind: Kind) -> Self {
        Self::start_with(kind, &[])
    }

    /// Starts a member with extra flags appended to the common ones.
    pub fn start_with(kind: Kind, extra: &[&str]) -> Self {
        let mut m = Self::new(kind, extra);
        m.spawn();
        m
    }

    /// A member with its directory and ports, not started (see [`Self::launch`]).
    pub fn new(kind: Kind, extra: &[&str]) -> Self {
        let ports = free_ports(2);
        Member {
            kind,
            dir: tempfile::tempdir().unwrap(),
            client_port: ports[0],
            peer_port: ports[1],
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls_client: None,
        }
    }

    /// A member serving clients over TLS: `extra` has its TLS flags, `client` the flags a
    /// client passes to be let in (see `tls_client`). Not started.
    pub fn new_tls(kind: Kind, extra: &[&str], client: &[&str]) -> Self {
        let mut m = Self::new(kind, extra);
        m.tls_client = Some(client.iter().map(|s| s.to_string()).collect());
        m
    }

    /// Restores `snapshot` into a new member's data dir with the tool of its kind
    /// (`etcdctl snapshot restore` for etcd, `cairn snapshot restore` for cairn), then starts
    /// it with the usual flags. Returns what the restore printed if it failed.
    pub fn start_from_snapshot(kind: Kind, snapshot: &std::path::Path) -> Result<Self, Out> {
        let mut m = Self::new(kind, &[]);
        let out = m.restore(snapshot);
        if out.code != 0 {
            return Err(out);
        }
        m.spawn();
        Ok(m)
    }

    /// Runs the restore tool of this member's kind into its (empty) data dir.
    pub fn restore(&self, snapshot: &std::path::Path) -> Out {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = match self.kind {
            Kind::Etcd => {
                let mut c = Command::new("etcdctl");
                c.env("ETCDCTL_API", "3");
                c
            }
            Kind::Cairn => Command::new(self.kind.binary()),
        };
        cmd.arg("snapshot")
            .arg("restore")
            .arg(snapshot)
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg("--name=m1")
            .arg(format!("--initial-cluster=m1={peer}"))
            .arg("--initial-cluster-token=cairn-test")
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .output()
            .unwrap()
            .into()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_client.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The flags both servers get: exactly what one would pass to etcd.
    pub fn flags(&self) -> Vec<String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut f: Vec<String> = [
            "--name",
            "m1",
            "--data-dir",
            self.data_dir().to_str().unwrap(),
            "--listen-client-urls",
            &self.url(),
            "--advertise-client-urls",
            &self.url(),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("m1={peer}"),
            "--initial-cluster-token",
            "cairn-test",
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        f.extend(self.extra.iter().cloned());
        f
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(self.kind.binary())
            .args(self.flags())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.kind.binary()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Starts a member made with [`Self::new`] and waits until it is ready.
    pub fn launch(&mut self) {
        self.spawn();
    }

    /// How the member's process ended, if it did.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Waits until `/health` on the client port reports healthy.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "{:?} exited early with {status}:\n{}",
                        self.kind,
                        self.log()
                    );
                }
            }
            let health = match &self.tls_client {
                None => http_get(self.client_port, "/health"),
                Some(flags) => Command::new("curl")
                    .arg("-s")
                    .args(flags)
                    .arg(format!("{}/health", self.url()))
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
            };
            if health.is_some_and(|b| b.contains(r#""health":"true""#)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{:?} not healthy after 30s:\n{}", self.kind, self.log());
    }

    /// SIGKILL, no warning.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same data directory and ports.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs etcdctl (v3 API) against this member.
    pub fn ctl(&self, args: &[&str]) -> Out {
        self.ctl_stdin(args, "")
    }

    /// Runs etcdctl (v3 API) against this member, `input` on its stdin.
    pub fn ctl_stdin(&self, args: &[&str], input: &str) -> Out {
        // `watch` never ends by itself: give it two seconds to print.
        let mut cmd = if args.first() == Some(&"watch") {
            let mut c = Command::new("timeout");
            c.arg("2").arg("etcdctl");
            c
        } else {
            Command::new("etcdctl")
        };
        let mut child = cmd
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .arg("--command-timeout=10s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir(self.dir.path())
            .spawn()
            .expect("etcdctl runs");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out.into()
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None)
            .await
            .expect("etcd client connects")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a minimal HTTP/1.1 request (`Connection: close`) to 127.0.0.1;
/// the connection, to read the answer from with `read_timeout`.
/// `headers` are further header lines, each ending in CRLF.
pub fn http_send(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
    read_timeout: Duration,
) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().ok()?,
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n{body}"
    )
    .ok()?;
    Some(s)
}

/// A minimal HTTP/1.1 GET on 127.0.0.1; the body, if the server answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = http_send(port, "GET", path, "", "", Duration::from_secs(2))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}
