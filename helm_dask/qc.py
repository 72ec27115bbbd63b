"""QC report per subject: orthogonal slices with overlays, histogram, bias field, label volumes -> one HTML page.

:func:`write_qc_report` reads what ``helm-dask run`` left in ``OUT/<subject>/`` and writes ``OUT/<subject>/qc/``::

    report.html        one self-contained page (figures embedded as PNG data URIs, CSS inline, no network)
    *.png              the same figures as files (for slides, tickets, notebooks)
    label_volumes.csv  label volumes in mm3 (manual labels and after the closing, at the working spacing)
    qc.json            the facts and volumes of the page, machine-readable
    kmeans_agreement.json  only with ``run --reference-tissue FILE``: ARI and best-match Dice of every k-means map
                       against that tissue map (also a table on the page and ``run.json["kmeans_agreement"]``)

Figures (each only if its inputs exist; the page lists what is missing and which stage makes it):

* raw scan (reoriented to the closest RAS+ voxel order, no interpolation) with the brain-mask outline;
* bias correction input and the fitted bias field;
* the preprocessed image alone, with the k-means map and with the merged labels overlaid;
* a close-up of the hypothalamus (preprocessed image + labels after the closing);
* the whole-brain label map with the mirror plane (world x = 0);
* the intensity histogram inside the mask with the k-means centroids and thresholds.

Bounded memory. Nothing here reads a whole volume into memory: slices are single voxel planes read with
``vol.isel(<axis>=i).values`` from the pyramid level whose largest dimension is at most ``max_slice_px``
(the close-up reads one cropped plane of the finest level that fits); the planes' positions (hypothalamus
centroid, bounding box) come from per-axis projections ``(mask).sum(axis=...)`` -- a chunked integer reduction
whose tasks hold one chunk -- and the label volumes from a chunked ``np.unique`` (:func:`labels.label_counts`).
The histogram is the one the k-means stage stored (or a chunked ``da.histogram`` at a coarse level).

Geometry. Axis-aligned grids (the whole-brain map, RAS+ inputs) are drawn in world mm with the world
directions on the axes. Oblique grids (a scanner's tilted grid, and the working grid that keeps its
directions) are drawn as voxel planes with millimetres from the first voxel along each voxel axis (the page
says so); overlays are placed through the exact affines, so they line up whatever the pyramid level.

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
import html
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from .errors import HelmError
from .io.location import sibling, write_text_atomic
from .io.store import is_complete, open_volume, read_meta
from .labels import (
    COLOURS,
    FORNIX,
    FORNIX_NAME,
    HYPOTHALAMUS,
    RIGHT_OFFSET,
    SHORT_NAMES,
    SIDE_CODES,
    cluster_colour,
    label_counts,
)
from .volume import DIMS, affine_of, is_axis_aligned, orientation_code, spacing_of, voxel_to_world, world_to_voxel

__all__ = ["write_qc_report", "choose_level", "label_volumes_mm3", "hypothalamus_box"]

#: Which stage (and ``--until`` value) makes each output; used to say what is missing and how to get it.
PRODUCER = {
    "scan_raw": ("import", "preprocess"),
    "labels_raw": ("import", "preprocess"),
    "mask_ras": ("background", "preprocess"),
    "image_ws": ("resample", "preprocess"),
    "mask": ("resample", "preprocess"),
    "hypothalamus": ("resample", "preprocess"),
    "bias": ("bias", "preprocess"),
    "preprocessed": ("bias", "preprocess"),
    "kmeans": ("kmeans", "kmeans"),
    "closed_labels": ("merge", "merge"),
    "hemi": ("merge", "merge"),
    "label_map": ("mirror", "mirror"),
    "transform.json": ("mirror", "mirror"),
    "kmeans.json": ("kmeans", "kmeans"),
    "run.json": ("", ""),
}

_SHORT = SHORT_NAMES
_LABEL_CODES = tuple(sorted(_SHORT))
_PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}
_PANEL_AXES = {2: (0, 1), 1: (0, 2), 0: (1, 2)}  # plane normal -> (horizontal, vertical) voxel axes
_WORLD_AXIS = {
    0: "x (mm)   left \u2192 right",
    1: "y (mm)   posterior \u2192 anterior",
    2: "z (mm)   inferior \u2192 superior",
}
_MIRROR_COLOUR = "#ff2bd6"
_MASK_COLOUR = "#00e0ff"
_DPI = 100


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: subject folder, levels, bounded reads


class _Subject:
    """Paths and availability of one subject's outputs (nothing is read until asked)."""

    def __init__(self, subject_dir: Path):
        self.dir = subject_dir
        self.store = subject_dir / "helm.zarr"
        self._ok: dict[str, bool] = {}

    def has(self, name: str) -> bool:
        if name not in self._ok:
            self._ok[name] = is_complete(self.store / name)
        return self._ok[name]

    def path(self, name: str) -> str:
        return str(self.store / name)

    def open(self, name: str, level: int = 0):
        four_d = bool(read_meta(self.path(name)).get("four_d"))
        # a multi-echo raw scan: show the RMS over echoes (what the pipeline uses by default)
        return open_volume(self.path(name), level=level, echo_combine="rms" if four_d else None)

    def json(self, name: str) -> dict | None:
        try:
            return json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return None


def choose_level(path: str | os.PathLike, max_slice_px: int = 512) -> int:
    """The finest pyramid level of a stored volume whose largest dimension is at most ``max_slice_px``.

    The coarsest level when none is that small. Only metadata is read.

    Example
    -------
    >>> choose_level("subject/helm.zarr/preprocessed", 512)      # doctest: +SKIP
    2
    """
    meta = read_meta(path)
    nlevels = int(meta.get("nlevels", 1))
    for lev in range(nlevels):
        if max(open_volume(path, level=lev).shape[:3]) <= max_slice_px:
            return lev
    return nlevels - 1


