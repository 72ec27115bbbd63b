"""Weighted 1-D Lloyd on sorted points, the core of the ``"histogram"`` method (and of the ``"minibatch"``
initialisation): :class:`_Points` holds the binned and exact intensities, :func:`_dp_inits` the globally optimal
clustering of (groups of) them by dynamic programming, and :func:`_fit_bins` keeps the best of Lloyd runs from
several deterministic starts (see ``docs/method/kmeans.md``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_DP_GROUPS = 1 << 17  # bins are grouped into at most this many for the dynamic-programming initialisation


class _Points:
    """Sorted weighted points: coarse bins (mean, count, within-bin SS, value range) and exact values."""

    def __init__(self, hist: tuple, s: int, refined: dict[int, tuple]):
        key, cnt, s1, s2 = hist[:4]
        keep = ~np.isin(key, np.fromiter(refined.keys(), dtype=np.int64, count=len(refined)))
        key, cnt, s1, s2 = key[keep], cnt[keep], s1[keep], s2[keep]
        neg = key < 0
        kmag = np.where(neg, -key - 1, key).astype(np.uint32)
        base_bits = kmag << np.uint32(s)
        base = base_bits.view(np.float32).astype(np.float64)
        top = (base_bits + np.uint32((1 << s) - 1)).view(np.float32).astype(np.float64)
        ulp = (base_bits + np.uint32(1)).view(np.float32).astype(np.float64) - base
        n = cnt.astype(np.float64)
        mean_l = s1 / n
        mag_mean = base + ulp * mean_l
        # within-bin sum of squares, from exact integer sums
        ss = np.maximum(s2.astype(np.float64) - s1.astype(np.float64) * mean_l, 0.0) * ulp * ulp
        # a bin holding a single distinct value is an exact point (integer test, no overflow: n*q*q <= s2)
        q, r = np.divmod(s1, cnt)
        single = (r == 0) & (s2 == cnt * q * q)
        mean = np.where(neg, -mag_mean, mag_mean)
        lo = np.where(neg, -top, base)
        hi = np.where(neg, -base, top)
        lo = np.where(single, mean, lo)
        hi = np.where(single, mean, hi)
        parts_p, parts_w, parts_ss, parts_lo, parts_hi, parts_key = [mean], [n], [ss], [lo], [hi], [key]
        parts_coarse = [~single]
        for k, (vals, counts) in refined.items():
            parts_p.append(vals)
            parts_w.append(counts)
            parts_ss.append(np.zeros_like(vals))
            parts_lo.append(vals)
            parts_hi.append(vals)
            parts_key.append(np.full(vals.shape, k, dtype=np.int64))
            parts_coarse.append(np.zeros(vals.shape, dtype=bool))
        p = np.concatenate(parts_p)
        order = np.argsort(p, kind="stable")
        self._set(
            p[order],
            np.concatenate(parts_w)[order],
            np.concatenate(parts_ss)[order],
            np.concatenate(parts_lo)[order],
            np.concatenate(parts_hi)[order],
            np.concatenate(parts_key)[order],
            np.concatenate(parts_coarse)[order],
        )

    @classmethod
    def from_values(cls, values: np.ndarray) -> _Points:
        """Exact points from a sample of values (distinct values weighted by their multiplicity)."""
        u, c = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
        self = cls.__new__(cls)
        z = np.zeros(u.size)
        self._set(u, c.astype(np.float64), z, u, u, np.zeros(u.size, np.int64), np.zeros(u.size, bool))
        return self

    def _set(self, p, w, ss, lo, hi, key, coarse) -> None:
        self.p, self.w, self.ss, self.lo, self.hi, self.key = p, w, ss, lo, hi, key
        self.coarse = coarse  # True: a bin whose values are not known exactly
        self.ss_total = float(self.ss.sum())
        self.n_total = float(self.w.sum())
        self.ref = float((self.w * self.p).sum() / self.n_total)
        self.cw = np.r_[0.0, np.cumsum(self.w)]
        self.cs = np.r_[0.0, np.cumsum(self.w * (self.p - self.ref))]
        self.wp = self.w * self.p

    def __len__(self) -> int:
        return self.p.size

    def bounds(self, c: np.ndarray) -> np.ndarray:
        """Segment boundaries [0, i_1, ..., i_{k-1}, B]: point i is in cluster j iff bounds[j] <= i < bounds[j+1]."""
        mid = 0.5 * (c[:-1] + c[1:])
        return np.r_[0, np.searchsorted(self.p, mid, side="left"), self.p.size]

    def means(self, b: np.ndarray, accurate: bool) -> np.ndarray:
        n = self.cw[b[1:]] - self.cw[b[:-1]]
        if accurate:  # direct segment sums: no cancellation (used to finish at the exact fixed point)
            return np.add.reduceat(self.wp, b[:-1]) / np.add.reduceat(self.w, b[:-1])
        return self.ref + (self.cs[b[1:]] - self.cs[b[:-1]]) / n

    def inertia(self, c: np.ndarray, b: np.ndarray | None = None) -> float:
        if b is None:
            b = self.bounds(c)
        lab = np.repeat(np.arange(c.size), np.diff(b))
        return self.ss_total + float((self.w * (self.p - c[lab]) ** 2).sum())

    def straddlers(self, c: np.ndarray) -> np.ndarray:
        """Indices of coarse bins that may hold values on both sides of a midpoint, and their neighbours."""
        mid = 0.5 * (c[:-1] + c[1:])
        i = np.searchsorted(self.p, mid, side="left")
        cand = np.unique(np.clip(np.concatenate([i - 1, i]), 0, self.p.size - 1))
        hit = cand[self._straddles(cand, mid)]
        if hit.size == 0:
            return hit
        # neighbours too: the refined fixed point moves a little and must not land in another coarse bin
        nb = np.unique(np.clip((hit[:, None] + np.arange(-2, 3)).ravel(), 0, self.p.size - 1))
        return nb[self.coarse[nb]]

    def _straddles(self, cand: np.ndarray, mid: np.ndarray) -> np.ndarray:
        # bin [lo, hi] straddles a midpoint m iff lo < m <= hi (values < m go down, values >= m go up)
        j = np.searchsorted(mid, self.lo[cand], side="right")  # first midpoint > lo
        m = mid[np.minimum(j, mid.size - 1)]
        return self.coarse[cand] & (j < mid.size) & (m <= self.hi[cand])


def _relocate(P: _Points, c: np.ndarray, b: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Move centroids of empty clusters to the points farthest from their centroid (as scikit-learn does)."""
    c = c.copy()
    nonempty = n > 0
    lab = np.repeat(np.arange(c.size), np.diff(b))
    d2 = (P.p - c[lab]) ** 2
    d2[np.isin(P.p, c)] = -1.0
    for j in np.flatnonzero(~nonempty):
        far = int(np.argmax(d2))
        c[j] = P.p[far]
        d2[far] = -1.0
    return np.sort(c)


