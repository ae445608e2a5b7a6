//! How a cluster's members and children are named and reached: the Kubernetes names derived
//! from the cluster's name ([`Names`]: Services, StatefulSet, PVCs, pod DNS names) and the
//! [`Layout`] trait the planner and the membership calls see, which the loopback tests implement
//! with ports instead of DNS names. Pure, no I/O.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::ResourceExt;

use crate::crd::EtcdCluster;

/// Client port of every member.
pub const CLIENT_PORT: i32 = 2379;
/// Peer (Raft) port of every member.
pub const PEER_PORT: i32 = 2380;
/// Plain HTTP port of every member whose client port serves TLS: `/metrics`, `/health`,
/// `/readyz`, `/livez` and `/version` for probes, which present no client certificate.
pub const METRICS_PORT: i32 = 2381;
/// Name of the volume claim template (PVCs are `data-<pod>`).
pub const DATA_VOLUME: &str = "data";

/// Highest member ordinal the operator looks for (sizes stop at 9; replacements and learners
/// stay below this).
pub const MAX_ORDINAL: i32 = 64;

/// How members are named and reached: in Kubernetes by their pod's DNS name ([`Names`]); the
/// membership tests run members on loopback ports instead.
pub trait Layout: Send + Sync {
    /// Member (and pod) name of an ordinal.
    fn member(&self, ordinal: i32) -> String;
    fn peer_url(&self, ordinal: i32) -> String;
    fn client_url(&self, ordinal: i32) -> String;
    /// The ordinal of a member name of this cluster.
    fn ordinal(&self, member: &str) -> Option<i32> {
        (0..MAX_ORDINAL).find(|o| self.member(*o) == member)
    }
    /// The ordinal whose peer URL this is, by address: `http://` or `https://` (a member
    /// moving to TLS is listed with either).
    fn ordinal_of_peer_url(&self, url: &str) -> Option<i32> {
        (0..MAX_ORDINAL).find(|o| address(&self.peer_url(*o)) == address(url))
    }
    /// `--initial-cluster` naming the given ordinals.
    fn initial_cluster(&self, ordinals: &[i32]) -> String {
        ordinals
            .iter()
            .map(|i| format!("{}={}", self.member(*i), self.peer_url(*i)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A URL without its scheme.
pub fn address(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

/// `url` with `https://` or `http://`.
fn scheme(url: &str, https: bool) -> String {
    format!(
        "{}://{}",
        if https { "https" } else { "http" },
        address(url)
    )
}

/// A layout with the schemes the members serve: `https://` client URLs for the ordinals whose
/// pod serves TLS to clients, and `https://` peer URLs for members added now when the template
/// serves TLS alone on the peer port.
pub struct Schemed {
    pub inner: Arc<dyn Layout>,
    /// Ordinals whose client port serves TLS.
    pub client_https: BTreeSet<i32>,
    pub peer_https: bool,
}

impl Layout for Schemed {
    fn member(&self, ordinal: i32) -> String {
        self.inner.member(ordinal)
    }
    fn peer_url(&self, ordinal: i32) -> String {
        scheme(&self.inner.peer_url(ordinal), self.peer_https)
    }
    fn client_url(&self, ordinal: i32) -> String {
        scheme(
            &self.inner.client_url(ordinal),
            self.client_https.contains(&ordinal),
        )
    }
    fn ordinal(&self, member: &str) -> Option<i32> {
        self.inner.ordinal(member)
    }
}

/// Deterministic names of a cluster's children and members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn of(ec: &EtcdCluster) -> Names {
        Names {
            cluster: ec.name_any(),
            namespace: ec.namespace().unwrap_or_else(|| "default".to_string()),
        }
    }
    /// The client Service (and the StatefulSet, PDB): the cluster's own name.
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    /// The headless Service that gives every member a stable DNS name.
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.cluster)
    }
    pub fn statefulset(&self) -> String {
        self.cluster.clone()
    }
    pub fn pdb(&self) -> String {
        self.cluster.clone()
    }
    pub fn network_policy(&self) -> String {
        format!("{}-members", self.cluster)
    }
    pub fn configmap(&self) -> String {
        format!("{}-bootstrap", self.cluster)
    }
    /// The Secret the operator makes for root's password when `spec.auth` names none.
    pub fn root_secret(&self) -> String {
        format!("{}-root", self.cluster)
    }
    /// The ServiceAccount of pods that reach object storage with ambient credentials.
    pub fn backup_service_account(&self) -> String {
        format!("{}-backup", self.cluster)
    }
    /// The PVC of an ordinal.
    pub fn pvc(&self, ordinal: i32) -> String {
        format!("{DATA_VOLUME}-{}", self.member(ordinal))
    }
    /// DNS name of a member, resolvable inside the cluster.
    pub fn host(&self, ordinal: i32) -> String {
        format!(
            "{}.{}.{}.svc",
            self.member(ordinal),
            self.peer_service(),
            self.namespace
        )
    }
}

impl Layout for Names {
    fn member(&self, ordinal: i32) -> String {
        format!("{}-{}", self.cluster, ordinal)
    }
    fn peer_url(&self, ordinal: i32) -> String {
        format!("http://{}:{PEER_PORT}", self.host(ordinal))
    }
    fn client_url(&self, ordinal: i32) -> String {
        format!("http://{}:{CLIENT_PORT}", self.host(ordinal))
    }
}
