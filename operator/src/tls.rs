//! TLS, managed (`spec.tls`): which Secrets hold each side's certificates, what a member pod
//! serves ([`Serving`], its flags and mounts, read back from a pod), how a live cluster moves
//! its peer traffic to TLS or back without losing quorum ([`next_peer`]), and, in `Operator`
//! mode, when the cluster's CA and certificates are made, renewed and rolled over
//! ([`next_ca`], [`next_leaf`]). Pure: the controller reads Secrets and pods, this decides, the
//! controller writes.
//!
//! The peer migration, member by member (cairn's `--experimental-peer-accept-plaintext` makes
//! it possible): every member is restarted onto a template whose peer port serves TLS and
//! plaintext; once every pod runs it, each member's peer URL is changed to `https://` with
//! MemberUpdate (peers then call it over TLS); once all are, the members are restarted onto a
//! template without plaintext. Turning TLS off runs the same steps backwards; a change of the
//! peer Secret (another mode) goes through plaintext peer URLs, since members on the old and
//! the new certificates would not trust each other. A new CA behind the same Secret (a user's
//! `Secret` mode, a cert-manager issuer's CA) is not detected: it must overlap, the old CA
//! kept in `ca.crt` until every member has the new certificate, as `Operator` mode does.
//! Restarts are the rollout's (`rollout`): one member at a time, the others healthy and caught
//! up; template changes wait while a membership step is under way.
//!
//! The CA rollover (`Operator` mode; clients and peers have a CA each, so that a client
//! certificate does not get a client onto the peer port): a CA past its renewal time is
//! replaced by a new one, and the old one stays in every trust bundle (`ca.crt`) until it
//! expires; certificates are reissued by the new CA only [`CA_PROPAGATION`] later, once the
//! kubelet has put the new bundle into every pod (members re-read their files at the next
//! handshake, no restart). Until then a certificate due for renewal is signed by the previous
//! CA. A CA Secret lost or broken is made again the same way, the bundle members trust kept
//! as the previous CA.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodSpec;

use crate::crd::{TlsMode, TlsSide, TlsSpec};
use crate::layout::{Names, CLIENT_PORT, METRICS_PORT, PEER_PORT};
use crate::pki::{self, Pair, Profile};

/// Where the Secrets are mounted in a member's container.
pub const MOUNT: &str = "/etc/cairn/tls";
/// The volume of the client side's Secret (mounted at `MOUNT/client`).
pub const CLIENT_VOLUME: &str = "tls-client";
/// The volume of the peer side's Secret (mounted at `MOUNT/peer`).
pub const PEER_VOLUME: &str = "tls-peer";
/// cairn's flag that has an `https://` peer URL take plaintext connections too.
pub const PEER_PLAINTEXT_FLAG: &str = "--experimental-peer-accept-plaintext";
/// The common name of the operator's client certificate: no etcd user, so the certificate
/// alone grants nothing once auth is on (the operator calls as root with root's password).
pub const OPERATOR_CN: &str = "cairn-operator";
/// How long after a CA rollover certificates are reissued by the new CA: the kubelet updates a
/// mounted Secret within its sync period plus its cache's TTL (a minute each by default).
pub const CA_PROPAGATION: Duration = Duration::from_secs(300);

/// Keys of a certificate Secret (the `kubernetes.io/tls` keys plus cert-manager's `ca.crt`).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
/// Keys of the CA Secret (`Operator` mode): the current CA, the previous one while it is still
/// trusted, and when the current one replaced it.
pub const CA_KEY: &str = "ca.key";
pub const PREVIOUS_CRT: &str = "previous.crt";
pub const PREVIOUS_KEY: &str = "previous.key";
pub const ROTATED_AT: &str = "rotated-at";

/// A Secret's data, as text.
pub type Data = BTreeMap<String, String>;

/// The two sides of a member's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Clients, on port 2379: the members' certificate is a server certificate there.
    Client,
    /// Peers, on port 2380.
    Peer,
}

impl Side {
    fn word(self) -> &'static str {
        match self {
            Side::Client => "server",
            Side::Peer => "peer",
        }
    }
}

fn mode_suffix(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::CertManager => "-cm",
        _ => "",
    }
}

/// The Secret that holds a side's member certificate. `Operator` and `CertManager` modes use
/// different names, so that a change of mode is a change of Secret (and of CA).
pub fn side_secret(names: &Names, side: Side, s: &TlsSide) -> Result<String, String> {
    match s.mode {
        TlsMode::Secret => s.secret_name.clone().ok_or_else(|| {
            format!(
                "spec.tls.{}.secretName is required in Secret mode",
                if side == Side::Client {
                    "client"
                } else {
                    "peer"
                }
            )
        }),
        mode => Ok(format!(
            "{}-{}{}-tls",
            names.cluster,
            side.word(),
            mode_suffix(mode)
        )),
    }
}

/// The Secret with the operator's own client certificate: made in `Operator` and `CertManager`
/// modes; in `Secret` mode the operator presents the members' certificate of the client side.
pub fn operator_secret(names: &Names, client: &TlsSide) -> Result<String, String> {
    match client.mode {
        TlsMode::Secret => side_secret(names, Side::Client, client),
        mode => Ok(format!(
            "{}-operator{}-tls",
            names.cluster,
            mode_suffix(mode)
        )),
    }
}

