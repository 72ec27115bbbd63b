"""The ``info`` and ``convert`` commands: describe a volume, convert between NIfTI and Zarr."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from .options import (
    Subparsers,
    _add_compute_options,
    _add_storage_options,
    _chunks,
    _compute,
    _say,
    _storage_options,
)


def cmd_info(args: argparse.Namespace) -> int:
    """``helm-dask info``: print a volume's shape, spacing, orientation, dtype, chunks and affine (or JSON).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.

    Returns
    -------
    int
        The exit status.
    """
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..io.location import use_storage_options
    from ..io.store import describe

    so = _storage_options(args)
    with use_storage_options(so):
        d = describe(args.path, storage_options=so)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    size = d["size_bytes"]
    rows = [
        ("path", d["path"]),
        ("format", d["format"]),
        ("kind", d["kind"]),
        ("shape", " x ".join(map(str, d["shape"]))),
        ("voxels", f"{d['voxels']:,}"),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in d["spacing_mm"])),
        ("orientation", d["orientation"]),
        ("dtype", d["dtype"]),
        ("chunks", "-" if d["chunks"] is None else " x ".join(map(str, d["chunks"]))),
        ("size on disk", "-" if size is None else f"{size / 2**20:,.1f} MiB"),
    ]
    for k in ("levels", "sform_code", "qform_code", "scaling"):
        if k in d:
            rows.append((k, str(d[k])))
    if "ome_placement" in d:  # how far OME-Zarr viewers put the worst corner from the affine
        rows.append(("ome placement", f"{d['ome_placement']} (worst corner {d['ome_placement_error_mm']:.3g} mm)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("affine")
    for r in d["affine"]:
        print("  " + "  ".join(f"{x:11.5f}" for x in r))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``helm-dask convert``: NIfTI to Zarr or Zarr to NIfTI (the direction from the extensions).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.

    Returns
    -------
    int
        The exit status.
    """
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..io.convert import convert
    from ..io.location import use_storage_options

    so = _storage_options(args)
    kw = dict(
        overwrite=args.overwrite, quiet=args.quiet, echo=args.echo, echo_combine=args.echo_combine, storage_options=so
    )
    if args.chunks:
        kw["chunks"] = args.chunks
    kw["nonfinite"] = args.nonfinite
    if args.ras:
        kw["ras"] = True
    t0 = time.perf_counter()
    with use_storage_options(so), _compute(args):
        out = convert(args.input, args.output, **kw)
    _say(args, f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def add_info_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``info`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_info`.
    """
    p = subparsers.add_parser("info", parents=list(parents), help="shape, spacing, orientation, dtype, chunks, affine")
    p.add_argument("path", help="a .nii/.nii.gz file or a helm-dask .zarr store (a path or an s3://... URL)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_options(p)
    p.set_defaults(func=cmd_info)
    return p


def add_convert_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``convert`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_convert`.
    """
    p = subparsers.add_parser("convert", parents=list(parents), help="NIfTI <-> Zarr (direction from the extensions)")
    p.add_argument("input", help="a .nii/.nii.gz file or a .zarr store (a path or an s3://... URL)")
    p.add_argument("output", help="the .zarr store or .nii/.nii.gz file to write (a path or an s3://... URL)")
    p.add_argument("--chunks", type=_chunks, help="Zarr chunk shape, e.g. 128 or 128,128,128 (default 128)")
    p.add_argument("--echo", type=int, help="4-D input: keep this echo (0-based)")
    p.add_argument(
        "--echo-combine",
        choices=["rms", "mean"],
        help="4-D input: combine the echoes (without --echo or this, a 4-D store keeps them all)",
    )
    p.add_argument(
        "--nonfinite", choices=["error", "zero"], default="error", help="NaN/inf voxels: refuse (default) or set to 0"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--ras",
        action="store_true",
        help="NIfTI/MGH input: store the voxels in RAS+ order (axis flips and a transpose, exact, as helm-dask run "
        "imports a scan) instead of the file's order",
    )
    _add_storage_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_convert)
    return p
