"""The ``run`` command: the pipeline on one scan or a manifest, and its options (also the manifest keys)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..cluster import compute_context
from ..errors import HelmError
from ..registry import UNTIL
from .options import (
    EXIT_EPILOG,
    Subparsers,
    _add_compute_options,
    _add_storage_options,
    _chunks,
    _cluster_opts,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _say,
    _spacing,
)


def cmd_run(args: argparse.Namespace) -> int:
    """``helm-dask run``: the pipeline on one scan, or on every subject of a manifest (exit 4 if some failed).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.

    Returns
    -------
    int
        The exit status.
    """
    from ..batch import format_summary, manifest_keys, plan_batch, run_batch, run_params_kwargs
    from ..io.location import join, use_storage_options
    from ..pipeline import RunParams, run_subject

    target = args.scan
    is_manifest = target.lower().endswith((".yaml", ".yml", ".csv"))
    if not args.out:
        raise HelmError("--out is required", hint="e.g. --out results/")
    if not is_manifest and not args.hypothalamus:
        raise HelmError(
            "--hypothalamus is required for a single scan",
            path=target,
            hint="give the manual hypothalamus labels with --hypothalamus SEG.nii.gz",
        )
    if is_manifest:
        # one subject's files or name would apply to every row (one name for all: they would overwrite each other)
        for flag, key in (
            ("--hypothalamus", "hypothalamus"),
            ("--mask", "mask"),
            ("--subject", "subject"),
            ("--reference-tissue", "reference_tissue"),
        ):
            if getattr(args, key):
                raise HelmError(
                    f"{flag} is one subject's",
                    path=target,
                    hint=f"give each subject its own in the manifest ('{key}: ...')",
                )
    ref_tissue = args.reference_tissue
    if ref_tissue:
        if not os.path.exists(ref_tissue):
            raise HelmError("reference tissue map not found", path=ref_tissue, hint="check the --reference-tissue path")
        ref_tissue = os.path.abspath(ref_tissue)
    options = {dest: getattr(args, dest) for dest in manifest_keys()}
    options.update(scan=target, hypothalamus=args.hypothalamus or "", reference_tissue=ref_tissue)
    base = RunParams(out=args.out, **run_params_kwargs(options))
    plan = plan_batch(target, base) if is_manifest else None  # the whole manifest checked before anything
    with use_storage_options(base.storage_options), compute_context(_cluster_opts(args)):
        if is_manifest:
            rows = run_batch(target, base, quiet=args.quiet, debug=args.debug, plan=plan)
            print(format_summary(rows))
            return 0 if all(r["status"] == "ok" for r in rows) else 4
        info = run_subject(base, quiet=args.quiet)
    _say(args, f"[{info['subject']}] finished in {info['seconds']:.1f}s -> {join(args.out, info['subject'])}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``helm-dask run`` that describe a subject's run; every one of them but ``--out`` is also a
    manifest key (:func:`run_option_actions`), so a flag added here is one too."""
    _add_run_inputs(p)
    _add_run_preprocessing_options(p)
    _add_run_method_options(p)
    _add_run_output_options(p)


def _add_run_inputs(p: argparse.ArgumentParser) -> None:
    """``run``: the scan (or manifest), its labels, side, mask, subject name and where outputs go."""
    p.add_argument("scan", metavar="SCAN|MANIFEST")
    p.add_argument("--hypothalamus", metavar="SEG", help="manual hypothalamus labels (NIfTI, same grid as SCAN)")
    p.add_argument(
        "--side",
        choices=["L", "R", "auto"],
        default="auto",
        help="hemisphere; auto decides from where the hypothalamus lies (default auto)",
    )
    p.add_argument("--out", metavar="OUT", help="output folder (a path, or a URL such as s3://bucket/results)")
    _add_storage_options(p)
    p.add_argument(
        "--mask",
        metavar="FILE",
        help="your own brain mask instead of the bag removal: NIfTI or FreeSurfer .mgz/.mgh (e.g. "
        "SAMSEG's segmentation) on the scan's grid, any non-zero value = brain; its checksum is "
        "recorded in run.json and a changed file recomputes the mask and what follows",
    )
    p.add_argument(
        "--fluid",
        choices=["auto", "bright", "dark", "none"],
        default="auto",
        help="bag removal: the fluid around the specimen is brighter or darker than the brain, or gives "
        "no signal (none, e.g. Fomblin); auto decides from the data and run.json records what it "
        "decided (default auto; unused with --mask)",
    )
    p.add_argument(
        "--subject",
        type=_subject,
        metavar="NAME",
        help="subject name, the folder under OUT: letters, digits, '.', '_', '-' (default: the scan's "
        "file name without extension, other characters replaced by '_')",
    )


