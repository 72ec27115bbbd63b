"""The whole-brain output grid of the mirroring (:func:`whole_brain_grid`): an axis-aligned RAS+ grid whose x
voxel centres are symmetric about the mirror plane, so that x -> -x maps voxels onto voxels exactly, covering
the transformed hemisphere, its mirror image and a margin (see ``docs/method/mirror.md``).
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..errors import HelmError
from ..volume import affine_of, spacing_of
from .passes import _as_dask, _run
from .transform import MirrorTransform

__all__ = ["whole_brain_grid"]


def _nonzero_bbox_block(block: np.ndarray, offset: tuple[int, int, int]) -> tuple | None:
    """Global index bounding box ``((lo, hi),) * 3`` of the block's nonzero voxels, or None."""
    sel = np.asarray(block) != 0
    if not sel.any():
        return None
    out = []
    for d in range(3):
        axes = tuple(a for a in range(3) if a != d)
        nz = np.flatnonzero(sel.any(axis=axes))
        out.append((int(nz[0]) + offset[d], int(nz[-1]) + offset[d]))
    return tuple(out)


def _bbox_combine(*parts: tuple | None) -> tuple | None:
    """Union of partial bounding boxes (None: empty)."""
    boxes = [p for p in parts if p is not None]
    if not boxes:
        return None
    return tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(3))


def _bbox_corners_mm(vol: xr.DataArray) -> np.ndarray:
    """The 8 world corners of the volume's nonzero region, voxel extents included (one chunked pass)."""
    data = _as_dask(vol, "the hemisphere volume")
    box = _run(data, _nonzero_bbox_block, _bbox_combine)
    if box is None:
        raise HelmError(
            "the hemisphere volume is empty (no nonzero voxel); nothing to mirror", path=vol.attrs.get("source") or None
        )
    a = affine_of(vol)
    c = np.array([[box[d][1] + 0.5 if (n >> d) & 1 else box[d][0] - 0.5 for d in range(3)] for n in range(8)])
    return c @ a[:3, :3].T + a[:3, 3]


def whole_brain_grid(
    vol: xr.DataArray | None, transform: MirrorTransform, *, spacing_mm: float | None = None, margin_mm: float = 10.0
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the axis-aligned RAS+ whole-brain grid (no data computed unless ``vol`` is given).

    The grid covers the hemisphere's bounding box after ``T`` (the 8 corners of its nonzero region, voxel
    extents included), its mirror image and ``margin_mm`` on every side, at ``spacing_mm`` (default: the
    smallest voxel size of ``vol``, or of the fitted mask). Along x it has an even number of voxels with
    centres ``(i + 0.5 - n_x / 2) * s``, symmetric about 0; along y and z the first centre sits on a multiple
    of ``s``. ``vol=None`` uses the mask bounding box stored in ``transform``; otherwise the nonzero bounding
    box of ``vol`` is computed (one chunked pass).

    Parameters
    ----------
    vol : volume or None
        The hemisphere (mask or label map) whose nonzero bounding box the grid must cover; None: the mask's
        box stored in ``transform`` (no pass over the data).
    transform : MirrorTransform
        The fitted mirroring transform.
    spacing_mm : float, optional
        Voxel size of the grid (isotropic).
    margin_mm : float
        Margin added on every side (mm).

    Returns
    -------
    shape : (int, int, int)
        The grid's shape, ``shape[0]`` even.
    affine : numpy.ndarray
        Its 4x4 voxel -> world (RAS+ mm) affine, diagonal.

    Example
    -------
    >>> t = MirrorTransform(np.eye(4), (0, 0, 0), (0, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1,
    ...                     bbox_mm=np.array([[x, y, z] for x in (-9.5, 0.5) for y in (0.5, 3.5)
    ...                                       for z in (0.5, 2.5)]), spacing_mm=1.0)
    >>> shape, aff = whole_brain_grid(None, t, margin_mm=1.0)
    >>> shape, float(aff[0, 3]), float(aff[1, 3])
    ((22, 7, 6), -10.5, -1.0)
    """
    if vol is None:
        if transform.bbox_mm is None:
            raise HelmError(
                "the mirror transform holds no bounding box; pass the hemisphere mask volume",
                hint="whole_brain_grid(mask, transform)",
            )
        corners = np.asarray(transform.bbox_mm, dtype=np.float64).reshape(8, 3)
        default_sp = transform.spacing_mm
    else:
        corners = _bbox_corners_mm(vol)
        default_sp = float(spacing_of(affine_of(vol)).min())
    s = float(spacing_mm) if spacing_mm is not None else default_sp
    if s is None or not (s > 0 and math.isfinite(s)):
        raise HelmError(f"spacing_mm must be a positive number, got {spacing_mm!r}")
    margin = float(margin_mm)
    if not (margin >= 0 and math.isfinite(margin)):
        raise HelmError(f"--margin-mm must be >= 0, got {margin_mm!r}")
    w = transform.apply(corners)
    lo, hi = w.min(axis=0), w.max(axis=0)
    half = max(-lo[0], hi[0], 0.0) + margin
    nx = 2 * max(1, int(math.ceil(half / s - 1e-9)))
    shape = [nx]
    origin = [(0.5 - nx / 2) * s]
    for d in (1, 2):
        o = math.floor((lo[d] - margin) / s + 1e-9) * s
        shape.append(int(math.ceil((hi[d] + margin - o) / s - 1e-9)) + 1)
        origin.append(o)
    aff = np.diag([s, s, s, 1.0])
    aff[:3, 3] = origin
    return (int(shape[0]), int(shape[1]), int(shape[2])), aff
