"""Small helpers over Dask arrays that several stage algorithms share: a volume's Dask array, and the
fixed-shape tree reduction that makes chunked results independent of scheduling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["FAN_IN", "as_dask", "index_sums", "tree_reduce"]

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
