//! A real S3-compatible server for the tests: moto's `moto_server` (PyPI), on a free loopback
//! port, in memory. It can be stopped and started again on the same port (its content is then
//! gone) to test failed uploads.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_operator::backup::{Credentials, Destination};
use cairn_operator::crd::{BackupDestination, S3Destination};

pub struct Moto {
    pub port: u16,
    child: Option<Child>,
}

impl Moto {
    pub fn start() -> Moto {
        let port = crate::ports::free_port();
        let mut m = Moto { port, child: None };
        m.restart();
        m
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server; it comes back empty.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]')");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates a bucket (path-style PUT, as any S3 client would).
    pub fn create_bucket(&self, bucket: &str) {
        let out = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", self.url())])
            .output()
            .unwrap();
        assert!(out.status.success(), "create bucket: {out:?}");
    }

    pub fn destination(&self, bucket: &str, prefix: &str) -> BackupDestination {
        BackupDestination {
            s3: Some(S3Destination {
                bucket: bucket.into(),
                prefix: prefix.into(),
                region: Some("us-east-1".into()),
                endpoint: Some(self.url()),
                force_path_style: true,
                ..S3Destination::default()
            }),
            ..BackupDestination::default()
        }
    }

    pub fn open(&self, bucket: &str, prefix: &str) -> Destination {
        Destination::open(&self.destination(bucket, prefix), Some(&credentials())).unwrap()
    }
}

/// moto accepts any credentials.
pub fn credentials() -> Credentials {
    Credentials::from([
        ("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()),
    ])
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Corrupts a stored object: flips bits of the byte at `at`.
pub async fn corrupt(dest: &Destination, key: &str, at: usize, mask: u8) {
    use object_store::{ObjectStoreExt, PutPayload};
    let path = object_store::path::Path::from(key);
    let mut bytes = dest
        .store
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[at] ^= mask;
    dest.store
        .put(&path, PutPayload::from(bytes))
        .await
        .unwrap();
}