/// The Secret with a client certificate for users (none in `Secret` mode: users have theirs).
pub fn users_secret(names: &Names, client: &TlsSide) -> Option<String> {
    match client.mode {
        TlsMode::Secret => None,
        mode => Some(format!("{}-client{}-tls", names.cluster, mode_suffix(mode))),
    }
}

/// The common name of the users' client certificate.
pub fn users_cn(names: &Names) -> String {
    format!("{}-client", names.cluster)
}

/// What `spec.tls` asks for: the Secret of each side that serves TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub client: Option<String>,
    pub peer: Option<String>,
    pub client_cert_auth: bool,
}

impl Wanted {
    /// What members of a cluster made now serve: no migration needed.
    pub fn serving(&self) -> Serving {
        Serving {
            client: self.client.clone(),
            client_cert_auth: self.client.is_some() && self.client_cert_auth,
            peer: self.peer.clone(),
            peer_plaintext: false,
        }
    }
}

/// What `spec.tls` asks for, or why it cannot be done.
pub fn wanted(names: &Names, tls: Option<&TlsSpec>) -> Result<Wanted, String> {
    let Some(t) = tls.filter(|t| t.enabled) else {
        return Ok(Wanted::default());
    };
    for (side, s) in [("client", &t.client), ("peer", &t.peer)] {
        if s.mode == TlsMode::CertManager && s.issuer_ref.is_none() {
            return Err(format!(
                "spec.tls.{side}.issuerRef is required in CertManager mode"
            ));
        }
    }
    Ok(Wanted {
        client: Some(side_secret(names, Side::Client, &t.client)?),
        peer: Some(side_secret(names, Side::Peer, &t.peer)?),
        client_cert_auth: t.client_cert_auth,
    })
}

/// The times of `Operator` mode, from `spec.tls`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub lifetime: Duration,
    pub ca_lifetime: Duration,
    /// The part of a certificate's lifetime after which it is renewed.
    pub renew_fraction: f64,
    pub propagation: Duration,
}

impl Settings {
    pub fn of(t: &TlsSpec) -> Result<Settings, String> {
        let parse = |field: &str, v: &str| {
            crate::backup::parse_age(v)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("spec.tls.{field} {v:?} is not a duration like 2160h"))
        };
        Ok(Settings {
            lifetime: parse("certificateLifetime", &t.certificate_lifetime)?,
            ca_lifetime: parse("caLifetime", &t.ca_lifetime)?,
            renew_fraction: f64::from(t.renew_at_percent.clamp(10, 95)) / 100.0,
            propagation: CA_PROPAGATION,
        })
    }
}

/// What a member pod serves, as its template says: the Secret of each side that serves TLS,
/// and whether the peer port takes plaintext too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Serving {
    pub client: Option<String>,
    pub client_cert_auth: bool,
    pub peer: Option<String>,
    pub peer_plaintext: bool,
}

/// The peer half of a [`Serving`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerServing {
    pub secret: Option<String>,
    pub plaintext: bool,
}

impl Serving {
    pub fn peer_part(&self) -> PeerServing {
        PeerServing {
            secret: self.peer.clone(),
            plaintext: self.peer_plaintext,
        }
    }

    /// Whether members started on this template advertise `https://` peer URLs: only once the
    /// peer port serves TLS alone (while it takes both, members not yet restarted still call
    /// their peers in plaintext only).
    pub fn peer_https(&self) -> bool {
        self.peer.is_some() && !self.peer_plaintext
    }

    /// The member flags of this serving (the URLs too). `host` is the member's DNS name.
    pub fn args(&self, host: &str) -> Vec<String> {
        let scheme = |tls: bool| if tls { "https" } else { "http" };
        let client = scheme(self.client.is_some());
        let mut out = vec![
            format!("--listen-client-urls={client}://0.0.0.0:{CLIENT_PORT}"),
            format!("--advertise-client-urls={client}://{host}:{CLIENT_PORT}"),
            format!(
                "--listen-peer-urls={}://0.0.0.0:{PEER_PORT}",
                scheme(self.peer.is_some())
            ),
            format!(
                "--initial-advertise-peer-urls={}://{host}:{PEER_PORT}",
                scheme(self.peer_https())
            ),
        ];
        if self.client.is_some() {
            let dir = format!("{MOUNT}/client");
            out.push(format!("--cert-file={dir}/{TLS_CRT}"));
            out.push(format!("--key-file={dir}/{TLS_KEY}"));
            out.push(format!("--trusted-ca-file={dir}/{CA_CRT}"));
            if self.client_cert_auth {
                out.push("--client-cert-auth".to_string());
            }
        }
        // Probes and Prometheus use a plain port of their own, with or without client TLS
        // (they present no client certificate): one port to scrape on every member.
        out.push(format!(
            "--listen-metrics-urls=http://0.0.0.0:{METRICS_PORT}"
        ));
        if self.peer.is_some() {
            let dir = format!("{MOUNT}/peer");
            out.push(format!("--peer-cert-file={dir}/{TLS_CRT}"));
            out.push(format!("--peer-key-file={dir}/{TLS_KEY}"));
            out.push(format!("--peer-trusted-ca-file={dir}/{CA_CRT}"));
            out.push("--peer-client-cert-auth".to_string());
            if self.peer_plaintext {
                out.push(PEER_PLAINTEXT_FLAG.to_string());
            }
        }
        out
    }

