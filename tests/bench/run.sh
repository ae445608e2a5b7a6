#!/usr/bin/env bash
# The benchmark command: same load, same tool (etcd's `benchmark`), fresh
# etcd 3.4 and cairn servers, alternating; prints medians and ratios.
# Arguments go to bench.py (e.g. --rounds 5, --only put).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/deps.sh
bash tests/bench/etcd-tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
cargo build --release --locked -p cairn
exec python3 tests/bench/bench.py "$@"
