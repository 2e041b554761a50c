#!/usr/bin/env python3
"""Runs every benchmark of docs/benchmarks.md side by side, in one go.

    python3 bench/run_benchmarks.py [--quick] [--seconds 2] [--rounds 3] [--plain]
                                    [--out docs/benchmarks] [--doc docs/benchmarks.md]
    python3 bench/run_benchmarks.py --redraw     # charts and the doc from results.json

Builds the release binaries (into $CARGO_TARGET_DIR, or target/), then for
each scenario starts the in-process baseline (gaspar-bench serve-baseline)
and gaspard on 127.0.0.1 and drives them with gaspar-bench in interleaved
rounds: round 1 baseline, gaspard; round 2 baseline, gaspard; ... Each ratio
is the median of the rounds' ratios, and every round is kept in
results.json. Then it draws the charts with matplotlib (installed on first
use into a venv under the target directory, from PyPI) and writes
docs/benchmarks.md: the generated part above its marker line, the
hand-written analysis below it kept as it is.

The measuring needs only the standard library; the charts need matplotlib,
which the script installs for itself.
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
TARGET = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
RELEASE = os.path.join(TARGET, "release")
VENV = os.path.join(TARGET, "bench-venv")

KIB, MIB = 1024, 1024 * 1024
SWEEP_SIZES = [16, 256, 4 * KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB]
SWEEP_CONNS = [1, 4]
CHART_CONNS = [1, 4, 16, 64, 256]
CHART_WORKERS = [1, 2, 4]
# The line in docs/benchmarks.md below which the text is written by hand.
MARKER = "<!-- Everything below this line is written by hand; run_benchmarks.py keeps it. -->"


def build(plain):
    cmd = ["cargo", "build", "--release", "--quiet", "-p", "gaspard", "-p", "echo-handler",
           "-p", "spin-handler", "-p", "gaspar-bench"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    if plain:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "gaspar-bench",
                        "--example", "plain_echo"], cwd=ROOT, check=True)


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
    """A server process, stopped on exit from the with block.

    kind: "baseline" (serve-baseline; `spin=N` for its spin pool), "plain"
    (examples/plain_echo), or "gaspard" (with `handler`, `workers`, `extra`).
    """

    def __init__(self, kind, workers=2, handler="echo", extra=(), spin=None):
        self.port = free_port()
        if kind == "baseline":
            cmd = [os.path.join(RELEASE, "gaspar-bench"), "serve-baseline",
                   "--port", str(self.port)]
            if spin:
                cmd += ["--spin", str(spin)]
        elif kind == "plain":
            cmd = [os.path.join(RELEASE, "examples", "plain_echo"), str(self.port)]
        else:
            cmd = [os.path.join(RELEASE, "gaspard"), "--handler",
                   os.path.join(RELEASE, f"lib{handler}.so"), "--port", str(self.port),
                   "--workers", str(workers), "--log-level", "error", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
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

    def status_kib(self, field, with_children=False):
        pids = [self.proc.pid]
        if with_children:
            pids += children(self.proc.pid)
        return sum(status_kib(pid, field) for pid in pids)

    def rss_kib(self, with_children=False):
        return self.status_kib("VmRSS", with_children)

    def cpu_seconds(self):
        """User + system CPU time of the server and its workers so far."""
        return sum(cpu_seconds(pid) for pid in [self.proc.pid, *children(self.proc.pid)])


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


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


def status_kib(pid, field):
    """A /proc/PID/status figure in KiB: VmRSS (now), VmHWM (peak RSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


WARMUP = 0.3


def bench(server, conns, seconds, size="16", extra=(), requests=None):
    """One gaspar-bench run against `server` for `seconds` after a warm-up (or
    for `requests` requests): its JSON report, plus the command."""
    amount = ["-n", str(requests)] if requests else ["-d", str(seconds), "--warmup", str(WARMUP)]
    cmd = [os.path.join(RELEASE, "gaspar-bench"), f"127.0.0.1:{server.port}", "-c", str(conns),
           *amount, "--json", *extra]
    if size is not None:
        cmd[2:2] = ["--size", str(size)]
    cpu_before = server.cpu_seconds()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode not in (0, 3):
        sys.exit(f"gaspar-bench failed: {' '.join(cmd)}\n{out.stderr}")
    result = json.loads(out.stdout)
    result["command"] = " ".join(["gaspar-bench", *cmd[1:]])
    if result["ok"]:
        # The server's CPU per request: a figure that the host's other load
        # moves far less than it moves requests/s. The warm-up's requests
        # are not counted, so its share of the time is left out (roughly).
        used = server.cpu_seconds() - cpu_before
        measured = 1.0 if requests else seconds / (seconds + WARMUP)
        result["server_cpu_us_per_request"] = used * measured / result["ok"] * 1e6
    return result


def compact(result):
    """What results.json keeps of a run."""
    lat = result["latency_us"] or {}
    return {"requests_per_sec": result["requests_per_sec"], "mb_per_sec": result["mb_per_sec"],
            "ok": result["ok"], "errors": result["errors"],
            "p50_us": lat.get("p50"), "p99_us": lat.get("p99"),
            "generator_cpu_percent": round(result["cpu"]["percent_of_one_core"], 1),
            "server_cpu_us_per_request": result.get("server_cpu_us_per_request"),
            "command": result["command"]}


def median(values):
    """The median of the values that are not None (None if there are none)."""
    ordered = sorted(v for v in values if v is not None)
    n = len(ordered)
    if n == 0:
        return None
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def ratio(a, b):
    """a / b, or None when b is 0 (no request finished in a round)."""
    return a / b if b else None


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def side_by_side(servers, conns, seconds, rounds, **kw):
    """The same load against each server in turn, `rounds` times, so that a
    slow moment of the (shared, noisy) host hits them alike. Returns, per
    server, its runs (compacted), round by round."""
    runs = [[] for _ in servers]
    for _ in range(rounds):
        for i, server in enumerate(servers):
            runs[i].append(compact(bench(server, conns, seconds, **kw)))
    return runs


def comparison(names, runs, key="requests_per_sec"):
    """Runs by server name, with each server's ratio to the first, round by round."""
    base = runs[0]
    entry = {"load_before": loadavg(), "runs": dict(zip(names, runs))}
    for name, these in zip(names[1:], runs[1:]):
        ratios = [ratio(r[key], b[key]) for r, b in zip(these, base)]
        entry[f"{name}_ratios"] = ratios
        entry[f"{name}_ratio"] = median(ratios)
    return entry


def show(label, entry, names, key="requests_per_sec"):
    unit = "req/s" if key == "requests_per_sec" else "MB/s"
    parts = []
    for name in names:
        values = [r[key] for r in entry["runs"][name]]
        parts.append(f"{name} {median(values):,.0f}")
    ratios = entry.get(f"{names[-1]}_ratios")
    text = f"  {label:<36} {unit}: " + ", ".join(parts)
    if ratios:
        text += f"; {names[-1]}/{names[0]} {ratio_text(median(ratios))} ({rounds_text(ratios)})"
    print(text)
    sys.stdout.flush()


def size_label(size):
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


def measure(args):
    secs, rounds = args.seconds, args.rounds
    results = {"machine": machine(), "seconds": secs, "rounds": rounds,
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "commit": git_commit(), "load_at_start": loadavg()}
    started = time.time()

    echo = ["baseline", "gaspard"] + (["plain"] if args.plain else [])
    print(f"1. payload-size sweep: echo, one request per connection, 2 workers,"
          f" {rounds} interleaved rounds of {secs:g} s")
    sweep = []
    with Server("baseline") as base, Server("gaspard") as g:
        servers = [base, g]
        plain = Server("plain") if args.plain else None
        try:
            if plain:
                servers.append(plain.__enter__())
            for size in SWEEP_SIZES:
                # Enough requests per round for a figure: a 16 MiB request
                # takes some 20 ms here, far more on a busy host.
                run_secs = secs * 3 if size >= 4 * MIB else secs
                for conns in SWEEP_CONNS:
                    runs = side_by_side(servers, conns, run_secs, rounds, size=str(size),
                                        extra=["--check"])
                    entry = comparison(echo, runs)
                    entry.update(size=size, connections=conns)
                    sweep.append(entry)
                    show(f"{size_label(size)}, {conns} connection{'s' * (conns > 1)}", entry,
                         echo[:2])
                    if plain:
                        ratios = [ratio(b["requests_per_sec"], p["requests_per_sec"])
                                  for b, p in zip(runs[0], runs[2])]
                        entry["baseline_to_plain_ratios"] = ratios
                        entry["baseline_to_plain_ratio"] = median(ratios)
                        print(f"  {'':<36} baseline/plain {ratio_text(median(ratios))}"
                              f" ({rounds_text(ratios)})")
        finally:
            if plain:
                plain.__exit__(None, None, None)
    results["sweep"] = sweep

    print(f"2. echo 16 B at 64 and 256 connections ({rounds} rounds)")
    many = {}
    with Server("baseline") as base, Server("gaspard") as g:
        for conns in [64, 256]:
            entry = comparison(["baseline", "gaspard"],
                               side_by_side([base, g], conns, secs, rounds, extra=["--check"]))
            many[str(conns)] = entry
            show(f"16 B, {conns} connections", entry, ["baseline", "gaspard"])
    results["many_connections"] = many

    print(f"3. CPU-bound: 1000 µs spins, 8 connections, gaspard with libspin.so and 2 workers"
          f" vs serve-baseline --spin 2 ({rounds} rounds)")
    fd, spin_file = tempfile.mkstemp(prefix="gaspard-spin-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("1000")
    try:
        with Server("baseline", spin=2) as base, Server("gaspard", handler="spin") as g:
            entry = comparison(["baseline", "gaspard"], side_by_side(
                [base, g], 8, secs, rounds, size=None,
                extra=["--payload-file", spin_file, "--expect", "ok"]))
    finally:
        os.unlink(spin_file)
    show("spin 1 ms, 8 connections", entry, ["baseline", "gaspard"])
    results["spin"] = entry

    print(f"4. persistent pipelined echo (GSP2), 8 connections x 16 in flight ({rounds} rounds)")
    with Server("baseline") as base, Server("gaspard") as g:
        entry = comparison(["baseline", "gaspard"], side_by_side(
            [base, g], 8, secs, rounds, extra=["--persistent", "--pipeline", "16", "--check"]))
    show("GSP2 8 x 16", entry, ["baseline", "gaspard"])
    results["persistent"] = entry

    print("5. memory")
    results["memory"] = memory(args)

    print("6. sweeps for the charts: echo 16 B against connections, and against workers")
    curves = {"baseline": [], "gaspard": []}
    with Server("baseline") as base, Server("gaspard") as g:
        for c in CHART_CONNS:
            for name, server in [("baseline", base), ("gaspard", g)]:
                curves[name].append(compact(bench(server, c, secs, extra=["--check"])))
            print(f"  c={c}: baseline {curves['baseline'][-1]['requests_per_sec']:,.0f},"
                  f" gaspard {curves['gaspard'][-1]['requests_per_sec']:,.0f} req/s")
    by_workers = []
    for w in CHART_WORKERS:
        with Server("gaspard", workers=w) as g:
            by_workers.append(compact(bench(g, 64, secs, extra=["--check"])))
        print(f"  gaspard, {w} workers, 64 connections:"
              f" {by_workers[-1]['requests_per_sec']:,.0f} req/s")
    results["sweep_connections"] = {"connections": CHART_CONNS, **curves}
    results["sweep_workers"] = {"workers": CHART_WORKERS, "gaspard": by_workers}
    results["load_at_end"] = loadavg()
    results["minutes"] = round((time.time() - started) / 60, 1)
    return results


def memory(args):
    """The daemon's RSS idle, with idle connections, and at its peak while 64
    clients each send 16 MiB."""
    out = {}
    with Server("gaspard") as g:
        time.sleep(0.5)
        out["daemon_idle_kib"] = g.rss_kib()
        out["daemon_and_workers_idle_kib"] = g.rss_kib(with_children=True)
        socks = [socket.create_connection(("127.0.0.1", g.port))
                 for _ in range(args.idle_connections)]
        time.sleep(1.0)
        out["daemon_with_idle_connections_kib"] = g.rss_kib()
        for s in socks:
            s.close()
        out["idle_connections"] = args.idle_connections
        out["bytes_per_idle_connection"] = (
            (out["daemon_with_idle_connections_kib"] - out["daemon_idle_kib"]) * 1024
            / args.idle_connections)
    print(f"  daemon idle {out['daemon_idle_kib']} KiB; daemon + 2 workers"
          f" {out['daemon_and_workers_idle_kib']} KiB; with {args.idle_connections} idle"
          f" connections {out['daemon_with_idle_connections_kib']} KiB:"
          f" {out['bytes_per_idle_connection']:.0f} bytes each")
    clients, size = 64, 16 * MIB
    with Server("gaspard") as g:
        before = g.status_kib("VmHWM")
        # Two requests per client: all 64 bodies in flight at once, twice.
        run = compact(bench(g, clients, None, size=str(size), requests=2 * clients,
                            extra=["--check", "--timeout", "300"]))
        out["large"] = {
            "clients": clients, "size": size, "bodies_in_flight_kib": clients * size // KIB,
            "daemon_peak_kib": g.status_kib("VmHWM"), "daemon_peak_before_kib": before,
            "workers_peak_kib": sum(status_kib(pid, "VmHWM") for pid in children(g.proc.pid)),
            "run": run}
    large = out["large"]
    print(f"  {clients} clients x 16 MiB: daemon peak RSS {large['daemon_peak_kib'] / 1024:,.0f}"
          f" MiB, workers' peaks {large['workers_peak_kib'] / 1024:,.0f} MiB, bodies in flight"
          f" {large['bodies_in_flight_kib'] / 1024:,.0f} MiB;"
          f" {run['requests_per_sec']:.1f} req/s, {run['errors']} errors")
    return out


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = "unknown"
    mem_kib = 0
    try:
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    cpu = l.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except OSError:
        pass
    wmem_max = None
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem_max = int(f.read())
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
            "memory_gib": round(mem_kib / MIB), "wmem_max": wmem_max}


# ---------------------------------------------------------------- charts


def charts(out_dir):
    """Draws the charts from results.json with matplotlib, in its venv."""
    python = os.path.join(VENV, "bin", "python")
    ready = os.path.exists(python) and subprocess.run(
        [python, "-c", "import matplotlib"], capture_output=True).returncode == 0
    if not ready:
        print(f"installing matplotlib into {VENV}")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "matplotlib"], check=True)
    subprocess.run([python, os.path.join(ROOT, "bench", "charts.py"), out_dir], check=True)