    /// What a pod (or a pod template) built by the operator serves, read from its cairn
    /// container's flags and its Secret volumes.
    pub fn of_pod(spec: &PodSpec) -> Serving {
        let args: Vec<&str> = spec
            .containers
            .iter()
            .find(|c| c.name == "cairn")
            .and_then(|c| c.args.as_ref())
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let secret = |volume: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .and_then(|v| v.secret.as_ref()?.secret_name.clone())
                .unwrap_or_default()
        };
        let https = |flag: &str| args.iter().any(|a| a.starts_with(&format!("{flag}=https")));
        Serving {
            client: https("--listen-client-urls").then(|| secret(CLIENT_VOLUME)),
            client_cert_auth: args.contains(&"--client-cert-auth"),
            peer: https("--listen-peer-urls").then(|| secret(PEER_VOLUME)),
            peer_plaintext: args.contains(&PEER_PLAINTEXT_FLAG),
        }
    }
}

/// Whether a member's peer URLs are all `https://`.
pub fn urls_https(urls: &[String]) -> bool {
    !urls.is_empty() && urls.iter().all(|u| u.starts_with("https://"))
}

/// `url` with the scheme `https` (or `http`).
pub fn with_scheme(url: &str, https: bool) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    format!("{}://{rest}", if https { "https" } else { "http" })
}

/// The next step of the peer side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerStep {
    /// The peer side is as wanted.
    Steady,
    /// Put this peer serving into the template; the rollout restarts the members onto it.
    Template(PeerServing),
    /// Some member pods do not run the template's peer serving yet.
    Rolling,
    /// Change a member's peer URLs (to `https://` or back).
    Update { id: u64, urls: Vec<String> },
}

/// The next step towards serving peers with the Secret `want` (TLS) or without TLS (`None`).
/// `template` is what the StatefulSet's template serves now, `rolled` whether every member pod
/// runs its peer serving, `members` each member's ID and peer URLs.
pub fn next_peer(
    want: Option<&str>,
    template: &PeerServing,
    rolled: bool,
    members: &[(u64, Vec<String>)],
) -> PeerStep {
    let update = |to_https: bool| {
        members
            .iter()
            .find(|(_, urls)| urls_https(urls) != to_https)
            .map(|(id, urls)| PeerStep::Update {
                id: *id,
                urls: urls.iter().map(|u| with_scheme(u, to_https)).collect(),
            })
    };
    let both = |secret: &str| {
        PeerStep::Template(PeerServing {
            secret: Some(secret.to_string()),
            plaintext: true,
        })
    };
    let any_https = members.iter().any(|(_, u)| urls_https(u));
    let any_http = members.iter().any(|(_, u)| !urls_https(u));
    match (want, template.secret.as_deref(), template.plaintext) {
        // Off, and off: nothing to do.
        (None, None, _) => PeerStep::Steady,
        // Wanted on: first take both on every member.
        (Some(w), None, _) => both(w),
        // TLS alone, with the wanted Secret: steady, unless a member is listed with an http URL.
        (Some(w), Some(t), false) if w == t => {
            if any_http {
                both(w)
            } else {
                PeerStep::Steady
            }
        }
        // TLS alone, but off or another Secret wanted: take plaintext too first.
        (_, Some(t), false) => both(t),
        // Both, and every pod runs it: move the URLs one at a time, then drop the other kind.
        (_, Some(_), true) if !rolled => PeerStep::Rolling,
        (Some(w), Some(t), true) if w == t => {
            update(true).unwrap_or(PeerStep::Template(PeerServing {
                secret: Some(w.to_string()),
                plaintext: false,
            }))
        }
        // Off or another Secret: peers back to plaintext first.
        (want, Some(_), true) => match (any_https, want) {
            (true, _) => update(false).unwrap_or(PeerStep::Steady),
            (false, Some(w)) => both(w),
            (false, None) => PeerStep::Template(PeerServing::default()),
        },
    }
}

fn read_pair(data: &Data, cert: &str, key: &str) -> Option<Pair> {
    Some(Pair {
        cert: data.get(cert)?.clone(),
        key: data.get(key)?.clone(),
    })
}

