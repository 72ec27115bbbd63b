"""The options of one subject's run (:class:`RunParams`) and their checks before anything is read or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..background import FLUID_CHOICES
from ..errors import HelmError
from ..io import location
from ..io.mgh import is_mgh_path
from ..io.nifti import is_nifti_path, read_nifti_header
from ..labels import DEFAULT_KS, check_extra_labels, lut_table, parse_extra_labels
from ..registry import UNTIL

#: ``--fluid``: what fills the bag around the specimen (see :func:`helm_dask.background.brain_mask`).
FLUIDS = FLUID_CHOICES
#: ``--grid``: the working grid (see ``docs/method/resample.md``, "Working grid: ras or scan").
GRIDS = ("ras", "scan")


@dataclass
class RunParams:
    """Everything that defines a subject's run (the CLI flags of ``helm-dask run``)."""

    scan: str
    hypothalamus: str
    out: str
    side: str = "auto"
    mask: str | None = None  # an external brain mask on the scan's grid (NIfTI/MGH; non-zero = brain)
    fluid: str = "auto"  # what fills the bag: auto|bright|dark|none (unused with ``mask``)
    subject: str | None = None
    spacing: Any = 0.3  # mm, or "native"
    grid: str = "ras"  # the working grid: "ras" (axis-aligned RAS+) or "scan" (the scan's directions)
    until: str = "mirror"
    echo: int | None = None
    echo_combine: str = "rms"
    nonfinite: str = "error"
    resample_labels: bool = False
    label_map: dict = field(default_factory=dict)  # extra code -> code mapping for the manual labels
    ks: tuple = DEFAULT_KS
    kmeans_method: str = "histogram"
    closing_radius_mm: float = 1.2
    alpha: Any = 5e-4  # a number, or "auto" (refit over a grid of alphas, see helm_dask.mirror.fit_mirror)
    max_gap_mm: float = 1.0  # --alpha auto: the largest 95th percentile of the medial gap accepted
    margin_mm: float = 10.0
    label_table: str = "freesurfer"
    extra_labels: Any = ()  # --extra-labels: "LEFT:RIGHT[:NAME],..." or a ColorLUT (labels.parse_extra_labels)
    layout: str = "flat"
    chunks: tuple | None = None
    seed: int = 0
    qc: bool = True  # write OUT/<subject>/qc/report.html at the end (local outputs only)
    nifti: bool = True  # write the .nii.gz exports (False: the Zarr store only; not a stage
    # parameter, so a later run with True exports what is missing)
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs (never written to run.json)
    reference_tissue: str | None = None  # a tissue-class map on the scan's grid: QC reports the k-means agreement
    # (not a stage parameter: no stage reads it)
    verify_inputs: bool = False  # recognise unchanged inputs by content (sha256), not size + mtime
    preprocessed: bool = False  # the scan is a preprocessed image (masked, bias-corrected): k-means, merge, mirror

    def subject_name(self) -> str:
        """The subject's folder under ``out``: ``subject`` if given (refused unless a safe single path
        component), else the scan's file name without extension made one (other characters -> ``_``). The
        default depends on the scan's name only, so a subject keeps its folder (and its resume) whatever else
        a manifest lists."""
        if self.subject:
            return location.check_component(self.subject, what="subject name")
        name = Path(self.scan).name
        for ext in (".nii.gz", ".nii", ".zarr"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        return location.safe_component(name)


def check_params(params: RunParams) -> None:
    """Refuse a run that would fail later: missing or non-NIfTI inputs, unknown option values, a bad label table,
    a scan that is not 3-D (or 4-D multi-echo). Reads headers only.

    Parameters
    ----------
    params : RunParams
        The run's options.

    Raises
    ------
    HelmError
        With the file or flag at fault and the fix.
    """
    if params.until not in UNTIL:
        raise HelmError(f"unknown --until {params.until!r}", hint=f"choose from {', '.join(UNTIL)}")
    so = params.storage_options
    _check_inputs(params, so)
    if params.side not in ("L", "R", "auto"):
        raise HelmError(f"--side must be L, R or auto, not {params.side!r}")
    if params.fluid not in FLUIDS:
        raise HelmError(f"--fluid must be one of {', '.join(FLUIDS)}, not {params.fluid!r}")
    if params.grid not in GRIDS:
        raise HelmError(f"--grid must be one of {', '.join(GRIDS)}, not {params.grid!r}")
    if params.layout == "helm" and not params.nifti:
        raise HelmError(
            "--layout helm arranges the NIfTI files, and --no-nifti writes none",
            hint="drop one of the two (a later run without --no-nifti writes the files)",
        )
    lut_table(params.label_table, params.ks)  # a bad --label-table now, not after the k-means
    check_extra_labels(parse_extra_labels(params.extra_labels), params.label_table, params.ks)
    _check_mirror_options(params)
    if params.preprocessed and params.spacing != "native":
        raise HelmError(
            f"--preprocessed keeps the image's own grid: --spacing must be native, not {params.spacing!r}",
            hint="resample the image beforehand for another grid, or add --spacing native",
        )
    head = read_nifti_header(params.scan, storage_options=so)
    if head.stored_ndim < 3 or min(head.shape[:3]) < 2:
        # a single plane would be imported and fail much later with messages about other things
        what = f"a {head.stored_ndim}-D image" if head.stored_ndim < 3 else "a single slice"
        raise HelmError(
            f"the scan is {what} (shape {tuple(head.shape[: max(head.stored_ndim, 2)])}), not a 3-D volume",
            path=params.scan,
            hint="give the 3-D scan (or a 4-D multi-echo scan)",
        )


def _check_mirror_options(params: RunParams) -> None:
    """``--alpha`` (a number in (0, 0.5) or ``auto``) and ``--max-gap-mm`` (positive), before any stage runs."""
    a = params.alpha
    if not (isinstance(a, str) and a == "auto"):
        try:
            ok = not isinstance(a, bool) and 0.0 < float(a) < 0.5
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise HelmError(
                f"--alpha must be a number in (0, 0.5) or auto, not {a!r}",
                hint="alpha is the fraction of the hemisphere allowed across the mirror plane (the paper's: 5e-4)",
            )
    g = params.max_gap_mm
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < float(g) < float("inf"):
        raise HelmError(f"--max-gap-mm must be a positive number of mm, not {g!r}", hint="e.g. --max-gap-mm 1.0")


def _check_inputs(params: RunParams, so: dict | None) -> None:
    for f, what in ((params.scan, "scan"), (params.hypothalamus, "hypothalamus labels")):
        if not location.exists(f, so):
            raise HelmError(f"{what} not found", path=f, hint="check the path")
        if not is_nifti_path(f):
            raise HelmError(f"the {what} must be a .nii or .nii.gz file", path=f, hint="convert it to NIfTI")
    if params.mask:
        if not location.exists(params.mask, so):
            raise HelmError("brain mask not found", path=params.mask, hint="check the --mask path")
        if not (is_nifti_path(params.mask) or is_mgh_path(params.mask)):
            raise HelmError(
                "the brain mask must be a .nii, .nii.gz, .mgz or .mgh file",
                path=params.mask,
                hint="convert it to NIfTI (e.g. mri_convert mask.mgz mask.nii.gz)",
            )