# ---------------------------------------------------------------- the doc


def fmt_rate(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def cpu_text(runs):
    value = median([r.get("server_cpu_us_per_request") for r in runs])
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def ratio_text(value):
    return "–" if value is None else f"{value:.2f}×"


def rounds_text(values, digits=2, sign=False):
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    return ", ".join("none finished" if v is None else fmt.format(v) for v in values)


def med(runs, key):
    return median([r[key] for r in runs])


def goal_rows(results):
    """(scenario, baseline, gaspard, ratio and rounds, target, met) for the goals table."""
    rows = []
    sweep = {(e["size"], e["connections"]): e for e in results["sweep"]}

    def ratio_row(label, entry, target, unit="req/s", key="requests_per_sec"):
        b, g = entry["runs"]["baseline"], entry["runs"]["gaspard"]
        r = entry["gaspard_ratio"]
        rows.append((label, f"{fmt_rate(med(b, key))} {unit}", f"{fmt_rate(med(g, key))} {unit}",
                     f"{ratio_text(r)} ({rounds_text(entry['gaspard_ratios'])})",
                     f"≥ {target}×", "yes" if r is not None and r >= target else "no",
                     f"{cpu_text(b)}, {cpu_text(g)}"))

    mib1 = sweep[(MIB, 1)]
    ratio_row("1 MiB echo, one connection", mib1, 0.8)
    extras = [g["p50_us"] - b["p50_us"]
              for b, g in zip(mib1["runs"]["baseline"], mib1["runs"]["gaspard"])]
    rows.append(("1 MiB echo, one connection: p50 latency",
                 f"{med(mib1['runs']['baseline'], 'p50_us'):,.0f} µs",
                 f"{med(mib1['runs']['gaspard'], 'p50_us'):,.0f} µs",
                 f"{median(extras):+,.0f} µs ({rounds_text(extras, 0, sign=True)})",
                 "≤ +250 µs", "yes" if median(extras) <= 250 else "no", ""))
    ratio_row("1 MiB echo, four connections", sweep[(MIB, 4)], 0.9)
    ratio_row("16 MiB echo, one connection", sweep[(16 * MIB, 1)], 0.7)
    ratio_row("echo 16 B, 256 connections", results["many_connections"]["256"], 0.85)
    ratio_row("echo 16 B, 64 connections", results["many_connections"]["64"], 0.83)
    ratio_row("CPU-bound: 1 ms spins, 8 connections, 2 workers vs a pool of 2 threads",
              results["spin"], 0.97)
    ratio_row("persistent pipelined echo (GSP2), 8 connections × 16 in flight",
              results["persistent"], 0.3)
    small = sweep[(16, 1)]
    extras = [g["p50_us"] - b["p50_us"]
              for b, g in zip(small["runs"]["baseline"], small["runs"]["gaspard"])]
    rows.append(("echo 16 B, one connection: p50 latency",
                 f"{med(small['runs']['baseline'], 'p50_us'):,.0f} µs",
                 f"{med(small['runs']['gaspard'], 'p50_us'):,.0f} µs",
                 f"{median(extras):+,.0f} µs ({rounds_text(extras, 0, sign=True)})",
                 "≤ +30 µs", "yes" if median(extras) <= 30 else "no", ""))
    mem = results["memory"]
    large = mem["large"]
    flight = large["bodies_in_flight_kib"] / 1024
    peak = large["daemon_peak_kib"] / 1024
    rows.append((f"daemon peak RSS, {large['clients']} clients each sending 16 MiB", "",
                 f"{peak:,.0f} MiB", f"{peak / flight:.2f}× the {flight:,.0f} MiB of bodies"
                 " in flight", "≤ bodies in flight + a small constant (64 MiB)",
                 "yes" if peak <= flight + 64 else "no", ""))
    rows.append((f"daemon RSS per idle connection ({mem['idle_connections']:,} open)", "",
                 f"{mem['bytes_per_idle_connection']:,.0f} bytes", "", "≤ 2 KiB",
                 "yes" if mem["bytes_per_idle_connection"] <= 2048 else "no", ""))
    return rows


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(results):
    plain = "baseline_to_plain_ratio" in results["sweep"][0]
    header = ["payload", "connections", "baseline req/s", "gaspard req/s", "gaspard MB/s",
              "gaspard / baseline (rounds)", "server CPU µs per request: baseline, gaspard"]
    if plain:
        header += ["baseline / plain server (rounds)", "plain server CPU µs per request"]
    rows = []
    for e in results["sweep"]:
        b, g = e["runs"]["baseline"], e["runs"]["gaspard"]
        row = [size_label(e["size"]), e["connections"], fmt_rate(med(b, "requests_per_sec")),
               fmt_rate(med(g, "requests_per_sec")), fmt_rate(med(g, "mb_per_sec")),
               f"{ratio_text(e['gaspard_ratio'])} ({rounds_text(e['gaspard_ratios'])})",
               f"{cpu_text(b)}, {cpu_text(g)}"]
        if plain:
            row.append(f"{ratio_text(e['baseline_to_plain_ratio'])}"
                       f" ({rounds_text(e['baseline_to_plain_ratios'])})")
            row.append(cpu_text(e["runs"]["plain"]))
        rows.append(row)
    return table(header, rows)


def write_doc(results, path):
    try:
        with open(path) as f:
            old = f.read()
        kept = old.split(MARKER, 1)[1] if MARKER in old else ""
    except OSError:
        kept = ""
    m = results["machine"]
    mem = results["memory"]
    wmem = f"{m['wmem_max'] // MIB} MiB" if m.get("wmem_max", 0) >= MIB else str(m.get("wmem_max"))
    rounds = results["rounds"]
    secs = results["seconds"]
    errors = sum(r["errors"] for e in results["sweep"] for runs in e["runs"].values() for r in runs)
    errors += sum(r["errors"] for key in ("spin", "persistent")
                  for runs in results[key]["runs"].values() for r in runs)
    errors += sum(r["errors"] for e in results["many_connections"].values()
                  for runs in e["runs"].values() for r in runs)
    plain_note = ""
    if "baseline_to_plain_ratio" in results["sweep"][0]:
        rates = [e["baseline_to_plain_ratio"] or 0 for e in results["sweep"]]
        cpus = []
        for e in results["sweep"]:
            b = median([r.get("server_cpu_us_per_request") for r in e["runs"]["baseline"]])
            p = median([r.get("server_cpu_us_per_request") for r in e["runs"]["plain"]])
            if b and p:
                cpus.append(b / p)
        plain_note = (
            "\n\nThe sweep was also run against a plain single-threaded mio echo server"
            " (`bench/examples/plain_echo.rs`: the header, then the body read into a buffer"
            " allocated from its length), as a check on the baseline. Over the sweep's"
            f" {len(rates)} points the median ratio of the baseline's requests/s to the plain"
            f" server's runs from {min(rates):.2f}× to {max(rates):.2f}×"
            f" ({sum(r >= 1 for r in rates)} at 1× or more), and the baseline spends from"
            f" {min(cpus):.2f}× to {max(cpus):.2f}× the plain server's CPU per request"
            " (the last two columns of the sweep's table).")
    text = f"""# Benchmarks

<!-- Written by bench/run_benchmarks.py from benchmarks/results.json, down to the marker line. -->

Every figure here comes from one run of one script, with gaspard and an
in-process baseline measured side by side, so each can be read as a ratio:

```sh
python3 bench/run_benchmarks.py {results.get('options', '')}
```

It builds the release binaries, starts `gaspar-bench serve-baseline` (the same
wire protocol answered in-process on one mio thread, no workers: the
protocol's own limit on this machine) and `gaspard` with two workers on
127.0.0.1, drives both with [`gaspar-bench`](../bench/README.md), and writes
[`benchmarks/results.json`](benchmarks/results.json) (every round of every
figure, with the exact `gaspar-bench` command) and the charts below, drawn
with matplotlib. Servers under comparison run at the same time and are
driven in turn, round by round ({rounds} rounds of {secs:g} seconds, each
after {WARMUP:g} seconds of warm-up); a ratio is the median of the rounds' ratios, so a
slow moment of the shared host hits both sides of a ratio alike, and every
round's ratio is shown. Echo runs check every reply's bytes (`--check`).
{"No run had an error." if errors == 0 else f"{errors} requests failed in all; see results.json."}

For large bodies the baseline reads each body straight into a pooled buffer
of its whole length and writes the reply from it; for CPU-bound work
(`serve-baseline --spin 2`) it does libspin.so's spin on a pool of two
threads that each accept and answer their own connections. So a CPU-bound
figure is a ratio to the same work done in-process under the same load, not
to the ideal 2,000 requests/s. Figures measured before 2026-12-07 (in the
hand-written sections below) divide by an older baseline that for large
bodies ran at less than half the speed of a plain server (it allocated each
body afresh: about 210 page faults per megabyte).{plain_note}

## The machine

{m['cpus']} cores ({m['cpu']}, virtualised), {m['memory_gib']} GiB, Linux {m['kernel']},
`net.core.wmem_max` {wmem}. The load generator, the daemon and the workers
all share those cores, so every figure includes the generator's own cost;
gaspar-bench reports its CPU use with each result (in results.json). The host
is shared: the load average was {', '.join(f'{x:.2f}' for x in results['load_at_start'])}
when this run started and {', '.join(f'{x:.2f}' for x in results['load_at_end'])} when it
ended (other work was running on it), so single figures move by far more than
the ratios; read the rounds.

## Goals ({results['date']}, release build of `{results['commit']}`)

{table(["scenario", "baseline", "gaspard", "ratio (rounds)", "target", "met",
        "server CPU µs per request: baseline, gaspard"], goal_rows(results))}

Idle, the daemon's RSS is {mem['daemon_idle_kib'] / 1024:.1f} MiB
({mem['daemon_and_workers_idle_kib'] / 1024:.1f} MiB with its two workers). In
the 16 MiB run the workers' peak RSS was
{mem['large']['workers_peak_kib'] / 1024:,.0f} MiB together. The persistent row
divides by the baseline's persistent pipelined echo. The last column is
each server's own CPU time per request (user + system; gaspard's daemon and
workers together), the median of the rounds: the host's other load moves it
far less than it moves requests/s.

## Payload-size sweep

Echo, one request per connection, gaspard with two workers, at one and four
connections. Points are the median of the rounds; bars span the rounds. The
lower panels, and the table's CPU column, are the servers' own CPU time
(user + system, gaspard's daemon and workers together, from `/proc`) per
request, the median of the rounds: the host's other load moves it far less
than it moves requests/s, and it shows what a request costs gaspard beyond
the baseline's two copies of the body through loopback TCP.

![throughput and ratio against payload size](benchmarks/sweep.svg)

{sweep_table(results)}

## Connections and workers

Echo of 16 bytes, one round each (see the goals table for ratios measured in
rounds).

![requests/s and p99 against connections](benchmarks/connections.svg)

![requests/s and p99 against workers, 64 connections](benchmarks/workers.svg)

{MARKER}"""
    with open(path, "w") as f:
        f.write(text + kept)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0,
                        help=f"seconds per run, after {WARMUP} s of warm-up [default: 1]")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds per comparison [default: 5]")
    parser.add_argument("--quick", action="store_true",
                        help="0.5-second runs, 2 rounds, 2,000 idle connections: a rough look")
    parser.add_argument("--plain", action="store_true",
                        help="also run the sweep against examples/plain_echo.rs, to check the"
                        " baseline against a plain server")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks"))
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--redraw", action="store_true",
                        help="measure nothing: redraw the charts and the doc from results.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if args.redraw:
        with open(path) as f:
            results = json.load(f)
    else:
        if args.quick:
            args.seconds, args.rounds, args.idle_connections = 0.5, 2, 2000
        build(args.plain)
        results = measure(args)
        results["options"] = f"--seconds {args.seconds:g} --rounds {args.rounds}" + \
            (" --plain" if args.plain else "")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path} ({results['minutes']} minutes)")
    charts(args.out)
    write_doc(results, args.doc)
    print(f"wrote the charts in {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
