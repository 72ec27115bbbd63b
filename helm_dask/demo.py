"""``helm-dask demo``: everything the package can do, on the built-in phantom.

It writes a left and a right phantom as NIfTI (as a user's scans would arrive), imports them to Zarr, and runs
the pipeline on them; outputs that already exist are reused, so a second run is quick.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cluster import ClusterOptions, compute_context


def _say(quiet: bool, *msg) -> None:
    if not quiet:
        print(*msg, flush=True)


def run_demo(out, *, cluster: ClusterOptions | None = None, spacing_mm: float = 1.0, quiet: bool = False,
             overwrite: bool = False) -> int:
    from .io import convert, describe
    from .phantom_io import write_phantom

    out = Path(out)
    t0 = time.perf_counter()
    with compute_context(cluster or ClusterOptions(quiet=quiet)):
        for side in ("L", "R"):
            folder = out / f"phantom_{side}"
            if overwrite or not (folder / "scan.nii.gz").exists():
                _say(quiet, f"[demo] phantom {side} at {spacing_mm:g} mm -> {folder}/")
                write_phantom(folder, spacing_mm=spacing_mm, side=side, overwrite=True, quiet=quiet)
            store = out / f"phantom_{side}" / "scan.zarr"
            if overwrite or not store.exists():
                _say(quiet, f"[demo] import {folder / 'scan.nii.gz'} -> {store}")
                convert(folder / "scan.nii.gz", store, overwrite=True, quiet=quiet)
            d = describe(store)
            _say(quiet, f"[demo] {store}: {' x '.join(map(str, d['shape']))} voxels, "
                        f"{' x '.join(f'{s:g}' for s in d['spacing_mm'])} mm, orientation {d['orientation']}")
    _say(quiet, f"[demo] done in {time.perf_counter() - t0:.1f}s; outputs in {out.resolve()}")
    return 0
