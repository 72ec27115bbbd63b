"""Synthetic-sample throughput: samples per second at 1 mm and 0.3 mm output from a 0.1 mm label map.

    python bench/synth_bench.py [--source-spacing 0.1] [--out-spacing 1.0 0.3] [--n 10] [--crop 96 96 96]
                                [--source store|lazy] [--workers 2] [--threads-per-worker 1] [--workdir DIR]

The label map is the phantom's whole-hemisphere map (tissue classes 0-5, hypothalamus 801-805, fornix 250):

* ``--source store`` (default): written once, unmeasured, to ``WORKDIR/synth_labels_<s>mm.zarr`` with its
  stride pyramid (reused if complete). Samples read the pyramid level the output spacing allows (1 mm output ->
  the 0.4 mm level; 0.3 mm output -> level 0, 0.1 mm); the hypothalamus centroid comes from the 0.8 mm level.
* ``--source lazy``: the map is generated chunk by chunk as samples need it (never stored); the crop centre is
  the phantom's known hypothalamus centroid. This measures phantom generation as much as sampling.

One unmeasured warm-up sample per output spacing (imports, centroid, cluster start), then ``--n`` samples are
timed; a row per output spacing goes to bench/results/results.csv (``note`` holds samples/s, crop, level).
Big files go to WORKDIR (default /tmp/helm-bench), never into git.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import RESULTS, append_row, measured

from helm_dask.cluster import ClusterOptions, compute_context


def label_map(spacing_mm: float):
    """The phantom's label map as a lazy volume (nothing computed)."""
    import dask.array as da
    import numpy as np

    from helm_dask.phantom import phantom
    from helm_dask.volume import affine_of, make_volume

    ph = phantom(spacing_mm, side="L", seed=0)
    hyp, tissue = ph["hypothalamus"], ph["truth_tissue"]
    data = da.where(hyp.data > 0, hyp.data, tissue.data.astype(np.uint16))
    return make_volume(data, affine_of(hyp), kind="labels", name="labels", source="phantom")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-spacing", type=float, default=0.1, help="label map voxel size in mm (default 0.1)")
    ap.add_argument("--out-spacing", type=float, nargs="+", default=[1.0, 0.3], help="output spacings (mm)")
    ap.add_argument("--n", type=int, default=10, help="timed samples per output spacing (default 10)")
    ap.add_argument("--crop", type=int, nargs=3, default=[96, 96, 96], help="output size in voxels")
    ap.add_argument("--source", choices=["store", "lazy"], default="store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument("--scheduler", help="'threads' / 'synchronous' (in-process) or a cluster address")
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--results", default=str(RESULTS), help="CSV the rows are appended to")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    import numpy as np

    from helm_dask.io import is_complete, save_volume
    from helm_dask.phantom import phantom_geometry
    from helm_dask.synth import LabelSource, SynthConfig, generate_sample, sample_params

    opts = ClusterOptions(
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        quiet=True,
    )
    crop = tuple(args.crop)
    s = args.source_spacing
    with compute_context(opts):
        vol = label_map(s)
        if args.source == "store":
            path = Path(args.workdir) / f"synth_labels_{s:g}mm.zarr"
            if not is_complete(path):
                t0 = time.perf_counter()
                save_volume(vol, path, overwrite=True)
                print(f"wrote {path} in {time.perf_counter() - t0:.0f}s (not measured)", flush=True)
            src = LabelSource.open(path)
            center = "hypothalamus"
        else:
            src = LabelSource.open(vol)
            center = tuple(float(v) for v in phantom_geometry(s)["hypothalamus_centroid_mm"])
        for out_s in args.out_spacing:
            cfg = SynthConfig(crop=crop, spacing_mm=out_s, center=center)
            warm = generate_sample(src, sample_params(cfg, args.seed, args.n), cfg)[0]  # not measured
            level = warm.attrs["synth"]["level"]
            with measured() as m:
                for i in range(args.n):
                    generate_sample(src, sample_params(cfg, args.seed, i), cfg)
            voxels = args.n * int(np.prod(crop))
            data_bytes = voxels * 6  # float32 image + uint16 labels
            rate = args.n / m.wall
            note = (
                f"{rate:.3f} samples/s; crop {'x'.join(map(str, crop))} at {out_s:g} mm from the {s:g} mm "
                f"phantom label map ({args.source}, level {level}); n={args.n}"
                + (f"; {args.note}" if args.note else "")
            )
            row = {
                "stage": "synth",
                "spacing_mm": out_s,
                "voxels": voxels,
                "workers": args.workers,
                "threads_per_worker": args.threads_per_worker,
                "wall_s": round(m.wall, 2),
                "mvox_per_s": round(voxels / m.wall / 1e6, 3),
                "mb_per_s": round(data_bytes / m.wall / 2**20, 1),
                "peak_rss_mb": round(m.sampler.peak_rss / 2**20),
                "read_mb": round(m.sampler.read_bytes / 2**20),
                "written_mb": round(m.sampler.written_bytes / 2**20),
                "data_mb": round(data_bytes / 2**20),
                "note": note,
            }
            append_row(row, Path(args.results))
            print(
                f"synth {out_s:g} mm: {rate:.3f} samples/s, wall {m.wall:.1f}s, level {level}, "
                f"peak RSS {row['peak_rss_mb']} MB",
                flush=True,
            )
        src.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
