"""The ``compare`` command: Dice, Hausdorff distances and volumes of two label maps or two folders of them."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from ..errors import HelmError
from .options import Subparsers, _add_compute_options, _compute

#: ``compare``: the Python API's hints (from :mod:`helm_dask.metrics`) as command-line advice.
_COMPARE_HINTS = (
    ("(helm_dask.resample.resample_to_grid, or resample_b=True)", "(pass --resample)"),
    ("cast with .astype() if the values are codes", "give integer label maps such as hemi_k6.nii.gz"),
    ("Leave 0 out of labels.", "Leave 0 out of --labels."),
    ("(helm_dask.resample)", "(e.g. with `helm-dask run`, whose outputs are on orthogonal grids)"),
)


def cmd_compare(args: argparse.Namespace) -> int:
    """``helm-dask compare``: Dice, average Hausdorff, HD95 and volumes of two maps or two folders of them.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.

    Returns
    -------
    int
        The exit status.
    """
    try:
        return _compare(args)
    except HelmError as e:
        for py, flag in _COMPARE_HINTS:
            e.hint = e.hint.replace(py, flag) if e.hint else e.hint
        raise


def _compare(args: argparse.Namespace) -> int:
    """``compare`` itself; :func:`cmd_compare` rewrites the hints of its errors."""
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..compare import compare_files, compare_folders
    from ..metrics import format_table, to_csv, to_jsonable

    labels: str | list[int] | None = None
    if args.labels == "all":
        labels = "all"
    elif args.labels:
        try:
            labels = [int(c) for c in args.labels.split(",")]
        except ValueError:
            raise HelmError(f"--labels {args.labels!r} is not 'all' or a list of codes", hint="e.g. 801,802") from None
    groups = None if args.groups == "none" else "paper"
    with _compute(args):
        if os.path.isdir(args.a) and not args.a.rstrip("/").endswith(".zarr"):
            per_subject, summary, (only_a, only_b) = compare_folders(
                args.a, args.b, filename=args.file, labels=labels, groups=groups, resample_b=args.resample
            )
            if args.csv:
                rows = [dict(r, subject=s) for s, rs in per_subject.items() for r in rs]
                to_csv(rows, args.csv)
            if args.json:
                print(
                    json.dumps(
                        {
                            "subjects": {s: to_jsonable(r) for s, r in per_subject.items()},
                            "summary": to_jsonable(summary),
                            "only_in_a": only_a,
                            "only_in_b": only_b,
                        },
                        indent=2,
                    )
                )
            else:
                for s, rs in per_subject.items():
                    print(f"== {s}")
                    print(format_table(rs))
                print(f"== mean +- std over {len(per_subject)} subjects")
                print(format_table(summary))
                if only_a or only_b:
                    print(f"unpaired: only in A {only_a}, only in B {only_b}")
            return 0
        rows = compare_files(args.a, args.b, labels=labels, groups=groups, resample_b=args.resample)
    if args.csv:
        to_csv(rows, args.csv)
    if args.json:
        print(json.dumps(to_jsonable(rows), indent=2))
    else:
        print(format_table(rows))
    return 0


def add_compare_parser(subparsers: Subparsers, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The sub-command table of the ``helm-dask`` parser.
    parents : sequence of ArgumentParser
        Parsers whose options the command inherits (``--quiet``, ``--debug``).

    Returns
    -------
    ArgumentParser
        The command's parser; its ``func`` default is :func:`cmd_compare`.
    """
    p = subparsers.add_parser(
        "compare",
        parents=list(parents),
        help="Dice, average Hausdorff, HD95 and volumes of two maps",
        description="Compare two label maps (NIfTI or Zarr), or two folders of them paired by "
        "subject name (mean +- std like the paper's Table 2).",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument(
        "--groups",
        choices=["paper", "none"],
        default="paper",
        help="paper: whole / anterior / tuberal / posterior groupings (default)",
    )
    p.add_argument("--labels", help="'all' or a comma list of codes (default: hypothalamus codes and fornix)")
    p.add_argument(
        "--file", default="hypothalamus.nii.gz", help="with output folders: the file compared in each subject folder"
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="B on another grid: resample it onto A's (nearest neighbour, world space)",
    )
    _add_compute_options(p)
    p.set_defaults(func=cmd_compare)
    return p
