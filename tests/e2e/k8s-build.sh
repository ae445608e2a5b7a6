#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the end-to-end tests: kube-apiserver and
# kube-controller-manager 1.20 from Debian bookworm's `kubernetes` source package (its orig
# tarball vendors every dependency) with Debian's Go 1.19. The vendored modern-go/reflect2 1.0.1
# crashes the API server under Go >= 1.18, so it is replaced by Debian's 1.0.2 first.
# Output: $CAIRN_K8S (default ~/.cache/cairn-k8s); nothing is built when both binaries exist.
set -euo pipefail

out="${CAIRN_K8S:-$HOME/.cache/cairn-k8s}"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ]; then
  exit 0
fi
bash "$(dirname "$0")/../deb-src.sh" golang-github-modern-go-reflect2-dev rsync

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source -qq --download-only kubernetes >/dev/null 2>&1)
orig="$(find "$work" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n1)"
[ -n "$orig" ] || { echo "kubernetes source package not found" >&2; exit 1; }
mkdir -p "$work/src"
tar -xf "$orig" -C "$work/src" --strip-components=1
rm -rf "$work/src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$work/src/vendor/github.com/modern-go/reflect2"
export PATH="/usr/lib/go-1.19/bin:$PATH" GOFLAGS=-mod=vendor GOCACHE="$work/gocache"
(cd "$work/src" && make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$work/build.log" 2>&1) || {
  tail -40 "$work/build.log" >&2
  exit 1
}
mkdir -p "$out"
cp "$work"/src/_output/local/bin/linux/*/kube-apiserver "$work"/src/_output/local/bin/linux/*/kube-controller-manager "$out/"
echo "built $out/kube-apiserver $out/kube-controller-manager" >&2
