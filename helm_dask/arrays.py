"""Small helpers over arrays that several stage algorithms share: a volume's Dask array, the fixed-shape tree
reduction that makes chunked results independent of scheduling, exact label index sums, and the spherical
structuring element (in mm, on any voxel grid) of the closings and the exact closing built on it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .errors import HelmError
from .io.regions import chunk_edges

__all__ = [
    "EPS",
    "FAN_IN",
    "as_dask",
    "ball",
    "block_reduce",
    "block_tasks",
    "half_extent",
    "index_sums",
    "plane",
    "tree_reduce",
]

#: Fan-in of the tree reductions: 8 partial results per task keeps a 0.1 mm volume's ~1,200 chunk results to
#: four levels, each task holding at most 8 partials.
FAN_IN = 8


def as_dask(x: Any, chunks: Any = None) -> da.Array:
    """The Dask array of a volume (or of an array-like), without copying a Dask array.

    Parameters
    ----------
    x : xarray.DataArray, dask.array.Array or array-like
        The volume or its data.
    chunks : optional
        Chunks for data that is not yet a Dask array (default: Dask's ``asarray`` choice).

    Returns
    -------
    dask.array.Array

    Examples
    --------
    >>> as_dask(np.zeros((4, 4, 4)), chunks=2).chunks[0]
    (2, 2)
    """
    data = x.data if isinstance(x, xr.DataArray) else x
    if isinstance(data, da.Array):
        return data
    if chunks is None:
        return da.asarray(data)
    return da.from_array(np.asarray(data), chunks=chunks)


def _plane_of(blocks: list, i: int) -> np.ndarray:
    return blocks[0][i]


def plane(stack: da.Array, i: int) -> da.Array:
    """``stack[i]`` of an array whose first axis is one chunk (maps computed together), as a blockwise layer.

    ``stack[i]`` is a slicing layer, one task per chunk; this layer fuses into the task that consumes it, so
    a writer of all the planes (:func:`helm_dask.io.store.store_batched`) computes and writes them in one task
    per chunk. Not ``map_blocks(drop_axis=0)``: dask fuses only blockwise layers that agree on concatenating
    their contracted axes, and a writer has none to concatenate.

    Parameters
    ----------
    stack : dask.array.Array
        At least 2-D, with a single chunk along the first axis.
    i : int
        Which plane.

    Returns
    -------
    dask.array.Array

    Example
    -------
    >>> s = da.arange(24).reshape(2, 3, 4).rechunk((2, 2, 2))
    >>> plane(s, 1).compute().tolist() == s[1].compute().tolist()
    True
    """
    if len(stack.chunks[0]) != 1:
        raise ValueError("plane: the first axis must be a single chunk")
    ind = tuple(range(1, stack.ndim))
    meta = np.empty((0,) * (stack.ndim - 1), stack.dtype)
    name = f"plane-{dask.base.tokenize(stack.name, i)}"
    return da.blockwise(_plane_of, ind, stack, (0, *ind), i, None, dtype=stack.dtype, meta=meta, name=name)


def tree_reduce(parts: list, combine: Callable[..., Any], fan_in: int = FAN_IN) -> Any:
    """Reduce delayed partial results with ``combine`` in a tree whose shape depends only on ``len(parts)``.

    The grouping is fixed (consecutive runs of ``fan_in``), so a floating-point ``combine`` gives the same
    answer whatever the scheduling; an empty list gives ``combine()``.

    Parameters
    ----------
    parts : list of dask.delayed.Delayed
        Per-chunk results, in chunk order.
    combine : callable
        ``combine(*some_parts)`` -> one partial result.
    fan_in : int
        Partials combined per task.

    Returns
    -------
    dask.delayed.Delayed

    Examples
    --------
    >>> parts = [dask.delayed(i) for i in range(20)]
    >>> tree_reduce(parts, lambda *p: sum(p)).compute()
    190
    """
    if not parts:
        return dask.delayed(combine)()
    dcomb = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        parts = [dcomb(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def block_tasks(data: da.Array, fn: Callable, *args: Any) -> list:
    """One delayed ``fn(block, offset, *args)`` per chunk of a 3-D array, in chunk order: ``offset`` is the
    chunk's first voxel index in the whole array (the partial results of a chunked reduction, for
    :func:`tree_reduce`).

    Parameters
    ----------
    data : dask.array.Array
        A 3-D array.
    fn : callable
        ``fn(block, offset, *args)``, module-level (picklable).
    *args
        Further arguments, the same for every chunk.

    Returns
    -------
    list of dask.delayed.Delayed

    Examples
    --------
    >>> def first_corner(block, offset):
    ...     return offset
    >>> dask.compute(*block_tasks(da.zeros((4, 2, 2), chunks=(3, 2, 2)), first_corner))
    ((0, 0, 0), (3, 0, 0))
    """
    offsets = [e[:-1] for e in chunk_edges(data.chunks)]
    blocks = data.to_delayed()
    dfn = dask.delayed(fn, pure=True)
    return [
        dfn(blocks[idx], tuple(int(offsets[d][idx[d]]) for d in range(3)), *args) for idx in np.ndindex(*blocks.shape)
    ]


def block_reduce(
    data: da.Array, fn: Callable, combine: Callable, *args: Any, fan_in: int = FAN_IN, any_layout: bool = False
) -> Any:
    """``tree_reduce(block_tasks(data, fn, *args), combine, fan_in)``, delayed; the same value to the bit.

    A stored volume is read by the tree's first level itself: one task per ``fan_in`` consecutive chunks reads
    them from the store one after the other and combines their ``fn`` results -- the very combine the tree
    applies to the same parts. One task per chunk and one per read was 7,200 tasks of ~3 ms for the extent of a
    0.1 mm mask and labels, which the scheduler's and the client's ~2 ms per task, on the cores the two workers
    share, kept 40% busy for 18 s (now 7 s); the mirror fit's passes took 35 s (now 17 s). A flip or transpose
    of a stored volume (:func:`~helm_dask.io.regions.store_view_of`) is read so too only with ``any_layout``:
    its boxes arrive C-contiguous where Dask's are strided views, and a float sum over a block depends on the
    order NumPy walks it.

    Parameters
    ----------
    data : dask.array.Array
        A 3-D array.
    fn : callable
        ``fn(block, offset, *args)``, module-level (picklable).
    combine : callable
        ``combine(*some_parts)`` -> one partial result.
    *args
        Further arguments of ``fn``.
    fan_in : int
        Partials combined per task.
    any_layout : bool
        ``fn``'s result does not depend on the block's memory layout (e.g. a minimum, a count).

    Returns
    -------
    dask.delayed.Delayed

    Example
    -------
    >>> def total(block, offset):
    ...     return int(block.sum())
    >>> block_reduce(da.ones((4, 4, 4), chunks=2), total, lambda *p: sum(p)).compute()
    64
    """
    from .io.regions import box_cells, store_view_of

    view = store_view_of(data) if data.ndim == 3 else None
    if view is not None and not any_layout and (any(view.flips) or view.perm != (0, 1, 2)):
        view = None
    nblocks = math.prod(len(c) for c in data.chunks)
    if view is None or nblocks <= 1:  # one chunk: the tree is that chunk's part, no combine
        return tree_reduce(block_tasks(data, fn, *args), combine, fan_in)
    # every chunk of the grid in C order (the order block_tasks gives the tree), its box
    boxes = [(lo, hi) for _, lo, hi in box_cells(chunk_edges(data.chunks))]
    name = "block-reduce-stored-" + dask.base.tokenize(data.name, fn, combine, args, fan_in)
    layer: dict = {
        (name, g): (_reduce_stored, view, boxes[i : i + fan_in], fn, combine, args)
        for g, i in enumerate(range(0, len(boxes), fan_in))
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[])
    first = [Delayed((name, g), graph, layer=name) for g in range(len(layer))]
    return tree_reduce(first, combine, fan_in)


def _reduce_stored(view: Any, boxes: list, fn: Callable, combine: Callable, args: tuple) -> Any:
    """``combine`` of ``fn(box, offset, *args)`` over ``boxes`` read from the store through ``view``, one at a time
    (a box is freed once its ``fn`` returns)."""
    return combine(*(fn(view.read(lo, hi), tuple(lo), *args) for lo, hi in boxes))


def _index_sums_block(block: np.ndarray, codes: np.ndarray | None, block_info: Any = None) -> np.ndarray:
    """``[count, sum_i, sum_j, sum_k]`` of one chunk, in the whole array's voxel indices, shaped (1, 1, 1, 4)."""
    loc = block_info[0]["array-location"]
    idx = np.nonzero(block != 0 if codes is None else np.isin(block, codes))
    out = np.zeros((1, 1, 1, 4), dtype=np.int64)
    n = len(idx[0])
    out[0, 0, 0, 0] = n
    for d in range(3):
        # integer sums: exact, so a centroid does not depend on the chunking
        out[0, 0, 0, 1 + d] = int(idx[d].sum(dtype=np.int64)) + n * int(loc[d][0])
    return out


