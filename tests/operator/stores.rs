//! Backup destinations other than S3: object_store's local filesystem store with real cairn
//! members (the store-independent path: multipart and single-PUT uploads, listing, download,
//! verification), and the configuration of `gcs` and `azure`. No emulator object_store can
//! talk to installs here: object_store speaks GCS's XML API while the PyPI emulator
//! (`gcp-storage-emulator`) serves the JSON API (its XML PUT answers without the ETag
//! object_store requires, and it has no XML listing or DELETE); Azurite is an npm package.

use std::process::Command;

use cairn_operator::backup::{self, Credentials, Destination, Error};
use cairn_operator::crd::{
    AzureDestination, BackupDestination, GcsDestination, PvcDestination, RetentionSpec,
    S3Destination,
};
use object_store::path::Path;
use object_store::ObjectStoreExt;

use cairn_operator::layout::Layout;

use crate::cluster::{cairn_binary, wait_leader, Pods};

async fn member_with_keys(name: &str, n: usize, value_len: usize) -> (Pods, i64) {
    let mut pods = Pods::new(name);
    pods.bootstrap(1);
    wait_leader(&pods).await;
    let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    let mut rev = 0;
    for i in 0..n {
        let value = format!("{i:08}").repeat(value_len / 8 + 1);
        rev = c
            .put(format!("key/{i:05}"), &value[..value_len], None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    (pods, rev)
}

fn at(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// `cairn snapshot verify` of a fetched backup against its record.
fn verify(file: &std::path::Path, rec: &cairn_operator::crd::BackupRecord) {
    let out = Command::new(cairn_binary())
        .args(["snapshot", "verify", file.to_str().unwrap()])
        .arg(format!("--revision={}", rec.revision))
        .arg(format!("--keys={}", rec.keys.unwrap()))
        .arg(format!("--hash={}", rec.hash.unwrap()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// GCS's configuration (no emulator object_store can talk to installs here): with an endpoint
/// and no key, requests go to that endpoint and ask no metadata server for a token; a service
/// account key from a Secret's keys is used (a malformed one is refused by name); the
/// operator's `fetch-backup` (a restore's init step) takes the destination as JSON and reaches
/// the same endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_configuration_and_the_restore_step() {
    let port = crate::ports::free_port();
    let d = BackupDestination {
        gcs: Some(GcsDestination {
            bucket: "backups".into(),
            prefix: "/team/".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            credentials_secret: Some("gcs".into()),
        }),
        ..BackupDestination::default()
    };
    let dest = Destination::open(&d, None).unwrap();
    assert_eq!(dest.prefix, "team");
    let err = dest
        .store
        .get(&Path::from("team/x.snap"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("169.254.169.254"), "{err}");

    let bad = Credentials::from([(
        "GOOGLE_SERVICE_ACCOUNT_KEY".to_string(),
        "{not json".to_string(),
    )]);
    let err = Destination::open(&d, Some(&bad)).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("service account"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_cairn-operator"))
        .arg("fetch-backup")
        .arg(format!(
            "--destination={}",
            serde_json::to_string(&d).unwrap()
        ))
        .arg("--key=team/x.snap")
        .arg("--out=/nonexistent/x.snap")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    // A misspelt field is refused by name, not dropped.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-operator"))
        .arg("fetch-backup")
        .arg(r#"--destination={"gcs":{"bucket":"b","prefx":"p","endpoint":""}}"#)
        .args(["--key=k", "--out=/nonexistent/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field gcs.prefx"),
        "{out:?}"
    );
    // Both forms at once are refused.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-operator"))
        .arg("fetch-backup")
        .arg(format!(
            "--destination={}",
            serde_json::to_string(&d).unwrap()
        ))
        .args(["--bucket=b", "--key=k", "--out=/tmp/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{out:?}"
    );
}

/// object_store's local filesystem store: a backup of ~12 MiB (more than one 8 MiB part, so it
/// goes as a multipart upload) and one of a few KiB (one PUT) both land whole, list, and come
/// back verified; retention prunes the older with its manifest; a damaged object is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_takes_multipart_and_single_put_backups() {
    let (pods, _) = member_with_keys("local", 120, 100 << 10).await;
    let root = pods.scratch().join("store");
    std::fs::create_dir_all(&root).unwrap();
    let dest = Destination::local(&root, "p").unwrap();
    full_cycle(&pods, &dest, &root, "local").await;
}

/// The cycle of the store-independent path on `dest`, whose objects are files below `root`
/// (to damage one): a multipart and a single-PUT backup, listing, download with
/// `cairn snapshot verify`, retention with manifests, the latest, a damaged object refused.
async fn full_cycle(pods: &Pods, dest: &Destination, root: &std::path::Path, tag: &str) {
    let dest = dest.clone();
    let dir = dest.cluster_dir("db", tag, "uid");
    let big = backup::stream_backup(
        &[pods.layout.client_url(0)],
        &cairn_operator::members::Access::default(),
        &dest,
        &dir,
        at(0),
    )
    .await
    .unwrap();
    assert!(big.size > 8 << 20, "{} bytes: not past one part", big.size);
    let file = pods.scratch().join("big.snap");
    assert_eq!(backup::fetch(&dest, &big.key, &file).await.unwrap(), big);
    verify(&file, &big);

    let (small_pods, _) = member_with_keys(&format!("{tag}-small"), 10, 10).await;
    let small = backup::stream_backup(
        &[small_pods.layout.client_url(0)],
        &cairn_operator::members::Access::default(),
        &dest,
        &dir,
        at(60),
    )
    .await
    .unwrap();
    assert!(small.size < 8 << 20);
    let file = pods.scratch().join("small.snap");
    assert_eq!(
        backup::fetch(&dest, &small.key, &file).await.unwrap(),
        small
    );
    verify(&file, &small);
    assert_eq!(backup::list_backups(&dest, &dir).await.unwrap().len(), 2);

    // Retention, the latest backup, and a damaged object, as on S3.
    let keep = RetentionSpec {
        keep_last: Some(1),
        max_age: None,
    };
    backup::apply_retention(&dest, &dir, &keep, at(120), None)
        .await
        .unwrap();
    let left = backup::list_backups(&dest, &dir).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        !root.join(&big.key).exists() && !root.join(big.key.replace(".snap", ".json")).exists()
    );
    assert_eq!(backup::latest(&dest, &dir).await.unwrap(), small);
    let stored = root.join(&small.key);
    assert!(stored.exists(), "{}", stored.display());
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&stored, bytes).unwrap();
    let refused = pods.scratch().join("refused.snap");
    let err = backup::fetch(&dest, &small.key, &refused)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert!(!refused.exists());
}

/// Azure's configuration (no emulator here): an account and container open with a shared
/// key from a Secret's keys (others in the Secret are ignored), the endpoint given is the one
/// requests go to, and a destination naming no store, or two, is refused with the CRD rule's
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_configuration_and_one_store_per_destination() {
    // A port nothing listens on: the request's failure names where it went.
    let port = crate::ports::free_port();
    let d = BackupDestination {
        azure: Some(AzureDestination {
            account: "devstoreaccount1".into(),
            container: "backups".into(),
            prefix: "p".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}/devstoreaccount1")),
            credentials_secret: Some("azure".into()),
        }),
        ..BackupDestination::default()
    };
    let creds = Credentials::from([
        // Azurite's well-known development key.
        (
            "AZURE_STORAGE_ACCOUNT_KEY".to_string(),
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
                .to_string(),
        ),
        ("AWS_ACCESS_KEY_ID".to_string(), "not-for-azure".to_string()),
    ]);
    let dest = Destination::open(&d, Some(&creds)).unwrap();
    assert_eq!(dest.prefix, "p");
    let err = dest
        .store
        .get(&Path::from("p/x.snap"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // A key that is not base64 is refused when the destination is opened.
    let bad = Credentials::from([(
        "AZURE_STORAGE_ACCOUNT_KEY".to_string(),
        "not base64!".to_string(),
    )]);
    let err = Destination::open(&d, Some(&bad)).unwrap_err().to_string();
    assert!(err.contains("Invalid Access Key"), "{err}");

    let none = BackupDestination::default();
    let err = Destination::open(&none, None).unwrap_err().to_string();
    assert!(
        err.contains("exactly one of s3, gcs, azure and pvc must be given"),
        "{err}"
    );
    let two = BackupDestination {
        s3: Some(S3Destination {
            bucket: "b".into(),
            ..S3Destination::default()
        }),
        ..d.clone()
    };
    let err = Destination::open(&two, None).unwrap_err().to_string();
    assert!(
        err.contains("exactly one of s3, gcs, azure and pvc must be given"),
        "{err}"
    );
}

/// The `pvc` destination's store: `cairn-operator serve-store` on a directory, reached as an
/// object store with its token. The same cycle as the local filesystem's (a multipart upload of
/// two parts joined by the server, a single PUT, listing, retention, download verified, a
/// damaged object refused), then the hostile cases: no token or a wrong one (401), keys that
/// would leave the root or reach the server's own files (400), a completion naming a part never
/// sent (409, nothing written), an aborted upload (its parts gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pvc_store_serves_the_claim_over_http() {
    let (pods, _) = member_with_keys("pvc", 120, 100 << 10).await;
    let root = pods.scratch().join("claim");
    let token = "0123456789abcdef0123456789abcdef";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cairn_operator::store::server::serve(
        root.clone(),
        token.to_string(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let d = BackupDestination {
        pvc: Some(PvcDestination {
            claim_name: "backups".into(),
            prefix: "/etcd/".into(),
        }),
        ..BackupDestination::default()
    };
    let creds = Credentials::from([
        ("CAIRN_STORE_TOKEN".to_string(), token.to_string()),
        ("CAIRN_STORE_URL".to_string(), url.clone()),
    ]);
    let dest = Destination::open(&d, Some(&creds)).unwrap();
    assert_eq!(dest.prefix, "etcd");
    full_cycle(&pods, &dest, &root, "pvc").await;
    // Nothing of the uploads or the writes is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(root.join(".uploads")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    let r = http.get(format!("{url}/list")).send().await.unwrap();
    assert_eq!(status(r), 401);
    let r = http
        .get(format!("{url}/list"))
        .bearer_auth("0123456789abcdef0123456789abcdeX")
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 401);
    let wrong = Credentials::from([
        ("CAIRN_STORE_TOKEN".to_string(), "not the token".to_string()),
        ("CAIRN_STORE_URL".to_string(), url.clone()),
    ]);
    let err = backup::list_backups(&Destination::open(&d, Some(&wrong)).unwrap(), "etcd")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");
    std::fs::write(pods.scratch().join("secret"), "outside").unwrap();
    // Sent as written (an HTTP client library would resolve the dot segments first).
    let addr = url.trim_start_matches("http://").to_string();
    let raw = async |path: &str| {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: store\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    };
    for path in [
        "/o/../secret",
        "/o/a/../../secret",
        "/o/%2E%2E/secret",
        "/o/..%2Fsecret",
        "/o/.uploads/x",
        "/o/a//b",
        "/list/..%2F..",
        "/list/../..",
        "/u/..%2F..%2Fsecret",
    ] {
        let answer = raw(path).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(!answer.contains("outside"), "{path}: {answer}");
    }
    let upload = "0123456789abcdef0123456789abcdef";
    let r = http
        .put(format!("{url}/u/{upload}/2"))
        .bearer_auth(token)
        .body("second")
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 200);
    let r = http
        .post(format!("{url}/u/{upload}"))
        .bearer_auth(token)
        .body(r#"{"to": "etcd/joined", "parts": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 409);
    assert!(!root.join("etcd/joined").exists());
    let r = http
        .delete(format!("{url}/u/{upload}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 204);
    assert!(!root.join(".uploads").join(upload).exists());
    let r = http
        .get(format!("{url}/o/etcd/none"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 404);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
