"""2 workers against 1, from the rows of two bench/pipeline.py runs: where the second worker's time goes.

    python bench/scaling.py --commit 617cd68 --spacing 0.2 --anatomy mni152 --match "scaling pair"

For each stage (the exports summed) it prints the two wall times and their ratio, the CPU seconds of the client
and of the workers in each run, how much more CPU the workers spent with two of them (the same tasks: what they
lose to sharing the cores' caches and memory bandwidth), and how many cores each run kept busy. The last line is
the ratio the 2-worker run would reach if its measured CPU kept both cores busy all the time (its CPU / 2):
the most a better schedule of the same work can give. The rows carry the CPU seconds since bench/harness.py
began recording them (3819ba0).

    python bench/scaling.py --machine

times three kernels in one process and then in two processes at once: a pure-Python loop, zlib level 6 (as
compute-bound as the workers' codecs get) and a float32 multiply over 200 MB (memory-bound, as decoding, copying
and gathering chunks are): how much a second process gains on this machine before any of helm-dask's own costs.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "results.csv"
CPU = re.compile(r"CPU s: client ([\d.]+), workers ([\d.]+)")


def _runs(rows: list[dict], workers: str) -> dict[str, tuple[float, float, float]]:
    """Stage -> (wall s, client CPU s, workers' CPU s) of the newest matching run with ``workers`` workers."""
    rows = [r for r in rows if r["workers"] == workers]
    if not rows:
        return {}
    # the newest run: the rows after the last row of an earlier run's total
    totals = [i for i, r in enumerate(rows) if ":total" in r["stage"]]
    start = totals[-2] + 1 if len(totals) > 1 else 0
    out = {}
    for r in rows[start : totals[-1] + 1] if totals else rows:
        stage = r["stage"].split(":", 1)[1]
        m = CPU.search(r["note"])
        if m is None and not stage.startswith("total"):
            raise ValueError(f"row {r['stage']} at {r['commit']} carries no CPU seconds (rows before 3819ba0 do not)")
        out[stage] = (float(r["wall_s"]), *((float(m.group(1)), float(m.group(2))) if m else (0.0, 0.0)))
    return out


def _grouped(run: dict[str, tuple[float, float, float]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for stage, vals in run.items():
        key = "exports" if stage.startswith("export ") else stage
        acc = groups.setdefault(key, [0.0, 0.0, 0.0])
        for i, v in enumerate(vals):
            acc[i] += v
    return groups


def _python_loop(_: int) -> float:
    t = time.perf_counter()
    s = 0
    for i in range(15_000_000):
        s += i * i
    return time.perf_counter() - t


def _zlib(_: int) -> float:
    data = (np.random.default_rng(0).normal(size=4_000_000) * 50).astype(np.int16).tobytes()
    t = time.perf_counter()
    for _ in range(6):
        zlib.compress(data, 6)
    return time.perf_counter() - t


def _memory(_: int) -> float:
    a, b = np.ones(50_000_000, np.float32), np.empty(50_000_000, np.float32)
    t = time.perf_counter()
    for _ in range(20):
        np.multiply(a, 1.5, out=b)
        a, b = b, a
    return time.perf_counter() - t


def machine(repeats: int = 3) -> None:
    """Print each kernel's time alone and two at once, and the speedup of two processes over one."""
    with ProcessPoolExecutor(2) as ex:
        for kernel in (_python_loop, _zlib, _memory):
            for _ in range(repeats):
                alone = list(ex.map(kernel, [0]))[0]
                both = list(ex.map(kernel, [0, 1]))
                print(
                    f"{kernel.__name__.strip('_'):12s} alone {alone:5.2f} s, two at once {both[0]:5.2f} / "
                    f"{both[1]:5.2f} s: two processes do {2 * alone / max(both):.2f}x the work of one"
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machine", action="store_true", help="time the three kernels instead of reading rows")
    ap.add_argument("--commit")
    ap.add_argument("--spacing", help="input spacing in mm, as in the rows (0.1, 0.2, 0.3)")
    ap.add_argument("--anatomy", default="geometric", choices=["geometric", "mni152"])
    ap.add_argument("--match", default="", help="text the rows' note must contain")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.machine:
        machine()
        return 0
    if not args.commit or not args.spacing:
        ap.error("--commit and --spacing are required (or --machine)")
    family = "pipeline" if args.anatomy == "geometric" else f"pipeline-{args.anatomy}"
    with open(args.results, newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["commit"] == args.commit
            and r["spacing_mm"] == args.spacing
            and r["stage"].split(":", 1)[0] == family
            and args.match in r["note"]
        ]
    try:
        one, two = _grouped(_runs(rows, "1")), _grouped(_runs(rows, "2"))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    if not one or not two:
        print(f"no 1-worker and 2-worker runs match in {args.results}", file=sys.stderr)
        return 1
    print(
        f"{'stage':22s} {'1w s':>8s} {'2w s':>8s} {'ratio':>6s}  {'client CPU':>11s}  {'workers CPU':>13s}  "
        f"{'extra':>6s}  {'cores busy':>10s}"
    )
    cpu2 = 0.0
    for stage, (w1, c1, k1) in one.items():
        if stage.startswith("total") or stage not in two:
            continue
        w2, c2, k2 = two[stage]
        cpu2 += c2 + k2
        extra = f"{k2 / k1 - 1:+.0%}" if k1 else "--"
        print(
            f"{stage:22s} {w1:8.1f} {w2:8.1f} {w1 / w2:5.2f}x  {c1:5.1f} {c2:5.1f}  {k1:6.1f} {k2:6.1f}  {extra:>6s}  "
            f"{(c1 + k1) / w1:4.2f} {(c2 + k2) / w2:4.2f}"
        )
    total = next(k for k in one if k.startswith("total"))
    w1, w2 = one[total][0], two[total][0]
    print(f"{'whole run':22s} {w1:8.1f} {w2:8.1f} {w1 / w2:5.2f}x")
    print(
        f"2-worker run's CPU {cpu2:.1f} s: with both cores busy all the time it would take {cpu2 / 2:.1f} s, "
        f"a ratio of {w1 / (cpu2 / 2):.2f}x; it kept {cpu2 / w2:.2f} of 2 cores busy"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
