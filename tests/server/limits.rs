//! Bad input and limits: malformed requests, the space quota, auto
//! compaction. Each checks cairn against etcd's documented behaviour.

use std::time::Duration;

use bytes::{Buf, BufMut};
use etcd_client::{AlarmAction, AlarmType, GetOptions};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::harness::{Kind, Member};

/// Sends and receives raw bytes, to put malformed protobuf on the wire.
#[derive(Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_and_keep_the_connection() {
    let m = Member::start(Kind::Cairn);
    let channel = tonic::transport::Channel::from_shared(m.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for path in [
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.Lease/LeaseGrant",
    ] {
        // Field 1 announced as length-delimited with a length past the end.
        let err = raw_call(channel.clone(), path, vec![0x0a, 0x7f, 0x01])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
    }
    // The same connection still serves a valid request (PutRequest{key:"k"}).
    let ok = raw_call(channel, "/etcdserverpb.KV/Put", vec![0x0a, 0x01, b'k']).await;
    assert!(ok.is_ok(), "{ok:?}");
    let mut c = m.client().await;
    assert_eq!(c.get("k", None).await.unwrap().kvs().len(), 1);
}

#[tokio::test]
async fn space_quota_raises_nospace_alarm() {
    let m = Member::start_with(Kind::Cairn, &["--quota-backend-bytes", "3000000"]);
    let mut c = m.client().await;
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = c.put(format!("big/{i}"), vec![b'x'; 100_000], None).await {
            refused = Some(e);
            break;
        }
        // The size the quota sees is refreshed twice a second.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match refused.expect("writes past the quota are refused") {
        etcd_client::Error::GRpcStatus(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert_eq!(s.message(), "etcdserver: mvcc: database space exceeded");
        }
        e => panic!("{e}"),
    }
    let mut alarms = Vec::new();
    for _ in 0..50 {
        alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap()
            .alarms()
            .to_vec();
        if !alarms.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alarms.len(), 1, "NOSPACE alarm raised");
    assert_eq!(alarms[0].alarm(), AlarmType::Nospace);
    // Reads and deletes still work under the alarm.
    assert!(c.get("big/0", None).await.is_ok());
    assert!(c.delete("big/0", None).await.is_ok());
}

/// etcd's runbook for a NOSPACE alarm — compact at the current revision, defragment, disarm —
/// gives writes back when the space went to history, on cairn as on etcd. (cairn once counted
/// its Raft log towards the quota, which no compaction clears.)
#[tokio::test]
async fn nospace_cleared_by_compact_defragment_disarm_as_on_etcd() {
    for kind in [Kind::Etcd, Kind::Cairn] {
        let m = Member::start_with(kind, &["--quota-backend-bytes", "3000000"]);
        let mut c = m.client().await;
        let mut refused = false;
        for _ in 0..400 {
            if c.put("history", vec![b'x'; 100_000], None).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "{kind:?}: overwrites never reached the quota");
        let revision = c.status().await.unwrap().header().unwrap().revision();
        c.compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
        c.defragment().await.unwrap();
        let mut member = etcd_client::AlarmOptions::new();
        member.with_member(c.status().await.unwrap().header().unwrap().member_id());
        c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(member))
            .await
            .unwrap();
        // The size the quota sees is refreshed twice a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let size = c.status().await.unwrap().db_size();
        assert!(
            size < 3_000_000,
            "{kind:?}: {size} bytes after defragmenting"
        );
        c.put("after", "ok", None)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: a write after recovery: {e}"));
        let alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap();
        assert!(alarms.alarms().is_empty(), "{kind:?}");
    }
}

#[tokio::test]
async fn periodic_auto_compaction_compacts_old_history() {
    let m = Member::start_with(
        Kind::Cairn,
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1s",
        ],
    );
    let mut c = m.client().await;
    c.put("a", "1", None).await.unwrap();
    c.put("a", "2", None).await.unwrap();
    let mut compacted = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.put("a", "more", None).await.unwrap();
        if let Err(etcd_client::Error::GRpcStatus(s)) =
            c.get("a", Some(GetOptions::new().with_revision(2))).await
        {
            assert_eq!(
                s.message(),
                "etcdserver: mvcc: required revision has been compacted"
            );
            compacted = true;
            break;
        }
    }
    assert!(
        compacted,
        "revision 2 is compacted within a few retention periods"
    );
}

