"""Stage-level checks against their bounds, on the stores a pipeline benchmark left behind.

    python bench/stages.py read-pass --run DIR [--volume preprocessed]
    python bench/stages.py closing --run DIR [--radii-vox 4,12]
    python bench/stages.py kmeans --run DIR [--method histogram]
    python bench/stages.py bias --run DIR
    python bench/stages.py background --run DIR
    python bench/stages.py resample --run DIR [--spacing 0.3]
    python bench/stages.py export --run DIR [--volume label_map_k9]
    python bench/stages.py bound --run DIR [--stages background,resample,...]

``read-pass``: one full read of a stored volume (every chunk decompressed and summed, nothing kept) -- the unit
the k-means bound is stated in ("all six k no slower than 3 read passes of the preprocessed store").
``kmeans``: the six-k fit alone (its passes over the preprocessed store), then labelling and writing the six maps.
``closing``: the merge stage's spherical closing of the stored hypothalamus labels at radii of 4 and 12 voxels
on the same grid: an exact Euclidean-distance closing should cost about the same at both (a structuring-element
closing grows like the ball's volume, 27x from 4 to 12 voxels).
``bound``: each stage's I/O bound on the same bytes: a read pass of every store the stage reads plus a
copy (read + encode + write, same chunks and codec, full resolution only) of every store it writes.
``export``: a stored volume to ``.nii.gz`` as ``run`` writes it, next to its two bounds measured on the same
bytes: a read pass of the store, and gzip level 1 of the raw bytes on every core (ISA-L and zlib; the
single-core rate measured on a 64-plane slab of the volume, scaled to the whole).

DIR is a ``bench/pipeline.py`` output folder (e.g. /tmp/helm-bench/run_0.1_native); rows go to
bench/results/results.csv (or HELM_BENCH_RESULTS).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import append_row, measured

from helm_dask.cluster import ClusterOptions, compute_context
from helm_dask.labels import DEFAULT_KS
from helm_dask.registry import STAGES, expand


def _store(run: Path, name: str) -> Path:
    hits = sorted(run.glob(f"*/helm.zarr/{name}"))
    if not hits:
        raise SystemExit(f"no {name} store under {run}/*/helm.zarr (run bench/pipeline.py first)")
    return hits[0]


def _common(vol, args, run: Path) -> dict:
    from helm_dask.volume import affine_of, spacing_of

    sp = float(spacing_of(affine_of(vol)).max())
    return {
        "spacing_mm": run.name.split("_")[1] if run.name.startswith("run_") else "",
        "work_spacing_mm": f"{sp:g}",
        "voxels": int(vol.size),
        "workers": args.workers,
        "threads_per_worker": 1,
    }


def _emit(vol, args, run: Path, stage: str, m, note: str, **extra) -> None:
    """Append (and print) the row of one measured block ``m`` on volume ``vol``: time, throughput, peak RSS of all
    processes with the per-process breakdown, I/O, load."""
    m.sampler.mark()  # per-process peaks -> stage_breakdown
    row = dict(
        _common(vol, args, run),
        stage=stage,
        wall_s=round(m.wall, 2),
        mvox_per_s=round(vol.size / m.wall / 1e6, 2),
        peak_rss_mb=round(m.sampler.peak_rss_overall / 2**20),
        read_mb=round(m.sampler.read_bytes / 2**20),
        written_mb=round(m.sampler.written_bytes / 2**20),
        load_avg=round(m.sampler.mean_load, 1),
        note="; ".join(
            x for x in (args.note, note, f"cpu {m.sampler.cpu_seconds:.1f} s", m.sampler.stage_breakdown) if x
        ),
        **extra,
    )
    append_row(row)
    print(row, flush=True)


def _sum_pass(data) -> float:
    """One read pass of a (stored) dask array: every chunk decoded and summed, nothing kept."""
    import dask.array as da

    return float(da.sum(data, dtype="float64").compute())


def read_pass(args) -> None:
    from helm_dask.io import open_volume

    run = Path(args.run)
    vol = open_volume(_store(run, args.volume))
    with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
        with measured() as m:
            total = _sum_pass(vol.data)
    nbytes = vol.size * vol.dtype.itemsize
    _emit(
        vol,
        args,
        run,
        f"read-pass:{args.volume}",
        m,
        f"sum={total:.6g}",
        mb_per_s=round(nbytes / 2**20 / m.wall, 1),
        data_mb=round(nbytes / 2**20),
    )


def closing(args) -> None:
    from helm_dask.closing import close_labels
    from helm_dask.io import open_volume, save_volume
    from helm_dask.volume import affine_of, spacing_of

    run = Path(args.run)
    hyp = open_volume(_store(run, "hypothalamus"))
    sp = float(spacing_of(affine_of(hyp)).max())
    tmp = Path(tempfile.mkdtemp(prefix="helm-closing-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            for r in (int(v) for v in args.radii_vox.split(",")):
                with measured() as m:
                    save_volume(close_labels(hyp, r * sp), tmp / f"closed_r{r}.zarr", pyramid=False)
                _emit(hyp, args, run, f"closing:r{r}vox", m, f"radius {r} voxels = {r * sp:g} mm")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kmeans(args) -> None:
    """The six-k fit alone (the passes over the volume), then the six maps labelled and written."""
    from helm_dask.io import open_volume
    from helm_dask.io.store import save_volumes
    from helm_dask.kmeans import fit_kmeans, kmeans_maps

    run = Path(args.run)
    pre, mask = open_volume(_store(run, "preprocessed")), open_volume(_store(run, "mask"))
    ks = list(range(4, 10))
    tmp = Path(tempfile.mkdtemp(prefix="helm-kmeans-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            with measured() as m:
                res = fit_kmeans(pre, mask, ks=ks, method=args.method, seed=0)
            rows = [
                (
                    "kmeans:fit-six-k",
                    m,
                    f"{args.method}; inertia k=4..9: " + " ".join(f"{res[k].inertia:.4g}" for k in ks),
                )
            ]
            with measured() as m2:
                save_volumes({tmp / f"k{k}.zarr": lab for k, lab in kmeans_maps(pre, mask, res).items()}, pyramid=False)
            rows.append(("kmeans:label-write-six", m2, "six uint8 maps written (no pyramid, no NIfTI)"))
        for stage, mm, note in rows:
            _emit(pre, args, run, stage, mm, note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def background(args) -> None:
    """The bag-removal stage on the run's imported scan: brain mask computed and written (as ``run`` does)."""
    from helm_dask.background import MASK_BATCH_CHUNKS, brain_mask
    from helm_dask.io import open_volume, save_volume
    from helm_dask.orient import to_ras

    run = Path(args.run)
    scan = to_ras(open_volume(_store(run, "scan_raw")))
    tmp = Path(tempfile.mkdtemp(prefix="helm-background-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            with measured() as m:
                save_volume(
                    brain_mask(scan, batch_chunks=MASK_BATCH_CHUNKS), tmp / "mask.zarr", batch_chunks=MASK_BATCH_CHUNKS
                )
            # against the run's own mask (same code path or an earlier one): the voxels that differ
            ref = open_volume(_store(run, "mask_ras")).data
            differ = int((open_volume(tmp / "mask.zarr").data != ref).sum().compute())
        _emit(
            scan,
            args,
            run,
            "background:mask",
            m,
            f"brain mask written, with pyramid; {differ} voxels differ from the run's mask_ras",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bias(args) -> None:
    """The bias stage on the run's stores: the fit on the coarse copy, then the field and the corrected image
    written (as ``run`` does), each measured apart."""
    from helm_dask.bias import bias_field, correct_bias, estimate_bias
    from helm_dask.io import open_volume
    from helm_dask.io.store import save_volumes

    run = Path(args.run)
    img, mask = open_volume(_store(run, "image_ws")), open_volume(_store(run, "mask"))
    tmp = Path(tempfile.mkdtemp(prefix="helm-bias-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            with measured() as m:
                model = estimate_bias(img, mask)
            with measured() as m2:
                save_volumes(
                    {
                        tmp / "bias.zarr": bias_field(model, img, keep_bits=13),
                        tmp / "preprocessed.zarr": correct_bias(img, model, mask=mask),
                    }
                )
        _emit(img, args, run, "bias:fit", m, "coarse copy (block means in boxes) + EM fit")
        _emit(img, args, run, "bias:apply-write", m2, "field and corrected image written, with pyramids")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resample(args) -> None:
    """The resample stage on the run's stores, as ``run`` does it for a left hemisphere: the masked scan to
    ``--spacing`` (anti-aliased linear), mask and hypothalamus labels by majority vote, written with pyramids.
    The client's peak is the point (it once kept ~1 GB of graph after the 0.1 -> 0.3 mm resample)."""
    from helm_dask.io import open_volume
    from helm_dask.io.store import save_volume
    from helm_dask.orient import map_right_to_left_codes, to_ras
    from helm_dask.resample import resample as resample_image
    from helm_dask.resample import resample_labels

    run = Path(args.run)
    scan = to_ras(open_volume(_store(run, "scan_raw")))
    mask = open_volume(_store(run, "mask_ras"))
    labels = to_ras(open_volume(_store(run, "labels_raw")))
    sp = float(args.spacing)
    tmp = Path(tempfile.mkdtemp(prefix="helm-resample-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            with measured() as m:
                # as run does it: the stored scan and mask read box by box, label codes mapped after the vote
                for name, vol in (
                    ("image_ws", resample_image(scan, sp, order=1, mask=mask)),
                    ("mask", resample_labels(mask, sp, method="majority")),
                    ("hypothalamus", map_right_to_left_codes(resample_labels(labels, sp, method="majority"))),
                ):
                    save_volume(vol, tmp / f"{name}.zarr")
        _emit(
            scan,
            args,
            run,
            f"resample:to-{sp:g}mm",
            m,
            "masked scan (linear, anti-aliased), mask and labels (majority) written with pyramids",
            work_spacing_mm=f"{sp:g}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(args) -> None:
    import gzip
    import os

    import numpy as np

    from helm_dask.io import nifti as nii
    from helm_dask.io import open_volume
    from helm_dask.io.convert import save_nifti

    run = Path(args.run)
    vol = open_volume(_store(run, args.volume))
    nbytes = vol.size * vol.dtype.itemsize
    # gzip bound: one core's level-1 rate on 64 middle planes (in the file's byte order), times the cores
    z0 = vol.shape[2] // 2
    raw = nii.slab_bytes(np.asarray(vol.data[:, :, z0 : z0 + 64]), vol.dtype)
    rates = {}
    for lib, fn in (
        ("isal", lambda b: nii.gzip_member(b, 1)),
        ("zlib", lambda b: gzip.compress(b, compresslevel=1, mtime=0)),
    ):
        t0 = time.perf_counter()
        fn(raw)
        rates[lib] = len(raw) / (time.perf_counter() - t0)
    ncores = os.cpu_count() or 1
    bound = {lib: nbytes / (r * ncores) for lib, r in rates.items()}
    out = Path(tempfile.mkdtemp(prefix="helm-export-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            with measured() as r:
                _sum_pass(vol.data)
            with measured() as m:
                save_nifti(vol, out / f"{args.volume}.nii.gz", quiet=True)
            size = (out / f"{args.volume}.nii.gz").stat().st_size
        _emit(
            vol,
            args,
            run,
            f"export:{args.volume}",
            m,
            f"{nbytes / 2**20:,.0f} MB raw -> {size / 2**20:,.0f} MB; bounds on the same bytes: read pass "
            f"{r.wall:.1f} s, gzip -1 on {ncores} cores ISA-L {bound['isal']:.1f} s / zlib {bound['zlib']:.1f} s "
            f"(one core {rates['isal'] / 2**20:.0f} / {rates['zlib'] / 2**20:.0f} MB/s)",
            mb_per_s=round(nbytes / 2**20 / m.wall, 1),
            data_mb=round(nbytes / 2**20),
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


# What each stage reads and writes comes from the stage registry. The bound counts the stores a stage reads in
# full (``Stage.reads``) and every store it writes, at the default k = 4..9: the definition the stage / bound
# ratios have been measured with (``Stage.also_reads`` -- the mirror's mask and labels -- is left out of it).
_STAGE_IO = {s.name: (expand(s.reads, DEFAULT_KS), s.outputs(DEFAULT_KS)) for s in STAGES if s.reads}


def bound(args) -> None:
    import dask.array as da
    import zarr

    from helm_dask.io import open_volume

    run = Path(args.run)
    stages = args.stages.split(",") if args.stages else list(_STAGE_IO)
    tmp = Path(tempfile.mkdtemp(prefix="helm-bound-", dir=run))
    try:
        with compute_context(ClusterOptions(workers=args.workers, threads_per_worker=1, quiet=True)):
            for stage in stages:
                ins, outs = _STAGE_IO[stage]
                parts = []
                with measured() as m:
                    for name in ins:
                        t0 = time.perf_counter()
                        _sum_pass(open_volume(_store(run, name)).data)
                        parts.append(f"read {name} {time.perf_counter() - t0:.1f} s")
                    for name in outs:
                        t0 = time.perf_counter()
                        src = zarr.open_array(str(_store(run, name) / "0"), mode="r")
                        dst = zarr.create_array(
                            str(tmp / f"{name}.zarr"),
                            shape=src.shape,
                            dtype=src.dtype,
                            chunks=src.chunks,
                            compressors=src.compressors,
                            fill_value=0,
                        )
                        da.store(da.from_zarr(src), dst, lock=False)
                        parts.append(f"copy {name} {time.perf_counter() - t0:.1f} s")
                        shutil.rmtree(tmp / f"{name}.zarr", ignore_errors=True)
                vol = open_volume(_store(run, ins[0]))
                _emit(
                    vol,
                    args,
                    run,
                    f"bound:{stage}",
                    m,
                    "read pass of the inputs + copy of the outputs (full resolution): " + ", ".join(parts),
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("read-pass", "closing", "kmeans", "bias", "background", "resample", "export", "bound"):
        p = sub.add_parser(name)
        p.add_argument("--run", required=True, help="a bench/pipeline.py output folder")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--note", default="")
    sub.choices["read-pass"].add_argument("--volume", default="preprocessed")
    sub.choices["export"].add_argument("--volume", default="label_map_k9")
    sub.choices["bound"].add_argument("--stages", default="", help="comma-separated (default: all)")
    sub.choices["closing"].add_argument("--radii-vox", default="4,12")
    sub.choices["kmeans"].add_argument("--method", default="histogram")
    sub.choices["resample"].add_argument("--spacing", default="0.3", help="target spacing in mm")
    args = ap.parse_args(argv)
    {
        "read-pass": read_pass,
        "closing": closing,
        "kmeans": kmeans,
        "bias": bias,
        "background": background,
        "resample": resample,
        "export": export,
        "bound": bound,
    }[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