def index_sums(data: da.Array, codes: Any = None) -> np.ndarray:
    """Count and voxel-index sums of the voxels holding ``codes`` (default: every non-zero voxel), chunk by chunk.

    Parameters
    ----------
    data : dask.array.Array
        A 3-D label array.
    codes : iterable of int, optional
        The values to count.

    Returns
    -------
    numpy.ndarray
        ``[count, sum_i, sum_j, sum_k]`` (int64, exact: the centroid ``sums[1:] / sums[0]`` is the same for any
        chunking).

    Examples
    --------
    >>> lab = np.zeros((6, 4, 4), np.uint16); lab[2:4, 1, 3] = 801
    >>> index_sums(da.from_array(lab, chunks=3)).tolist()
    [2, 5, 2, 6]
    """
    arr = None if codes is None else np.asarray(sorted({int(c) for c in codes}))
    parts = da.map_blocks(
        _index_sums_block,
        data,
        codes=arr,
        chunks=((1,) * data.numblocks[0], (1,) * data.numblocks[1], (1,) * data.numblocks[2], (4,)),
        new_axis=3,
        dtype=np.int64,
    )
    return np.asarray(parts.sum(axis=(0, 1, 2), dtype=np.int64).compute(), dtype=np.int64)


# ---- the spherical structuring element ------------------------------------------------------------------

