#!/usr/bin/env bash
# Measures a migration from etcd: etcd 3.4 (Debian's) loaded by etcd's `benchmark put` until
# its snapshot is about MIB MiB (1 KiB values, a quarter of the keys written twice, so history
# too; bbolt stores a few values per 4 KiB page), `etcdctl snapshot
# save`, then `cairn snapshot restore` of that file (timed, with its peak memory), then a cairn
# member started on the restored data dir (time to its first answer) and checked: the same key
# count and revision as etcd's.
#
#   bash tests/bench/migrate.sh [MIB]      (default 1024)
set -euo pipefail
cd "$(dirname "$0")/../.."
mib="${1:-1024}"
bash tests/deps.sh
bash tests/bench/etcd-tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
tools="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"
cargo build -q --release --locked -p cairn --bins
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
ep=$(port); epp=$(port); cp=$(port); cpp=$(port)

etcd --name e --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ep" \
  --advertise-client-urls "http://127.0.0.1:$ep" --listen-peer-urls "http://127.0.0.1:$epp" \
  --initial-advertise-peer-urls "http://127.0.0.1:$epp" --initial-cluster "e=http://127.0.0.1:$epp" \
  --quota-backend-bytes $((8 << 30)) >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ep/health" >/dev/null && break; sleep 0.2; done

keys=$((mib * 760))
echo "loading etcd: $keys keys of 1 KiB, a quarter of them written twice..."
"$tools/benchmark" --endpoints "127.0.0.1:$ep" --clients 32 --conns 4 put \
  --key-size 32 --val-size 1024 --total "$keys" --sequential-keys --key-space-size "$keys" >/dev/null 2>&1
"$tools/benchmark" --endpoints "127.0.0.1:$ep" --clients 32 --conns 4 put \
  --key-size 32 --val-size 1024 --total $((keys / 4)) --sequential-keys --key-space-size $((keys / 4)) >/dev/null 2>&1
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$1" "${@:2}"; }
ctl "127.0.0.1:$ep" snapshot save "$work/etcd.db" >/dev/null 2>&1
# The range's count is every key in it, whatever the limit.
count() { ctl "$1" get "" --prefix --limit 1 -w json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["count"], d["header"]["revision"])'; }
etcd_count=$(count "127.0.0.1:$ep")
kill "${pids[0]}"

/usr/bin/time -v "$bin/cairn" snapshot restore "$work/etcd.db" --data-dir "$work/cairn" --name m \
  --initial-cluster "m=http://127.0.0.1:$cpp" --initial-cluster-token migrated \
  >"$work/restore.txt" 2>"$work/time.txt"
start=$(date +%s.%N)
"$bin/cairn" --name m --data-dir "$work/cairn" --listen-client-urls "http://127.0.0.1:$cp" \
  --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$cpp" \
  --initial-advertise-peer-urls "http://127.0.0.1:$cpp" --initial-cluster "m=http://127.0.0.1:$cpp" \
  --quota-backend-bytes $((8 << 30)) >"$work/cairn.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$cp/health" >/dev/null; do sleep 0.05; done
ready=$(python3 -c "import time; print(f'{time.time() - $start:.2f}')")
cairn_count=$(count "127.0.0.1:$cp")
python3 - "$work/etcd.db" "$work/time.txt" "$work/restore.txt" "$etcd_count" "$cairn_count" "$ready" <<'PY'
import os, re, sys
size = os.path.getsize(sys.argv[1]) / 2**20
t = open(sys.argv[2]).read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
secs = 0.0
for part in wall.split(":"):
    secs = secs * 60 + float(part)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
print(open(sys.argv[3]).read().strip())
print(f"etcd snapshot: {size:.1f} MiB; etcd: keys, revision = {sys.argv[4]}")
print(f"cairn snapshot restore: {secs:.1f} s ({size / secs:.1f} MiB/s), peak RSS {rss:.0f} MiB")
print(f"restored member answering {sys.argv[6]} s after start; cairn: keys, revision = {sys.argv[5]}")
if sys.argv[4] != sys.argv[5]:
    sys.exit("etcd and cairn differ")
PY