/// The CA Secret's data at `now`: made if missing, unreadable or with a key that is not its
/// certificate's; rolled over (the old one kept as the previous CA) once past its renewal
/// time; the previous one dropped once expired or unreadable. A CA made while members still
/// trust another (`trusted`: the bundle their certificates' Secrets hold, e.g. after the CA
/// Secret was deleted) keeps that bundle as the previous one, with a rollover's overlap.
/// Returns the data and whether it changed.
pub fn next_ca(
    cluster: &str,
    stored: Option<&Data>,
    trusted: Option<&str>,
    now: Timestamp,
    s: &Settings,
) -> Result<(Data, bool), pki::Error> {
    let current = stored
        .and_then(|d| read_pair(d, CA_CRT, CA_KEY))
        .filter(|p| pki::valid_between(&p.cert).is_ok() && pki::key_matches(&p.cert, &p.key));
    let Some(current) = current else {
        let ca = pki::new_ca(cluster, now, s.ca_lifetime)?;
        let mut data = Data::from([(CA_CRT.to_string(), ca.cert), (CA_KEY.to_string(), ca.key)]);
        if let Some(old) = trusted.filter(|t| pki::valid_between(t).is_ok()) {
            data.insert(PREVIOUS_CRT.to_string(), old.to_string());
            data.insert(ROTATED_AT.to_string(), now.to_string());
        }
        return Ok((data, true));
    };
    let mut data = stored.cloned().unwrap_or_default();
    let mut changed = false;
    if pki::due(&current.cert, now, s.renew_fraction) {
        let ca = pki::new_ca(cluster, now, s.ca_lifetime)?;
        data = Data::from([
            (CA_CRT.to_string(), ca.cert),
            (CA_KEY.to_string(), ca.key),
            (PREVIOUS_CRT.to_string(), current.cert),
            (PREVIOUS_KEY.to_string(), current.key),
            (ROTATED_AT.to_string(), now.to_string()),
        ]);
        changed = true;
    }
    let gone = data.get(PREVIOUS_CRT).is_some_and(|p| {
        pki::valid_between(p).is_ok_and(|(_, until)| until <= now) || pki::valid_between(p).is_err()
    });
    if gone {
        data.remove(PREVIOUS_CRT);
        data.remove(PREVIOUS_KEY);
        changed = true;
    }
    // A previous key that is not the previous certificate's would sign certificates nobody
    // trusts: without it, certificates wait for the rollover to settle instead.
    let bad_key = match (data.get(PREVIOUS_CRT), data.get(PREVIOUS_KEY)) {
        (Some(c), Some(k)) => !pki::key_matches(c, k),
        _ => false,
    };
    if bad_key {
        data.remove(PREVIOUS_KEY);
        changed = true;
    }
    Ok((data, changed))
}

/// The CAs members and clients trust: the current one and the previous one while it is kept.
pub fn trust(ca: &Data) -> String {
    let current = Pair {
        cert: ca.get(CA_CRT).cloned().unwrap_or_default(),
        key: String::new(),
    };
    let previous = ca.get(PREVIOUS_CRT).map(|c| Pair {
        cert: c.clone(),
        key: String::new(),
    });
    pki::bundle(&current, previous.as_ref())
}

/// Whether the bundle with the current CA had time to reach every pod since it replaced
/// another (a time that does not parse, or that overflows, counts as settled).
fn settled(ca: &Data, now: Timestamp, s: &Settings) -> bool {
    let rotated: Option<Timestamp> = ca.get(ROTATED_AT).and_then(|t| t.parse().ok());
    rotated.is_none_or(|t| {
        jiff::SignedDuration::try_from(s.propagation)
            .ok()
            .and_then(|p| t.checked_add(p).ok())
            .is_none_or(|at| now >= at)
    })
}

/// A certificate Secret's data at `now` (`Operator` mode), or `None` when it needs no change:
/// issued when missing, unreadable or due; moved to the current CA once a rollover settled;
/// its `ca.crt` kept equal to the trust bundle. Until a rollover settled, a certificate that
/// must be issued is signed by the previous CA when its key is kept (members that still trust
/// only the previous one accept it).
pub fn next_leaf(
    stored: Option<&Data>,
    ca: &Data,
    profile: &Profile,
    now: Timestamp,
    s: &Settings,
) -> Result<Option<Data>, pki::Error> {
    let bundle = trust(ca);
    let current = read_pair(ca, CA_CRT, CA_KEY).ok_or_else(|| pki::Error::Read("no CA".into()))?;
    let settled = settled(ca, now, s);
    let cert = stored
        .and_then(|d| read_pair(d, TLS_CRT, TLS_KEY))
        .filter(|c| pki::valid_between(&c.cert).is_ok());
    let previous =
        read_pair(ca, PREVIOUS_CRT, PREVIOUS_KEY).filter(|p| pki::key_matches(&p.cert, &p.key));
    // Before the rollover settled, a certificate still valid is kept unless the previous CA
    // can sign its successor (some pods may not trust the new CA yet).
    let expired = |c: &Pair| pki::valid_between(&c.cert).is_ok_and(|(_, until)| until <= now);
    let reissue = match &cert {
        None => true,
        Some(c) if settled => {
            pki::due(&c.cert, now, s.renew_fraction) || !pki::signed_by(&c.cert, &current.cert)
        }
        Some(c) => expired(c) || (previous.is_some() && pki::due(&c.cert, now, s.renew_fraction)),
    };
    let mut data = stored.cloned().unwrap_or_default();
    if reissue {
        let signer = match previous {
            Some(previous) if !settled => previous,
            _ => current,
        };
        let leaf = pki::issue(&signer, profile, now, s.lifetime)?;
        data.insert(TLS_CRT.to_string(), leaf.cert);
        data.insert(TLS_KEY.to_string(), leaf.key);
    }
    let stale_bundle = data.get(CA_CRT) != Some(&bundle);
    if stale_bundle {
        data.insert(CA_CRT.to_string(), bundle);
    }
    Ok((reissue || stale_bundle).then_some(data))
}

/// When the certificate of a Secret's data expires and is renewed.
pub fn leaf_times(data: &Data, fraction: f64) -> Option<(Timestamp, Timestamp)> {
    let (from, until) = pki::valid_between(data.get(TLS_CRT)?).ok()?;
    Some((until, pki::renew_at(from, until, fraction)))
}

