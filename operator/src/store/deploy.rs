//! The objects that run a claim's store server: pure builders (no I/O). The claim owns them
//! (deleting it deletes its server); no cluster does, as several may share the claim.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, PersistentVolumeClaim,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, Secret, SecretKeySelector, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use super::{PORT, TOKEN_ENV, URL_ENV};
use crate::crd::PvcDestination;

/// Where the server mounts the claim.
const ROOT: &str = "/store";
/// The pod template's annotation with a digest of the token the pod reads.
pub const TOKEN_ANNOTATION: &str = "cairn.dev/store-token-sha256";

/// The first 16 hex digits of the token's SHA-256 (the token itself stays in its Secret).
fn token_digest(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The labels of a claim's server (and the Service's selector).
pub fn labels(p: &PvcDestination) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "cairn-store".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            p.claim_name.clone(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "cairn-operator".to_string(),
        ),
    ])
}

fn meta(p: &PvcDestination, claim: &PersistentVolumeClaim) -> ObjectMeta {
    ObjectMeta {
        name: Some(p.server_name()),
        namespace: claim.metadata.namespace.clone(),
        labels: Some(labels(p)),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".to_string(),
            kind: "PersistentVolumeClaim".to_string(),
            name: p.claim_name.clone(),
            uid: claim.metadata.uid.clone().unwrap_or_default(),
            ..OwnerReference::default()
        }]),
        ..ObjectMeta::default()
    }
}

/// The server's URL for pods and the operator alike (`<service>.<namespace>.svc`).
pub fn url(p: &PvcDestination, namespace: &str) -> String {
    format!("http://{}.{namespace}.svc:{PORT}", p.server_name())
}

/// The Secret with the token every request carries and the server's URL (made once; a URL
/// changed in it is kept, e.g. a store reached another way).
pub fn secret(p: &PvcDestination, claim: &PersistentVolumeClaim, token: &str) -> Secret {
    let ns = claim.metadata.namespace.clone().unwrap_or_default();
    Secret {
        metadata: meta(p, claim),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (TOKEN_ENV.to_string(), ByteString(token.as_bytes().to_vec())),
            (URL_ENV.to_string(), ByteString(url(p, &ns).into_bytes())),
        ])),
        ..Secret::default()
    }
}

pub fn service(p: &PvcDestination, claim: &PersistentVolumeClaim) -> Service {
    Service {
        metadata: meta(p, claim),
        spec: Some(ServiceSpec {
            selector: Some(labels(p)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: PORT as i32,
                target_port: Some(IntOrString::Int(PORT as i32)),
                // A key of the list for server-side apply (Kubernetes 1.20 has no default).
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// One pod that mounts the claim and serves it (`cairn-operator serve-store`, the operator's
/// image). `Recreate`: the old pod lets the (usually ReadWriteOnce) claim go before the new one
/// mounts it.
pub fn deployment(
    p: &PvcDestination,
    claim: &PersistentVolumeClaim,
    image: &str,
    token: &str,
) -> Deployment {
    let labels = labels(p);
    let container = Container {
        name: "store".to_string(),
        image: Some(image.to_string()),
        args: Some(vec![
            "serve-store".to_string(),
            format!("--root={ROOT}"),
            format!("--listen=0.0.0.0:{PORT}"),
        ]),
        env: Some(vec![EnvVar {
            name: TOKEN_ENV.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: p.server_name(),
                    key: TOKEN_ENV.to_string(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_string()),
            container_port: PORT as i32,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(PORT as i32),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".to_string())),
                ("memory".to_string(), Quantity("32Mi".to_string())),
            ])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "store".to_string(),
            mount_path: ROOT.to_string(),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(crate::resources::container_security()),
        ..Container::default()
    };
    Deployment {
        metadata: meta(p, claim),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_string()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    // A new token (the Secret made again) rolls the pod onto it.
                    annotations: Some(BTreeMap::from([(
                        TOKEN_ANNOTATION.to_string(),
                        token_digest(token),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        // Not every file of the claim re-owned at every start.
                        fs_group_change_policy: Some("OnRootMismatch".to_string()),
                        ..crate::resources::pod_security()
                    }),
                    volumes: Some(vec![Volume {
                        name: "store".to_string(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: p.claim_name.clone(),
                            read_only: Some(false),
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("backups".into()),
                namespace: Some("team".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            ..PersistentVolumeClaim::default()
        }
    }

    #[test]
    fn the_server_mounts_the_claim_and_is_owned_by_it() {
        let p = PvcDestination {
            claim_name: "backups".into(),
            prefix: "etcd".into(),
        };
        let c = claim();
        let d = deployment(&p, &c, "cairn-operator:test", "t0k3n");
        let other = deployment(&p, &c, "cairn-operator:test", "another");
        let digest = |d: &Deployment| {
            d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[TOKEN_ANNOTATION]
                .clone()
        };
        assert_eq!(digest(&d).len(), 16);
        assert_ne!(digest(&d), digest(&other), "a new token rolls the pod");
        assert_eq!(d.metadata.name.as_deref(), Some("cairn-store-backups"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("PersistentVolumeClaim", "uid-1")
        );
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(
            spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        let pod = spec.template.spec.as_ref().unwrap();
        let vol = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(
            vol.persistent_volume_claim.as_ref().unwrap().claim_name,
            "backups"
        );
        let ctr = &pod.containers[0];
        assert_eq!(ctr.args.as_ref().unwrap()[0], "serve-store");
        // Keys of the lists for server-side apply: Kubernetes 1.20 refuses a port without one
        // ("associative list with keys has an element that omits key field protocol").
        assert_eq!(
            ctr.ports.as_ref().unwrap()[0].protocol.as_deref(),
            Some("TCP")
        );
        assert_eq!(
            service(&p, &c).spec.unwrap().ports.unwrap()[0]
                .protocol
                .as_deref(),
            Some("TCP")
        );
        let token = &ctr.env.as_ref().unwrap()[0];
        assert_eq!(token.name, TOKEN_ENV);
        assert_eq!(
            token
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "cairn-store-backups"
        );
        assert_eq!(
            spec.template.metadata.as_ref().unwrap().labels,
            service(&p, &c).spec.unwrap().selector
        );
        let s = secret(&p, &c, "t0k3n");
        let data = s.data.unwrap();
        assert_eq!(data[TOKEN_ENV].0, b"t0k3n");
        assert_eq!(
            String::from_utf8(data[URL_ENV].0.clone()).unwrap(),
            "http://cairn-store-backups.team.svc:8080"
        );
    }
}
