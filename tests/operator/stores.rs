//! Backup destinations other than S3: object_store's local filesystem store with real cairn
//! members (the store-independent path: multipart and single-PUT uploads, listing, download,
//! verification), and the configuration of `gcs` and `azure`. No emulator object_store can
//! talk to installs here: object_store speaks GCS's XML API while the PyPI emulator
//! (`gcp-storage-emulator`) serves the JSON API (its XML PUT answers without the ETag
//! object_store requires, and it has no XML listing or DELETE); Azurite is an npm package.

use std::process::Command;

use cairn_operator::backup::{self, Credentials, Destination, Error};
use cairn_operator::crd::{
    AzureDestination, BackupDestination, GcsDestination, RetentionSpec, S3Destination,
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
    let dir = dest.cluster_dir("db", "local", "uid");
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

    let (small_pods, _) = member_with_keys("local-small", 10, 10).await;
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
        err.contains("exactly one of s3, gcs and azure must be given"),
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
        err.contains("exactly one of s3, gcs and azure must be given"),
        "{err}"
    );
}
