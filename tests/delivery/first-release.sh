#!/usr/bin/env bash
# Builds cairn 0.1.0, the first release (commit fbfb0c4, the build the upgrade tests start
# from), once: its binary goes to ~/.cache/cairn-releases/0.1.0/cairn and is reused while it
# exists. The sources come from this clone's history (`git archive`), so no network is needed;
# the build has a target dir of its own, so that its `cairn` binary never takes the place of
# this workspace's. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
commit=fbfb0c42b38e9343fc38b523221930feedc66b01
out="$HOME/.cache/cairn-releases/0.1.0"
if [ -x "$out/cairn" ] && [ "$(cat "$out/commit" 2>/dev/null)" = "$commit" ]; then
  echo "$out/cairn"
  exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  echo "first-release.sh: commit $commit is not in this clone (a shallow clone?): fetch the history first" >&2
  exit 1
fi
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git archive "$commit" | tar -x -C "$src"
CARGO_TERM_COLOR=never cargo build --release --locked -q -p cairn --bin cairn \
  --manifest-path "$src/Cargo.toml" --target-dir "$HOME/.cache/cairn-first-release-target" >&2
mkdir -p "$out"
cp "$HOME/.cache/cairn-first-release-target/release/cairn" "$out/cairn.part"
mv "$out/cairn.part" "$out/cairn"
echo "$commit" > "$out/commit"
echo "$out/cairn"
