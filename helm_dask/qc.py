"""The QC page of one subject: :func:`write_qc_report` reads what ``helm-dask run`` left in ``OUT/<subject>/``
(bounded reads only: single planes, per-axis projections and label counts), draws the figures with the same
functions as the notebooks (:mod:`helm_dask.view`), and writes ``OUT/<subject>/qc/``: ``report.html`` (one
self-contained page rendered from the ``templates/qc.html.j2`` Jinja2 template), each figure as a PNG,
``label_volumes.csv``, ``qc.json`` and, after ``run --reference-tissue``, ``kmeans_agreement.json``.
:func:`hypothalamus_box` and :func:`label_volumes_mm3` are the measurements it makes; what the page shows and how
to read it is in ``docs/method/qc.md``.

Example
-------
>>> from helm_dask.qc import write_qc_report
>>> write_qc_report("OUT/subject01")                  # doctest: +SKIP
PosixPath('OUT/subject01/qc/report.html')
"""

from __future__ import annotations

import base64
import csv
import datetime
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from ._version import __version__
from .draw import (
    MIRROR_COLOUR,
    Frame,
    add_legend,
    choose_level,
    figure_rows,
    label_legend,
    legend_height,
    png_bytes,
)
from .errors import HelmError
from .io.convert import nifti_to_zarr
from .io.location import sibling, write_text_atomic
from .io.store import distributed_client, is_complete, open_volume, read_meta
from .labels import (
    COLOURS,
    FORNIX,
    FORNIX_NAME,
    HYPOTHALAMUS,
    SHORT_NAMES,
    SIDE_CODES,
    label_counts,
    parse_extra_labels,
)
from .layout import RECORDS, SubjectLayout
from .metrics import TISSUE_CLASS_NAMES, kmeans_agreement_many, reference_on_grid
from .orient import to_ras
from .registry import STAGES, producer_of
from .view import orthogonal_slices, plot_histogram, plot_orthogonal
from .volume import affine_of, is_axis_aligned, orientation_code, spacing_of, voxel_to_world, world_to_voxel

__all__ = ["write_qc_report", "choose_level", "label_volumes_mm3", "hypothalamus_box"]


#: What a full run makes, in pipeline order (``{k}``: the k shown); listed on the page when absent.
_EXPECTED = (RECORDS["run"], *(n for st in STAGES for n in (*st.writes, *st.records)))
#: Prefixes of the stores made once per k (``kmeans_k``, ``hemi_k``, ``label_map_k``).
_PER_K = tuple(w.split("{k}")[0] for st in STAGES for w in st.writes if "{k}" in w)
#: The manual labels of a working grid (always a left hemisphere), in legend order.
_MANUAL_LEFT = (*SIDE_CODES["L"], FORNIX)
_CLOSEUP_MARGIN_MM = 5.0
_AGREEMENT_TITLE = "k-means vs reference tissue"


# ----------------------------------------------------------------------------------------------------------------
# The subject folder and the measurements


class _Subject:
    """Paths and availability of one subject's outputs (nothing is read until asked)."""

    def __init__(self, subject_dir: Path):
        self.layout = SubjectLayout.of_folder(subject_dir)
        self.dir = subject_dir
        self.store = Path(self.layout.store)
        self._ok: dict[str, bool] = {}

    def has(self, name: str) -> bool:
        if name not in self._ok:
            self._ok[name] = is_complete(self.layout.volume(name))
        return self._ok[name]

    def path(self, name: str) -> str:
        return self.layout.volume(name)

    def open(self, name: str, level: int = 0):
        four_d = bool(read_meta(self.path(name)).get("four_d"))
        # a multi-echo raw scan: show the RMS over echoes (what the pipeline uses by default)
        return open_volume(self.path(name), level=level, echo_combine="rms" if four_d else None)

    def json(self, name: str) -> dict | None:
        try:
            return json.loads(Path(self.layout.file(name)).read_text())
        except (OSError, ValueError):
            return None


def _projections(data: da.Array, select: Callable[[da.Array], da.Array]) -> tuple[np.ndarray, ...]:
    """Per-axis voxel counts of ``select(data)`` (three 1-D int64 arrays): a chunked integer reduction."""
    m = select(data)
    return tuple(
        np.asarray(p) for p in dask.compute(*(m.sum(axis=ax, dtype=np.int64) for ax in ((1, 2), (0, 2), (0, 1))))
    )


def _nonzero(d: da.Array) -> da.Array:
    return d != 0


def _left_hypothalamus(d: da.Array) -> da.Array:
    left = SIDE_CODES["L"]
    return (d >= min(left)) & (d <= max(left))


