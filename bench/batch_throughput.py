"""Batch throughput: ``helm-dask run MANIFEST`` on four phantom subjects, one after the other vs
``--concurrent-subjects N``, on a loopback LocalCluster; a row per N with subjects per hour and peak RSS.

    flock /tmp/h/bigbench.lock python bench/batch_throughput.py --input-spacing 0.3 [--spacing native]
                                      [--subjects 4] [--concurrent 1,2,4] [--workers 2] [--workdir DIR]

The subjects are geometric phantoms (seeds 0.., alternating left and right hemispheres) written once as NIfTI in
WORKDIR (unmeasured). For each N a fresh LocalCluster runs the whole manifest into a fresh output folder (every
stage and every NIfTI export); the row's wall time is the batch's, its peak RSS the summed peak of client,
scheduler, nannies and workers, its ``mvox_per_s`` the input voxels of all subjects per second, and its note the
subjects per hour and each subject's own time.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import Sampler, append_row

from helm_dask.batch import format_summary, run_batch
from helm_dask.cluster import ClusterOptions, compute_context
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams


def ensure_subjects(work: Path, spacing: float, n: int) -> tuple[Path, int]:
    """Write ``n`` phantom subjects (once) and their manifest; the manifest and the voxels of all scans."""
    import nibabel as nib

    rows, voxels = [], 0
    for i in range(n):
        side = "LR"[i % 2]
        folder = work / f"sub{i:02d}_{spacing:g}mm"
        if not (folder / "hypothalamus.nii.gz").exists():
            write_phantom(folder, spacing_mm=spacing, side=side, seed=i, overwrite=True)
        voxels += math.prod(nib.load(folder / "scan.nii.gz").shape[:3])
        rows.append(
            f"  - {{scan: {folder}/scan.nii.gz, hypothalamus: {folder}/hypothalamus.nii.gz, side: {side}, "
            f"subject: sub{i:02d}}}\n"
        )
    manifest = work / f"batch_{spacing:g}mm_{n}.yaml"
    manifest.write_text("subjects:\n" + "".join(rows))
    return manifest, voxels


def measure(args, manifest: Path, voxels: int, concurrent: int, work: Path) -> dict:
    """One batch on a fresh LocalCluster; the appended row."""
    out = work / f"out_{args.input_spacing:g}_{args.spacing}_c{concurrent}"
    shutil.rmtree(out, ignore_errors=True)
    spacing = "native" if args.spacing == "native" else float(args.spacing)
    base = RunParams(scan="", hypothalamus="", out=str(out), spacing=spacing)
    opts = ClusterOptions(workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit, quiet=True)
    with compute_context(opts), Sampler() as s:
        t0 = time.perf_counter()
        rows = run_batch(manifest, base, quiet=True, concurrent=concurrent)
        wall = time.perf_counter() - t0
    print(format_summary(rows), flush=True)
    failed = [r["subject"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"subjects failed: {failed}")
    per_hour = len(rows) * 3600 / wall
    row = {
        "stage": f"batch:{len(rows)} subjects, concurrent {concurrent}",
        "spacing_mm": args.input_spacing,
        "work_spacing_mm": args.spacing,
        "voxels": voxels,
        "workers": args.workers,
        "threads_per_worker": 1,
        "wall_s": round(wall, 1),
        "mvox_per_s": round(voxels / wall / 1e6, 2),
        "peak_rss_mb": round(s.peak_rss_overall / 2**20),
        "read_mb": round(s.read_bytes / 2**20),
        "written_mb": round(s.written_bytes / 2**20),
        "load_avg": round(s.mean_load, 1),
        "note": "; ".join(
            x
            for x in (
                f"{per_hour:.1f} subjects/h",
                "subject s: " + ", ".join(f"{r['subject']}={r['seconds']:.0f}" for r in rows),
                f"cpu {s.cpu_seconds:.0f} s",
                args.note,
            )
            if x
        ),
    }
    append_row(row)
    print(f"concurrent {concurrent}: {wall:.1f}s, {per_hour:.1f} subjects/h, peak {row['peak_rss_mb']} MB", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-spacing", type=float, default=0.3, help="the phantoms' voxel size in mm (default 0.3)")
    ap.add_argument("--spacing", default="native", help="working spacing in mm, or native (default native)")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--concurrent", default="1,2,4", help="the N to measure, comma-separated (default 1,2,4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    manifest, voxels = ensure_subjects(work, args.input_spacing, args.subjects)
    for n in (int(x) for x in args.concurrent.split(",")):
        measure(args, manifest, voxels, n, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