def _plane(vol, axis: int, index: int, crop: dict[int, tuple[int, int]] | None = None) -> np.ndarray:
    """One voxel plane of a lazy volume as a 2-D NumPy array (optionally cropped). A bounded read."""
    sel: dict[str, Any] = {DIMS[axis]: int(index)}
    for ax, (lo, hi) in (crop or {}).items():
        sel[DIMS[ax]] = slice(int(lo), int(hi))
    return np.asarray(vol.isel(sel).values)


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

    Returns
    -------
    dict
        ``{"centroid_mm": (3,), "box": [(lo, hi) per axis, level-0 voxels, hi exclusive], "level": L,
        "voxels": n}``
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
    """{code: volume in mm3} of a label volume (chunked ``np.unique``; eager, the result is a small dict)."""
    vox = float(abs(np.linalg.det(affine_of(vol)[:3, :3])))
    return {int(c): n * vox for c, n in label_counts(vol).items() if c != 0}


# ----------------------------------------------------------------------------------------------------------------
# Display geometry


class _Frame:
    """Display coordinates along the voxel axes of a reference grid: world mm if axis-aligned, else mm from
    the first voxel centre along each voxel axis. Layers on the same grid at other pyramid levels (or with
    the half-voxel shift of block-mean levels) are placed through their exact affines."""

    def __init__(self, ref_affine: np.ndarray):
        self.ref = np.asarray(ref_affine, dtype=np.float64)
        self.aligned = is_axis_aligned(self.ref)
        self.inv = np.linalg.inv(self.ref)
        if self.aligned:
            self.scale, self.offset = np.diag(self.ref)[:3].copy(), self.ref[:3, 3].copy()
        else:
            self.scale, self.offset = spacing_of(self.ref), np.zeros(3)

    def coords(self, affine: np.ndarray, axis: int, n: int) -> np.ndarray:
        """Display coordinate (mm) of voxel centres ``0..n-1`` along ``axis`` of a layer with ``affine``."""
        m = self.inv @ np.asarray(affine, dtype=np.float64)
        return self.scale[axis] * (m[axis, axis] * np.arange(n) + m[axis, 3]) + self.offset[axis]

    def of_world(self, point_mm: np.ndarray) -> np.ndarray:
        """Display coordinates of a world point."""
        v = world_to_voxel(self.ref, np.asarray(point_mm, dtype=np.float64)[None])[0]
        return self.scale * v + self.offset

    def label(self, axis: int) -> str:
        if self.aligned:
            return _WORLD_AXIS[axis]
        return f"voxel axis {'ijk'[axis]} (mm)   \u2248 {_WORLD_AXIS[axis].split(maxsplit=2)[2]}"

    def obliquity_deg(self) -> float:
        """Largest angle between a voxel axis and its nearest world axis."""
        cols = self.ref[:3, :3] / spacing_of(self.ref)
        return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0).min(), -1, 1))))


def _index_of(vol, axis: int, point_mm: np.ndarray) -> int:
    v = world_to_voxel(affine_of(vol), np.asarray(point_mm)[None])[0]
    return int(np.clip(np.floor(v[axis] + 0.5), 0, vol.shape[axis] - 1))


def _extent(frame: _Frame, vol, axis: int, n_lo: int, n_hi: int) -> tuple[np.ndarray, float, float]:
    """Display coordinates of voxels ``n_lo..n_hi-1`` along ``axis`` and the outer edges of that range."""
    a = affine_of(vol)
    c = frame.coords(a, axis, vol.shape[axis])[n_lo:n_hi]
    step = float(frame.scale[axis] * (frame.inv @ a)[axis, axis])
    return c, float(c[0] - step / 2), float(c[-1] + step / 2)


# ----------------------------------------------------------------------------------------------------------------
# Colours


def _overlay_cluster_rgb(j: int, k: int) -> tuple[float, float, float]:
    """Colour of k-means cluster j (1..k) in the k-means figure and the histogram: viridis, dark = low intensity.

    Ordered like the intensities (a perceptual ramp) yet distinct for k up to 9; the last 10 % of viridis
    (pale yellow) is left out so that every line is visible on the white histogram.
    """
    from matplotlib import colormaps

    r, g, b, _ = colormaps["viridis"](0.9 * (j - 1) / max(k - 1, 1))
    return (r, g, b)


def _label_rgba(
    plane: np.ndarray, k: int, *, clusters: str = "lut", cluster_alpha: float = 1.0, label_alpha: float = 1.0
) -> np.ndarray:
    """RGBA image (floats, plane.shape + (4,)) of a label plane; 0 is transparent.

    Hypothalamus codes and the fornix take the LUT (FreeSurfer) colours; clusters 1..k the LUT grey ramp
    (``clusters="lut"``, as in ``lut.txt``), the viridis ramp of :func:`_overlay_cluster_rgb` (``"overlay"``)
    or nothing (``"none"``).
    """
    out = np.zeros(plane.shape + (4,), dtype=np.float32)
    for v in np.unique(plane):
        v = int(v)
        if v == 0:
            continue
        if v in COLOURS:
            rgb, a = tuple(c / 255 for c in COLOURS[v][:3]), label_alpha
        elif 1 <= v <= max(k, 1) and clusters != "none":
            rgb = tuple(c / 255 for c in cluster_colour(v, k)[:3]) if clusters == "lut" else _overlay_cluster_rgb(v, k)
            a = cluster_alpha
        elif clusters == "none":
            continue
        else:  # a code that has no colour: white, so that it is seen
            rgb, a = (1.0, 1.0, 1.0), label_alpha
        out[plane == v] = (*rgb, a)
    return out


def _window(planes: list[np.ndarray]) -> tuple[float, float]:
    """Grey window from the (already read) planes: 0.5th-99.5th percentile of the non-zero finite values."""
    vals = np.concatenate([p[np.isfinite(p) & (p != 0)].ravel() for p in planes] or [np.zeros(1)])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Slice figures


class _Layer:
    """One thing drawn on every panel: a volume and how to draw it."""

    def __init__(self, vol, how: str, **kw):
        self.vol, self.how, self.kw = vol, how, kw