def hypothalamus_box(
    sub_or_dir: Any,
    name: str = "hypothalamus",
    *,
    max_slice_px: int = 512,
    select: Callable[[da.Array], da.Array] = _nonzero,
) -> dict | None:
    """Centroid (world mm) and level-0 voxel bounding box of the labels of a stored volume; ``None`` if empty.

    Computed from per-axis projections at the pyramid level :func:`choose_level` picks (a chunked integer
    reduction, eager, result: three small 1-D arrays), going to finer levels if a coarse level's stride
    misses every labelled voxel. The box is widened by one voxel of the level used (stride sampling).

    Parameters
    ----------
    sub_or_dir : path
        The subject folder ``OUT/<subject>``.
    name : str
        The label volume in its ``helm.zarr``.
    max_slice_px : int
        Start from the finest level whose largest dimension is at most this.
    select : callable
        Which voxels count (dask array -> boolean dask array); default every non-zero voxel.

    Returns
    -------
    dict or None
        ``{"centroid_mm": (3,), "box": [(lo, hi) per axis, level-0 voxels, hi exclusive], "level": L,
        "voxels": n}`` (``voxels`` counted at level ``L``).

    Example
    -------
    >>> hypothalamus_box("OUT/subject01")["centroid_mm"]           # doctest: +SKIP
    array([ -3.1,  -4.9, -11.2])
    """
    sub = sub_or_dir if isinstance(sub_or_dir, _Subject) else _Subject(Path(sub_or_dir))
    if not sub.has(name):
        return None
    path = sub.path(name)
    shape0 = open_volume(path).shape[:3]
    for lev in range(choose_level(path, max_slice_px), -1, -1):
        vol = open_volume(path, level=lev)
        proj = _projections(vol.data, select)
        n = int(proj[0].sum())
        if n == 0:
            continue
        a = affine_of(vol)
        centre = np.array([float((np.arange(p.size) * p).sum()) / n for p in proj])
        a0 = affine_of(open_volume(path, level=0))
        box = []
        for ax, p in enumerate(proj):
            nz = np.nonzero(p)[0]
            # the level-L voxels (nz[0], nz[-1]) in level-0 voxel indices, widened by one coarse voxel
            ends = np.zeros((2, 3))
            ends[:, ax] = [nz[0] - 1, nz[-1] + 1]
            # (rounded: the round trip through world mm is exact only up to float error)
            idx0 = np.round(world_to_voxel(a0, voxel_to_world(a, ends))[:, ax], 6)
            lo, hi = int(math.floor(idx0.min())), int(math.ceil(idx0.max())) + 1
            box.append((max(lo, 0), min(hi, shape0[ax])))
        return {"centroid_mm": voxel_to_world(a, centre[None])[0], "box": box, "level": lev, "voxels": n}
    return None


def label_volumes_mm3(vol) -> dict[int, float]:
    """Volume of every label of a label volume (chunked ``np.unique``; eager, the result is a small dict).

    Parameters
    ----------
    vol : volume
        A label volume (its affine gives the voxel volume).

    Returns
    -------
    dict
        ``{code: mm3}`` for every non-zero code present.

    Example
    -------
    >>> import numpy as np
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((4, 4, 4), np.uint16); lab[:2, :2, :2] = 801
    >>> label_volumes_mm3(make_volume(lab, np.eye(4), kind="labels"))
    {801: 8.0}
    """
    vox = float(abs(np.linalg.det(affine_of(vol)[:3, :3])))
    return {int(c): n * vox for c, n in label_counts(vol).items() if c != 0}


def _ks_present(sub: _Subject, kmeans_json: dict | None) -> list[int]:
    ks = set()
    if kmeans_json and isinstance(kmeans_json.get("results"), dict):
        ks |= {int(k) for k in kmeans_json["results"]}
    if sub.store.is_dir():
        for p in sub.store.iterdir():
            for prefix in _PER_K:
                if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit() and sub.has(p.name):
                    ks.add(int(p.name[len(prefix) :]))
    return sorted(ks)


def _fmt_mm(v) -> str:
    return " x ".join(f"{x:.3g}" for x in np.ravel(v))


# ----------------------------------------------------------------------------------------------------------------
# What the page is made from


@dataclass
class _Report:
    """The subject and its run's JSON records, read once; the figures, facts and tables are made from these."""

    sub: _Subject
    qc_dir: Path
    subject: str
    k: int | None
    ks: list[int]
    run: dict | None
    km_json: dict | None
    tr_json: dict | None
    max_px: int
    #: Centroid and box of the manual labels on the working grid (where the working-grid figures cut).
    hyp: dict | None

    @property
    def ws_point(self) -> np.ndarray | None:
        """Where the working-grid figures cut: the hypothalamus centroid (None: the centre of the grid)."""
        return None if self.hyp is None else self.hyp["centroid_mm"]

    def has(self, *names: str) -> bool:
        return all((self.sub.dir / n).exists() if n.endswith(".json") else self.sub.has(n) for n in names)

    def kmeans_result(self) -> dict | None:
        """The k-means record of the k shown (``kmeans.json``), if any."""
        return (self.km_json or {}).get("results", {}).get(str(self.k)) if self.k is not None else None


@dataclass
class _Figure:
    """One figure section of the page; ``png`` is None when its inputs are missing (``caption`` says which)."""

    name: str | None
    title: str
    caption: str
    png: bytes | None = None


