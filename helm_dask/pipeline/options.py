"""The options of ``helm-dask run`` that describe a subject's run, declared once with their argument types:
the command line adds them to its ``run`` parser and manifests (:mod:`helm_dask.batch`) check and convert their
keys with the same actions, so a flag added here is a manifest key at once."""

from __future__ import annotations

import argparse
import math

from ..errors import HelmError
from ..registry import UNTIL

__all__ = ["add_batch_options", "add_run_options", "run_option_actions"]


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


def _alpha(text: str):
    if text == "auto":
        return "auto"
    return _positive_float(text)


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
        "--grid",
        choices=["ras", "scan"],
        default="ras",
        help="working grid: ras = axis-aligned RAS+ (a tilted scan is resampled onto it with anti-aliasing, its "
        "labels and mask by a 3-D majority vote; viewers place OME-Zarr volumes exactly); scan = the scan's own "
        "directions (exact block means, but a tilted scan's OME-Zarr volumes are off by up to 2 sin(tilt/2) x "
        "the half-diagonal); the two are the same grid for a scan that is not tilted (default ras)",
    )
    p.add_argument(
        "--until",
        choices=list(UNTIL),
        default="mirror",
        help="last stage to run (default mirror: the whole pipeline)",
    )
    p.add_argument(
        "--preprocessed",
        action="store_true",
        help="SCAN is already preprocessed (reoriented, zero outside the brain, resampled, bias-corrected; the "
        "labels on its grid): only k-means, merge and mirror run; the mask is its non-zero voxels unless --mask "
        "is given; needs --spacing native",
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
        type=_alpha,
        default=5e-4,
        help="mirroring: fraction of the hemisphere allowed across the mirror plane (default 5e-4), or auto: "
        "the smallest alpha of a log grid (1e-5 to 1e-2) whose plane leaves the 95th percentile of the medial "
        "gap at most --max-gap-mm (transform.json records every alpha tried)",
    )
    p.add_argument(
        "--max-gap-mm",
        type=_positive_float,
        default=1.0,
        help="--alpha auto: the largest 95th percentile of the medial gap accepted, in mm (default 1.0)",
    )
    p.add_argument(
        "--margin-mm", type=_non_negative_float, default=10.0, help="mirroring: margin of the whole-brain grid"
    )
    p.add_argument(
        "--label-table",
        default="freesurfer",
        help="label numbering: freesurfer (default), helm (the published maps', depends on k; one lut_kK.txt per "
        "k) or a ColorLUT/TSV file",
    )
    p.add_argument(
        "--extra-labels",
        metavar="LEFT:RIGHT[:NAME],...",
        help="other structures in the manual file, each with its right-side code (or a ColorLUT file, Left-X/"
        "Right-X pairs): they override k-means, are mirrored to their right codes and are not closed",
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


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options for s3://... (or other URL) inputs and outputs, as a JSON object or @FILE.json, "
        'e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server; '
        "credentials otherwise come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL or FSSPEC_S3_* variables",
    )


def _subject(text: str) -> str:
    """``--subject``: a name that is safe as a folder name (a usage error otherwise)."""
    # here, not at the top: helm_dask.io loads zarr and dask, and `helm-dask --help` builds this parser
    from ..io.location import check_component

    try:
        return check_component(text, what="subject name")
    except HelmError as e:
        raise argparse.ArgumentTypeError(f"{e.message}: {e.hint}") from None


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """``run MANIFEST``: how the batch runs (not a subject's option, hence not a manifest key).

    Parameters
    ----------
    p : argparse.ArgumentParser
        The ``run`` parser.

    Example
    -------
    >>> p = argparse.ArgumentParser()
    >>> add_batch_options(p)
    >>> p.parse_args(["--concurrent-subjects", "2"]).concurrent_subjects
    2
    """
    p.add_argument(
        "--concurrent-subjects",
        type=_positive_int,
        default=1,
        metavar="N",
        help="a manifest: run up to N subjects at once on the same cluster, each subject's stages still in "
        "order (default 1: one after the other); worker memory grows with N (each running subject holds its "
        "stage's batches), and N above the workers' threads only queues for them (a warning says so)",
    )


#: The public name of :func:`_add_run_options`.
add_run_options = _add_run_options
