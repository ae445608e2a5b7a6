#!/usr/bin/env bash
# Builds etcd 3.4's own tools (`benchmark`, `etcd-runner`) from Debian's
# etcd source package with Debian's Go 1.19 and the golang-*-dev packages
# (GOPATH mode, no module downloads). Output: $CAIRN_TOOLS (default
# ~/.cache/cairn-tools). Nothing is built when both binaries exist.
set -euo pipefail

out="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"
if [ -x "$out/benchmark" ] && [ -x "$out/etcd-runner" ]; then
  exit 0
fi
bash "$(dirname "$0")/../deb-src.sh" golang-etcd-server-dev

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source -qq etcd >/dev/null 2>&1)
src="$(find "$work" -maxdepth 1 -type d -name 'etcd-3.4*' | head -n1)"
[ -n "$src" ] || { echo "etcd source package not found" >&2; exit 1; }
mkdir -p "$work/gopath/src/go.etcd.io" "$out"
mv "$src" "$work/gopath/src/go.etcd.io/etcd"
# Debian builds against its packaged dependencies, not the vendor tree.
rm -rf "$work/gopath/src/go.etcd.io/etcd/vendor"
export PATH="/usr/lib/go-1.19/bin:$PATH" GO111MODULE=off GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache"
go build -o "$out/benchmark" go.etcd.io/etcd/tools/benchmark
go build -o "$out/etcd-runner" go.etcd.io/etcd/functional/cmd/etcd-runner
echo "built $out/benchmark $out/etcd-runner" >&2
