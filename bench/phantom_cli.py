"""`helm-dask phantom OUT.zarr` exactly as a user runs it, measured: wall time and peak RSS of the whole process tree
(the CLI, its scheduler and workers), one row per run in bench/results/results.csv.

    python bench/phantom_cli.py --spacing 0.1 --anatomy mni152 [--workdir DIR] [--keep]

The store (all five outputs: scan, hypothalamus, truth_mask, truth_tissue, truth_bias) goes to WORKDIR (default a
folder under /tmp) and is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import append_row, disk_size, measured


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spacing", type=float, required=True)
    ap.add_argument("--anatomy", default="mni152", choices=["geometric", "mni152"])
    ap.add_argument("--fluid", default=None, choices=["bright", "dark", "none"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"phantom_{a.anatomy}_{a.spacing:g}mm.zarr"
    if out.exists():
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("helm-dask")
    cmd = [
        str(exe),
        "phantom",
        str(out),
        "--anatomy",
        a.anatomy,
        "--spacing",
        f"{a.spacing:g}",
        "--workers",
        str(a.workers),
        "--quiet",
    ]
    if a.fluid:
        cmd += ["--fluid", a.fluid]
    print("+", " ".join(cmd), flush=True)
    with measured() as m:
        proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"helm-dask phantom failed with exit {proc.returncode}")
    from helm_dask.io import open_volume

    shape = tuple(int(n) for n in open_volume(out / "scan").shape)
    voxels = shape[0] * shape[1] * shape[2]
    size = disk_size(out)
    row = {
        "stage": f"phantom-cli:{a.anatomy}",
        "spacing_mm": a.spacing,
        "work_spacing_mm": "native",
        "voxels": voxels,
        "workers": a.workers,
        "threads_per_worker": 1,
        "wall_s": round(m.wall, 1),
        "mvox_per_s": round(voxels / m.wall / 1e6, 2),
        "peak_rss_mb": round(m.sampler.peak_rss / 2**20),
        "read_mb": round(m.sampler.read_bytes / 2**20),
        "written_mb": round(m.sampler.written_bytes / 2**20),
        "load_avg": round(m.sampler.mean_load, 1),
        "note": (
            f"`{' '.join(['helm-dask'] + cmd[1:])}` (all five outputs, scan grid {list(shape)}, "
            f"store {size / 2**30:.2f} GiB); peak RSS of the CLI + scheduler + workers; "
            f"CPU {m.sampler.cpu_seconds:.0f} s. {a.note}"
        ).strip(),
    }
    row = append_row(row)
    print(json.dumps({k: row[k] for k in ("stage", "spacing_mm", "voxels", "wall_s", "peak_rss_mb", "load_avg")}))
    if not a.keep:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
