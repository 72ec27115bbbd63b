"""Brain mask (bag removal) on real anatomy: Dice against the truth on the template and geometric phantoms.

    python bench/mask_real.py --spacing 1.0 0.5 [--seeds 1] [--cases geometric,bright5,dark5,none5,...]
                              [--budget-min 40] [--workers 2] [--snapshot] [--no-record] [--note TEXT]

For every spacing, seed and case the phantom's ``scan`` and ``truth_mask`` are first written to a temporary
Zarr store (``tempfile``, outside the repository; full resolution only, no pyramid; removed after the case), so
the lazy phantom is generated exactly once and nothing is held in memory. Then, measured (time and peak RSS of
the whole process tree, LocalCluster workers included):

* ``brain_mask(open_volume(scan), fluid="auto")`` -- always ``auto``, never the true fluid: the side is decided
  from the data (``mask.attrs["background"]["fluid_side"]``) and compared with the truth;
* one chunk-wise Dask pass over the lazy mask and the stored truth: ``sum(mask & truth)``, ``sum(mask)``,
  ``sum(truth)`` -> Dice = 2 |M & T| / (|M| + |T|) and the volume ratio |M| / |T|. No full volume is ever
  materialised.

Cases (default order, also the order in which a ``--budget-min`` cut drops them): ``geometric`` (the geometric
phantom, :func:`helm_dask.phantom.phantom`, bright fluid), then the template phantom
(:func:`helm_dask.phantom_mni.phantom_mni`) ``<fluid><gap>`` for fluid bright / dark / none and bag gap 5 then
0 mm (``bright5,dark5,none5,bright0,dark0,none0``).

One row per case goes to bench/results/results.csv (or HELM_BENCH_RESULTS): stage ``mask-real:<case>``, wall =
the mask fit + the refinement/Dice pass (the phantom generation is not included; its time is in the note),
Dice, volume ratio, decided and true fluid side in the note. A brain_mask error is recorded as a row too (Dice
empty, the message in the note). A markdown table is printed at the end.

The note ends with short SHA-256 prefixes of ``background.py``, ``phantom.py`` and ``phantom_mni.py`` (``HEAD``
alone does not say which working-tree code ran). ``--snapshot`` runs everything (client and workers) on a copy of
the working tree's ``helm_dask`` taken at the start, so edits made to the tree during a long run cannot mix two
versions of the code (the note then says ``snapshot``); without it, a source file changed during the run is
flagged in the note of every later row (``changed during the run``: the processes may hold either version).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import FIELDS, RESULTS, append_row, measured

from helm_dask.cluster import ClusterOptions, compute_context

DEFAULT_CASES = "geometric,bright5,dark5,none5,bright0,dark0,none0"


def parse_case(case: str) -> dict:
    """``geometric`` or ``<bright|dark|none><gap mm>`` -> phantom options."""
    if case == "geometric":
        return {"anatomy": "geometric", "fluid": "bright", "bag_gap_mm": None}
    for fluid in ("bright", "dark", "none"):
        if case.startswith(fluid):
            return {"anatomy": "mni152", "fluid": fluid, "bag_gap_mm": float(case[len(fluid) :] or 5)}
    raise SystemExit(f"unknown case {case!r} (geometric, or bright|dark|none followed by the bag gap in mm)")


def write_case(tmp: Path, spacing_mm: float, seed: int, opts: dict) -> tuple[Path, Path, dict]:
    """The phantom's scan and truth mask written (one Dask computation, no pyramid); their store paths."""
    from helm_dask.io.store import save_volumes
    from helm_dask.phantom import phantom

    kw = {} if opts["anatomy"] == "geometric" else {"fluid": opts["fluid"], "bag_gap_mm": opts["bag_gap_mm"]}
    v = phantom(spacing_mm, seed=seed, anatomy=opts["anatomy"], chunks=(128, 128, 128), **kw)
    scan, truth = tmp / "scan.zarr", tmp / "truth_mask.zarr"
    save_volumes({scan: v["scan"], truth: v["truth_mask"]}, pyramid=False)
    return scan, truth, dict(v["scan"].attrs.get("phantom", {}))


