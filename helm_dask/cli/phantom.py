"""The ``phantom`` and ``demo`` commands: write the built-in phantom, run everything on it."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from ..errors import HelmError
from .options import Subparsers, _add_compute_options, _chunks, _cluster_opts, _compute, _positive_float, _say


def cmd_phantom(args: argparse.Namespace) -> int:
    """``helm-dask phantom``: write the built-in phantom (the MNI options are checked before a cluster starts).

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
    from ..phantom_io import MNI_OPTIONS, write_phantom

    mni = {k: getattr(args, k) for k in MNI_OPTIONS}
    given = [f"--{k.replace('_', '-')}" for k, v in mni.items() if v is not None]
    if args.anatomy != "mni152" and given:
        raise HelmError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --anatomy mni152 only",
            hint="add --anatomy mni152, or leave them out for the geometric phantom",
        )
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..phantom import phantom

    # the arguments are checked (lazy volumes, nothing computed) before a cluster is started
    try:
        phantom(args.spacing, side=args.side, echoes=args.echoes, seed=args.seed, anatomy=args.anatomy, **mni)
    except HelmError as e:  # its messages name the Python arguments (bag_gap_mm): name the flags
        for k in (k for k in MNI_OPTIONS if "_" in k):  # plain words (fluid) are words in the text too
            flag = f"--{k.replace('_', '-')}"
            e.message = re.sub(rf"\b{k}\b", flag, e.message)
            e.hint = re.sub(rf"\b{k}\b", flag, e.hint) if e.hint else e.hint
        raise
    with _compute(args):
        outputs = write_phantom(
            args.output,
            spacing_mm=args.spacing,
            side=args.side,
            echoes=args.echoes,
            seed=args.seed,
            chunks=args.chunks,
            overwrite=args.overwrite,
            quiet=args.quiet,
            anatomy=args.anatomy,
            **mni,
        )
    for name, path in outputs.items():
        _say(args, f"{name:<14} {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``helm-dask demo``: the whole pipeline on a left and a right phantom (:func:`helm_dask.demo.run_demo`).

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
    from ..demo import run_demo

    return run_demo(
        args.out, cluster=_cluster_opts(args), spacing_mm=args.spacing, quiet=args.quiet, overwrite=args.overwrite
    )


def add_phantom_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``phantom`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_phantom`.
    """
    p = subparsers.add_parser(
        "phantom", parents=list(parents), help="write the built-in phantom (OUT.zarr or a folder)"
    )
    p.add_argument("output", help="OUT.zarr for one store, otherwise a folder of NIfTI files")
    p.add_argument("--spacing", type=_positive_float, default=0.5, help="voxel size in mm (default 0.5)")
    p.add_argument("--side", choices=["L", "R"], default="L", help="hemisphere (default L)")
    p.add_argument("--echoes", type=int, default=1, choices=[1, 2, 3, 4], help="number of echoes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--chunks", type=_chunks, help="chunk shape (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--anatomy",
        choices=["geometric", "mni152"],
        default="geometric",
        help="geometric: the geometric hemisphere (default); mni152: a hemisphere made from the MNI "
        "ICBM152 2009a template in the installed nilearn wheel (folded cortex, sulci, ventricles)",
    )
    p.add_argument(
        "--fluid",
        choices=["bright", "dark", "none"],
        help="mni152: the fixative in the bag, the sulci and the ventricles is brighter than tissue, "
        "darker, or gives no signal (default bright)",
    )
    p.add_argument(
        "--bag-gap-mm",
        type=float,
        metavar="G",
        help="mni152: at least G mm of fluid between the brain and the bag (default 5; 0: the bag touches the brain)",
    )
    p.add_argument(
        "--header-rotation-deg",
        type=float,
        metavar="A",
        help="mni152: the stored affine is the anatomy's rotated by A degrees about the field of "
        "view's centre (default 0)",
    )
    p.add_argument(
        "--header-rotation-axis", choices=["x", "y", "z"], help="mni152: the world axis of that rotation (default z)"
    )
    _add_compute_options(p)
    p.set_defaults(func=cmd_phantom)
    return p


def add_demo_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_demo`.
    """
    p = subparsers.add_parser("demo", parents=list(parents), help="run everything on the built-in phantom")
    p.add_argument("--out", default="helm-demo", help="output folder (default ./helm-demo)")
    p.add_argument(
        "--spacing",
        type=_positive_float,
        default=1.0,
        help="phantom voxel size in mm (default 1.0: a quick run; 0.1 is the native scale)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: reuse them)")
    _add_compute_options(p)
    p.set_defaults(func=cmd_demo)
    return p
