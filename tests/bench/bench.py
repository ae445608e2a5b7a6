#!/usr/bin/env python3
"""Runs etcd's own `benchmark` tool against fresh etcd 3.4 and cairn
clusters (1 member, then 3 members on loopback) started with identical
flags on the same disk, alternating between them round by round, and prints
medians and cairn/etcd ratios. With 3 members the tool's connections are
spread over all members' endpoints, as clients would be.

With --tls, both serve clients over TLS with client certificates
(--cert-file, --key-file, --trusted-ca-file, --client-cert-auth; made here with
openssl) and the tool connects with them.

Usage: bench.py [--rounds N] [--members 1 3] [--only WORKLOAD ...] [--tls]
"""
import argparse
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TOOLS = os.environ.get("CAIRN_TOOLS", os.path.expanduser("~/.cache/cairn-tools"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/cairn-target"))
SERVERS = {"etcd": shutil.which("etcd") or "etcd", "cairn": os.path.join(TARGET, "release", "cairn")}

# name -> benchmark arguments (after global flags)
WORKLOADS = {
    "put, 1 client": (["--conns", "1", "--clients", "1"],
                      ["put", "--key-size", "8", "--sequential-keys", "--total", "3000", "--val-size", "256"]),
    "put, 64 clients": (["--conns", "8", "--clients", "64"],
                        ["put", "--key-size", "8", "--sequential-keys", "--total", "40000", "--val-size", "256"]),
    "range (linearizable), 64 clients": (["--conns", "8", "--clients", "64"],
                                         ["range", "bench-key", "--total", "40000"]),
    "txn-put, 64 clients": (["--conns", "8", "--clients", "64"],
                            ["txn-put", "--txn-ops", "1", "--key-size", "8", "--key-space-size", "100000",
                             "--val-size", "256", "--total", "30000"]),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(base):
    """A CA, a server certificate for 127.0.0.1 and a client certificate; their paths."""
    d = os.path.join(base, "tls")
    os.makedirs(d, exist_ok=True)
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
        "-out", "ca.crt", "-subj", "/CN=bench-ca")
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")]:
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-days", "2", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", "1" if name == "server" else "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt")
    return {k: os.path.join(d, f) for k, f in
            [("ca", "ca.crt"), ("cert", "server.crt"), ("key", "server.key"),
             ("client_cert", "client.crt"), ("client_key", "client.key")]}


class Cluster:
    """n members on loopback, bootstrapped together; clients over TLS with `tls` (make_certs)."""

    def __init__(self, kind, base, n, tls=None):
        self.kind = kind
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix=f"{kind}-", dir=base)
        ports = [(free_port(), free_port()) for _ in range(n)]
        self.ports = [c for c, _ in ports]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.procs, self.logs = [], []
        scheme = "https" if tls else "http"
        for i, (cport, pport) in enumerate(ports):
            url, purl = f"{scheme}://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
            flags = ["--name", f"m{i}", "--data-dir", os.path.join(self.dir, f"m{i}"),
                     "--listen-client-urls", url, "--advertise-client-urls", url,
                     "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
                     "--initial-cluster", initial, "--logger", "zap", "--log-level", "error"]
            if tls:
                flags += ["--cert-file", tls["cert"], "--key-file", tls["key"],
                          "--trusted-ca-file", tls["ca"], "--client-cert-auth"]
            log = open(os.path.join(self.dir, f"m{i}.log"), "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([SERVERS[kind]] + flags, stdout=log, stderr=subprocess.STDOUT))
        context = None
        if tls:
            context = ssl.create_default_context(cafile=tls["ca"])
            context.load_cert_chain(tls["client_cert"], tls["client_key"])
        deadline = time.time() + 30
        for port in self.ports:
            while True:
                try:
                    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1,
                                                context=context) as r:
                        if b'"health":"true"' in r.read():
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{kind} did not become healthy")
                time.sleep(0.1)

    def endpoints(self):
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client_flags(self):
        """What etcdctl and the benchmark tool need to connect (the same flag names)."""
        if not self.tls:
            return []
        return ["--cacert", self.tls["ca"], "--cert", self.tls["client_cert"],
                "--key", self.tls["client_key"]]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_benchmark(endpoints, global_args, args):
    cmd = [os.path.join(TOOLS, "benchmark"), "--endpoints", endpoints] + global_args + args
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = float(re.search(r"50% in ([\d.]+) secs", out).group(1))
    p99 = float(re.search(r"99% in ([\d.]+) secs", out).group(1))
    return rps, p50, p99


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--members", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--tls", action="store_true")
    opts = ap.parse_args()
    base = os.path.expanduser("~/.cache/cairn-bench")
    os.makedirs(base, exist_ok=True)
    tls = make_certs(base) if opts.tls else None
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}; "
          f"data on {subprocess.run(['df', '--output=source', base], capture_output=True, text=True).stdout.split()[-1]}")
    print(f"etcd: {subprocess.run(['etcd', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}; "
          f"rounds: {opts.rounds} (fresh servers each run, order alternating), medians shown"
          f"{'; clients over TLS with client certificates' if tls else ''}\n")
    for members in opts.members:
        print(f"{members} member{'s' if members > 1 else ''}:")
        for name, (gargs, args) in WORKLOADS.items():
            if opts.only and not any(o in name for o in opts.only):
                continue
            bench(name, gargs, args, members, opts.rounds, base, tls)
    return 0


def bench(name, gargs, args, members, rounds, base, tls):
        results = {"etcd": [], "cairn": []}
        for r in range(rounds):
            order = ["etcd", "cairn"] if r % 2 == 0 else ["cairn", "etcd"]
            for kind in order:
                c = Cluster(kind, base, members, tls)
                try:
                    if args[0] == "range":
                        subprocess.run(["etcdctl", "--endpoints", c.endpoints(), *c.client_flags(),
                                        "put", "bench-key", "v" * 256],
                                       env=dict(os.environ, ETCDCTL_API="3"), check=True, capture_output=True)
                    results[kind].append(run_benchmark(c.endpoints(), gargs + c.client_flags(), args))
                finally:
                    c.stop()
        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}
        e, c = med["etcd"], med["cairn"]
        print(f"  {name:34} etcd {e[0]:9.0f}/s p50 {e[1]*1e3:6.2f}ms p99 {e[2]*1e3:6.2f}ms | "
              f"cairn {c[0]:9.0f}/s p50 {c[1]*1e3:6.2f}ms p99 {c[2]*1e3:6.2f}ms | "
              f"throughput x{c[0]/e[0]:.2f}, p99 x{c[2]/e[2]:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
