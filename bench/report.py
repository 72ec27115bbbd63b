"""Regenerate bench/results/TABLE.md and bench/results/scaling.png from bench/results/results.csv.

    python bench/report.py

Both files are generated (never edit them by hand); the narrative of findings stays in bench/README.md and links
to them. For every (stage, input spacing, working spacing, workers) the newest row is kept. The table has one
section per stage family; the plot has one row of panels per family (peak RSS and wall time against the input
volume's voxel count, log axes, the memory budgets drawn in), each with its own short legend.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "results.csv"
TABLE = HERE / "results" / "TABLE.md"
PLOT = HERE / "results" / "scaling.png"

COLUMNS = [
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

IO_STAGES = ("phantom-zarr", "zarr-niigz", "niigz-zarr", "gzip", "gunzip")
SINGLE_STAGES = ("read-pass:", "closing:", "kmeans:", "bias:", "background:", "resample:", "export:", "bound:")


def _after_colon(row: dict) -> str:
    """``pipeline:bias`` -> ``bias``: the family's title says the rest."""
    return row["stage"].split(":", 1)[1]


def _export_kind(stage: str) -> str:
    """``pipeline:export label_map_k7.nii.gz`` -> ``label_map_k*``: the six k share one colour and legend entry."""
    name = stage.split(" ", 1)[1].removesuffix(".nii.gz")
    return re.sub(r"_k\d+$", "_k*", name)


class Family:
    """A group of rows drawn in one row of panels and listed under one heading of the table.

    ``label`` names a row's series (its colour and legend entry); ``dashed`` says which rows of a series are
    drawn dashed (the panel title says what dashed means); rows whose ``line`` differs get separate lines of
    the same colour (e.g. the six k-means exports).
    """

    def __init__(
        self,
        title: str,
        member: Callable[[dict], bool],
        label: Callable[[dict], str] = lambda r: r["stage"],
        dashed: Callable[[dict], bool] = lambda r: False,
        dashed_means: str = "",
        line: Callable[[dict], str] = lambda r: "",
        plot: bool = True,
    ):
        self.title, self.member, self.label, self.dashed = title, member, label, dashed
        self.dashed_means, self.line, self.plot = dashed_means, line, plot


FAMILIES = [
    Family(
        "I/O: phantom, import and export streams (bench/run.py, bench/phantom_cli.py)",
        lambda r: r["stage"] in IO_STAGES or r["stage"].startswith("phantom-cli:"),
        dashed=lambda r: r["stage"] in ("gzip", "gunzip"),
        dashed_means="gzip -1 / gunzip of the same bytes, the physical limit",
    ),
    Family(
        "pipeline stages, native grid (bench/pipeline.py)",
        lambda r: (
            r["stage"].startswith("pipeline:")
            and not r["stage"].startswith("pipeline:export ")
            and r["work_spacing_mm"] != "0.3"
        ),
        label=_after_colon,
        dashed=lambda r: r["workers"] == "1",
        dashed_means="1 worker",
    ),
    Family(
        "pipeline stages, 0.3 mm working grid (bench/pipeline.py)",
        lambda r: (
            r["stage"].startswith("pipeline:")
            and not r["stage"].startswith("pipeline:export ")
            and r["work_spacing_mm"] == "0.3"
        ),
        label=_after_colon,
        dashed=lambda r: r["workers"] == "1",
        dashed_means="1 worker",
    ),
    Family(
        "pipeline stages on the template phantom, real anatomy (bench/pipeline.py --anatomy mni152)",
        lambda r: r["stage"].startswith("pipeline-mni152:") and not r["stage"].startswith("pipeline-mni152:export "),
        label=_after_colon,
    ),
    Family(
        "NIfTI exports of the pipeline, one per file (bench/pipeline.py)",
        lambda r: r["stage"].startswith("pipeline:export "),
        label=lambda r: _export_kind(r["stage"]),
        line=lambda r: r["stage"],
        dashed=lambda r: r["workers"] == "1",
        dashed_means="1 worker",
    ),
    Family(
        "single stages on a pipeline run's stores, and their I/O bounds (bench/stages.py)",
        lambda r: r["stage"].startswith(SINGLE_STAGES),
        dashed=lambda r: r["stage"].startswith("bound:") or r["workers"] == "1",
        dashed_means="the I/O bound (read inputs + copy outputs), or 1 worker",
    ),
    Family(
        "in-memory references (bench/reference.py)",
        lambda r: r["stage"].startswith("reference:"),
        label=_after_colon,
        dashed=lambda r: r["work_spacing_mm"] == "0.3",
        dashed_means="0.3 mm working grid (solid: native)",
    ),
    Family(
        "brain mask on real anatomy (bench/mask_real.py)",
        lambda r: r["stage"].startswith("mask-real:"),
        label=_after_colon,
    ),
    Family(
        "bias on real anatomy (bench/bias_real.py; no peak RSS: the truths are held in memory)",
        lambda r: r["stage"].startswith("bias-real:"),
        label=_after_colon,
    ),
    Family(
        "whole pipeline on the template phantom (bench/template_pipeline.py; one size: table only)",
        lambda r: r["stage"].startswith("template-"),
        plot=False,
    ),
    Family("synthetic samples (bench/synth_bench.py; table only)", lambda r: r["stage"] == "synth", plot=False),
]
OTHER = Family("other rows", lambda r: True, plot=False)


