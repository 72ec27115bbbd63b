"""Compiled (numba) per-chunk loops of the k-means passes: the span and the exact integer histogram of float32 bit
patterns (:mod:`.binning`), the exact value counts inside refined bins, and the lookup that labels a chunk for
every k at once (:mod:`.labelling`); each does what a NumPy expression would, without its temporaries, and the
tests hold them to the NumPy versions."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _span_nb(u: np.ndarray, m: np.ndarray, s: int) -> tuple:  # pragma: no cover (compiled)
    """(min key, max key, ok) over masked voxels; ok is False if one has a sign bit or is not finite."""
    kmin, kmax = np.uint32(0xFFFFFFFF), np.uint32(0)
    for i in range(u.size):
        if m[i]:
            x = u[i]
            if x >= np.uint32(0x7F800000):
                return 0, 0, False
            k = x >> np.uint32(s)
            kmin = min(kmin, k)
            kmax = max(kmax, k)
    return np.int64(kmin), np.int64(kmax), True


@njit(cache=True, nogil=True)
def _hist_nb(u: np.ndarray, m: np.ndarray, s: int, kmin: int, nb: int) -> tuple:  # pragma: no cover
    """Exact int64 count, sum L and sum L^2 per key over masked voxels (all finite, >= +0: see _span_nb)."""
    cnt = np.zeros(nb, np.int64)
    s1 = np.zeros(nb, np.int64)
    s2 = np.zeros(nb, np.int64)
    low_mask = np.uint32((1 << s) - 1)
    for i in range(u.size):
        if m[i]:
            x = u[i]
            k = np.int64(x >> np.uint32(s)) - kmin
            lo = np.int64(x & low_mask)
            cnt[k] += 1
            s1[k] += lo
            s2[k] += lo * lo
    return cnt, s1, s2


@njit(cache=True, nogil=True)
def _hist_full_nb(
    u: np.ndarray, m: np.ndarray, s: int, cnt: np.ndarray, s1: np.ndarray, s2: np.ndarray
) -> bool:  # pragma: no cover
    """:func:`_hist_nb` into arrays that span every non-negative finite key (zeroed by the caller), without
    a first pass for the span; False (arrays then partly filled) at the first voxel with a sign bit or not
    finite."""
    low_mask = np.uint32((1 << s) - 1)
    for i in range(u.size):
        if m[i]:
            x = u[i]
            if x >= np.uint32(0x7F800000):
                return False
            k = x >> np.uint32(s)
            lo = np.int64(x & low_mask)
            cnt[k] += 1
            s1[k] += lo
            s2[k] += lo * lo
    return True


@njit(cache=True, nogil=True)
def _refine_count_nb(
    u: np.ndarray, m: np.ndarray, s: int, r0: int, rank: np.ndarray, cnt: np.ndarray
) -> None:  # pragma: no cover
    """``cnt[rank * 2**s + L] += 1`` for the masked voxels whose key is refined (``rank >= 0``; refined keys all
    >= 0): -0.0 counts as +0.0 (as in _masked_f32); negative and non-finite voxels are skipped (no refined key
    holds them)."""
    low_mask = np.uint32((1 << s) - 1)
    for i in range(u.size):
        if m[i]:
            x = u[i]
            if x == np.uint32(0x80000000):
                x = np.uint32(0)
            elif x >= np.uint32(0x7F800000):
                continue
            off = np.int64(x >> np.uint32(s)) - r0
            if 0 <= off < rank.size and rank[off] >= 0:
                cnt[(np.int64(rank[off]) << s) + np.int64(x & low_mask)] += 1


@njit(cache=True, nogil=True)
def _labels_nb(
    v: np.ndarray, m: np.ndarray, union: np.ndarray, tables: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover (compiled)
    """out[j, i] = tables[j, u] with u = searchsorted(union, v[i], "right") (NaN last, as NumPy sorts it),
    or the outside column where the mask is 0."""
    n_u = union.size
    outside = tables.shape[1] - 1
    for i in range(v.size):
        if m[i]:
            x = v[i]
            if x != x:
                u = n_u
            else:
                lo, hi = 0, n_u
                while lo < hi:
                    mid = (lo + hi) // 2
                    if union[mid] <= x:
                        lo = mid + 1
                    else:
                        hi = mid
                u = lo
        else:
            u = outside
        for j in range(tables.shape[0]):
            out[j, i] = tables[j, u]
