//! Prints the CustomResourceDefinitions as YAML; the output is committed under `crds/`.

use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    print!(
        "{}",
        serde_yaml::to_string(&cairn_operator::crd::EtcdCluster::crd())?
    );
    Ok(())
}
