"""Run one named benchmark stage at one spacing and append a row to bench/results/results.csv.

    python bench/run.py STAGE --spacing MM [--workers N] [--threads-per-worker N] [--workdir DIR]

Stages (the inputs each one needs are made, unmeasured, by the stage before it, in WORKDIR):

    phantom-zarr   the phantom scan generated chunk by chunk into a Zarr store (with pyramid)
    zarr-niigz     that store exported to scan.nii.gz (streamed, gzip level 1, members compressed on workers)
    niigz-zarr     scan.nii.gz imported back into a new store (one decompression pass)
    gzip           `gzip -1` of the same uncompressed bytes (the physical limit of one gzip stream)
    gunzip         `gunzip` of scan.nii.gz (the physical limit of one decompression stream)
    all-io         the five above in order

Big volumes go to WORKDIR (default: a folder under /tmp), never into git.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import append_row, disk_size, measured

from helm_dask.cluster import ClusterOptions, compute_context

IO_STAGES = ["phantom-zarr", "zarr-niigz", "niigz-zarr", "gzip", "gunzip"]


def _paths(workdir: Path, spacing: float) -> dict[str, Path]:
    tag = f"{spacing:g}mm"
    return {
        "zarr": workdir / f"scan_{tag}.zarr",
        "niigz": workdir / f"scan_{tag}.nii.gz",
        "nii": workdir / f"scan_{tag}.nii",
        "back": workdir / f"scan_{tag}_back.zarr",
    }


def run_stage(stage: str, spacing: float, workdir: Path, opts: ClusterOptions, note: str = "") -> dict:
    from helm_dask.io import nifti_to_zarr, open_volume, save_nifti, save_volume
    from helm_dask.phantom import phantom

    p = _paths(workdir, spacing)
    workdir.mkdir(parents=True, exist_ok=True)
    voxels = None
    data_bytes = None
    if stage in ("phantom-zarr",):
        if p["zarr"].exists():
            shutil.rmtree(p["zarr"])
        with compute_context(opts):
            vol = phantom(spacing, side="L", seed=0)["scan"]
            voxels, data_bytes = vol.size, vol.size * 4
            with measured() as m:
                save_volume(vol, p["zarr"])
    elif stage == "zarr-niigz":
        if not p["zarr"].exists():
            run_stage("phantom-zarr", spacing, workdir, opts, note="(input for zarr-niigz)")
        p["niigz"].unlink(missing_ok=True)
        with compute_context(opts):
            vol = open_volume(p["zarr"])
            voxels, data_bytes = vol.size, vol.size * 4
            with measured() as m:
                save_nifti(vol, p["niigz"])
    elif stage == "niigz-zarr":
        if not p["niigz"].exists():
            run_stage("zarr-niigz", spacing, workdir, opts, note="(input for niigz-zarr)")
        if p["back"].exists():
            shutil.rmtree(p["back"])
        with compute_context(opts):
            with measured() as m:
                res = nifti_to_zarr(p["niigz"], p["back"])
        import numpy as np

        voxels = int(np.prod(res["shape"]))
        data_bytes = voxels * 4
    elif stage in ("gzip", "gunzip"):
        if not p["niigz"].exists():
            run_stage("zarr-niigz", spacing, workdir, opts, note="(input for gzip)")
        if stage == "gzip":
            if not p["nii"].exists():
                with open(p["nii"], "wb") as f:
                    subprocess.run(["gunzip", "-c", str(p["niigz"])], stdout=f, check=True)
            data_bytes = disk_size(p["nii"])
            with measured() as m:
                subprocess.run(f"gzip -1 -c '{p['nii']}' > /dev/null", shell=True, check=True)
            p["nii"].unlink()
        else:
            with measured() as m:
                subprocess.run(f"gunzip -c '{p['niigz']}' > /dev/null", shell=True, check=True)
            data_bytes = None
        voxels = None
    else:
        raise SystemExit(f"unknown stage {stage!r}; choose from {IO_STAGES + ['all-io']}")
    if data_bytes is None:
        data_bytes = disk_size(p["nii"]) or None
    if voxels is None and data_bytes:
        voxels = (data_bytes - 352) // 4
    row = {
        "stage": stage,
        "spacing_mm": spacing,
        "voxels": voxels,
        "workers": opts.workers,
        "threads_per_worker": opts.threads_per_worker,
        "wall_s": round(m.wall, 2),
        "mvox_per_s": round(voxels / m.wall / 1e6, 2) if voxels else "",
        "mb_per_s": round(data_bytes / m.wall / 2**20, 1) if data_bytes else "",
        "peak_rss_mb": round(m.sampler.peak_rss / 2**20),
        "read_mb": round(m.sampler.read_bytes / 2**20),
        "written_mb": round(m.sampler.written_bytes / 2**20),
        "data_mb": round(data_bytes / 2**20) if data_bytes else "",
        "note": note,
    }
    row = append_row(row)
    print(
        ", ".join(
            f"{k}={row[k]}"
            for k in ("stage", "spacing_mm", "voxels", "wall_s", "mvox_per_s", "mb_per_s", "peak_rss_mb")
        ),
        flush=True,
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage")
    ap.add_argument("--spacing", type=float, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    opts = ClusterOptions(
        workers=args.workers, threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit, quiet=True
    )
    stages = IO_STAGES if args.stage == "all-io" else [args.stage]
    for st in stages:
        run_stage(st, args.spacing, Path(args.workdir), opts, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