#[test]
fn flags_errors_and_environment() {
    let bin = env!("CARGO_BIN_EXE_cairn");
    let out = std::process::Command::new(bin)
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "unknown flag");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = std::process::Command::new(bin)
        .args(["--heartbeat-interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "malformed flag");
    // Go-style single-dash flags and ETCD_* variables work as with etcd.
    let m = Member::start_with(Kind::Cairn, &["-snapshot-count", "5000"]);
    let listed = m.ctl_stdin(&["member", "list"], "");
    assert!(listed.stdout.contains(", m1, "), "{listed:?}");
    let dir = tempfile::tempdir().unwrap();
    let ports = crate::ports::free_ports(2);
    let (port, peer) = (ports[0], ports[1]);
    let mut child = std::process::Command::new(bin)
        .env("ETCD_NAME", "from-env")
        .env("ETCD_DATA_DIR", dir.path().join("d"))
        .env(
            "ETCD_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{port}"),
        )
        .env(
            "ETCD_ADVERTISE_CLIENT_URLS",
            format!("http://127.0.0.1:{port}"),
        )
        .env("ETCD_LISTEN_PEER_URLS", format!("http://127.0.0.1:{peer}"))
        .env(
            "ETCD_INITIAL_ADVERTISE_PEER_URLS",
            format!("http://127.0.0.1:{peer}"),
        )
        .env(
            "ETCD_INITIAL_CLUSTER",
            format!("from-env=http://127.0.0.1:{peer}"),
        )
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut body = None;
    for _ in 0..100 {
        body = crate::harness::http_get(port, "/health");
        if body
            .as_deref()
            .is_some_and(|b| b.contains(r#""health":"true""#))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &format!("127.0.0.1:{port}"),
            "member",
            "list",
        ])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(body.is_some_and(|b| b.contains("200 OK")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", from-env, "),
        "{out:?}"
    );
}

/// What etcd's Go server answers for a service it does not have (as
/// cairn has no v3lock/v3election services) and an HTTP path it does not
/// serve; cairn must answer the same.
#[tokio::test]
async fn unknown_services_and_paths_are_answered_as_etcd_does() {
    let mut answers = Vec::new();
    for kind in [Kind::Etcd, Kind::Cairn] {
        let m = Member::start(kind);
        let channel = tonic::transport::Channel::from_shared(m.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let err = raw_call(channel, "/cairn.Nothing/Here", Vec::new())
            .await
            .unwrap_err();
        let http = crate::harness::http_get(m.client_port, "/nothing/here").unwrap();
        let status = http.lines().next().unwrap_or_default().to_string();
        let body = http
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_string();
        answers.push((err.code(), err.message().to_string(), status, body));
    }
    assert_eq!(
        answers[0],
        (
            Code::Unimplemented,
            "unknown service cairn.Nothing".to_string(),
            "HTTP/1.1 404 Not Found".to_string(),
            "404 page not found\n".to_string()
        ),
        "etcd's answers"
    );
    assert_eq!(answers[1], answers[0], "cairn's answers differ from etcd's");
}

#[tokio::test]
async fn http_endpoints_metrics_and_grpc_health() {
    let m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    c.put("k", "v", None).await.unwrap();
    for path in ["/livez", "/readyz", "/health"] {
        let r = crate::harness::http_get(m.client_port, path).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
    }
    let metrics = crate::harness::http_get(m.client_port, "/metrics").unwrap();
    for name in [
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 1",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_disk_wal_fsync_duration_seconds_count",
        "etcd_disk_backend_commit_duration_seconds_count",
        // etcd's default quota, 2 GiB.
        "etcd_server_quota_backend_bytes 2147483648",
        "etcd_server_proposals_applied_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    // The put above was applied: one commit at least was timed.
    let commits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("etcd_disk_backend_commit_duration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(commits >= 1.0, "{commits}");
    let channel = tonic::transport::Channel::from_shared(m.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn hashes_and_snapshot_files() {
    let m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    for i in 0..50 {
        c.put(format!("h/{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let rev = c
        .get("h/0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let a = c.hash_kv(rev).await.unwrap();
    assert_eq!(
        a.hash(),
        c.hash_kv(rev).await.unwrap().hash(),
        "HashKV is stable at a revision"
    );
    let h1 = c.hash().await.unwrap().hash();
    c.put("h/new", "x", None).await.unwrap();
    assert_eq!(
        a.hash(),
        c.hash_kv(rev).await.unwrap().hash(),
        "later writes do not change an older HashKV"
    );
    assert_ne!(
        h1,
        c.hash().await.unwrap().hash(),
        "Hash covers the new write"
    );
    c.compact(rev, None).await.unwrap();
    match c.hash_kv(rev - 1).await {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(
                s.message(),
                "etcdserver: mvcc: required revision has been compacted"
            )
        }
        other => panic!("{other:?}"),
    }
    // etcdctl's snapshot save accepts the stream (it checks the trailing
    // SHA-256); the file verifies and holds the whole state.
    let out = m.ctl_stdin(&["snapshot", "save", "s.db"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let file = std::fs::read(m.dir.path().join("s.db")).unwrap();
    let payload = cairn::snapshot::verify(&file).unwrap();
    let state: cairn::snapshot::SnapshotPayload = bincode::deserialize(payload).unwrap();
    assert_eq!(state.meta.revision, rev + 1);
    assert!(state.records.len() >= 51, "{} records", state.records.len());
    let mut corrupt = file.clone();
    corrupt[100] ^= 0xff;
    assert!(cairn::snapshot::verify(&corrupt).is_err());
}

/// The HTTP/2 front door (issue 21, in part): a one-byte 0x3f header block (a truncated table
/// size update, on which the `hpack` crate panics), an oversized frame and an endless
/// CONTINUATION sequence each get that connection closed, and other clients are served.
#[tokio::test]
async fn hostile_http2_frames_close_only_their_connection() {
    use std::io::{Read, Write};
    let m = Member::start(Kind::Cairn);
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    };
    let preface = [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &frame(0x4, 0, &[]),
    ]
    .concat();
    let mut oversized = (1u32 << 20).to_be_bytes()[1..].to_vec();
    oversized.extend_from_slice(&[0x1, 0x4, 0, 0, 0, 1]);
    oversized.extend_from_slice(&[0x82; 4096]);
    let mut flood = frame(0x1, 0, &[0x82]);
    for _ in 0..200 {
        flood.extend(frame(0x9, 0, &[0x82; 8192]));
    }
    for (what, attack) in [
        ("0x3f header block", frame(0x1, 0x4, &[0x3f])),
        ("oversized frame", oversized),
        ("CONTINUATION flood", flood),
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", m.client_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&preface).unwrap();
        // The server may close while the attack is still being written.
        let _ = s.write_all(&attack);
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(e) => panic!("{what}: connection not closed: {e}"),
            }
        };
        assert!(closed, "{what}");
        let mut c = m.client().await;
        c.put("served", what, None)
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}\n{}", m.log()));
    }
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

/// A burst of puts near the request limit (60 x 1.4 MB: before entries were
/// cut by bytes, one Raft entry could take them all, and 200 such puts
/// passed the 256 MiB a peer message may carry): entries and AppendEntries
/// are cut by bytes, every put commits and all three members agree. (Kept
/// small enough for a debug build under a parallel test run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_large_puts_commit_across_three_members() {
    let c = crate::cluster::Cluster::start(Kind::Cairn, 3, &[]);
    c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client(&[1, 2, 3]).await;
    let value = vec![b'x'; 1_400_000];
    let puts: Vec<_> = (0..60)
        .map(|i| {
            let mut client = client.clone();
            let value = value.clone();
            tokio::spawn(async move { client.put(format!("big{i}"), value, None).await })
        })
        .collect();
    for p in puts {
        if let Err(e) = p.await.unwrap() {
            panic!("a large put: {e}\n{}", c.logs());
        }
    }
    let (revision, _) = c.converge().await;
    assert!(revision >= 61, "{revision}");
    let mut client = client.clone();
    let count = client
        .get(
            "big",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(count, 60);
}

/// A watcher replaying a long history (11 MiB) gets it in pages (1 MiB of
/// values at a time, never the whole span in memory; each response fits
/// the client's 4 MiB limit), every event once and in order.
#[tokio::test]
async fn long_watch_replays_arrive_whole_and_in_order() {
    let m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    let value = vec![b'v'; 16 << 10];
    for i in 0..700 {
        c.put(format!("w/{i:04}"), value.clone(), None)
            .await
            .unwrap();
    }
    let mut stream = c
        .watch(
            "w/",
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(1),
            ),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 700 {
        let resp = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("replay stalled")
            .unwrap()
            .expect("stream open");
        for e in resp.events() {
            let kv = e.kv().unwrap();
            assert_eq!(kv.value().len(), 16 << 10);
            seen.push(kv.mod_revision());
        }
    }
    let expected: Vec<i64> = (2..702).collect();
    assert_eq!(seen, expected);
}
