#!/usr/bin/env bash
# The end-to-end scenarios on a real control plane (tests/e2e/*.rs). Needs the images
# (tests/delivery/images.sh builds them), builds kube-apiserver and kube-controller-manager 1.20
# once (tests/e2e/k8s-build.sh, cached in ~/.cache/cairn-k8s), then runs every scenario, one at a
# time. Extra arguments go to the test binary, e.g. `bash tests/e2e/run.sh s3_` for one scenario.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
export CAIRN_TOOLS="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"

bash tests/e2e/k8s-build.sh
bash tests/delivery/tools.sh >/dev/null
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
for image in "cairn:$version" "cairn-operator:$version" cairn-base:bookworm cairn:0.1.0 cairn:broken; do
  docker image inspect "$image" >/dev/null 2>&1 || {
    echo "image $image is missing: run tests/delivery/images.sh first" >&2
    exit 1
  }
done
# The control plane's storage in cairn mode is the release binary the images hold.
cargo build --release --locked -p cairn -p cairn-operator --bins
# Leftovers of an interrupted earlier run.
docker ps -aq --filter label=cairn-e2e.run | xargs -r docker rm -f -v >/dev/null
docker volume ls -q --filter label=cairn-e2e.run | xargs -r docker volume rm -f >/dev/null
docker network ls -q --filter label=cairn-e2e.run | xargs -r docker network rm >/dev/null

start=$(date +%s)
cargo test -p cairn-operator --test e2e --locked -- --test-threads=1 --nocapture "$@"
echo "== end-to-end scenarios: $(( $(date +%s) - start )) s"
# Each scenario leaves nothing running.
left=$(docker ps -aq --filter label=cairn-e2e.run; docker volume ls -q --filter label=cairn-e2e.run;
  docker network ls -q --filter label=cairn-e2e.run
  for p in kube-apiserver kube-controller moto_server; do pgrep -x "$p" || true; done)
if [ -n "$left" ]; then
  echo "the scenarios left these behind: $left" >&2
  exit 1
fi