def _lloyd(P: _Points, c0: np.ndarray, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """Weighted Lloyd on sorted points until the assignment is stable and centroids are exact segment means."""
    c = np.sort(np.asarray(c0, dtype=np.float64))
    prev, accurate = None, False
    for it in range(1, max_iter + 1):
        b = P.bounds(c)
        n = P.cw[b[1:]] - P.cw[b[:-1]]
        if np.any(n <= 0):
            c, prev = _relocate(P, c, b, n), None
            continue
        if prev is not None and np.array_equal(b, prev):
            if accurate:
                return c, it, True
            accurate = True  # converged with fast prefix sums: finish with exact segment means
        c = P.means(b, accurate)
        prev = b
    return c, max_iter, False


def _init_quantile(P: _Points, k: int) -> np.ndarray:
    t = P.n_total * (np.arange(k) + 0.5) / k
    return P.p[np.minimum(np.searchsorted(P.cw[1:], t, side="right"), len(P) - 1)]


def _init_kpp(P: _Points, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means++ (D^2 sampling, weights = counts)."""
    cw = P.cw[1:]
    c = [P.p[min(int(np.searchsorted(cw, rng.random() * cw[-1], side="right")), len(P) - 1)]]
    d2 = (P.p - c[0]) ** 2
    for _ in range(1, k):
        cp = np.cumsum(P.w * d2)
        if cp[-1] <= 0:
            break
        i = min(int(np.searchsorted(cp, rng.random() * cp[-1], side="right")), len(P) - 1)
        c.append(P.p[i])
        d2 = np.minimum(d2, (P.p - P.p[i]) ** 2)
    while len(c) < k:  # fewer distinct points than k cannot happen after validation; keep robust
        c.append(c[-1])
    return np.asarray(c)


def _dp_groups(P: _Points) -> np.ndarray:
    """First point of each group: every point, or <= 2**17 groups of (about) equal weight when there are more."""
    B = len(P)
    if B > _DP_GROUPS:
        t = P.n_total * np.arange(1, _DP_GROUPS) / _DP_GROUPS
        return np.unique(np.r_[0, np.minimum(np.searchsorted(P.cw[1:], t, side="right"), B - 1)])
    return np.arange(B)


def _dp_layer(
    d: np.ndarray, cost: Callable[[np.ndarray, np.ndarray], np.ndarray], m: int, G: int
) -> tuple[np.ndarray, np.ndarray]:
    """One layer ``D_m`` from ``d = D_{m-1}``, and the optimal split of each ``j``, by divide and conquer."""
    dn, opt = np.full(G + 1, np.inf), np.zeros(G + 1, np.int64)
    # tasks: solve j in [jlo, jhi] knowing that the best i lies in [ilo, ihi]
    jlo, jhi = np.array([m]), np.array([G])
    ilo, ihi = np.array([m - 1]), np.array([G - 1])
    while jlo.size:
        jm = (jlo + jhi) // 2
        top = np.minimum(ihi, jm - 1)
        n = top - ilo + 1
        task = np.repeat(np.arange(jm.size), n)
        i = ilo[task] + np.arange(task.size) - np.repeat(np.cumsum(n) - n, n)
        val = d[i] + cost(i, jm[task])
        order = np.lexsort((val, task))  # per task: smallest value, then smallest i
        first = order[np.r_[0, np.cumsum(n)[:-1]]]
        best = i[first]
        dn[jm], opt[jm] = val[first], best
        left, right = jlo <= jm - 1, jm + 1 <= jhi
        jlo, jhi, ilo, ihi = (
            np.r_[jlo[left], jm[right] + 1],
            np.r_[jm[left] - 1, jhi[right]],
            np.r_[ilo[left], best[right]],
            np.r_[best[left], ihi[right]],
        )
    return dn, opt


def _dp_inits(P: _Points, ks: list[int]) -> dict[int, np.ndarray]:
    """Globally optimal k-means of the points (or of <= 2**17 equal-weight groups of them), every k at once.

    Dynamic programming over prefix sums, ``D_m(j) = min_i D_{m-1}(i) + cost(i, j)``, where ``cost(i, j)`` is
    the sum of squares of points ``[i, j)``. In 1-D the optimal split ``i`` is monotone in ``j``, so each layer
    is solved by divide and conquer in O(B log B), vectorised over all sub-problems of one recursion depth.
    """
    B = len(P)
    starts = _dp_groups(P)
    q = P.p - P.ref
    G = starts.size
    pw, ps, pq = (np.r_[0.0, np.cumsum(np.add.reduceat(a, starts))] for a in (P.w, P.w * q, P.w * q * q + P.ss))

    def cost(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.maximum((pq[j] - pq[i]) - (ps[j] - ps[i]) ** 2 / (pw[j] - pw[i]), 0.0)

    kmax = min(max(ks), G)
    d = np.full(G + 1, np.inf)
    d[1:] = cost(np.zeros(G, np.int64), np.arange(1, G + 1))
    opts: dict[int, np.ndarray] = {}  # layer m -> optimal start of the last of m segments ending at each j
    for m in range(2, kmax + 1):
        d, opts[m] = _dp_layer(d, cost, m, G)
    out = {}
    bounds = np.r_[starts, B]
    for k in ks:
        if k > kmax:
            continue
        cuts = [G]
        for m in range(k, 1, -1):
            cuts.append(int(opts[m][cuts[-1]]))
        gb = np.r_[0, np.asarray(cuts[::-1], dtype=np.int64)]
        if gb.size == k + 1 and np.all(np.diff(gb) > 0):
            out[k] = P.means(bounds[gb], accurate=True)
    return out


def _fit_bins(P: _Points, k: int, seed: int, n_init: int, max_iter: int, dp: np.ndarray | None) -> dict:
    """Best of several deterministic initialisations, by inertia on the points."""
    inits = [("dp", dp)] if dp is not None else []
    inits.append(("quantile", _init_quantile(P, k)))
    for i in range(n_init):
        inits.append((f"k-means++[{i}]", _init_kpp(P, k, np.random.default_rng([seed, k, i]))))
    best: dict[str, Any] = {}
    for name, c0 in inits:
        c, n_iter, conv = _lloyd(P, c0, max_iter)
        inert = P.inertia(c)
        if not best or inert < best["inertia"]:
            best = {"centroids": c, "inertia": inert, "init": name, "n_iter": n_iter, "converged": conv}
    best["n_inits"] = len(inits)
    return best
