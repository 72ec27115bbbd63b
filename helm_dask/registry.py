"""The pipeline's stages declared once, as data: what each reads and writes in the subject's store, the JSON
records and NIfTI exports it makes, the run options that enter its key, and its algorithm's version. The runner
(:mod:`helm_dask.pipeline`), ``--until``, QC's "what is missing and how to get it", ``run.json`` and the bench
scripts all read this table; the compute function of each stage is ``helm_dask.pipeline.steps.STEPS[name]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "STAGES",
    "STAGE_NAMES",
    "STAGE_VERSIONS",
    "UNTIL",
    "Export",
    "Stage",
    "expand",
    "producer_of",
    "stage",
    "stages_until",
]


def expand(names: Iterable[str], ks: Iterable[int]) -> list[str]:
    """Store or file names with ``{k}`` expanded for every k (names without it once).

    Parameters
    ----------
    names : iterable of str
        Names, some with ``{k}``.
    ks : iterable of int
        The numbers of clusters.

    Returns
    -------
    list of str

    Examples
    --------
    >>> expand(["mask", "hemi_k{k}"], [4, 6])
    ['mask', 'hemi_k4', 'hemi_k6']
    """
    out: list[str] = []
    for n in names:
        out.extend(n.format(k=k) for k in ks) if "{k}" in n else out.append(n)
    return out


@dataclass(frozen=True)
class Export:
    """A NIfTI export: the stored volume ``store`` written to ``<store>.nii.gz`` as ``dtype``."""

    store: str
    dtype: str


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes
    ----------
    name : str
        The stage's name (``run.json``'s ``stages`` keys, the bench rows ``pipeline:<name>``).
    version : int
        Its algorithm's version, part of its key: bump it whenever a change alters the stage's output, so that a
        resumed run never reuses a store made by older code.
    until : str
        The ``--until`` value of the shortest run that includes it.
    reads : tuple of str
        Stores it reads in full (the I/O bound of ``bench/stages.py bound`` counts these).
    also_reads : tuple of str
        Stores it reads besides (left out of that bound, as it was first measured).
    writes : tuple of str
        Stores it writes (``{k}``: one per number of clusters).
    records : tuple of str
        JSON records it writes in the subject folder (file names).
    exports : tuple of Export
        NIfTI files written from its stores after it (skipped with ``--no-nifti``).
    options : tuple of str
        The run options (:class:`helm_dask.pipeline.RunParams` fields) that enter its key.
    summary : str
        One line for documentation and ``--help``.
    """

    name: str
    version: int
    until: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    summary: str
    also_reads: tuple[str, ...] = ()
    records: tuple[str, ...] = ()
    exports: tuple[Export, ...] = ()
    options: tuple[str, ...] = ()

    def outputs(self, ks: Iterable[int]) -> list[str]:
        """The stores it writes, ``{k}`` expanded."""
        return expand(self.writes, ks)

    def inputs(self, ks: Iterable[int]) -> list[str]:
        """Every store it reads, ``{k}`` expanded."""
        return expand(self.reads + self.also_reads, ks)


STAGES: tuple[Stage, ...] = (
    Stage(
        "import",
        2,
        "preprocess",
        reads=(),
        writes=("scan_raw", "labels_raw"),
        options=("scan", "hypothalamus", "echo", "echo_combine", "nonfinite", "chunks", "preprocessed"),
        summary="stream the scan and the manual labels into the subject's Zarr store (chunked, with a pyramid)",
    ),
    Stage(
        "background",
        7,
        "preprocess",
        reads=("scan_raw",),
        writes=("mask_ras",),
        options=("fluid", "mask"),
        summary="the brain mask on the RAS+ scan: bag and fixative removed (or the user's --mask imported)",
    ),
    Stage(
        "resample",
        3,
        "preprocess",
        reads=("scan_raw", "mask_ras", "labels_raw"),
        writes=("image_ws", "mask", "hypothalamus"),
        options=("spacing", "grid", "side", "label_map", "resample_labels", "extra_labels"),
        summary="orientation (right hemispheres flipped to left) and resampling to the working grid",
    ),
    Stage(
        "bias",
        4,
        "preprocess",
        reads=("image_ws", "mask"),
        writes=("bias", "preprocessed"),
        records=("bias_model.json",),
        exports=(
            Export("preprocessed", "float32"),
            Export("mask", "uint8"),
            Export("bias", "float32"),
            Export("hypothalamus", "uint16"),
        ),
        summary="bias field (DCT basis in a tissue mixture) fitted on a coarse copy; the corrected image",
    ),
    Stage(
        "kmeans",
        2,
        "kmeans",
        reads=("preprocessed", "mask"),
        writes=("kmeans_k{k}",),
        records=("kmeans.json",),
        exports=(Export("kmeans_k{k}", "uint8"),),
        options=("ks", "kmeans_method", "seed"),
        summary="k-means of the brain's intensities for every k, clusters numbered by increasing intensity",
    ),
    Stage(
        "merge",
        2,
        "merge",
        reads=("kmeans_k{k}", "hypothalamus"),
        writes=("hemi_k{k}", "closed_labels"),
        exports=(Export("hemi_k{k}", "uint16"),),
        options=("closing_radius_mm", "label_table", "extra_labels"),
        summary="the manual labels closed (spherical closing) and laid over every k-means map",
    ),
    Stage(
        "mirror",
        3,
        "mirror",
        reads=("hemi_k{k}",),
        also_reads=("mask", "hypothalamus"),
        writes=("label_map_k{k}",),
        records=("transform.json",),
        exports=(Export("label_map_k{k}", "uint16"),),
        options=("alpha", "max_gap_mm", "margin_mm", "seed", "extra_labels"),
        summary="the mid-sagittal plane fitted on the mask; every hemisphere map mirrored into a whole brain",
    ),
)

#: Stage names in run order.
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
#: Each stage's algorithm version (part of its key).
STAGE_VERSIONS: dict[str, int] = {s.name: s.version for s in STAGES}
#: ``--until`` values -> the last stage they run.
UNTIL: dict[str, str] = {s.until: s.name for s in STAGES}


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Parameters
    ----------
    name : str
        One of :data:`STAGE_NAMES`.

    Returns
    -------
    Stage
        (``KeyError`` for an unknown name.)
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def stages_until(until: str) -> tuple[Stage, ...]:
    """The stages a run with ``--until until`` runs, in order.

    Parameters
    ----------
    until : str
        An ``--until`` value (:data:`UNTIL`).

    Returns
    -------
    tuple of Stage

    Examples
    --------
    >>> [s.name for s in stages_until("preprocess")]
    ['import', 'background', 'resample', 'bias']
    """
    last = STAGE_NAMES.index(UNTIL[until])
    return STAGES[: last + 1]


def producer_of(name: str) -> Stage | None:
    """The stage that writes a store or a JSON record.

    Parameters
    ----------
    name : str
        A store (``hemi_k6``, or the pattern ``kmeans_k{k}``) or a record
        (``transform.json``).

    Returns
    -------
    Stage or None
        None for what no stage writes (``run.json`` is written by the runner at the end).

    Examples
    --------
    >>> producer_of("hemi_k6").name, producer_of("transform.json").until, producer_of("run.json")
    ('merge', 'mirror', None)
    """
    for s in STAGES:
        for w in s.writes:
            head = w.split("{k}")[0]
            if name == w or ("{k}" in w and name.startswith(head) and name[len(head) :].isdigit()):
                return s
        if name in s.records:
            return s
    return None