#: Relative tolerance of the sphere test ``q <= r**2 (1 + EPS)`` and of distance ties between label codes.
EPS = 1e-9


def _spacing3(spacing_mm: Any) -> tuple[float, float, float]:
    """Three positive voxel sizes (mm) from one number or three."""
    try:
        s = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    except (ValueError, TypeError):
        raise HelmError(f"voxel spacing must be one number or three numbers in mm, got {spacing_mm!r}") from None
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise HelmError(f"voxel spacing must be positive and finite, got {s.tolist()} mm")
    return float(s[0]), float(s[1]), float(s[2])


def _radius(radius_mm: Any) -> float:
    """The closing radius as a float (mm), refusing negative or non-finite values."""
    try:
        r = float(radius_mm)
    except (TypeError, ValueError):
        raise HelmError(f"the closing radius must be a number of mm, got {radius_mm!r}") from None
    if not math.isfinite(r) or r < 0:
        raise HelmError(
            f"the closing radius must be >= 0 mm, got {radius_mm!r}",
            hint="use --closing-radius-mm 1.2 (the paper's value) or 0 to switch the closing off",
        )
    return r


def _r2(radius_mm: float) -> float:
    """The squared radius with the relative epsilon, the one threshold used everywhere."""
    return radius_mm * radius_mm * (1.0 + EPS)


def half_extent(radius_mm: float, spacing_mm: Any) -> tuple[int, int, int]:
    """Half size ``h`` of :func:`ball` along each axis: the largest ``n`` with ``(n s_i)**2 <= r**2 (1+EPS)``.

    Parameters
    ----------
    radius_mm : float
        Sphere radius (mm).
    spacing_mm : float or 3 floats
        Voxel size (mm).

    Returns
    -------
    tuple of 3 ints

    Example
    -------
    >>> half_extent(1.2, 0.3), half_extent(1.2, (0.1, 0.12, 0.15))
    ((4, 4, 4), (12, 10, 8))
    """
    s, r2 = _spacing3(spacing_mm), _r2(_radius(radius_mm))
    out = []
    for si in s:
        n = int(math.floor(math.sqrt(r2) / si))
        while ((n + 1) * si) ** 2 <= r2:  # settle floating-point rounding of the estimate both ways
            n += 1
        while n > 0 and (n * si) ** 2 > r2:
            n -= 1
        out.append(n)
    return out[0], out[1], out[2]


