#!/usr/bin/env python3
"""Runs the same loads against two gaspard builds side by side, in one go.

    python3 bench/compare.py OLD_RELEASE_DIR NEW_RELEASE_DIR [--rounds 5] [--seconds 3]
                             [--only NAME] [--generator DIR] [--baseline]

Each directory holds a release build (`gaspard`, `libecho.so`, `libspin.so`),
for example `target/release` of two checkouts. The load generator is the new
directory's `gaspar-bench` (or --generator's), so both builds face the same
one. Each round runs
every scenario against the old build, then the new, so that a slow moment of
the (shared, noisy) host hits both alike; the ratio new/old is printed round
by round. A change that should cost nothing should show ratios around 1.00.
With --baseline, each round drives the generator's serve-baseline first
(echo scenarios), and each build's ratio to it is printed too.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile

import run_benchmarks as rb


class Build(rb.Server):
    """A gaspard from `directory`, stopped on exit from the with block."""

    def __init__(self, directory, handler="echo", workers=2):
        self.port = rb.free_port()
        cmd = [os.path.join(directory, "gaspard"), "--handler",
               os.path.join(directory, f"lib{handler}.so"), "--port", str(self.port),
               "--workers", str(workers), "--log-level", "error"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.kind = directory


def scenarios(spin_file):
    """(name, handler, connections, bench keyword arguments, figure)."""
    return [
        ("echo 16 B, 64 connections", "echo", 64, {}, "requests_per_sec"),
        ("echo 16 B, 256 connections", "echo", 256, {}, "requests_per_sec"),
        ("echo 16 B, one connection: p50 µs", "echo", 1, {}, "p50"),
        ("echo 1 MiB, one connection: MB/s", "echo", 1,
         {"size": "1M", "extra": ["--check"]}, "mb_per_sec"),
        ("echo 1 MiB, one connection: p50 µs", "echo", 1,
         {"size": "1M", "extra": ["--check"]}, "p50"),
        ("echo 1 MiB, 4 connections: MB/s", "echo", 4,
         {"size": "1M", "extra": ["--check"]}, "mb_per_sec"),
        ("echo 16 MiB, one connection: MB/s", "echo", 1,
         {"size": "16M", "extra": ["--check"]}, "mb_per_sec"),
        ("persistent, 8 x pipeline 16", "echo", 8,
         {"extra": ["--persistent", "--pipeline", "16", "--check"]}, "requests_per_sec"),
        ("spin 1 ms, 8 connections", "spin", 8,
         {"size": None, "extra": ["--payload-file", spin_file, "--expect", "ok"]},
         "requests_per_sec"),
    ]


def figure(result, key):
    return result["latency_us"]["p50"] if key == "p50" else result[key]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--generator", help="the directory of the gaspar-bench to use"
                        " [default: NEW_RELEASE_DIR]")
    parser.add_argument("--only", default="",
                        help="run only the scenarios whose name contains this")
    parser.add_argument("--baseline", action="store_true",
                        help="also drive serve-baseline in each round (echo scenarios)")
    args = parser.parse_args()
    rb.RELEASE = args.generator or args.new  # the load generator
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as spin:
        spin.write("1000")
        spin.flush()
        for name, handler, conns, kw, key in scenarios(spin.name):
            if args.only not in name:
                continue
            with_base = args.baseline and handler == "echo"
            columns = "baseline, old, new, old/baseline, new/baseline" if with_base else "old, new"
            print(f"{name} ({args.rounds} rounds; {columns}, new/old)")
            ratios = []
            base = rb.Server("baseline") if with_base else contextlib.nullcontext()
            with base as base, Build(args.old, handler) as old, Build(args.new, handler) as new:
                for _ in range(args.rounds):
                    b = figure(rb.bench(base, conns, args.seconds, **kw), key) if base else None
                    o = figure(rb.bench(old, conns, args.seconds, **kw), key)
                    n = figure(rb.bench(new, conns, args.seconds, **kw), key)
                    ratios.append(n / o if o else float("nan"))
                    if b is None:
                        print(f"  {o:>10.1f} {n:>10.1f} {ratios[-1]:>6.2f}")
                        continue
                    # For latency the difference tells more than a ratio.
                    if key == "p50":
                        o_b, n_b = f"{o - b:+.0f}", f"{n - b:+.0f}"
                    else:
                        o_b, n_b = f"{o / b:.2f}", f"{n / b:.2f}"
                    print(f"  {b:>10.1f} {o:>10.1f} {n:>10.1f} {o_b:>6} {n_b:>6}"
                          f" {ratios[-1]:>6.2f}")
            ratios.sort()
            print(f"  median new/old {ratios[len(ratios) // 2]:.2f}"
                  f" (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
