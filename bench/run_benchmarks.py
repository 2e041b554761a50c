#!/usr/bin/env python3
"""Runs every benchmark of docs/benchmarks.md side by side, in one go.

    python3 bench/run_benchmarks.py [--seconds 3] [--out docs/benchmarks]

Builds the release binaries, then for each scenario starts the in-process
baseline (gaspar-bench serve-baseline) and gaspard on 127.0.0.1, drives both
with gaspar-bench, and prints every figure with its ratio to the baseline
measured in the same run. Writes results.json and two SVG charts (throughput
and p99 against connections, and against workers) to --out. Standard library
only: it must run on a fresh machine.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "gaspard", "-p", "echo-handler",
         "-p", "spin-handler", "-p", "gaspar-bench"],
        cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, what):
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


class Server:
    """A baseline or gaspard process, stopped on exit from the with block."""

    def __init__(self, kind, workers=2, handler="echo", extra=()):
        self.port = free_port()
        if kind == "baseline":
            cmd = [os.path.join(RELEASE, "gaspar-bench"), "serve-baseline", "--port", str(self.port)]
        else:
            cmd = [os.path.join(RELEASE, "gaspard"), "--handler",
                   os.path.join(RELEASE, f"lib{handler}.so"), "--port", str(self.port),
                   "--workers", str(workers), "--log-level", "error", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.kind = kind

    def __enter__(self):
        wait_listening(self.port, self.proc, self.kind)
        time.sleep(0.2)  # let the probe connection settle
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_kib(self, with_children=False):
        pids = [self.proc.pid]
        if with_children:
            pids += children(self.proc.pid)
        return sum(rss_kib(pid) for pid in pids)


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench(server, conns, seconds, size="16", extra=()):
    cmd = [os.path.join(RELEASE, "gaspar-bench"), f"127.0.0.1:{server.port}", "-c", str(conns),
           "-d", str(seconds), "--warmup", "0.5", "--json", *extra]
    if size is not None:
        cmd[2:2] = ["--size", str(size)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode not in (0, 3):
        sys.exit(f"gaspar-bench failed: {' '.join(cmd)}\n{out.stderr}")
    result = json.loads(out.stdout)
    result["command"] = " ".join(["gaspar-bench", *cmd[1:]])
    return result


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def side_by_side(servers, conns, seconds, rounds, **kw):
    """Runs the same load against each server in turn, `rounds` times, so that
    a slow moment of the (shared, noisy) host hits them alike. Returns, per
    server, its runs; ratios are taken round by round."""
    runs = [[] for _ in servers]
    for _ in range(rounds):
        for i, server in enumerate(servers):
            runs[i].append(bench(server, conns, seconds, **kw))
    return runs


def typical(runs, key="requests_per_sec"):
    """The run with the median figure."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def round_ratios(runs, base_runs, key="requests_per_sec"):
    return [r[key] / b[key] for r, b in zip(runs, base_runs)]