/// The cert-manager `Certificate` `name` that fills Secret `secret` with a certificate for
/// `profile` signed by `issuer`, renewed at the same point of its lifetime as in `Operator`
/// mode. Owned by the cluster.
pub fn certificate(
    ec: &crate::crd::EtcdCluster,
    name: &str,
    secret: &str,
    issuer: &crate::crd::IssuerRef,
    profile: &Profile,
    s: &Settings,
) -> serde_json::Value {
    let meta = crate::resources::owned_meta(ec, name.to_string());
    let lifetime = s.lifetime.as_secs();
    let renew_before = lifetime - (lifetime as f64 * s.renew_fraction) as u64;
    let mut spec = serde_json::json!({
        "secretName": secret,
        "duration": format!("{lifetime}s"),
        "renewBefore": format!("{}s", renew_before.max(1)),
        "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": issuer.group},
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
    });
    match profile {
        Profile::Member { dns, ips } => {
            spec["dnsNames"] = serde_json::json!(dns);
            spec["ipAddresses"] =
                serde_json::json!(ips.iter().map(|i| i.to_string()).collect::<Vec<_>>());
            spec["usages"] = serde_json::json!([
                "server auth",
                "client auth",
                "digital signature",
                "key encipherment"
            ]);
        }
        Profile::Client { common_name } => {
            spec["commonName"] = serde_json::json!(common_name);
            spec["usages"] =
                serde_json::json!(["client auth", "digital signature", "key encipherment"]);
        }
    }
    serde_json::json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": meta,
        "spec": spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "prod".into(),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn settings() -> Settings {
        Settings {
            lifetime: Duration::from_secs(3000),
            ca_lifetime: Duration::from_secs(30_000),
            renew_fraction: 2.0 / 3.0,
            propagation: Duration::from_secs(300),
        }
    }

    fn peer(secret: Option<&str>, plaintext: bool) -> PeerServing {
        PeerServing {
            secret: secret.map(str::to_string),
            plaintext,
        }
    }

    fn members(https: &[bool]) -> Vec<(u64, Vec<String>)> {
        https
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let scheme = if *h { "https" } else { "http" };
                (i as u64 + 1, vec![format!("{scheme}://m{i}:2380")])
            })
            .collect()
    }

    #[test]
    fn secrets_per_mode_differ_so_a_mode_change_is_a_secret_change() {
        let n = names();
        let side = |mode| TlsSide {
            mode,
            ..TlsSide::default()
        };
        assert_eq!(
            side_secret(&n, Side::Client, &side(TlsMode::Operator)).unwrap(),
            "demo-server-tls"
        );
        assert_eq!(
            side_secret(&n, Side::Peer, &side(TlsMode::CertManager)).unwrap(),
            "demo-peer-cm-tls"
        );
        let err = side_secret(&n, Side::Peer, &side(TlsMode::Secret)).unwrap_err();
        assert!(err.contains("spec.tls.peer.secretName"), "{err}");
        let mine = TlsSide {
            mode: TlsMode::Secret,
            secret_name: Some("mine".into()),
            issuer_ref: None,
        };
        assert_eq!(operator_secret(&n, &mine).unwrap(), "mine");
        assert_eq!(users_secret(&n, &mine), None);
        assert_eq!(
            users_secret(&n, &side(TlsMode::Operator)).as_deref(),
            Some("demo-client-tls")
        );
        // Off, or no spec: nothing served over TLS.
        assert_eq!(wanted(&n, None).unwrap(), Wanted::default());
        let off = TlsSpec {
            enabled: false,
            ..TlsSpec::default()
        };
        assert_eq!(wanted(&n, Some(&off)).unwrap(), Wanted::default());
        let cm = TlsSpec {
            client: side(TlsMode::CertManager),
            ..TlsSpec::default()
        };
        assert!(wanted(&n, Some(&cm)).unwrap_err().contains("issuerRef"));
        let on = wanted(&n, Some(&TlsSpec::default())).unwrap();
        assert_eq!(on.client.as_deref(), Some("demo-server-tls"));
        assert_eq!(on.peer.as_deref(), Some("demo-peer-tls"));
        assert!(on.client_cert_auth);
    }

    #[test]
    fn settings_parse_the_lifetimes_and_refuse_nonsense() {
        let s = Settings::of(&TlsSpec::default()).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(2160 * 3600));
        assert_eq!(s.ca_lifetime, Duration::from_secs(43800 * 3600));
        assert!((s.renew_fraction - 0.66).abs() < 1e-9);
        let bad = TlsSpec {
            certificate_lifetime: "0h".into(),
            ..TlsSpec::default()
        };
        assert!(Settings::of(&bad)
            .unwrap_err()
            .contains("certificateLifetime"));
    }

    #[test]
    fn flags_and_mounts_read_back_from_the_pod_they_make() {
        let s = Serving {
            client: Some("demo-server-tls".into()),
            client_cert_auth: true,
            peer: Some("demo-peer-tls".into()),
            peer_plaintext: true,
        };
        let args = s.args("$(POD_NAME).demo-peer.prod.svc");
        for want in [
            "--listen-client-urls=https://0.0.0.0:2379",
            "--advertise-client-urls=https://$(POD_NAME).demo-peer.prod.svc:2379",
            "--listen-peer-urls=https://0.0.0.0:2380",
            // Both kinds on the peer port: new members still advertise plaintext.
            "--initial-advertise-peer-urls=http://$(POD_NAME).demo-peer.prod.svc:2380",
            "--cert-file=/etc/cairn/tls/client/tls.crt",
            "--key-file=/etc/cairn/tls/client/tls.key",
            "--trusted-ca-file=/etc/cairn/tls/client/ca.crt",
            "--client-cert-auth",
            "--listen-metrics-urls=http://0.0.0.0:2381",
            "--peer-cert-file=/etc/cairn/tls/peer/tls.crt",
            "--peer-key-file=/etc/cairn/tls/peer/tls.key",
            "--peer-trusted-ca-file=/etc/cairn/tls/peer/ca.crt",
            "--peer-client-cert-auth",
            PEER_PLAINTEXT_FLAG,
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
        let plain = Serving::default().args("h");
        assert_eq!(
            plain,
            vec![
                "--listen-client-urls=http://0.0.0.0:2379",
                "--advertise-client-urls=http://h:2379",
                "--listen-peer-urls=http://0.0.0.0:2380",
                "--initial-advertise-peer-urls=http://h:2380",
                "--listen-metrics-urls=http://0.0.0.0:2381",
            ]
        );
        let tls_only = Serving {
            peer_plaintext: false,
            ..s.clone()
        };
        assert!(tls_only.peer_https());
        assert!(!s.peer_https());
        assert!(tls_only
            .args("h")
            .contains(&"--initial-advertise-peer-urls=https://h:2380".to_string()));

        let ec: crate::crd::EtcdCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
            "metadata": {"name": "demo", "namespace": "prod", "uid": "u"}, "spec": {}
        }))
        .unwrap();
        for serving in [s, tls_only, Serving::default()] {
            let sts = crate::resources::statefulset_restoring(&ec, 3, "cairn:x", None, &serving);
            let pod = sts.spec.unwrap().template.spec.unwrap();
            assert_eq!(Serving::of_pod(&pod), serving);
        }
    }

    #[test]
    fn peer_migration_to_tls_goes_through_both_then_urls_then_tls_alone() {
        let w = Some("demo-peer-tls");
        // Plain: take both first.
        assert_eq!(
            next_peer(
                w,
                &peer(None, false),
                true,
                &members(&[false, false, false])
            ),
            PeerStep::Template(peer(w, true))
        );
        // Both, pods still restarting: wait.
        assert_eq!(
            next_peer(w, &peer(w, true), false, &members(&[false, false, false])),
            PeerStep::Rolling
        );
        // Both everywhere: one URL at a time.
        assert_eq!(
            next_peer(w, &peer(w, true), true, &members(&[true, false, false])),
            PeerStep::Update {
                id: 2,
                urls: vec!["https://m1:2380".into()]
            }
        );
        // Every URL https: TLS alone.
        assert_eq!(
            next_peer(w, &peer(w, true), true, &members(&[true, true, true])),
            PeerStep::Template(peer(w, false))
        );
        assert_eq!(
            next_peer(w, &peer(w, false), true, &members(&[true, true, true])),
            PeerStep::Steady
        );
        // A member listed with http while the port serves TLS alone: take both again.
        assert_eq!(
            next_peer(w, &peer(w, false), true, &members(&[true, false, true])),
            PeerStep::Template(peer(w, true))
        );
        // Off and off.
        assert_eq!(
            next_peer(None, &peer(None, false), true, &members(&[false])),
            PeerStep::Steady
        );
    }

    #[test]
    fn peer_migration_back_and_to_another_secret_go_through_plaintext_urls() {
        let old = Some("demo-peer-tls");
        let new = Some("mine");
        // Off: take both, then URLs back to http, then plain.
        assert_eq!(
            next_peer(None, &peer(old, false), true, &members(&[true, true])),
            PeerStep::Template(peer(old, true))
        );
        assert_eq!(
            next_peer(None, &peer(old, true), true, &members(&[true, true])),
            PeerStep::Update {
                id: 1,
                urls: vec!["http://m0:2380".into()]
            }
        );
        assert_eq!(
            next_peer(None, &peer(old, true), true, &members(&[false, false])),
            PeerStep::Template(peer(None, false))
        );
        // Another Secret (another CA): URLs to http under the old one, then both with the
        // new one, then URLs to https.
        assert_eq!(
            next_peer(new, &peer(old, false), true, &members(&[true, true])),
            PeerStep::Template(peer(old, true))
        );
        assert_eq!(
            next_peer(new, &peer(old, true), true, &members(&[false, true])),
            PeerStep::Update {
                id: 2,
                urls: vec!["http://m1:2380".into()]
            }
        );
        assert_eq!(
            next_peer(new, &peer(old, true), true, &members(&[false, false])),
            PeerStep::Template(peer(new, true))
        );
        assert_eq!(
            next_peer(new, &peer(new, true), true, &members(&[false, false])),
            PeerStep::Update {
                id: 1,
                urls: vec!["https://m0:2380".into()]
            }
        );
        // Nothing moves while pods still run the previous template.
        assert_eq!(
            next_peer(None, &peer(old, true), false, &members(&[true, true])),
            PeerStep::Rolling
        );
    }

    #[test]
    fn ca_is_made_then_rolled_over_with_the_previous_kept_until_it_expires() {
        let s = settings();
        let (ca, changed) = next_ca("demo", None, None, at(0), &s).unwrap();
        assert!(changed);
        assert!(ca.contains_key(CA_CRT) && ca.contains_key(CA_KEY));
        assert!(!ca.contains_key(PREVIOUS_CRT));
        // Before two thirds of its lifetime: unchanged.
        let (same, changed) = next_ca("demo", Some(&ca), None, at(19_000), &s).unwrap();
        assert!(!changed);
        assert_eq!(same, ca);
        // After: a new CA, the old one kept as previous, both trusted.
        let (rolled, changed) = next_ca("demo", Some(&ca), None, at(20_100), &s).unwrap();
        assert!(changed);
        assert_ne!(rolled[CA_CRT], ca[CA_CRT]);
        assert_eq!(rolled[PREVIOUS_CRT], ca[CA_CRT]);
        assert_eq!(rolled[ROTATED_AT], at(20_100).to_string());
        let bundle = trust(&rolled);
        assert!(bundle.contains(ca[CA_CRT].trim()) && bundle.contains(rolled[CA_CRT].trim()));
        // The previous one is dropped once it expired (its lifetime ran from at(0)).
        let (later, changed) = next_ca("demo", Some(&rolled), None, at(30_100), &s).unwrap();
        assert!(changed);
        assert!(!later.contains_key(PREVIOUS_CRT));
        assert_eq!(later[CA_CRT], rolled[CA_CRT]);
        // Garbage in the Secret: a new CA.
        let junk = Data::from([(CA_CRT.to_string(), "junk".to_string())]);
        let (fresh, changed) = next_ca("demo", Some(&junk), None, at(0), &s).unwrap();
        assert!(changed && fresh[CA_CRT].contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn leaves_are_renewed_when_due_and_move_to_a_new_ca_after_propagation() {
        let s = settings();
        let profile = pki::member_profile(&names());
        let (ca, _) = next_ca("demo", None, None, at(0), &s).unwrap();
        let leaf = next_leaf(None, &ca, &profile, at(0), &s).unwrap().unwrap();
        assert!(pki::signed_by(&leaf[TLS_CRT], &ca[CA_CRT]));
        assert_eq!(leaf[CA_CRT], trust(&ca));
        // Not due: nothing to write.
        assert_eq!(
            next_leaf(Some(&leaf), &ca, &profile, at(1900), &s).unwrap(),
            None
        );
        // Due at two thirds of 3000 s.
        let renewed = next_leaf(Some(&leaf), &ca, &profile, at(2001), &s)
            .unwrap()
            .unwrap();
        assert_ne!(renewed[TLS_CRT], leaf[TLS_CRT]);
        let (until, renew) = leaf_times(&renewed, s.renew_fraction).unwrap();
        assert_eq!(until, at(2001 + 3000));
        assert!(renew > at(2001) && renew < until);

        // The CA rolls over: the bundle is updated at once, the certificate stays (signed by
        // the previous CA) until the new bundle had time to reach every pod.
        let (rolled, _) = next_ca("demo", Some(&ca), None, at(20_100), &s).unwrap();
        let fresh = next_leaf(None, &ca, &profile, at(20_000), &s)
            .unwrap()
            .unwrap();
        let bundled = next_leaf(Some(&fresh), &rolled, &profile, at(20_100), &s)
            .unwrap()
            .unwrap();
        assert_eq!(bundled[TLS_CRT], fresh[TLS_CRT]);
        assert_eq!(bundled[CA_CRT], trust(&rolled));
        assert_eq!(
            next_leaf(Some(&bundled), &rolled, &profile, at(20_300), &s).unwrap(),
            None
        );
        // A certificate due meanwhile is signed by the previous CA still.
        let older = next_leaf(None, &ca, &profile, at(18_000), &s)
            .unwrap()
            .unwrap();
        let due = next_leaf(Some(&older), &rolled, &profile, at(20_200), &s)
            .unwrap()
            .unwrap();
        assert_ne!(due[TLS_CRT], older[TLS_CRT]);
        assert!(pki::signed_by(&due[TLS_CRT], &ca[CA_CRT]));
        // After the propagation time: reissued by the new CA.
        let moved = next_leaf(Some(&bundled), &rolled, &profile, at(20_401), &s)
            .unwrap()
            .unwrap();
        assert!(pki::signed_by(&moved[TLS_CRT], &rolled[CA_CRT]));
        assert!(!pki::signed_by(&moved[TLS_CRT], &ca[CA_CRT]));
    }

    #[test]
    fn a_lost_or_broken_ca_is_made_again_with_the_trusted_bundle_kept_for_the_overlap() {
        let s = settings();
        let profile = pki::member_profile(&names());
        let (old, _) = next_ca("demo", None, None, at(0), &s).unwrap();
        let leaf = next_leaf(None, &old, &profile, at(0), &s).unwrap().unwrap();
        // The key no longer matches the certificate (or is gone): made again; what members
        // trust (the leaf's bundle) stays trusted, and the certificate is not replaced before
        // the new bundle had time to reach every pod.
        let mut broken = old.clone();
        broken.insert(
            CA_KEY.into(),
            pki::new_ca("x", at(0), s.ca_lifetime).unwrap().key,
        );
        for stored in [Some(&broken), None] {
            let (ca, changed) = next_ca("demo", stored, Some(&leaf[CA_CRT]), at(100), &s).unwrap();
            assert!(changed);
            assert_ne!(ca[CA_CRT], old[CA_CRT]);
            assert_eq!(ca[PREVIOUS_CRT], leaf[CA_CRT]);
            assert!(trust(&ca).contains(old[CA_CRT].trim()));
            let during = next_leaf(Some(&leaf), &ca, &profile, at(200), &s)
                .unwrap()
                .unwrap();
            assert_eq!(during[TLS_CRT], leaf[TLS_CRT]);
            assert_eq!(during[CA_CRT], trust(&ca));
            let after = next_leaf(Some(&during), &ca, &profile, at(401), &s)
                .unwrap()
                .unwrap();
            assert!(pki::signed_by(&after[TLS_CRT], &ca[CA_CRT]));
        }
        // A certificate due while a remade CA settles (no previous key to sign with) is kept
        // until then: pods that have not the new bundle yet would refuse its successor.
        let (remade, _) = next_ca("demo", None, Some(&leaf[CA_CRT]), at(2_000), &s).unwrap();
        let kept = next_leaf(Some(&leaf), &remade, &profile, at(2_100), &s)
            .unwrap()
            .unwrap();
        assert_eq!(kept[TLS_CRT], leaf[TLS_CRT]);
        let renewed = next_leaf(Some(&kept), &remade, &profile, at(2_301), &s)
            .unwrap()
            .unwrap();
        assert!(pki::signed_by(&renewed[TLS_CRT], &remade[CA_CRT]));
        // A previous key that is not the previous CA's is dropped, never used.
        let (mut rolled, _) = next_ca("demo", Some(&old), None, at(20_100), &s).unwrap();
        rolled.insert(PREVIOUS_KEY.into(), remade[CA_KEY].clone());
        let (checked, changed) = next_ca("demo", Some(&rolled), None, at(20_110), &s).unwrap();
        assert!(changed && !checked.contains_key(PREVIOUS_KEY));
        assert_eq!(checked[PREVIOUS_CRT], old[CA_CRT]);
        // A bundle with a broken entry keeps the certificates that parse.
        let messy = format!(
            "{}-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n{}",
            old[CA_CRT], remade[CA_CRT]
        );
        let clean = pki::clean_bundle(&messy);
        assert_eq!(clean.matches("BEGIN CERTIFICATE").count(), 2, "{clean}");
        assert_eq!(
            pki::valid_between(&clean).unwrap(),
            pki::valid_between(&old[CA_CRT]).unwrap()
        );
        // Garbage in the Secret never panics: an unreadable previous CA is dropped, a
        // rotation time at the end of time counts as settled, a leaf with junk is reissued.
        let mut odd = old.clone();
        odd.insert(PREVIOUS_CRT.into(), "junk".into());
        odd.insert(ROTATED_AT.into(), "9999-12-30T21:59:00Z".into());
        let (ca, changed) = next_ca("demo", Some(&odd), None, at(10), &s).unwrap();
        assert!(changed && !ca.contains_key(PREVIOUS_CRT));
        let junk = Data::from([
            (TLS_CRT.to_string(), "junk".to_string()),
            (TLS_KEY.to_string(), "junk".to_string()),
        ]);
        let fixed = next_leaf(Some(&junk), &odd, &profile, at(10), &s)
            .unwrap()
            .unwrap();
        assert!(pki::signed_by(&fixed[TLS_CRT], &old[CA_CRT]));
        assert!(pki::key_matches(&fixed[TLS_CRT], &fixed[TLS_KEY]));
        assert!(!pki::key_matches(&fixed[TLS_CRT], &leaf[TLS_KEY]));
        // A lifetime past the end of time is an error, not a panic.
        let huge = Settings {
            lifetime: Duration::from_secs(u64::MAX / 4),
            ..s
        };
        assert!(next_leaf(None, &old, &profile, at(0), &huge).is_err());
    }

    #[test]
    fn certificates_for_cert_manager_carry_names_usages_issuer_and_renewal() {
        let ec: crate::crd::EtcdCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "EtcdCluster",
            "metadata": {"name": "demo", "namespace": "prod", "uid": "u"}, "spec": {}
        }))
        .unwrap();
        let issuer = crate::crd::IssuerRef {
            name: "ca-issuer".into(),
            kind: "ClusterIssuer".into(),
            group: "cert-manager.io".into(),
        };
        let c = certificate(
            &ec,
            "demo-server",
            "demo-server-cm-tls",
            &issuer,
            &pki::member_profile(&names()),
            &settings(),
        );
        assert_eq!(c["kind"], "Certificate");
        assert_eq!(c["metadata"]["ownerReferences"][0]["name"], "demo");
        assert_eq!(c["spec"]["secretName"], "demo-server-cm-tls");
        assert_eq!(c["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        assert_eq!(c["spec"]["duration"], "3000s");
        assert_eq!(c["spec"]["renewBefore"], "1000s");
        let dns: Vec<&str> = c["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert!(dns.contains(&"*.demo-peer.prod.svc") && dns.contains(&"demo.prod.svc"));
        assert_eq!(c["spec"]["usages"][0], "server auth");
        let u = certificate(
            &ec,
            "demo-client",
            "demo-client-cm-tls",
            &issuer,
            &Profile::Client {
                common_name: "demo-client".into(),
            },
            &settings(),
        );
        assert_eq!(u["spec"]["commonName"], "demo-client");
        assert_eq!(u["spec"]["usages"][0], "client auth");
    }
}
