"""Coarse-grid tools shared by the background (:mod:`helm_dask.background`) and bias (:mod:`helm_dask.bias`) stages.

Both stages fit their models on a small coarse copy of the scan and evaluate them at full resolution; this module
holds what they share: volume checks (:func:`check_3d`, :func:`as_dask`), the exact, chunking-independent coarse
block mean (:func:`coarse_factors`, :func:`block_mean`, :func:`block_centres`), a deterministic weighted 1-D Gaussian
mixture (:func:`gmm1d`) and the smooth 3-D DCT field -- its basis (:func:`dct_basis`, :func:`n_dct_functions`), its
separable evaluation (:func:`separable`), its normal equations (:func:`normal_matrix`) and a weighted least-squares
fit (:func:`fit_dct_lsq`). It imports neither stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from numba import njit

from . import arrays
from .errors import HelmError
from .io.regions import StoreView, box_cells, box_tasks, chunk_edges, store_view_of
from .io.store import compute_batched

__all__ = [
    "as_dask",
    "block_centres",
    "block_mean",
    "check_3d",
    "coarse_factors",
    "dct_basis",
    "fit_dct_lsq",
    "gmm1d",
    "n_dct_functions",
    "normal_matrix",
    "separable",
    "shape3",
]

#: target chunk length (voxels) used for the aligned block-sum pass; fixed so the coarse copy does not depend
#: on the input chunking (each coarse block is summed inside one task, in one fixed order).
_BLOCK_TARGET = 128


def shape3(values: Iterable[Any]) -> tuple[int, int, int]:
    """A 3-D shape (or per-axis factors) as a tuple of Python ints.

    Parameters
    ----------
    values : iterable
        Three integers (NumPy or Python).

    Returns
    -------
    tuple of 3 ints

    Examples
    --------
    >>> shape3(np.array([4, 5, 6]))
    (4, 5, 6)
    """
    return cast("tuple[int, int, int]", tuple(int(v) for v in values))


# ----------------------------------------------------------------------------------------------------------
# volumes and the exact coarse block mean
# ----------------------------------------------------------------------------------------------------------


def check_3d(vol: xr.DataArray, what: str) -> None:
    """Raise a :class:`~helm_dask.errors.HelmError` unless ``vol`` is a 3-D volume (a DataArray with an affine).

    Parameters
    ----------
    vol : DataArray
        The volume to check.
    what : str
        Its name in the error message (e.g. ``"image"``).

    Examples
    --------
    >>> from helm_dask.volume import make_volume
    >>> check_3d(make_volume(np.zeros((2, 2, 2)), np.eye(4)), "image")
    >>> check_3d(np.zeros((2, 2, 2)), "mask")
    Traceback (most recent call last):
    ...
    helm_dask.errors.HelmError: mask must be a volume (xarray.DataArray with attrs['affine'])...
    """
    if not isinstance(vol, xr.DataArray) or "affine" not in vol.attrs:
        raise HelmError(
            f"{what} must be a volume (xarray.DataArray with attrs['affine'])",
            hint="Build it with helm_dask.make_volume or open it with helm_dask.io.",
        )
    if vol.ndim != 3:
        raise HelmError(
            f"{what} must be 3-D (x, y, z); got dims {vol.dims}",
            path=vol.attrs.get("source") or None,
            hint="Choose one echo or combine echoes (rms/mean) before this stage.",
        )


def as_dask(vol: xr.DataArray) -> da.Array:
    """A volume's data as a dask array (wrapped in chunks of ``_BLOCK_TARGET`` voxels when it is in memory).

    Parameters
    ----------
    vol : DataArray
        A volume, lazy or in memory.

    Returns
    -------
    dask.array.Array
        ``vol.data`` itself when it is already a dask array.

    Examples
    --------
    >>> from helm_dask.volume import make_volume
    >>> as_dask(make_volume(np.zeros((4, 4, 4)), np.eye(4))).chunksize
    (4, 4, 4)
    """
    return arrays.as_dask(vol, chunks=_BLOCK_TARGET)


def coarse_factors(spacing_mm: Any, coarse_spacing_mm: float) -> tuple[int, int, int]:
    """Integer block factor per axis so that ``factor * spacing`` is as close as possible to the target.

    Parameters
    ----------
    spacing_mm : array-like of 3 floats
        Voxel size (mm) per axis.
    coarse_spacing_mm : float
        Target coarse voxel size (mm), > 0.

    Returns
    -------
    tuple of 3 int
        Block factor per axis (at least 1).

    Examples
    --------
    >>> coarse_factors([0.5, 0.5, 0.25], 1.0)
    (2, 2, 4)
    """
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if coarse_spacing_mm <= 0:
        raise HelmError(f"coarse_spacing_mm must be > 0, got {coarse_spacing_mm}")
    return shape3(max(1, round(float(coarse_spacing_mm) / s)) for s in sp)


@njit(cache=True, nogil=True)
def _pairwise_leaf_nb(a, lo, n):  # pragma: no cover (compiled)
    """NumPy's pairwise sum of ``a[lo : lo + n]`` for ``n <= 128``: eight accumulators (a plain loop below 8)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True)
