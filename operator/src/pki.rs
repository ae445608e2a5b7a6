//! Certificates the operator makes itself, for TLS managed in its `Operator` mode: a CA per
//! cluster, the members' certificate (presented to clients and, both ways, to peers, so it has
//! the serverAuth and clientAuth usages), client certificates (the operator's own, one for
//! users), when each is due for renewal, and the CA bundle members trust while a CA is replaced.
//! Pure: PEM in, PEM out, times passed in; `tls` decides when each is made.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::layout::Names;

/// Errors of making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("making a certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error("reading a certificate: {0}")]
    Read(String),
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// What a certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Profile {
    /// A member: its DNS names and addresses; serverAuth and clientAuth.
    Member { dns: Vec<String>, ips: Vec<IpAddr> },
    /// A client: the common name is its etcd user (with `--client-cert-auth`).
    Client { common_name: String },
}

fn time_of(t: Timestamp) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| Error::Read(format!("time {t}: {e}")))
}

fn validity(
    params: &mut CertificateParams,
    now: Timestamp,
    lifetime: Duration,
) -> Result<(), Error> {
    // A minute of slack for clocks that lag the operator's.
    let from = now
        .checked_sub(jiff::SignedDuration::from_secs(60))
        .map_err(|e| Error::Read(format!("time {now}: {e}")))?;
    let until = jiff::SignedDuration::try_from(lifetime)
        .ok()
        .and_then(|l| now.checked_add(l).ok())
        .ok_or_else(|| {
            Error::Read(format!(
                "a lifetime of {lifetime:?} from {now} is out of range"
            ))
        })?;
    params.not_before = time_of(from)?;
    params.not_after = time_of(until)?;
    let serial: [u8; 16] = rand::random();
    params.serial_number = Some(serial.to_vec().into());
    Ok(())
}

/// A new CA for `cluster`, valid from `now` for `lifetime`.
pub fn new_ca(cluster: &str, now: Timestamp, lifetime: Duration) -> Result<Pair, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cairn");
    // The issue time and a random tag in the name: a CA and the one that replaces it (even
    // within the same second) differ by name too, which `signed_by` relies on.
    let tag: u32 = rand::random();
    dn.push(
        DnType::CommonName,
        format!("{cluster} CA {} {tag:08x}", now.strftime("%Y%m%dT%H%M%SZ")),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, now, lifetime)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A certificate for `profile` signed by `ca`, valid from `now` for `lifetime`.
pub fn issue(
    ca: &Pair,
    profile: &Profile,
    now: Timestamp,
    lifetime: Duration,
) -> Result<Pair, Error> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cairn");
    match profile {
        Profile::Member { dns, ips } => {
            dn.push(DnType::CommonName, dns.first().cloned().unwrap_or_default());
            let mut sans = Vec::new();
            for d in dns {
                sans.push(SanType::DnsName(d.clone().try_into()?));
            }
            sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
            params.subject_alt_names = sans;
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Profile::Client { common_name } => {
            dn.push(DnType::CommonName, common_name.clone());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now, lifetime)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The names a cluster's member certificate serves: every member's pod DNS name (one wildcard
/// under the peer Service, so members added later are covered), the client Service's names,
/// and localhost.
pub fn member_profile(names: &Names) -> Profile {
    let ns = &names.namespace;
    let peer = names.peer_service();
    let client = names.client_service();
    let mut dns = Vec::new();
    for suffix in ["svc", "svc.cluster.local"] {
        dns.push(format!("*.{peer}.{ns}.{suffix}"));
    }
    dns.push(client.clone());
    dns.push(format!("{client}.{ns}"));
    for suffix in ["svc", "svc.cluster.local"] {
        dns.push(format!("{client}.{ns}.{suffix}"));
    }
    dns.push("localhost".to_string());
    Profile::Member {
        dns,
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
    }
}

/// When the first certificate of a PEM is valid from and until.
pub fn valid_between(cert_pem: &str) -> Result<(Timestamp, Timestamp), Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| Error::Read(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| Error::Read(e.to_string()))?;
    let v = cert.validity();
    let at = |t: &x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|e| Error::Read(e.to_string()))
    };
    Ok((at(&v.not_before)?, at(&v.not_after)?))
}