def line(label, result):
    lat = result["latency_us"]
    print(f"  {label:<34} {result['requests_per_sec']:>10.0f} req/s {result['mb_per_sec']:>8.1f} MB/s"
          f"  p50 {lat['p50']:>8.0f} µs  p99 {lat['p99']:>8.0f} µs  errors {result['errors']}"
          f"  (generator {result['cpu']['percent_of_one_core']:.0f}% of a core)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks"))
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating runs per comparison; ratios are the median round's")
    args = parser.parse_args()
    secs = args.seconds
    build()
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": machine(), "seconds": secs}

    rounds = args.rounds
    print(f"1. echo, 16 B, one request per connection, 64 connections, 2 workers ({rounds} rounds)")
    with Server("baseline") as base, Server("gaspard") as g, \
            Server("gaspard", extra=["--worker-credit", "1"]) as g1:
        b, r, r1 = side_by_side([base, g, g1], 64, secs, rounds)
    ratios = round_ratios(r, b)
    ratios1 = round_ratios(r1, b)
    line("baseline", typical(b))
    line("gaspard", typical(r))
    line("gaspard --worker-credit 1", typical(r1))
    results["echo64"] = {"baseline": typical(b), "gaspard": typical(r),
                         "gaspard_credit1": typical(r1),
                         "ratios": ratios, "ratio": median(ratios),
                         "ratios_credit1": ratios1, "ratio_credit1": median(ratios1)}
    print(f"  ratio: {median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)});"
          f" --worker-credit 1: {median(ratios1):.2f}x; target >= 0.8x")

    print(f"2. one connection at a time: latency ({rounds} rounds)")
    with Server("baseline") as base, Server("gaspard") as g:
        b, r = side_by_side([base, g], 1, secs, rounds)
    extras = [x["latency_us"]["p50"] - y["latency_us"]["p50"] for x, y in zip(r, b)]
    line("baseline", typical(b))
    line("gaspard", typical(r))
    extra_us = median(extras)
    results["latency1"] = {"baseline": typical(b), "gaspard": typical(r),
                           "p50_extra_us_rounds": extras, "p50_extra_us": extra_us}
    print(f"  gaspard p50 = baseline p50 + {extra_us:.0f} µs"
          f" (rounds {', '.join(f'{x:.0f}' for x in extras)}); target <= +30 µs")

    print(f"3. CPU-bound: libspin.so 1000 µs per request, 8 connections, 2 workers ({rounds} rounds)")
    payload = spin_payload(args.out)
    with Server("gaspard", handler="spin") as g:
        runs = [bench(g, 8, secs, size=None, extra=["--payload-file", payload, "--expect", "ok"])
                for _ in range(rounds)]
    os.unlink(payload)
    ratios = [x["requests_per_sec"] / 2000 for x in runs]
    line("gaspard", typical(runs))
    results["spin"] = {"gaspard": typical(runs), "ratios_to_ideal": ratios,
                       "ratio_to_ideal": median(ratios)}
    print(f"  {median(ratios):.3f}x the ideal 2000 req/s"
          f" (rounds {', '.join(f'{x:.3f}' for x in ratios)}); target >= 0.95x")

    print(f"4. 1 MiB echo, 4 connections ({rounds} rounds)")
    with Server("baseline") as base, Server("gaspard") as g:
        b, r = side_by_side([base, g], 4, secs, rounds, size="1M", extra=["--check"])
    ratios = round_ratios(r, b, key="mb_per_sec")
    line("baseline", typical(b, "mb_per_sec"))
    line("gaspard", typical(r, "mb_per_sec"))
    results["mib"] = {"baseline": typical(b, "mb_per_sec"), "gaspard": typical(r, "mb_per_sec"),
                      "ratios": ratios, "ratio": median(ratios)}
    print(f"  ratio: {median(ratios):.2f}x MB/s (rounds {', '.join(f'{x:.2f}' for x in ratios)});"
          f" target >= 0.6x")

    print("5. persistent pipelined echo (GSP2), 8 connections x pipeline 16, 2 workers")
    with Server("gaspard") as g:
        runs_p, runs_o = [], []
        for _ in range(rounds):
            runs_p.append(bench(g, 8, secs, extra=["--persistent", "--pipeline", "16", "--check"]))
            runs_o.append(bench(g, 64, secs))
    with Server("baseline") as base:
        pb = bench(base, 8, secs, extra=["--persistent", "--pipeline", "16", "--check"])
    ratios = round_ratios(runs_p, runs_o)
    line("gaspard persistent", typical(runs_p))
    line("gaspard one per connection", typical(runs_o))
    line("baseline persistent", pb)
    results["persistent"] = {"gaspard": typical(runs_p), "gaspard_oneshot": typical(runs_o),
                             "baseline": pb, "ratios_to_oneshot": ratios,
                             "ratio_to_oneshot": median(ratios)}
    print(f"  {median(ratios):.2f}x gaspard's one-per-connection"
          f" (rounds {', '.join(f'{x:.2f}' for x in ratios)}); target >= 5x")

    print("6. memory (RSS)")
    with Server("gaspard") as g:
        time.sleep(0.5)
        daemon_idle = g.rss_kib()
        all_idle = g.rss_kib(with_children=True)
        socks = []
        for _ in range(args.idle_connections):
            socks.append(socket.create_connection(("127.0.0.1", g.port)))
        time.sleep(1.0)
        daemon_busy = g.rss_kib()
        for s in socks:
            s.close()
    per_conn = (daemon_busy - daemon_idle) * 1024 / args.idle_connections
    results["memory"] = {"daemon_idle_kib": daemon_idle, "daemon_and_workers_idle_kib": all_idle,
                         "daemon_with_idle_connections_kib": daemon_busy,
                         "idle_connections": args.idle_connections,
                         "bytes_per_idle_connection": per_conn}
    print(f"  daemon idle {daemon_idle} KiB; daemon + 2 workers {all_idle} KiB;"
          f" with {args.idle_connections} idle connections {daemon_busy} KiB:"
          f" {per_conn:.0f} bytes each; goal <= 2048")

    print("7. sweeps for the charts")
    sweep_conns = [1, 4, 16, 64, 256]
    curves = {"baseline": [], "gaspard": []}
    for kind in curves:
        with Server(kind) as s:
            for c in sweep_conns:
                curves[kind].append(bench(s, c, secs))
                line(f"{kind} c={c}", curves[kind][-1])
    workers = [1, 2, 4]
    by_workers = []
    for w in workers:
        with Server("gaspard", workers=w) as g:
            by_workers.append(bench(g, 64, secs))
            line(f"gaspard workers={w} c=64", by_workers[-1])
    results["sweep_connections"] = {"connections": sweep_conns, **curves}
    results["sweep_workers"] = {"workers": workers, "gaspard": by_workers}

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(os.path.join(args.out, "connections.svg"), "connections (log scale)", sweep_conns,
          {k: v for k, v in curves.items()})
    chart(os.path.join(args.out, "workers.svg"), "workers (64 connections)", workers,
          {"gaspard": by_workers})
    print(f"wrote {args.out}/results.json, connections.svg, workers.svg")


