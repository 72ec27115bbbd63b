"""Stage 5: whole-brain k-means on the intensities inside the brain mask, every k from one pass.

For 1-D data k-means has structure that general k-means lacks: every cluster is an interval of intensities,
so a clustering is fully described by its sorted centroids, and each voxel's label is a lookup against the
midpoints between consecutive centroids. Lloyd's algorithm therefore needs only per-intensity-bin sufficient
statistics, not the voxels, and one histogram pass serves all k.

Three methods sit behind :func:`fit_kmeans` so that they can be compared (``bench/``):

``"histogram"`` (default, exact)
    *Pass 1* streams the volume once and builds, for the voxels inside the mask, an exact **integer** histogram
    of the float32 intensities keyed by the top bits of their IEEE-754 pattern: sign, exponent and the top
    ``log2(n_bins)`` mantissa bits. A bin therefore spans ``1/n_bins`` of an octave (relative width 2**-11 =
    0.05 % by default) -- it adapts to any intensity range, so no min/max pre-pass is needed. Inside a bin the
    value is ``base + L * ulp`` with ``L`` the dropped low mantissa bits, an integer; per bin the pass keeps
    ``count``, ``sum(L)`` and ``sum(L**2)`` as int64. Integer sums are exact and associative, so the
    statistics -- and everything computed from them -- are **bit-identical for any chunking, worker count or
    reduction order**: this is what makes the label maps chunking-independent (a float64 per-bin sum would
    differ in its last bits between chunkings, and a midpoint moved by one ulp can flip a voxel).
    Weighted Lloyd then runs on the bins (points = exact bin means, weights = counts, the within-bin sum of
    squares is a constant) from several deterministic starts -- the *global* optimum of the binned problem
    by dynamic programming (O(B log B) per k, on <= 2**17 equal-weight groups of bins), weighted quantiles,
    and ``n_init`` seeded weighted k-means++ -- and keeps the lowest inertia; all k share the histogram.
    Each Lloyd iteration costs O(k log B) (prefix sums, midpoints searched in the sorted bins).
    Bin-level Lloyd is exact Lloyd on the voxels whenever no bin *straddles* a decision midpoint. The few bins
    that do (at most k - 1 per k) are **refined**: *pass 2* counts, for those bins only (plus their neighbours),
    every distinct float32 value, Lloyd is resumed on the mixed exact/binned data, and the check repeats
    (``max_refine_passes``; in practice one refinement pass suffices). The result is then the fixed point of
    full-precision Lloyd on the voxels: centroids are the exact cluster means of the final labelling and the
    inertia, computed from the same integer statistics, is the exact inertia of that labelling (up to float64
    rounding). ``extra["exact"]`` says whether this was reached; ``extra["data_passes"]`` counts the passes
    (usually 2 for all six k; 1 when no bin straddles a midpoint). When the mask holds fewer distinct bins
    than k, all bins are refined so that the number of distinct intensities is known exactly.

``"minibatch"``
    scikit-learn ``MiniBatchKMeans.partial_fit``, the k models fed from the same stream. *Pass 1* draws a
    uniform random sample of ``init_size`` mask voxels (those with the smallest hash of their global voxel
    index: chunking-independent), checks the input, and initialises each model at the optimal k-means of the
    sample (single k-means++ seedings leave mini-batch k-means 1-15 % above the optimum on the phantom, as
    does scikit-learn's in-memory ``MiniBatchKMeans(n_init=10).fit``). *Pass 2* (``n_epochs`` passes) is the
    stream, defined on a fixed block grid (``block_shape``, independent of the array's chunking): blocks in a
    seeded permuted order (a spatially sequential order feeds the online updates one tissue at a time),
    voxels in C order within a block, shuffled in windows of 16 batches by a seeded generator, cut into
    batches of ``batch_size``. The result is thus independent of the chunking (a non-aligned chunking only
    costs extra reads). A last pass computes the exact inertia and cluster sizes of the labelling.

``"dask-ml"``
    ``dask_ml.cluster.KMeans`` (k-means|| initialisation, then parallel Lloyd) on the masked voxels. It makes
    many passes (one per Lloyd iteration and per initialisation round) and its random sampling depends on
    the chunking, so its result is *not* chunking-independent. dask-ml is optional (``pip install dask-ml``).

Labels (:func:`kmeans_labels`) are computed lazily per chunk: 0 outside the mask, cluster ``j`` (1..k, by
increasing centroid) for ``t[j-2] <= v < t[j-1]`` where ``t`` are the float32 thresholds: the smallest float32
not below each float64 midpoint ``(c[j] + c[j+1]) / 2``. For a float32 value ``v``, ``v >= t`` is exactly
``v >= midpoint``: **a voxel exactly at a midpoint (a tie) goes to the upper cluster**, in the fit as in the
lookup. Intensities are clustered as float32 (what the preprocessed store holds; float64 input is rounded to
float32 first, a 6e-8 relative change).

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> vals = np.random.default_rng(0).choice([10.0, 20.0, 30.0, 40.0], size=(8, 8, 8)).astype("f4")
>>> img = make_volume(da.from_array(vals, chunks=4), np.eye(4))
>>> mask = make_volume(da.ones((8, 8, 8), dtype="u1", chunks=4), np.eye(4), kind="mask")
>>> res = fit_kmeans(img, mask, ks=[4])
>>> res[4].centroids.tolist(), res[4].inertia
([10.0, 20.0, 30.0, 40.0], 0.0)
>>> lab = kmeans_labels(img, mask, res[4])
>>> bool((lab.values == vals / 10).all())
True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from numba import njit

from .errors import HelmError
from .io.regions import chunk_tasks
from .labels import DEFAULT_KS, K_MAX, K_MIN
from .volume import affine_of, like, provenance_record

__all__ = ["KMeansResult", "fit_kmeans", "kmeans_labels", "kmeans_maps", "METHODS", "K_MIN", "K_MAX"]

METHODS = ("histogram", "minibatch", "dask-ml")
TIE_RULE = "a value exactly at the midpoint of two centroids goes to the upper cluster"

_DEFAULT_CHUNKS = (128, 128, 128)
_PIECE = 1 << 22  # voxels per sub-slab in the per-chunk histogram (keeps float64 bincount sums exact)
_DENSE_SPAN = 1 << 21  # per-chunk key span up to which a dense bincount is used instead of np.unique
_DP_GROUPS = 1 << 17  # bins are grouped into at most this many for the dynamic-programming initialisation
_FAN_IN = 8  # tree-reduction fan-in of per-chunk histograms


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """One fitted k-means: sorted centroids, inertia, method, and method-specific details.

    Attributes
    ----------
    k : int
        Number of clusters.
    centroids : np.ndarray
        ``(k,)`` float64, strictly ascending: cluster ``j`` (label ``j + 1``) has centroid ``centroids[j]``.
    inertia : float
        Sum over **all** mask voxels of the squared distance to the centroid of the voxel's label (float64).
    method : str
        ``"histogram"``, ``"minibatch"`` or ``"dask-ml"``.
    n_voxels : int
        Number of voxels inside the mask.
    extra : dict
        JSON-able details (passes over the data, exactness, cluster sizes, thresholds, ...).
    """

    k: int
    centroids: np.ndarray
    inertia: float
    method: str
    n_voxels: int
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.k = int(self.k)
        self.centroids = np.asarray(self.centroids, dtype=np.float64).ravel()
        if self.centroids.shape != (self.k,):
            raise ValueError(f"expected {self.k} centroids, got {self.centroids.shape[0]}")
        if np.any(np.diff(self.centroids) < 0):
            raise ValueError("centroids must be sorted ascending")
        self.inertia = float(self.inertia)
        self.n_voxels = int(self.n_voxels)
        self.method = str(self.method)

    @property
    def thresholds(self) -> np.ndarray:
        """``(k - 1,)`` float32 decision thresholds: a float32 value ``v`` is in cluster >= j + 2 iff ``v >= t[j]``."""
        return _thresholds(self.centroids)

    def to_dict(self) -> dict:
        """JSON-able dict (lists and Python scalars only)."""
        return {
            "k": self.k,
            "centroids": [float(c) for c in self.centroids],
            "inertia": self.inertia,
            "method": self.method,
            "n_voxels": self.n_voxels,
            "extra": _jsonable(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KMeansResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            k=d["k"],
            centroids=np.asarray(d["centroids"], dtype=np.float64),
            inertia=d["inertia"],
            method=d["method"],
            n_voxels=d["n_voxels"],
            extra=dict(d.get("extra", {})),
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _thresholds(centroids: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 midpoint, so that ``v32 >= t`` <=> ``v32 >= midpoint`` exactly."""
    c = np.asarray(centroids, dtype=np.float64)
    mid = 0.5 * (c[:-1] + c[1:])
    t = mid.astype(np.float32)
    below = t.astype(np.float64) < mid
    t[below] = np.nextafter(t[below], np.float32(np.inf))
    return t


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def _as_dask(x: Any) -> da.Array:
    data = x.data if isinstance(x, xr.DataArray) else x
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(
            data, chunks=tuple(min(c, s) for c, s in zip(_DEFAULT_CHUNKS, data.shape)) if data.ndim == 3 else "auto"
        )
    return data


