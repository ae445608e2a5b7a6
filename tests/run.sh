#!/usr/bin/env bash
# The whole test suite: installs prerequisites, checks formatting and lints,
# checks generated files and the delivery (Helm chart, deploy/, CRD examples),
# then runs every unit and integration test (differential tests against
# etcd 3.4, the kill -9 crash test, openraft's storage suite, the 3- and
# 5-member fault suites in network namespaces, etcd's etcd-runner checkers,
# the operator's builders, planner, reconciles on a mock API server and
# membership steps on real cairn clusters), builds and smoke-tests the
# container images, and last runs the end-to-end scenarios on a real
# Kubernetes control plane with those images.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/deps.sh
# etcd's etcd-runner (and benchmark), built once from Debian's etcd source.
bash tests/bench/etcd-tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo fmt --all --check
# Generated files (CRDs, deploy/) are committed: regenerate and fail on any difference.
bash tests/generated.sh --check
# The Helm chart, deploy/ and example EtcdClusters against Kubernetes' and the CRD's schemas.
bash tests/delivery/check.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# Container images of cairn and cairn-operator on a locally made base, smoke-tested.
bash tests/delivery/images.sh
# End-to-end: a real kube-apiserver and kube-controller-manager 1.20 (built once from Debian's
# source), pods on Docker through the tests' node agent, the operator installed with Helm.
bash tests/e2e/run.sh