def spin_payload(out):
    """libspin.so's request: spin for 1000 µs (a file, for --payload-file)."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix="gaspard-spin-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("1000")
    return path


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    cpu = l.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release}


COLOURS = {"baseline": "#888888", "gaspard": "#1f6fb4"}


def chart(path, xlabel, xs, series):
    """Two panels side by side: requests/s and p99 latency, against xs."""
    w, h, pad = 460, 300, 55
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h + 30}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{2 * w}" height="{h + 30}" fill="white"/>']
    for panel, (title, key) in enumerate([("requests/s", "rps"), ("p99 latency (ms)", "p99")]):
        ox = panel * w
        values = {name: [(r["requests_per_sec"] if key == "rps" else r["latency_us"]["p99"] / 1000)
                         for r in runs] for name, runs in series.items()}
        top = max(max(v) for v in values.values()) * 1.1 or 1
        def px(i):
            return ox + pad + i * (w - 2 * pad) / max(len(xs) - 1, 1)
        def py(v):
            return h - pad + 20 - v / top * (h - 2 * pad)
        svg.append(f'<text x="{ox + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')
        svg.append(f'<line x1="{ox + pad}" y1="{py(0)}" x2="{ox + w - pad}" y2="{py(0)}" stroke="black"/>')
        svg.append(f'<line x1="{ox + pad}" y1="{py(0)}" x2="{ox + pad}" y2="{py(top)}" stroke="black"/>')
        for k in range(5):
            v = top * k / 4
            label = f"{v:.0f}" if top >= 10 else f"{v:.2f}"
            svg.append(f'<text x="{ox + pad - 5}" y="{py(v) + 4}" text-anchor="end">{label}</text>')
        for i, x in enumerate(xs):
            svg.append(f'<text x="{px(i)}" y="{py(0) + 16}" text-anchor="middle">{x}</text>')
        svg.append(f'<text x="{ox + w / 2}" y="{h + 25}" text-anchor="middle">{xlabel}</text>')
        for n, (name, vals) in enumerate(values.items()):
            colour = COLOURS.get(name, "#d62728")
            points = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(vals))
            svg.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for i, v in enumerate(vals):
                svg.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>')
            svg.append(f'<text x="{ox + w - pad}" y="{40 + 15 * n}" text-anchor="end" fill="{colour}">{name}</text>')
    svg.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