/// The certificates of a PEM bundle that parse, as PEM (a CA bundle with a broken entry still
/// trusts the others, as Go's `AppendCertsFromPEM` does).
pub fn clean_bundle(pem: &str) -> String {
    let mut out = String::new();
    let mut rest = pem.as_bytes();
    while let Ok((left, block)) = x509_parser::pem::parse_x509_pem(rest) {
        if block.label == "CERTIFICATE" && block.parse_x509().is_ok() {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = base64_lines(&block.contents);
            out.push_str(&b64);
            out.push_str("-----END CERTIFICATE-----\n");
        }
        if left.len() == rest.len() {
            break;
        }
        rest = left;
    }
    out
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::new();
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Whether `key_pem` is the private key of the first certificate of `cert_pem`.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// Whether the first certificate of `cert_pem` names the subject of `ca_pem`'s as its issuer
/// (CAs made here differ by name, so this tells which CA signed).
pub fn signed_by(cert_pem: &str, ca_pem: &str) -> bool {
    let raw = |pem: &str, issuer: bool| -> Option<Vec<u8>> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let name = if issuer {
            cert.issuer()
        } else {
            cert.subject()
        };
        Some(name.as_raw().to_vec())
    };
    match (raw(cert_pem, true), raw(ca_pem, false)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// When a certificate valid between `from` and `until` is renewed: after `fraction` of its
/// lifetime (the default two thirds leaves a third of it to notice and fix a failed renewal).
pub fn renew_at(from: Timestamp, until: Timestamp, fraction: f64) -> Timestamp {
    let life = until.duration_since(from).as_secs_f64().max(0.0);
    let after = jiff::SignedDuration::from_secs_f64(life * fraction.clamp(0.0, 1.0));
    from + after
}

/// Whether `cert_pem` is due for renewal at `now` (an unreadable certificate is).
pub fn due(cert_pem: &str, now: Timestamp, fraction: f64) -> bool {
    match valid_between(cert_pem) {
        Ok((from, until)) => now >= renew_at(from, until, fraction),
        Err(_) => true,
    }
}

/// The CA bundle members trust: the current CA and, while a replaced one's certificates may
/// still be presented, the previous one.
pub fn bundle(current: &Pair, previous: Option<&Pair>) -> String {
    let mut out = current.cert.trim_end().to_string();
    out.push('\n');
    if let Some(p) = previous {
        out.push_str(p.cert.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    /// `openssl` on files in a temporary directory: its output, and whether it succeeded.
    fn openssl(files: &[(&str, &str)], args: &[&str]) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args(args)
            .output()
            .expect("openssl (tests/deps.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "prod".into(),
        }
    }

    #[test]
    fn member_certificates_chain_to_the_cluster_ca_and_name_every_member() {
        let now = Timestamp::now();
        let ca = new_ca("demo", now, 365 * DAY).unwrap();
        let member = issue(&ca, &member_profile(&names()), now, 90 * DAY).unwrap();
        let (ok, out) = openssl(
            &[("ca.crt", &ca.cert), ("m.crt", &member.cert)],
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-purpose",
                "sslserver",
                "m.crt",
            ],
        );
        assert!(ok, "{out}");
        let (ok, out) = openssl(
            &[("ca.crt", &ca.cert), ("m.crt", &member.cert)],
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-purpose",
                "sslclient",
                "m.crt",
            ],
        );
        assert!(ok, "{out}");
        let (_, text) = openssl(
            &[("m.crt", &member.cert)],
            &["x509", "-noout", "-text", "-in", "m.crt"],
        );
        for san in [
            "DNS:*.demo-peer.prod.svc",
            "DNS:*.demo-peer.prod.svc.cluster.local",
            "DNS:demo.prod.svc",
            "DNS:demo.prod.svc.cluster.local",
            "DNS:localhost",
            "IP Address:127.0.0.1",
        ] {
            assert!(text.contains(san), "{san} missing:\n{text}");
        }
        // The pod names the wildcard stands for, checked by openssl's host matching.
        let (ok, out) = openssl(
            &[("ca.crt", &ca.cert), ("m.crt", &member.cert)],
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-verify_hostname",
                "demo-7.demo-peer.prod.svc",
                "m.crt",
            ],
        );
        assert!(ok, "{out}");
        let (ok, _) = openssl(
            &[("ca.crt", &ca.cert), ("m.crt", &member.cert)],
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-verify_hostname",
                "demo-7.other-peer.prod.svc",
                "m.crt",
            ],
        );
        assert!(!ok);
        // The key is the certificate's.
        let (_, a) = openssl(
            &[("m.crt", &member.cert)],
            &["x509", "-noout", "-pubkey", "-in", "m.crt"],
        );
        let (_, b) = openssl(
            &[("m.key", &member.key)],
            &["pkey", "-pubout", "-in", "m.key"],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn client_certificates_carry_the_user_and_only_client_auth() {
        let now = Timestamp::now();
        let ca = new_ca("demo", now, 365 * DAY).unwrap();
        let c = issue(
            &ca,
            &Profile::Client {
                common_name: "root".into(),
            },
            now,
            30 * DAY,
        )
        .unwrap();
        let files = [("ca.crt", ca.cert.as_str()), ("c.crt", c.cert.as_str())];
        let (ok, out) = openssl(
            &files,
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-purpose",
                "sslclient",
                "c.crt",
            ],
        );
        assert!(ok, "{out}");
        let (ok, _) = openssl(
            &files,
            &[
                "verify",
                "-CAfile",
                "ca.crt",
                "-purpose",
                "sslserver",
                "c.crt",
            ],
        );
        assert!(!ok, "a client certificate must not serve");
        let (_, subject) = openssl(&files, &["x509", "-noout", "-subject", "-in", "c.crt"]);
        assert!(
            subject.contains("CN = root") || subject.contains("CN=root"),
            "{subject}"
        );
    }

    #[test]
    fn another_ca_is_not_trusted_but_the_bundle_trusts_both_during_a_rollover() {
        let now = Timestamp::now();
        let old = new_ca("demo", now, 365 * DAY).unwrap();
        let new = new_ca("demo", now + jiff::SignedDuration::from_secs(1), 365 * DAY).unwrap();
        assert_ne!(old.cert, new.cert);
        let m_old = issue(&old, &member_profile(&names()), now, 90 * DAY).unwrap();
        let m_new = issue(&new, &member_profile(&names()), now, 90 * DAY).unwrap();
        let both = bundle(&new, Some(&old));
        for (ca, cert, want) in [
            (new.cert.as_str(), m_old.cert.as_str(), false),
            (new.cert.as_str(), m_new.cert.as_str(), true),
            (both.as_str(), m_old.cert.as_str(), true),
            (both.as_str(), m_new.cert.as_str(), true),
        ] {
            let (ok, out) = openssl(
                &[("ca.crt", ca), ("m.crt", cert)],
                &["verify", "-CAfile", "ca.crt", "m.crt"],
            );
            assert_eq!(ok, want, "{out}");
        }
        assert_eq!(bundle(&new, None).matches("BEGIN CERTIFICATE").count(), 1);
    }

    #[test]
    fn renewal_falls_at_two_thirds_of_the_lifetime_by_default() {
        let now = at(1_700_000_000);
        let ca = new_ca("demo", now, 365 * DAY).unwrap();
        let m = issue(&ca, &member_profile(&names()), now, 90 * DAY).unwrap();
        let (from, until) = valid_between(&m.cert).unwrap();
        assert_eq!(from, now - jiff::SignedDuration::from_secs(60));
        assert_eq!(until, now + jiff::SignedDuration::from_secs(90 * 86_400));
        let at_two_thirds = renew_at(from, until, 2.0 / 3.0);
        assert_eq!(
            at_two_thirds,
            from + jiff::SignedDuration::from_secs(40 + 60 * 86_400)
        );
        assert!(!due(
            &m.cert,
            now + jiff::SignedDuration::from_secs(59 * 86_400),
            2.0 / 3.0
        ));
        assert!(due(
            &m.cert,
            now + jiff::SignedDuration::from_secs(61 * 86_400),
            2.0 / 3.0
        ));
        assert!(due("not a certificate", now, 2.0 / 3.0));
    }
}
