"""The ``run`` command: the pipeline on one scan or a manifest, and its options (also the manifest keys)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..errors import HelmError
from ..pipeline.options import _add_run_options, add_batch_options
from .options import (
    EXIT_EPILOG,
    Subparsers,
    _add_compute_options,
    _compute,
    _say,
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
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
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
    with use_storage_options(base.storage_options), _compute(args):
        if is_manifest:
            rows = run_batch(
                target, base, quiet=args.quiet, debug=args.debug, plan=plan, concurrent=args.concurrent_subjects
            )
            print(format_summary(rows))
            return 0 if all(r["status"] == "ok" for r in rows) else 4
        info = run_subject(base, quiet=args.quiet)
    _say(args, f"[{info['subject']}] finished in {info['seconds']:.1f}s -> {join(args.out, info['subject'])}")
    return 0


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
    add_batch_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_run)
    return p
