#!/usr/bin/env python3
"""Worker pools and --link zmq against local workers, side by side, in one go.

    sudo python3 bench/pool_bench.py [--seconds 3] [--rounds 5]

Builds the release binaries, then measures with gaspar-bench, every server
driven in turn in each round so that a slow moment of the shared host hits
them alike:

1. CPU-bound, libspin.so 1000 µs per request, 8 connections: 2 local workers
   (the default link), 2 workers over --link zmq, and 2 remote workers (a
   daemon with --workers 0 and a worker host with --workers 2);
2. echo, 16 B, one request per connection, 64 connections, 2 workers: the
   default link against --link zmq.

As root, the worker host runs in a network namespace of its own, joined to
the daemons' namespace by a veth pair on 192.0.2.0/24 (addresses that exist
only inside them), so requests to remote workers cross a real network stack
and device; otherwise the host connects over 127.0.0.1 and the script says
so. Every figure includes the load generator, the daemons and the workers
sharing the machine's cores. Standard library only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
RELEASE = os.path.join(TARGET, "release")
TAG = str(os.getpid())
DAEMON_NS, HOST_NS = f"gspb-d-{TAG}", f"gspb-h-{TAG}"
DAEMON_ADDRESS = "192.0.2.1"


def ip_tool():
    for path in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.path.exists(path):
            return path
    return "ip"


IP = ip_tool()


def make_network():
    """Two namespaces and a veth pair; False (and why) if they cannot be made."""
    if os.geteuid() != 0:
        return False, "not root"
    steps = [
        ["netns", "add", DAEMON_NS],
        ["netns", "add", HOST_NS],
        ["link", "add", f"bd{TAG}", "netns", DAEMON_NS, "type", "veth",
         "peer", "name", f"bh{TAG}", "netns", HOST_NS],
        ["-n", DAEMON_NS, "addr", "add", f"{DAEMON_ADDRESS}/24", "dev", f"bd{TAG}"],
        ["-n", HOST_NS, "addr", "add", "192.0.2.2/24", "dev", f"bh{TAG}"],
        ["-n", DAEMON_NS, "link", "set", f"bd{TAG}", "up"],
        ["-n", HOST_NS, "link", "set", f"bh{TAG}", "up"],
        ["-n", DAEMON_NS, "link", "set", "lo", "up"],
        ["-n", HOST_NS, "link", "set", "lo", "up"],
    ]
    for step in steps:
        done = subprocess.run([IP, *step], capture_output=True, text=True)
        if done.returncode != 0:
            remove_network()
            return False, f"ip {' '.join(step)}: {done.stderr.strip()}"
    return True, ""


def remove_network():
    for ns in (DAEMON_NS, HOST_NS):
        subprocess.run([IP, "netns", "del", ns], capture_output=True)


class Place:
    """Where processes run: inside a namespace, or right here."""

    def __init__(self, ns=None):
        self.ns = ns

    def command(self, argv):
        return [IP, "netns", "exec", self.ns, *argv] if self.ns else argv


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "gaspard", "-p", "echo-handler",
         "-p", "spin-handler", "-p", "gaspar-bench"],
        cwd=ROOT, check=True)


class Process:
    """A process stopped on exit from the with block."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def gaspard(place, handler, port, *extra):
    return Process(place.command([
        os.path.join(RELEASE, "gaspard"), "--handler", os.path.join(RELEASE, f"lib{handler}.so"),
        "--port", str(port), "--log-level", "error", "--runtime-dir", "/tmp", *extra]))


