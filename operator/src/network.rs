//! The members' NetworkPolicy (`spec.networkPolicy`): who may reach which port of a member pod.
//! Pure builder, no I/O.
//!
//! - The peer port (Raft traffic, snapshots) takes only the cluster's own members and the
//!   operator: nothing else has any business there, and a plaintext peer port would otherwise
//!   let any pod in the cluster join the conversation.
//! - The client port is open to everyone unless `clients` names who may reach it; then the
//!   members and the operator are added to them, so the operator is never cut off from the
//!   cluster it runs. An operator that does not know its own pod (outside the cluster, or
//!   deployed without `CAIRN_OPERATOR_SELECTOR`) leaves the client port open.
//! - The plain metrics port (served with client TLS on) stays open: Prometheus must scrape it.
//!   Without client TLS `/metrics` is on the client port, and `clients` must include Prometheus.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::crd::EtcdCluster;
use crate::layout::{Names, CLIENT_PORT, METRICS_PORT, PEER_PORT};
use crate::resources::{member_selector, meta};

/// The label every namespace carries with its name (Kubernetes 1.21+).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Where the operator runs: its pod's namespace and labels (from the chart's environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl OperatorPod {
    /// From `POD_NAMESPACE` and `CAIRN_OPERATOR_SELECTOR` (`key=value,key=value`, the chart's
    /// selector labels of the operator's pods); `None` when either is missing or malformed (an
    /// operator running outside the cluster).
    pub fn from_env(namespace: Option<String>, selector: Option<String>) -> Option<OperatorPod> {
        let namespace = namespace.filter(|n| !n.is_empty())?;
        let mut labels = BTreeMap::new();
        for pair in selector?.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return None;
            }
            labels.insert(k.to_string(), v.to_string());
        }
        (!labels.is_empty()).then_some(OperatorPod { namespace, labels })
    }

    /// The operator's pods as a NetworkPolicy peer, seen from `namespace`.
    fn peer(&self, namespace: &str) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(self.labels.clone()),
                match_expressions: None,
            }),
            // A podSelector alone means the policy's own namespace.
            namespace_selector: (self.namespace != namespace).then(|| LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_string(),
                    self.namespace.clone(),
                )])),
                match_expressions: None,
            }),
            ip_block: None,
        }
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        end_port: None,
    }
}