def _pairwise_sum_nb(a, n):  # pragma: no cover (compiled)
    """NumPy's pairwise sum of ``a[:n]`` (float64, contiguous): the same operations in the same order as its
    ``add.reduce`` inner loop (:func:`_pairwise_leaf_nb` up to 128 values, above that the two halves split at a
    multiple of 8, added), hence the same number. The recursion is unrolled into a stack: numba cannot load a
    recursive function from its cache."""
    lo_s = np.empty(64, np.int64)
    n_s = np.empty(64, np.int64)
    state = np.empty(64, np.int64)
    vals = np.empty(64, np.float64)
    sp, vp = 1, 0
    lo_s[0], n_s[0], state[0] = 0, n, 0
    while sp > 0:
        lo, m = lo_s[sp - 1], n_s[sp - 1]
        if m <= 128:
            vals[vp] = _pairwise_leaf_nb(a, lo, m)
            vp += 1
            sp -= 1
            continue
        half = m // 2
        half -= half % 8
        if state[sp - 1] == 0:  # the first half
            state[sp - 1] = 1
            lo_s[sp], n_s[sp], state[sp] = lo, half, 0
            sp += 1
        elif state[sp - 1] == 1:  # then the second
            state[sp - 1] = 2
            lo_s[sp], n_s[sp], state[sp] = lo + half, m - half, 0
            sp += 1
        else:  # both done: their sum
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            sp -= 1
    return vals[0]


@njit(cache=True, nogil=True)
def _block_sums_nb(block, f0, f1, f2):  # pragma: no cover (compiled)
    """Sum of each ``f0 x f1 x f2`` block of ``block`` (whole blocks only), in float64, NaN and inf as 0: the
    block's values gathered in C order into one row and summed as ``np.sum`` sums a row (from +0.0)."""
    n0, n1, n2 = block.shape[0] // f0, block.shape[1] // f1, block.shape[2] // f2
    out = np.empty((n0, n1, n2), np.float64)
    row = np.empty(f0 * f1 * f2, np.float64)
    for a in range(n0):
        for b in range(n1):
            for c in range(n2):
                q = 0
                for i in range(a * f0, (a + 1) * f0):
                    for j in range(b * f1, (b + 1) * f1):
                        for k in range(c * f2, (c + 1) * f2):
                            v = np.float64(block[i, j, k])
                            row[q] = v if np.isfinite(v) else 0.0
                            q += 1
                out[a, b, c] = 0.0 + _pairwise_sum_nb(row, q)
    return out


