"""The ``helm-dask`` command line: a thin layer over the Python API.

Errors the user can fix are printed as one line (file, problem, fix) with a non-zero exit status and no
traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import textwrap
import time

from . import __version__
from .cluster import ClusterOptions, compute_context
from .errors import HelmError

#: Exit statuses of every command (also in README.md and ``--help``).
EXIT_CODES = (
    (0, "success (a batch: every subject finished)"),
    (1, "internal error: a bug, please report it (--debug shows the traceback)"),
    (
        2,
        "bad input: a missing, unreadable or invalid file, option or manifest, or an unreachable cluster; the "
        "one-line message names the file or flag and the fix",
    ),
    (
        3,
        "the output cannot be written: it exists (without --overwrite), --out is or lies under a file, a "
        "read-only file system, no permission, a full disk; nothing half-written is kept",
    ),
    (4, "a batch (manifest) run where some subjects failed; the others finished (see the summary)"),
    (130, "interrupted (Ctrl-C): the workers are stopped, unfinished outputs removed; rerun to resume"),
    (141, "the reader of the output went away (e.g. `helm-dask info ... | head`)"),
    (143, "terminated (SIGTERM, e.g. a batch system's time limit): as for 130"),
)
EXIT_EPILOG = "exit status:\n" + "\n".join(
    textwrap.fill(text, 100, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7) for code, text in EXIT_CODES
)


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _spacing(text: str):
    if text == "native":
        return "native"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing must be a number of mm or 'native', got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"spacing must be a finite, positive number of mm, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _number(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {v}")
        return v

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _memory_limit(text: str) -> str:
    from .cluster import parse_memory_limit

    try:
        return parse_memory_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _chunks(text: str):
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks are integers like 128 or 128,128,64; got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"chunks are 1 or 3 positive integers; got {text!r}")
    return tuple(parts)


def _add_compute_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "compute",
        "Default: a LocalCluster of worker processes on this machine. TLS: --tls-ca/--tls-cert/--tls-key "
        "(mutual TLS; also used by that LocalCluster), or without flags a Dask config file "
        "(distributed.comm.tls.* and distributed.comm.require-encryption; DASK_CONFIG=FILE).",
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="join a running Dask cluster (tcp://HOST:PORT, tls://HOST:PORT or a scheduler JSON file); "
        "'threads' or 'synchronous' compute in this process",
    )
    g.add_argument("--workers", type=_positive_int, metavar="N", help="LocalCluster worker processes (default: 2)")
    g.add_argument("--threads-per-worker", type=_positive_int, metavar="N", help="threads per worker (default: 1)")
    g.add_argument(
        "--memory-limit",
        type=_memory_limit,
        metavar="SIZE",
        help="memory limit per worker, e.g. 4GB, at least 512MiB (default: auto)",
    )
    g.add_argument(
        "--dashboard-address",
        default="127.0.0.1:0",
        help="where the LocalCluster dashboard listens (default: localhost, random port)",
    )
    g.add_argument(
        "--tls-ca", metavar="FILE", help="TLS: PEM certificate of the CA that signed the cluster's certificates"
    )
    g.add_argument(
        "--tls-cert", metavar="FILE", help="TLS: PEM certificate this client (and its LocalCluster) presents"
    )
    g.add_argument("--tls-key", metavar="FILE", help="TLS: PEM private key of --tls-cert")


def _cluster_opts(args) -> ClusterOptions:
    return ClusterOptions.from_args(args)


def _say(args, *msg) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Commands


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options for s3://... (or other URL) inputs and outputs, as a JSON object or @FILE.json, "
        'e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server; '
        "credentials otherwise come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL or FSSPEC_S3_* variables",
    )


def _storage_options(args) -> dict | None:
    from .io.location import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def cmd_info(args) -> int:
    from .io.location import use_storage_options
    from .io.store import describe

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
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("affine")
    for r in d["affine"]:
        print("  " + "  ".join(f"{x:11.5f}" for x in r))
    return 0


def cmd_convert(args) -> int:
    from .io.convert import convert
    from .io.location import use_storage_options

    so = _storage_options(args)
    kw = dict(
        overwrite=args.overwrite, quiet=args.quiet, echo=args.echo, echo_combine=args.echo_combine, storage_options=so
    )
    if args.chunks:
        kw["chunks"] = args.chunks
    kw["nonfinite"] = args.nonfinite
    t0 = time.perf_counter()
    with use_storage_options(so), compute_context(_cluster_opts(args)):
        out = convert(args.input, args.output, **kw)
    _say(args, f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_phantom(args) -> int:
    from .phantom_io import MNI_OPTIONS, write_phantom

    mni = {k: getattr(args, k) for k in MNI_OPTIONS}
    given = [f"--{k.replace('_', '-')}" for k, v in mni.items() if v is not None]
    if args.anatomy != "mni152" and given:
        raise HelmError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --anatomy mni152 only",
            hint="add --anatomy mni152, or leave them out for the geometric phantom",
        )
    from .phantom import phantom

    # the arguments are checked (lazy volumes, nothing computed) before a cluster is started
    try:
        phantom(args.spacing, side=args.side, echoes=args.echoes, seed=args.seed, anatomy=args.anatomy, **mni)
    except HelmError as e:  # its messages name the Python arguments (bag_gap_mm): name the flags
        for k in (k for k in MNI_OPTIONS if "_" in k):  # plain words (fluid) are words in the text too
            flag = f"--{k.replace('_', '-')}"
            e.message = re.sub(rf"\b{k}\b", flag, e.message)
            e.hint = re.sub(rf"\b{k}\b", flag, e.hint) if e.hint else e.hint
        raise
    with compute_context(_cluster_opts(args)):
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


def cmd_run(args) -> int:
    from .batch import format_summary, manifest_keys, plan_batch, run_batch, run_params_kwargs
    from .io.location import join, use_storage_options
    from .pipeline import RunParams, run_subject

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


#: ``compare``: the Python API's hints (from :mod:`helm_dask.metrics`) as command-line advice.
_COMPARE_HINTS = (
    ("(helm_dask.resample.resample_to_grid, or resample_b=True)", "(pass --resample)"),
    ("cast with .astype() if the values are codes", "give integer label maps such as hemi_k6.nii.gz"),
    ("Leave 0 out of labels.", "Leave 0 out of --labels."),
    ("(helm_dask.resample)", "(e.g. with `helm-dask run`, whose outputs are on orthogonal grids)"),
)


def cmd_compare(args) -> int:
    try:
        return _compare(args)
    except HelmError as e:
        for py, flag in _COMPARE_HINTS:
            e.hint = e.hint.replace(py, flag) if e.hint else e.hint
        raise


def _compare(args) -> int:
    from .compare import compare_files, compare_folders
    from .metrics import format_table, to_csv, to_jsonable

    labels = None
    if args.labels == "all":
        labels = "all"
    elif args.labels:
        try:
            labels = [int(c) for c in args.labels.split(",")]
        except ValueError:
            raise HelmError(f"--labels {args.labels!r} is not 'all' or a list of codes", hint="e.g. 801,802") from None
    groups = None if args.groups == "none" else "paper"
    with compute_context(_cluster_opts(args)):
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(
        args.out, cluster=_cluster_opts(args), spacing_mm=args.spacing, quiet=args.quiet, overwrite=args.overwrite
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``helm-dask run`` that describe a subject's run; every one of them but ``--out`` is also a
    manifest key (:func:`run_option_actions`), so a flag added here is one too."""
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
    p.add_argument("--spacing", type=_spacing, default=0.3, help="working voxel size in mm, or native (default 0.3)")
    p.add_argument(
        "--until",
        choices=["preprocess", "kmeans", "merge", "mirror"],
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
    """``{dest: action}`` of the ``run`` options that are manifest keys (all of :func:`_add_run_options` except
    ``--out``), for :mod:`helm_dask.batch`."""
    p = argparse.ArgumentParser(add_help=False)
    _add_run_options(p)
    return {a.dest: a for a in p._actions if a.dest != "out"}


def _subject(text: str) -> str:
    from .io.location import check_component

    try:
        return check_component(text, what="subject name")
    except HelmError as e:
        raise argparse.ArgumentTypeError(f"{e.message}: {e.hint}") from None


# ----------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the usage is one ``--help`` away), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="helm-dask",
        description="HELM whole-brain label maps from ultra-high-resolution ex vivo MRI, out of core with Dask.",
        epilog=EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"helm-dask {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print only errors")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="shape, spacing, orientation, dtype, chunks, affine")
    p.add_argument("path", help="a .nii/.nii.gz file or a helm-dask .zarr store (a path or an s3://... URL)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", parents=[common], help="NIfTI <-> Zarr (direction from the extensions)")
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
    _add_storage_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("phantom", parents=[common], help="write the built-in phantom (OUT.zarr or a folder)")
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

    p = sub.add_parser(
        "run",
        parents=[common],
        help="the HELM pipeline on one scan or a manifest of subjects",
        description="Run (or resume) the pipeline. SCAN is a .nii/.nii.gz scan, or a manifest "
        "(.yaml/.csv) listing subjects; outputs go to OUT/<subject>/.",
        epilog=EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "compare",
        parents=[common],
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

    p = sub.add_parser("demo", parents=[common], help="run everything on the built-in phantom")
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

    from .synth import add_synth_parser

    add_synth_parser(sub, [common], _add_compute_options)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised in the main thread; ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` once; a second one while stopping is ignored, so that the
    cleanup (stop the workers, remove unfinished outputs) is not cut short. Outside the main thread: nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _output_of(args) -> str | None:
    return getattr(args, "out", None) or getattr(args, "output", None)


def _os_error(e: OSError, args) -> HelmError:
    """An OS error that reached the top: an output problem (exit 3) or an input one (exit 2), in one line."""
    from .io import location

    out = _output_of(args)
    name = e.filename if isinstance(e.filename, str) else None
    under_out = bool(
        out
        and name
        and not location.is_url(out)
        and os.path.abspath(name).startswith(os.path.abspath(out).rstrip(os.sep))
    )
    if e.errno in location.WRITE_ONLY_ERRNOS or (under_out and e.errno in location.OUTPUT_ERRNOS):
        return location.output_error(e, name or out or ".")
    return HelmError(
        f"cannot read or write this file ({os.strerror(e.errno) if e.errno else e})",
        path=name,
        hint="check the path and its permissions",
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from .io.location import MAIN_PID_ENV

    # the fault-injection hook (HELM_DASK_FAULT), reached in a worker, stops this process (see location.fault)
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    with _stop_on_signals():
        try:
            return int(args.func(args) or 0)
        except HelmError as e:
            if args.debug:
                raise
            print(f"helm-dask: error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            from .io.store import remove_live_temporaries

            # the cluster is shut down by now: no straggling write can recreate what this removes
            remove_live_temporaries()
            signum = getattr(e, "signum", signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(
                f"helm-dask: {what}: workers stopped, unfinished outputs removed, finished stages kept (rerun "
                f"the same command to resume)",
                file=sys.stderr,
            )
            return 128 + int(signum)
        except BrokenPipeError:
            # the reader of our output went away (| head): stop quietly, as other command-line tools do
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except OSError as e:
            if args.debug:
                raise
            print(f"helm-dask: error: {_os_error(e, args)}", file=sys.stderr)
            return _os_error(e, args).exit_code
        except Exception as e:  # an internal error: keep it short unless --debug
            if args.debug:
                raise
            print(
                f"helm-dask: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and "
                f"please report it)",
                file=sys.stderr,
            )
            return 1


if __name__ == "__main__":
    sys.exit(main())