def dice_pass(mask, truth) -> tuple[int, int, int]:
    """|M & T|, |M|, |T| in one chunk-wise pass (the lazy mask is computed once)."""
    import dask
    import dask.array as da

    m = mask.data > 0
    t = truth.data > 0
    inter, ms, ts = dask.compute(da.logical_and(m, t).sum(dtype="int64"), m.sum(dtype="int64"), t.sum(dtype="int64"))
    return int(inter), int(ms), int(ts)


def _src_hash(module) -> str:
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:8]


def versions() -> str:
    from helm_dask import background, coarse, phantom, phantom_mni

    # the bag removal's code: background.py and, since the redesign, the coarse-grid helpers it uses
    return (
        f"background.py {_src_hash(background)}, coarse.py {_src_hash(coarse)}, "
        f"phantom v{phantom.PHANTOM_MODEL_VERSION} "
        f"({_src_hash(phantom)}), phantom_mni v{phantom_mni.MNI_MODEL_VERSION} ({_src_hash(phantom_mni)})"
        + (", snapshot" if os.environ.get(_SNAPSHOT_ENV) else "")
    )


_SNAPSHOT_ENV = "HELM_MASK_REAL_SNAPSHOT"


def run_on_snapshot(argv: list[str]) -> int:
    """Re-run this script on a copy of the working tree's package (PYTHONPATH first: client and workers)."""
    import helm_dask

    src = Path(helm_dask.__file__).parent
    tmp = Path(tempfile.mkdtemp(prefix="helm-mask-real-code-"))
    try:
        shutil.copytree(src, tmp / "helm_dask", ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, **{_SNAPSHOT_ENV: str(tmp)})
        env["PYTHONPATH"] = os.pathsep.join([str(tmp)] + [p for p in [env.get("PYTHONPATH")] if p])
        return subprocess.call([sys.executable, __file__, *argv], env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record(row: dict) -> None:
    """Append one row: re-read the file's header right before; never rewrite the file (append only)."""
    header = None
    if RESULTS.exists():
        with open(RESULTS, newline="") as f:
            header = next(csv.reader(f), None)
    if header is None or header == FIELDS:
        append_row(row)
        return
    # another layout than the harness's: append in the file's own columns instead of letting append_row rewrite it
    import datetime as _dt
    import os

    from harness import commit, machine

    full = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "load_avg": round(os.getloadavg()[0], 1),
    }
    full.update(row)
    with open(RESULTS, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, extrasaction="ignore").writerow(full)


