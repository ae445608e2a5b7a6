//! TLS with rustls: the client port's server side (`--cert-file`, `--key-file`,
//! `--trusted-ca-file`, `--client-cert-auth`, `--cipher-suites`) and the peer
//! port's both sides (the `--peer-*` flags: a member presents its peer
//! certificate as a client too, and verifies the members it calls against the
//! peer CA bundle).
//!
//! The certificate, its key and the CA bundle are read again at the next
//! handshake once any of their files changed (resolved path, modification
//! time, size): Kubernetes updates a mounted Secret by swapping a `..data`
//! symlink, and etcd re-reads the certificate per handshake too. Open
//! connections keep the certificates they were made with. A file that does
//! not load (half written, say) leaves the previous certificates in use.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tracing::warn;

use crate::config::TlsFiles;
use crate::error::{Error, Result};

/// What identifies a file's content without reading it.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            let resolved = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let meta = std::fs::metadata(&resolved).ok();
            (
                resolved,
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            )
        })
        .collect()
}

/// A value loaded from files, loaded again when they change.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T>,
    current: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(paths: Vec<PathBuf>, load: fn(&[PathBuf]) -> Result<T>) -> Result<Self> {
        let st = stamp(&paths);
        let value = load(&paths)?;
        Ok(Self {
            paths,
            load,
            current: Mutex::new((st, Arc::new(value))),
        })
    }

    fn get(&self) -> Arc<T> {
        let st = stamp(&self.paths);
        let mut cur = self.current.lock();
        if cur.0 != st {
            match (self.load)(&self.paths) {
                Ok(v) => *cur = (st, Arc::new(v)),
                Err(e) => {
                    warn!(files = ?self.paths, "TLS files changed but do not load, keeping the previous ones: {e}")
                }
            }
        }
        cur.1.clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Go's names of TLS 1.2 cipher suites (etcd's `--cipher-suites`) that rustls has.
fn tls12_suite(name: &str) -> Option<rustls::SupportedCipherSuite> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// The crypto provider with `--cipher-suites`: the TLS 1.3 suites (Go does not let them be
/// chosen either) and the TLS 1.2 ones named. A name etcd knows but rustls does not have
/// (CBC, RSA key exchange, RC4, 3DES) is refused, as is an unknown one.
fn provider_with(suites: &[String]) -> Result<Arc<rustls::crypto::CryptoProvider>> {
    if suites.is_empty() {
        return Ok(provider());
    }
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    let mut chosen: Vec<rustls::SupportedCipherSuite> = p
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .collect();
    for name in suites {
        let suite = tls12_suite(name).ok_or_else(|| {
            Error::Internal(format!(
                "unexpected TLS cipher suite {name:?} (cairn has the ECDHE suites with AES-GCM or ChaCha20-Poly1305)"
            ))
        })?;
        chosen.push(suite);
    }
    p.cipher_suites = chosen;
    Ok(Arc::new(p))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Internal(format!(
            "{}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(paths: &[PathBuf]) -> Result<CertifiedKey> {
    let chain = certs(&paths[0])?;
    let key = PrivateKeyDer::from_pem_file(&paths[1])
        .map_err(|e| Error::Internal(format!("{}: {e}", paths[1].display())))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        Error::Internal(format!(
            "{} and {}: {e}",
            paths[0].display(),
            paths[1].display()
        ))
    })
}

/// The server certificate, re-read when its files change.
#[derive(Debug)]
struct CertResolver(Reloading<CertifiedKey>);

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reloading({:?})", self.paths)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// The CA bundle at `path` as trust roots.
fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The signature algorithms handshakes are checked with: the provider's, which the webpki
/// verifiers below are built with too. They do not depend on the CA bundle, so checking a
/// handshake signature needs no look at its files.
fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// The verifier of client certificates, rebuilt when the CA bundle changes.
#[derive(Debug)]
struct ClientVerifier {
    inner: Reloading<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
    /// `--peer-cert-allowed-cn`: the only common name let in.
    allowed_cn: Option<String>,
}

/// The subject common name of a DER certificate (the last, if several, as
/// Go's `Subject.CommonName` has it).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().last()?;
    cn.as_str().ok().map(str::to_string)
}

/// etcd's `--peer-cert-allowed-cn` check, on a certificate that verified.
fn check_cn(
    allowed: &Option<String>,
    cert: &CertificateDer<'_>,
) -> std::result::Result<(), rustls::Error> {
    match allowed {
        Some(cn) if common_name(cert.as_ref()).as_ref() != Some(cn) => Err(rustls::Error::General(
            format!("CommonName authentication failed: want {cn:?}"),
        )),
        _ => Ok(()),
    }
}