def bench(place, port, conns, seconds, extra):
    cmd = place.command([os.path.join(RELEASE, "gaspar-bench"), f"127.0.0.1:{port}",
                         "-c", str(conns), "-d", str(seconds), "--warmup", "0.5", "--json",
                         *extra])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode not in (0, 3):
        sys.exit(f"gaspar-bench failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout)


def wait_serving(place, port, payload_file, expect):
    """Until one request is answered (a daemon whose workers are all on a
    worker host refuses requests until the host has joined)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        result = bench(place, port, 1, 0.2, ["--payload-file", payload_file, "--expect", expect])
        if result.get("requests", 0) > 0 and result.get("errors", 1) == 0:
            return
        time.sleep(0.2)
    sys.exit(f"nothing served on port {port}")


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def rounds_of(servers, rounds, run):
    """Each server driven in turn, round after round: req/s per server."""
    figures = {name: [] for name in servers}
    for _ in range(rounds):
        for name, port in servers.items():
            figures[name].append(run(port)["requests_per_sec"])
    return figures


def report(title, figures, base):
    print(f"\n{title}")
    names = list(figures)
    print("| round | " + " | ".join(f"{n} req/s" for n in names) + " | "
          + " | ".join(f"{n} / {base}" for n in names if n != base) + " |")
    print("| --- " * (1 + 2 * len(names) - 1) + "|")
    for i in range(len(figures[base])):
        cells = [f"{figures[n][i]:,.0f}" for n in names]
        ratios = [f"{figures[n][i] / figures[base][i]:.3f}" for n in names if n != base]
        print(f"| {i + 1} | " + " | ".join(cells + ratios) + " |")
    for n in names:
        if n != base:
            ratios = [a / b for a, b in zip(figures[n], figures[base])]
            print(f"median {n} / {base}: {median(ratios):.3f}  (rounds: "
                  + ", ".join(f"{r:.3f}" for r in ratios) + ")")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    build()
    namespaced, why = make_network()
    here = Place(DAEMON_NS if namespaced else None)
    away = Place(HOST_NS if namespaced else None)
    pool_address = DAEMON_ADDRESS if namespaced else "127.0.0.1"
    print("remote workers: " + (
        "in a network namespace of their own, over a veth pair (192.0.2.0/24)" if namespaced
        else f"over 127.0.0.1 ({why}: no network namespaces)"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")

    work = tempfile.mkdtemp(prefix="gaspard-pool-bench-")
    spin, echo = os.path.join(work, "spin"), os.path.join(work, "echo")
    with open(spin, "w") as f:
        f.write("1000")
    with open(echo, "w") as f:
        f.write("0123456789abcdef")
    processes = []
    try:
        pool = f"tcp://{pool_address}:21900"
        processes += [
            gaspard(here, "spin", 21001, "--workers", "2"),
            gaspard(here, "spin", 21002, "--workers", "2", "--link", "zmq"),
            gaspard(here, "spin", 21003, "--workers", "0", "--pool-listen", pool,
                    "--pool-insecure"),
            Process(away.command([
                os.path.join(RELEASE, "gaspard"), "worker", "--connect", pool,
                "--handler", os.path.join(RELEASE, "libspin.so"), "--workers", "2",
                "--log-level", "error", "--runtime-dir", "/tmp"])),
            gaspard(here, "echo", 21011, "--workers", "2"),
            gaspard(here, "echo", 21012, "--workers", "2", "--link", "zmq"),
        ]
        for port in (21001, 21002, 21003):
            wait_serving(here, port, spin, "ok")
        for port in (21011, 21012):
            wait_serving(here, port, echo, "0123456789abcdef")

        spun = rounds_of(
            {"local": 21001, "zmq": 21002, "remote": 21003}, args.rounds,
            lambda port: bench(here, port, 8, args.seconds,
                               ["--payload-file", spin, "--expect", "ok"]))
        report("CPU-bound: libspin.so 1000 µs, 8 connections, 2 workers", spun, "local")
        echoed = rounds_of(
            {"local": 21011, "zmq": 21012}, args.rounds,
            lambda port: bench(here, port, 64, args.seconds, ["--size", "16"]))
        report("echo 16 B, one request per connection, 64 connections, 2 workers",
               echoed, "local")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for process in reversed(processes):
            process.stop()
        if namespaced:
            remove_network()
        for name in (spin, echo):
            os.unlink(name)
        os.rmdir(work)


if __name__ == "__main__":
    main()