def _sq_dist(offsets: list[np.ndarray], spacing: tuple[float, float, float]) -> np.ndarray:
    """``(d0 s0)**2 + (d1 s1)**2 + (d2 s2)**2`` in float64, always in this order (exactly the ball's formula)."""

    def term(d: np.ndarray, s: float) -> np.ndarray:
        t = d.astype(np.float64) * s
        t *= t
        return t

    q = term(offsets[0], spacing[0])
    for d, s in zip(offsets[1:], spacing[1:]):
        q = q + term(d, s)
    return q


def ball(radius_mm: float, spacing_mm: Any) -> np.ndarray:
    """Spherical structuring element of radius ``radius_mm`` on a grid of voxel size ``spacing_mm``.

    ``{d integer offset : sum_i (d_i * s_i)**2 <= radius_mm**2 * (1 + EPS)}``, centred, shape ``2 h + 1``
    (:func:`half_extent`); an ellipsoid in voxels when the spacing is anisotropic. ``<=``: voxels exactly on
    the sphere are included (the tiny relative ``EPS = 1e-9`` absorbs floating-point rounding).

    Parameters
    ----------
    radius_mm : float
        Sphere radius (mm).
    spacing_mm : float or 3 floats
        Voxel size (mm).

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``2 h + 1`` per axis.

    Example
    -------
    >>> b = ball(1.2, 0.3)
    >>> b.shape, int(b.sum()), bool(b[0, 4, 4]), bool(b[0, 4, 3])
    ((9, 9, 9), 257, True, False)
    """
    s, r = _spacing3(spacing_mm), _radius(radius_mm)
    h = half_extent(r, s)
    g = [np.arange(-n, n + 1).reshape([-1 if a == i else 1 for a in range(3)]) for i, n in enumerate(h)]
    q = _sq_dist([np.broadcast_to(gi, [2 * n + 1 for n in h]) for gi in g], s)
    return q <= _r2(r)


def _bbox(mask: np.ndarray, margin: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels grown by ``margin`` per axis (clipped), or None when empty."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        out.append(slice(max(int(idx[0]) - margin[ax], 0), min(int(idx[-1]) + margin[ax] + 1, mask.shape[ax])))
    return tuple(out)


def _nearest_sq(features: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Squared distance (mm**2) from every voxel to the nearest True voxel of ``features``; inf if none.

    The nearest voxel comes from the exact Euclidean feature transform; the distance is then recomputed from
    the integer offsets with :func:`_sq_dist`, the formula of :func:`ball`, so thresholds agree with the ball.
    """
    if not features.any():
        return np.full(features.shape, np.inf)
    ft = ndi.distance_transform_edt(~features, sampling=spacing, return_distances=False, return_indices=True)
    offs = []
    for ax in range(3):
        grid = np.arange(features.shape[ax], dtype=ft.dtype).reshape([-1 if a == ax else 1 for a in range(3)])
        offs.append(ft[ax] - grid)
    del ft
    return _sq_dist(offs, spacing)


def _closing_np(mask: np.ndarray, spacing: tuple[float, float, float], r2: float) -> np.ndarray:
    """Closing of ``mask`` (bool) with the ball, valid wherever the ``2 h`` neighbourhood is inside the array.

    Voxels outside the array are treated as unknown; callers pad or overlap by ``2 h``
    (:func:`helm_dask.closing.closing_depth`).
    """
    dil = _nearest_sq(mask, spacing) <= r2
    if dil.all():
        return dil  # nothing outside the dilation within reach: the erosion removes nothing here
    return _nearest_sq(~dil, spacing) > r2
