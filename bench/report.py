"""Regenerate bench/README.md's results table and bench/results/scaling.png from bench/results/results.csv.

    python bench/report.py

For every (stage, spacing, working spacing, workers) the newest row is shown. The plot has peak RSS and wall time
against voxel count per stage, on log axes, with the memory budget drawn in.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "results.csv"
README = HERE / "README.md"
PLOT = HERE / "results" / "scaling.png"
BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"


def load_rows() -> list[dict]:
    with open(RESULTS, newline="") as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:  # newest wins
        key = (r["stage"], r["spacing_mm"], r.get("work_spacing_mm", ""), r["workers"])
        latest[key] = r
    return sorted(latest.values(), key=lambda r: (r["stage"], -float(r["spacing_mm"] or 0), r["workers"]))


def table(rows: list[dict]) -> str:
    cols = [
        ("stage", "stage"),
        ("spacing_mm", "input mm"),
        ("work_spacing_mm", "work mm"),
        ("voxels", "voxels"),
        ("workers", "workers"),
        ("wall_s", "wall s"),
        ("mvox_per_s", "Mvox/s"),
        ("mb_per_s", "MB/s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("read_mb", "read MB"),
        ("written_mb", "written MB"),
        ("load_avg", "load"),
        ("note", "note"),
    ]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for k, _ in cols:
            v = r.get(k, "") or ""
            if k == "voxels" and v:
                v = f"{int(float(v)):,}"
            vals.append(str(v))
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stage: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if not r.get("voxels") or not r.get("peak_rss_mb") or r["stage"] in ("gzip", "gunzip", "synth"):
            continue
        if r["stage"].startswith(("pipeline:export ", "bound:")):  # per-file rows and bounds: the table only
            continue
        label = r["stage"] + (f" (work {r['work_spacing_mm']})" if r.get("work_spacing_mm") else "")
        by_stage.setdefault(label, []).append((float(r["voxels"]), float(r["peak_rss_mb"]) / 1024, float(r["wall_s"])))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(17, 6.5))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*X"
    for i, (label, pts) in enumerate(sorted(by_stage.items())):
        pts.sort()
        v, m, t = zip(*pts)
        style = dict(color=colours[i % len(colours)], marker=markers[(i // len(colours)) % len(markers)], ms=4)
        a1.plot(v, m, "-", label=label, **style)
        a2.plot(v, t, "-", **style)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("voxels in the input volume")
        ax.grid(True, which="both", alpha=0.3)
    a1.axhline(3, color="k", ls="--", lw=1)
    a1.axhline(4, color="r", ls="--", lw=1)
    a1.set_ylabel("peak RSS, all processes (GiB)")
    a1.set_title("memory: flat with size (budgets 3 GB I/O, 4 GB stages)")
    a2.set_yscale("log")
    a2.set_ylabel("wall time (s)")
    a2.set_title("time: ~linear in voxels")
    # one legend for both panels, beside them: there are dozens of series
    fig.legend(*a1.get_legend_handles_labels(), loc="center right", fontsize=6.5, ncol=2, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.66, wspace=0.22, bottom=0.1)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main() -> int:
    rows = load_rows()
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")
    plot(rows)
    print(f"wrote {README} and {PLOT} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
