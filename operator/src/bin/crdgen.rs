//! Prints the CustomResourceDefinitions as YAML (`crdgen`), or writes one file per CRD into a
//! directory (`crdgen --dir crds`); the output is committed under `crds/`.
//!
//! `crdgen children FILE` prints instead the children the operator would apply for the
//! EtcdCluster in FILE at bootstrap, so CI can check them against Kubernetes' own schemas.

use cairn_operator::crd::{EtcdBackup, EtcdCluster};
use cairn_operator::layout::{Layout, Names, Schemed};
use cairn_operator::resources::{self, Bootstrap};
use cairn_operator::tls;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::Deserialize;

fn crds() -> Vec<CustomResourceDefinition> {
    vec![EtcdCluster::crd(), EtcdBackup::crd()]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            let docs = crds()
                .iter()
                .map(serde_yaml::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            print!("{}", docs.join("---\n"));
        }
        [flag, dir] if flag == "--dir" => {
            for crd in crds() {
                let name = crd.metadata.name.clone().unwrap_or_default();
                std::fs::write(
                    std::path::Path::new(dir).join(format!("{name}.yaml")),
                    serde_yaml::to_string(&crd)?,
                )?;
            }
        }
        [cmd, file] if cmd == "children" => {
            // The file may hold other objects too (a Secret): take the EtcdCluster.
            let text = std::fs::read_to_string(file)?;
            let mut ec: EtcdCluster = serde_yaml::Deserializer::from_str(&text)
                .map(serde_yaml::Value::deserialize)
                .filter_map(Result::ok)
                .find(|v| v.get("kind").and_then(|k| k.as_str()) == Some("EtcdCluster"))
                .map(serde_yaml::from_value)
                .ok_or_else(|| anyhow::anyhow!("{file}: no EtcdCluster"))??;
            ec.metadata
                .namespace
                .get_or_insert_with(|| "default".to_string());
            ec.metadata.uid = Some("00000000-0000-0000-0000-000000000000".to_string());
            let names = Names::of(&ec);
            let size = ec.spec.size;
            let serving = tls::wanted(&names, ec.spec.tls.as_ref())
                .map_err(anyhow::Error::msg)?
                .serving();
            let layout = Schemed {
                inner: std::sync::Arc::new(names.clone()),
                client_https: Default::default(),
                peer_https: serving.peer_https(),
            };
            let boot = Bootstrap {
                initial_cluster: layout.initial_cluster(&(0..size).collect::<Vec<_>>()),
                new_cluster: true,
            };
            let restore = ec
                .spec
                .bootstrap
                .as_ref()
                .and_then(|b| b.source().ok().flatten())
                .map(|(f, etcd_snapshot)| resources::Restore {
                    key: f
                        .key
                        .clone()
                        .unwrap_or_else(|| "example/20260101T000000Z.snap".into()),
                    destination: f.destination.clone(),
                    operator_image: "cairn-operator:example".into(),
                    etcd_snapshot,
                    identity: Default::default(),
                });
            let docs = [
                serde_yaml::to_string(&resources::peer_service(&ec))?,
                serde_yaml::to_string(&resources::client_service(&ec))?,
                serde_yaml::to_string(&resources::bootstrap_configmap(&ec, &boot, None))?,
                serde_yaml::to_string(&resources::statefulset_restoring(
                    &ec,
                    size,
                    &resources::default_image(),
                    restore.as_ref(),
                    &serving,
                ))?,
                serde_yaml::to_string(&resources::pdb(&ec, size))?,
                serde_yaml::to_string(&cairn_operator::network::network_policy(
                    &ec,
                    cairn_operator::network::OperatorPod::from_env(
                        Some("cairn-system".into()),
                        Some("app.kubernetes.io/name=cairn-operator".into()),
                    )
                    .as_ref(),
                ))?,
            ];
            print!("{}", docs.join("---\n"));
        }
        _ => anyhow::bail!("usage: crdgen [--dir DIR | children ETCDCLUSTER.yaml]"),
    }
    Ok(())
}
