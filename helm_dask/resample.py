"""Stage 3 -- resampling to a working spacing (0.3 mm by default), chunk by chunk, with exact geometry:
:func:`target_grid` gives the grid at a new spacing over the same field of view (the scan's directions),
:func:`ras_target_grid` the axis-aligned RAS+ grid over its rotated extent, :func:`resample` resamples images
(exact block means, else Gaussian anti-aliasing and interpolation), :func:`resample_labels` label maps and masks
(nearest neighbour or majority vote), :func:`resample_to_grid` and :func:`resample_labels_to_grid` any volume
onto any other grid (with anti-aliasing, and a sampled 3-D majority vote); all are lazy, one task per output
chunk, and give the same result for any chunking. The grid formulas and the rules of each method are in
``docs/method/resample.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from numba import njit

from .arrays import block_reduce, tree_reduce
from .errors import HelmError
from .io.regions import region_map
from .volume import affine_of, is_axis_aligned, like, provenance_record, spacing_of

__all__ = [
    "FWHM_TO_SIGMA",
    "SPLINE_MARGIN",
    "antialias_sigma_mm",
    "content_extent_mm",
    "grid_mapping",
    "grid_reach_mm",
    "is_ras_aligned",
    "ras_target_grid",
    "resample",
    "resample_labels",
    "resample_labels_to_grid",
    "resample_to_grid",
    "target_grid",
]

#: sigma = FWHM / (2 sqrt(2 ln 2)) for a Gaussian.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Extra input voxels around a chunk for the cubic B-spline prefilter: its impulse response decays as
#: 0.268**d, so 16 voxels leave a chunk-boundary error below ~1e-9 of the image range.
SPLINE_MARGIN = 16
_TRUNCATE = 4.0  # Gaussian truncated at 4 sigma (scipy's default)
_EPS = 1e-6  # tolerance deciding "integer factor" / "aligned grids"
#: Largest off-diagonal direction cosine of a grid taken as axis-aligned (:func:`is_ras_aligned`): float32
#: header noise is ~1e-7; 1e-6 moves a corner 200 mm away by 2e-4 mm.
RAS_ALIGNED_ATOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------


def _spacing_vec(spacing_mm: Any) -> np.ndarray:
    try:
        s = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    except (TypeError, ValueError):
        raise HelmError(
            f"--spacing must be a number of mm, three numbers or 'native'; got {spacing_mm!r}",
            hint="e.g. --spacing 0.3",
        ) from None
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise HelmError(f"--spacing must be positive, got {spacing_mm!r}", hint="e.g. --spacing 0.3")
    return s


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # rounding to 9 decimals first makes 12.499999999 / 12.500000001 (float noise) deterministic
    return np.floor(np.round(np.asarray(x, dtype=np.float64), 9) + 0.5).astype(np.int64)


def grid_mapping(
    shape: Sequence[int], affine: Any, spacing_mm: Any
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """``(new_shape, r, t)``: output voxel ``m`` sits at input voxel coordinate ``t + r * m`` (per axis).

    Parameters
    ----------
    shape : sequence of int
        Input shape (the first three axes are used).
    affine : array_like, 4x4
        Input voxel-to-world matrix.
    spacing_mm : float or 3 floats
        Output voxel size (mm).

    Returns
    -------
    tuple
        ``new_shape`` (3 ints, ``max(1, round(n * s / s_new))``, halves up), ``r = s_new / s`` and
        ``t = (n - 1) / 2 - (n_new - 1) / 2 * r`` (float arrays of 3).

    Example
    -------
    >>> shape, r, t = grid_mapping((25, 30, 20), np.diag([0.12, 0.12, 0.12, 1]), 0.3)
    >>> shape, r.round(6).tolist(), t.round(6).tolist()
    ((10, 12, 8), [2.5, 2.5, 2.5], [0.75, 0.75, 0.75])
    """
    a = np.asarray(affine, dtype=np.float64)
    n = np.asarray([int(v) for v in shape[:3]], dtype=np.int64)
    s = spacing_of(a)
    s_new = _spacing_vec(spacing_mm)
    n_new = np.maximum(1, _round_half_up(n * s / s_new))
    r = s_new / s
    t = (n - 1) / 2.0 - (n_new - 1) / 2.0 * r
    return (int(n_new[0]), int(n_new[1]), int(n_new[2])), r, t


def target_grid(shape: Sequence[int], affine: Any, spacing_mm: Any) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid at ``spacing_mm`` covering the same field of view: ``(new_shape, new_affine)``.

    ``n_new = max(1, round(n * s / s_new))`` voxels per voxel axis (halves round up), centred on the old
    field of view (outer edge of the first voxel to outer edge of the last), direction cosines kept;
    ``new_affine = affine @ [[diag(r), t], [0, 1]]`` with ``r = s_new / s`` and
    ``t = (n - 1) / 2 - (n_new - 1) / 2 * r`` (voxel centres exact).

    Parameters
    ----------
    shape : sequence of int
        Input shape.
    affine : array_like, 4x4
        Input voxel-to-world matrix.
    spacing_mm : float or 3 floats
        Output voxel size (mm); ``"native"`` is the caller's business.

    Returns
    -------
    tuple
        ``(new_shape, new_affine)``: 3 ints and the 4x4 float64 matrix.

    Example
    -------
    >>> shape, aff = target_grid((25, 25, 25), np.diag([0.12, 0.12, 0.12, 1]), 0.3)
    >>> shape, np.diag(aff).round(6).tolist(), aff[:3, 3].round(6).tolist()   # first centre 0.09 mm
    ((10, 10, 10), [0.3, 0.3, 0.3, 1.0], [0.09, 0.09, 0.09])
    """
    a = np.asarray(affine, dtype=np.float64)
    new_shape, r, t = grid_mapping(shape, a, spacing_mm)
    m = np.eye(4)
    m[:3, :3] = np.diag(r)
    m[:3, 3] = t
    return new_shape, a @ m


def is_ras_aligned(affine: Any) -> bool:
    """Whether a grid's voxel axes are the world's R, A and S axes, in that order and direction.

    Off-diagonal direction cosines up to :data:`RAS_ALIGNED_ATOL` count as zero (float32 header noise).

    Parameters
    ----------
    affine : array_like, 4x4
        Voxel-to-world matrix.

    Returns
    -------
    bool

    Example
    -------
    >>> is_ras_aligned(np.diag([0.3, 0.3, 0.5, 1.0])), is_ras_aligned(np.diag([-0.3, 0.3, 0.5, 1.0]))
    (True, False)
    """
    a = np.asarray(affine, dtype=np.float64)
    return bool(is_axis_aligned(a, atol=RAS_ALIGNED_ATOL) and np.all(np.diag(a[:3, :3]) > 0))


