"""Data passes of the exact ``"histogram"`` method: pass 1 builds an exact integer histogram of the masked
float32 intensities, keyed by the top bits of their bit pattern, and the refinement pass counts every distinct
value inside chosen bins; both reduce per-chunk parts with integer sums, so their results do not depend on the
chunking (see ``docs/method/kmeans.md``). Entry points: :func:`_histogram_pass` and :func:`_refine_pass`."""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..arrays import tree_reduce
from ..errors import HelmError
from .common import _flat_inputs, _masked_f32, _pair_tasks
from .kernels import _hist_full_nb, _hist_nb, _refine_count_nb, _span_nb

_PIECE = 1 << 22  # voxels per sub-slab in the per-chunk histogram (keeps float64 bincount sums exact)
_DENSE_SPAN = 1 << 21  # per-chunk key span up to which a dense bincount is used instead of np.unique


def _shift_for(n_bins: Any) -> int:
    """Number ``s`` of low mantissa bits a bin key drops, for ``n_bins`` bins per octave (checked)."""
    try:
        b = int(n_bins)
    except (TypeError, ValueError):
        b = -1
    if b < 256 or b > 65536 or b & (b - 1):
        raise HelmError(
            f"n_bins must be a power of two between 256 and 65536 (bins per octave); got {n_bins!r}",
            hint="the default 2048 gives bins 0.05 % wide",
        )
    return 23 - int(math.log2(b))


