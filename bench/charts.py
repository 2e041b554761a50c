#!/usr/bin/env python3
"""Draws docs/benchmarks' charts from its results.json, with matplotlib.

    python3 bench/charts.py OUT_DIR [--png]

run_benchmarks.py runs it in a venv of its own that has matplotlib. Writes
sweep.svg (throughput and the gaspard/baseline ratio against payload size),
connections.svg and workers.svg (requests/s and p99 latency); with --png, a
PNG of each as well, to look at.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

# Text stays text in the SVG; no date or random ids, so a redraw of the same
# figures gives the same file.
plt.rcParams.update({
    "svg.fonttype": "none",
    "svg.hashsalt": "gaspard",
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
})
METADATA = {"Date": None}

COLOURS = {"baseline": "#7f7f7f", "gaspard": "#1f6fb4", "plain": "#d62728"}
KIB, MIB = 1024, 1024 * 1024
# Labelled payload sizes: every factor of 16 from 16 B.
SIZE_TICKS = [16, 256, 4 * KIB, 64 * KIB, MIB, 16 * MIB]


def median(values):
    ordered = sorted(v for v in values if v is not None)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def size_label(size):
    if size >= MIB:
        return f"{size // MIB} MiB"
    if size >= KIB:
        return f"{size // KIB} KiB"
    return f"{size:.0f} B"


def round_number(value, _pos=None):
    """1, 2, 5, 10, ..., 20k, 1.5M: a tick label a reader takes in at once."""
    for limit, suffix in [(1e9, "G"), (1e6, "M"), (1e3, "k")]:
        if abs(value) >= limit:
            v = value / limit
            return f"{v:g}{suffix}"
    return f"{value:g}"


def log_ticks(ax, low, high):
    """Round ticks (1, 2, 5 per decade) on a log y axis spanning low..high."""
    ticks = []
    decade = 10.0 ** int(f"{low:e}".split("e")[1])
    while decade <= high * 10:
        for m in (1, 2, 5):
            t = m * decade
            if low / 1.5 <= t <= high * 1.5:
                ticks.append(t)
        decade *= 10
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(round_number))
    ax.set_ylim(low / 1.6, high * 1.6)


def save(fig, out_dir, name, png):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name + ".svg"), metadata=METADATA)
    if png:
        fig.savefig(os.path.join(out_dir, name + ".png"), dpi=110)
    plt.close(fig)


def sweep_chart(results, out_dir, png):
    sweep = results["sweep"]
    conns = sorted({e["connections"] for e in sweep})
    names = [n for n in ("baseline", "plain", "gaspard") if n in sweep[0]["runs"]]
    fig, ((left, right), (cpu, cpu_ratio)) = plt.subplots(2, 2, figsize=(11, 8.8))
    lows, highs = [], []
    for name in names:
        for c in conns:
            points = [e for e in sweep if e["connections"] == c]
            points.sort(key=lambda e: e["size"])
            xs = [e["size"] for e in points]
            values = [[r["mb_per_sec"] for r in e["runs"][name]] for e in points]
            mid = [median(v) for v in values]
            err = [[m - min(v) for m, v in zip(mid, values)],
                   [max(v) - m for m, v in zip(mid, values)]]
            lows.append(min(x for v in values for x in v if x > 0))
            highs.append(max(max(v) for v in values))
            label = f"{name}, {c} connection{'s' if c > 1 else ''}"
            left.errorbar(xs, mid, yerr=err, color=COLOURS[name],
                          linestyle="-" if c == 1 else "--", marker="o" if c == 1 else "s",
                          markersize=4, capsize=2, linewidth=1.5, label=label)
    left.set_xscale("log", base=2)
    left.xaxis.set_major_locator(FixedLocator(SIZE_TICKS))
    left.xaxis.set_minor_locator(NullLocator())
    left.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: size_label(v)))
    log_ticks(left, min(lows), max(highs))
    left.set_xlabel("payload size (log scale)")
    left.set_ylabel("MB/s, request + reply payloads (log scale)")
    left.set_title("echo throughput, one request per connection")
    left.legend(fontsize=8, loc="lower right")

    for c in conns:
        points = sorted((e for e in sweep if e["connections"] == c), key=lambda e: e["size"])
        xs = [e["size"] for e in points]
        points = [e for e in points if e["gaspard_ratio"] is not None]
        xs = [e["size"] for e in points]
        mid = [e["gaspard_ratio"] for e in points]
        rounds = [[r for r in e["gaspard_ratios"] if r is not None] for e in points]
        err = [[m - min(r) for m, r in zip(mid, rounds)],
               [max(r) - m for m, r in zip(mid, rounds)]]
        right.errorbar(xs, mid, yerr=err, color=COLOURS["gaspard"],
                       linestyle="-" if c == 1 else "--", marker="o" if c == 1 else "s",
                       markersize=4, capsize=2, linewidth=1.5,
                       label=f"gaspard / baseline, {c} connection{'s' if c > 1 else ''}")
    right.axhline(1.0, color=COLOURS["baseline"], linewidth=1)
    right.set_xscale("log", base=2)
    right.xaxis.set_major_locator(FixedLocator(SIZE_TICKS))
    right.xaxis.set_minor_locator(NullLocator())
    right.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: size_label(v)))
    top = max([1.1] + [r + 0.05 for e in sweep for r in e["gaspard_ratios"] if r is not None])
    right.set_ylim(0, top)
    step = 2 if top <= 1.6 else 5
    right.set_yticks([x / 10 for x in range(0, int(top * 10) + 1, step)])
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.1f}×"))
    right.set_xlabel("payload size (log scale)")
    right.set_ylabel("ratio of requests/s (median of rounds)")
    right.set_title("gaspard as a fraction of the baseline")
    right.legend(fontsize=8, loc="upper right")

    # The servers' own CPU per request: far steadier on a shared host.
    lows, highs = [], []
    for name in [n for n in names if n != "plain"]:
        for c in conns:
            points = sorted((e for e in sweep if e["connections"] == c), key=lambda e: e["size"])
            mid = [median([r.get("server_cpu_us_per_request") for r in e["runs"][name]])
                   for e in points]
            xs = [e["size"] for e, m in zip(points, mid) if m]
            mid = [m for m in mid if m]
            if not mid:
                continue
            lows.append(min(mid))
            highs.append(max(mid))
            cpu.plot(xs, mid, color=COLOURS[name], linestyle="-" if c == 1 else "--",
                     marker="o" if c == 1 else "s", markersize=4, linewidth=1.5,
                     label=f"{name}, {c} connection{'s' if c > 1 else ''}")
    size_axis(cpu)
    if lows:
        log_ticks(cpu, min(lows), max(highs))
    cpu.set_xlabel("payload size (log scale)")
    cpu.set_ylabel("µs of server CPU per request (log scale)")
    cpu.set_title("server CPU per request (gaspard: daemon + workers)")
    cpu.legend(fontsize=8, loc="upper left")

    top = 1.0
    for c in conns:
        points = sorted((e for e in sweep if e["connections"] == c), key=lambda e: e["size"])
        xs, ys = [], []
        for e in points:
            b = median([r.get("server_cpu_us_per_request") for r in e["runs"]["baseline"]])
            g = median([r.get("server_cpu_us_per_request") for r in e["runs"]["gaspard"]])
            if b and g:
                xs.append(e["size"])
                ys.append(g / b)
        top = max([top] + ys)
        cpu_ratio.plot(xs, ys, color=COLOURS["gaspard"], linestyle="-" if c == 1 else "--",
                       marker="o" if c == 1 else "s", markersize=4, linewidth=1.5,
                       label=f"{c} connection{'s' if c > 1 else ''}")
    cpu_ratio.axhline(1.0, color=COLOURS["baseline"], linewidth=1)
    size_axis(cpu_ratio)
    cpu_ratio.set_ylim(0, top * 1.15)
    cpu_ratio.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}×"))
    cpu_ratio.set_xlabel("payload size (log scale)")
    cpu_ratio.set_ylabel("gaspard's CPU per request / the baseline's")
    cpu_ratio.set_title("what a request costs gaspard, in baseline requests")
    cpu_ratio.legend(fontsize=8, loc="upper right")
    save(fig, out_dir, "sweep", png)


def size_axis(ax):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(SIZE_TICKS))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: size_label(v)))


def two_panels(out_dir, name, xlabel, xs, series, png, log_x):
    """requests/s and p99 latency against xs, one line per series."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in [(left, "requests_per_sec", "requests/s"),
                           (right, "p99_us", "p99 latency, ms")]:
        values = []
        for label, runs in series.items():
            ys = [r[key] / (1000 if key == "p99_us" else 1) for r in runs]
            values += ys
            ax.plot(xs, ys, color=COLOURS.get(label, "#2ca02c"), marker="o", markersize=4,
                    linewidth=1.5, label=label)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        log_ticks(ax, min(values), max(values))
        ax.set_xlabel(xlabel)
        ax.set_title(title + " (log scale)")
        ax.legend(fontsize=8)
    save(fig, out_dir, name, png)


def main():
    out_dir = sys.argv[1]
    png = "--png" in sys.argv[2:]
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    sweep_chart(results, out_dir, png)
    conns = results["sweep_connections"]
    two_panels(out_dir, "connections", "connections (log scale), echo 16 B", conns["connections"],
               {k: conns[k] for k in ("baseline", "gaspard")}, png, log_x=True)
    workers = results["sweep_workers"]
    two_panels(out_dir, "workers", "workers (64 connections, echo 16 B)", workers["workers"],
               {"gaspard": workers["gaspard"]}, png, log_x=False)


if __name__ == "__main__":
    main()