def _inputs(image: Any, mask: Any) -> tuple[da.Array, da.Array]:
    img, msk = _as_dask(image), _as_dask(mask)
    if img.ndim != 3:
        raise HelmError(
            f"k-means needs a 3-D intensity image, got {img.ndim}-D (shape {img.shape})",
            hint="choose or combine the echoes first (--echo N or --echo-combine)",
        )
    if msk.shape != img.shape:
        raise HelmError(
            f"mask shape {msk.shape} differs from image shape {img.shape}",
            hint="use the brain mask made on the same grid as the image (resample it with the image)",
        )
    if (
        isinstance(image, xr.DataArray)
        and isinstance(mask, xr.DataArray)
        and "affine" in image.attrs
        and "affine" in mask.attrs
    ):
        if not np.allclose(affine_of(image), affine_of(mask), rtol=0, atol=1e-6):
            raise HelmError(
                "mask and image have different affines (they are not on the same grid)",
                hint="resample the mask onto the image grid first",
            )
    if msk.chunks != img.chunks:
        msk = msk.rechunk(img.chunks)
    return img, msk


def _check_ks(ks: Any) -> list[int]:
    if isinstance(ks, (int, np.integer)):
        ks = [ks]
    try:
        ks = list(ks)
    except TypeError:
        raise HelmError(f"ks must be an integer or an iterable of integers, got {ks!r}") from None
    if not ks:
        raise HelmError("ks is empty: give at least one number of clusters", hint="e.g. ks=range(4, 10)")
    bad = [k for k in ks if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not K_MIN <= int(k) <= K_MAX]
    if bad:
        raise HelmError(
            f"k must be an integer between {K_MIN} and {K_MAX}; got {bad}",
            hint=f"pass ks within {K_MIN}..{K_MAX} (the default is 4..9)",
        )
    return sorted({int(k) for k in ks})