def _slice_figure(
    rows: list[tuple[str, list[_Layer]]],
    frame: _Frame,
    point_mm: np.ndarray,
    *,
    crop_mm: np.ndarray | None = None,
    mirror_line: bool = False,
    crosshair: bool = True,
    legend: list[tuple[str, Any]] | None = None,
    colorbar_row: int | None = None,
    panel_in: float = 3.7,
):
    """A figure of ``len(rows)`` x 3 panels (axial, coronal, sagittal) through ``point_mm``.

    ``crop_mm``: (3, 2) display-coordinate limits (a close-up); then each plane is read cropped to it.
    """
    from matplotlib.figure import Figure

    width = 3 * panel_in + (0.8 if colorbar_row is not None else 0.0)
    height = len(rows) * panel_in + (0.3 * math.ceil(len(legend) / max(1, int(width / 2.3))) + 0.2 if legend else 0.0)
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    pt = frame.of_world(point_mm)
    for r, (row_title, layers) in enumerate(rows):
        sf = subfigs[r]
        sf.suptitle(row_title, x=0.01, ha="left", fontsize=12, fontweight="bold")
        axes = sf.subplots(1, 3, squeeze=False)[0]
        # read every plane of the row first: the grey window is shared by the three planes
        planes = {}
        for li, layer in enumerate(layers):
            for normal in (2, 1, 0):
                vol = layer.vol
                idx = _index_of(vol, normal, point_mm)
                h, v = _PANEL_AXES[normal]
                crop = {}
                if crop_mm is not None:
                    for ax in (h, v):
                        c = frame.coords(affine_of(vol), ax, vol.shape[ax])
                        inside = np.nonzero((c >= crop_mm[ax, 0]) & (c <= crop_mm[ax, 1]))[0]
                        crop[ax] = (inside[0], inside[-1] + 1) if inside.size else (0, vol.shape[ax])
                lo_h, hi_h = crop.get(h, (0, vol.shape[h]))
                lo_v, hi_v = crop.get(v, (0, vol.shape[v]))
                data = _plane(vol, normal, idx, crop or None)
                planes[li, normal] = (data, idx, (lo_h, hi_h), (lo_v, hi_v))
        windows = {li: _window([planes[li, n][0] for n in (2, 1, 0)]) for li, l in enumerate(layers) if l.how == "grey"}
        for col, normal in enumerate((2, 1, 0)):
            ax = axes[col]
            h, v = _PANEL_AXES[normal]
            ax.set_facecolor("black")
            for li, layer in enumerate(layers):
                data, idx, (lo_h, hi_h), (lo_v, hi_v) = planes[li, normal]
                ch, h0, h1 = _extent(frame, layer.vol, h, lo_h, hi_h)
                cv, v0, v1 = _extent(frame, layer.vol, v, lo_v, hi_v)
                kw = dict(origin="lower", extent=(h0, h1, v0, v1), interpolation="nearest", aspect="equal")
                if layer.how == "grey":
                    ax.imshow(data.T, cmap="gray", vmin=windows[li][0], vmax=windows[li][1], **kw)
                elif layer.how == "field":
                    im = ax.imshow(
                        np.ma.masked_invalid(data.T.astype(np.float64)),
                        cmap=layer.kw.get("cmap", "RdBu_r"),
                        vmin=layer.kw["vmin"],
                        vmax=layer.kw["vmax"],
                        **kw,
                    )
                    if colorbar_row == r and col == 2:
                        cb = sf.colorbar(im, ax=list(axes), fraction=0.03, pad=0.01)
                        cb.set_label(layer.kw.get("label", ""))
                elif layer.how == "veil":
                    # hide what lies outside the brain: black where the mask is 0
                    veil = np.zeros(data.shape + (4,), np.float32)
                    veil[data == 0] = (0, 0, 0, 1)
                    ax.imshow(veil.transpose(1, 0, 2), **kw)
                elif layer.how == "labels":
                    rgba = _label_rgba(
                        data,
                        layer.kw.get("k", 0),
                        clusters=layer.kw.get("clusters", "lut"),
                        cluster_alpha=layer.kw.get("cluster_alpha", 1.0),
                        label_alpha=layer.kw.get("label_alpha", 1.0),
                    )
                    ax.imshow(rgba.transpose(1, 0, 2), **kw)
                elif layer.how == "contour":
                    if data.min() != data.max() and min(data.shape) > 1:
                        ax.contour(
                            ch,
                            cv,
                            (data != 0).T.astype(np.float32),
                            levels=[0.5],
                            colors=layer.kw.get("color", _MASK_COLOUR),
                            linewidths=layer.kw.get("lw", 1.0),
                        )
                if li == 0:
                    ax.set_xlim(h0, h1)
                    ax.set_ylim(v0, v1)
                    pos = frame.coords(affine_of(layer.vol), normal, layer.vol.shape[normal])[idx]
                    where = (
                        f"{'xyz'[normal]} = {pos:.1f} mm"
                        if frame.aligned
                        else f"voxel axis {'ijk'[normal]}: {pos:.1f} mm"
                    )
                    ax.set_title(f"{_PLANES[normal]}, {where}", fontsize=10)
            if crosshair:
                ax.axvline(pt[h], color="#ffe14d", lw=0.7, alpha=0.6, ls=":")
                ax.axhline(pt[v], color="#ffe14d", lw=0.7, alpha=0.6, ls=":")
            if mirror_line and h == 0 and frame.aligned:
                ax.axvline(0.0, color=_MIRROR_COLOUR, lw=1.6, ls="--")
            ax.set_xlabel(frame.label(h), fontsize=8)
            ax.set_ylabel(frame.label(v), fontsize=8)
            ax.tick_params(labelsize=7)
    if legend:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = []
        for _text, colour in legend:
            if isinstance(colour, tuple) and colour and colour[0] == "line":
                handles.append(Line2D([0], [0], color=colour[1], lw=2, ls=colour[2]))
            else:
                handles.append(Patch(facecolor=colour, edgecolor="black", lw=0.5))
        # as many columns as fit in the figure's width (a legend wider than the figure would be cut off)
        ncol = max(1, min(len(legend), int(fig.get_figwidth() / 2.3)))
        fig.legend(handles, [t for t, _ in legend], loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    return fig


def _label_legend(
    codes: list[int], k: int = 0, clusters: str | None = None, *, both_sides: bool = False
) -> list[tuple[str, Any]]:
    def text(c):
        if both_sides and c in SIDE_CODES["L"]:
            return f"{_SHORT[c][2:]} ({c} L / {c + RIGHT_OFFSET} R)"
        return f"{c} {_SHORT[c]}"

    items = [(text(c), tuple(x / 255 for x in COLOURS[c][:3])) for c in codes if c in COLOURS]
    if clusters == "overlay" and k:
        items += [
            (
                f"cluster {j}" + (" (darkest)" if j == 1 else " (brightest)" if j == k else ""),
                _overlay_cluster_rgb(j, k),
            )
            for j in range(1, k + 1)
        ]
    elif clusters == "lut" and k:
        items += [
            (
                f"cluster {j}" + (" (darkest)" if j == 1 else " (brightest)"),
                tuple(x / 255 for x in cluster_colour(j, k)[:3]),
            )
            for j in (1, k)
        ]
    return items


# ----------------------------------------------------------------------------------------------------------------
# Histogram


def _histogram_figure(
    edges: np.ndarray,
    counts: np.ndarray,
    centroids: np.ndarray | None,
    k: int,
    thresholds: np.ndarray | None,
    source: str,
):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 4.2), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    centres = 0.5 * (edges[:-1] + edges[1:])
    # log scale: the small classes (CSF, bright vessels...) matter as much as the big white-matter peak
    ax.fill_between(centres, np.maximum(counts, 0.5), 0.5, step="mid", color="#b8c2cc", lw=0)
    ax.step(centres, np.maximum(counts, 0.5), where="mid", color="#3d4852", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(float(counts.max()) if counts.size else 1.0, 1.0) * 2.5)
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    if thresholds is not None:
        for i, t in enumerate(thresholds):
            ax.axvline(float(t), color="#444444", lw=0.9, ls=":", label="thresholds" if i == 0 else None)
    if centroids is not None:
        for j, c in enumerate(centroids, 1):
            col = _overlay_cluster_rgb(j, k)
            ax.axvline(float(c), color=col, lw=2.4, label=f"cluster {j}: centroid {c:.4g}")
            ax.text(
                float(c),
                1.01,
                str(j),
                color=col,
                ha="center",
                va="bottom",
                fontsize=11,
                fontweight="bold",
                transform=ax.get_xaxis_transform(),
            )
    ax.set_xlabel("intensity (preprocessed image, inside the brain mask)")
    ax.set_ylabel("voxels per bin (log)")
    ax.set_title(f"k = {k}; {source}" if k else source, fontsize=10, pad=18)
    if centroids is not None or thresholds is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return fig