def _collect(subject_dir: Path, k: int | None, max_slice_px: int) -> _Report:
    """Check the folder and the options, read the run's JSON records and locate the hypothalamus."""
    sub = _Subject(subject_dir)
    if not subject_dir.is_dir():
        raise HelmError("subject folder not found", path=subject_dir, hint="give OUT/<subject> of 'helm-dask run'")
    if not sub.store.is_dir():
        raise HelmError(
            "is not a helm-dask subject folder (no helm.zarr inside)",
            path=subject_dir,
            hint="give OUT/<subject> of 'helm-dask run' (run the pipeline first)",
        )
    if int(max_slice_px) < 16:
        raise HelmError(f"max_slice_px must be at least 16, got {max_slice_px}")
    qc_dir = Path(sub.layout.qc_dir)
    qc_dir.mkdir(exist_ok=True)
    run, km_json = sub.json(RECORDS["run"]), sub.json(RECORDS["kmeans"])
    ks = _ks_present(sub, km_json)
    if k is None:
        k = ks[(len(ks) - 1) // 2] if ks else None
    elif int(k) not in ks:
        raise HelmError(
            f"no k-means result for k = {k} in this subject "
            f"({'ks present: ' + ', '.join(map(str, ks)) if ks else 'no k-means result at all'})",
            path=subject_dir,
            hint="choose one of the ks the run made, or rerun with --ks",
        )
    hyp = hypothalamus_box(sub, "hypothalamus", max_slice_px=max_slice_px) if sub.has("hypothalamus") else None
    return _Report(
        sub=sub,
        qc_dir=qc_dir,
        subject=(run or {}).get("subject") or subject_dir.name,
        k=None if k is None else int(k),
        ks=ks,
        run=run,
        km_json=km_json,
        tr_json=sub.json(RECORDS["transform"]),
        max_px=max_slice_px,
        hyp=hyp,
    )


def _missing(rep: _Report) -> list[tuple[str, str]]:
    """The outputs of a full run that are absent, in pipeline order, each with the stage that makes it."""
    kk = "*" if rep.k is None else str(rep.k)
    missing = []
    for e in _EXPECTED:
        n = e.format(k=kk)
        if rep.has(n):
            continue
        stage = producer_of(e)
        why = (
            "written when a run finishes (was the run interrupted?)"
            if stage is None
            else f"made by the {stage.name} stage (helm-dask run --until {stage.until} or later)"
        )
        missing.append((n, why))
    return missing


# ----------------------------------------------------------------------------------------------------------------
# Figures: each one the notebooks' plot_orthogonal / plot_histogram on the subject's stores


def _saved(name: str, title: str, caption: str, fig) -> _Figure:
    return _Figure(name, title, caption, png_bytes(fig))  # written by _figures, in this process


def _figure_here(make: Callable, *args: Any) -> _Figure:
    """``make(*args)`` in a worker: its small reads on the worker's own thread (a task that waited on tasks
    of the cluster it runs in could leave no worker free to run them)."""
    with dask.config.set(scheduler="synchronous"):
        return make(*args)


def _figures(rep: _Report, hist: dict | None) -> list[_Figure]:
    """Every figure of the page, its PNG written to ``qc/``. Under a distributed client the workers draw the
    figures, one task each: the page is rendering-bound (matplotlib's layout and PNG encoding were half of its
    10 s at 0.2 mm), and the workers are idle once the stages are done."""
    makers: list[tuple] = [
        (make,) for make in (_raw_scan_figure, _bias_figure, _segmentation_figure, _closeup_figure, _label_map_figure)
    ]
    makers.append((_histogram_figure, hist))
    client = distributed_client()
    if client is None:
        figures = [make(rep, *args) for make, *args in makers]
    else:
        figures = client.gather([client.submit(_figure_here, make, rep, *args, pure=False) for make, *args in makers])
    for f in figures:
        if f.png is not None:
            (rep.qc_dir / f"{f.name}.png").write_bytes(f.png)
    return figures


def _skipped(title: str, names: list[str]) -> _Figure:
    return _Figure(None, title, "Not available: missing " + ", ".join(names) + ".")


def _grid_note(frame: Frame) -> str:
    if frame.aligned:
        return "World coordinates (RAS+, mm)."
    return (
        f"The working grid keeps the scan's directions (oblique by up to {frame.obliquity_deg():.1f}\u00b0): "
        "voxel planes, in mm from the first voxel."
    )


def _raw_scan_figure(rep: _Report) -> _Figure:
    """The raw scan (reoriented to RAS+ without interpolation) with the brain-mask outline."""
    title = "Raw scan with the brain-mask outline"
    sub = rep.sub
    if not rep.has("scan_raw"):
        return _skipped(title, ["scan_raw"])

    # the store's own pyramid level, reoriented (to_ras of a coarse level reads a small array)
    raw = to_ras(sub.open("scan_raw", choose_level(sub.path("scan_raw"), rep.max_px)))
    point = None
    if sub.has("labels_raw"):
        b = hypothalamus_box(sub, "labels_raw", max_slice_px=rep.max_px)
        point = None if b is None else b["centroid_mm"]
    with_mask = rep.has("mask_ras")
    fig, axes = figure_rows(1)
    plot_orthogonal(
        raw,
        contour=sub.open("mask_ras") if with_mask else None,
        contour_labels=["brain mask outline"] if with_mask else None,
        point_mm=point,
        max_px=rep.max_px,
        ax=axes[0],
        title="raw scan",
    )
    a_raw = affine_of(sub.open("scan_raw"))
    frame = Frame(affine_of(raw))
    note = (
        f"The scan's grid is oblique (up to {frame.obliquity_deg():.1f}\u00b0 from the world axes): these "
        "are voxel planes, in mm from the first voxel, reordered to the closest RAS+ axes without "
        "interpolation."
        if not frame.aligned
        else "World coordinates (RAS+, mm)."
    )
    caption = (
        f"Original scan ({_file_order(sub.open('scan_raw'))}, voxel {_fmt_mm(spacing_of(a_raw))} mm, "
        f"pyramid level {raw.attrs.get('level', 0)}) through the centroid of the manual hypothalamus "
        f"labels (cross-hair). Cyan: outline of the brain mask (background stage). {note}"
    )
    return _saved("raw_scan", title, caption, fig)


def _bias_range(rep: _Report, bias, msk) -> float:
    """Half-width of the field's colour range: its largest deviation from 1 inside the mask on the planes shown
    (symmetric about 1: the field is multiplicative)."""
    bs = orthogonal_slices(bias, point_mm=rep.ws_point, max_px=rep.max_px)
    ms = orthogonal_slices(msk, point_mm=bs.point_mm, level=bs.level)
    pairs = [(np.asarray(bs[d].data), np.asarray(ms[d].data)) for d in "zyx"]
    vals = np.concatenate([b[m != 0] for b, m in pairs if b.shape == m.shape] or [np.ones(1)])
    dev = float(np.max(np.abs(vals - 1.0))) if vals.size else 0.1
    return max(dev, 0.01)


def _bias_figure(rep: _Report) -> _Figure:
    """The resampled input and the fitted bias field inside the mask (as notebook 02 draws them)."""
    title = "Bias-field correction"
    sub = rep.sub
    if not rep.has("bias", "image_ws", "mask"):
        return _skipped(title, [n for n in ("bias", "image_ws", "mask") if not sub.has(n)])
    img, bias, msk = sub.open("image_ws"), sub.open("bias"), sub.open("mask")
    dev = _bias_range(rep, bias, msk)
    fig, axes = figure_rows(2)
    common = dict(contour=msk, point_mm=rep.ws_point, max_px=rep.max_px)
    plot_orthogonal(img, ax=axes[0], title="input (resampled)", **common)
    plot_orthogonal(
        img,
        overlay=bias.rename("bias (multiplicative)"),
        overlay_cmap="RdBu_r",
        overlay_vmin=1 - dev,
        overlay_vmax=1 + dev,
        overlay_alpha=1.0,
        veil=msk,
        ax=axes[1],
        title="bias field",
        **common,
    )
    caption = (
        f"Top: the masked, resampled image before correction. Bottom: the fitted multiplicative bias "
        f"field inside the brain mask (range {1 - dev:.3f}\u2013{1 + dev:.3f} on these planes; the "
        f"corrected image is the input divided by it). {_grid_note(Frame(affine_of(img)))}"
    )
    return _saved("bias_field", title, caption, fig)


def _segmentation_figure(rep: _Report) -> _Figure:
    """The preprocessed image, the k-means map over it and the merged labels over it."""
    title = "Preprocessed image, k-means map and merged labels"
    sub, k = rep.sub, rep.k
    if not rep.has("preprocessed"):
        return _skipped(title, ["preprocessed"])
    with_mask = sub.has("mask")
    rows: list[tuple[str, dict]] = [("preprocessed", {"contour": sub.open("mask") if with_mask else None})]
    captions = [
        "Row 1: the preprocessed image (bias-corrected, masked)"
        + (" with the brain-mask outline (cyan)" if with_mask else "")
        + "."
    ]
    legend: list[tuple] = []
    if k is not None and rep.has(f"kmeans_k{k}"):
        km = sub.open(f"kmeans_k{k}")
        rows.append((f"k-means, k = {k}", dict(overlay=km, clusters="viridis", n_clusters=k, overlay_alpha=0.8)))
        captions.append(
            f"Row {len(rows)}: the k-means map (k = {k}) over the image (80 % opaque), clusters "
            "numbered by intensity, coloured from dark violet (cluster 1, darkest tissue) to "
            "yellow-green (brightest)."
        )
        legend += label_legend([], n_clusters=k, clusters="viridis")
    if k is not None and rep.has(f"hemi_k{k}"):
        hemi = sub.open(f"hemi_k{k}")
        rows.append(("merged labels", dict(overlay=hemi, clusters="none", n_clusters=k, overlay_alpha=0.9)))
        captions.append(
            f"Row {len(rows)}: the labels the merge put over the k-means map (manual "
            "hypothalamus labels and fornix after the closing) in their FreeSurfer colours."
        )
        legend = label_legend(_MANUAL_LEFT) + legend
    pre = sub.open("preprocessed")
    fig, axes = figure_rows(len(rows), extra_height=legend_height(len(legend)))
    for row, (row_title, kw) in zip(axes, rows):
        plot_orthogonal(pre, point_mm=rep.ws_point, max_px=rep.max_px, ax=row, title=row_title, **kw)
    add_legend(fig, legend)
    caption = " ".join(captions) + f" Planes through the hypothalamus centroid. {_grid_note(Frame(affine_of(pre)))}"
    return _saved("segmentation", title, caption, fig)


def _closeup_window(rep: _Report, a0: np.ndarray) -> tuple[int, float]:
    """(pyramid level, radius in mm) of a window holding the hypothalamus box and the margin around it: the
    finest stored level where the window fits ``max_px``."""
    assert rep.hyp is not None
    sp0 = spacing_of(a0)
    box = np.array(rep.hyp["box"], dtype=np.float64)
    box[:, 0] -= _CLOSEUP_MARGIN_MM / sp0
    box[:, 1] += _CLOSEUP_MARGIN_MM / sp0
    lev = choose_level(rep.sub.path("preprocessed"), rep.max_px, box=np.ceil(box[:, 1] - box[:, 0]).tolist())
    centre = world_to_voxel(a0, np.asarray(rep.hyp["centroid_mm"])[None])[0]
    radius = float(np.max(np.maximum(centre - box[:, 0], box[:, 1] - centre) * sp0))
    return lev, radius


def _closeup_figure(rep: _Report) -> _Figure:
    """The hypothalamus and a margin around it, as fine as fits: the image alone and with the labels."""
    title = "Close-up of the hypothalamus"
    sub = rep.sub
    if rep.hyp is None or not sub.has("preprocessed"):
        return _skipped(title, ["hypothalamus labels" if rep.hyp is None else "preprocessed"])
    lab_name = "closed_labels" if sub.has("closed_labels") else "hypothalamus"
    pre = sub.open("preprocessed")
    lev, radius = _closeup_window(rep, affine_of(pre))
    rows: list[tuple[str, dict]] = [
        ("preprocessed", {}),
        ("labels", dict(overlay=sub.open(lab_name), clusters="none", overlay_alpha=0.75)),
    ]
    legend = label_legend(_MANUAL_LEFT)
    fig, axes = figure_rows(len(rows), extra_height=legend_height(len(legend)))
    for row, (row_title, kw) in zip(axes, rows):
        plot_orthogonal(
            pre,
            point_mm=rep.hyp["centroid_mm"],
            level=lev,
            radius_mm=radius,
            max_px=rep.max_px,
            crosshair=False,
            ax=row,
            title=row_title,
            **kw,
        )
    add_legend(fig, legend)
    what = "after the closing (merge stage)" if lab_name == "closed_labels" else "as drawn (resampled)"
    caption = (
        f"The hypothalamus and {_CLOSEUP_MARGIN_MM:g} mm around it at pyramid level {lev} (full working "
        f"resolution at level 0): the image alone, and with the manual labels {what} in their "
        f"FreeSurfer colours. {_grid_note(Frame(affine_of(pre)))}"
    )
    return _saved("hypothalamus_closeup", title, caption, fig)


def _label_map_figure(rep: _Report) -> _Figure:
    """The whole-brain map of the k shown, with the mirror plane x = 0."""
    title = "Whole-brain label map and mirror plane"
    sub, k = rep.sub, rep.k
    if k is None:
        return _skipped(title, ["k-means results"])
    if not rep.has(f"label_map_k{k}"):
        return _skipped(title, [f"label_map_k{k}"])
    lm = sub.open(f"label_map_k{k}")
    b = hypothalamus_box(sub, f"label_map_k{k}", max_slice_px=rep.max_px, select=_left_hypothalamus)
    legend = label_legend(_MANUAL_LEFT, n_clusters=k, clusters="grey", both_sides=True)
    fig, axes = figure_rows(1, extra_height=legend_height(len(legend)))
    plot_orthogonal(
        lm,
        point_mm=None if b is None else b["centroid_mm"],
        max_px=rep.max_px,
        n_clusters=k,
        planes=[((0.0, 0.0, 0.0), (1.0, 0.0, 0.0))],
        plane_colors=[MIRROR_COLOUR],
        plane_labels=["mirror plane x = 0"],
        ax=axes[0],
        title=f"label map, k = {k}",
    )
    add_legend(fig, legend)
    tr = (rep.tr_json or {}).get("transform", {})
    extra = ""
    if tr:
        extra = (
            f" Mirror fit: {100 * float(tr.get('fraction_across', float('nan'))):.3f} % of the mask across "
            f"the plane, median gap {float(tr.get('gap_mm', float('nan'))):.2f} mm."
        )
    caption = (
        f"The whole-brain map (k = {k}) in its axis-aligned RAS+ grid (world mm): clusters in the grey "
        f"ramp of lut.txt, hypothalamus (801\u2013805 left, 806\u2013810 right) and fornix in FreeSurfer "
        f"colours. Dashed magenta: the mirror plane x = 0; planes through the left hypothalamus." + extra
    )
    return _saved("label_map", title, caption, fig)


def _histogram_from_volume(sub: _Subject, max_slice_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Fallback histogram (128 bins) of the preprocessed image inside the mask, at a coarse level (chunked).

    ``da.histogram`` with a range: numpy's equal-bin rule per chunk. (Not :func:`helm_dask.view.histogram`, which
    bins against the exact float64 edges: a value within a float32 step of an edge could change bin, and with it
    the counts in ``qc.json``.)
    """
    lev = choose_level(sub.path("preprocessed"), max_slice_px)
    pre = sub.open("preprocessed", lev)
    msk = sub.open("mask", min(lev, int(read_meta(sub.path("mask")).get("nlevels", 1)) - 1))
    if msk.shape != pre.shape:
        msk, pre = sub.open("mask"), sub.open("preprocessed")
    inside = msk.data != 0
    lo, hi = dask.compute(da.where(inside, pre.data, np.inf).min(), da.where(inside, pre.data, -np.inf).max())
    lo, hi = float(lo), float(hi)
    if not np.isfinite(lo) or hi <= lo:
        lo, hi = (0.0, 1.0) if not np.isfinite(lo) else (lo - 0.5, lo + 0.5)
    counts, edges = da.histogram(pre.data, bins=128, range=(lo, hi), weights=inside.astype(np.int64))
    return np.asarray(edges.compute() if hasattr(edges, "compute") else edges), np.asarray(counts.compute())


def _histogram_data(rep: _Report) -> dict | None:
    """``{"source", "edges", "counts"}``: the histogram the k-means stage stored, else one of a coarse level."""
    res = rep.kmeans_result()
    hist = (res or {}).get("extra", {}).get("histogram") if res else None
    if hist and "edges" in hist and "counts" in hist:
        edges, counts = np.asarray(hist["edges"], dtype=np.float64), np.asarray(hist["counts"], dtype=np.float64)
        return {"source": "histogram stored by the k-means stage", "edges": edges, "counts": counts}
    if rep.sub.has("preprocessed") and rep.sub.has("mask"):
        edges, counts = _histogram_from_volume(rep.sub, rep.max_px)
        return {"source": "histogram of a coarse pyramid level", "edges": edges, "counts": counts}
    return None


def _histogram_figure(rep: _Report, hist: dict | None) -> _Figure:
    """The intensities inside the mask with the k-means centroids and thresholds of the k shown."""
    title = "Intensity histogram and k-means centroids"
    if hist is None:
        return _skipped(title, ["kmeans.json", "preprocessed"])
    res = rep.kmeans_result()
    thr = res.get("extra", {}).get("thresholds") if res else None
    k = rep.k or 0
    fig = plot_histogram(
        hist["counts"].astype(np.float64),
        hist["edges"],
        centroids=np.asarray(res["centroids"], dtype=np.float64) if res else None,
        thresholds=None if thr is None else np.asarray(thr, dtype=np.float64),
        color="#3d4852",
        title=f"k = {k}; {hist['source']}" if k else hist["source"],
        xlabel="intensity (preprocessed image, inside the brain mask)",
    )
    caption = "Intensities of the preprocessed image inside the brain mask. " + (
        f"Solid lines: the {k} k-means centroids (numbered as the clusters, colours as in the "
        "overlay); dotted: the decision thresholds between clusters."
        if res
        else "No k-means result yet: no centroids."
    )
    return _saved("histogram", title, caption, fig)


# ----------------------------------------------------------------------------------------------------------------
# Tables and facts


def _label_volume_rows(sub: _Subject, names: dict | None = None) -> tuple[list[dict], float | None]:
    """One row per label code (manual labels and after the closing, mm3) and the working grid's voxel volume;
    ``names``: display names of other codes (``--extra-labels``)."""
    names = names or {}
    volumes = {}
    vox_mm3 = None
    for name in ("hypothalamus", "closed_labels"):
        if sub.has(name):
            vol = sub.open(name)
            vox_mm3 = float(abs(np.linalg.det(affine_of(vol)[:3, :3])))
            volumes[name] = label_volumes_mm3(vol)
    codes = sorted(set().union(*[set(v) for v in volumes.values()]) if volumes else set())
    rows = [
        {
            "code": c,
            "name": HYPOTHALAMUS.get(c, FORNIX_NAME if c == FORNIX else names.get(c, f"label_{c}").replace(" ", "_")),
            "short": SHORT_NAMES.get(c, names.get(c, f"label {c}")),
            "manual_mm3": volumes.get("hypothalamus", {}).get(c, 0.0) if "hypothalamus" in volumes else None,
            "closed_mm3": volumes.get("closed_labels", {}).get(c, 0.0) if "closed_labels" in volumes else None,
        }
        for c in codes
    ]
    return rows, vox_mm3


def _write_volumes_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["code", "name", "manual_mm3", "after_closing_mm3"])
        for r in rows:
            w.writerow(
                [
                    r["code"],
                    r["name"],
                    "" if r["manual_mm3"] is None else f"{r['manual_mm3']:.6g}",
                    "" if r["closed_mm3"] is None else f"{r['closed_mm3']:.6g}",
                ]
            )


def _side_facts(run: dict) -> list[tuple[str, str]]:
    side = run.get("side") or {}
    if not side:
        return []
    used, given = side.get("used", "?"), side.get("given", "?")
    facts = [
        (
            "Hemisphere",
            f"{'left' if used == 'L' else 'right' if used == 'R' else used} ({used}); "
            f"--side {given}" + ("" if side.get("confident", True) else " (NOT confident)"),
        )
    ]
    if side.get("reason"):
        facts.append(("Side decision", str(side["reason"])))
    return facts


def _file_order(vol) -> str:
    """The scan's voxel order: the file's, and the stored RAS+ order the import made of it (in its provenance)."""
    for step in vol.attrs.get("provenance") or []:
        order = (step.get("params") or {}).get("voxel_order") if isinstance(step, dict) else None
        if isinstance(order, dict) and order.get("file") and order["file"] != order.get("stored"):
            return f"{order['file']} (stored as {order.get('stored')})"
    return orientation_code(affine_of(vol))


def _grid_facts(sub: _Subject, run: dict) -> list[tuple[str, str]]:
    facts = []
    if sub.has("scan_raw"):
        a = affine_of(sub.open("scan_raw"))
        oblique = "" if is_axis_aligned(a) else f", oblique ({Frame(a).obliquity_deg():.1f}\u00b0)"
        shape = " x ".join(map(str, sub.open("scan_raw").shape[:3]))
        order = _file_order(sub.open("scan_raw"))
        facts.append(("Scan", f"{shape} voxels, {_fmt_mm(spacing_of(a))} mm, {order}" + oblique))
    if sub.has("hypothalamus"):
        v = sub.open("hypothalamus")
        flipped = (run.get("side") or {}).get("used") == "R"
        text = f"{' x '.join(map(str, v.shape[:3]))} voxels, {_fmt_mm(spacing_of(affine_of(v)))} mm"
        if flipped:
            text += (
                "; the right hemisphere is mirrored to a left one (codes 806-810 -> 801-805) for "
                "processing, as in the working-grid figures"
            )
        facts.append(("Working grid", text))
    if run.get("mask_mm3") is not None:
        facts.append(("Brain mask", f"{float(run['mask_mm3']) / 1000:.1f} cm\u00b3"))
    return facts


def _result_facts(run: dict, km_json: dict | None, tr_json: dict | None, k, ks) -> list[tuple[str, str]]:
    facts = []
    if k is not None:
        res = (km_json or {}).get("results", {}).get(str(k))
        txt = f"k = {k} shown (made: {', '.join(map(str, ks))})"
        if res:
            txt += "; centroids " + ", ".join(f"{c:.4g}" for c in res.get("centroids", []))
            if "exact" in res.get("extra", {}):
                txt += "; exact" if res["extra"]["exact"] else "; approximate"
        facts.append(("k-means", txt))
    tr = (tr_json or {}).get("transform") or run.get("transform")
    if tr:
        ang = tr.get("angles_deg") or []
        facts.append(
            (
                "Mirror",
                f"{100 * float(tr.get('fraction_across', float('nan'))):.3f} % of the mask across "
                f"x = 0, gap {float(tr.get('gap_mm', float('nan'))):.2f} mm (median), rotation "
                + ", ".join(f"{float(x):.2f}\u00b0" for x in ang),
            )
        )
    return facts


def _run_facts(run: dict) -> list[tuple[str, str]]:
    facts = []
    stages = run.get("stages") or {}
    if stages:
        times = ", ".join(
            f"{n} {float(s.get('seconds', 0)):.1f} s" + (" (reused)" if s.get("status") == "skipped" else "")
            for n, s in stages.items()
        )
        total = f"; total {float(run['seconds']):.1f} s" if run.get("seconds") is not None else ""
        facts.append(("Stage times", times + total))
    params = run.get("params") or {}
    if params:
        facts.append(
            (
                "Run",
                f"--until {params.get('until', '?')}, --spacing {params.get('spacing', '?')}, "
                f"ks {params.get('ks', '?')}",
            )
        )

    facts.append(("Report", f"helm-dask {__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}"))
    return facts


def _facts(
    sub: _Subject, run: dict | None, km_json: dict | None, tr_json: dict | None, k: int | None, ks: list[int]
) -> list[tuple[str, str]]:
    """The page's facts table (also in ``qc.json``): side, grids, mask, k-means, mirror, times, run options."""
    run = run or {}
    facts = _side_facts(run) + _grid_facts(sub, run) + _result_facts(run, km_json, tr_json, k, ks)
    return facts + _closing_facts(run, k) + _run_facts(run)


def _closing_facts(run: dict, k: int | None) -> list[tuple[str, str]]:
    """What the merge's closing added: voxels per label, and per k-means cluster they took over (shown k)."""
    rec = run.get("closing") or {}
    added = rec.get("added_voxels")
    if not added:
        return []
    vox = float(added.get("voxel_mm3") or 1.0)
    names = _extra_names(run)
    by_label = added.get("by_label") or {}
    if by_label:
        parts = [
            f"{names.get(int(c), SHORT_NAMES.get(int(c), f'label {c}'))} +{int(n):,} ({int(n) * vox:.3g} mm\u00b3)"
            for c, n in by_label.items()
        ]
        txt = ", ".join(parts)
    else:
        txt = "nothing"
    facts = [(f"Closing ({float(rec.get('radius_mm', float('nan'))):g} mm) added", txt)]
    clusters = (added.get("by_cluster") or {}).get(str(k)) if k is not None else None
    if clusters:
        parts = [("outside the mask" if c == "0" else f"cluster {c}") + f": {int(n):,}" for c, n in clusters.items()]
        facts.append((f"Closing took over (k = {k})", ", ".join(parts) + " voxels"))
    return facts


def _extra_names(run: dict) -> dict[int, str]:
    """``--extra-labels`` names by code (both sides), from the run's options."""
    try:
        extras = parse_extra_labels((run.get("params") or {}).get("extra_labels"))
    except HelmError:
        return {}
    out = {}
    for e in extras:
        out[e.left] = e.name if e.left == e.right else f"L {e.name}"
        out.setdefault(e.right, f"R {e.name}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# k-means vs a reference tissue map (``helm-dask run --reference-tissue FILE``; nothing of this without it)


def _reference_agreement(sub: _Subject, run: dict | None, ks: list[int], qc_dir: Path) -> dict | None:
    """ARI and best-match Dice of every k-means map against the run's ``reference_tissue`` (None without one).

    The reference (on the scan's grid) is streamed into a temporary store in ``qc/``, put on the working grid
    like the scan (:func:`helm_dask.metrics.reference_on_grid`: RAS+, the run's left-right flip, majority vote to
    the run's spacing) and compared with all ks in one chunked pass
    (:func:`helm_dask.metrics.kmeans_agreement_many`). Written to ``qc/kmeans_agreement.json`` and added to
    ``run.json`` (key ``kmeans_agreement``); a failure (missing file, another grid) is reported there and on
    the page instead of stopping the report.
    """
    import shutil

    params = (run or {}).get("params") or {}
    ref = params.get("reference_tissue")
    if not ref:
        return None
    side = ((run or {}).get("side") or {}).get("used") or "L"
    spacing = params.get("spacing", 0.3)
    info: dict[str, Any] = {
        "reference": str(ref),
        "side": side,
        "spacing": spacing,
        "region": "voxels where both the k-means map and the reference are non-zero",
        "class_names": {str(c): n for c, n in TISSUE_CLASS_NAMES.items()},
        "ks": {},
        "error": None,
    }
    tmp = Path(sibling(qc_dir / "reference_tissue.zarr", ".tmp"))  # unique per writer
    try:
        if not ks:
            raise HelmError("no k-means maps to compare (the run stopped before the kmeans stage)")
        if not os.path.exists(ref):
            raise HelmError("reference tissue map not found", path=ref, hint="check the --reference-tissue path")
        shutil.rmtree(tmp, ignore_errors=True)
        nifti_to_zarr(ref, tmp, kind="labels", pyramid=False, overwrite=True)
        maps = {k: sub.open(f"kmeans_k{k}") for k in ks}
        ref_ws = reference_on_grid(open_volume(tmp), maps[ks[0]], side=side, spacing=spacing)
        res = kmeans_agreement_many(maps, ref_ws)
        info["ks"] = {str(k): r for k, r in res.items()}
    except HelmError as e:
        info["error"] = str(e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(qc_dir / "kmeans_agreement.json", json.dumps(info, indent=2, default=str))
    if run is not None and (sub.dir / "run.json").exists():
        run = dict(run, kmeans_agreement=info)
        write_text_atomic(sub.dir / "run.json", json.dumps(run, indent=2, default=str))
    return info


def _agreement_table(info: dict) -> dict:
    """The agreement record arranged for the page: Dice columns (one per reference class) and one row per k."""
    ks = sorted(info.get("ks", {}), key=int)
    classes = sorted({int(c) for k in ks for c in info["ks"][k].get("dice", {})})
    names = info.get("class_names", {})
    rows = []
    for k in ks:
        r = info["ks"][k]
        dice = {int(c): d for c, d in r.get("dice", {}).items()}
        rows.append({"k": k, "ari": r.get("ari"), "dice": [dice.get(c) for c in classes]})
    r0 = info["ks"][ks[0]] if ks else {}
    exc = r0.get("excluded") or {}
    return {
        "error": info.get("error"),
        "classes": [(c, names.get(str(c), f"class {c}")) for c in classes],
        "rows": rows,
        "reference": info.get("reference", ""),
        "voxels": int(r0.get("voxels", 0)),
        "kmeans_only": int(exc.get("kmeans_only", 0)),
        "tissue_only": int(exc.get("tissue_only", 0)),
    }


# ----------------------------------------------------------------------------------------------------------------
# The page


def _fmt_num(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "\u2013"
    return "\u2013" if math.isnan(f) else f"{f:.{digits}f}"


def _swatch(code: int) -> str:
    r, g, b = COLOURS.get(code, (255, 255, 255, 0))[:3]
    return f"rgb({r}, {g}, {b})"


@functools.cache
def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("helm_dask", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        b64=lambda data: base64.b64encode(data).decode("ascii"),
        num=_fmt_num,
        repr=repr,
        swatch=_swatch,
        thousands=lambda n: f"{int(n):,}",
    )
    return env.get_template("qc.html.j2")


def _render_page(rep: _Report, facts, figures, vol_rows, missing, vox_mm3, agreement) -> str:
    return _template().render(
        subject=rep.subject,
        facts=facts,
        figures=figures,
        missing=missing,
        volumes=vol_rows,
        have_manual=any(r["manual_mm3"] is not None for r in vol_rows),
        have_closed=any(r["closed_mm3"] is not None for r in vol_rows),
        vox_mm3=vox_mm3,
        agreement=None if agreement is None else _agreement_table(agreement),
        agreement_title=_AGREEMENT_TITLE,
    )


def write_qc_report(subject_dir: str | os.PathLike, *, k: int | None = None, max_slice_px: int = 512) -> Path:
    """Write ``subject_dir/qc/report.html`` (one self-contained page) and its PNG figures; returns its path.

    Parameters
    ----------
    subject_dir : path
        ``OUT/<subject>`` as written by ``helm-dask run`` (any ``--until``: missing outputs are listed on the
        page, with the stage that makes them).
    k : int, optional
        Which k-means result to show; default the middle of the ks present (6 for the default 4..9).
    max_slice_px : int
        Slices come from the finest pyramid level whose largest dimension is at most this (the close-up of the
        hypothalamus from the finest level where its window fits).

    Returns
    -------
    pathlib.Path
        The report. Also written: ``qc/*.png``, ``qc/label_volumes.csv``, ``qc/qc.json`` (and, after
        ``run --reference-tissue``, ``qc/kmeans_agreement.json``).

    Memory: only single voxel planes, per-axis projections and label counts are ever computed; the result is a
    few MB of PNG whatever the size of the scan.

    Example
    -------
    >>> write_qc_report("OUT/subject01", k=6)        # doctest: +SKIP
    PosixPath('OUT/subject01/qc/report.html')
    """
    rep = _collect(Path(subject_dir), k, max_slice_px)
    missing = _missing(rep)
    hist = _histogram_data(rep)
    figures = _figures(rep, hist)
    vol_rows, vox_mm3 = _label_volume_rows(rep.sub, _extra_names(rep.run or {}))
    _write_volumes_csv(rep.qc_dir / "label_volumes.csv", vol_rows)
    agreement = _reference_agreement(rep.sub, rep.run, rep.ks, rep.qc_dir)
    facts = _facts(rep.sub, rep.run, rep.km_json, rep.tr_json, rep.k, rep.ks)
    summary = {
        "subject": rep.subject,
        "k": rep.k,
        "ks": rep.ks,
        "facts": facts,
        "missing": [m for m, _ in missing],
        "histogram": None
        if hist is None
        else {**hist, "edges": hist["edges"].tolist(), "counts": hist["counts"].tolist()},
        "figures": [f.name for f in figures if f.name],
        "label_volumes_mm3": vol_rows,
        "voxel_mm3": vox_mm3,
    }
    if agreement is not None:
        summary["kmeans_agreement"] = agreement
    write_text_atomic(rep.qc_dir / "qc.json", json.dumps(summary, indent=2, default=str))
    out = rep.qc_dir / "report.html"
    # a unique temporary (two runs of one subject at once must not rename each other's), removed on failure
    write_text_atomic(out, _render_page(rep, facts, figures, vol_rows, missing, vox_mm3, agreement))
    return out