/// The NetworkPolicy of `ec`'s member pods (see the module doc). `operator`: where the operator
/// runs, if it knows.
pub fn network_policy(ec: &EtcdCluster, operator: Option<&OperatorPod>) -> NetworkPolicy {
    let names = Names::of(ec);
    let namespace = ec.namespace().unwrap_or_default();
    let members = NetworkPolicyPeer {
        pod_selector: Some(member_selector(ec)),
        namespace_selector: None,
        ip_block: None,
    };
    let ours: Vec<NetworkPolicyPeer> = std::iter::once(members)
        .chain(operator.map(|o| o.peer(&namespace)))
        .collect();
    // Without the operator's own pod to let in, the client port stays open: the operator must
    // never cut itself off from the cluster it runs (said in the NetworkPolicy condition).
    let clients = match (&ec.spec.network_policy.clients, operator) {
        (Some(c), Some(_)) => Some(c.iter().cloned().chain(ours.iter().cloned()).collect()),
        _ => None,
    };
    NetworkPolicy {
        metadata: meta(ec, names.network_policy()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(member_selector(ec)),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(PEER_PORT)]),
                    from: Some(ours),
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(CLIENT_PORT)]),
                    // `None`: from anywhere.
                    from: clients,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(METRICS_PORT)]),
                    from: None,
                },
            ]),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EtcdClusterSpec;
    use crate::resources::selector_labels;

    fn cluster(spec: serde_json::Value) -> EtcdCluster {
        let spec: EtcdClusterSpec = serde_json::from_value(spec).unwrap();
        let mut ec = EtcdCluster::new("demo", spec);
        ec.metadata.namespace = Some("prod".to_string());
        ec.metadata.uid = Some("0f5e".to_string());
        ec
    }

    fn operator(ns: &str) -> OperatorPod {
        OperatorPod::from_env(
            Some(ns.to_string()),
            Some("app.kubernetes.io/name=cairn-operator,app.kubernetes.io/instance=ops".into()),
        )
        .unwrap()
    }

    fn rule(np: &NetworkPolicy, port: i32) -> &NetworkPolicyIngressRule {
        np.spec
            .as_ref()
            .unwrap()
            .ingress
            .as_ref()
            .unwrap()
            .iter()
            .find(|r| r.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(port)))
            .unwrap()
    }

    #[test]
    fn operator_from_env() {
        let o = operator("cairn-system");
        assert_eq!(o.namespace, "cairn-system");
        assert_eq!(o.labels.len(), 2);
        assert_eq!(o.labels["app.kubernetes.io/instance"], "ops");
        for (ns, sel) in [
            (None, Some("a=b")),
            (Some(""), Some("a=b")),
            (Some("x"), None),
            (Some("x"), Some("")),
            (Some("x"), Some("novalue")),
            (Some("x"), Some("=v")),
        ] {
            assert_eq!(
                OperatorPod::from_env(ns.map(str::to_string), sel.map(str::to_string)),
                None,
                "{ns:?} {sel:?}"
            );
        }
    }

    #[test]
    fn peer_port_only_for_members_and_the_operator_client_port_open_by_default() {
        let ec = cluster(serde_json::json!({"size": 3}));
        assert!(ec.spec.network_policy.enabled, "on by default");
        let np = network_policy(&ec, Some(&operator("cairn-system")));
        assert_eq!(np.metadata.name.as_deref(), Some("demo-members"));
        assert_eq!(np.metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(
            np.metadata.owner_references.as_ref().unwrap()[0].uid,
            "0f5e"
        );
        let spec = np.spec.as_ref().unwrap();
        assert_eq!(
            spec.pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector_labels(&ec))
        );
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );

        let peer = rule(&np, PEER_PORT).from.as_ref().unwrap();
        assert_eq!(peer.len(), 2);
        assert_eq!(
            peer[0].pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector_labels(&ec))
        );
        assert_eq!(peer[0].namespace_selector, None, "members: this namespace");
        assert_eq!(
            peer[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[NAMESPACE_NAME_LABEL],
            "cairn-system"
        );
        assert_eq!(rule(&np, CLIENT_PORT).from, None, "clients: anyone");
        assert_eq!(rule(&np, METRICS_PORT).from, None);

        // The operator in the cluster's own namespace: a pod selector alone.
        let np = network_policy(&ec, Some(&operator("prod")));
        assert_eq!(
            rule(&np, PEER_PORT).from.as_ref().unwrap()[1].namespace_selector,
            None
        );
        // An operator that does not know where it runs: members only.
        let np = network_policy(&ec, None);
        assert_eq!(rule(&np, PEER_PORT).from.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn clients_restrict_the_client_port_and_keep_members_and_the_operator() {
        let ec = cluster(serde_json::json!({
            "size": 3,
            "networkPolicy": {"clients": [
                {"podSelector": {"matchLabels": {"app": "api"}}},
                {"namespaceSelector": {"matchLabels": {"team": "a"}}}
            ]}
        }));
        let np = network_policy(&ec, Some(&operator("cairn-system")));
        let from = rule(&np, CLIENT_PORT).from.as_ref().unwrap();
        assert_eq!(from.len(), 4, "{from:?}");
        assert_eq!(
            from[0]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app"],
            "api"
        );
        assert_eq!(
            from[2].pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector_labels(&ec)),
            "members"
        );
        assert!(from[3].namespace_selector.is_some(), "the operator");
        // The peer rule does not take the clients.
        assert_eq!(rule(&np, PEER_PORT).from.as_ref().unwrap().len(), 2);
        // An empty list: only members and the operator.
        let ec = cluster(serde_json::json!({"size": 3, "networkPolicy": {"clients": []}}));
        let np = network_policy(&ec, Some(&operator("cairn-system")));
        assert_eq!(rule(&np, CLIENT_PORT).from.as_ref().unwrap().len(), 2);
        // An operator that does not know its pod could not let itself in: the port stays open.
        let np = network_policy(&ec, None);
        assert_eq!(rule(&np, CLIENT_PORT).from, None);
    }
}
