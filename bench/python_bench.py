#!/usr/bin/env python3
"""Python handlers against their Rust equivalents, side by side, in one go.

    python3 bench/python_bench.py [--seconds 3] [--rounds 5]

Builds the release binaries, then measures one handler call in-process
(a small C program that dlopens each handler, compiled with cc), and with
gaspar-bench on 127.0.0.1:

1. echo, 16 B, one request per connection, 64 connections, 2 workers:
   gaspar's README echo in Python (libgaspar_python.so) against libecho.so,
   round by round;
2. the same echo over persistent pipelined connections (GSP2), 8 x 16,
   where the daemon's per-request work is smallest and the handler call
   weighs most;
3. CPU-bound, 1000 µs of pure-Python work per request, 8 connections,
   2 workers: against the ideal (2 workers / 1 ms = 2000 req/s) and against
   libspin.so doing the same 1000 µs in Rust.

Prints every round's figures and the ratios. Standard library only.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
RELEASE = os.path.join(TARGET, "release")

# The Python handlers measured: gaspar's README echo, and libspin.so's
# equivalent, busy for the microseconds the request gives.
MODULE = '''\
import time

def echo(message): return message

def spin(request):
    deadline = time.perf_counter() + int(request) / 1e6
    while time.perf_counter() < deadline:
        pass
    return b"ok"
'''


# Times handle() in-process, without gaspard around it: what one call of
# each handler costs by itself. Compiled with cc when there is one.
CALLER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "gaspar.h"
static uint8_t buf[1 << 16];
static uint8_t *reply_buffer(void *ctx, size_t len) { return len <= sizeof buf ? buf : NULL; }
static void set_error(void *ctx, const char *msg, size_t len) {
    fprintf(stderr, "error: %.*s\n", (int)len, msg);
}
int main(int argc, char **argv) {
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    const gaspar_handler_v1 *(*entry)(void) =
        (const gaspar_handler_v1 *(*)(void))dlsym(lib, "gaspar_handler_entry");
    const gaspar_handler_v1 *t = entry();
    gaspar_host host = { NULL, reply_buffer, set_error };
    void *state = NULL;
    const char *config = argc > 2 ? argv[2] : "";
    if (t->init && t->init((const uint8_t *)config, strlen(config), &state, &host)) return 1;
    const long n = 1000000;
    const uint8_t req[16] = "0123456789abcdef";
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (t->handle(state, req, sizeof req, &host)) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


def call_cost(app, env, rounds):
    """Nanoseconds per in-process handle() call, per round: (Rust, Python)."""
    source = os.path.join(app, "call.c")
    exe = os.path.join(app, "call")
    with open(source, "w") as f:
        f.write(CALLER)
    built = subprocess.run(["cc", "-O2", "-I", os.path.join(ROOT, "handler-abi", "include"),
                            source, "-o", exe, "-ldl"], capture_output=True, text=True)
    os.unlink(source)
    if built.returncode != 0:
        print(f"  skipped: cannot compile the caller: {built.stderr.strip()}")
        return None

    def run(handler, *config):
        out = subprocess.run([exe, os.path.join(RELEASE, handler), *config], check=True,
                             capture_output=True, text=True, env={**os.environ, **env})
        return float(out.stdout)

    try:
        return [(run("libecho.so"), run("libgaspar_python.so", "bench_app:echo"))
                for _ in range(rounds)]
    finally:
        os.unlink(exe)


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "gaspard", "-p", "echo-handler",
         "-p", "spin-handler", "-p", "python-handler", "-p", "gaspar-bench"],
        cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gaspard:
    """A gaspard process, stopped on exit from the with block."""

    def __init__(self, handler, config=None, env=None, workers=2):
        self.port = free_port()
        cmd = [os.path.join(RELEASE, "gaspard"), "--handler", os.path.join(RELEASE, handler),
               "--port", str(self.port), "--workers", str(workers), "--log-level", "error"]
        if config is not None:
            cmd += ["--handler-config", config]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        self.name = handler if config is None else f"{handler} {config}"

    def __enter__(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"gaspard ({self.name}) exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.2)  # let the probe connection settle
                return self
            except OSError:
                time.sleep(0.05)
        sys.exit(f"gaspard ({self.name}) did not listen on {self.port}")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


WARMUP = 0.5
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def bench(server, conns, seconds, extra):
    """One gaspar-bench run; adds the CPU time the daemon and its workers
    spent per request (µs), the warm-up counted in at the run's rate."""
    workers = children(server.proc.pid)
    daemon0 = cpu_seconds(server.proc.pid)
    workers0 = sum(cpu_seconds(w) for w in workers)
    cmd = [os.path.join(RELEASE, "gaspar-bench"), f"127.0.0.1:{server.port}", "-c", str(conns),
           "-d", str(seconds), "--warmup", str(WARMUP), "--json", *extra]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode not in (0, 3):
        sys.exit(f"gaspar-bench failed: {' '.join(cmd)}\n{out.stderr}")
    result = json.loads(out.stdout)
    served = result["requests_per_sec"] * (seconds + WARMUP)
    if served:
        result["daemon_cpu_us"] = (cpu_seconds(server.proc.pid) - daemon0) / served * 1e6
        result["worker_cpu_us"] = (
            sum(cpu_seconds(w) for w in workers) - workers0) / served * 1e6
    return result


