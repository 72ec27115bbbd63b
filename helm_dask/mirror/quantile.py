"""The exact order statistic of the mirror fit, out of core: :func:`_exact_quantile` finds the ``m``-th largest
x (after the fitted rotation) over all mask voxels with chunked passes -- a 65536-bin integer histogram of x,
refined inside the one bin that holds the quantile, then the distinct values of that bin -- and returns with it
the sums the cost needs and the sagittal footprint columns the gap needs (see ``docs/method/mirror.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask.array as da
import numpy as np

from .passes import _run

_NBINS = 65536  # histogram bins per refinement level of the exact quantile
_MAX_LEVELS = 4  # 65536**4 bins: beyond float64 resolution, so the last bin holds equal values
_MAX_COLLECT = 4_000_000  # values of the quantile's bin gathered in memory (else refine the bin)


def _lin_block(shape: tuple[int, ...], offset: tuple[int, int, int], w: Sequence[float], b: float) -> np.ndarray:
    """``((b + w0 i) + w1 j) + w2 k`` for the block's global indices: the same float ops for a voxel in any
    chunking, so every pass sees bit-identical values."""
    i = np.arange(offset[0], offset[0] + shape[0], dtype=np.float64)
    j = np.arange(offset[1], offset[1] + shape[1], dtype=np.float64)
    k = np.arange(offset[2], offset[2] + shape[2], dtype=np.float64)
    return ((b + w[0] * i)[:, None, None] + (w[1] * j)[None, :, None]) + (w[2] * k)[None, None, :]


def _bin_of(u: np.ndarray, lo: float, inv_w: float) -> np.ndarray:
    return np.clip(np.floor((u - lo) * inv_w), 0, _NBINS - 1).astype(np.int64)


def _select_levels(u: np.ndarray, levels: Sequence[tuple[float, float, int]]) -> np.ndarray:
    """The values of ``u`` inside every previous level's chosen bin."""
    for lo, inv_w, target in levels:
        u = u[_bin_of(u, lo, inv_w) == target]
    return u


def _hist_block(
    block: np.ndarray,
    offset: tuple[int, int, int],
    geom: dict,
    levels: tuple,
    level: tuple[float, float],
    columns: bool,
) -> tuple:
    sel = np.asarray(block) != 0
    empty = (np.zeros(_NBINS, np.int64), np.zeros(_NBINS, np.float64), 0.0, None)
    if not sel.any():
        return empty
    u_all = _lin_block(sel.shape, offset, geom["w"], geom["b"])
    u = u_all[sel]
    col = None
    if columns:
        y = _lin_block(sel.shape, offset, geom["wy"], geom["by"])[sel]
        z = _lin_block(sel.shape, offset, geom["wz"], geom["bz"])[sel]
        iy = np.floor((y - geom["y0"]) * geom["inv_col"]).astype(np.int64)
        iz = np.floor((z - geom["z0"]) * geom["inv_col"]).astype(np.int64)
        y0, z0 = int(iy.min()), int(iz.min())
        arr = np.full((int(iy.max()) - y0 + 1, int(iz.max()) - z0 + 1), -np.inf)
        np.maximum.at(arr, (iy - y0, iz - z0), u)
        col = (y0, z0, arr)
    total = float(u.sum())
    u = _select_levels(u, levels)
    b = _bin_of(u, level[0], level[1])
    return (np.bincount(b, minlength=_NBINS), np.bincount(b, weights=u, minlength=_NBINS), total, col)


def _merge_columns(cols: list) -> tuple | None:
    cols = [c for c in cols if c is not None]
    if not cols:
        return None
    if len(cols) == 1:
        return cols[0]
    y0 = min(c[0] for c in cols)
    z0 = min(c[1] for c in cols)
    y1 = max(c[0] + c[2].shape[0] for c in cols)
    z1 = max(c[1] + c[2].shape[1] for c in cols)
    out = np.full((y1 - y0, z1 - z0), -np.inf)
    for cy, cz, a in cols:
        view = out[cy - y0 : cy - y0 + a.shape[0], cz - z0 : cz - z0 + a.shape[1]]
        np.maximum(view, a, out=view)
    return (y0, z0, out)


def _hist_combine(*parts: tuple) -> tuple:
    return (
        sum(p[0] for p in parts),
        sum(p[1] for p in parts),
        math.fsum(p[2] for p in parts),
        _merge_columns([p[3] for p in parts]),
    )


def _collect_block(block: np.ndarray, offset: tuple[int, int, int], geom: dict, levels: tuple) -> tuple:
    sel = np.asarray(block) != 0
    if not sel.any():
        return (np.empty(0), np.empty(0, np.int64))
    u = _select_levels(_lin_block(sel.shape, offset, geom["w"], geom["b"])[sel], levels)
    return np.unique(u, return_counts=True)


def _collect_combine(*parts: tuple) -> tuple:
    vals = np.concatenate([p[0] for p in parts])
    cnts = np.concatenate([p[1] for p in parts])
    uniq, inv = np.unique(vals, return_inverse=True)
    return uniq, np.bincount(inv, weights=cnts, minlength=uniq.size).astype(np.int64)


def _exact_quantile(data: da.Array, geom: dict, m: int, u_lo: float, u_hi: float, columns: bool) -> dict:
    """The m-th largest x (after the rotation) over all mask voxels, with the sums the cost needs."""
    levels: list[tuple[float, float, int]] = []
    lo, width = u_lo, (u_hi - u_lo) / _NBINS
    n_above, s_above = 0, 0.0
    total, cols, rank = None, None, m
    for level in range(_MAX_LEVELS):
        inv_w = 1.0 / width if width > 0 else 0.0
        cnt, sums, tot, col = _run(
            data, _hist_block, _hist_combine, geom, tuple(levels), (lo, inv_w), columns and level == 0
        )
        if level == 0:
            total, cols = tot, col
        above = np.concatenate([np.cumsum(cnt[::-1])[::-1][1:], [0]])  # voxels in higher bins
        target = int(np.nonzero(above < rank)[0][0])
        rank -= int(above[target])
        n_above += int(above[target])
        s_above += math.fsum(sums[target + 1 :])
        levels.append((lo, inv_w, target))
        if cnt[target] <= _MAX_COLLECT or width == 0.0:
            break
        lo, width = lo + target * width, width / _NBINS
    vals, cnts = _run(data, _collect_block, _collect_combine, geom, tuple(levels))
    vals, cnts = vals[::-1], cnts[::-1]  # descending
    cum = np.cumsum(cnts)
    pos = int(np.searchsorted(cum, rank))  # first value whose cumulative count reaches rank
    q = float(vals[pos])
    n_above += int(cum[pos - 1]) if pos > 0 else 0
    s_above += math.fsum((vals[:pos] * cnts[:pos]).tolist())
    return {"q": q, "n_across": n_above, "sum_across": s_above, "sum_all": total, "columns": cols}
