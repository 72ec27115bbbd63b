"""The anatomical check of the fitted mirror plane (:func:`check_hypothalamus_plane`): the hypothalamus is a
midline structure, so its labels must lie on the plane; one chunked pass measures their centroid's distance
from it and refuses inputs that do not belong together (see ``docs/method/mirror.md``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import HelmError
from ..labels import HYPOTHALAMUS
from ..volume import affine_of
from .passes import _as_dask, _run
from .transform import MirrorTransform

__all__ = ["check_hypothalamus_plane"]

_HYPOTHALAMUS_CODES = tuple(HYPOTHALAMUS)  # FreeSurfer's subunits, both sides (the fornix is left out)
_DIST_BIN_MM = 0.01  # bin of the |distance| histogram (the percentile's resolution)


def _plane_block(
    block: np.ndarray, offset: tuple[int, int, int], codes: tuple | None, w: np.ndarray, b: float
) -> tuple:
    """[count, exact index sums, min/max signed distance, |distance| histogram] of the selected voxels."""
    blk = np.asarray(block)
    if not blk.any():  # most chunks: labels are small
        return (0, (0, 0, 0), math.inf, -math.inf, np.zeros(0, np.int64))
    sel = (blk != 0) if codes is None else np.isin(blk, codes)
    flat = np.flatnonzero(sel)
    if flat.size == 0:
        return (0, (0, 0, 0), math.inf, -math.inf, np.zeros(0, np.int64))
    loc = np.unravel_index(flat, sel.shape)
    g = [loc[d].astype(np.int64) + offset[d] for d in range(3)]
    # signed distance from the plane (world x after T) of the selected voxels only: labels are sparse
    d = ((b + w[0] * g[0]) + w[1] * g[1]) + w[2] * g[2]
    hist = np.bincount(np.ceil(np.abs(d) / _DIST_BIN_MM).astype(np.int64))  # bin i: |d| in ((i-1)w, iw]
    return (int(flat.size), tuple(int(gd.sum(dtype=np.int64)) for gd in g), float(d.min()), float(d.max()), hist)


def _plane_combine(*parts: tuple) -> tuple:
    size = max(p[4].size for p in parts)
    hist = np.zeros(size, np.int64)
    for p in parts:
        hist[: p[4].size] += p[4]
    return (
        sum(p[0] for p in parts),
        tuple(sum(p[1][d] for p in parts) for d in range(3)),
        min(p[2] for p in parts),
        max(p[3] for p in parts),
        hist,
    )


def _plane_stats(data: da.Array, codes: Sequence[int] | None, w: np.ndarray, b: float) -> tuple[tuple, Any]:
    """One pass over the labels (a second one over every nonzero voxel when the default codes are absent).

    Returns the combined :func:`_plane_block` numbers and what was measured (``"801-810"``, the codes given,
    or ``"nonzero"``).
    """
    use = tuple(int(c) for c in (_HYPOTHALAMUS_CODES if codes is None else codes))
    stats = _run(data, _plane_block, _plane_combine, use, w, b)
    used: Any = "801-810" if codes is None else list(use)
    if stats[0] == 0 and codes is None:  # e.g. another numbering: every label
        stats = _run(data, _plane_block, _plane_combine, None, w, b)
        used = "nonzero"
    return stats, used


def _refuse_off_plane(dist: float, p90: float, limit: float, src: Any) -> None:
    """The error for hypothalamus labels whose centroid lies ``dist`` mm from the plane (beyond ``limit``)."""
    raise HelmError(
        f"the hypothalamus labels lie {abs(dist):.1f} mm from the fitted mirror plane (centroid; 90% of "
        f"their voxels within {p90:.1f} mm; at most {limit:g} mm expected, the hypothalamus is a midline "
        "structure): the labels may come from another scan or subject, the header (affine) may not match "
        "the anatomy, or the brain mask may be wrong",
        path=src,
        hint="check that the labels were drawn on this scan, that the scan's header matches the anatomy, "
        "and the brain mask (mask.nii.gz)",
    )


def check_hypothalamus_plane(
    transform: MirrorTransform,
    hypothalamus_volume: xr.DataArray,
    *,
    max_distance_mm: float = 15.0,
    codes: Sequence[int] | None = None,
    path: str | os.PathLike | None = None,
) -> dict:
    """Check that the hypothalamus labels lie on the fitted mirror plane (it is a midline structure).

    The hypothalamus lines the third ventricle, so in a hemisphere it sits on the medial face, which the fit
    puts on the plane ``x = 0`` (after ``T``). Its labels' centroid far from that plane means the inputs do
    not belong together: labels from another scan or subject, a header (affine) that does not match the
    anatomy (then the labels were placed wrongly relative to the mask), or a wrong brain mask (then the plane
    is). A HELM phantom's hypothalamus centroid lies about 2 mm from its medial plane.

    Computed eagerly in one chunked pass (each task holds one chunk and returns a few numbers and a histogram
    of the distances in 0.01 mm bins): exact integer index sums for the centroid, so the result does not
    depend on the chunking.

    Parameters
    ----------
    transform : MirrorTransform
        The fitted (or read) mirroring transform, world -> world.
    hypothalamus_volume : volume
        The labels on any grid (world coordinates are used).
    max_distance_mm : float
        Largest accepted distance of the labels' centroid from the plane.
    codes : sequence of int, optional
        The labels that make the hypothalamus; default its subunits 801-810 (the fornix is not midline),
        falling back to every nonzero voxel when none of those is present.
    path : str, optional
        Named in the error (default: the volume's ``source``).

    Returns
    -------
    dict
        ``centroid_mm`` (world), ``centroid_distance_mm`` (signed: > 0 across the plane, < 0 on the
        hemisphere's side), ``p90_distance_mm`` (90th percentile of the voxels' absolute distances, rounded
        up to 0.01 mm), ``min_distance_mm`` / ``max_distance_mm`` (signed extremes), ``n_voxels``, ``codes``
        (``"801-810"``, the codes given, or ``"nonzero"``), ``limit_mm`` and ``ok`` (always True: a failure
        raises).

    Raises
    ------
    HelmError
        When the centroid is farther than ``max_distance_mm`` from the plane, or the volume holds no label.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((10, 4, 4), np.uint16); lab[8:10, 1:3, 1:3] = 801        # on the face x = 9
    >>> shift = np.eye(4); shift[0, 3] = -9.0
    >>> t = MirrorTransform(shift, (0, 0, 0), (-9, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)
    >>> r = check_hypothalamus_plane(t, make_volume(da.from_array(lab, chunks=5), np.eye(4), kind="labels"))
    >>> r["centroid_distance_mm"], r["p90_distance_mm"]
    (-0.5, 1.0)
    """
    data = _as_dask(hypothalamus_volume, "the hypothalamus labels")
    src = path if path is not None else (hypothalamus_volume.attrs.get("source") or None)
    limit = float(max_distance_mm)
    if not (limit > 0 and math.isfinite(limit)):
        raise HelmError(f"max_distance_mm must be a positive number, got {max_distance_mm!r}")
    aff = affine_of(hypothalamus_volume)
    row = np.asarray(transform.matrix, dtype=np.float64)[0]
    w = row[:3] @ aff[:3, :3]  # voxel index -> world x after T
    b = float(row[:3] @ aff[:3, 3] + row[3])
    (count, sums, dmin, dmax, hist), used = _plane_stats(data, codes, w, b)
    if count == 0:
        raise HelmError(
            "the hypothalamus labels are empty; cannot check them against the mirror plane",
            path=src,
            hint="check the hypothalamus label file",
        )
    centroid = aff[:3, :3] @ (np.array(sums, dtype=np.float64) / count) + aff[:3, 3]
    dist = float(row[:3] @ centroid + row[3])
    p90 = float(np.searchsorted(np.cumsum(hist), 0.9 * count)) * _DIST_BIN_MM  # the bin's upper edge
    if abs(dist) > limit:
        _refuse_off_plane(dist, p90, limit, src)
    return {
        "centroid_mm": [float(c) for c in centroid],
        "centroid_distance_mm": dist,
        "p90_distance_mm": round(p90, 6),
        "min_distance_mm": dmin,
        "max_distance_mm": dmax,
        "n_voxels": int(count),
        "codes": used,
        "limit_mm": limit,
        "ok": True,
    }