def _add_run_preprocessing_options(p: argparse.ArgumentParser) -> None:
    """``run``: the working grid, the last stage, echoes, non-finite voxels and the manual labels' codes."""
    p.add_argument("--spacing", type=_spacing, default=0.3, help="working voxel size in mm, or native (default 0.3)")
    p.add_argument(
        "--until",
        choices=list(UNTIL),
        default="mirror",
        help="last stage to run (default mirror: the whole pipeline)",
    )
    p.add_argument("--echo", type=_non_negative_int, help="multi-echo scan: use this echo (0-based)")
    p.add_argument(
        "--echo-combine",
        choices=["rms", "mean"],
        default="rms",
        help="multi-echo scan: combine the echoes (default rms)",
    )
    p.add_argument("--nonfinite", choices=["error", "zero"], default="error", help="NaN/inf voxels: refuse or zero")
    p.add_argument(
        "--resample-labels",
        action="store_true",
        help="labels on another grid than the scan: resample them onto it (nearest neighbour)",
    )
    p.add_argument(
        "--label-map",
        action="append",
        metavar="CODE=CODE",
        help="map a code of the manual labels to a known one (repeatable), e.g. 1=801",
    )


def _add_run_method_options(p: argparse.ArgumentParser) -> None:
    """``run``: k-means, the closing of the manual labels, mirroring and the label numbering."""
    p.add_argument("--k", default="4-9", help="k-means cluster counts (default 4-9)")
    p.add_argument("--kmeans-method", choices=["histogram", "minibatch", "dask-ml"], default="histogram")
    p.add_argument(
        "--closing-radius-mm",
        type=_positive_float,
        default=1.2,
        help="radius of the spherical closing of the manual labels (default 1.2)",
    )
    p.add_argument(
        "--alpha",
        type=_positive_float,
        default=5e-4,
        help="mirroring: fraction of the hemisphere allowed across the mirror plane (default 5e-4)",
    )
    p.add_argument(
        "--margin-mm", type=_non_negative_float, default=10.0, help="mirroring: margin of the whole-brain grid"
    )
    p.add_argument(
        "--label-table",
        default="freesurfer",
        help="label numbering: freesurfer (default) or a ColorLUT/TSV file with the published numbering",
    )


def _add_run_output_options(p: argparse.ArgumentParser) -> None:
    """``run``: the output layout and chunks, the seed, QC, NIfTI files, input checks and a reference map."""
    p.add_argument(
        "--layout",
        choices=["flat", "helm"],
        default="flat",
        help="helm: also arrange outputs like the published dataset",
    )
    p.add_argument("--chunks", type=_chunks, help="Zarr chunk shape (default 128)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--no-qc", action="store_true", help="do not write OUT/<subject>/qc/report.html")
    p.add_argument(
        "--no-nifti",
        action="store_true",
        help="write the Zarr store (helm.zarr) only, no .nii.gz files; a later run without this flag "
        "recomputes nothing and writes the missing NIfTI files",
    )
    p.add_argument(
        "--verify-inputs",
        action="store_true",
        help="recognise unchanged inputs by their content (sha256, reads every input file) instead of "
        "their size and modification time; run.json says which was used",
    )
    p.add_argument(
        "--reference-tissue",
        metavar="FILE",
        help="optional: a tissue-class map on the scan's grid (e.g. a phantom's truth_tissue.nii.gz); "
        "QC then reports the k-means agreement (adjusted Rand index and best-match Dice per class, "
        "per k) on the QC page and in run.json",
    )


def run_option_actions() -> dict[str, argparse.Action]:
    """The ``run`` options that are manifest keys: all of :func:`_add_run_options` except ``--out``.

    Returns
    -------
    dict
        ``{dest: argparse.Action}``, for :mod:`helm_dask.batch` (which checks and converts a manifest's values
        with the actions' types and choices).

    Example
    -------
    >>> actions = run_option_actions()
    >>> actions["spacing"].default, "out" in actions
    (0.3, False)
    """
    p = argparse.ArgumentParser(add_help=False)
    _add_run_options(p)
    return {a.dest: a for a in p._actions if a.dest != "out"}


def _subject(text: str) -> str:
    """``--subject``: a name that is safe as a folder name (a usage error otherwise)."""
    from ..io.location import check_component

    try:
        return check_component(text, what="subject name")
    except HelmError as e:
        raise argparse.ArgumentTypeError(f"{e.message}: {e.hint}") from None


def add_run_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``run`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_run`.
    """
    p = subparsers.add_parser(
        "run",
        parents=list(parents),
        help="the HELM pipeline on one scan or a manifest of subjects",
        description="Run (or resume) the pipeline. SCAN is a .nii/.nii.gz scan, or a manifest "
        "(.yaml/.csv) listing subjects; outputs go to OUT/<subject>/.",
        epilog=EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_run)
    return p
