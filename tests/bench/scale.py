#!/usr/bin/env python3
"""cairn and etcd 3.4 at real data sizes (issue 22), one server at a time, same steps, same
machine, printed side by side.

For each snapshot count asked for (etcd's and cairn's default, and e.g. 2000 so that both take
Raft snapshots during the load and a new member catches up by snapshot):

1 member:  load N keys of --val-size bytes with distinct random values (64 clients, 8
           connections) -> rate, RSS, data-dir size; a full keys-only range; one writer's put
           p99/max while 2 clients loop full keys-only ranges; `etcdctl snapshot save` time and
           the server's peak RSS meanwhile; restart to serving (SIGTERM, start, /health and a
           linearizable get) and RSS after it; a learner from an empty data dir: time until it
           holds the leader's revision, peak RSS of leader and learner; every key written again,
           then the writer's p99 while a physical compaction of those N revisions runs.
3 members: load N keys, then the writer's put p99/max beside full ranges, and the leader
           changes seen meanwhile (etcd_server_leader_changes_seen_total, summed).

Both servers get --quota-backend-bytes 8 GiB (N x 1 KiB passes etcd's 2 GiB default from about
1.8M keys). RSS is VmRSS from /proc, sampled every 100 ms. The client is tests/bench/scale
(etcd 3.4's Go client).

Usage: scale.py [--keys N] [--val-size B] [--snapshot-count default 2000] [--only etcd cairn]
                [--members 1 3] [--skip save learner compaction]
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

TOOLS = os.environ.get("CAIRN_TOOLS", os.path.expanduser("~/.cache/cairn-tools"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/cairn-target"))
SERVERS = {"etcd": shutil.which("etcd") or "etcd", "cairn": os.path.join(TARGET, "release", "cairn")}
SCALE = os.path.join(TOOLS, "cairn-scale")
QUOTA = str(8 << 30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Peak:
    """Samples the RSS of some processes every 100 ms until stopped; keeps each one's peak."""

    def __init__(self, procs):
        self.procs = procs
        self.peak = {p.pid: rss_mib(p.pid) for p in procs}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.1):
            for p in self.procs:
                self.peak[p.pid] = max(self.peak[p.pid], rss_mib(p.pid))

    def stop(self):
        self.done.set()
        self.thread.join()
        return [self.peak[p.pid] for p in self.procs]


def du_mib(path):
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout
    return int(out.split()[0]) / (1 << 20)


