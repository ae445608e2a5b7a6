#!/usr/bin/env bash
# The scale benchmark (issue 22): cairn and etcd 3.4 loaded with the same data set, one
# server at a time, figures side by side. Not part of CI: at the default 1M keys of 1 KiB it
# runs for about half an hour per snapshot count. Arguments go to scale.py
# (e.g. --keys 4000000, --snapshot-count default 2000, --only cairn, --members 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/deps.sh
bash tests/bench/etcd-tools.sh
tools="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"
# The client: etcd 3.4's Go client (Debian's golang-etcd-server-dev, GOPATH mode).
if [ ! -x "$tools/cairn-scale" ] || [ tests/bench/scale/main.go -nt "$tools/cairn-scale" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/gopath/src/cairnscale"
  cp tests/bench/scale/main.go "$work/gopath/src/cairnscale/"
  (cd "$work" && PATH="/usr/lib/go-1.19/bin:$PATH" GO111MODULE=off \
    GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache" \
    go build -o "$tools/cairn-scale" cairnscale)
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
cargo build --release --locked -p cairn
exec python3 tests/bench/scale.py "$@"
