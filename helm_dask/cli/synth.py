"""The ``synth`` command: synthetic ``(image, labels)`` pairs from a label map (:mod:`helm_dask.synth`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .options import Subparsers, _add_compute_options, _compute

if TYPE_CHECKING:
    from ..synth import SynthConfig


def _positive(text: str) -> float:
    """``--spacing``: a positive number (synth's own messages, not :func:`~.options._positive_float`'s)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _level_arg(text: str) -> str | int:
    """``--level``: ``auto`` or a pyramid level >= 0."""
    if text == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"level is 'auto' or an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"level is 'auto' or an integer >= 0, got {text!r}")
    return v


def add_synth_parser(
    subparsers: Subparsers,
    common_parents: Sequence[argparse.ArgumentParser],
    add_compute_options: Callable[[argparse.ArgumentParser], None] = _add_compute_options,
) -> argparse.ArgumentParser:
    """Add the ``synth`` sub-command to the ``helm-dask`` parser.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table, from ``parser.add_subparsers()``.
    common_parents : sequence of ArgumentParser
        Parents whose options every command has (``--quiet``, ``--debug``).
    add_compute_options : callable, optional
        Adds the compute options (``--scheduler``, ``--workers``, TLS, ...) to a parser.

    Returns
    -------
    ArgumentParser
        The ``synth`` parser; its ``func`` default is :func:`cmd_synth`.

    Example
    -------
    >>> parser = argparse.ArgumentParser(prog="helm-dask")
    >>> p = add_synth_parser(parser.add_subparsers(dest="command"), [])
    >>> args = parser.parse_args(["synth", "labels.nii.gz", "--out", "samples", "--n", "2"])
    >>> args.n, args.crop, args.level, args.func is cmd_synth
    (2, (96, 96, 96), 'auto', True)
    """
    p = subparsers.add_parser(
        "synth",
        parents=list(common_parents),
        help="SynthSeg-style synthetic (image, labels) pairs from a label map",
        description="Write N synthetic (image, labels) pairs generated from LABEL_MAP (NIfTI or .zarr): random "
        "affine + smooth deformation, per-label Gaussian intensities, bias field, gamma and a "
        "simulated low-resolution acquisition, cropped around the hypothalamus. Same --seed, same "
        "samples.",
    )
    p.add_argument("label_map", metavar="LABEL_MAP", help="a .nii/.nii.gz label map or a helm-dask .zarr store")
    p.add_argument("--n", type=int, default=10, help="number of samples (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="index of the first sample (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--spacing", type=_positive, default=1.0, metavar="MM", help="output voxel size (default 1.0)")
    p.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=(96, 96, 96),
        metavar=("X", "Y", "Z"),
        help="output size in voxels (default 96 96 96)",
    )
    p.add_argument(
        "--center",
        choices=["hypothalamus", "volume"],
        default="hypothalamus",
        help="crop centre: the hypothalamus (codes 801-810, default) or the map's centre",
    )
    p.add_argument(
        "--center-mm",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="crop centre as a world point (RAS+ mm); overrides --center",
    )
    p.add_argument(
        "--level",
        type=_level_arg,
        default="auto",
        help="pyramid level to read the labels at (default auto: voxels <= spacing/2; 0 is exact)",
    )
    p.add_argument("--zarr", action="store_true", help="also write each sample as .zarr stores")
    p.add_argument("--normalize", action="store_true", help="rescale every image to [0, 1]")
    g = p.add_argument_group("augmentations (all on by default)")
    for flag, what in (
        ("affine", "rotation, scaling and shear"),
        ("deformation", "the smooth non-linear deformation"),
        ("bias", "the bias field"),
        ("gamma", "the gamma augmentation"),
        ("acquisition", "the simulated low-resolution acquisition"),
    ):
        g.add_argument(f"--no-{flag}", action="store_true", help=f"switch off {what}")
    g.add_argument("--no-augmentation", action="store_true", help="switch all of the above off")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_compute_options(p)
    p.set_defaults(func=cmd_synth)
    return p


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The generator's configuration from the ``synth`` command line.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``helm-dask synth`` command line.

    Returns
    -------
    SynthConfig
        Output grid, centre, level and the augmentations switched on or off by the flags; the rest default.
    """
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..synth import SynthConfig

    off = getattr(args, "no_augmentation", False)
    return SynthConfig(
        crop=tuple(args.crop),
        spacing_mm=args.spacing,
        center=tuple(args.center_mm) if args.center_mm else args.center,
        level=args.level,
        affine=not (off or args.no_affine),
        deformation=not (off or args.no_deformation),
        bias=not (off or args.no_bias),
        gamma=not (off or args.no_gamma),
        acquisition=not (off or args.no_acquisition),
        normalize=args.normalize,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    """``helm-dask synth``: write the samples, print where they went.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line (see :func:`add_synth_parser`).

    Returns
    -------
    int
        The exit status, 0 (errors are raised as :class:`~helm_dask.errors.HelmError`).
    """
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..synth import write_samples

    cfg = config_from_args(args)
    with _compute(args):  # TLS and every other compute option, as for the other commands
        records = write_samples(
            args.label_map,
            args.out,
            args.n,
            args.seed,
            cfg,
            start=args.start,
            zarr=args.zarr,
            overwrite=args.overwrite,
            quiet=getattr(args, "quiet", False),
        )
    if not getattr(args, "quiet", False):
        print(f"wrote {len(records)} sample(s) to {args.out} (samples.json lists their parameters)", flush=True)
    return 0
