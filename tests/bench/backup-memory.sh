#!/usr/bin/env bash
# Measures a backup of a large snapshot: a cairn member loaded with about MIB MiB (etcd's
# `benchmark put`, 100 KiB values), then `cairn-operator backup` streams its snapshot into
# moto_server (S3) exactly as the operator does. Prints the snapshot size, the streaming rate
# and the backup process's peak memory (GNU time's maximum resident set size).
#
#   bash tests/bench/backup-memory.sh [MIB]      (default 400)
set -euo pipefail
cd "$(dirname "$0")/../.."
mib="${1:-400}"
bash tests/deps.sh
bash tests/bench/etcd-tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
tools="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"
cargo build -q --release --locked -p cairn -p cairn-operator --bins
bin="$CARGO_TARGET_DIR/release"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cp=$(port); pp=$(port); sp=$(port)

"$bin/cairn" --name m --data-dir "$work/data" --listen-client-urls "http://127.0.0.1:$cp" \
  --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
  --initial-advertise-peer-urls "http://127.0.0.1:$pp" --initial-cluster "m=http://127.0.0.1:$pp" \
  --quota-backend-bytes $((8 << 30)) >"$work/cairn.log" 2>&1 &
pids+=($!)
moto_server -H 127.0.0.1 -p "$sp" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$cp/health" >/dev/null && curl -s "http://127.0.0.1:$sp" >/dev/null && break
  sleep 0.2
done
curl -sf -X PUT "http://127.0.0.1:$sp/backups" >/dev/null

echo "loading about $mib MiB into cairn..."
"$tools/benchmark" --endpoints "127.0.0.1:$cp" --clients 8 --conns 2 put \
  --key-size 32 --val-size 102400 --total $((mib * 10)) --sequential-keys --key-space-size $((mib * 10)) >/dev/null 2>&1

# The server's resident memory while it streams the snapshot, sampled every 50 ms.
cairn_pid=${pids[0]}
rss() { awk '/^VmRSS/ {print $2}' "/proc/$cairn_pid/status"; }
echo "$(rss)" >"$work/rss-before"
( while :; do rss; sleep 0.05; done ) >"$work/rss-samples" 2>/dev/null &
sampler=$!

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
/usr/bin/time -v "$bin/cairn-operator" backup --bucket backups --endpoint "http://127.0.0.1:$sp" \
  --region us-east-1 --force-path-style --endpoints "http://127.0.0.1:$cp" \
  >"$work/record.json" 2>"$work/time.txt"
kill "$sampler" 2>/dev/null || true
python3 - "$work/record.json" "$work/time.txt" "$work/rss-before" "$work/rss-samples" <<'PY'
import json, re, sys
rec = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
before = int(open(sys.argv[3]).read().split()[0])
samples = [int(x) for x in open(sys.argv[4]).read().split() if x.isdigit()]
rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
secs = 0.0
for part in wall.split(":"):
    secs = secs * 60 + float(part)
size_mib = rec["size"] / 2**20
print(f"snapshot: {size_mib:.1f} MiB at revision {rec['revision']}, sha256 {rec['sha256'][:16]}...")
print(f"streamed into S3 (moto) in {secs:.2f} s: {size_mib / secs:.1f} MiB/s")
print(f"backup process peak RSS: {rss_kib / 1024:.1f} MiB")
print(f"cairn server RSS: {before / 1024:.1f} MiB before, at most {max(samples + [before]) / 1024:.1f} MiB while streaming")
PY
