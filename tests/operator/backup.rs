//! Backups against a real S3-compatible server (moto) and real cairn members: snapshots
//! streamed into multipart uploads with their checksum, manifests, retention that deletes only
//! this cluster's backups, a failed upload, a corrupted object refused, and a restore that gives
//! back the same keys, values, revisions and HashKV.

use std::process::Command;

use cairn_operator::backup::{self, Error};
use cairn_operator::crd::RetentionSpec;
use cairn_operator::layout::Layout;
use jiff::Timestamp;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::cluster::{cairn_binary, key_states, wait_leader, Pods};
use crate::s3::Moto;

async fn write_keys(pods: &Pods, n: usize) -> i64 {
    let mut c = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    let mut rev = 0;
    for i in 0..n {
        let r = c
            .put(format!("key/{i:04}"), format!("value-{i}"), None)
            .await
            .unwrap();
        rev = r.header().unwrap().revision();
    }
    c.delete("key/0000", None).await.unwrap();
    rev + 1
}

async fn one_member(name: &str) -> Pods {
    let mut pods = Pods::new(name);
    pods.bootstrap(1);
    wait_leader(&pods).await;
    pods
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_land_with_checksums_and_retention_prunes_only_ours() {
    let moto = Moto::start();
    moto.create_bucket("backups");
    let dest = moto.open("backups", "team/etcd");
    let pods = one_member("bk").await;
    let revision = write_keys(&pods, 200).await;
    let dir = dest.cluster_dir("db", "bk", "uid-1");
    assert_eq!(dir, "team/etcd/db/bk/uid-1");
    let endpoints = vec![pods.layout.client_url(0)];

    let mut records = Vec::new();
    for i in 0..4 {
        records.push(
            backup::stream_backup(
                &endpoints,
                &cairn_operator::members::Access::default(),
                &dest,
                &dir,
                at(i * 60),
            )
            .await
            .unwrap(),
        );
    }
    let first = &records[0];
    assert_eq!(
        first.revision, revision,
        "the record names the snapshot's revision"
    );
    // The object is exactly what the record says.
    let body = dest
        .store
        .get(&Path::from(first.key.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as i64, first.size);
    let sum: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sum, first.sha256);
    assert_eq!(backup::record(&dest, &first.key).await.unwrap(), *first);

    // Objects that are not this cluster's backups, next to them and elsewhere under the prefix.
    let foreign = [
        format!("{dir}/notes.txt"),
        format!("{dir}/20200101T000000Z.snap.bak"),
        "team/etcd/db/bk/uid-0/20200101T000000Z.snap".to_string(),
        "team/etcd/20200101T000000Z.snap".to_string(),
    ];
    for k in &foreign {
        dest.store
            .put(
                &Path::from(k.as_str()),
                PutPayload::from_static(b"not ours"),
            )
            .await
            .unwrap();
    }
    let keep2 = RetentionSpec {
        keep_last: Some(2),
        max_age: None,
    };
    let deleted = backup::apply_retention(&dest, &dir, &keep2, at(300), None)
        .await
        .unwrap();
    assert_eq!(
        deleted,
        vec![records[0].key.clone(), records[1].key.clone()]
    );
    let left: Vec<String> = backup::list_backups(&dest, &dir)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, vec![records[2].key.clone(), records[3].key.clone()]);
    for k in &foreign {
        assert!(
            dest.store.head(&Path::from(k.as_str())).await.is_ok(),
            "{k} was deleted"
        );
    }
    // Manifests went with their snapshots.
    assert!(matches!(
        backup::record(&dest, &records[0].key).await,
        Err(Error::NoManifest(_))
    ));
    // The latest backup under the prefix is the newest one of ours (foreign objects have no
    // manifest and are older).
    assert_eq!(
        backup::latest(&dest, "team/etcd/db/bk/uid-1")
            .await
            .unwrap(),
        records[3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_is_an_error_and_the_next_one_works() {
    let mut moto = Moto::start();
    moto.create_bucket("bkt");
    let pods = one_member("fail").await;
    write_keys(&pods, 10).await;
    let endpoints = vec![pods.layout.client_url(0)];
    let dest = moto.open("bkt", "");
    moto.stop();
    let err = backup::stream_backup(
        &endpoints,
        &cairn_operator::members::Access::default(),
        &dest,
        "x",
        at(0),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err}");
    moto.restart();
    moto.create_bucket("bkt");
    backup::stream_backup(
        &endpoints,
        &cairn_operator::members::Access::default(),
        &dest,
        "x",
        at(1),
    )
    .await
    .unwrap();
    // No member answers: a clear error too.
    let err = backup::stream_backup(
        &["http://127.0.0.1:1".into()],
        &cairn_operator::members::Access::default(),
        &dest,
        "x",
        at(2),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Snapshot { .. } | Error::NoMember(_)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_gives_back_the_same_data_and_a_corrupted_backup_is_refused() {
    let moto = Moto::start();
    moto.create_bucket("bkt");
    let dest = moto.open("bkt", "p");
    let pods = one_member("src").await;
    let revision = write_keys(&pods, 300).await;
    let rec = backup::stream_backup(
        &[pods.layout.client_url(0)],
        &cairn_operator::members::Access::default(),
        &dest,
        "p/ns/src/u",
        at(0),
    )
    .await
    .unwrap();

    // Download, verified; cairn reads the same revision from the file.
    let file = pods.scratch().join("fetched.snap");
    assert_eq!(backup::fetch(&dest, &rec.key, &file).await.unwrap(), rec);
    let status = Command::new(cairn_binary())
        .args(["snapshot", "status", file.to_str().unwrap(), "-w", "json"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("\"revision\":{revision},")),
        "{status}"
    );

    // Restore into a new one-member cluster and compare everything.
    let mut restored = Pods::new("dst");
    let data = restored.data_dir(0);
    let l = &restored.layout;
    let out = Command::new(cairn_binary())
        .args(["snapshot", "restore", file.to_str().unwrap()])
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--name={}", l.member(0)))
        .arg(format!(
            "--initial-cluster={}={}",
            l.member(0),
            l.peer_url(0)
        ))
        .arg("--initial-cluster-token=operator-test")
        .arg(format!("--initial-advertise-peer-urls={}", l.peer_url(0)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    restored.bootstrap(1);
    let mut a = etcd_client::Client::connect([pods.layout.client_url(0)], None)
        .await
        .unwrap();
    let mut b = etcd_client::Client::connect([restored.layout.client_url(0)], None)
        .await
        .unwrap();
    let opts = || Some(etcd_client::GetOptions::new().with_all_keys());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (ra, rb) = loop {
        if let Ok(rb) = b.get("", opts()).await {
            break (a.get("", opts()).await.unwrap(), rb);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restored member did not serve"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(ra.kvs().len(), 299);
    assert_eq!(
        key_states(&ra),
        key_states(&rb),
        "keys, values, create/mod revisions, versions"
    );
    assert_eq!(rb.header().unwrap().revision(), revision);
    let (ha, hb) = (
        a.hash_kv(revision).await.unwrap(),
        b.hash_kv(revision).await.unwrap(),
    );
    assert_eq!(ha.hash(), hb.hash(), "HashKV at revision {revision}");
    assert_ne!(
        ra.header().unwrap().cluster_id(),
        rb.header().unwrap().cluster_id(),
        "a restore starts a new cluster"
    );

    // A corrupted object is refused and leaves no file to restore from.
    crate::s3::corrupt(&dest, &rec.key, 1000, 0x01).await;
    let bad = pods.scratch().join("bad.snap");
    let err = backup::fetch(&dest, &rec.key, &bad).await.unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert!(!bad.exists() && !bad.with_extension("part").exists());
}

/// Client-side encryption and S3 server-side encryption, against moto and a real member: a
/// sealed backup holds none of the member's values in the store, its manifest names the key,
/// and it comes back (opened) byte for byte as the unsealed snapshot would (cairn reads the
/// same revision and keys from it, `cairn snapshot verify` passes); the wrong key, no key, or a
/// damaged object is refused and leaves no file. With `serverSideEncryption` the store is
/// asked to encrypt what it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_backups_open_only_with_their_key_and_sse_is_asked_for() {
    use cairn_operator::seal::BackupKey;
    let moto = Moto::start();
    moto.create_bucket("sealed");
    let key = BackupKey::parse("k-2026", &[5u8; 32]).unwrap();
    let mut d = moto.destination("sealed", "p");
    d.s3.as_mut().unwrap().server_side_encryption =
        Some(cairn_operator::crd::ServerSideEncryption {
            kind: "AES256".into(),
            kms_key_id: None,
        });
    let dest = backup::Destination::open(&d, Some(&crate::s3::credentials()))
        .unwrap()
        .with_key(Some(key.clone()));
    let pods = one_member("seal").await;
    let revision = write_keys(&pods, 300).await;
    let rec = backup::stream_backup(
        &[pods.layout.client_url(0)],
        &cairn_operator::members::Access::default(),
        &dest,
        "p/ns/seal/u",
        at(0),
    )
    .await
    .unwrap();
    assert_eq!(rec.encryption_key_id.as_deref(), Some("k-2026"));
    assert_eq!(
        backup::record(&dest, &rec.key).await.unwrap(),
        rec,
        "the manifest names the key"
    );
    let stored = dest
        .store
        .get(&Path::from(rec.key.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(stored.starts_with(cairn_operator::seal::MAGIC));
    assert!(
        !stored.windows(b"value-12".len()).any(|w| w == b"value-12"),
        "no value in the clear"
    );
    assert_eq!(
        format!("{:x}", Sha256::digest(&stored)),
        rec.sha256,
        "the record's SHA-256 is the stored object's"
    );
    // Server-side encryption was asked for: moto answers with the header (to a signed HEAD:
    // an object written by one PUT is not public).
    let head = Command::new("curl")
        .args([
            "-sI",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "testing:testing",
            &format!("{}/sealed/{}", moto.url(), rec.key),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_lowercase();
    assert!(
        head.contains("x-amz-server-side-encryption: aes256"),
        "{head}"
    );

    // Opened with its key: a snapshot cairn reads and verifies.
    let file = pods.scratch().join("opened.snap");
    assert_eq!(backup::fetch(&dest, &rec.key, &file).await.unwrap(), rec);
    let verify = Command::new(cairn_binary())
        .args(["snapshot", "verify", file.to_str().unwrap()])
        .arg(format!("--revision={}", rec.revision))
        .arg(format!("--keys={}", rec.keys.unwrap()))
        .arg(format!("--hash={}", rec.hash.unwrap()))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    assert_eq!(rec.revision, revision);
    assert!(!file.with_extension("sealed").exists());

    // The wrong key, no key, a damaged object: refused, no file left.
    let out = pods.scratch().join("refused.snap");
    let other = dest
        .clone()
        .with_key(Some(BackupKey::parse("k-2027", &[5u8; 32]).unwrap()));
    let err = backup::fetch(&other, &rec.key, &out).await.unwrap_err();
    assert!(
        err.to_string().contains("sealed with key \"k-2026\""),
        "{err}"
    );
    let none = dest.clone().with_key(None);
    let err = backup::fetch(&none, &rec.key, &out).await.unwrap_err();
    assert!(err.to_string().contains("no key was given"), "{err}");
    let same_id_wrong_bytes = dest
        .clone()
        .with_key(Some(BackupKey::parse("k-2026", &[6u8; 32]).unwrap()));
    let err = backup::fetch(&same_id_wrong_bytes, &rec.key, &out)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not decrypt"), "{err}");
    crate::s3::corrupt(&dest, &rec.key, 5000, 0x01).await;
    let err = backup::fetch(&dest, &rec.key, &out).await.unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    for f in [
        out.clone(),
        out.with_extension("part"),
        out.with_extension("sealed"),
    ] {
        assert!(!f.exists(), "{} left behind", f.display());
    }
}
