//! Membership through the etcd API, with the `etcd-client` crate, exactly as a user would do it
//! with etcdctl: observe (MemberList plus a Status per member), add a learner, promote it, move
//! leadership, remove a member. Deciding which of these to do is `plan`'s job, not this module's.

use std::time::Duration;

use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions, ConnectOptions,
    MemberAddOptions, MemberListResponse,
};
use futures::future::join_all;

use crate::layout::Layout;
use crate::plan::{ClusterView, MemberVersion, ObservedMember, Step};

/// How long one call to a member may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a member may take to defragment.
const DEFRAG_TIMEOUT: Duration = Duration::from_secs(600);
/// How long to wait for a connection to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// etcd's answer to promoting a learner that is still behind.
const NOT_IN_SYNC: &str = "can only promote a learner member which is in sync with leader";

/// Errors of membership calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no member answered at {endpoints:?}: {source}")]
    Unreachable {
        endpoints: Vec<String>,
        source: etcd_client::Error,
    },
    #[error("{op}: {source}")]
    Call {
        op: &'static str,
        source: etcd_client::Error,
    },
    #[error("the leader has no client URL")]
    LeaderUnknown,
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
}

/// etcd's answer to authenticating while auth is off.
const AUTH_NOT_ENABLED: &str = "authentication is not enabled";
/// etcd's answer to a wrong user name or password.
const AUTH_FAILED: &str = "authentication failed, invalid user ID or password";

/// The user the operator calls members as once a cluster has auth on (`spec.auth`).
pub const ROOT: &str = "root";

/// How the operator reaches a cluster's members: as root with this password when the cluster
/// has auth on; with no user while it has not (so the same calls work before, while and after
/// auth is enabled); over TLS with a client certificate at `https://` URLs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub root_password: Option<String>,
    pub tls: Option<ClientTls>,
}

/// The operator's side of TLS to members (PEM): the CAs it trusts, and the client
/// certificates it presents. Usually one; two while the members move from one client Secret to
/// another (each member accepts one of them), tried in turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: String,
    pub identities: Vec<crate::pki::Pair>,
}

impl ClientTls {
    fn options(&self) -> etcd_client::TlsOptions {
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca));
        if let Some(id) = self.identities.first() {
            o = o.identity(etcd_client::Identity::from_pem(&id.cert, &id.key));
        }
        o
    }

    /// A rustls client configuration presenting the first identity (HTTP/1.1).
    fn rustls(&self) -> Option<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        // Entries that do not parse are left out (as Go's AppendCertsFromPEM does).
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.as_bytes()).flatten() {
            let _ = roots.add(c);
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots);
        let mut config = match self.identities.first() {
            Some(id) => {
                let chain = CertificateDer::pem_slice_iter(id.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).ok()?;
                builder.with_client_auth_cert(chain, key).ok()?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(config)
    }
}

impl Access {
    /// This access once per client certificate, in order (itself when it has at most one).
    pub fn variants(&self) -> Vec<Access> {
        match &self.tls {
            Some(t) if t.identities.len() > 1 => t
                .identities
                .iter()
                .map(|id| Access {
                    root_password: self.root_password.clone(),
                    tls: Some(ClientTls {
                        ca: t.ca.clone(),
                        identities: vec![id.clone()],
                    }),
                })
                .collect(),
            _ => vec![self.clone()],
        }
    }

    /// A client of `endpoints` with `opts`: as root if a password is known and auth is on,
    /// else with no user; with the first client certificate at `https://` endpoints.
    pub async fn connect(
        &self,
        endpoints: &[String],
        opts: ConnectOptions,
    ) -> Result<Client, etcd_client::Error> {
        let https = endpoints.iter().all(|e| e.starts_with("https://"));
        let opts = match (&self.tls, https) {
            (Some(t), true) => opts.with_tls(t.options()),
            _ => opts,
        };
        if let Some(password) = &self.root_password {
            match Client::connect(
                endpoints,
                Some(opts.clone().with_user(ROOT, password.as_str())),
            )
            .await
            {
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains(AUTH_NOT_ENABLED) => {}
                other => return other,
            }
        }
        Client::connect(endpoints, Some(opts)).await
    }
}

/// Whether an error is etcd refusing the credentials.
pub fn credentials_refused(e: &Error) -> bool {
    let source = match e {
        Error::Unreachable { source, .. } | Error::Call { source, .. } => source,
        _ => return false,
    };
    matches!(source, etcd_client::Error::GRpcStatus(s) if s.message().contains(AUTH_FAILED))
}