def _histogram_from_volume(sub: _Subject, max_slice_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Fallback histogram (128 bins) of the preprocessed image inside the mask, at a coarse level (chunked)."""
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


# ----------------------------------------------------------------------------------------------------------------
# The report


def _png(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _ks_present(sub: _Subject, kmeans_json: dict | None) -> list[int]:
    ks = set()
    if kmeans_json and isinstance(kmeans_json.get("results"), dict):
        ks |= {int(k) for k in kmeans_json["results"]}
    if sub.store.is_dir():
        for p in sub.store.iterdir():
            for prefix in ("kmeans_k", "hemi_k", "label_map_k"):
                if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit() and sub.has(p.name):
                    ks.add(int(p.name[len(prefix) :]))
    return sorted(ks)


def _fmt_mm(v) -> str:
    return " x ".join(f"{x:.3g}" for x in np.ravel(v))


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
        hypothalamus from the finest level where its crop fits).

    Returns
    -------
    pathlib.Path
        The report. Also written: ``qc/*.png``, ``qc/label_volumes.csv``, ``qc/qc.json``.

    Memory: only single voxel planes, per-axis projections and label counts are ever computed (see the module
    docstring); the result is a few MB of PNG whatever the size of the scan.

    Example
    -------
    >>> write_qc_report("OUT/subject01", k=6)        # doctest: +SKIP
    PosixPath('OUT/subject01/qc/report.html')
    """
    subject_dir = Path(subject_dir)
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
    qc_dir = subject_dir / "qc"
    qc_dir.mkdir(exist_ok=True)
    run = sub.json("run.json")
    km_json = sub.json("kmeans.json")
    tr_json = sub.json("transform.json")
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
    k = None if k is None else int(k)
    subject = (run or {}).get("subject") or subject_dir.name

    def have(name: str) -> bool:
        return (sub.dir / name).exists() if name.endswith(".json") else sub.has(name)

    def need(*names: str) -> bool:
        return all(have(n) for n in names)

    # what a full run makes, in pipeline order; listed on the page when absent, with the stage that makes it
    kk = "*" if k is None else str(k)
    missing: list[tuple[str, str]] = []
    for n in (
        "run.json",
        "scan_raw",
        "labels_raw",
        "mask_ras",
        "image_ws",
        "mask",
        "hypothalamus",
        "bias",
        "preprocessed",
        "kmeans.json",
        f"kmeans_k{kk}",
        "closed_labels",
        f"hemi_k{kk}",
        f"label_map_k{kk}",
        "transform.json",
    ):
        if not have(n):
            base = n.split("_k")[0] if n.startswith(("kmeans_k", "hemi_k", "label_map_k")) else n
            stage, until = PRODUCER[base]
            missing.append(
                (
                    n,
                    "written when a run finishes (was the run interrupted?)"
                    if n == "run.json"
                    else f"made by the {stage} stage (helm-dask run --until {until} or later)",
                )
            )

    figures: list[dict] = []

    def add_figure(name: str, title: str, caption: str, fig) -> None:
        data = _png(fig, qc_dir / f"{name}.png")
        figures.append({"name": name, "title": title, "caption": caption, "png": data})

    def skip_figure(title: str, names: list[str]) -> None:
        figures.append(
            {"name": None, "title": title, "caption": "Not available: missing " + ", ".join(names) + ".", "png": None}
        )

    # -- where to cut: the hypothalamus ----------------------------------------------------------------------
    hyp = hypothalamus_box(sub, "hypothalamus", max_slice_px=max_slice_px) if need("hypothalamus") else None

    # -- 1. raw scan + brain-mask outline -------------------------------------------------------------------
    title = "Raw scan with the brain-mask outline"
    if need("scan_raw"):
        from .orient import to_ras

        raw = to_ras(sub.open("scan_raw", choose_level(sub.path("scan_raw"), max_slice_px)))
        point = None
        if sub.has("labels_raw"):
            b = hypothalamus_box(sub, "labels_raw", max_slice_px=max_slice_px)
            point = None if b is None else b["centroid_mm"]
        if point is None:
            point = voxel_to_world(affine_of(raw), (np.array(raw.shape[:3]) - 1)[None] / 2.0)[0]
        layers = [_Layer(raw, "grey")]
        if need("mask_ras"):
            layers.append(_Layer(sub.open("mask_ras", choose_level(sub.path("mask_ras"), max_slice_px)), "contour"))
        frame = _Frame(affine_of(raw))
        fig = _slice_figure(
            [("raw scan", layers)],
            frame,
            point,
            legend=[("brain mask outline", ("line", _MASK_COLOUR, "-"))] if len(layers) > 1 else None,
        )
        a_raw = affine_of(sub.open("scan_raw"))
        note = (
            f"The scan's grid is oblique (up to {frame.obliquity_deg():.1f}\u00b0 from the world axes): these "
            "are voxel planes, in mm from the first voxel, reordered to the closest RAS+ axes without "
            "interpolation."
            if not frame.aligned
            else "World coordinates (RAS+, mm)."
        )
        add_figure(
            "raw_scan",
            title,
            f"Original scan ({orientation_code(a_raw)}, voxel {_fmt_mm(spacing_of(a_raw))} mm, "
            f"pyramid level {raw.attrs.get('level', 0)}) through the centroid of the manual hypothalamus "
            f"labels (dotted cross). Cyan: outline of the brain mask (background stage). {note}",
            fig,
        )
    else:
        skip_figure(title, ["scan_raw"])

    # the working grid (hypothalamus, bias, preprocessed, k-means, merged labels)
    ws_point = None if hyp is None else hyp["centroid_mm"]

    def ws_open(name: str):
        return sub.open(name, choose_level(sub.path(name), max_slice_px))

    def ws_centre(vol):
        return voxel_to_world(affine_of(vol), (np.array(vol.shape[:3]) - 1)[None] / 2.0)[0]

    def ws_note(frame: _Frame) -> str:
        if frame.aligned:
            return "World coordinates (RAS+, mm)."
        return (
            f"The working grid keeps the scan's directions (oblique by up to {frame.obliquity_deg():.1f}\u00b0): "
            "voxel planes, in mm from the first voxel."
        )

    # -- 2. bias field ------------------------------------------------------------------------------------------
    title = "Bias-field correction"
    if need("bias", "image_ws", "mask"):
        img, bias, msk = ws_open("image_ws"), ws_open("bias"), ws_open("mask")
        point = ws_point if ws_point is not None else ws_centre(img)
        frame = _Frame(affine_of(img))
        # field colour range from the planes inside the mask, symmetric about 1 (a multiplicative field)
        bplanes = [_plane(bias, n, _index_of(bias, n, point)) for n in (2, 1, 0)]
        mplanes = [_plane(msk, n, _index_of(msk, n, point)) for n in (2, 1, 0)]
        vals = np.concatenate([b[m != 0] for b, m in zip(bplanes, mplanes) if b.shape == m.shape] or [np.ones(1)])
        dev = float(np.max(np.abs(vals - 1.0))) if vals.size else 0.1
        dev = max(dev, 0.01)
        rows = [
            ("input (resampled)", [_Layer(img, "grey"), _Layer(msk, "contour")]),
            (
                "bias field",
                [
                    _Layer(bias, "field", vmin=1 - dev, vmax=1 + dev, cmap="RdBu_r", label="bias (multiplicative)"),
                    _Layer(msk, "veil"),
                    _Layer(msk, "contour"),
                ],
            ),
        ]
        fig = _slice_figure(rows, frame, point, colorbar_row=1)
        add_figure(
            "bias_field",
            title,
            f"Top: the masked, resampled image before correction. Bottom: the fitted multiplicative bias "
            f"field inside the brain mask (range {1 - dev:.3f}\u2013{1 + dev:.3f} on these planes; the "
            f"corrected image is the input divided by it). {ws_note(frame)}",
            fig,
        )
    else:
        skip_figure(title, [n for n in ("bias", "image_ws", "mask") if not sub.has(n)])

    # -- 3. preprocessed + k-means + merged labels --------------------------------------------------------------
    title = "Preprocessed image, k-means map and merged labels"
    if need("preprocessed"):
        pre = ws_open("preprocessed")
        point = ws_point if ws_point is not None else ws_centre(pre)
        frame = _Frame(affine_of(pre))
        rows = [
            ("preprocessed", [_Layer(pre, "grey")] + ([_Layer(ws_open("mask"), "contour")] if sub.has("mask") else []))
        ]
        captions = [
            "Row 1: the preprocessed image (bias-corrected, masked)"
            + (" with the brain-mask outline (cyan)" if sub.has("mask") else "")
            + "."
        ]
        legend = []
        if k is not None and need(f"kmeans_k{k}"):
            rows.append(
                (
                    f"k-means, k = {k}",
                    [
                        _Layer(pre, "grey"),
                        _Layer(ws_open(f"kmeans_k{k}"), "labels", k=k, clusters="overlay", cluster_alpha=0.8),
                    ],
                )
            )
            captions.append(
                f"Row {len(rows)}: the k-means map (k = {k}) over the image (80 % opaque), clusters "
                "numbered by intensity, coloured from dark violet (cluster 1, darkest tissue) to "
                "yellow-green (brightest)."
            )
            legend += _label_legend([], k, "overlay")
        if k is not None and need(f"hemi_k{k}"):
            rows.append(
                (
                    "merged labels",
                    [
                        _Layer(pre, "grey"),
                        _Layer(ws_open(f"hemi_k{k}"), "labels", k=k, clusters="none", label_alpha=0.9),
                    ],
                )
            )
            captions.append(
                f"Row {len(rows)}: the labels the merge put over the k-means map (manual "
                "hypothalamus labels and fornix after the closing) in their FreeSurfer colours."
            )
            legend = _label_legend([*SIDE_CODES["L"], FORNIX]) + legend
        fig = _slice_figure(rows, frame, point, legend=legend or None)
        add_figure(
            "segmentation",
            title,
            " ".join(captions) + f" Planes through the hypothalamus centroid. {ws_note(frame)}",
            fig,
        )
    else:
        skip_figure(title, ["preprocessed"])

    # -- 4. close-up of the hypothalamus --------------------------------------------------------------------------
    title = "Close-up of the hypothalamus"
    lab_name = "closed_labels" if sub.has("closed_labels") else "hypothalamus"
    if hyp is not None and sub.has("preprocessed"):
        margin_mm = 5.0
        a0 = affine_of(sub.open("preprocessed"))
        sp0 = spacing_of(a0)
        box = np.array(hyp["box"], dtype=np.float64)
        box[:, 0] -= margin_mm / sp0
        box[:, 1] += margin_mm / sp0
        # the finest level whose crop fits in max_slice_px
        path = sub.path("preprocessed")
        nlev = int(read_meta(path).get("nlevels", 1))
        lev = next((L for L in range(nlev) if max(box[:, 1] - box[:, 0]) / 2**L <= max_slice_px), nlev - 1)
        pre_c = sub.open("preprocessed", lev)
        lab_lev = min(lev, int(read_meta(sub.path(lab_name)).get("nlevels", 1)) - 1)
        labs = sub.open(lab_name, lab_lev)
        frame = _Frame(affine_of(pre_c))
        corners = voxel_to_world(
            a0, np.array([[box[0, i], box[1, j], box[2, m]] for i in (0, 1) for j in (0, 1) for m in (0, 1)])
        )
        disp = np.array([frame.of_world(c) for c in corners])
        crop_mm = np.stack([disp.min(axis=0), disp.max(axis=0)], axis=1)
        rows = [
            ("preprocessed", [_Layer(pre_c, "grey")]),
            ("labels", [_Layer(pre_c, "grey"), _Layer(labs, "labels", k=0, clusters="none", label_alpha=0.75)]),
        ]
        fig = _slice_figure(
            rows,
            frame,
            hyp["centroid_mm"],
            crop_mm=crop_mm,
            crosshair=False,
            legend=_label_legend([*SIDE_CODES["L"], FORNIX]),
        )
        what = "after the closing (merge stage)" if lab_name == "closed_labels" else "as drawn (resampled)"
        add_figure(
            "hypothalamus_closeup",
            title,
            f"The hypothalamus and {margin_mm:g} mm around it at pyramid level {lev} (full working "
            f"resolution at level 0): the image alone, and with the manual labels {what} in their "
            f"FreeSurfer colours. {ws_note(frame)}",
            fig,
        )
    else:
        skip_figure(title, ["hypothalamus labels" if hyp is None else "preprocessed"])

    # -- 5. whole-brain label map with the mirror plane ------------------------------------------------------------
    title = "Whole-brain label map and mirror plane"
    if k is not None and need(f"label_map_k{k}"):
        lm = ws_open(f"label_map_k{k}")
        b = hypothalamus_box(sub, f"label_map_k{k}", max_slice_px=max_slice_px, select=_left_hypothalamus)
        point = ws_centre(lm) if b is None else b["centroid_mm"]
        frame = _Frame(affine_of(lm))
        fig = _slice_figure(
            [(f"label map, k = {k}", [_Layer(lm, "labels", k=k, clusters="lut")])],
            frame,
            point,
            mirror_line=True,
            legend=_label_legend([*SIDE_CODES["L"], FORNIX], k, "lut", both_sides=True)
            + [("mirror plane x = 0", ("line", _MIRROR_COLOUR, "--"))],
        )
        tr = (tr_json or {}).get("transform", {})
        extra = ""
        if tr:
            extra = (
                f" Mirror fit: {100 * float(tr.get('fraction_across', float('nan'))):.3f} % of the mask across "
                f"the plane, median gap {float(tr.get('gap_mm', float('nan'))):.2f} mm."
            )
        add_figure(
            "label_map",
            title,
            f"The whole-brain map (k = {k}) in its axis-aligned RAS+ grid (world mm): clusters in the grey "
            f"ramp of lut.txt, hypothalamus (801\u2013805 left, 806\u2013810 right) and fornix in FreeSurfer "
            f"colours. Dashed magenta: the mirror plane x = 0; planes through the left hypothalamus." + extra,
            fig,
        )
    elif k is not None:
        skip_figure(title, [f"label_map_k{k}"])
    else:
        skip_figure(title, ["k-means results"])

    # -- 6. histogram ---------------------------------------------------------------------------------------------
    title = "Intensity histogram and k-means centroids"
    res = (km_json or {}).get("results", {}).get(str(k)) if k is not None else None
    hist = (res or {}).get("extra", {}).get("histogram") if res else None
    edges = counts = None
    source = ""
    hist_info = None
    if hist and "edges" in hist and "counts" in hist:
        edges, counts = np.asarray(hist["edges"], dtype=np.float64), np.asarray(hist["counts"], dtype=np.float64)
        source = "histogram stored by the k-means stage"
    elif sub.has("preprocessed") and sub.has("mask"):
        edges, counts = _histogram_from_volume(sub, max_slice_px)
        source = "histogram of a coarse pyramid level"
    if edges is not None:
        hist_info = {"source": source, "edges": edges.tolist(), "counts": counts.tolist()}
        cents = np.asarray(res["centroids"], dtype=np.float64) if res else None
        thr = res.get("extra", {}).get("thresholds") if res else None
        fig = _histogram_figure(
            edges,
            counts.astype(np.float64),
            cents,
            k or 0,
            None if thr is None else np.asarray(thr, dtype=np.float64),
            source,
        )
        cap = "Intensities of the preprocessed image inside the brain mask. " + (
            f"Solid lines: the {k} k-means centroids (numbered as the clusters, colours as in the "
            "overlay); dotted: the decision thresholds between clusters."
            if res
            else "No k-means result yet: no centroids."
        )
        add_figure("histogram", title, cap, fig)
    else:
        skip_figure(title, ["kmeans.json", "preprocessed"])

    # -- label volumes ---------------------------------------------------------------------------------------------
    volumes = {}
    vox_mm3 = None
    for name in ("hypothalamus", "closed_labels"):
        if sub.has(name):
            vol = sub.open(name)
            vox_mm3 = float(abs(np.linalg.det(affine_of(vol)[:3, :3])))
            volumes[name] = label_volumes_mm3(vol)
    codes = sorted(set().union(*[set(v) for v in volumes.values()]) if volumes else set())
    vol_rows = [
        {
            "code": c,
            "name": HYPOTHALAMUS.get(c, FORNIX_NAME if c == FORNIX else f"label_{c}"),
            "short": _SHORT.get(c, f"label {c}"),
            "manual_mm3": volumes.get("hypothalamus", {}).get(c, 0.0) if "hypothalamus" in volumes else None,
            "closed_mm3": volumes.get("closed_labels", {}).get(c, 0.0) if "closed_labels" in volumes else None,
        }
        for c in codes
    ]
    with open(qc_dir / "label_volumes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["code", "name", "manual_mm3", "after_closing_mm3"])
        for r in vol_rows:
            w.writerow(
                [
                    r["code"],
                    r["name"],
                    "" if r["manual_mm3"] is None else f"{r['manual_mm3']:.6g}",
                    "" if r["closed_mm3"] is None else f"{r['closed_mm3']:.6g}",
                ]
            )

    # -- k-means vs a reference tissue map (only with run --reference-tissue) -------------------------------------
    agreement = _reference_agreement(sub, run, ks, qc_dir)

    # -- facts -------------------------------------------------------------------------------------------------------
    facts = _facts(sub, run, km_json, tr_json, k, ks)
    summary = {
        "subject": subject,
        "k": k,
        "ks": ks,
        "facts": facts,
        "missing": [m for m, _ in missing],
        "histogram": hist_info,
        "figures": [f["name"] for f in figures if f["name"]],
        "label_volumes_mm3": vol_rows,
        "voxel_mm3": vox_mm3,
    }
    if agreement is not None:
        summary["kmeans_agreement"] = agreement
    write_text_atomic(qc_dir / "qc.json", json.dumps(summary, indent=2, default=str))
    page = _html(subject, facts, figures, vol_rows, missing, k, vox_mm3)
    if agreement is not None:
        page = _with_agreement_section(page, agreement)
    out = qc_dir / "report.html"
    # a unique temporary (two runs of one subject at once must not rename each other's), removed on failure
    write_text_atomic(out, page)
    return out


def _facts(
    sub: _Subject, run: dict | None, km_json: dict | None, tr_json: dict | None, k: int | None, ks: list[int]
) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    run = run or {}
    side = run.get("side") or {}
    if side:
        used, given = side.get("used", "?"), side.get("given", "?")
        facts.append(
            (
                "Hemisphere",
                f"{'left' if used == 'L' else 'right' if used == 'R' else used} ({used}); "
                f"--side {given}" + ("" if side.get("confident", True) else " (NOT confident)"),
            )
        )
        if side.get("reason"):
            facts.append(("Side decision", str(side["reason"])))
    if sub.has("scan_raw"):
        a = affine_of(sub.open("scan_raw"))
        facts.append(
            (
                "Scan",
                f"{' x '.join(map(str, sub.open('scan_raw').shape[:3]))} voxels, "
                f"{_fmt_mm(spacing_of(a))} mm, {orientation_code(a)}"
                + ("" if is_axis_aligned(a) else f", oblique ({_Frame(a).obliquity_deg():.1f}\u00b0)"),
            )
        )
    if sub.has("hypothalamus"):
        v = sub.open("hypothalamus")
        flipped = (run.get("side") or {}).get("used") == "R"
        facts.append(
            (
                "Working grid",
                f"{' x '.join(map(str, v.shape[:3]))} voxels, "
                f"{_fmt_mm(spacing_of(affine_of(v)))} mm"
                + (
                    "; the right hemisphere is mirrored to a left one (codes 806-810 -> 801-805) for "
                    "processing, as in the working-grid figures"
                    if flipped
                    else ""
                ),
            )
        )
    if run.get("mask_mm3") is not None:
        facts.append(("Brain mask", f"{float(run['mask_mm3']) / 1000:.1f} cm\u00b3"))
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
    stages = run.get("stages") or {}
    if stages:
        facts.append(
            (
                "Stage times",
                ", ".join(
                    f"{n} {float(s.get('seconds', 0)):.1f} s" + (" (reused)" if s.get("status") == "skipped" else "")
                    for n, s in stages.items()
                )
                + (f"; total {float(run['seconds']):.1f} s" if run.get("seconds") is not None else ""),
            )
        )
    params = run.get("params") or {}
    if params:
        facts.append(
            (
                "Run",
                f"--until {params.get('until', '?')}, --spacing {params.get('spacing', '?')}, "
                f"ks {params.get('ks', '?')}",
            )
        )
    from . import __version__

    facts.append(("Report", f"helm-dask {__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}"))
    return facts


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;
color:#1d2630;background:#fff}
h1{font-size:24px;margin:4px 0 12px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #d5dbe1;
padding-bottom:3px}
table{border-collapse:collapse;font-size:14px}td,th{padding:3px 10px;border-bottom:1px solid #e3e7eb;
text-align:left;vertical-align:top}th{background:#f1f4f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.facts td:first-child{font-weight:600;white-space:nowrap}
.missing{background:#fff6e0;border:1px solid #f0c36d;padding:8px 12px;border-radius:4px;margin:12px 0}
.na{color:#8a6d3b;font-style:italic}
figure{margin:8px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #e3e7eb}
figcaption{font-size:13px;color:#3d4852;max-width:1100px;margin-top:4px}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #555;vertical-align:middle;margin-right:6px}
nav a{margin-right:14px;font-size:14px}
"""

# Reports whether every figure decoded (read by the headless-browser test; harmless for a reader).
_JS = """window.addEventListener('load',function(){var im=document.images,bad=0;
for(var i=0;i<im.length;i++){if(!(im[i].complete&&im[i].naturalWidth>0))bad++;}
document.body.setAttribute('data-images-total',im.length);document.body.setAttribute('data-images-broken',bad);});"""


def _html(subject: str, facts, figures, vol_rows, missing, k, vox_mm3) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>helm-dask QC \u2013 {e(subject)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_JS}</script>",
        "</head><body>",
        f"<h1>helm-dask QC report \u2013 {e(subject)}</h1>",
    ]
    nav = [f'<a href="#{f["name"]}">{e(f["title"])}</a>' for f in figures if f["name"]]
    parts.append("<nav>" + "".join(nav) + '<a href="#volumes">Label volumes</a></nav>')
    if missing:
        parts.append(
            '<div class="missing" id="missing"><b>Missing outputs</b> (the report shows what exists):<ul>'
            + "".join(f"<li><code>{e(n)}</code> \u2013 {e(why)}</li>" for n, why in missing)
            + "</ul></div>"
        )
    parts.append(
        '<h2 id="facts">Facts</h2><table class="facts">'
        + "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td></tr>" for a, b in facts)
        + "</table>"
    )
    for f in figures:
        anchor = f' id="{f["name"]}"' if f["name"] else ""
        parts.append(f"<h2{anchor}>{e(f['title'])}</h2>")
        if f["png"] is None:
            parts.append(f'<p class="na">{e(f["caption"])}</p>')
            continue
        b64 = base64.b64encode(f["png"]).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(f["title"])}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{e(f['caption'])} <i>(also qc/{e(f['name'])}.png)</i></figcaption></figure>"
        )
    parts.append('<h2 id="volumes">Label volumes</h2>')
    if vol_rows:
        have_m = any(r["manual_mm3"] is not None for r in vol_rows)
        have_c = any(r["closed_mm3"] is not None for r in vol_rows)
        head = "<tr><th>code</th><th>label</th><th>FreeSurfer name</th>"
        head += "<th>manual (mm\u00b3)</th>" if have_m else ""
        head += "<th>after closing (mm\u00b3)</th>" if have_c else ""
        rows = []
        for r in vol_rows:
            c = r["code"]
            rgb = COLOURS.get(c, (255, 255, 255, 0))[:3]
            cells = (
                f'<td class="num">{c}</td><td><span class="sw" style="background:rgb{tuple(rgb)}"></span>'
                f"{e(r['short'])}</td><td>{e(r['name'])}</td>"
            )
            attrs = f'data-code="{c}"'
            if have_m:
                cells += f'<td class="num">{r["manual_mm3"]:.1f}</td>'
                attrs += f' data-manual-mm3="{r["manual_mm3"]!r}"'
            if have_c:
                cells += f'<td class="num">{r["closed_mm3"]:.1f}</td>'
                attrs += f' data-closed-mm3="{r["closed_mm3"]!r}"'
            rows.append(f"<tr {attrs}>{cells}</tr>")
        tot = "<tr><th></th><th>total</th><th></th>"
        if have_m:
            tot += f'<th class="num">{sum(r["manual_mm3"] or 0 for r in vol_rows):.1f}</th>'
        if have_c:
            tot += f'<th class="num">{sum(r["closed_mm3"] or 0 for r in vol_rows):.1f}</th>'
        parts.append(f'<table id="volume-table">{head}</tr>{"".join(rows)}{tot}</tr></table>')
        parts.append(
            f'<p style="font-size:13px">At the working resolution (voxel {vox_mm3:.4g} mm\u00b3); '
            "also in qc/label_volumes.csv.</p>"
        )
    else:
        parts.append('<p class="na">Not available: no hypothalamus labels on the working grid yet.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# k-means vs a reference tissue map (``helm-dask run --reference-tissue FILE``; nothing of this without it)

_AGREEMENT_TITLE = "k-means vs reference tissue"


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

    from .io.convert import nifti_to_zarr
    from .metrics import TISSUE_CLASS_NAMES, kmeans_agreement_many, reference_on_grid

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


def _fmt_num(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "\u2013"
    return "\u2013" if math.isnan(f) else f"{f:.{digits}f}"


def _agreement_html(info: dict) -> str:
    e = html.escape
    parts = [f'<h2 id="kmeans-agreement">{e(_AGREEMENT_TITLE)}</h2>']
    if info.get("error"):
        return parts[0] + f'<p class="na">Not available: {e(str(info["error"]))}</p>'
    ks = sorted(info.get("ks", {}), key=int)
    classes = sorted({int(c) for k in ks for c in info["ks"][k].get("dice", {})})
    names = info.get("class_names", {})
    head = (
        "<tr><th>k</th><th>ARI</th>"
        + "".join(f"<th>Dice {e(names.get(str(c), f'class {c}'))} ({c})</th>" for c in classes)
        + "</tr>"
    )
    rows = []
    for k in ks:
        r = info["ks"][k]
        dice = {int(c): d for c, d in r.get("dice", {}).items()}
        cells = f'<td class="num">{e(k)}</td><td class="num" data-ari="{r.get("ari")!r}">{_fmt_num(r.get("ari"))}</td>'
        for c in classes:
            d = dice.get(c)
            cells += (
                '<td class="num">\u2013</td>'
                if d is None
                else f'<td class="num">{_fmt_num(d["dice"])} (cluster {e(str(d["cluster"]))})</td>'
            )
        rows.append(f'<tr data-k="{e(k)}">{cells}</tr>')
    r0 = info["ks"][ks[0]] if ks else {}
    exc = r0.get("excluded") or {}
    parts.append(f'<table id="kmeans-agreement-table">{head}{"".join(rows)}</table>')
    parts.append(
        '<p style="font-size:13px">Reference: <code>' + e(info.get("reference", "")) + "</code>, put on the "
        "working grid by majority vote. Adjusted Rand index of the clusters vs the reference classes, and "
        "per class the Dice of its best-matching single cluster, over the "
        f"{int(r0.get('voxels', 0)):,} voxels where both maps are non-zero (left out: "
        f"{int(exc.get('kmeans_only', 0)):,} in the k-means map only, {int(exc.get('tissue_only', 0)):,} "
        "in the reference only). Also in qc/kmeans_agreement.json and run.json.</p>"
    )
    return "\n".join(parts)


def _with_agreement_section(page: str, info: dict) -> str:
    """The page with the agreement table before the label volumes (and a link to it)."""
    page = page.replace(
        '<a href="#volumes">Label volumes</a></nav>',
        f'<a href="#kmeans-agreement">{html.escape(_AGREEMENT_TITLE)}</a><a href="#volumes">Label volumes</a></nav>',
        1,
    )
    return page.replace('<h2 id="volumes">', _agreement_html(info) + '\n<h2 id="volumes">', 1)
