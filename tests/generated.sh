#!/usr/bin/env bash
# Regenerates the committed generated files (the CRDs from the Rust types).
# With --check, fails when a committed file differs from what the code generates.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"

check=false
[ "${1:-}" = "--check" ] && check=true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

mkdir -p "$out/crds"
cargo run -q --locked -p cairn-operator --bin crdgen > "$out/crds/etcdclusters.cairn.dev.yaml"

status=0
for f in crds/etcdclusters.cairn.dev.yaml; do
  if $check; then
    if ! diff -u "$f" "$out/$f"; then
      echo "generated file $f is out of date: run bash tests/generated.sh" >&2
      status=1
    fi
  else
    cp "$out/$f" "$f"
  fi
done
exit $status
