//! TLS of one EtcdCluster, managed (`spec.tls`): the certificate Secrets of `Operator` mode
//! (made, renewed, CA rolled over), the `Certificate` objects of `CertManager` mode, the user's
//! Secrets of `Secret` mode; the operator's own TLS access to the members; the TLS part of the
//! members' template (the peer migration of [`crate::tls::next_peer`]) and the `TLS` condition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use super::cluster::Reconciler;
use super::*;
use crate::crd::{TlsMode, TlsStatus};
use crate::layout::Schemed;
use crate::members::ClientTls;
use crate::pki::{self, Pair, Profile};
use crate::tls::{self, Data, PeerStep, Serving, Settings, Side, Wanted};

/// Condition reasons of `TLS`.
pub mod reason {
    pub const ENABLED: &str = "Enabled";
    pub const DISABLED: &str = "Disabled";
    pub const MIGRATING: &str = "Migrating";
    pub const INVALID: &str = "Invalid";
    pub const CERT_MANAGER_MISSING: &str = "CertManagerMissing";
    pub const WAITING_FOR_CERTIFICATES: &str = "WaitingForCertificates";
}

/// What the reconcile learned of TLS before it observes the members.
#[derive(Default)]
pub(super) struct TlsPrep {
    /// The Secret of each side that the members should serve with, where it is ready.
    pub wanted: Wanted,
    /// What the StatefulSet's template serves now (none before it exists).
    pub template: Option<Serving>,
    /// What each member pod serves, by ordinal (pods being deleted are left out).
    pub pods: BTreeMap<i32, Serving>,
    /// The StatefulSet and the member pods as read for this round (the reconcile goes on
    /// with them rather than reading them again).
    pub statefulset: Option<StatefulSet>,
    pub pod_list: Vec<Pod>,
    /// The `TLS` condition when something stands in the way (spec, cert-manager, Secrets).
    pub problem: Option<(&'static str, String)>,
    /// The users' client certificate Secret, and when the members' certificates expire and
    /// are renewed (`Operator` mode).
    pub users_secret: Option<String>,
    pub times: Option<(Timestamp, Timestamp)>,
}

type Timestamp = jiff::Timestamp;

fn text(s: &Secret) -> Data {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// Whether a certificate Secret's data has what a member needs.
fn complete(d: &Data) -> bool {
    [tls::TLS_CRT, tls::TLS_KEY, tls::CA_CRT]
        .iter()
        .all(|k| d.get(*k).is_some_and(|v| !v.trim().is_empty()))
}

impl Reconciler<'_> {
    fn secret(&self, name: &str, type_: &str, data: Data) -> Secret {
        let mut meta = resources::owned_meta(self.ec, name.to_string());
        meta.namespace = Some(self.ns.to_string());
        Secret {
            metadata: meta,
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            type_: Some(type_.to_string()),
            ..Secret::default()
        }
    }

    async fn read_secret(&self, name: &str) -> Result<Option<Data>, Error> {
        Ok(self.api::<Secret>().get_opt(name).await?.map(|s| text(&s)))
    }

    /// `Operator` mode: the CA in Secret `ca_name` and the certificates it signs, made (unless
    /// `create` is false: then only renewed where they exist) or renewed now as due.
    async fn operator_pki(
        &self,
        settings: &Settings,
        ca_name: &str,
        leaves: &[(String, Profile)],
        create: bool,
    ) -> Result<Option<(Timestamp, Timestamp)>, String> {
        let fail = |e: &dyn std::fmt::Display| format!("making certificates: {e}");
        let now = Timestamp::now();
        let mut existing = BTreeMap::new();
        for (name, _) in leaves {
            if let Some(d) = self.read_secret(name).await.map_err(|e| fail(&e))? {
                existing.insert(name.clone(), d);
            }
        }
        let stored = self.read_secret(ca_name).await.map_err(|e| fail(&e))?;
        if !create && (stored.is_none() || existing.is_empty()) {
            return Ok(None);
        }
        // What members trust now, should the CA have to be made again.
        let trusted = existing.values().find_map(|d| d.get(tls::CA_CRT)).cloned();
        // The Secret's name names the CA too: the two CAs of a cluster differ by name.
        let (ca, changed) =
            tls::next_ca(ca_name, stored.as_ref(), trusted.as_deref(), now, settings)
                .map_err(|e| fail(&e))?;
        if changed {
            let rolled = stored.is_some()
                && ca.contains_key(tls::PREVIOUS_CRT)
                && stored.as_ref().and_then(|s| s.get(tls::CA_CRT)) != ca.get(tls::CA_CRT);
            apply(
                &self.api::<Secret>(),
                &self.secret(ca_name, "Opaque", ca.clone()),
            )
            .await
            .map_err(|e| fail(&e))?;
            let note = if rolled {
                format!("replaced the CA in Secret {ca_name}; the previous one stays trusted until it expires, certificates are reissued by the new one once every pod has it")
            } else if stored.is_none() && trusted.is_none() {
                format!("made the CA in Secret {ca_name}")
            } else if ca.contains_key(tls::PREVIOUS_CRT)
                && trusted.is_some()
                && stored.as_ref().and_then(|s| s.get(tls::CA_CRT)) != ca.get(tls::CA_CRT)
            {
                format!("made the CA in Secret {ca_name} again (it was missing or unusable); the CAs the members trust stay trusted next to it until they expire")
            } else {
                format!("dropped an expired or unreadable previous CA from Secret {ca_name}")
            };
            self.event(EventType::Normal, "CertificateAuthority", "TLS", note)
                .await;
        }
        let mut times: Option<(Timestamp, Timestamp)> = None;
        for (name, profile) in leaves {
            let stored = existing.remove(name);
            if stored.is_none() && !create {
                continue;
            }
            let next = tls::next_leaf(stored.as_ref(), &ca, profile, now, settings)
                .map_err(|e| fail(&e))?;
            let data = match next {
                Some(data) => {
                    let reissued =
                        stored.as_ref().and_then(|s| s.get(tls::TLS_CRT)) != data.get(tls::TLS_CRT);
                    apply(
                        &self.api::<Secret>(),
                        &self.secret(name, "kubernetes.io/tls", data.clone()),
                    )
                    .await
                    .map_err(|e| fail(&e))?;
                    if reissued {
                        self.event(
                            EventType::Normal,
                            "CertificateIssued",
                            "TLS",
                            format!("issued the certificate in Secret {name}"),
                        )
                        .await;
                    }
                    data
                }
                None => stored.unwrap_or_default(),
            };
            if matches!(profile, Profile::Member { .. }) {
                if let Some(t) = tls::leaf_times(&data, settings.renew_fraction) {
                    times = Some(times.map_or(t, |m| (m.0.min(t.0), m.1.min(t.1))));
                }
            }
        }
        Ok(times)
    }

    /// `CertManager` mode: a `Certificate` per Secret; says whether cert-manager serves them.
    async fn certificates(
        &self,
        settings: &Settings,
        wanted: &[(String, Profile, crate::crd::IssuerRef)],
    ) -> Result<(), (&'static str, String)> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
            "certificates",
        );
        let api: Api<DynamicObject> = Api::namespaced_with(self.ctx.client.clone(), self.ns, &ar);
        for (secret, profile, issuer) in wanted {
            let name = certificate_name(secret);
            let cert = tls::certificate(self.ec, &name, secret, issuer, profile, settings);
            let obj: DynamicObject = serde_json::from_value(cert)
                .map_err(|e| (reason::INVALID, format!("Certificate {name}: {e}")))?;
            match api.patch(&name, &apply_params(), &Patch::Apply(&obj)).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    return Err((
                        reason::CERT_MANAGER_MISSING,
                        "cert-manager is not installed (the API server does not serve certificates.cert-manager.io/v1): install it, or use mode Operator or Secret".to_string(),
                    ))
                }
                Err(e) => {
                    return Err((
                        reason::WAITING_FOR_CERTIFICATES,
                        format!("applying Certificate {name}: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Before the members are observed: the Secrets of `spec.tls` (made, renewed or checked;
    /// with `issue` false, only read), what the template and the pods serve, and how the
    /// operator reaches members over TLS. Sets `self.layout` to the schemes the members serve
    /// and `self.access.tls`.
    pub(super) async fn prepare_tls(&mut self, issue: bool) -> Result<TlsPrep, Error> {
        let spec = self.ec.spec.tls.as_ref();
        let mut prep = TlsPrep::default();
        let sts = self
            .api::<StatefulSet>()
            .get_opt(&self.names.statefulset())
            .await?;
        prep.template = sts
            .as_ref()
            .and_then(|s| s.spec.as_ref()?.template.spec.as_ref())
            .map(Serving::of_pod);
        if sts.is_some() {
            prep.pod_list = self.member_pods().await?;
            for p in &prep.pod_list {
                if p.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let (Some(o), Some(ps)) = (self.names.ordinal(&p.name_any()), p.spec.as_ref())
                else {
                    continue;
                };
                prep.pods.insert(o, Serving::of_pod(ps));
            }
        }
        let wanted = match tls::wanted(&self.names, spec) {
            Ok(w) => w,
            Err(msg) => {
                prep.problem = Some((reason::INVALID, msg));
                // Keep serving as now until the spec is mended.
                let t = prep.template.clone().unwrap_or_default();
                Wanted {
                    client: t.client,
                    peer: t.peer,
                    client_cert_auth: t.client_cert_auth,
                }
            }
        };
        let on = spec.is_some_and(|t| t.enabled);
        let serving_tls = prep
            .template
            .iter()
            .chain(prep.pods.values())
            .any(|s| s.client.is_some() || s.peer.is_some());
        let t = spec.cloned().unwrap_or_default();
        // Settings that do not parse are a problem of the spec; renewal goes on with defaults.
        let settings = Settings::of(&t).unwrap_or_else(|msg| {
            prep.problem.get_or_insert((reason::INVALID, msg));
            Settings::of(&crate::crd::TlsSpec::default()).expect("the defaults parse")
        });
        // Certificates members still serve with are renewed while TLS is being turned off too.
        if issue && (on || serving_tls) {
            let problem = self.issue(&t, &settings, &mut prep, on).await;
            if prep.problem.is_none() {
                prep.problem = problem;
            }
        }
        // A side whose Secrets are not complete keeps serving as the template does. The client
        // side needs the operator's own certificate too (or it could not reach the members).
        let mut ready = wanted.clone();
        let mut client_fallback = false;
        let operator_secret = t
            .enabled
            .then(|| tls::operator_secret(&self.names, &t.client).ok())
            .flatten();
        for (side, want, now, also) in [
            (
                Side::Client,
                &mut ready.client,
                prep.template.as_ref().and_then(|t| t.client.clone()),
                operator_secret,
            ),
            (
                Side::Peer,
                &mut ready.peer,
                prep.template.as_ref().and_then(|t| t.peer.clone()),
                None,
            ),
        ] {
            let Some(name) = want.clone() else { continue };
            for needed in std::iter::once(name).chain(also) {
                let ok = self
                    .read_secret(&needed)
                    .await?
                    .is_some_and(|d| complete(&d));
                if !ok {
                    prep.problem.get_or_insert((
                        reason::WAITING_FOR_CERTIFICATES,
                        format!(
                            "Secret {needed} does not exist yet or lacks tls.crt, tls.key or ca.crt"
                        ),
                    ));
                    *want = now.clone();
                    client_fallback |= side == Side::Client;
                    break;
                }
            }
        }
        // A client side kept as the template serves keeps its clientCertAuth too.
        if client_fallback {
            ready.client_cert_auth = prep.template.as_ref().is_some_and(|t| t.client_cert_auth);
        }
        prep.wanted = ready;

        // The operator's access: the CAs of every client Secret in use, its certificate for each.
        let mut in_use: Vec<String> = prep.wanted.client.iter().cloned().collect();
        let others = prep.template.iter().chain(prep.pods.values());
        for s in others.filter_map(|s| s.client.clone()) {
            if !in_use.contains(&s) {
                in_use.push(s);
            }
        }
        let mut ca = String::new();
        let mut identities = Vec::new();
        for secret in &in_use {
            let Some(data) = self.read_secret(secret).await? else {
                continue;
            };
            if let Some(c) = data.get(tls::CA_CRT) {
                // Only certificates that parse: one broken entry must not cost the others.
                let c = pki::clean_bundle(c);
                if !ca.contains(c.trim()) {
                    ca.push_str(c.trim_end());
                    ca.push('\n');
                }
            }
            let own = self.operator_secret_for(secret);
            let own = match own {
                Some(name) if name != *secret => self.read_secret(&name).await?,
                _ => Some(data),
            };
            if let Some(pair) = own.and_then(|d| {
                Some(Pair {
                    cert: d.get(tls::TLS_CRT)?.clone(),
                    key: d.get(tls::TLS_KEY)?.clone(),
                })
            }) {
                identities.push(pair);
            }
        }
        self.access.tls = (!ca.is_empty()).then_some(ClientTls { ca, identities });

        // Where members are reached: each pod's own client scheme; a new one's, the template's.
        let new_serving = prep.wanted.serving();
        let replicas = sts
            .as_ref()
            .and_then(|s| s.spec.as_ref()?.replicas)
            .unwrap_or(self.ec.spec.size);
        let client_https = (0..crate::layout::MAX_ORDINAL.min(replicas.max(self.ec.spec.size) + 2))
            .filter(|o| match prep.pods.get(o) {
                Some(s) => s.client.is_some(),
                None => prep
                    .template
                    .as_ref()
                    .unwrap_or(&new_serving)
                    .client
                    .is_some(),
            })
            .collect();
        let peer_https = prep.template.as_ref().unwrap_or(&new_serving).peer_https();
        self.layout = Arc::new(Schemed {
            inner: (self.ctx.layout)(self.ec),
            client_https,
            peer_https,
        });
        prep.statefulset = sts;
        Ok(prep)
    }

    /// The Secret of the operator's own certificate for members serving with client Secret
    /// `secret` (none known: present the Secret's own).
    fn operator_secret_for(&self, secret: &str) -> Option<String> {
        [TlsMode::Operator, TlsMode::CertManager]
            .into_iter()
            .find_map(|mode| {
                let side = crate::crd::TlsSide {
                    mode,
                    ..Default::default()
                };
                (tls::side_secret(&self.names, Side::Client, &side).ok()? == secret)
                    .then(|| tls::operator_secret(&self.names, &side).ok())
                    .flatten()
            })
    }

    /// Makes (or asks cert-manager for) the certificates of `spec.tls`; with `create` false
    /// only renews the `Operator` mode certificates that exist. In `Operator` mode the two
    /// sides have CAs of their own (`<cluster>-ca`, `<cluster>-peer-ca`): a client certificate
    /// must not get a client onto the peer port.
    async fn issue(
        &self,
        t: &crate::crd::TlsSpec,
        settings: &Settings,
        prep: &mut TlsPrep,
        create: bool,
    ) -> Option<(&'static str, String)> {
        let names = &self.names;
        let member = pki::member_profile(names);
        let operator = Profile::Client {
            common_name: tls::OPERATOR_CN.to_string(),
        };
        let users = Profile::Client {
            common_name: tls::users_cn(names),
        };
        let mut managed: Vec<(String, Profile, crate::crd::IssuerRef)> = Vec::new();
        for (side, s) in [(Side::Client, &t.client), (Side::Peer, &t.peer)] {
            let Ok(secret) = tls::side_secret(names, side, s) else {
                continue;
            };
            let mut certs = vec![(secret, member.clone())];
            if side == Side::Client {
                if let Ok(op) = tls::operator_secret(names, s) {
                    certs.push((op, operator.clone()));
                }
                if let Some(u) = tls::users_secret(names, s) {
                    prep.users_secret = Some(u.clone());
                    certs.push((u, users.clone()));
                }
            }
            match (s.mode, &s.issuer_ref) {
                (TlsMode::Operator, _) => {
                    let ca = match side {
                        Side::Client => format!("{}-ca", names.cluster),
                        Side::Peer => format!("{}-peer-ca", names.cluster),
                    };
                    match self.operator_pki(settings, &ca, &certs, create).await {
                        Ok(Some(t)) => {
                            prep.times =
                                Some(prep.times.map_or(t, |m| (m.0.min(t.0), m.1.min(t.1))))
                        }
                        Ok(None) => {}
                        Err(msg) => return Some((reason::WAITING_FOR_CERTIFICATES, msg)),
                    }
                }
                (TlsMode::CertManager, Some(issuer)) if create => managed.extend(
                    certs
                        .into_iter()
                        .map(|(secret, p)| (secret, p, issuer.clone())),
                ),
                _ => {}
            }
        }
        self.certificates(settings, &managed).await.err()
    }

    /// The pods of this cluster's members.
    pub(super) async fn member_pods(&self) -> Result<Vec<Pod>, Error> {
        let selector = resources::selector_labels(self.ec)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(self
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await?
            .items)
    }

    /// The TLS part of the members' template now, and the peer step it comes from.
    /// Changes wait while a membership step is under way (`steady` false): a member added now
    /// must advertise the peer URL it was added with, which the template read before this
    /// round decided.
    pub(super) fn serving(
        &self,
        prep: &TlsPrep,
        view: Option<&ClusterView>,
        replicas: i32,
        steady: bool,
    ) -> (Serving, PeerStep) {
        let Some(template) = &prep.template else {
            return (prep.wanted.serving(), PeerStep::Steady);
        };
        if !steady {
            return (template.clone(), PeerStep::Steady);
        }
        let tpl_peer = template.peer_part();
        let rolled =
            (0..replicas).all(|o| prep.pods.get(&o).is_some_and(|s| s.peer_part() == tpl_peer));
        let members: Vec<(u64, Vec<String>)> = view
            .map(|v| {
                v.members
                    .iter()
                    .map(|m| (m.id, m.peer_urls.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // Without the member list the URLs are unknown: the peer side waits.
        let step = if view.is_some() {
            tls::next_peer(prep.wanted.peer.as_deref(), &tpl_peer, rolled, &members)
        } else {
            PeerStep::Steady
        };
        let peer = match &step {
            PeerStep::Template(p) => p.clone(),
            _ => tpl_peer,
        };
        let serving = Serving {
            client: prep.wanted.client.clone(),
            client_cert_auth: prep.wanted.client.is_some() && prep.wanted.client_cert_auth,
            peer: peer.secret,
            peer_plaintext: peer.plaintext,
        };
        (serving, step)
    }

    /// The TLS status and condition, once the step of this round is known.
    pub(super) fn tls_report(
        &self,
        prep: &TlsPrep,
        view: Option<&ClusterView>,
        step: &PeerStep,
        replicas: i32,
        had_condition: bool,
    ) -> (Option<TlsStatus>, Option<(bool, &'static str, String)>) {
        let spec = self.ec.spec.tls.as_ref();
        let serving_pods: Vec<&Serving> = (0..replicas).filter_map(|o| prep.pods.get(&o)).collect();
        let any_tls = serving_pods
            .iter()
            .any(|s| s.client.is_some() || s.peer.is_some());
        if spec.is_none() && !any_tls {
            // Never asked for, or turned off and done: a condition left from before says so.
            let cond = had_condition.then(|| {
                (
                    false,
                    reason::DISABLED,
                    "members serve plain HTTP".to_string(),
                )
            });
            return (None, cond);
        }
        let word = |all: bool, none: bool| {
            if all {
                "TLS"
            } else if none {
                "Plain"
            } else {
                "Migrating"
            }
        };
        // Pods not made yet (a scale-up) are left out: they start from the template.
        let client_all = !serving_pods.is_empty()
            && serving_pods
                .iter()
                .all(|s| s.client.is_some() && s.client == prep.wanted.client);
        let client_none = serving_pods.iter().all(|s| s.client.is_none());
        let urls: Vec<bool> = view
            .map(|v| {
                v.members
                    .iter()
                    .map(|m| tls::urls_https(&m.peer_urls))
                    .collect()
            })
            .unwrap_or_default();
        // Every URL https and every pod serving TLS alone with the wanted Secret.
        let peer_all = !urls.is_empty()
            && urls.iter().all(|h| *h)
            && *step == PeerStep::Steady
            && !serving_pods.is_empty()
            && serving_pods
                .iter()
                .all(|s| s.peer.is_some() && s.peer == prep.wanted.peer && !s.peer_plaintext);
        let peer_none = urls.iter().all(|h| !h) && serving_pods.iter().all(|s| s.peer.is_none());
        let status = TlsStatus {
            client: word(client_all, client_none).to_string(),
            peer: word(peer_all, peer_none).to_string(),
            client_secret: prep
                .users_secret
                .clone()
                .filter(|_| prep.wanted.client.is_some()),
            not_after: prep.times.map(|t| Time(t.0)),
            renew_at: prep.times.map(|t| Time(t.1)),
        };
        let wanted_on = spec.is_some_and(|t| t.enabled);
        let cond = if let Some((reason, msg)) = &prep.problem {
            (false, *reason, msg.clone())
        } else {
            let done_on = wanted_on && client_all && peer_all;
            let done_off = !wanted_on && client_none && peer_none;
            if done_on {
                (
                    true,
                    reason::ENABLED,
                    "every member serves clients and peers over TLS".to_string(),
                )
            } else if done_off {
                (
                    false,
                    reason::DISABLED,
                    "members serve plain HTTP".to_string(),
                )
            } else {
                let what = match step {
                    PeerStep::Update { id, urls } => {
                        format!("changing the peer URLs of member {id:x} to {urls:?}")
                    }
                    PeerStep::Template(p) if p.plaintext => {
                        "restarting members to take TLS and plaintext on the peer port".to_string()
                    }
                    PeerStep::Template(_) => {
                        "restarting members onto their final peer serving".to_string()
                    }
                    PeerStep::Rolling | PeerStep::Steady => {
                        "restarting members one at a time onto the template's TLS".to_string()
                    }
                };
                (false, reason::MIGRATING, what)
            }
        };
        (Some(status), Some(cond))
    }
}

/// The cert-manager `Certificate` behind a Secret (`<cluster>-server-cm-tls` ->
/// `<cluster>-server`).
pub fn certificate_name(secret: &str) -> String {
    secret.strip_suffix("-cm-tls").unwrap_or(secret).to_string()
}