def family_of(row: dict) -> Family:
    return next((f for f in FAMILIES if f.member(row)), OTHER)


def load_rows() -> list[dict]:
    with open(RESULTS, newline="") as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:  # newest wins
        key = (r["stage"], r["spacing_mm"], r.get("work_spacing_mm", ""), r["workers"])
        latest[key] = r
    return sorted(latest.values(), key=lambda r: (r["stage"], -float(r["spacing_mm"] or 0), r["workers"]))


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        vals = []
        for k, _ in COLUMNS:
            v = r.get(k, "") or ""
            if k == "voxels" and v:
                v = f"{int(float(v)):,}"
            vals.append(str(v))
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out)


def table_page(rows: list[dict]) -> str:
    """TABLE.md: a header saying it is generated, then one table per family (in FAMILIES order)."""
    parts = [
        "<!-- generated by bench/report.py from results/results.csv: do not edit, rerun the script -->",
        "# Benchmark results (generated)",
        "",
        "The newest row of every (stage, input spacing, working spacing, workers) in "
        "[results.csv](results.csv), by stage family; columns and how to read them: [../README.md](../README.md). "
        "Plot: [scaling.png](scaling.png).",
    ]
    for fam in [*FAMILIES, OTHER]:
        mine = [r for r in rows if family_of(r) is fam]
        if mine:
            parts += ["", f"## {fam.title}", "", table(mine)]
    return "\n".join(parts) + "\n"


def _series(fam: Family, rows: list[dict]) -> dict[tuple[str, str, bool], list[tuple[float, float | None, float]]]:
    """(label, line, dashed) -> sorted (voxels, peak GiB or None, wall s) of the family's plottable rows."""
    out: dict[tuple[str, str, bool], list[tuple[float, float | None, float]]] = {}
    for r in rows:
        if family_of(r) is not fam or not r.get("voxels") or not r.get("wall_s"):
            continue
        peak = float(r["peak_rss_mb"]) / 1024 if r.get("peak_rss_mb") else None
        out.setdefault((fam.label(r), fam.line(r), fam.dashed(r)), []).append(
            (float(r["voxels"]), peak, float(r["wall_s"]))
        )
    return {k: sorted(v) for k, v in sorted(out.items())}


def _draw_family(fam: Family, rows: list[dict], a_mem, a_time) -> None:
    import matplotlib.pyplot as plt

    series = _series(fam, rows)
    labels = list(dict.fromkeys(k[0] for k in series))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    colour = {lab: colours[i % len(colours)] for i, lab in enumerate(labels)}
    seen: set[str] = set()
    for (lab, _, dashed), pts in series.items():
        v = [p[0] for p in pts]
        style = dict(color=colour[lab], marker="o", ms=3.5, ls="--" if dashed else "-", lw=1.2)
        name = None if lab in seen else lab
        seen.add(lab)
        mem = [(x, m) for x, m, _ in pts if m is not None]
        if mem:
            a_mem.plot(*zip(*mem), label=name, **style)
        a_time.plot(v, [p[2] for p in pts], label=name, **style)
    title = fam.title + (f"\ndashed: {fam.dashed_means}" if fam.dashed_means else "")
    a_mem.set_title(title, fontsize=9, loc="left")
    a_time.set_yscale("log")
    a_time.set_ylabel("wall time (s)")
    axes = [a_time]
    if a_mem.lines:
        a_mem.axhline(3, color="k", ls=":", lw=1)
        a_mem.axhline(4, color="r", ls=":", lw=1)
        a_mem.set_ylabel("peak RSS, all processes (GiB)")
        axes.append(a_mem)
    else:  # no peak RSS in these rows: an empty frame would read as "zero"
        a_mem.set_xticks([])
        a_mem.set_yticks([])
        a_mem.text(0.5, 0.5, "no peak RSS recorded", ha="center", va="center", transform=a_mem.transAxes)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=8)
    a_time.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7.5, frameon=False)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILIES if f.plot and any(family_of(r) is f for r in rows)]
    fig, axes = plt.subplots(len(fams), 2, figsize=(15, 3.4 * len(fams)), squeeze=False)
    for fam, (a_mem, a_time) in zip(fams, axes):
        _draw_family(fam, rows, a_mem, a_time)
    axes[-1][0].set_xlabel("voxels in the input volume")
    axes[-1][1].set_xlabel("voxels in the input volume")
    fig.suptitle(
        "peak RSS (dotted: budgets 3 GB I/O, 4 GB stages) and wall time against volume size, by stage family",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def main() -> int:
    rows = load_rows()
    TABLE.write_text(table_page(rows))
    plot(rows)
    print(f"wrote {TABLE} and {PLOT} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