fn load_verifier(paths: &[PathBuf], mandatory: bool) -> Result<Arc<dyn ClientCertVerifier>> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots(&paths[0])?, provider());
    let builder = if mandatory {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| Error::Internal(format!("{}: {e}", paths[0].display())))
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle may change under us; clients send their certificate without hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .get()
            .verify_client_cert(end_entity, intermediates, now)?;
        check_cn(&self.allowed_cn, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// This member's certificate as a client of other members, re-read when its files change.
#[derive(Debug)]
struct ClientCert(Reloading<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The verifier of the members this one calls, rebuilt when the CA bundle changes.
#[derive(Debug)]
struct ServerVerifier {
    /// None with `--peer-auto-tls`: other members' self-signed certificates are taken
    /// without checking who signed them (etcd's InsecureSkipVerify for self-signed peers);
    /// the handshake's signatures are still checked, so the connection is private, not
    /// authenticated.
    inner: Option<Reloading<Arc<rustls::client::WebPkiServerVerifier>>>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
    allowed_cn: Option<String>,
}

fn load_server_verifier(paths: &[PathBuf]) -> Result<Arc<rustls::client::WebPkiServerVerifier>> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&paths[0])?, provider())
        .build()
        .map_err(|e| Error::Internal(format!("{}: {e}", paths[0].display())))
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        let verified = inner.get().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_cn(&self.allowed_cn, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Makes the self-signed certificate and key of `--auto-tls`/`--peer-auto-tls` unless both
/// files are there already (kept across restarts, as etcd keeps them): ECDSA P-256, the
/// listen hosts as names, server and client use, valid `--self-signed-cert-validity` years.
pub fn ensure_self_signed(t: &TlsFiles, made: &crate::config::SelfSigned) -> Result<()> {
    if t.cert_file.exists() && t.key_file.exists() {
        return Ok(());
    }
    let fail = |e: &dyn std::fmt::Display| {
        Error::Internal(format!("cannot make a self-signed certificate: {e}"))
    };
    let mut params = rcgen::CertificateParams::new(made.hosts.clone()).map_err(|e| fail(&e))?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::OrganizationName, "etcd");
    params.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now
        .checked_add(time::Duration::days(365 * i64::from(made.validity_years)))
        .ok_or_else(|| fail(&"--self-signed-cert-validity is too far"))?;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let cert = params.self_signed(&key).map_err(|e| fail(&e))?;
    let dir = t.cert_file.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(&e))?;
    // Each file whole or not at all, the certificate last: a crash leaves
    // no half-written pair that later starts would take as made.
    write_private(&t.key_file, key.serialize_pem().as_bytes()).map_err(|e| fail(&e))?;
    write_private(&t.cert_file, cert.pem().as_bytes()).map_err(|e| fail(&e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(&e))?;
    tracing::info!(cert = %t.cert_file.display(), "created a self-signed certificate");
    Ok(())
}

/// Writes a file only its owner can read: to a temporary name, synced, then
/// renamed over `path`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// How this member calls others over TLS (`--peer-*`): it checks them against the peer CA
/// bundle and presents its peer certificate, both re-read when their files change.
pub fn client_config(t: &TlsFiles) -> Result<Arc<rustls::ClientConfig>> {
    let cert = ClientCert(Reloading::new(
        vec![t.cert_file.clone(), t.key_file.clone()],
        load_key,
    )?);
    let builder = rustls::ClientConfig::builder_with_provider(provider_with(&t.cipher_suites)?)
        .with_safe_default_protocol_versions()
        .map_err(Error::internal)?
        .dangerous();
    let inner = if t.self_signed.is_some() {
        None
    } else {
        let ca = t.trusted_ca_file.clone().ok_or_else(|| {
            Error::Internal(
                "TLS between members needs --peer-trusted-ca-file (the CA that members' certificates are verified against)".into(),
            )
        })?;
        Some(Reloading::new(vec![ca], load_server_verifier)?)
    };
    let verifier = ServerVerifier {
        inner,
        algs: algorithms(),
        allowed_cn: t.allowed_cn.clone(),
    };
    let mut config = builder
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(cert));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A member's TLS configurations, made once when it starts: a missing or bad file or an
/// unknown cipher suite stops it there, as etcd does.
pub struct MemberTls {
    /// The client port's, for its `https://` URLs.
    pub client: Option<Arc<rustls::ServerConfig>>,
    /// The peer port's, for its `https://` URLs.
    pub peer: Option<Arc<rustls::ServerConfig>>,
    /// Calling other members at `https://` peer URLs.
    pub peer_client: Option<Arc<rustls::ClientConfig>>,
}

impl MemberTls {
    pub fn load(cfg: &crate::config::Config) -> Result<Self> {
        for t in [&cfg.client_tls, &cfg.peer_tls].into_iter().flatten() {
            if let Some(made) = &t.self_signed {
                ensure_self_signed(t, made)?;
            }
        }
        let peer = cfg.peer_tls.as_ref();
        Ok(Self {
            client: cfg.client_tls.as_ref().map(server_config).transpose()?,
            peer: peer.map(server_config).transpose()?,
            peer_client: peer.map(client_config).transpose()?,
        })
    }
}

/// The client port's TLS configuration: HTTP/2 and HTTP/1.1 (gRPC, the gateway, /health).
pub fn server_config(t: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let resolver = CertResolver(Reloading::new(
        vec![t.cert_file.clone(), t.key_file.clone()],
        load_key,
    )?);
    let builder = rustls::ServerConfig::builder_with_provider(provider_with(&t.cipher_suites)?)
        .with_safe_default_protocol_versions()
        .map_err(Error::internal)?;
    let builder = match &t.trusted_ca_file {
        Some(ca) => {
            let load: fn(&[PathBuf]) -> Result<Arc<dyn ClientCertVerifier>> = if t.client_cert_auth
            {
                |p| load_verifier(p, true)
            } else {
                |p| load_verifier(p, false)
            };
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                inner: Reloading::new(vec![ca.clone()], load)?,
                mandatory: t.client_cert_auth,
                algs: algorithms(),
                allowed_cn: t.allowed_cn.clone(),
            }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_suites_by_go_name() {
        let p = provider_with(&["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".into()]).unwrap();
        let tls12: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            vec![rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]
        );
        assert!(p
            .cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13));
        for bad in ["TLS_RSA_WITH_AES_128_CBC_SHA", "NOT_A_SUITE"] {
            let e = provider_with(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("unexpected TLS cipher suite"), "{e}");
        }
        assert_eq!(
            provider_with(&[]).unwrap().cipher_suites.len(),
            provider().cipher_suites.len()
        );
    }
}
