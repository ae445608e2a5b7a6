#!/usr/bin/env bash
# Checks the delivery: the Helm chart lints strictly and renders manifests that Kubernetes' own
# schemas accept (strict: unknown fields refused), deploy/ passes the same check, the example
# EtcdClusters pass the CRD's schema while the invalid ones are refused, and the children the
# operator builds for each example pass Kubernetes' schemas.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
PATH="$(bash tests/delivery/tools.sh):$PATH"
chart=charts/cairn-operator
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== helm lint --strict"
helm lint --strict "$chart"

echo "== helm template | kubernetes-validate --strict"
helm template cairn-operator "$chart" --namespace cairn-system --include-crds > "$work/default.yaml"
helm template cairn-operator "$chart" --namespace ops --set watchNamespace=db,replicaCount=2,metrics.enabled=false,leaderElection.enabled=false \
  --set-string cairnImage=registry.local/cairn:1 > "$work/variant.yaml"
kubernetes-validate --strict --quiet "$work/default.yaml" "$work/variant.yaml"

echo "== deploy/ | kubernetes-validate --strict"
kubernetes-validate --strict --quiet deploy/*.yaml

echo "== example EtcdClusters against the CRD schema"
python3 tests/delivery/validate_crs.py crds/*.yaml \
  --valid deploy/examples/*.yaml --invalid tests/delivery/invalid/*.yaml

echo "== the operator's children for each example | kubernetes-validate --strict"
for f in deploy/examples/etcdcluster-*.yaml; do
  cargo run -q --locked -p cairn-operator --bin crdgen -- children "$f" > "$work/children.yaml"
  kubernetes-validate --strict --quiet "$work/children.yaml"
done
echo "delivery checks passed"