def ras_target_grid(
    shape: Sequence[int], affine: Any, spacing_mm: Any, *, extent_mm: Any = None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The axis-aligned RAS+ grid at ``spacing_mm`` covering a grid's field of view, rotated: ``(shape, affine)``.

    For a grid that is already RAS+-aligned (:func:`is_ras_aligned`) this *is* :func:`target_grid` (same shape
    and affine: block means apply and outputs are bit-identical to ``--grid scan``). Otherwise the eight outer
    corners of the field of view (voxel -0.5 and n - 0.5 on every axis) are mapped to the world, and the grid
    covers their bounding box: ``n_new = ceil(extent / s_new)`` voxels per world axis (the extent rounded to 6
    decimals first), centred on the box, voxel axes along +R, +A, +S. With ``extent_mm`` (a tilted input only)
    the grid is cut to the voxels of that grid whose extent meets the world box ``extent_mm = (lo, hi)``: the
    same voxel centres, fewer of them (:func:`content_extent_mm` gives the box of a volume's content).

    Parameters
    ----------
    shape : sequence of int
        Input shape.
    affine : array_like, 4x4
        Input voxel-to-world matrix.
    spacing_mm : float, 3 floats or "native"
        Output voxel size (mm) along R, A, S; ``"native"``: the input's voxel sizes.
    extent_mm : (3 floats, 3 floats), optional
        World box ``(lo, hi)`` (mm) the grid must cover; None: the whole field of view.

    Returns
    -------
    tuple
        ``(new_shape, new_affine)``: 3 ints and the 4x4 float64 matrix (diagonal for a tilted input).

    Example
    -------
    >>> c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    >>> tilted = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    >>> shape, aff = ras_target_grid((10, 10, 4), tilted, 1.0)
    >>> shape, np.diag(aff).tolist()         # 10 (cos 30 + sin 30) = 13.66 mm wide
    ((14, 14, 4), [1.0, 1.0, 1.0, 1.0])
    """
    a = np.asarray(affine, dtype=np.float64)
    if isinstance(spacing_mm, str) and spacing_mm.strip().lower() == "native":
        spacing_mm = spacing_of(a)
    if is_ras_aligned(a):
        return target_grid(shape, a, spacing_mm)
    s_new = _spacing_vec(spacing_mm)
    n = np.asarray([int(v) for v in shape[:3]], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ a[:3, :3].T + a[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    n_new = np.maximum(1, np.ceil(np.round((hi - lo) / s_new, 6))).astype(np.int64)
    new_affine = np.diag([*s_new, 1.0])
    new_affine[:3, 3] = (lo + hi) / 2.0 - (n_new - 1) / 2.0 * s_new
    if extent_mm is not None:
        # voxel i spans t + (i -+ 0.5) s: keep those meeting [e_lo, e_hi], within the field of view's grid
        e_lo, e_hi = (np.asarray(v, dtype=np.float64) for v in extent_mm)
        t = new_affine[:3, 3]
        i0 = np.clip(np.floor((e_lo - t) / s_new + 0.5), 0, n_new - 1).astype(np.int64)
        i1 = np.clip(np.ceil((e_hi - t) / s_new - 0.5), i0, n_new - 1).astype(np.int64)
        n_new = i1 - i0 + 1
        new_affine[:3, 3] = t + i0 * s_new
    return (int(n_new[0]), int(n_new[1]), int(n_new[2])), new_affine


def grid_reach_mm(affine_in: Any, affine_out: Any) -> float:
    """How far (mm) a linear, anti-aliased :func:`resample_to_grid` from ``affine_in`` onto ``affine_out`` can
    carry a nonzero input voxel: the Gaussian's 4-sigma radius plus the interpolation's reach, in input voxels
    as its tasks pad their boxes, combined over the input axes.

    Example
    -------
    >>> round(grid_reach_mm(np.eye(4), np.eye(4)), 4)       # no Gaussian: two voxels along each axis
    3.4641
    """
    m = np.linalg.inv(np.asarray(affine_in, dtype=np.float64)) @ np.asarray(affine_out, dtype=np.float64)
    vox = np.array([2 + int(_TRUNCATE * sv + 0.5) for sv in grid_antialias_sigma(m)], dtype=np.float64)
    return float(np.linalg.norm(vox * spacing_of(affine_in)))


def _extent_block(block: np.ndarray, offset: tuple[int, int, int], a: np.ndarray) -> tuple | None:
    """World ``(min, max)`` per axis over the centres of a block's nonzero voxels, or None.

    A world coordinate is linear in the voxel index, so over one row of voxels along the first axis its
    extremes sit at the row's first and last nonzero voxel: two points per row instead of every voxel.
    """
    sel = np.asarray(block) != 0
    rows = sel.any(axis=0)
    if not rows.any():
        return None
    j, k = np.nonzero(rows)
    first = sel.argmax(axis=0)[j, k]
    last = sel.shape[0] - 1 - sel[::-1].argmax(axis=0)[j, k]
    idx = np.empty((2 * j.size, 3), dtype=np.float64)
    idx[:, 0] = np.concatenate([first, last]) + offset[0]
    idx[:, 1] = np.tile(j, 2) + offset[1]
    idx[:, 2] = np.tile(k, 2) + offset[2]
    w = idx @ a[:3, :3].T + a[:3, 3]
    return w.min(axis=0), w.max(axis=0)


def _extent_combine(*parts: tuple | None) -> tuple | None:
    """Union of partial extents (exact: min and max do not depend on the grouping)."""
    got = [p for p in parts if p is not None]
    if not got:
        return None
    return np.min([p[0] for p in got], axis=0), np.max([p[1] for p in got], axis=0)


def content_extent_mm(*vols: xr.DataArray) -> tuple[np.ndarray, np.ndarray] | None:
    """The world box ``(lo, hi)`` (mm) of the nonzero voxels of volumes on one grid, voxel extents included.

    One chunked pass over each volume, computed now; exact for any chunking (per row only the first and last
    nonzero voxel count). None when every voxel is 0.

    Parameters
    ----------
    *vols : xarray.DataArray
        3-D volumes (masks, label maps) sharing one grid.

    Returns
    -------
    tuple of two numpy.ndarray, or None

    Example
    -------
    >>> import dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> m = np.zeros((6, 4, 4), bool); m[2:4, 1, 1] = True
    >>> lo, hi = content_extent_mm(make_volume(da.from_array(m, chunks=3), np.diag([2.0, 1, 1, 1]), kind="mask"))
    >>> lo.tolist(), hi.tolist()
    ([3.0, 0.5, 0.5], [7.0, 1.5, 1.5])
    """
    a = affine_of(vols[0])
    # one reduction per volume, then their union: min and max do not depend on the grouping
    parts = [
        block_reduce(_check3d(v, "content_extent_mm"), _extent_block, _extent_combine, a, any_layout=True) for v in vols
    ]
    (box,) = dask.compute(tree_reduce(parts, _extent_combine))
    if box is None:
        return None
    half = 0.5 * np.abs(a[:3, :3]).sum(axis=1)  # a voxel's half extent along each world axis
    return box[0] - half, box[1] + half


def antialias_sigma_mm(spacing_in_mm: Any, spacing_out_mm: Any) -> np.ndarray:
    """Gaussian anti-aliasing sigma (mm) per axis: ``sqrt(max(s_out**2 - s_in**2, 0)) / (2 sqrt(2 ln 2))``.

    Treating the voxel size as the FWHM of the point spread, this is the blur whose FWHM, added in
    quadrature to ``s_in``, gives ``s_out``; 0 when upsampling.

    Parameters
    ----------
    spacing_in_mm, spacing_out_mm : float or 3 floats
        Input and output voxel sizes (mm).

    Returns
    -------
    numpy.ndarray
        Sigma per axis (mm), float64.

    Example
    -------
    >>> antialias_sigma_mm(0.1, 0.3).round(4).tolist()
    [0.1201, 0.1201, 0.1201]
    """
    s_in = np.broadcast_to(np.asarray(spacing_in_mm, dtype=np.float64), (3,))
    s_out = np.broadcast_to(np.asarray(spacing_out_mm, dtype=np.float64), (3,))
    return np.sqrt(np.maximum(s_out**2 - s_in**2, 0.0)) * FWHM_TO_SIGMA


# ----------------------------------------------------------------------------------------------------------
# chunk machinery
# ----------------------------------------------------------------------------------------------------------


def _check3d(vol: xr.DataArray, what: str) -> da.Array:
    if vol.ndim != 3:
        raise ValueError(f"{what} works on 3-D volumes only (combine echoes first); got dims {vol.dims}")
    return vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)


def _normalize_out_chunks(chunks: Any, shape: tuple[int, ...], default: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    if chunks is None:
        chunks = tuple(int(max(1, c)) for c in default)
    return da.core.normalize_chunks(chunks, shape=shape, dtype=np.float32)


_MIN_OUT_CHUNK = 16  # output voxels per chunk axis at least: keeps margins from dominating tiny chunks


def _default_out_chunks(data: da.Array, factor: np.ndarray) -> list[int]:
    """Output chunk sizes per axis. Downsampling: the input chunk size halved until the chunk's input
    footprint is at most two input chunks (0.1 -> 0.3 mm: 64 voxels from 192): a divisor of the store's
    chunk (no partial chunks when written), few enough tasks, and boxes big enough that the overlap margins
    and the decoding of chunks shared by neighbouring boxes stay small. Otherwise about one input chunk of
    input per output chunk (never more than one input chunk when upsampling); at least ``_MIN_OUT_CHUNK``."""
    out = []
    for c, f in zip((max(ch) for ch in data.chunks), factor):
        if f > 1.0:
            n = c
            while n * f > 2 * c and n > _MIN_OUT_CHUNK:
                n //= 2
        else:
            n = min(c, math.floor(c / f + 1e-9))
        out.append(int(max(_MIN_OUT_CHUNK, n)))
    return out


# ----------------------------------------------------------------------------------------------------------
# intensities
# ----------------------------------------------------------------------------------------------------------


def _axis_plan(
    n: np.ndarray, n_new: tuple[int, ...], r: np.ndarray, t: np.ndarray, antialias: bool
) -> tuple[list[int], np.ndarray]:
    """Per axis: block factor k (>= 1) for an exact block-mean axis, or 0 for an interpolated axis;
    and the Gaussian sigma in input voxels for the interpolated ones."""
    blocks, sigma_vox = [], np.zeros(3)
    for d in range(3):
        k = int(round(r[d]))
        integer = k >= 1 and abs(r[d] - k) <= _EPS * max(1.0, r[d])
        aligned = integer and n[d] == n_new[d] * k
        if aligned and (antialias or k == 1):
            blocks.append(k)
        else:
            blocks.append(0)
            if antialias and r[d] > 1.0:
                sigma_vox[d] = math.sqrt(r[d] ** 2 - 1.0) * FWHM_TO_SIGMA
    return blocks, sigma_vox


def _block_mean(x: np.ndarray, blocks: Sequence[int]) -> np.ndarray:
    """Exact mean over k-voxel blocks along the block axes (reshape-mean), float64."""
    shape, axes = [], []
    for d, k in enumerate(blocks):
        if k > 1:
            shape += [x.shape[d] // k, k]
            axes.append(len(shape) - 1)
        else:
            shape.append(x.shape[d])
    return x.reshape(shape).mean(axis=tuple(axes)) if axes else x


def _interp_reduced(
    y: np.ndarray,
    blocks: Sequence[int],
    sigma_vox: np.ndarray,
    r: np.ndarray,
    offset: np.ndarray,
    out_shape: tuple[int, ...],
    order: int,
) -> np.ndarray:
    """Gaussian (mode nearest) then interpolation (mode nearest) on an array already block-averaged."""
    if np.any(sigma_vox > 0):
        y = ndi.gaussian_filter(y, sigma=sigma_vox, mode="nearest", truncate=_TRUNCATE)
    if all(k > 0 for k in blocks):
        return y
    matrix = np.array([1.0 if k > 0 else r[d] for d, k in enumerate(blocks)])
    return ndi.affine_transform(
        y, matrix, offset=offset, output_shape=out_shape, order=order, mode="nearest", prefilter=True, output=np.float64
    )


def _resample_block(
    regions: list,
    blocks: Sequence[int],
    sigma_vox: np.ndarray,
    r: np.ndarray,
    offset: np.ndarray,
    out_shape: tuple[int, ...],
    order: int,
) -> np.ndarray:
    sub = np.asarray(regions[0])
    if len(regions) > 1:  # the mask: the image is 0 outside it
        sub = np.where(np.asarray(regions[1]) > 0, sub, sub.dtype.type(0))
    y = _block_mean(np.asarray(sub, dtype=np.float64), blocks)
    return _interp_reduced(y, blocks, sigma_vox, r, offset, out_shape, order).astype(np.float32)


def _reference_resample(
    data: np.ndarray,
    shape_new: tuple[int, ...],
    r: np.ndarray,
    t: np.ndarray,
    blocks: Sequence[int],
    sigma_vox: np.ndarray,
    order: int,
) -> np.ndarray:
    """The whole-array computation the chunked one equals (used by the tests; small arrays only)."""
    y = _block_mean(np.asarray(data, dtype=np.float64), blocks)
    offset = np.array([0.0 if k > 0 else t[d] for d, k in enumerate(blocks)])
    return _interp_reduced(y, blocks, sigma_vox, r, offset, tuple(shape_new), order).astype(np.float32)


def resample(
    vol: xr.DataArray,
    spacing_mm: Any,
    *,
    order: int = 1,
    prefilter: bool = True,
    chunks: Any = None,
    mask: xr.DataArray | None = None,
) -> xr.DataArray:
    """Resample an image to ``spacing_mm`` (mm, float or 3 floats) over the same field of view; lazy.

    Per voxel axis: exact block mean when the factor ``s_new / s`` is an integer and the grids align
    (``n == n_new * k``); otherwise a Gaussian anti-aliasing filter with ``sigma = sqrt(s_new**2 - s**2) /
    (2 sqrt(2 ln 2))`` mm (none when upsampling), then linear (``order=1``) or cubic B-spline (``order=3``)
    interpolation at ``x = t + r * m`` (see ``docs/method/resample.md``). The result equals, to float tolerance
    and for any chunking, the whole-array computation: reshape-mean along the block axes, then
    ``scipy.ndimage.gaussian_filter(mode="nearest", truncate=4)`` and
    ``scipy.ndimage.affine_transform(matrix=diag(r), offset=t, order=order, mode="nearest")`` in float64.

    Parameters
    ----------
    vol : xarray.DataArray
        Image volume (3-D).
    spacing_mm : float, 3 floats or "native"
        Target voxel size in mm; ``"native"`` returns ``vol`` unchanged.
    order : {1, 3}
        Linear or cubic B-spline (prefiltered) interpolation.
    prefilter : bool
        Anti-alias (block mean / Gaussian) before interpolation; ``False`` samples the input by plain
        interpolation (only for data that is already smooth).
    chunks : optional
        Output chunks (dask syntax); default about one input chunk of input per output chunk.
    mask : xarray.DataArray, optional
        Mask on the image's grid: the image is taken as 0 outside it (``where(mask > 0, image, 0)``, as
        :func:`helm_dask.background.apply_mask`), box by box -- a stored scan and mask (also reoriented by
        :mod:`helm_dask.orient`) are then read straight from their stores by each task, so nothing is held
        between tasks (the masked image as a computed input makes the scheduler hold its chunks for every
        task that overlaps them).

    Returns
    -------
    xarray.DataArray
        A lazy float32 image volume on :func:`target_grid`.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.arange(8.0).reshape(2, 2, 2), np.eye(4))
    >>> resample(v, 2.0).values.ravel().tolist()       # integer factor: exact block mean
    [3.5]
    >>> from helm_dask.volume import affine_of, spacing_of
    >>> out = resample(make_volume(da.ones((25, 25, 25), chunks=10), np.diag([0.12, 0.12, 0.12, 1.0])), 0.3)
    >>> out.shape, spacing_of(affine_of(out)).round(6).tolist(), float(out.mean())
    ((10, 10, 10), [0.3, 0.3, 0.3], 1.0)
    """
    if isinstance(spacing_mm, str) and spacing_mm.strip().lower() == "native":
        return vol
    sources = _intensity_sources(vol, order, mask)
    data, a = sources[0], affine_of(vol)
    new_shape, new_affine = target_grid(vol.shape, a, spacing_mm)
    _, r, t = grid_mapping(vol.shape, a, spacing_mm)
    n = np.array(vol.shape)
    blocks, sigma_vox = _axis_plan(n, new_shape, r, t, prefilter)
    out_chunks = _normalize_out_chunks(chunks, new_shape, _default_out_chunks(data, r))
    plan = _intensity_plan(blocks, sigma_vox, r, t, n, order)
    out = region_map(_resample_block, sources, out_chunks, plan, np.float32, name="resample")
    step = provenance_record(
        "resample",
        {
            "spacing_mm": [float(v) for v in _spacing_vec(spacing_mm)],
            "order": order,
            "prefilter": prefilter,
            "block_mean_axes": [d for d in range(3) if blocks[d] > 1],
            "masked": mask is not None,
            "antialias_sigma_mm": (sigma_vox * spacing_of(a)).tolist(),
        },
    )
    return like(vol, out, affine=new_affine, kind="image", step=step)


def _intensity_sources(vol: xr.DataArray, order: int, mask: xr.DataArray | None) -> list[da.Array]:
    """The arrays each task reads: the image, and the mask when given (checked to be on the image's grid)."""
    if order not in (1, 3):
        raise ValueError(f"order must be 1 (linear) or 3 (cubic) for intensities, got {order}")
    if vol.attrs.get("kind") == "labels":
        raise ValueError("label codes cannot be interpolated: use resample_labels (nearest or majority)")
    data = _check3d(vol, "resample")
    a = affine_of(vol)
    sources = [data]
    if mask is not None:
        if tuple(mask.shape) != tuple(vol.shape) or not np.allclose(affine_of(mask), a, rtol=0, atol=1e-6):
            raise HelmError(
                f"mask grid {tuple(mask.shape)} does not match the image grid {tuple(vol.shape)}",
                hint="give the mask made on this image's grid",
            )
        sources.append(_check3d(mask, "resample"))
    return sources


def _intensity_plan(
    blocks: Sequence[int], sigma_vox: np.ndarray, r: np.ndarray, t: np.ndarray, n: np.ndarray, order: int
) -> Callable:
    """The :func:`~helm_dask.io.regions.region_map` plan of :func:`resample`: each output chunk's input box
    (exact on block axes, with a filter and interpolation margin on the others) and its block arguments."""
    # margin (input voxels) around the support of an output chunk on an interpolated axis
    pad = [int(_TRUNCATE * s + 0.5) + (2 + SPLINE_MARGIN if order == 3 else 1) + 1 for s in sigma_vox]

    def plan(index, ranges):
        lo, hi, offset = [], [], np.zeros(3)
        for d, (o0, o1) in enumerate(ranges):
            k = blocks[d]
            if k > 0:  # block axis: exactly the k*(o1-o0) voxels
                lo.append(o0 * k)
                hi.append(o1 * k)
            else:
                x0, x1 = t[d] + r[d] * o0, t[d] + r[d] * (o1 - 1)
                a = max(0, math.floor(x0) - pad[d])
                b = min(int(n[d]), math.floor(x1) + 2 + pad[d])
                a = min(a, max(0, b - 1))  # keep a non-empty box even far outside
                lo.append(a)
                hi.append(b)
                offset[d] = t[d] + r[d] * o0 - a  # local coordinate of the chunk's first voxel
        shape = tuple(b - a for a, b in ranges)
        return lo, hi, (blocks, sigma_vox, r, offset, shape, order)

    return plan


# ----------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------


def _nearest_index(n: int, n_new: int, r: float, t: float) -> np.ndarray:
    """Nearest input index of every output voxel: floor(t + r*m + 0.5), clipped (scipy's order-0 rule)."""
    x = t + r * np.arange(n_new, dtype=np.float64)
    return np.clip(np.floor(x + 0.5), 0, n - 1).astype(np.int64)


def _footprints(n: int, n_new: int, r: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Input index range [a, b) whose centres fall in [x - r/2, x + r/2) for each output voxel (clipped);
    an empty footprint (upsampling) falls back to the nearest voxel."""
    x = t + r * np.arange(n_new, dtype=np.float64)
    a = np.clip(np.ceil(np.round(x - r / 2.0, 9)), 0, n).astype(np.int64)
    b = np.clip(np.ceil(np.round(x + r / 2.0, 9)), 0, n).astype(np.int64)
    empty = b <= a
    near = _nearest_index(n, n_new, r, t)
    a = np.where(empty, near, a)
    b = np.where(empty, near + 1, b)
    return a, b


def _gather_block(regions: list, idx: Sequence[np.ndarray]) -> np.ndarray:
    return np.asarray(regions[0])[np.ix_(*idx)]


def _box_counts(ind: np.ndarray, foot: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Number of ones of ``ind`` in every output footprint (separable prefix sums, exact integers)."""
    c = ind.astype(np.int32)
    for d, (a, b) in enumerate(foot):
        cs = np.cumsum(c, axis=d, dtype=np.int32)
        pad = [(0, 0)] * 3
        pad[d] = (1, 0)
        cs = np.pad(cs, pad)
        c = np.take(cs, b, axis=d) - np.take(cs, a, axis=d)
    return c


def _majority_block(regions: list, foot: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    sub = np.asarray(regions[0])
    shape = tuple(len(a) for a, _ in foot)
    best = np.zeros(shape, dtype=sub.dtype)
    best_count = np.full(shape, -1, dtype=np.int32)
    for value in np.unique(sub):  # ascending: a later code wins only with strictly more votes
        cnt = _box_counts(sub == value, foot)
        better = cnt > best_count
        best[better] = value
        best_count[better] = cnt[better]
    return best


def resample_labels(vol: xr.DataArray, spacing_mm: Any, *, method: str = "nearest", chunks: Any = None) -> xr.DataArray:
    """Resample a label map or mask to ``spacing_mm`` over the same field of view; lazy, dtype kept.

    ``method="nearest"``: the input voxel ``floor(t + r*m + 0.5)`` (clipped to the volume), identical to
    ``scipy.ndimage.map_coordinates(order=0, mode="nearest")`` at those coordinates.
    ``method="majority"`` (for downsampling): the most frequent code among the input voxels whose centres
    fall in the output voxel's footprint ``[x - r/2, x + r/2)`` along each axis (half-open, so every input
    voxel votes once); ties go to the smallest code; an empty footprint (upsampling) takes the nearest.
    Bit-identical for every chunking.

    Parameters
    ----------
    vol : xarray.DataArray
        Label map or mask (3-D).
    spacing_mm : float, 3 floats or "native"
        Target voxel size in mm; ``"native"`` returns ``vol`` unchanged.
    method : {"nearest", "majority"}
        The rule above.
    chunks : optional
        Output chunks (dask syntax); default about one input chunk of input per output chunk.

    Returns
    -------
    xarray.DataArray
        A lazy volume of ``vol``'s dtype on :func:`target_grid`.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((4, 1, 1), np.uint8); lab[1:, 0, 0] = 7
    >>> v = make_volume(da.from_array(lab), np.eye(4), kind="labels")
    >>> resample_labels(v, [4.0, 1.0, 1.0], method="majority").values.ravel().tolist()
    [7]
    """
    if isinstance(spacing_mm, str) and spacing_mm.strip().lower() == "native":
        return vol
    if method not in ("nearest", "majority"):
        raise ValueError(f"method must be 'nearest' or 'majority', got {method!r}")
    data = _check3d(vol, "resample_labels")
    a = affine_of(vol)
    new_shape, new_affine = target_grid(vol.shape, a, spacing_mm)
    _, r, t = grid_mapping(vol.shape, a, spacing_mm)
    n = vol.shape
    out_chunks = _normalize_out_chunks(chunks, new_shape, _default_out_chunks(data, r))
    func: Callable
    if method == "nearest":
        idx = [_nearest_index(n[d], new_shape[d], r[d], t[d]) for d in range(3)]

        def plan(index, ranges):
            local = [idx[d][o0:o1] for d, (o0, o1) in enumerate(ranges)]
            lo = [int(i.min()) for i in local]
            hi = [int(i.max()) + 1 for i in local]
            return lo, hi, ([i - a for i, a in zip(local, lo)],)

        func = _gather_block
    else:
        foot = [_footprints(n[d], new_shape[d], r[d], t[d]) for d in range(3)]

        def plan(index, ranges):
            fa = [foot[d][0][o0:o1] for d, (o0, o1) in enumerate(ranges)]
            fb = [foot[d][1][o0:o1] for d, (o0, o1) in enumerate(ranges)]
            lo = [int(x.min()) for x in fa]
            hi = [int(x.max()) for x in fb]
            return lo, hi, ([(x - a, y - a) for x, y, a in zip(fa, fb, lo)],)

        func = _majority_block

    out = region_map(func, [data], out_chunks, plan, data.dtype, name=f"resample-labels-{method}")
    step = provenance_record(
        "resample_labels", {"spacing_mm": [float(v) for v in _spacing_vec(spacing_mm)], "method": method}
    )
    return like(vol, out, affine=new_affine, step=step)


# ----------------------------------------------------------------------------------------------------------
# arbitrary target grid
# ----------------------------------------------------------------------------------------------------------


def _grid_coords(m: np.ndarray, ranges: Sequence[tuple[int, int]], lo: Sequence[int] | None = None) -> np.ndarray:
    """Input voxel coordinates (3, ni, nj, nk) of the output voxels in ``ranges`` (global indices, so the
    floating-point values are identical whatever the chunking), less ``lo`` when given (box-local coordinates:
    the same values as subtracting afterwards, written into the one array instead of a second copy)."""
    i = np.arange(*ranges[0], dtype=np.float64)[:, None, None]
    j = np.arange(*ranges[1], dtype=np.float64)[None, :, None]
    k = np.arange(*ranges[2], dtype=np.float64)[None, None, :]
    x = np.empty((3, i.shape[0], j.shape[1], k.shape[2]))
    for d in range(3):
        # ((m0 i + m1 j) + m2 k) + m3, in that order, straight into the output (no full-size temporaries)
        np.add(m[d, 0] * i + m[d, 1] * j, m[d, 2] * k, out=x[d])
        x[d] += m[d, 3]
        if lo is not None:
            x[d] -= float(lo[d])
    return x


def _all_inside(m: np.ndarray, ranges: Sequence[tuple[int, int]], n_in: Sequence[int]) -> bool:
    """Whether every output voxel centre of ``ranges`` maps inside the input field of view (outer voxel edges).

    The rounded affine map is monotone in each index (each product and sum rounds monotonically), so its
    extremes over the box are at the 8 corners, computed by the same expression as :func:`_grid_coords`."""
    corners = [(a, b - 1) for a, b in ranges]
    for d in range(3):
        for i in corners[0]:
            for j in corners[1]:
                for k in corners[2]:
                    v = m[d, 0] * float(i) + m[d, 1] * float(j) + m[d, 2] * float(k) + m[d, 3]
                    if not (v >= -0.5 and v < n_in[d] - 0.5):
                        return False
    return True


def _effective_sigma(sigma_vox: np.ndarray) -> np.ndarray:
    """The anti-aliasing sigmas with 0 on the axes where the truncated Gaussian has radius 0: its one tap of
    weight exactly 1 leaves the values as they are (the native-spacing RAS grid: ~4e-6 voxels from float32 header
    noise, a whole pass over each box for nothing)."""
    return np.where((_TRUNCATE * sigma_vox + 0.5).astype(int) > 0, sigma_vox, 0.0)


@njit(cache=True, nogil=True)
def _linear_nb(
    sub: np.ndarray, msk: np.ndarray, lo: np.ndarray, m: np.ndarray, r0: np.ndarray, n_in: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover (compiled)
    """Masked trilinear interpolation of ``sub`` (the box at ``lo``; 0 where ``msk`` is 0, if it has voxels) at
    the output voxels from ``r0`` mapped through ``m``, 0 outside the input: ``map_coordinates(order=1,
    mode="nearest")`` of the float64 box, step for step -- the same coordinates (((m0 i + m1 j) + m2 k) + m3,
    less lo), clamping, weights (w0 = 1 - f, w1 = 1 - w0) and sum over the 8 corners in C order -- without the
    coordinate arrays, the float64 copy of the box and the masks.

    ``m0 i + m1 j`` is formed once per row and ``m2 k`` once per column, then added as before (the same
    roundings); corners, weights and indices are scalars rather than small arrays: 61 -> 42 ms per masked 128^3
    chunk, 38 -> 24 ms unmasked (AMD machine)."""
    masked = msk.size > 0
    n0, n1, n2 = sub.shape
    nc = out.shape[2]
    k0 = np.empty(nc)
    k1 = np.empty(nc)
    k2 = np.empty(nc)
    for c in range(nc):
        fk = float(r0[2] + c)
        k0[c] = m[0, 2] * fk
        k1[c] = m[1, 2] * fk
        k2[c] = m[2, 2] * fk
    e0, e1, e2 = n_in[0] - 0.5, n_in[1] - 0.5, n_in[2] - 0.5
    for a in range(out.shape[0]):
        fi = float(r0[0] + a)
        for b in range(out.shape[1]):
            fj = float(r0[1] + b)
            p0 = m[0, 0] * fi + m[0, 1] * fj
            p1 = m[1, 0] * fi + m[1, 1] * fj
            p2 = m[2, 0] * fi + m[2, 1] * fj
            for c in range(nc):
                x0 = (p0 + k0[c]) + m[0, 3]
                x1 = (p1 + k1[c]) + m[1, 3]
                x2 = (p2 + k2[c]) + m[2, 3]
                if not (x0 >= -0.5 and x0 < e0 and x1 >= -0.5 and x1 < e1 and x2 >= -0.5 and x2 < e2):
                    out[a, b, c] = 0.0
                    continue
                c0 = x0 - lo[0]
                c1 = x1 - lo[1]
                c2 = x2 - lo[2]
                f0, f1, f2 = np.floor(c0), np.floor(c1), np.floor(c2)
                w00 = 1.0 - (c0 - f0)
                w10 = 1.0 - (c1 - f1)
                w20 = 1.0 - (c2 - f2)
                w01, w11, w21 = 1.0 - w00, 1.0 - w10, 1.0 - w20
                s0, s1, s2 = int(f0), int(f1), int(f2)
                # mode "nearest": the two voxels' indices clamped to the box (the weights are not changed)
                i0, i1 = min(max(s0, 0), n0 - 1), min(max(s0 + 1, 0), n0 - 1)
                j0, j1 = min(max(s1, 0), n1 - 1), min(max(s1 + 1, 0), n1 - 1)
                q0, q1 = min(max(s2, 0), n2 - 1), min(max(s2 + 1, 0), n2 - 1)
                v000, v001 = float(sub[i0, j0, q0]), float(sub[i0, j0, q1])
                v010, v011 = float(sub[i0, j1, q0]), float(sub[i0, j1, q1])
                v100, v101 = float(sub[i1, j0, q0]), float(sub[i1, j0, q1])
                v110, v111 = float(sub[i1, j1, q0]), float(sub[i1, j1, q1])
                if masked:
                    if msk[i0, j0, q0] <= 0:
                        v000 = 0.0
                    if msk[i0, j0, q1] <= 0:
                        v001 = 0.0
                    if msk[i0, j1, q0] <= 0:
                        v010 = 0.0
                    if msk[i0, j1, q1] <= 0:
                        v011 = 0.0
                    if msk[i1, j0, q0] <= 0:
                        v100 = 0.0
                    if msk[i1, j0, q1] <= 0:
                        v101 = 0.0
                    if msk[i1, j1, q0] <= 0:
                        v110 = 0.0
                    if msk[i1, j1, q1] <= 0:
                        v111 = 0.0
                t = 0.0
                t += ((v000 * w00) * w10) * w20
                t += ((v001 * w00) * w10) * w21
                t += ((v010 * w00) * w11) * w20
                t += ((v011 * w00) * w11) * w21
                t += ((v100 * w01) * w10) * w20
                t += ((v101 * w01) * w10) * w21
                t += ((v110 * w01) * w11) * w20
                t += ((v111 * w01) * w11) * w21
                out[a, b, c] = t


def _to_grid_block(
    regions: list,
    lo: Sequence[int],
    m: np.ndarray,
    ranges,
    n_in: Sequence[int],
    order: int,
    out_dtype,
    sigma_vox: np.ndarray | None = None,
) -> np.ndarray:
    sigma = np.zeros(3) if sigma_vox is None else _effective_sigma(sigma_vox)
    if order == 1 and not np.any(sigma > 0):
        # compiled (0.2 mm native RAS grid, measured per 128^3 chunk: ~0.15 s of coordinate arrays, copies and
        # map_coordinates -> see _linear_nb), same values bit for bit
        return _linear_block(regions, lo, m, ranges, n_in).astype(out_dtype)
    # box-local coordinates; the field-of-view test (the order-0 rule floor(x + 0.5) in [0, n-1]) only where a
    # corner of the chunk falls outside the input (order 0 rounds the global coordinates: floor(x + 0.5) is not
    # always floor(x - lo + 0.5) + lo)
    local = _grid_coords(m, ranges, None if order == 0 else lo)
    inside = None
    if not _all_inside(m, ranges, n_in):
        x = local if order == 0 else _grid_coords(m, ranges)
        inside = np.all((x >= -0.5) & (x < np.asarray(n_in).reshape(3, 1, 1, 1) - 0.5), axis=0)
        del x
    sub = np.asarray(regions[0])
    if order == 0:
        if len(regions) > 1:  # the mask: the volume is 0 outside it
            sub = np.where(np.asarray(regions[1]) > 0, sub, sub.dtype.type(0))
        idx = np.floor(local + 0.5).astype(np.int64)
        for d in range(3):
            idx[d] = np.clip(idx[d] - lo[d], 0, sub.shape[d] - 1)
        out = sub[idx[0], idx[1], idx[2]]
    elif len(regions) > 1 and not np.any(np.asarray(regions[1]) > 0):
        out = np.zeros(local.shape[1:])  # the mask is empty here: so is the image (filtered and interpolated)
    else:
        # one float64 copy of the box, masked and filtered in place: a rotated box is ~1.2^3 the input a
        # block mean reads (measured: 0.1 -> 0.3 mm, 64^3 output voxels, 12.7 deg: 280 MB with copies, 130 MB
        # in place)
        y = sub.astype(np.float64)
        if len(regions) > 1:  # the mask: the image is 0 outside it
            y[np.asarray(regions[1]) <= 0] = 0.0
        if np.any(sigma > 0):
            ndi.gaussian_filter(y, sigma=sigma, mode="nearest", truncate=_TRUNCATE, output=y)
        out = ndi.map_coordinates(y, local, order=order, mode="nearest", prefilter=True)
    if inside is not None:
        out = np.where(inside, out, 0)
    return out.astype(out_dtype)


def _linear_block(regions: list, lo: Sequence[int], m: np.ndarray, ranges, n_in: Sequence[int]) -> np.ndarray:
    """:func:`_to_grid_block`'s masked linear interpolation without a filter, through :func:`_linear_nb`."""
    shape = tuple(b - a for a, b in ranges)
    sub = np.ascontiguousarray(regions[0])
    if len(regions) > 1:
        msk = np.ascontiguousarray(regions[1])
        if not np.any(msk > 0):
            return np.zeros(shape)  # the mask is empty here: so is the image
    else:
        msk = np.zeros((0, 0, 0), np.uint8)
    out = np.empty(shape)
    r0 = np.array([a for a, _ in ranges], dtype=np.int64)
    _linear_nb(
        sub,
        msk,
        np.asarray(lo, dtype=np.float64),
        np.ascontiguousarray(m[:3], dtype=np.float64),
        r0,
        np.asarray(n_in, dtype=np.float64),
        out,
    )
    return out


def grid_antialias_sigma(m: np.ndarray) -> np.ndarray:
    """Gaussian anti-aliasing sigma, in input voxels along each input axis, for resampling through ``m``.

    ``m`` maps output voxel indices to input voxel coordinates (``inv(affine_in) @ affine_out``). Treating a
    voxel as a Gaussian point spread whose FWHM is its size, the output voxel seen along input axis ``d`` has
    an FWHM of ``r_d = sqrt(sum_e m[d, e]**2)`` input voxels (``s_out / s_in`` for aligned or rotated grids of
    isotropic output voxels), and the blur that brings the input's FWHM (1 voxel) to it has
    ``sigma = sqrt(max(r_d**2 - 1, 0)) / (2 sqrt(2 ln 2))``: :func:`antialias_sigma_mm`'s rule, in voxels.

    Parameters
    ----------
    m : array_like, 4x4 (or 3x3)
        Output voxel index -> input voxel coordinate.

    Returns
    -------
    numpy.ndarray
        Three sigmas (input voxels), 0 when upsampling.

    Example
    -------
    >>> grid_antialias_sigma(np.diag([3.0, 3.0, 1.0, 1.0])).round(4).tolist()   # 0.1 -> 0.3 mm in x, y
    [1.2011, 1.2011, 0.0]
    """
    r = np.sqrt((np.asarray(m, dtype=np.float64)[:3, :3] ** 2).sum(axis=1))
    return np.sqrt(np.maximum(r**2 - 1.0, 0.0)) * FWHM_TO_SIGMA


def _grid_plan(
    m: np.ndarray, n_in: Sequence[int], pad: Sequence[int], args: Callable, *, samples: bool = False
) -> Callable:
    """The :func:`~helm_dask.io.regions.region_map` plan of a resampling through ``m``: each output chunk's
    input box (the bounding box of its voxel centres -- of its whole voxels with ``samples``, for the vote --
    plus ``pad`` input voxels per axis; None when entirely outside the input) and the block arguments
    ``args(lo, ranges)``."""
    half = 0.5 * np.abs(m[:3, :3]).sum(axis=1) if samples else np.zeros(3)

    def plan(index, ranges):
        corners = np.array(
            [[ranges[0][c0], ranges[1][c1], ranges[2][c2]] for c0 in (0, 1) for c1 in (0, 1) for c2 in (0, 1)],
            dtype=np.float64,
        )
        corners -= np.array([[c0, c1, c2] for c0 in (0, 1) for c1 in (0, 1) for c2 in (0, 1)])  # last index
        x = corners @ m[:3, :3].T + m[:3, 3]
        xmin, xmax = x.min(axis=0) - half, x.max(axis=0) + half
        if np.any(xmax < -0.5 - 1e-9) or np.any(xmin >= np.array(n_in) - 0.5 + 1e-9):
            return None  # entirely outside the input: zeros, no read
        lo = [max(0, math.floor(xmin[d]) - pad[d]) for d in range(3)]
        hi = [min(n_in[d], math.floor(xmax[d]) + 2 + pad[d]) for d in range(3)]
        lo = [min(a, max(0, b - 1)) for a, b in zip(lo, hi)]
        return lo, hi, args(lo, ranges)

    return plan


def _grid_out_chunks(data: da.Array, shape: tuple[int, ...], m: np.ndarray, chunks: Any) -> tuple:
    """Output chunks of a resampling through ``m``: as :func:`resample`'s (an output chunk's input box at most
    about two input chunks per axis when downsampling), from the width of the box an output voxel spans along
    each input axis (``sum_e |m[d, e]|``: a rotation widens it)."""
    r = np.abs(m[:3, :3]).sum(axis=1)
    default = _default_out_chunks(data, np.full(3, float(r.max())))
    return _normalize_out_chunks(chunks, shape, default)


def resample_to_grid(
    vol: xr.DataArray,
    shape: Sequence[int],
    affine: Any,
    *,
    order: int = 0,
    chunks: Any = None,
    antialias: bool = False,
    mask: xr.DataArray | None = None,
) -> xr.DataArray:
    """Resample a volume onto another grid ``(shape, affine)`` (any orientation or obliquity); lazy.

    Output voxel centres are mapped to input voxel coordinates ``x = inv(affine_in) @ affine @ m``;
    ``order=0`` takes voxel ``floor(x + 0.5)`` (dtype kept: labels, masks), ``order=1``/``3`` interpolate
    (float32; cubic prefiltered) with ``mode="nearest"``; outside the input field of view
    (``x < -0.5`` or ``x >= n - 0.5`` on some axis) the output is 0. With ``antialias`` (``order`` 1 or 3), a
    Gaussian filter of :func:`grid_antialias_sigma` (``mode="nearest"``, truncated at 4 sigma) comes first, as
    :func:`resample` does when coarsening. Equal to ``scipy.ndimage.gaussian_filter`` then
    ``scipy.ndimage.map_coordinates(mode="nearest")`` on the whole array at the same coordinates, masked to the
    field of view (bit-identical for ``order=0``), for any chunking.

    Parameters
    ----------
    vol : xarray.DataArray
        The volume (3-D); labels and masks only with ``order=0``.
    shape : 3 ints
        Target shape.
    affine : array_like, 4x4
        Target voxel-to-world matrix.
    order : {0, 1, 3}
        Nearest neighbour, linear, or cubic B-spline.
    chunks : optional
        Output chunks (dask syntax).
    antialias : bool
        Gaussian anti-aliasing before interpolation (for a coarser target grid).
    mask : xarray.DataArray, optional
        A mask on the volume's grid: the volume is taken as 0 outside it, box by box (as :func:`resample`).

    Returns
    -------
    xarray.DataArray
        Lazy; ``vol``'s dtype and kind for ``order=0``, else a float32 image.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.arange(4, dtype=np.uint8).reshape(4, 1, 1), np.eye(4), kind="labels")
    >>> shifted = np.eye(4); shifted[0, 3] = 2.0
    >>> resample_to_grid(v, (4, 1, 1), shifted).values.ravel().tolist()
    [2, 3, 0, 0]
    """
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0, 1 or 3, got {order}")
    sources = _intensity_sources(vol, 1, mask) if mask is not None else [_check3d(vol, "resample_to_grid")]
    data = sources[0]
    kind = vol.attrs.get("kind", "image")
    if order > 0 and kind in ("labels", "mask"):
        raise ValueError(f"a {kind} volume can only be resampled with order=0 (nearest neighbour)")
    shape = _shape3(shape)
    a_in, a_out = affine_of(vol), np.asarray(affine, dtype=np.float64)
    m = np.linalg.inv(a_in) @ a_out
    n_in = tuple(int(v) for v in vol.shape)
    out_dtype = data.dtype if order == 0 else np.dtype(np.float32)
    sigma_vox = grid_antialias_sigma(m) if (antialias and order > 0) else np.zeros(3)
    if antialias and order > 0:
        out_chunks = _grid_out_chunks(data, shape, m, chunks)
    else:  # as before anti-aliasing existed: about one input chunk of input per output chunk
        ratio = min(1.0, float(spacing_of(a_in).min() / spacing_of(a_out).min()))
        c_in = max(max(c) for c in data.chunks)
        out_chunks = _normalize_out_chunks(chunks, shape, [max(_MIN_OUT_CHUNK, int(c_in * ratio))] * 3)
    base = 1 if order == 0 else (2 if order == 1 else 3 + SPLINE_MARGIN)
    pad = [base + int(_TRUNCATE * sv + 0.5) for sv in sigma_vox]
    extra = (sigma_vox,) if np.any(sigma_vox > 0) else ()
    plan = _grid_plan(m, n_in, pad, lambda lo, ranges: (lo, m, ranges, n_in, order, out_dtype, *extra))
    out = region_map(_to_grid_block, sources, out_chunks, plan, out_dtype, name="resample-to-grid")
    params = {"shape": list(shape), "affine": a_out.tolist(), "order": order}
    if antialias and order > 0:
        params["antialias_sigma_mm"] = (sigma_vox * spacing_of(a_in)).tolist()
    if mask is not None:
        params["masked"] = True
    step = provenance_record("resample_to_grid", params)
    return like(vol, out, affine=a_out, kind=kind if order == 0 else "image", step=step)


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    out = tuple(int(v) for v in shape)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"shape must be three positive integers, got {out}")
    return (out[0], out[1], out[2])


def _vote_offsets(m: np.ndarray) -> np.ndarray:
    """The sample points of the majority vote, as offsets in input voxels from an output voxel's centre: a
    ``q_0 x q_1 x q_2`` lattice at the centres of equal sub-cells of the output voxel, ``q_e`` = the number of
    input voxels the output voxel spans along its axis ``e`` (``ceil`` of the column norm of ``m``, at least
    1)."""
    q = np.maximum(1, np.ceil(np.round(np.sqrt((m[:3, :3] ** 2).sum(axis=0)), 6))).astype(int)
    axes = [(np.arange(q[e]) + 0.5) / q[e] - 0.5 for e in range(3)]
    sub = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)  # output voxel units
    return sub @ m[:3, :3].T


def _codes_in(sub: np.ndarray) -> np.ndarray:
    """The codes present in a box, ascending, with 0 (what samples outside the input vote for)."""
    if sub.dtype.kind == "u" and sub.dtype.itemsize <= 2 and sub.size:
        # masks and label maps: counting is faster than sorting (plane by plane: bincount works on intp copies)
        seen = np.zeros(np.iinfo(sub.dtype).max + 1, dtype=bool)
        for plane in sub.reshape(sub.shape[0], -1):
            hits = np.bincount(plane) > 0
            seen[: len(hits)] |= hits
        present = np.flatnonzero(seen).astype(sub.dtype)
    else:
        present = np.unique(sub)
    return np.union1d(present, np.zeros(1, sub.dtype))


def _vote_block(regions: list, lo: Sequence[int], m: np.ndarray, ranges, n_in: Sequence[int]) -> np.ndarray:
    """The majority of the nearest input voxels at every output voxel's sample points; 0 outside the input."""
    sub = np.asarray(regions[0])
    if sub.dtype == bool:  # a boolean mask votes as 0/1 codes (a bool array would index the code table as a mask)
        return _vote_codes(sub.view(np.uint8), lo, m, ranges, n_in).view(bool)
    return _vote_codes(sub, lo, m, ranges, n_in)


def _vote_codes(sub: np.ndarray, lo: Sequence[int], m: np.ndarray, ranges, n_in: Sequence[int]) -> np.ndarray:
    """:func:`_vote_block` on an integer array."""
    out_shape = tuple(b - a for a, b in ranges)
    codes = _codes_in(sub)  # ascending: ties go to the smallest (argmax's first)
    if len(codes) == 1:  # a box of zeros (most of a mask's or a label map's boxes): nothing to vote on
        return np.zeros(out_shape, sub.dtype)
    offsets = _vote_offsets(m)
    n = np.asarray(n_in, dtype=np.float64)
    xmin, xmax = _corner_extremes(m, ranges)  # = x[d].min(), x[d].max() of _grid_coords (monotone map)
    # every sample inside the input (most boxes): no sample votes 0 for lying outside, no test needed
    inside_all = all(
        xmin[d] + offsets[:, d].min() >= -0.5 and xmax[d] + offsets[:, d].max() < n[d] - 0.5 for d in range(3)
    )
    uniform = len(codes) == 2 and bool(np.all(sub == codes[1])) if codes[0] == 0 else False
    if uniform and inside_all:
        return np.full(out_shape, codes[1], dtype=sub.dtype)
    if len(offsets) == 1:  # one sample per voxel (no axis spans two input voxels): the vote is that sample
        out = np.empty(out_shape, dtype=sub.dtype)
        r0 = np.array([a for a, _ in ranges], dtype=np.int64)
        _nearest_nb(
            np.ascontiguousarray(sub),
            np.asarray(lo, np.int64),
            np.ascontiguousarray(m[:3]),
            r0,
            np.ascontiguousarray(offsets[0], dtype=np.float64),
            n,
            inside_all,
            out,
        )
        return out
    x = _grid_coords(m, ranges)
    lut = None
    if codes[0] >= 0 and codes[-1] < 2**16:  # a table beats a binary search per sample
        lut = np.zeros(int(codes[-1]) + 1, dtype=np.intp)
        lut[codes.astype(np.intp)] = np.arange(len(codes))
    zero = int(np.searchsorted(codes, 0))
    counts = np.zeros((len(codes), x[0].size), dtype=np.int32)
    voxel = np.arange(x[0].size)
    for off in offsets:
        xs = x + off.reshape(3, 1, 1, 1)
        idx = np.floor(xs + 0.5).astype(np.intp)
        for d in range(3):
            idx[d] = np.clip(idx[d] - lo[d], 0, sub.shape[d] - 1)
        values = sub[idx[0], idx[1], idx[2]]
        pos = lut[values] if lut is not None else np.searchsorted(codes, values)
        if not inside_all:
            pos = np.where(np.all((xs >= -0.5) & (xs < n.reshape(3, 1, 1, 1) - 0.5), axis=0), pos, zero)
        counts[pos.ravel(), voxel] += 1  # one sample per voxel: no repeated index
    return codes[np.argmax(counts, axis=0)].reshape(out_shape).astype(sub.dtype)


def _corner_extremes(m: np.ndarray, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, the least and greatest input coordinate of :func:`_grid_coords` over ``ranges``: at the box's
    corners (the rounded affine map is monotone in each index), computed by the same expression."""
    vals = np.array(
        [
            [m[d, 0] * float(i) + m[d, 1] * float(j) + m[d, 2] * float(k) + m[d, 3] for d in range(3)]
            for i in (ranges[0][0], ranges[0][1] - 1)
            for j in (ranges[1][0], ranges[1][1] - 1)
            for k in (ranges[2][0], ranges[2][1] - 1)
        ]
    )
    return vals.min(axis=0), vals.max(axis=0)


@njit(cache=True, nogil=True)
def _nearest_nb(
    sub: np.ndarray,
    lo: np.ndarray,
    m: np.ndarray,
    r0: np.ndarray,
    off: np.ndarray,
    n_in: np.ndarray,
    inside_all: bool,
    out: np.ndarray,
) -> None:  # pragma: no cover (compiled)
    """The code of the input voxel nearest to every output voxel's point ``x + off`` (0 for points outside the
    input unless ``inside_all``): what :func:`_vote_block`'s count table and argmax give with one sample per
    voxel, from the same coordinates (((m0 i + m1 j) + m2 k) + m3, plus off), without the arrays."""
    nb = sub.shape
    idx = np.empty(3, np.int64)
    for a in range(out.shape[0]):
        for b in range(out.shape[1]):
            for c in range(out.shape[2]):
                fi, fj, fk = float(r0[0] + a), float(r0[1] + b), float(r0[2] + c)
                inside = True
                for d in range(3):
                    x = m[d, 0] * fi + m[d, 1] * fj
                    x = x + m[d, 2] * fk
                    x = x + m[d, 3]
                    xs = x + off[d]
                    if not (xs >= -0.5 and xs < n_in[d] - 0.5):
                        inside = False
                    k = int(np.floor(xs + 0.5)) - lo[d]
                    idx[d] = min(max(k, 0), nb[d] - 1)
                if inside or inside_all:
                    out[a, b, c] = sub[idx[0], idx[1], idx[2]]
                else:
                    out[a, b, c] = 0


def resample_labels_to_grid(
    vol: xr.DataArray, shape: Sequence[int], affine: Any, *, method: str = "majority", chunks: Any = None
) -> xr.DataArray:
    """Resample a label map or mask onto another grid ``(shape, affine)`` (any orientation); lazy, dtype kept.

    ``method="nearest"``: :func:`resample_to_grid` with ``order=0``. ``method="majority"``: a 3-D vote among
    the nearest input voxels at ``q_0 x q_1 x q_2`` points spread evenly over the output voxel (the centres of
    equal sub-cells; ``q_e`` = how many input voxels the output voxel spans along its axis ``e``, rounded up),
    ties to the smallest code, points outside the input voting 0. For an integer downsampling of aligned grids
    the points are the input voxel centres, and this is :func:`resample_labels`' exact block majority; when
    upsampling it is the nearest neighbour. Bit-identical for every chunking.

    Parameters
    ----------
    vol : xarray.DataArray
        Label map or mask (3-D).
    shape : 3 ints
        Target shape.
    affine : array_like, 4x4
        Target voxel-to-world matrix.
    method : {"majority", "nearest"}
        The rule above.
    chunks : optional
        Output chunks (dask syntax).

    Returns
    -------
    xarray.DataArray
        A lazy volume of ``vol``'s dtype and kind on the target grid.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((6, 1, 1), np.uint8); lab[2:, 0, 0] = 7
    >>> v = make_volume(da.from_array(lab), np.eye(4), kind="labels")
    >>> coarse = np.diag([3.0, 1.0, 1.0, 1.0]); coarse[0, 3] = 1.0      # voxels 0-2 and 3-5
    >>> resample_labels_to_grid(v, (2, 1, 1), coarse).values.ravel().tolist()
    [0, 7]
    """
    if method not in ("nearest", "majority"):
        raise ValueError(f"method must be 'nearest' or 'majority', got {method!r}")
    if method == "nearest":
        return resample_to_grid(vol, shape, affine, order=0, chunks=chunks)
    data = _check3d(vol, "resample_labels_to_grid")
    shape = _shape3(shape)
    a_out = np.asarray(affine, dtype=np.float64)
    m = np.linalg.inv(affine_of(vol)) @ a_out
    n_in = tuple(int(v) for v in vol.shape)
    plan = _grid_plan(m, n_in, [1, 1, 1], lambda lo, ranges: (lo, m, ranges, n_in), samples=True)
    out_chunks = _grid_out_chunks(data, shape, m, chunks)
    out = region_map(_vote_block, [data], out_chunks, plan, data.dtype, name="resample-labels-vote")
    step = provenance_record(
        "resample_labels_to_grid",
        {"shape": list(shape), "affine": a_out.tolist(), "method": method, "samples": len(_vote_offsets(m))},
    )
    return like(vol, out, affine=a_out, step=step)