def _keys(v32: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed, value-ordered bin key and in-bin integer offset ``L`` of float32 values (finite, no -0.0)."""
    u = v32.view(np.uint32)
    if u.size and u.max() < 0x80000000:
        # no sign bit (the usual case: intensities >= 0): the key is the top bits themselves, as uint32 --
        # the same values as below, without the int64 temporaries that made this the binning's hot spot
        return u >> np.uint32(s), u & np.uint32((1 << s) - 1)
    mag = u & np.uint32(0x7FFFFFFF)
    kmag = (mag >> np.uint32(s)).astype(np.int64)
    # negative values: larger magnitude = smaller value, so mirror the key below zero
    key = np.where(u >> np.uint32(31) != 0, -kmag - 1, kmag)
    low = mag & np.uint32((1 << s) - 1)
    return key, low


def _empty_hist() -> tuple:
    z = np.zeros(0, dtype=np.int64)
    return z, z, z, z, 0


def _hist_block(img: np.ndarray, msk: np.ndarray, s: int) -> tuple:
    """Per-chunk histogram: (keys, count, sum L, sum L^2) as int64, plus the number of non-finite voxels."""
    v, m = _flat_inputs(img, msk)
    u = v.view(np.uint32)
    n_keys = (0x7F800000 >> s) + 1  # every non-negative finite key
    if n_keys <= _DENSE_SPAN:
        # the usual case (finite intensities >= 0, default bins): one compiled loop into arrays over all keys
        # (zero pages that stay untouched cost nothing), no span pass -- the same integers as the NumPy path
        cnt, s1, s2 = (np.zeros(n_keys, np.int64) for _ in range(3))
        if _hist_full_nb(u, m, s, cnt, s1, s2):
            nz = np.flatnonzero(cnt)
            return nz.astype(np.int64), cnt[nz], s1[nz], s2[nz], 0
        return _hist_block_np(img, msk, s)
    kmin, kmax, ok = _span_nb(u, m, s)
    if ok and kmax < kmin:  # no voxel of this chunk in the mask
        return (*_empty_hist()[:4], 0)
    if ok and kmax - kmin < _DENSE_SPAN:
        # the usual case (finite intensities >= 0): one compiled loop, no temporaries -- the same integers as
        # the NumPy path below (tested against it), several times faster
        cnt, s1, s2 = _hist_nb(u, m, s, kmin, kmax - kmin + 1)
        nz = np.flatnonzero(cnt)
        return nz.astype(np.int64) + kmin, cnt[nz], s1[nz], s2[nz], 0
    return _hist_block_np(img, msk, s)


def _hist_block_np(img: np.ndarray, msk: np.ndarray, s: int) -> tuple:
    """:func:`_hist_block` in NumPy: any float32 values (negative, non-finite counted)."""
    v = _masked_f32(img, msk)
    finite = np.isfinite(v)
    nonfinite = int(v.size - np.count_nonzero(finite))
    if nonfinite:
        v = v[finite]
    out = []
    base: int | np.ndarray  # the first key (dense bins) or every key (sparse bins)
    for start in range(0, v.size, _PIECE):
        key, low = _keys(v[start : start + _PIECE], s)
        kmin, kmax = int(key.min()), int(key.max())
        if kmax - kmin < _DENSE_SPAN:
            idx, nb, base = key - kmin, kmax - kmin + 1, kmin
        else:
            uniq, idx = np.unique(key, return_inverse=True)
            nb, base = uniq.size, uniq
        lf = low.astype(np.float64)
        # float64 bincount sums of integers are exact while below 2**53: a piece has <= 2**22 voxels and
        # L**2 < 2**30 (n_bins >= 256), so every partial sum is an exact integer
        cnt = np.bincount(idx, minlength=nb)
        s1 = np.bincount(idx, weights=lf, minlength=nb)
        s2 = np.bincount(idx, weights=lf * lf, minlength=nb)
        nz = np.flatnonzero(cnt)
        keys = nz + base if isinstance(base, int) else base[nz]
        out.append(
            (keys.astype(np.int64), cnt[nz].astype(np.int64), s1[nz].astype(np.int64), s2[nz].astype(np.int64), 0)
        )
    if not out:
        return (*_empty_hist()[:4], nonfinite)
    merged = _merge_hists(*out) if len(out) > 1 else out[0]
    return (*merged[:4], nonfinite)


def _merge_sparse(keys: list, stats: list[list]) -> tuple:
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    if key.size == 0:
        return (key, *[np.zeros(0, np.int64) for _ in stats])
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return (key[starts], *[np.add.reduceat(np.concatenate(st)[order], starts) for st in stats])


def _merge_hists(*parts: tuple) -> tuple:
    """Exact (integer) merge of sparse histograms: the result does not depend on the order of the parts."""
    if not parts:
        return _empty_hist()
    merged = _merge_sparse([p[0] for p in parts], [[p[i] for p in parts] for i in (1, 2, 3)])
    return (*merged, sum(int(p[4]) for p in parts))


def _refine_block(img: np.ndarray, msk: np.ndarray, s: int, rkeys: np.ndarray) -> tuple:
    """Per-chunk exact value counts inside the bins ``rkeys``: (rank * 2**s + L, count) as int64."""
    if rkeys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if int(rkeys[0]) >= 0 and int(rkeys[-1]) - int(rkeys[0]) < _DENSE_SPAN:
        # refined keys all >= 0 (no negative value can fall in them): count every code rank * 2**s + L in a
        # dense table, a group of keys at a time (one group in practice: ~100 keys of 4096 codes each)
        v, m = _flat_inputs(img, msk)
        u = v.view(np.uint32)
        per = max(1, _DENSE_SPAN >> s)
        codes, counts = [], []
        for g0 in range(0, rkeys.size, per):
            grp = rkeys[g0 : g0 + per]
            r0 = int(grp[0])
            rank = np.full(int(grp[-1]) - r0 + 1, -1, dtype=np.int32)
            rank[grp - r0] = np.arange(grp.size, dtype=np.int32)
            cnt = np.zeros(grp.size << s, np.int64)
            _refine_count_nb(u, m, s, r0, rank, cnt)
            nz = np.flatnonzero(cnt)
            codes.append(nz.astype(np.int64) + (g0 << s))
            counts.append(cnt[nz])
        return np.concatenate(codes), np.concatenate(counts)
    v = _masked_f32(img, msk)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key, low = _keys(v, s)
    pos = np.minimum(np.searchsorted(rkeys, key), rkeys.size - 1)
    hit = rkeys[pos] == key
    code = pos[hit].astype(np.int64) * (1 << s) + low[hit].astype(np.int64)
    u, c = np.unique(code, return_counts=True)
    return u.astype(np.int64), c.astype(np.int64)


def _merge_refine(*parts: tuple) -> tuple:
    """Exact (integer) merge of :func:`_refine_block` parts."""
    return _merge_sparse([p[0] for p in parts], [[p[1] for p in parts]])


def _histogram_pass(img: da.Array, msk: da.Array, s: int) -> tuple:
    """Pass 1: the whole mask's (keys, count, sum L, sum L^2) as int64 and its number of non-finite voxels."""
    parts = _pair_tasks(img, msk, _hist_block, s)
    (res,) = dask.compute(tree_reduce(parts, _merge_hists))
    return res


def _refine_pass(img: da.Array, msk: da.Array, s: int, rkeys: np.ndarray) -> dict[int, tuple]:
    """Exact float32 values and counts inside each bin of ``rkeys`` (one pass). Returns {key: (values, counts)}."""
    rkeys = np.asarray(np.sort(rkeys), dtype=np.int64)
    parts = _pair_tasks(img, msk, _refine_block, s, rkeys)
    ((codes, counts),) = dask.compute(tree_reduce(parts, _merge_refine))
    rank, low = codes >> s, codes & ((1 << s) - 1)
    out = {}
    for r, key in enumerate(rkeys):
        sel = rank == r
        vals = _bin_values(int(key), low[sel], s)
        out[int(key)] = (vals, counts[sel].astype(np.float64))
    return out


def _bin_values(key: int, low: np.ndarray, s: int) -> np.ndarray:
    """Exact float32 values (as float64) of in-bin offsets ``low`` of bin ``key``."""
    neg = key < 0
    kmag = -key - 1 if neg else key
    bits = (np.uint32(kmag) << np.uint32(s)) | np.asarray(low, dtype=np.uint32)
    v = bits.view(np.float32).astype(np.float64)
    return -v if neg else v