/// Most of an HTTP answer read from a member.
const MAX_HTTP_ANSWER: u64 = 64 << 10;

/// GETs `path` from a member's client URL (`https://` with `tls`): the body of a `200` answer
/// within the call timeout. HTTP/1.1 by hand: the answers wanted are small JSON documents.
pub async fn http_get(url: &str, path: &str, tls: Option<&ClientTls>) -> Option<String> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: String) -> Option<String> {
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.take(MAX_HTTP_ANSWER).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?;
        (code == "200").then(|| body.to_string())
    }
    let (https, rest) = match url.split_once("://")? {
        ("http", rest) => (false, rest),
        ("https", rest) => (true, rest),
        _ => return None,
    };
    let host = rest.split('/').next()?.to_string();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let config = match (https, tls) {
        (true, Some(t)) => Some(std::sync::Arc::new(t.rustls()?)),
        (true, None) => return None,
        (false, _) => None,
    };
    let work = async move {
        let tcp = tokio::net::TcpStream::connect(&host).await.ok()?;
        match config {
            Some(config) => {
                let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                let name = name.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
                let s = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .ok()?;
                exchange(s, req).await
            }
            None => exchange(tcp, req).await,
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, work).await.ok()?
}

/// The result of a step's membership calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The learner has not caught up with the leader yet (etcd refuses until it has).
    LearnerBehind,
}

/// A handle on one cluster, reached through any of `endpoints`.
pub struct Members {
    endpoints: Vec<String>,
    access: Access,
}

impl Members {
    pub fn new(endpoints: Vec<String>) -> Members {
        Members {
            endpoints,
            access: Access::default(),
        }
    }

    /// The same cluster reached with `access`.
    pub fn with_access(mut self, access: Access) -> Members {
        self.access = access;
        self
    }