def _masked_f32(img: np.ndarray, msk: np.ndarray) -> np.ndarray:
    """Intensities inside the mask (C order) as float32, with -0.0 turned into +0.0 (one value, one bin)."""
    v = np.asarray(img)[np.asarray(msk) != 0].astype(np.float32, copy=False)
    # adding +0.0 is a full copy: pay for it only when some sign bit is set (any -0.0 has one)
    if v.size and v.view(np.uint32).max() >= 0x80000000:
        v = v + np.float32(0.0)
    return v


def _tree(parts: list, fn) -> Any:
    """Fixed-shape tree reduction of delayed parts (``fn`` must be exact/associative: integer sums)."""
    if not parts:
        return dask.delayed(fn)()
    while len(parts) > 1:
        parts = [dask.delayed(fn, pure=True)(*parts[i : i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    return parts[0]


def _on_pair(regions: list, fn, *args) -> Any:
    return fn(regions[0], regions[1], *args)


def _pair_tasks(img: da.Array, msk: da.Array, fn, *args) -> list:
    """One delayed ``fn(image chunk, mask chunk, *args)`` per image chunk. Volumes opened from a store are
    read inside the task (image and mask together): no separate read tasks whose decoded chunks the
    scheduler would hold or move between workers -- the passes then cost little more than decoding."""
    return chunk_tasks(_on_pair, [img, msk], fn, *args, name=f"kmeans{fn.__name__}")


def _block_pairs(img: da.Array, msk: da.Array) -> list[tuple]:
    bi = img.to_delayed().ravel()
    bm = msk.to_delayed().ravel()
    return list(zip(bi, bm))


# --------------------------------------------------------------------------------------------------------------
# Pass 1: exact integer histogram keyed by float32 bit patterns
# --------------------------------------------------------------------------------------------------------------


def _shift_for(n_bins: Any) -> int:
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


def _flat_inputs(img: np.ndarray, msk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's float32 values and mask as flat arrays for the compiled loops (views when contiguous)."""
    v = np.ascontiguousarray(np.asarray(img), dtype=np.float32).reshape(-1)
    m = np.asarray(msk)
    if m.dtype != np.bool_ and m.dtype != np.uint8:
        m = m != 0
    return v, np.ascontiguousarray(m).reshape(-1)


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
        keys = nz + base if np.isscalar(base) else base[nz]
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
    return _merge_sparse([p[0] for p in parts], [[p[1] for p in parts]])


def _histogram_pass(img: da.Array, msk: da.Array, s: int) -> tuple:
    parts = _pair_tasks(img, msk, _hist_block, s)
    (res,) = dask.compute(_tree(parts, _merge_hists))
    return res


def _refine_pass(img: da.Array, msk: da.Array, s: int, rkeys: np.ndarray) -> dict[int, tuple]:
    """Exact float32 values and counts inside each bin of ``rkeys`` (one pass). Returns {key: (values, counts)}."""
    rkeys = np.asarray(np.sort(rkeys), dtype=np.int64)
    parts = _pair_tasks(img, msk, _refine_block, s, rkeys)
    ((codes, counts),) = dask.compute(_tree(parts, _merge_refine))
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


# --------------------------------------------------------------------------------------------------------------
# Weighted 1-D Lloyd on bins
# --------------------------------------------------------------------------------------------------------------


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


def _dp_inits(P: _Points, ks: list[int]) -> dict[int, np.ndarray]:
    """Globally optimal k-means of the points (or of <= 2**17 equal-weight groups of them), every k at once.

    Dynamic programming over prefix sums, ``D_m(j) = min_i D_{m-1}(i) + cost(i, j)``, where ``cost(i, j)`` is
    the sum of squares of points ``[i, j)``. In 1-D the optimal split ``i`` is monotone in ``j``, so each layer
    is solved by divide and conquer in O(B log B), vectorised over all sub-problems of one recursion depth.
    """
    B = len(P)
    if B > _DP_GROUPS:
        t = P.n_total * np.arange(1, _DP_GROUPS) / _DP_GROUPS
        starts = np.unique(np.r_[0, np.minimum(np.searchsorted(P.cw[1:], t, side="right"), B - 1)])
    else:
        starts = np.arange(B)
    q = P.p - P.ref
    G = starts.size
    pw, ps, pq = (np.r_[0.0, np.cumsum(np.add.reduceat(a, starts))] for a in (P.w, P.w * q, P.w * q * q + P.ss))

    def cost(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.maximum((pq[j] - pq[i]) - (ps[j] - ps[i]) ** 2 / (pw[j] - pw[i]), 0.0)

    kmax = min(max(ks), G)
    d = np.full(G + 1, np.inf)
    d[1:] = cost(np.zeros(G, np.int64), np.arange(1, G + 1))
    opts = [None]
    for m in range(2, kmax + 1):
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
        d = dn
        opts.append(opt)
    out = {}
    bounds = np.r_[starts, B]
    for k in ks:
        if k > kmax:
            continue
        cuts = [G]
        for m in range(k, 1, -1):
            cuts.append(int(opts[m - 1][cuts[-1]]))
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
    best = None
    for name, c0 in inits:
        c, n_iter, conv = _lloyd(P, c0, max_iter)
        inert = P.inertia(c)
        if best is None or inert < best["inertia"]:
            best = {"centroids": c, "inertia": inert, "init": name, "n_iter": n_iter, "converged": conv}
    best["n_inits"] = len(inits)
    return best


def _qc_histogram(P: _Points, n: int = 128) -> dict:
    lo, hi = float(P.p[0]), float(P.p[-1])
    edges = np.linspace(lo, hi, n + 1) if hi > lo else np.array([lo - 0.5, hi + 0.5])
    counts, _ = np.histogram(P.p, bins=edges, weights=P.w)
    return {
        "edges": edges.tolist(),
        "counts": np.rint(counts).astype(np.int64).tolist(),
        "note": "QC only: counts of the fine bins, each placed at its mean",
    }


def _fit_histogram(img, msk, ks, *, seed, n_bins, n_init, max_refine_passes, max_iter) -> dict[int, KMeansResult]:
    s = _shift_for(n_bins)
    hist = _histogram_pass(img, msk, s)
    passes = 1
    key, cnt = hist[0], hist[1]
    _check_data(int(cnt.sum()), int(hist[4]))
    n_vox = int(cnt.sum())
    refined: dict[int, tuple] = {}
    if key.size < max(ks):
        # fewer bins than k: resolve every bin to exact values so that distinct intensities are counted exactly
        refined.update(_refine_pass(img, msk, s, key))
        passes += 1
    P = _Points(hist, s, refined)
    if refined:  # every bin resolved: the points are the distinct intensities
        _check_distinct(ks, len(P))
    # (otherwise there are >= max(ks) non-empty bins, hence >= max(ks) distinct intensities)
    dp = _dp_inits(P, ks)
    fits = {k: _fit_bins(P, k, seed, n_init, max_iter, dp.get(k)) for k in ks}
    for _ in range(max_refine_passes):
        todo = np.unique(np.concatenate([P.key[P.straddlers(f["centroids"])] for f in fits.values()]))
        if todo.size == 0:
            break
        refined.update(_refine_pass(img, msk, s, todo))
        passes += 1
        P = _Points(hist, s, refined)
        for f in fits.values():
            c, n_iter, conv = _lloyd(P, f["centroids"], max_iter)
            f.update(centroids=c, n_iter=f["n_iter"] + n_iter, converged=conv, inertia=P.inertia(c))
    qc = _qc_histogram(P)
    out = {}
    for k, f in fits.items():
        c = f["centroids"]
        b = P.bounds(c)
        sizes = np.rint(P.cw[b[1:]] - P.cw[b[:-1]]).astype(np.int64)
        # exact: Lloyd converged and no bin of unknown values straddles a midpoint, so the centroids are the
        # exact means of the voxel clusters and the inertia is the exact inertia of the label map
        exact = bool(f["converged"] and P.straddlers(c).size == 0)
        extra = {
            "data_passes": passes,
            "exact": exact,
            "converged": f["converged"],
            "n_bins_per_octave": int(n_bins),
            "n_hist_bins": int(key.size),
            "n_refined_bins": len(refined),
            "init": f["init"],
            "n_inits": f["n_inits"],
            "n_iter": int(f["n_iter"]),
            "seed": int(seed),
            "cluster_sizes": sizes,
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": True,
            "histogram": qc,
        }
        out[k] = KMeansResult(k, c, P.inertia(c, b), "histogram", n_vox, extra)
    return out


def _check_data(n_vox: int, nonfinite: int) -> None:
    if nonfinite:
        raise HelmError(
            f"{nonfinite} voxels inside the mask are NaN or infinite",
            hint="fix the preprocessing (bias correction) or exclude them from the mask",
        )
    if n_vox == 0:
        raise HelmError(
            "the brain mask is empty: there is no voxel to cluster",
            hint="check the brain mask (stage 2) and that it is on the image grid",
        )


def _check_distinct(ks: list[int], n_distinct: int) -> None:
    bad = [k for k in ks if k > n_distinct]
    if bad:
        raise HelmError(
            f"only {n_distinct} distinct intensities inside the mask, fewer than k = {bad}",
            hint=f"use k <= {n_distinct}, and check that the input is the preprocessed intensity "
            "image (not a label map or a mask)",
        )


# --------------------------------------------------------------------------------------------------------------
# Exact inertia pass (minibatch, dask-ml)
# --------------------------------------------------------------------------------------------------------------


def _inertia_block(img: np.ndarray, msk: np.ndarray, cents: tuple) -> np.ndarray:
    v = _masked_f32(img, msk)
    out = []
    for c in cents:
        c = np.asarray(c, dtype=np.float64)
        lab = np.searchsorted(_thresholds(c), v, side="right")
        d = v.astype(np.float64) - c[lab]
        out.append(np.r_[float(np.dot(d, d)), np.bincount(lab, minlength=c.size).astype(np.float64)])
    return np.concatenate(out) if out else np.zeros(0)


def _sum_arrays(*parts: np.ndarray) -> np.ndarray:
    return np.sum(np.stack(parts), axis=0)


def _inertia_pass(img: da.Array, msk: da.Array, cents: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
    """One pass: for each centroid set, the inertia of the threshold labelling and the cluster sizes."""
    cents_t = tuple(tuple(float(x) for x in c) for c in cents)
    parts = _pair_tasks(img, msk, _inertia_block, cents_t)
    (tot,) = dask.compute(_tree(parts, _sum_arrays))
    out, i = [], 0
    for c in cents:
        out.append((float(tot[i]), np.rint(tot[i + 1 : i + 1 + c.size]).astype(np.int64)))
        i += 1 + c.size
    return out


# --------------------------------------------------------------------------------------------------------------
# minibatch
# --------------------------------------------------------------------------------------------------------------


def _grid_blocks(shape: tuple[int, ...], block_shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Slices of a fixed block grid, in C order of the block indices."""
    starts = [range(0, n, b) for n, b in zip(shape, block_shape)]
    return [
        tuple(slice(i, min(i + b, n)) for i, b, n in zip(corner, block_shape, shape))
        for corner in itertools.product(*starts)
    ]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64 finaliser): a reproducible pseudo-random key per voxel index."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _sample_block(img: np.ndarray, msk: np.ndarray, offset: tuple, shape: tuple, size: int, seed: int) -> tuple:
    """Per chunk: the ``size`` mask voxels with the smallest keys, voxel count, non-finite count, a few values.

    The key of a voxel is a hash of its *global* linear index and the seed, so the union over chunks of the
    smallest keys is a uniform random sample that does not depend on the chunking.
    """
    m = np.asarray(msk) != 0
    v = _masked_f32(img, m)
    nonfinite = int(v.size - np.count_nonzero(np.isfinite(v)))
    distinct = np.unique(v[np.isfinite(v)])[: K_MAX + 1]
    if v.size == 0:
        return np.zeros(0, np.uint64), v, 0, nonfinite, distinct
    ijk = [a.astype(np.int64) + o for a, o in zip(np.nonzero(m), offset)]
    idx = np.ravel_multi_index(ijk, shape).astype(np.uint64)
    key = _splitmix64(idx ^ _splitmix64(np.uint64(seed)))
    if key.size > size:
        keep = np.argpartition(key, size - 1)[:size]
        key, v_s = key[keep], v[keep]
    else:
        v_s = v
    return key, v_s, int(v.size), nonfinite, distinct


def _merge_samples(*parts: tuple, size: int) -> tuple:
    key = np.concatenate([p[0] for p in parts])
    val = np.concatenate([p[1] for p in parts])
    order = np.argsort(key)[:size]  # keys are distinct (bijective hash of distinct indices)
    distinct = np.unique(np.concatenate([p[4] for p in parts]))[: K_MAX + 1]
    return key[order], val[order], sum(p[2] for p in parts), sum(p[3] for p in parts), distinct


def _sample_pass(img: da.Array, msk: da.Array, size: int, seed: int) -> tuple:
    """One pass: uniform random sample of ``size`` mask voxels (in random order), counts, distinct values."""
    offsets = list(itertools.product(*[np.r_[0, np.cumsum(c)[:-1]].tolist() for c in img.chunks]))
    parts = [
        dask.delayed(_sample_block, pure=True)(bi, bm, tuple(int(o) for o in off), img.shape, size, seed)
        for (bi, bm), off in zip(_block_pairs(img, msk), offsets)
    ]
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge_samples, pure=True)(*parts[i : i + _FAN_IN], size=size)
            for i in range(0, len(parts), _FAN_IN)
        ]
    (res,) = dask.compute(parts[0])
    return res


def _init_centres(x: np.ndarray, ks: list[int], seed: int, n_init: int) -> dict[int, np.ndarray]:
    """Initial centres: the k-means optimum of the uniform random sample (as the histogram method finds it).

    A single pass of mini-batch updates cannot leave the basin of its seeding, and k-means++ seedings of 1-D
    intensities with k = 4..9 land 1-15 % above the optimum on the phantom (so does scikit-learn's in-memory
    ``MiniBatchKMeans(n_init=10).fit``); starting from the best clustering of the sample fixes that.
    """
    P = _Points.from_values(x)
    dp = _dp_inits(P, ks)
    return {k: _fit_bins(P, k, seed, n_init, 10000, dp.get(k))["centroids"] for k in ks}


def _fit_minibatch(img, msk, ks, **kw) -> dict[int, KMeansResult]:
    from threadpoolctl import threadpool_limits

    # scikit-learn's OpenMP threads on 1-D batches of ~1e4..1e5 values cost more than they save, and they
    # oversubscribe the cores dask is already using
    with threadpool_limits(limits=1):
        return _fit_minibatch_1(img, msk, ks, **kw)


def _fit_minibatch_1(
    img, msk, ks, *, seed, batch_size, block_shape, blocks_per_compute, n_init, n_epochs, init_size
) -> dict[int, KMeansResult]:
    from sklearn.cluster import MiniBatchKMeans

    batch_size = int(batch_size)
    if batch_size < K_MAX:
        raise HelmError(f"batch_size must be at least {K_MAX}, got {batch_size}")
    if int(n_epochs) < 1:
        raise HelmError(f"n_epochs must be >= 1, got {n_epochs}")
    init_size = int(init_size)
    # pass 1: validation and a uniform random init sample (chunking-independent)
    _, sample, n_vox, nonfinite, distinct = _sample_pass(img, msk, max(init_size, K_MAX), seed)
    _check_data(n_vox, nonfinite)
    _check_distinct(ks, distinct.size)
    init = _init_centres(sample.astype(np.float64), ks, seed, n_init)
    models = {
        k: MiniBatchKMeans(
            n_clusters=k,
            random_state=seed,
            batch_size=batch_size,
            n_init=1,
            init=init[k][:, None],
            compute_labels=False,
        )
        for k in ks
    }
    # passes 2..: the stream
    block_shape = tuple(int(b) for b in (block_shape if np.ndim(block_shape) else (block_shape,) * 3))
    blocks = _grid_blocks(img.shape, block_shape)
    window = 16 * batch_size
    rng = np.random.default_rng([seed, 1])
    buf: list[np.ndarray] = []
    nbuf = 0

    def drain(final: bool) -> None:
        nonlocal buf, nbuf
        if not buf:
            return
        x = np.concatenate(buf)
        x = x[rng.permutation(x.size)]
        nfull = x.size if final else x.size // batch_size * batch_size
        xb = x[:nfull].astype(np.float64)[:, None]
        for i in range(0, nfull, batch_size):
            for m in models.values():
                m.partial_fit(xb[i : i + batch_size])
        buf = [x[nfull:]] if nfull < x.size else []
        nbuf = x.size - nfull

    for _ in range(int(n_epochs)):
        order = rng.permutation(len(blocks))
        for g in range(0, len(order), blocks_per_compute):
            sel = [blocks[i] for i in order[g : g + blocks_per_compute]]
            for bi, bm in dask.compute(*[(img[sl], msk[sl]) for sl in sel]):
                v = _masked_f32(bi, bm)
                if v.size:
                    buf.append(v)
                    nbuf += v.size
                    if nbuf >= window:
                        drain(False)
    drain(True)
    cents = [np.sort(models[k].cluster_centers_.ravel()) for k in ks]
    # last pass: exact inertia and cluster sizes of the label maps
    stats = _inertia_pass(img, msk, cents)
    out = {}
    for k, c, (inert, sizes) in zip(ks, cents, stats):
        extra = {
            "data_passes": int(n_epochs) + 2,
            "batch_size": batch_size,
            "block_shape": list(block_shape),
            "n_epochs": int(n_epochs),
            "init_size": int(sample.size),
            "n_steps": int(models[k].n_steps_),
            "seed": int(seed),
            "cluster_sizes": sizes,
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": True,
            "stream": "init: optimal k-means of a uniform random sample (hash of the global voxel "
            "index); stream: fixed block grid, seeded permuted block order per epoch, C order in "
            "blocks, seeded shuffle in windows of 16 batches",
        }
        out[k] = KMeansResult(k, c, inert, "minibatch", n_vox, extra)
    return out


# --------------------------------------------------------------------------------------------------------------
# dask-ml
# --------------------------------------------------------------------------------------------------------------


def _fit_daskml(img, msk, ks, *, seed, n_bins) -> dict[int, KMeansResult]:
    try:
        from dask_ml.cluster import KMeans as DaskKMeans
    except ImportError:
        raise HelmError(
            "method='dask-ml' needs the optional package dask-ml, which is not installed",
            hint="pip install dask-ml, or use method='histogram' (exact, the default)",
        ) from None
    # validation (empty mask, non-finite values, distinct intensities) from the exact histogram pass
    s = _shift_for(n_bins)
    hist = _histogram_pass(img, msk, s)
    _check_data(int(hist[1].sum()), int(hist[4]))
    n_vox = int(hist[1].sum())
    if hist[0].size < max(ks):
        P = _Points(hist, s, _refine_pass(img, msk, s, hist[0]))
        _check_distinct(ks, len(P))
    vals = img.astype(np.float32)[msk != 0]
    vals.compute_chunk_sizes()
    X = vals.astype(np.float64)[:, None]
    cents, iters = [], []
    for k in ks:
        km = DaskKMeans(n_clusters=k, init="k-means||", random_state=seed).fit(X)
        cents.append(np.sort(np.asarray(km.cluster_centers_, dtype=np.float64).ravel()))
        iters.append(int(getattr(km, "n_iter_", -1)))
    stats = _inertia_pass(img, msk, cents)
    out = {}
    for k, c, it, (inert, sizes) in zip(ks, cents, iters, stats):
        extra = {
            "n_iter": it,
            "seed": int(seed),
            "cluster_sizes": sizes,
            "data_passes": "many: a validation pass, a chunk-size pass, then per k one per k-means|| "
            "round and Lloyd iteration, and a final inertia pass",
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": False,
        }
        out[k] = KMeansResult(k, c, inert, "dask-ml", n_vox, extra)
    return out


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def fit_kmeans(
    image: Any,
    mask: Any,
    *,
    ks: Iterable[int] | int = DEFAULT_KS,
    method: str = "histogram",
    seed: int = 0,
    n_bins: int = 2048,
    n_init: int = 10,
    max_refine_passes: int = 2,
    max_iter: int = 10000,
    batch_size: int = 65536,
    n_epochs: int = 1,
    block_shape: Any = (128, 128, 128),
    blocks_per_compute: int = 4,
    init_size: int = 1 << 17,
) -> dict[int, KMeansResult]:
    """Fit 1-D k-means to the intensities inside ``mask`` for every k in ``ks``, from as few passes as possible.

    Computes eagerly and returns only small fitted parameters; the label maps are made lazily by
    :func:`kmeans_labels`. Passes over the volume (``extra["data_passes"]``): ``"histogram"`` 1 + the
    refinement passes, usually 2 in all for every k together; ``"minibatch"`` 2 + ``n_epochs``; ``"dask-ml"``
    many. Memory per task is bounded by the chunk (plus a histogram of at most ~1e6 bins).

    Parameters
    ----------
    image : xarray.DataArray or array
        3-D intensity volume (lazy; clustered as float32).
    mask : xarray.DataArray or array
        Brain mask on the same grid; voxels with ``mask != 0`` are clustered.
    ks : iterable of int or int
        Numbers of clusters, each in 2..20 (default 4..9). All are fitted from the same pass(es).
    method : {"histogram", "minibatch", "dask-ml"}
        ``"histogram"`` (default) is exact and chunking-independent; the others are for comparison.
    seed : int
        Seed of every random choice (k-means++ starts, minibatch stream and models, dask-ml).
    n_bins : int
        ``"histogram"``: bins per octave (factor-of-two intensity range), a power of two in 256..65536;
        default 2048 = bins 0.05 % wide. Finer bins straddle fewer midpoints but cost memory per chunk.
    n_init : int
        ``"histogram"``: number of weighted k-means++ starts, in addition to the dynamic-programming and
        quantile starts (all deterministic; the lowest inertia wins).
    max_refine_passes : int
        ``"histogram"``: at most this many extra passes to resolve bins straddling a midpoint (0 = one pass
        only, then ``extra["exact"]`` may be False).
    max_iter : int
        ``"histogram"``: Lloyd iterations per start (on bins: microseconds each).
    batch_size, n_epochs, block_shape, blocks_per_compute, init_size
        ``"minibatch"``: batch size; passes of the stream; the fixed block grid that defines the stream
        (independent of the chunking); blocks read per compute; size of the uniform random sample (chosen
        by a hash of the global voxel index) whose optimal k-means clustering initialises the models.

    Returns
    -------
    dict of int to KMeansResult
        One result per k, centroids ascending (label j + 1 <-> ``centroids[j]``).

    Raises
    ------
    HelmError
        k outside 2..20, an empty mask, fewer distinct intensities in the mask than some k, NaN/inf inside the
        mask, unknown method, dask-ml missing.

    Example
    -------
    >>> import numpy as np
    >>> img = np.repeat([1.0, 2.0, 5.0, 6.0], 16).reshape(4, 4, 4)
    >>> res = fit_kmeans(img, np.ones((4, 4, 4)), ks=[2])
    >>> res[2].centroids.tolist(), res[2].inertia
    ([1.5, 5.5], 16.0)
    """
    ks_ = _check_ks(ks)
    if method not in METHODS:
        raise HelmError(f"unknown k-means method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    seed = int(seed)
    img, msk = _inputs(image, mask)
    if method == "histogram":
        if int(n_init) < 0 or int(max_refine_passes) < 0 or int(max_iter) < 1:
            raise HelmError("n_init and max_refine_passes must be >= 0 and max_iter >= 1")
        return _fit_histogram(
            img,
            msk,
            ks_,
            seed=seed,
            n_bins=n_bins,
            n_init=int(n_init),
            max_refine_passes=int(max_refine_passes),
            max_iter=int(max_iter),
        )
    if method == "minibatch":
        return _fit_minibatch(
            img,
            msk,
            ks_,
            seed=seed,
            batch_size=batch_size,
            block_shape=block_shape,
            blocks_per_compute=max(1, int(blocks_per_compute)),
            n_init=int(n_init),
            n_epochs=n_epochs,
            init_size=init_size,
        )
    return _fit_daskml(img, msk, ks_, seed=seed, n_bins=n_bins)


def _label_block(img: np.ndarray, msk: np.ndarray, *, thresholds: np.ndarray) -> np.ndarray:
    v = np.asarray(img).astype(np.float32, copy=False)
    lab = np.searchsorted(thresholds, v, side="right").astype(np.uint8)
    lab += np.uint8(1)
    lab[np.asarray(msk) == 0] = 0
    return lab


def kmeans_labels(image: Any, mask: Any, result: KMeansResult | Mapping[str, Any]) -> Any:
    """Lazy uint8 label map: 0 outside the mask, 1..k inside by increasing centroid.

    Each voxel is looked up (per chunk, ``map_blocks``) against the float32 thresholds between the sorted
    centroids; a voxel exactly at a midpoint goes to the upper cluster. The result is bit-identical for any
    chunking. ``attrs["kmeans"]`` holds ``result.to_dict()``.

    Parameters
    ----------
    image, mask : xarray.DataArray (or arrays)
        As given to :func:`fit_kmeans`.
    result : KMeansResult or its dict

    Returns
    -------
    xarray.DataArray
        ``kind="labels"`` volume with the image's affine (a dask array when ``image`` is not a DataArray).

    Example
    -------
    >>> import numpy as np
    >>> r = KMeansResult(2, [1.5, 5.5], 16.0, "histogram", 64)
    >>> kmeans_labels(np.array([1.0, 3.5, 6.0]).reshape(1, 1, 3), np.ones((1, 1, 3)), r).compute().ravel()
    array([1, 2, 2], dtype=uint8)
    """
    if not isinstance(result, KMeansResult):
        result = KMeansResult.from_dict(result)
    img, msk = _inputs(image, mask)
    data = da.map_blocks(_label_block, img, msk, dtype=np.uint8, thresholds=result.thresholds)
    return _label_volume(image, data, result)


def _label_volume(image: Any, data: da.Array, result: KMeansResult) -> Any:
    """The lazy labels ``data`` as a volume on the image's grid, with the fit in its attrs."""
    if not isinstance(image, xr.DataArray) or "affine" not in image.attrs:
        return data
    params = {
        "k": result.k,
        "method": result.method,
        "centroids": [float(c) for c in result.centroids],
        "tie_rule": TIE_RULE,
    }
    out = like(image, data, kind="labels", name=f"kmeans_k{result.k}", step=provenance_record("kmeans", params))
    out.attrs["kmeans"] = result.to_dict()
    return out


def _label_tables(results: list[KMeansResult]) -> tuple[np.ndarray, np.ndarray]:
    """The union ``U`` of every result's thresholds and one table per result mapping ``u`` to its label.

    For a float32 ``v`` with ``u = searchsorted(U, v, "right")`` (``U[u-1] <= v < U[u]``) the count of a
    result's thresholds ``<= v`` equals the count of them ``<= U[u-1]``, since all of them are in ``U``: so
    ``tables[i, u]`` = that count + 1 is exactly :func:`_label_block`'s label. The last column (``u = len(U)
    + 1``, never a search result) holds the 0 given to voxels outside the mask.
    """
    union = np.unique(np.concatenate([r.thresholds for r in results])).astype(np.float32)
    below = np.concatenate([[-np.inf], union.astype(np.float64)])  # U[u - 1], -inf for u = 0
    tables = np.zeros((len(results), union.size + 2), dtype=np.uint8)
    for i, r in enumerate(results):
        tables[i, :-1] = np.searchsorted(r.thresholds.astype(np.float64), below, side="right") + 1
    return union, tables


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


def _labels_block(img: np.ndarray, msk: np.ndarray, *, union: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Every k's labels of one chunk, stacked on a new first axis: one binary search, then a lookup per k."""
    v, m = _flat_inputs(img, msk)
    out = np.empty((len(tables), v.size), dtype=np.uint8)
    _labels_nb(v, m, union, tables, out)
    return out.reshape((len(tables), *np.shape(img)))


def kmeans_maps(image: Any, mask: Any, results: Mapping[int, KMeansResult]) -> dict[int, Any]:
    """Lazy label maps for every fitted k, equal to ``{k: kmeans_labels(image, mask, results[k])}``.

    One task per chunk labels all k: one binary search of each voxel against the union of all thresholds,
    then a small table per k, in one compiled loop. Compute or store the maps together
    (one ``dask.compute`` / ``da.store``) so that the image is read once for all k.

    Example
    -------
    >>> import numpy as np
    >>> r2, r3 = KMeansResult(2, [1.5, 5.5], 16.0, "histogram", 4), KMeansResult(3, [1, 3.5, 6], 1.0, "histogram", 4)
    >>> m = kmeans_maps(np.array([1.0, 3.5, 6.0, 0.0]).reshape(1, 1, 4), np.array([1, 1, 1, 0]).reshape(1, 1, 4),
    ...                 {2: r2, 3: r3})
    >>> m[2].compute().ravel().tolist(), m[3].compute().ravel().tolist()
    ([1, 2, 2, 0], [1, 2, 3, 0])
    """
    ks = sorted(results)
    res = [r if isinstance(r, KMeansResult) else KMeansResult.from_dict(r) for r in (results[k] for k in ks)]
    if not ks:
        return {}
    union, tables = _label_tables(res)
    img, msk = _inputs(image, mask)
    stack = da.map_blocks(
        _labels_block,
        img,
        msk,
        dtype=np.uint8,
        new_axis=0,
        chunks=((len(ks),), *img.chunks),
        union=union,
        tables=tables,
    )
    return {k: _label_volume(image, stack[i], r) for i, (k, r) in enumerate(zip(ks, res))}