def run_case(args, spacing_mm: float, seed: int, case: str, version: str) -> dict:
    from helm_dask.background import brain_mask
    from helm_dask.errors import HelmError
    from helm_dask.io import open_volume

    opts = parse_case(case)
    tmp = Path(tempfile.mkdtemp(prefix="helm-mask-real-"))
    try:
        t0 = time.perf_counter()
        scan_path, truth_path, _info = write_case(tmp, spacing_mm, seed, opts)
        gen = time.perf_counter() - t0
        scan, truth = open_volume(scan_path), open_volume(truth_path)
        err, side, fit = "", "", 0.0
        inter = ms = ts = 0
        with measured() as m:
            try:
                t1 = time.perf_counter()
                mask = brain_mask(scan, fluid="auto")
                fit = time.perf_counter() - t1
                side = mask.attrs["background"]["fluid_side"]
                inter, ms, ts = dice_pass(mask, truth)
            except HelmError as e:
                err = str(e).splitlines()[0]
                fit = fit or time.perf_counter() - t1
        m.sampler.mark()  # per-process peaks -> stage_breakdown
        n = int(scan.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dice = 2 * inter / (ms + ts) if not err and ms + ts else None
    ratio = ms / ts if not err and ts else None
    true_side = opts["fluid"]
    desc = (
        "geometric phantom (bright fluid)"
        if opts["anatomy"] == "geometric"
        else f"template phantom, fluid {true_side}, bag gap {opts['bag_gap_mm']:g} mm"
    )
    res = (
        f"FAILED: {err}"
        if err
        else f"Dice {dice:.4f}, volume ratio {ratio:.4f} (mask {ms} / truth {ts} voxels), fluid_side {side} "
        f"(true {true_side}{'' if side == true_side else ', WRONG'})"
    )
    note = "; ".join(
        x
        for x in (
            args.note,
            f"{desc}, seed {seed}, fluid=auto",
            res,
            f"brain_mask fit {fit:.1f} s + refinement/Dice pass {m.wall - fit:.1f} s; phantom scan+truth_mask written "
            f"to a temporary store in {gen:.1f} s (not in wall_s)",
            f"cpu {m.sampler.cpu_seconds:.1f} s",
            m.sampler.stage_breakdown,
            version,
        )
        if x
    )
    row = {
        "stage": f"mask-real:{case}",
        "spacing_mm": f"{spacing_mm:g}",
        "work_spacing_mm": "native",
        "voxels": n,
        "workers": args.workers,
        "threads_per_worker": 1,
        "wall_s": round(m.wall, 2),
        "mvox_per_s": round(n / m.wall / 1e6, 2),
        "peak_rss_mb": round(m.sampler.peak_rss_overall / 2**20),
        "read_mb": round(m.sampler.read_bytes / 2**20),
        "written_mb": round(m.sampler.written_bytes / 2**20),
        "load_avg": round(m.sampler.mean_load, 1),
        "note": note,
    }
    if not args.no_record:
        record(row)
    out = {
        "case": case,
        "phantom": opts["anatomy"],
        "fluid": true_side,
        "gap": opts["bag_gap_mm"],
        "spacing": spacing_mm,
        "seed": seed,
        "voxels": n,
        "dice": dice,
        "ratio": ratio,
        "side": side,
        "err": err,
        "wall": m.wall,
        "fit": fit,
        "gen": gen,
        "peak_mb": m.sampler.peak_rss_overall / 2**20,
        "load": m.sampler.mean_load,
    }
    print(
        f"{spacing_mm:g} mm seed {seed} {case:9s} {res}; {m.wall:.1f} s (fit {fit:.1f} s), peak "
        f"{out['peak_mb']:.0f} MB, load {out['load']:.1f}; phantom {gen:.1f} s",
        flush=True,
    )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| phantom | fluid | bag gap mm | spacing mm | seed | voxels | Dice | volume ratio | fluid side decided "
        "| mask wall s | peak RSS MB | phantom written s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        gap = "-" if r["gap"] is None else f"{r['gap']:g}"
        dice = "error" if r["err"] else f"{r['dice']:.4f}"
        ratio = "-" if r["err"] else f"{r['ratio']:.4f}"
        side = r["side"] or "-"
        if r["side"] and r["side"] != r["fluid"]:
            side += f" (true {r['fluid']})"
        lines.append(
            f"| {'template' if r['phantom'] == 'mni152' else 'geometric'} | {r['fluid']} | {gap} | "
            f"{r['spacing']:g} | {r['seed']} | {r['voxels']:,} | {dice} | {ratio} | {side} | "
            f"{r['wall']:.1f} | {r['peak_mb']:.0f} | {r['gen']:.1f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spacing", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, in order (default {DEFAULT_CASES})")
    ap.add_argument(
        "--budget-min",
        type=float,
        default=0.0,
        help="start no new case after this many minutes since the start (0: no limit)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--snapshot",
        action="store_true",
        help="run on a copy of helm_dask taken at the start (immune to edits during the run)",
    )
    ap.add_argument("--no-record", action="store_true", help="print only, append no rows")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        parse_case(c)
    if args.snapshot and not os.environ.get(_SNAPSHOT_ENV):
        return run_on_snapshot(list(sys.argv[1:] if argv is None else argv))
    if os.environ.get(_SNAPSHOT_ENV):
        import helm_dask

        if not Path(helm_dask.__file__).is_relative_to(os.environ[_SNAPSHOT_ENV]):
            raise SystemExit(f"--snapshot: helm_dask imported from {helm_dask.__file__}, not the snapshot")
    version = versions()
    start = time.perf_counter()
    table, skipped = [], []
    with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
        for s in args.spacing:
            for seed in args.seeds:
                for case in cases:
                    if args.budget_min and time.perf_counter() - start > args.budget_min * 60:
                        skipped.append(f"{s:g} mm seed {seed} {case}")
                        continue
                    now = versions()
                    if now != version and "changed during the run" not in version:
                        version += "; source changed during the run (now " + now + ")"
                    table.append(run_case(args, s, seed, case, version))
    print()
    print(markdown(table))
    if skipped:
        print(f"\nnot started (budget of {args.budget_min:g} min used up): " + ", ".join(skipped))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
