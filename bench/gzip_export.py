"""The ``.nii.gz`` writer on its own: a uint16 label map and a float32 image exported from Zarr stores.

    python bench/gzip_export.py [--spacing 0.2] [--repeat 2] [--workers 2] [--workdir DIR] [--note TEXT]

Measures :func:`helm_dask.io.save_nifti` (gzip level 1) on two phantom volumes stored as Zarr: ``labels`` (uint16:
the noisy scan cut into six classes inside the brain, the hypothalamus codes on top, like a k-means label map)
and ``image`` (the float32 scan); at 0.2 mm both are 960 x 410 x 650 = 256 M voxels, 488 MB and 976 MB raw.
One row per export (stage ``gzip-export:labels`` / ``gzip-export:image``): wall time, peak RSS of all
processes; the note gives the output size and how many gzip members the file has (counted after the
measurement).

To compare two writers, run the script with each code tree first on ``PYTHONPATH`` (the workers inherit it), e.g.
the commit before a change unpacked with ``git archive HEAD | tar -x -C /tmp/before`` -- the rows' ``commit``
column is the checkout's HEAD either way, so say which tree it was with ``--note``. The stores are made once
(unmeasured) in WORKDIR, by whichever tree runs first.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import append_row, measured

from helm_dask.cluster import ClusterOptions, compute_context


def _stores(workdir: Path, spacing: float) -> dict[str, Path]:
    """The two input stores, made (unmeasured) when missing."""
    import dask.array as da

    from helm_dask.io import save_volume
    from helm_dask.phantom import phantom
    from helm_dask.volume import make_volume

    paths = {name: workdir / f"{name}_{spacing:g}mm.zarr" for name in ("labels", "image")}
    if all(p.exists() for p in paths.values()):
        return paths
    ph = phantom(spacing, side="L", seed=0)
    scan = ph["scan"]
    # k-means-like classes: the noisy scan cut at fixed intensities inside the brain (speckled, as the real maps
    # are), 0 outside, the hypothalamus codes on top; compresses about as well as a label_map_k*
    classes = (da.digitize(scan.data, [36.0, 41.0, 46.0, 52.0, 60.0]) + 1).astype("uint16")
    hyp = ph["hypothalamus"].data
    labels = da.where(hyp > 0, hyp, da.where(ph["truth_mask"].data > 0, classes, 0)).astype("uint16")
    save_volume(make_volume(labels, scan.attrs["affine"], kind="labels"), paths["labels"], pyramid=False)
    save_volume(scan, paths["image"], pyramid=False)
    return paths


def _members(path: Path) -> int:
    """How many gzip members the file holds (ISA-L's inflate, member by member)."""
    try:
        from isal import isal_zlib as z
    except ImportError:
        z = zlib
    count = 0
    d = z.decompressobj(31)
    with open(path, "rb") as f:
        while buf := f.read(1 << 24):
            while buf:
                d.decompress(buf, 1 << 26)  # bounded output: a label map inflates 50-fold
                if d.eof:
                    count += 1
                    buf = d.unused_data
                    d = z.decompressobj(31)
                else:
                    buf = d.unconsumed_tail
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spacing", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    from helm_dask.io import open_volume, save_nifti

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    opts = ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)
    with compute_context(opts):
        paths = _stores(workdir, args.spacing)
        for _ in range(args.repeat):
            for name, store in paths.items():
                vol = open_volume(store)
                out = workdir / f"{name}_{args.spacing:g}mm.nii.gz"
                out.unlink(missing_ok=True)
                with measured() as m:
                    save_nifti(vol, out)
                raw, size = vol.size * vol.dtype.itemsize, out.stat().st_size
                note = (
                    f"{raw / 2**20:,.0f} MB raw -> {size / 2**20:,.1f} MB; {_members(out)} gzip member(s); "
                    f"cpu {m.sampler.cpu_seconds:.1f} s"  # all processes: the comparison that load does not skew
                )
                row = {
                    "stage": f"gzip-export:{name}",
                    "spacing_mm": args.spacing,
                    "voxels": int(vol.size),
                    "workers": args.workers,
                    "threads_per_worker": 1,
                    "wall_s": round(m.wall, 2),
                    "mvox_per_s": round(vol.size / m.wall / 1e6, 2),
                    "mb_per_s": round(raw / m.wall / 2**20, 1),
                    "peak_rss_mb": round(m.sampler.peak_rss / 2**20),
                    "read_mb": round(m.sampler.read_bytes / 2**20),
                    "written_mb": round(m.sampler.written_bytes / 2**20),
                    "data_mb": round(raw / 2**20),
                    "note": "; ".join(x for x in (args.note, note) if x),
                }
                append_row(row)
                print(f"{row['stage']}: {row['wall_s']} s, {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
