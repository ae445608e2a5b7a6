#!/usr/bin/env bash
# What the scripts that build Go tools from Debian's source packages share: a deb-src entry for
# bookworm (so that `apt-get source` works), fresh package lists, and dpkg-dev, Debian's Go 1.19
# and the packages given as arguments. Idempotent.
#   bash tests/deb-src.sh [PACKAGE...]
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  $SUDO tee /etc/apt/sources.list.d/cairn-deb-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  dpkg-dev golang-1.19-go "$@" >/dev/null