def scale(cmd, endpoints, *args):
    out = subprocess.run([SCALE, cmd, "--endpoints", endpoints, *args], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cairn-scale {cmd}: {out.stderr.strip()}")
    return dict(re.findall(r"(\w+)=([\w.]+)", out.stdout.split(" during: ")[0])), out.stdout


def ctl(endpoints, *args, check=True):
    return subprocess.run(["etcdctl", "--endpoints", endpoints, *args], capture_output=True,
                          text=True, check=check, env=dict(os.environ, ETCDCTL_API="3"))


class Member:
    def __init__(self, kind, base, name, cport, pport, initial, state, extra):
        self.kind, self.name, self.cport, self.pport = kind, name, cport, pport
        self.data = os.path.join(base, name)
        self.url = f"http://127.0.0.1:{cport}"
        self.flags = ["--name", name, "--data-dir", self.data,
                      "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                      "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                      "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                      "--initial-cluster", initial, "--initial-cluster-state", state,
                      "--quota-backend-bytes", QUOTA, "--logger", "zap", "--log-level", "error",
                      *extra]
        self.log = open(os.path.join(base, f"{name}.log"), "a")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([SERVERS[self.kind], *self.flags], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def healthy(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} {self.name} exited {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if b'"health":"true"' in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} {self.name} did not become healthy")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def leader_changes(self):
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
                m = re.search(rb"^etcd_server_leader_changes_seen_total (\d+)", r.read(), re.M)
                return int(m.group(1)) if m else 0
        except OSError:
            return 0


def cluster(kind, base, n, extra):
    ports = [(free_port(), free_port()) for _ in range(n)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    members = [Member(kind, base, f"m{i}", c, p, initial, "new", extra)
               for i, (c, p) in enumerate(ports)]
    for m in members:
        m.start()
    for m in members:
        m.healthy()
    return members


def one_member(kind, base, keys, val_size, extra, r, skip=()):
    [m] = cluster(kind, base, 1, extra)
    ep = f"127.0.0.1:{m.cport}"
    try:
        out, _ = scale("load", ep, "--total", str(keys), "--val-size", str(val_size))
        r["load rate (keys/s)"] = float(out["rate"])
        r["RSS after load (MiB)"] = rss_mib(m.proc.pid)
        r["data dir (MiB)"] = du_mib(m.data)
        out, _ = scale("range", ep)
        r["full keys-only range (s)"] = float(out["range_seconds"])
        out, _ = scale("probe", ep, "--duration", "20s", "--readers", "2")
        r["put p99 beside ranges, 1 member (ms)"] = float(out["p99_ms"])
        r["put max beside ranges, 1 member (ms)"] = float(out["max_ms"])

        if "save" not in skip:
            snap = os.path.join(base, "save.db")
            peak = Peak([m.proc])
            t = time.time()
            ctl(ep, "snapshot", "save", snap)
            r["snapshot save (s)"] = time.time() - t
            r["peak RSS during save (MiB)"] = peak.stop()[0]
            os.remove(snap)

        m.stop()
        t = time.time()
        m.start()
        m.healthy(timeout=600)
        while ctl(ep, "get", "probe-0", check=False).returncode != 0:
            time.sleep(0.05)
        r["restart to serving (s)"] = time.time() - t
        r["RSS after restart (MiB)"] = rss_mib(m.proc.pid)

        if "learner" not in skip:
            target = int(json.loads(ctl(ep, "endpoint", "status", "-w", "json").stdout)[0]
                         ["Status"]["header"]["revision"])
            cport, pport = free_port(), free_port()
            initial = f"m0=http://127.0.0.1:{m.pport},l1=http://127.0.0.1:{pport}"
            ctl(ep, "member", "add", "l1", "--learner", f"--peer-urls=http://127.0.0.1:{pport}")
            learner = Member(kind, base, "l1", cport, pport, initial, "existing", extra)
            t = time.time()
            learner.start()
            peak = Peak([m.proc, learner.proc])
            lep = f"127.0.0.1:{cport}"
            deadline = time.time() + 1800
            while True:
                st = ctl(lep, "endpoint", "status", "-w", "json", check=False)
                if st.returncode == 0 and int(json.loads(st.stdout)[0]["Status"]["header"]
                                              ["revision"]) >= target:
                    break
                if learner.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{kind} learner did not catch up")
                time.sleep(0.1)
            r["learner catch-up (s)"] = time.time() - t
            r["peak RSS leader, learner (MiB)"] = peak.stop()
            learner.stop()
        if "compaction" in skip:
            return

        out, _ = scale("load", ep, "--total", str(keys), "--val-size", str(val_size))
        r["rewrite rate (keys/s)"] = float(out["rate"])
        _, line = scale("compact", ep)
        during = dict(re.findall(r"(\w+)=([\w.]+)", line.split(" during: ")[1]))
        before = dict(re.findall(r"(\w+)=([\w.]+)", line.split(" during: ")[0].split("before: ")[1]))
        r["compaction of N revisions (s)"] = float(re.search(r"compact_seconds=([\d.]+)", line).group(1))
        r["put p99 before, during compaction (ms)"] = [float(before["p99_ms"]), float(during["p99_ms"])]
    finally:
        m.stop()


def three_members(kind, base, keys, val_size, extra, r):
    ms = cluster(kind, base, 3, extra)
    eps = ",".join(f"127.0.0.1:{m.cport}" for m in ms)
    try:
        out, _ = scale("load", eps, "--total", str(keys), "--val-size", str(val_size))
        r["load rate, 3 members (keys/s)"] = float(out["rate"])
        changes = sum(m.leader_changes() for m in ms)
        out, _ = scale("probe", eps, "--duration", "30s", "--readers", "2")
        r["put p99 beside ranges, 3 members (ms)"] = float(out["p99_ms"])
        r["put max beside ranges, 3 members (ms)"] = float(out["max_ms"])
        r["leader changes during the probe"] = sum(m.leader_changes() for m in ms) - changes
    finally:
        for m in ms:
            m.stop()


def fmt(v):
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.0f}" if v >= 100 else f"{v:.2f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--val-size", type=int, default=1024)
    ap.add_argument("--snapshot-count", nargs="*", default=["default", "2000"])
    ap.add_argument("--only", nargs="*", default=["etcd", "cairn"])
    ap.add_argument("--members", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--skip", nargs="*", default=[], choices=["save", "learner", "compaction"])
    opts = ap.parse_args()
    base = os.path.expanduser("~/.cache/cairn-scale")
    os.makedirs(base, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mem = int(open("/proc/meminfo").readline().split()[1]) >> 20
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {mem} GiB, {platform.system()} "
          f"{platform.release()}; {opts.keys} keys of {opts.val_size} B", flush=True)
    for count in opts.snapshot_count:
        extra = [] if count == "default" else ["--snapshot-count", count]
        results = {}
        for kind in opts.only:
            r = results[kind] = {}
            for n in opts.members:
                d = tempfile.mkdtemp(prefix=f"{kind}-{n}-", dir=base)
                try:
                    if n == 1:
                        one_member(kind, d, opts.keys, opts.val_size, extra, r, opts.skip)
                    else:
                        three_members(kind, d, opts.keys, opts.val_size, extra, r)
                except Exception as e:  # a failed step is reported, the rest goes on
                    r[f"FAILED ({n} member{'s' if n > 1 else ''})"] = str(e)[:200]
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                print(f"  {kind}, {n} member(s), snapshot count {count}: done", flush=True)
        print(f"\nsnapshot count {count}:")
        rows = list(dict.fromkeys(k for r in results.values() for k in r))
        print(f"  {'':44}" + "".join(f"{k:>22}" for k in results))
        for row in rows:
            print(f"  {row:44}" + "".join(f"{fmt(results[k].get(row, '-')):>22}" for k in results))
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
