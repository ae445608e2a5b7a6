#!/usr/bin/env bash
# Builds the cairn and cairn-operator container images and smoke-tests them.
#
# No registry is reachable, so the base image is made here: a minimal Debian bookworm from
# debootstrap, `docker import`ed as cairn-base:bookworm (its root filesystem is cached under
# ~/.cache/cairn-images). The binaries are release builds of this workspace; each image's
# build context holds the binary, the shared libraries it links and the CA certificates (see
# server/Dockerfile).
#
# Smoke test: the cairn image runs on a Docker network and answers etcdctl (put, get,
# endpoint status) from the host; the operator image runs and reports its version.
#
#   RUNTIME_BASE=scratch (default) | cairn-base:bookworm   the images' runtime base
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
cache="$HOME/.cache/cairn-images"
runtime_base="${RUNTIME_BASE:-scratch}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$cache"

if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
if ! docker image inspect cairn-base:bookworm >/dev/null 2>&1; then
  if [ ! -s "$cache/bookworm-minbase.tar" ]; then
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -cf "$cache/bookworm-minbase.tar.part" .
    mv "$cache/bookworm-minbase.tar.part" "$cache/bookworm-minbase.tar"
    rm -rf "$rootfs"
  fi
  docker import "$cache/bookworm-minbase.tar" cairn-base:bookworm >/dev/null
fi
echo "== base image: $(docker image inspect -f '{{.Id}}' cairn-base:bookworm | cut -c1-19)"

cargo build --release --locked -p cairn -p cairn-operator --bins

# A build context: the binary and, under their absolute paths, the libraries it links.
context() {
  local bin="$1" ctx
  ctx=$(mktemp -d)
  mkdir -p "$ctx/bin" "$ctx/lib"
  cp "$CARGO_TARGET_DIR/release/$bin" "$ctx/bin/"
  strip --strip-debug "$ctx/bin/$bin"
  ldd "$ctx/bin/$bin" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
    cp -L --parents "$lib" "$ctx/lib/"
  done
  # TLS clients (the Kubernetes API, S3) need the CA certificates.
  cp -L --parents /etc/ssl/certs/ca-certificates.crt "$ctx/lib/"
  echo "$ctx"
}

for image in cairn:server cairn-operator:operator; do
  name=${image%%:*}
  dir=${image##*:}
  ctx=$(context "$name")
  docker build -q -f "$dir/Dockerfile" --build-arg RUNTIME_BASE="$runtime_base" \
    -t "$name:$version" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "== built $name:$version on $runtime_base: $(docker image inspect -f '{{.Size}}' "$name:$version" | awk '{printf "%.1f MB", $1/1e6}')"
done

# For the upgrade scenario: cairn 0.1.0, the first release (built from its commit once, with the
# same Dockerfile), and an image whose cairn cannot start.
first=$(bash tests/delivery/first-release.sh)
ctx=$(mktemp -d)
mkdir -p "$ctx/bin" "$ctx/lib"
cp "$first" "$ctx/bin/cairn"
strip --strip-debug "$ctx/bin/cairn"
ldd "$ctx/bin/cairn" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
  cp -L --parents "$lib" "$ctx/lib/"
done
docker build -q -f server/Dockerfile --build-arg RUNTIME_BASE="$runtime_base" -t cairn:0.1.0 "$ctx" >/dev/null
rm -rf "$ctx"
docker run --rm cairn:0.1.0 --version | grep -q '^cairn 0.1.0'
ctx=$(mktemp -d)
printf '#!/bin/sh\necho "cairn: this build cannot start" >&2\nexit 1\n' > "$ctx/cairn"
chmod 755 "$ctx/cairn"
printf 'FROM cairn-base:bookworm\nCOPY cairn /usr/local/bin/cairn\nUSER 65532:65532\nENTRYPOINT ["/usr/local/bin/cairn"]\n' > "$ctx/Dockerfile"
docker build -q -t cairn:broken "$ctx" >/dev/null
rm -rf "$ctx"
echo "== built cairn:0.1.0 (the first release) and cairn:broken (for the upgrade scenario)"

echo "== smoke test: cairn:$version answers etcdctl"
net=cairn-smoke-$$
docker network create "$net" >/dev/null
cleanup() {
  docker rm -f "$net-member" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
}
trap cleanup EXIT
docker run -d --name "$net-member" --network "$net" "cairn:$version" \
  --name smoke --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://0.0.0.0:2379 \
  --listen-peer-urls http://0.0.0.0:2380 >/dev/null
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$net-member")
ep="http://$ip:2379"
for _ in $(seq 1 50); do
  curl -sf "$ep/readyz" >/dev/null && break
  sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$ep" put smoke/key "from-the-image"
got=$(ETCDCTL_API=3 etcdctl --endpoints "$ep" get --print-value-only smoke/key)
[ "$got" = "from-the-image" ] || { echo "read back '$got'" >&2; docker logs "$net-member" >&2; exit 1; }
ETCDCTL_API=3 etcdctl --endpoints "$ep" endpoint status -w table
[ "$(docker inspect -f '{{.Config.User}}' "cairn:$version")" = "65532:65532" ]
docker exec "$net-member" /usr/local/bin/cairn --version >/dev/null

echo "== smoke test: cairn-operator:$version runs"
docker run --rm "cairn-operator:$version" --version
# Without a Kubernetes API it must fail with an error, not hang or crash.
if out=$(timeout 30 docker run --rm -e KUBECONFIG=/nonexistent "cairn-operator:$version" 2>&1); then
  echo "the operator started without any Kubernetes API" >&2
  exit 1
fi
echo "$out" | grep -m1 -i error
# With a kubeconfig for an HTTPS API server (none listens there) it must fail cleanly too: this
# is where a TLS set-up problem (such as an ambiguous rustls crypto provider) would panic.
kdir=$(mktemp -d)
cat >"$kdir/kubeconfig" <<'KC'
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
KC
chmod 755 "$kdir"
chmod 644 "$kdir/kubeconfig"
# (It waits for the leader Lease first, which needs the API server: no server, an error exit.
# Run detached and waited for: as PID 1 it would not die of a forwarded SIGTERM.)
cid=$(docker run -d -v "$kdir:/kube:ro" -e KUBECONFIG=/kube/kubeconfig "cairn-operator:$version")
code=$(timeout 60 docker wait "$cid" || echo timeout)
out=$(docker logs "$cid" 2>&1)
docker rm -f "$cid" >/dev/null
rm -rf "$kdir"
# It must have got as far as connecting (TLS set up), and failed there.
if [ "$code" = 0 ] || [ "$code" = 101 ] || [ "$code" = timeout ] || echo "$out" | grep -q panicked \
  || ! echo "$out" | grep -qiE "connect|refused"; then
  echo "the operator did not fail cleanly against an unreachable HTTPS API server (exit $code):" >&2
  echo "$out" | tail -20 >&2
  exit 1
fi
echo "$out" | grep -m1 -iE "error|refused" || true
echo "images passed"
