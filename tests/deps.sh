#!/usr/bin/env bash
# Installs what building and testing cairn needs, from Debian's packages:
# protoc, RocksDB (linked from the system instead of compiling its C++),
# libclang for the RocksDB bindings, and etcd 3.4 + etcdctl, which the tests
# run side by side with cairn; curl, openssl and procps (the end-to-end tests' S3 calls,
# certificates and leftover check), promtool (Debian's prometheus package: the chart's alerting
# rules are checked and unit-tested with it); and from PyPI, moto's S3-compatible server for
# the backup tests. Idempotent; quiet when everything is there.
set -euo pipefail

packages=(protobuf-compiler libprotobuf-dev iproute2 librocksdb-dev libclang-dev clang pkg-config etcd-server etcd-client curl openssl procps prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The etcd package starts a system etcd on 2379; cairn's tests use free ports,
# but a developer running `cargo run` wants 2379 free.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
# A real S3-compatible server (in memory) for the backup tests.
if ! command -v moto_server >/dev/null || ! python3 -m pip show -q moto >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "moto[server]==5.2.1" >&2
fi