def _block_sum_chunk(block: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Sum of each factor-sized block of one chunk, in float64, in a fixed order (NaN counts as 0): each coarse
    voxel's values as one row in C order, summed by NumPy's pairwise routine whatever the chunk looks like.
    Compiled (:func:`_block_sums_nb`): the same numbers as the NumPy version (a float64 copy, transposed so that
    each block is a row, then ``sum``; tested bit for bit), which took 15 ms per 120^3 chunk."""
    b = np.asarray(block)  # 3-D real numbers or bool: block_mean's volumes (check_3d)
    return _block_sums_nb(b.view(np.uint8) if b.dtype == np.bool_ else b, *(int(f) for f in factors))


def _aligned_block_sums(arr: da.Array, factors: tuple[int, int, int]) -> da.Array:
    """Lazy coarse block sums (float64) of a 3-D dask array; partial edge blocks sum what they contain."""
    pad = [(0, (-s) % f) for s, f in zip(arr.shape, factors)]
    if any(p[1] for p in pad):
        arr = da.pad(arr, pad, mode="constant", constant_values=0)
    # chunks that are whole multiples of the factor and do NOT depend on the input chunking
    target = tuple(max(f, f * max(1, round(_BLOCK_TARGET / f))) for f in factors)
    arr = arr.rechunk(target)
    out_chunks = tuple(tuple(c // f for c in cs) for cs, f in zip(arr.chunks, factors))
    return da.map_blocks(_block_sum_chunk, arr, factors, dtype=np.float64, chunks=out_chunks)


# ---- exact block sums, in any order -------------------------------------------------------------------------
# A float32 value is an integer mantissa (24 bits) times 2 ** (exponent - 150). Its block's sum is kept as 16
# int64 "digits", one per window of 16 exponents (the mantissa shifted by the exponent within the window: < 2**39,
# so a block of under 2**23 values fits a digit with room for the carries): integers, so the parts of a block
# that chunk edges cut add exactly in any order, and the float64 made from them depends on the block's values
# only -- no rechunk to whole blocks is needed.
_WINDOWS = 16
_WINDOW_SCALE = np.array([2.0 ** (16 * q - 150) for q in range(_WINDOWS)])


@njit(cache=True, nogil=True)
def _digits_nb(x, m, use_mask, start, f, t_lo, digits, counts):  # pragma: no cover (compiled)
    """Add the float32 values of ``x`` (voxel ``start`` of the volume at ``x[0, 0, 0]``; where ``m`` if
    ``use_mask``) into the ``digits`` of their blocks (block ``t_lo`` at ``digits[0, 0, 0]``) and, if
    ``use_mask``, count them (without a mask the counts are the block sizes: 3.9 -> 3.0 ms per 128^3 chunk
    without the count and with the block row hoisted); NaN and inf count as 0."""
    n0, n1, n2 = x.shape
    bits = x.view(np.int32)
    bk = np.empty(n2, np.int64)
    for k in range(n2):
        bk[k] = (start[2] + k) // f[2] - t_lo[2]
    for i in range(n0):
        bi = (start[0] + i) // f[0] - t_lo[0]
        for j in range(n1):
            bj = (start[1] + j) // f[1] - t_lo[1]
            row = digits[bi, bj]
            for k in range(n2):
                if use_mask:
                    if m[i, j, k] == 0:
                        continue
                    counts[bi, bj, bk[k]] += 1
                u = bits[i, j, k]
                e = (u >> 23) & 0xFF
                mant = u & 0x7FFFFF
                if e == 255 or (e == 0 and mant == 0):
                    continue
                if e > 0:
                    mant |= 0x800000
                else:
                    e = 1  # subnormal: mant * 2**-149
                v = np.int64(mant) << (e & 15)
                if u < 0:
                    row[bk[k], e >> 4] -= v
                else:
                    row[bk[k], e >> 4] += v


@njit(cache=True, nogil=True)
def _digits_to_float_nb(stacked, windows, scale):  # pragma: no cover (compiled)
    """The float64 of each block's digits (``stacked[i]``: the digits of window ``windows[i]``, the others 0):
    carried into base 2**16 over all the windows (the lower digits in [0, 2**16), the top one signed: one form
    per integer), then added from the top down -- a function of the block's exact sum only."""
    nw, n0, n1, n2 = stacked.shape
    nq = scale.size
    out = np.empty((n0, n1, n2), np.float64)
    d = np.empty(nq, np.int64)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                d[:] = 0
                for w in range(nw):
                    d[windows[w]] = stacked[w, i, j, k]
                carry = np.int64(0)
                for q in range(nq - 1):
                    t = d[q] + carry
                    carry = t >> 16
                    d[q] = t & 0xFFFF
                d[nq - 1] += carry
                v = 0.0
                for q in range(nq - 1, -1, -1):
                    v += np.float64(d[q]) * scale[q]
                out[i, j, k] = v
    return out


def _exact_parts(pieces: Iterable[tuple], use_mask: bool, t_lo: np.ndarray, t_hi: Sequence[int]) -> np.ndarray:
    """The part of blocks ``t_lo .. t_hi`` that ``pieces`` (``(values, mask or None, start, factors)`` each)
    add up to: ``(first block, first window, digits, counts)`` in a (1, 1, 1) object array (the windows no value
    uses are left out; the counts are None without a mask)."""
    shape = tuple(int(b - a) for a, b in zip(t_lo, t_hi))
    digits = np.zeros(shape + (_WINDOWS,), np.int64)
    counts = np.zeros(shape if use_mask else (1, 1, 1), np.int64)
    for x, m, start, factors in pieces:
        x = np.ascontiguousarray(x, dtype=np.float32)  # uint8 / (u)int16 / bool: exact in float32
        mm = np.zeros((1, 1, 1), np.uint8) if m is None else np.ascontiguousarray(_as_bool(m)).view(np.uint8)
        st, fs = np.asarray(start, np.int64), np.asarray(factors, np.int64)
        _digits_nb(x, mm, use_mask, st, fs, t_lo, digits, counts)
    used = np.flatnonzero(digits.reshape(-1, _WINDOWS).any(axis=0))
    q0, q1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
    out = np.empty((1, 1, 1), dtype=object)
    out[0, 0, 0] = (tuple(int(t) for t in t_lo), q0, digits[..., q0:q1], counts if use_mask else None)
    return out


def _as_bool(m: np.ndarray) -> np.ndarray:
    """A mask's voxels as bool (``> 0``; a bool mask as it is)."""
    return m if m.dtype == np.bool_ else m > 0


def _block_range(start: Sequence[int], shape: Sequence[int], factors: Sequence[int]) -> tuple[np.ndarray, list]:
    """The first block and the block after the last that the box ``start`` + ``shape`` touches, per axis."""
    t_lo = np.array([a // f for a, f in zip(start, factors)], np.int64)
    return t_lo, [-(-(a + n) // f) for a, n, f in zip(start, shape, factors)]


def _exact_chunk(x: np.ndarray, m: np.ndarray | None, start: tuple, factors: tuple) -> np.ndarray:
    """One chunk's part of the blocks it touches (:func:`_exact_parts`)."""
    t_lo, t_hi = _block_range(start, x.shape, factors)
    return _exact_parts([(x, m, start, factors)], m is not None, t_lo, t_hi)


def exact_block_sums(
    arr: da.Array, factors: tuple, mask: da.Array | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Block sums of a float32 (or bool / 8- or 16-bit integer) volume, computed: the exact sum of each block's
    finite values (where ``mask > 0``, if given) as a float64 that depends on those values only, and with
    ``mask`` the count of its voxels per block. A stored volume (and mask) is read by tasks of a few stored
    chunks each (:func:`_stored_parts`), nothing else of its graph runs.

    Each chunk is summed into the blocks it touches in the task that reads it (:func:`_exact_chunk`); the parts
    of a block that chunk edges cut add as integers here, in any order. The float sum of NumPy needs each block
    in one task, hence a rechunk to whole blocks: at 0.1 mm the brain mask's coarse copy was 12,553 split tasks
    and 15 s of transfers for 3,584 chunks, 80 s against 22.5 s for a read pass. Memory here: one int64 per
    block and exponent window the data use (2-3 windows for a scan: ~28 MB each at 0.1 mm and 1 mm blocks).
    """
    parts = _stored_parts(arr, mask, factors)
    if parts is None:
        token = tokenize(arr.name, None if mask is None else mask.name, tuple(factors))
        if mask is not None and mask.chunks != arr.chunks:
            mask = mask.rechunk(arr.chunks)
        edges = chunk_edges(arr.chunks)
        name = f"exact-block-parts-{token}"
        layer: dict = {
            (name, *idx): (
                _exact_chunk,
                (arr.name, *idx),
                None if mask is None else (mask.name, *idx),
                tuple(int(e[i]) for e, i in zip(edges, idx)),
                tuple(int(f) for f in factors),
            )
            for idx in np.ndindex(*arr.numblocks)
        }
        deps: list = [arr] if mask is None else [arr, mask]
        graph = HighLevelGraph.from_collections(name, layer, dependencies=deps)
        parts = da.Array(graph, name, chunks=tuple((1,) * n for n in arr.numblocks), dtype=object)
    nblocks = tuple(-(-int(n) // int(f)) for n, f in zip(arr.shape, factors))
    windows: dict[int, np.ndarray] = {}
    counts = None if mask is None else np.zeros(nblocks, np.int64)  # without a mask they are the block sizes

    def add(region: tuple, values: list) -> None:
        for part in values[0].ravel():
            t_lo, q0, digits, c = part
            box = tuple(slice(t, t + n) for t, n in zip(t_lo, digits.shape[:3]))
            if counts is not None:
                counts[box] += c
            for q in range(digits.shape[-1]):
                if q0 + q not in windows:
                    windows[q0 + q] = np.zeros(nblocks, np.int64)
                windows[q0 + q][box] += digits[..., q]

    compute_batched([parts], each=add)
    used = sorted(windows)
    stacked = np.stack([windows.pop(q) for q in used]) if used else np.zeros((0,) + nblocks, np.int64)
    sums = _digits_to_float_nb(stacked, np.asarray(used, np.int64), _WINDOW_SCALE)
    return sums, None if counts is None else counts.astype(np.float64)


#: Chunks per axis of a stored volume that one task of :func:`exact_block_sums` reads from the store, one after
#: the other (8 chunks): one task per chunk cost the 2-core machine's scheduler ~2 ms per task beside the
#: workers. Brain mask's coarse copy of the 0.1 mm template phantom (Xeon): 1,792 tasks of ~11 ms took 17.1 s,
#: the workers busy 56% of it; 224 tasks of 2x2x2 chunks 11.1 s, busy 80% (a plain read pass: 9.6 s).
_PARTS_GROUP = 2


def _exact_box(first: list, edges: list, view: StoreView, mview: StoreView | None, factors: tuple) -> np.ndarray:
    """The part of a box of a stored volume (and mask) whose chunks have the ``edges`` (per axis): each chunk
    read from the store and added in turn (copying them into one box first: 13.8 s instead of 11.1 s for the
    0.1 mm coarse copy)."""
    lo, hi = [int(e[0]) for e in edges], [int(e[-1]) for e in edges]
    t_lo, t_hi = _block_range(lo, [b - a for a, b in zip(lo, hi)], factors)
    pieces = (
        (view.read(c_lo, c_hi), None if mview is None else mview.read(c_lo, c_hi), c_lo, factors)
        for _, c_lo, c_hi in box_cells(edges)
    )
    return _exact_parts(pieces, mview is not None, t_lo, t_hi)


def _stored_parts(arr: da.Array, mask: da.Array | None, factors: tuple) -> da.Array | None:
    """The parts of :func:`exact_block_sums` for a stored volume (and stored mask): one task per box of
    :data:`_PARTS_GROUP` chunks per axis, reading the store itself (nothing of ``arr``'s graph runs); None
    when the volume or the mask is not stored (:func:`~helm_dask.io.regions.store_view_of`)."""
    view = store_view_of(arr)
    mview = None if mask is None else store_view_of(mask)
    if view is None or (mask is not None and (mview is None or mview.shape != view.shape)):
        return None
    token = tokenize(arr.name, None if mask is None else mask.name, tuple(factors), _PARTS_GROUP)
    fs = tuple(int(f) for f in factors)
    return box_tasks(_exact_box, arr.chunks, _PARTS_GROUP, view, mview, fs, name=f"exact-block-parts-stored-{token}")


def _exact_ok(arr: da.Array, factors: tuple) -> bool:
    """Whether :func:`exact_block_sums` takes this volume: float32 or small integers, blocks under 2**23 voxels."""
    dt = np.dtype(arr.dtype)
    small = dt == np.float32 or dt == np.bool_ or (dt.kind in "iu" and dt.itemsize <= 2)
    return bool(small and math.prod(int(f) for f in factors) < 2**23 and arr.ndim == 3)


def _block_counts(shape: tuple[int, ...], factors: tuple[int, ...]) -> np.ndarray:
    """Number of full-resolution voxels in each coarse block (exact, analytic)."""
    per_axis = []
    for n, f in zip(shape, factors):
        nc = -(-n // f)
        c = np.full(nc, f, dtype=np.float64)
        c[-1] = n - f * (nc - 1)
        per_axis.append(c)
    return per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]


def block_centres(n: int, f: int) -> np.ndarray:
    """Full-resolution (continuous) voxel index of the centre of each coarse block along one axis.

    Parameters
    ----------
    n : int
        Voxels along the axis at full resolution.
    f : int
        Block factor along the axis (the last block may be cut by the field of view).

    Returns
    -------
    ndarray, float64
        One centre per coarse block, ``ceil(n / f)`` of them.

    Examples
    --------
    >>> block_centres(5, 2)
    array([0.5, 2.5, 4. ])
    """
    nc = -(-n // f)
    start = np.arange(nc) * f
    stop = np.minimum(start + f, n)
    return (start + stop - 1) / 2.0


def block_mean(
    vol: xr.DataArray, factors: tuple[int, int, int], *, mask: xr.DataArray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact coarse block mean of a volume (computed eagerly; the result is small).

    Parameters
    ----------
    vol : DataArray
        3-D image volume (lazy).
    factors : tuple of int
        Block size per axis (voxels). Edge blocks that are cut by the field of view average what they hold.
    mask : DataArray, optional
        If given, the mean is taken over mask voxels only (blocks without mask voxels get 0).

    Returns
    -------
    mean : ndarray, float64
        Coarse block means, shape ``ceil(shape / factors)``.
    fraction : ndarray, float64
        Fraction of each block's voxels that were averaged (1 without a mask).

    Notes
    -----
    The sums are float64 and every block is summed inside one task in one fixed order, so the result is
    bit-identical for any input chunking.

    Examples
    --------
    >>> import dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.arange(64.0).reshape(4, 4, 4), np.eye(4))
    >>> block_mean(v, (2, 2, 2))[0][0, 0, 0]
    np.float64(10.5)
    """
    arr = as_dask(vol)
    counts = _block_counts(arr.shape, factors)
    exact = _exact_ok(arr, factors)
    if mask is None:
        if exact:
            s, _ = exact_block_sums(arr, factors)
        else:
            (s,) = compute_batched([_aligned_block_sums(arr, factors)])
        return s / counts, np.ones_like(counts)
    m = as_dask(mask)
    if exact:  # a stored mask as it is, so that its boxes are read from the store (> 0 in the tasks)
        s, cm = exact_block_sums(arr, factors, mask=m if store_view_of(m) is not None else m > 0)
        assert cm is not None  # a mask was given
        return np.divide(s, cm, out=np.zeros_like(s), where=cm > 0), cm / counts
    m = m > 0
    # in boxes: the rechunk to whole blocks (e.g. 128 -> 120 voxels for 2 mm blocks at 0.1 mm) would otherwise
    # let the scheduler hold split input chunks across whole cross-sections of the volume
    s, cm = compute_batched(
        [_aligned_block_sums(da.where(m, arr, 0), factors), _aligned_block_sums(m.astype(np.float32), factors)]
    )
    mean = np.divide(s, cm, out=np.zeros_like(s), where=cm > 0)
    return mean, cm / counts


# ----------------------------------------------------------------------------------------------------------
# 1-D Gaussian mixture (weighted EM, deterministic)
# ----------------------------------------------------------------------------------------------------------


def gmm1d(
    x: np.ndarray,
    weights: np.ndarray | None = None,
    n_components: int = 3,
    *,
    max_iter: int = 500,
    tol: float = 1e-10,
    var_floor: float | None = None,
) -> dict:
    """Fit a 1-D Gaussian mixture by EM to (optionally weighted) samples; deterministic.

    The start is deterministic (component means at the weighted quantiles ``(k + 1/2) / K``), so there is no
    random seed. Weights let the fit run on a histogram (bin centres weighted by counts).

    Parameters
    ----------
    x : ndarray
        Samples (or histogram bin centres); non-finite ones are ignored.
    weights : ndarray, optional
        Non-negative weight per sample (e.g. bin counts); zero-weight samples are ignored.
    n_components : int
        Number of Gaussian classes.
    max_iter, tol : int, float
        EM iterations and relative log-likelihood tolerance.
    var_floor : float, optional
        Lower bound of each class variance (default ``1e-6`` times the samples' variance).

    Returns
    -------
    dict
        ``weights``, ``means``, ``sds`` (lists, sorted by increasing mean), ``loglik`` (mean log-likelihood per
        unit weight) and ``n_iter``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, 5000), rng.normal(6, 1, 5000)]
    >>> [round(m, 1) for m in gmm1d(x, n_components=2)["means"]]
    [0.0, 6.0]
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    keep = (w > 0) & np.isfinite(x)
    x, w = x[keep], w[keep]
    K = int(n_components)
    if K < 1 or x.size < K:
        raise HelmError(
            f"cannot fit a {K}-class intensity mixture to {x.size} distinct samples",
            hint="The image has too little signal; check the input.",
        )
    w = w / w.sum()
    mu_all = float(np.sum(w * x))
    var_all = float(np.sum(w * (x - mu_all) ** 2))
    if not var_all > 0:
        raise HelmError(
            "the intensities are constant: nothing to separate", hint="The image looks empty (all background)."
        )
    floor = var_floor if var_floor is not None else 1e-6 * var_all
    order = np.argsort(x, kind="stable")
    cdf = np.cumsum(w[order])
    q = (np.arange(K) + 0.5) / K
    means = x[order][np.minimum(np.searchsorted(cdf, q), x.size - 1)].astype(np.float64)
    # spread ties (e.g. few distinct values) so that components start distinct
    means = means + np.arange(K) * 1e-6 * math.sqrt(var_all)
    var = np.full(K, max(var_all / K**2, floor))
    pi = np.full(K, 1.0 / K)
    prev = -np.inf
    ll = -np.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        logp = (
            np.log(pi)[None, :]
            - 0.5 * np.log(2 * np.pi * var)[None, :]
            - 0.5 * (x[:, None] - means[None, :]) ** 2 / var[None, :]
        )
        mx = logp.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logp - mx).sum(axis=1))
        ll = float(np.sum(w * lse))
        r = np.exp(logp - lse[:, None]) * w[:, None]
        nk = r.sum(axis=0)
        nk = np.maximum(nk, 1e-300)
        means = (r * x[:, None]).sum(axis=0) / nk
        var = np.maximum((r * (x[:, None] - means[None, :]) ** 2).sum(axis=0) / nk, floor)
        pi = np.maximum(nk / nk.sum(), 1e-12)
        pi = pi / pi.sum()
        if abs(ll - prev) <= tol * max(1.0, abs(ll)):
            break
        prev = ll
    o = np.argsort(means, kind="stable")
    return {
        "weights": pi[o].tolist(),
        "means": means[o].tolist(),
        "sds": np.sqrt(var[o]).tolist(),
        "loglik": ll,
        "n_iter": int(n_iter),
    }


# ----------------------------------------------------------------------------------------------------------
# smooth 3-D DCT field (tensor-product basis)
# ----------------------------------------------------------------------------------------------------------


def dct_basis(u: np.ndarray, n_voxels: int, n_functions: int) -> np.ndarray:
    """DCT-II basis along one axis at continuous voxel indices ``u``: shape ``(len(u), n_functions)``.

    ``phi_k(u) = cos(pi * k * (u + 0.5) / n_voxels)``; ``k = 0`` is the constant. The basis is defined over the
    whole axis of ``n_voxels`` voxels, so the same function is evaluated at coarse block centres and at
    full-resolution voxel centres.

    Parameters
    ----------
    u : ndarray
        Continuous voxel indices along the axis.
    n_voxels : int
        Voxels along the axis (the basis' extent).
    n_functions : int
        Number of basis functions (lowest frequencies).

    Returns
    -------
    ndarray, float64
        Shape ``(len(u), n_functions)``.

    Examples
    --------
    >>> dct_basis(np.array([0.0, 3.0]), 4, 2).round(3)
    array([[ 1.   ,  0.924],
           [ 1.   , -0.924]])
    """
    u = np.asarray(u, dtype=np.float64)
    k = np.arange(n_functions, dtype=np.float64)
    return np.cos(np.pi * np.outer(u + 0.5, k) / float(n_voxels))


def separable(c: np.ndarray, b0: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """A DCT field on an outer grid: ``sum_abc c[a,b,c] b0[x,a] b1[y,b] b2[z,c]``.

    Contracted one axis at a time, so the intermediates stay small.

    Parameters
    ----------
    c : ndarray (K0, K1, K2)
        Coefficients.
    b0, b1, b2 : ndarray
        Basis matrices along each axis (:func:`dct_basis`), shapes ``(n_i, K_i)``.

    Returns
    -------
    ndarray (n0, n1, n2)
        The field.

    Examples
    --------
    >>> b = [dct_basis(np.arange(n), n, 2) for n in (2, 3, 4)]
    >>> separable(np.eye(2)[:, :, None] * np.ones((2, 2, 2)), *b).shape
    (2, 3, 4)
    """
    t = np.tensordot(b0, c, axes=(1, 0))  # x, b, c
    t = np.tensordot(t, b1, axes=(1, 1))  # x, c, y
    t = np.tensordot(t, b2, axes=(1, 1))  # x, y, z
    return t


def normal_matrix(w: np.ndarray, b0: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """``Phi^T diag(w) Phi`` for the Kronecker basis ``Phi = b0 x b1 x b2``, without forming Phi (SAMSEG's trick).

    Parameters
    ----------
    w : ndarray (n0, n1, n2)
        Voxel weights.
    b0, b1, b2 : ndarray
        Basis matrices along each axis, shapes ``(n_i, K_i)``.

    Returns
    -------
    ndarray (P, P)
        The normal matrix, ``P = K0 K1 K2``, coefficients in C order of ``(K0, K1, K2)``.

    Examples
    --------
    >>> b = [dct_basis(np.arange(n), n, 2) for n in (3, 3, 3)]
    >>> normal_matrix(np.ones((3, 3, 3)), *b).shape
    (8, 8)
    """
    t = np.einsum("xyz,zc,zC->xycC", w, b2, b2, optimize=True)
    t = np.einsum("xycC,yb,yB->xbBcC", t, b1, b1, optimize=True)
    t = np.einsum("xbBcC,xa,xA->abcABC", t, b0, b0, optimize=True)
    p = b0.shape[1] * b1.shape[1] * b2.shape[1]
    return t.reshape(p, p)


def n_dct_functions(n_voxels: int, spacing_mm: float, basis_spacing_mm: float) -> int:
    """Number of DCT functions along an axis: the frequencies whose wavelength ``2 L / k`` is at least
    ``basis_spacing_mm`` (``L`` the axis' length in mm), the constant included.

    Parameters
    ----------
    n_voxels : int
        Voxels along the axis.
    spacing_mm : float
        Voxel size along the axis (mm).
    basis_spacing_mm : float
        Shortest wavelength kept (mm).

    Returns
    -------
    int

    Examples
    --------
    >>> n_dct_functions(150, 1.0, 75.0)
    5
    """
    length = n_voxels * spacing_mm
    return int(math.floor(2.0 * length / basis_spacing_mm + 1e-9)) + 1


def fit_dct_lsq(
    values: np.ndarray, w: np.ndarray, B: list[np.ndarray], *, regularization: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares fit of a smooth DCT field (constant included) to values on a grid.

    Minimises ``sum w (values - field)^2 + ridge``, the ridge growing with frequency squared (relative to the
    data term), using the tensor-product structure.

    Parameters
    ----------
    values : ndarray (n0, n1, n2)
        Values to fit.
    w : ndarray (n0, n1, n2)
        Non-negative weights (0 = not used).
    B : list of 3 ndarrays
        Basis matrices along each axis at the grid's voxel positions (:func:`dct_basis`), shapes ``(n_i, K_i)``.
    regularization : float
        Ridge size relative to the mean diagonal of the normal matrix.

    Returns
    -------
    coefficients : ndarray (K0, K1, K2)
    field : ndarray (n0, n1, n2)
        The fitted field on the grid.

    Examples
    --------
    >>> B = [dct_basis(np.arange(n), n, 3) for n in (8, 9, 10)]
    >>> vals = np.full((8, 9, 10), 2.5)
    >>> c, fld = fit_dct_lsq(vals, np.ones_like(vals), B)
    >>> bool(np.allclose(fld, 2.5, atol=1e-6))
    True
    """
    K = [b.shape[1] for b in B]
    P = int(np.prod(K))
    A = normal_matrix(np.asarray(w, dtype=np.float64), *B)
    rhs = np.einsum("xyz,xa,yb,zc->abc", w * values, *B, optimize=True).ravel()
    kk = np.add.outer(
        np.add.outer((np.arange(K[0]) / K[0]) ** 2, (np.arange(K[1]) / K[1]) ** 2), (np.arange(K[2]) / K[2]) ** 2
    ).ravel()
    tr = float(np.trace(A)) / P
    coef = np.linalg.solve(A + np.diag(regularization * tr * kk + 1e-12 * tr), rhs).reshape(K)
    return coef, separable(coef, *B)
