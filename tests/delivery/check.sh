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

echo "== monitoring: the alerting rules (promtool check + unit tests), the chart's monitoring objects"
promtool check rules "$chart"/monitoring/*-rules.yaml
promtool test rules tests/monitoring/rules_test.yaml
helm template cairn-operator "$chart" --namespace cairn-system --set monitoring.enabled=true > "$work/monitoring.yaml"
# Without the operator's metrics, no operator rules (CairnOperatorDown would always fire).
helm template cairn-operator "$chart" --namespace cairn-system --set monitoring.enabled=true,metrics.enabled=false \
  | python3 -c 'import sys, yaml; r = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] == "PrometheusRule"][0]; assert [g["name"] for g in r["spec"]["groups"]] == ["cairn-members"], r'
# The Prometheus Operator's kinds are checked here (its CRDs are not in kubernetes-validate): the
# PrometheusRule carries the rules promtool checked, the dashboard is JSON, every monitor is there.
python3 - "$work/monitoring.yaml" "$work/rendered-rules.yaml" "$work/monitoring-core.yaml" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"] for d in docs}
for k in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
    assert k in kinds, f"{k} not rendered"
pod = next(d for d in docs if d["kind"] == "PodMonitor")
assert pod["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
groups = [g for f in ("members", "operator")
          for g in yaml.safe_load(open(f"charts/cairn-operator/monitoring/{f}-rules.yaml"))["groups"]]
assert rule["spec"] == {"groups": groups}, "the PrometheusRule is not the rules files"
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"))
board = next(d for d in docs if d["kind"] == "ConfigMap" and "cairn.json" in d.get("data", {}))
assert json.loads(board["data"]["cairn.json"])["panels"]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(core, open(sys.argv[3], "w"))
PY
promtool check rules "$work/rendered-rules.yaml"
kubernetes-validate --strict --quiet "$work/monitoring-core.yaml"

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