    /// A client of `endpoints` that answers MemberList, with the first client certificate they
    /// accept.
    async fn connect(&self, endpoints: &[String]) -> Result<Client, Error> {
        let mut last = None;
        for access in self.access.variants() {
            let attempt = async {
                let mut c = access.connect(endpoints, options()).await?;
                c.member_list().await?;
                Ok::<_, etcd_client::Error>(c)
            };
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(etcd_client::Error::InvalidArgs("timed out".into())),
            }
        }
        Err(Error::Unreachable {
            endpoints: endpoints.to_vec(),
            source: last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no access".into())),
        })
    }

    /// The same members reached with no user (over TLS still, where they serve it).
    fn anonymous(&self) -> Members {
        Members::new(self.endpoints.clone()).with_access(Access {
            root_password: None,
            tls: self.access.tls.clone(),
        })
    }

    /// Whether the cluster has auth on: a request without a user is refused then (etcd's
    /// "user name is empty"), answered while it is off.
    pub async fn auth_enabled(&self) -> Result<bool, Error> {
        let (mut anonymous, _) = self.anonymous().reach().await?;
        match anonymous.user_list().await {
            Ok(_) => Ok(false),
            Err(etcd_client::Error::GRpcStatus(s))
                if s.message().contains("user name is empty")
                    || s.message().contains("permission denied") =>
            {
                Ok(true)
            }
            Err(source) => Err(Error::Call {
                op: "UserList",
                source,
            }),
        }
    }

    /// Turns auth on with root's password: the root user (made, or its password set) with the
    /// root role, then AuthEnable. Safe to repeat.
    pub async fn enable_auth(&self, password: &str) -> Result<(), Error> {
        let (mut c, _) = self.anonymous().reach().await?;
        let call = |op: &'static str| move |source| Error::Call { op, source };
        match c.user_add(ROOT, password, None).await {
            Ok(_) => {}
            Err(etcd_client::Error::GRpcStatus(s))
                if s.message().contains("user name already exists") =>
            {
                c.user_change_password(ROOT, password)
                    .await
                    .map_err(call("UserChangePassword"))?;
            }
            Err(source) => {
                return Err(Error::Call {
                    op: "UserAdd",
                    source,
                })
            }
        }
        c.user_grant_role(ROOT, ROOT)
            .await
            .map_err(call("UserGrantRole"))?;
        c.auth_enable().await.map_err(call("AuthEnable"))?;
        Ok(())
    }

    /// Turns auth off (as root).
    pub async fn disable_auth(&self) -> Result<(), Error> {
        let (mut c, _) = self.reach().await?;
        c.auth_disable().await.map_err(|source| Error::Call {
            op: "AuthDisable",
            source,
        })?;
        Ok(())
    }

    /// A client on the first endpoint whose member answers, with the member list it gave. One
    /// endpoint at a time: a balanced channel over all of them would send some calls to members
    /// that are down.
    async fn reach(&self) -> Result<(Client, MemberListResponse), Error> {
        let mut last = None;
        let variants = self.access.variants();
        for e in &self.endpoints {
            for access in &variants {
                let attempt = async {
                    let mut c = access.connect(std::slice::from_ref(e), options()).await?;
                    let list = c.member_list().await?;
                    // A learner answers the member list but refuses membership changes
                    // (MemberPromote among them): the cluster is reached through a voter.
                    let me = list.header().map(|h| h.member_id());
                    if list
                        .members()
                        .iter()
                        .any(|m| Some(m.id()) == me && m.is_learner())
                    {
                        return Err(etcd_client::Error::InvalidArgs(format!("{e} is a learner")));
                    }
                    Ok::<_, etcd_client::Error>((c, list))
                };
                match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                    Ok(Ok(found)) => return Ok(found),
                    Ok(Err(err)) => last = Some(err),
                    Err(_) => {
                        last = Some(etcd_client::Error::InvalidArgs(format!("{e}: timed out")))
                    }
                }
            }
        }
        Err(Error::Unreachable {
            endpoints: self.endpoints.clone(),
            source: last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no endpoints".into())),
        })
    }

    /// The member list, the leader and each member's health (its own Status answer).
    pub async fn observe(&self) -> Result<ClusterView, Error> {
        let (_, list) = self.reach().await?;
        let cluster_id = list.header().map_or(0, |h| h.cluster_id());
        let variants = self.access.variants();
        let statuses = join_all(list.members().iter().map(|m| {
            let variants = &variants;
            async move {
                let url = m.client_urls().first()?;
                for access in variants {
                    let status = async {
                        let mut c = access.connect(m.client_urls(), options()).await.ok()?;
                        tokio::time::timeout(CALL_TIMEOUT, c.status())
                            .await
                            .ok()?
                            .ok()
                    };
                    let Some(status) = status.await else { continue };
                    let version = http_get(url, "/version", access.tls.as_ref()).await;
                    return Some((status, version.as_deref().and_then(MemberVersion::parse)));
                }
                None
            }
        }))
        .await;
        // The leader as it reports itself: the others may still name a leader that just died.
        let leader = list
            .members()
            .iter()
            .zip(&statuses)
            .find(|(m, s)| s.as_ref().is_some_and(|(s, _)| s.leader() == m.id()))
            .map(|(m, _)| m.id());
        let members = list
            .members()
            .iter()
            .zip(&statuses)
            .map(|(m, status)| ObservedMember {
                id: m.id(),
                name: m.name().to_string(),
                peer_urls: m.peer_urls().to_vec(),
                learner: m.is_learner(),
                healthy: status.is_some(),
                applied_index: status.as_ref().map_or(0, |(s, _)| s.raft_applied_index()),
                raft_index: status.as_ref().map_or(0, |(s, _)| s.raft_index()),
                revision: status
                    .as_ref()
                    .and_then(|(s, _)| s.header())
                    .map_or(0, |h| h.revision()),
                version: status.as_ref().and_then(|(_, v)| v.clone()),
            })
            .collect();
        Ok(ClusterView {
            cluster_id,
            leader,
            members,
        })
    }

    /// Makes the membership calls of a step (the pods and volumes of a step are the caller's).
    /// Steps without membership calls are no-ops here.
    pub async fn execute(&self, layout: &dyn Layout, step: &Step) -> Result<Outcome, Error> {
        match step {
            Step::Replace { id, ordinal } => {
                self.remove(*id).await?;
                self.add_learner(&layout.peer_url(*ordinal)).await?;
            }
            Step::AddLearner { ordinal } => {
                self.add_learner(&layout.peer_url(*ordinal)).await?;
            }
            Step::Promote { id, .. } => return self.promote(*id).await,
            Step::MoveLeader { from, to } => self.move_leader(*from, *to).await?,
            Step::Remove { id, .. }
            | Step::RemoveLearner { id, .. }
            | Step::RemoveCorrupt { id, .. } => self.remove(*id).await?,
            _ => {}
        }
        Ok(Outcome::Done)
    }

    /// Adds a learner with `peer_url`; returns its new member ID.
    pub async fn add_learner(&self, peer_url: &str) -> Result<u64, Error> {
        let (mut client, _) = self.reach().await?;
        let resp = client
            .member_add([peer_url], Some(MemberAddOptions::new().with_is_learner()))
            .await
            .map_err(|source| Error::Call {
                op: "MemberAdd",
                source,
            })?;
        Ok(resp.member().map_or(0, |m| m.id()))
    }

    /// Promotes a learner, or reports that it has not caught up yet.
    pub async fn promote(&self, id: u64) -> Result<Outcome, Error> {
        let (mut client, _) = self.reach().await?;
        match client.member_promote(id).await {
            Ok(_) => Ok(Outcome::Done),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains(NOT_IN_SYNC) => {
                Ok(Outcome::LearnerBehind)
            }
            Err(source) => Err(Error::Call {
                op: "MemberPromote",
                source,
            }),
        }
    }

    /// Sets a member's peer URLs (MemberUpdate).
    pub async fn update_peer_urls(&self, id: u64, urls: &[String]) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        client
            .member_update(id, urls.to_vec())
            .await
            .map_err(|source| Error::Call {
                op: "MemberUpdate",
                source,
            })?;
        Ok(())
    }

    /// Defragments the member at `endpoint` (its own client URL): its backend is rewritten, so
    /// the call may take long on a big database.
    pub async fn defragment(&self, endpoint: &str) -> Result<(), Error> {
        self.on_member(endpoint, DEFRAG_TIMEOUT, "Defragment", async |c| {
            c.defragment().await.map(|_| ())
        })
        .await
    }

    /// `call` on the member at `endpoint` alone (not any member of the cluster), with each
    /// way of access in turn (as root, then without a user while auth may be off; the TLS
    /// identities) until one answers; the last error otherwise.
    async fn on_member<T>(
        &self,
        endpoint: &str,
        timeout: Duration,
        op: &'static str,
        call: impl AsyncFn(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T, Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(timeout);
        let mut last = None;
        for access in self.access.variants() {
            match access.connect(&[endpoint.to_string()], opts.clone()).await {
                Ok(mut c) => match call(&mut c).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        Err(Error::Call {
            op,
            source: last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no access".into())),
        })
    }

    /// The alarms raised: (member ID, alarm).
    pub async fn alarms(&self) -> Result<Vec<(u64, AlarmType)>, Error> {
        let (mut client, _) = self.reach().await?;
        let resp = client
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .map_err(|source| Error::Call {
                op: "Alarm",
                source,
            })?;
        Ok(resp
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm()))
            .collect())
    }

    /// Compacts the key space at its current revision, waiting until the member asked has
    /// deleted what it drops (`physical`); returns the revision. A revision already compacted
    /// is no error (nothing is left to drop).
    pub async fn compact_to_current(&self) -> Result<i64, Error> {
        let (mut client, _) = self.reach().await?;
        let status = client.status().await.map_err(|source| Error::Call {
            op: "Status",
            source,
        })?;
        let revision = status.header().map_or(0, |h| h.revision());
        match client
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => Ok(revision),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                Ok(revision)
            }
            Err(source) => Err(Error::Call {
                op: "Compact",
                source,
            }),
        }
    }

    /// The size of the database of the member at `endpoint` (its own client URL), from Status.
    pub async fn db_size(&self, endpoint: &str) -> Result<i64, Error> {
        self.on_member(endpoint, CALL_TIMEOUT, "Status", async |c| {
            c.status().await.map(|s| s.db_size())
        })
        .await
    }

    /// Disarms `alarm` of member `id`.
    pub async fn disarm(&self, id: u64, alarm: AlarmType) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        let mut options = AlarmOptions::new();
        options.with_member(id);
        client
            .alarm(AlarmAction::Deactivate, alarm, Some(options))
            .await
            .map_err(|source| Error::Call {
                op: "Alarm",
                source,
            })?;
        Ok(())
    }

    /// Removes a member.
    pub async fn remove(&self, id: u64) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        client
            .member_remove(id)
            .await
            .map_err(|source| Error::Call {
                op: "MemberRemove",
                source,
            })?;
        Ok(())
    }

    /// Moves leadership from the leader `from` to `to`. MoveLeader must be sent to the leader.
    pub async fn move_leader(&self, from: u64, to: u64) -> Result<(), Error> {
        let (mut client, _) = self.reach().await?;
        let list = client.member_list().await.map_err(|source| Error::Call {
            op: "MemberList",
            source,
        })?;
        let urls = list
            .members()
            .iter()
            .find(|m| m.id() == from)
            .map(|m| m.client_urls().to_vec())
            .filter(|u| !u.is_empty())
            .ok_or(Error::LeaderUnknown)?;
        let mut leader = self.connect(&urls).await?;
        leader.move_leader(to).await.map_err(|source| Error::Call {
            op: "MoveLeader",
            source,
        })?;
        Ok(())
    }
}
