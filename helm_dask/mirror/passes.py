"""Eager chunked reductions over a volume, shared by the mirror fit, the whole-brain grid and the hypothalamus
check: :func:`_run` maps a block function over every chunk (given the chunk's global offset; a stored volume is
read by the tasks that combine its chunks, :func:`~helm_dask.arrays.block_reduce`) and combines the partial
results with a fixed-shape tree, so that the result depends on the chunking only where a combine is not exact;
the functions are module-level (picklable, no closure over arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import xarray as xr

from ..arrays import as_dask, block_reduce
from ..errors import HelmError


def _as_dask(vol: xr.DataArray, what: str) -> da.Array:
    """The dask array of a 3-D volume; a clear error for anything else (``what`` names it)."""
    if not isinstance(vol, xr.DataArray):
        raise HelmError(
            f"{what} must be a volume (xarray.DataArray with attrs['affine']), got {type(vol).__name__}",
            hint="build it with helm_dask.make_volume or open it with helm_dask.io",
        )
    if vol.ndim != 3:
        raise HelmError(f"{what} must be 3-D (x, y, z), got dims {vol.dims}", path=vol.attrs.get("source") or None)
    return as_dask(vol)


def _run(data: da.Array, fn: Callable, combine: Callable, *args: Any) -> Any:
    """``combine`` over ``fn(block, offset, *args)`` of every chunk, computed now (a stored volume read by the
    tasks themselves, :func:`~helm_dask.arrays.block_reduce`)."""
    (res,) = dask.compute(block_reduce(data, fn, combine, *args))
    return res