def median(values):
    return sorted(values)[len(values) // 2]


def show(label, r):
    lat = r["latency_us"]
    print(f"    {label:<22} {r['requests_per_sec']:>9.0f} req/s  p50 {lat['p50']:>7.0f} µs"
          f"  p99 {lat['p99']:>7.0f} µs  errors {r['errors']}"
          f"  CPU per request: daemon {r.get('daemon_cpu_us', 0):.1f} µs,"
          f" workers {r.get('worker_cpu_us', 0):.1f} µs", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_build:
        build()
    app = tempfile.mkdtemp(prefix="gaspard-python-bench-")
    with open(os.path.join(app, "bench_app.py"), "w") as f:
        f.write(MODULE)
    with open(os.path.join(app, "spin.txt"), "w") as f:
        f.write("1000")
    env = {"PYTHONPATH": app, "VIRTUAL_ENV": ""}
    secs, rounds = args.seconds, args.rounds
    # The figures mean little on a machine busy with other work: say how busy.
    print("load average %.1f %.1f %.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count()))

    print(f"0. one handle() call in-process, 16 B echo, 10^6 calls ({rounds} rounds)")
    costs = call_cost(app, env, rounds)
    if costs:
        for i, (rust, python) in enumerate(costs):
            print(f"  round {i + 1}: libecho.so {rust:.0f} ns, Python echo {python:.0f} ns")
        print(f"  Python echo: {median([p for _, p in costs]):.0f} ns a call (median),"
              f" libecho.so {median([r for r, _ in costs]):.0f} ns")


    print(f"1. echo, 16 B, one request per connection, 64 connections, 2 workers"
          f" ({rounds} rounds of {secs:g} s)")
    load = ["--size", "16", "--check"]
    ratios = []
    with Gaspard("libecho.so") as rust, \
            Gaspard("libgaspar_python.so", "bench_app:echo", env) as python:
        for i in range(rounds):
            r = bench(rust, 64, secs, load)
            p = bench(python, 64, secs, load)
            ratios.append(p["requests_per_sec"] / r["requests_per_sec"])
            print(f"  round {i + 1}: Python/Rust {ratios[-1]:.2f}x")
            show("libecho.so", r)
            show("Python echo", p)
    print(f"  Python echo: {median(ratios):.2f}x libecho.so (median; rounds"
          f" {', '.join(f'{x:.2f}' for x in ratios)}); goal >= 0.8x")

    print(f"2. echo, 16 B, persistent and pipelined (GSP2), 8 connections x pipeline 16,"
          f" 2 workers ({rounds} rounds of {secs:g} s): little besides the handler call")
    load = ["--size", "16", "--check", "--persistent", "--pipeline", "16"]
    ratios = []
    with Gaspard("libecho.so") as rust, \
            Gaspard("libgaspar_python.so", "bench_app:echo", env) as python:
        for i in range(rounds):
            r = bench(rust, 8, secs, load)
            p = bench(python, 8, secs, load)
            ratios.append(p["requests_per_sec"] / r["requests_per_sec"])
            print(f"  round {i + 1}: Python/Rust {ratios[-1]:.2f}x")
            show("libecho.so", r)
            show("Python echo", p)
    print(f"  Python echo, pipelined: {median(ratios):.2f}x libecho.so (median; rounds"
          f" {', '.join(f'{x:.2f}' for x in ratios)})")

    print(f"3. CPU-bound, 1000 µs per request, 8 connections, 2 workers"
          f" ({rounds} rounds of {secs:g} s); ideal 2000 req/s")
    load = ["--payload-file", os.path.join(app, "spin.txt"), "--expect", "ok"]
    to_ideal, to_rust = [], []
    with Gaspard("libspin.so") as rust, \
            Gaspard("libgaspar_python.so", "bench_app:spin", env) as python:
        for i in range(rounds):
            r = bench(rust, 8, secs, load)
            p = bench(python, 8, secs, load)
            to_ideal.append(p["requests_per_sec"] / 2000)
            to_rust.append(p["requests_per_sec"] / r["requests_per_sec"])
            print(f"  round {i + 1}: Python {to_ideal[-1]:.3f}x the ideal,"
                  f" {to_rust[-1]:.3f}x libspin.so")
            show("libspin.so", r)
            show("Python spin", p)
    print(f"  Python spin: {median(to_ideal):.3f}x the ideal (rounds"
          f" {', '.join(f'{x:.3f}' for x in to_ideal)}), {median(to_rust):.3f}x libspin.so")
    print("load average %.1f %.1f %.1f" % os.getloadavg())
    for name in ("bench_app.py", "spin.txt"):
        os.unlink(os.path.join(app, name))
    os.rmdir(app)


if __name__ == "__main__":
    main()
