"""Stage 7 -- hemisphere mirroring: fit the mirror plane, then build the whole brain, out of core.

**The fit** (:func:`fit_mirror`). The rigid transform ``T`` (rotation ``R`` about the mask centroid ``c``,
then translation ``t``) minimises, over the brain-mask voxel centres ``v_i`` (world mm),

    C(T) = sum_i [x_i(T) > 0] x_i(T)  -  alpha * sum_i x_i(T),      T(v) = R (v - c) + c + t,

where ``x_i(T)`` is the world x after ``T`` and ``x = 0`` is the mirror plane. What the cost teaches is used
in full:

* only the first row ``n`` of ``R`` (the unit normal of the mirror plane in the input frame) and ``t_x``
  enter ``C``: a rotation about the x axis and the y/z translations change nothing, so they are set to 0
  (the hemisphere stays where it is in y and z) and ``R = Rx(0) Ry(ry) Rz(rz)`` -- two angles to search;
* for a fixed rotation ``C`` is convex and piecewise linear in ``t_x`` with slope ``#(x > 0) - alpha N``,
  so the best ``t_x`` puts the ``m``-th largest x at 0, ``m = floor(alpha N) + 1`` (a quantile: at the
  optimum the fraction across the plane is ``floor(alpha N) / N ~ alpha``). Caveat: when the medial face is
  aligned with the voxel grid (as in the built-in phantom) its whole voxel layer shares one x; the exact
  optimum then puts that layer ON the plane and the fraction across is below alpha (often 0);
* the two angles are searched on a coarse grid (``grid_deg = (half range, step)``, default +-30 deg by
  2 deg, on the first 20 000 sample points) and refined by Nelder-Mead (from the three best grid points on
  those points, then on the whole sample), on a deterministic subsample of the mask voxels: the
  ``n_sample`` voxels with the smallest ``splitmix64`` hash of their global linear index (a uniform sample
  without replacement that does not depend on the chunking);
* then, on ALL mask voxels, out of core: the exact quantile (a chunked 65536-bin integer histogram of x,
  refined inside the one bin that holds it, then the distinct values of that bin), the cost, the fraction
  across the plane and the gap (below).

Three chunked passes over the mask (moments + subsample; histogram + columns; the quantile's bin), each task
holding one chunk. The transform is bit-identical for any chunking (integer index sums, hash-chosen sample,
exact order statistic); the reported cost is a float64 sum whose last digits may differ across chunkings.

**The gap** (``gap_mm``). The cost pins the hemisphere's most medial voxels to the plane, but a wrong
rotation leaves a wedge between the medial face and the plane. So, looking along x after ``T``, for every
(y, z) column of the hemisphere's sagittal footprint (square columns of ``2 x`` the largest voxel size) the
column gap is the distance from the plane to the column's most medial voxel centre (0 if it is across);
``gap_mm`` is the ``gap_quantile`` (default median) of the column gaps over the footprint: half of the
footprint reaches within ``gap_mm`` of the plane. It is about half a voxel for a flat medial face that the
fit made parallel to the plane, and half the wedge opening otherwise.

**The whole brain** (:func:`whole_brain_grid`, :func:`mirror_labels`). An axis-aligned RAS+ grid at the
working spacing whose x voxel centres are symmetric about 0 (``n_x`` even, centre ``i`` at
``(i + 0.5 - n_x / 2) s``, so ``x -> -x`` maps voxel ``i`` onto ``n_x - 1 - i`` exactly) and which covers
the transformed hemisphere's bounding box, its mirror and a margin. Output voxel ``i < n_x / 2`` (x < 0)
takes the nearest source voxel of ``T^-1(p)``; voxel ``i >= n_x / 2`` (x > 0) takes exactly the value of its
mirror twin ``n_x - 1 - i``, with the left hypothalamus codes 801-805 renamed to the right ones 806-810.
Source voxel coordinates are computed as ``scipy.ndimage.affine_transform`` does (same float expression),
index ``floor(c + 0.5)`` (halves round up); outside the source grid the label is 0 -- by default a source
voxel covers its whole extent (scipy's ``mode="grid-constant"``), ``mode="constant"`` gives scipy's default
(0 beyond the outer voxel centres). One gather task per output chunk serves all the maps (the six k).

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> m = np.zeros((30, 20, 20), np.uint8); m[5:25, 3:17, 3:17] = 1          # a box, medial face at i = 24
>>> mask = make_volume(da.from_array(m, chunks=10), np.eye(4), kind="mask")
>>> tr = fit_mirror(mask, alpha=1e-2, grid_deg=(4.0, 2.0))
>>> [round(a, 3) for a in tr.angles_deg], round(tr.translation_mm[0], 3), tr.gap_mm
([0.0, 0.0, 0.0], -24.0, 0.0)
>>> out = mirror_labels(mask, tr, margin_mm=2.0)
>>> out.shape, int(out.sum())
((44, 20, 20), 7840)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .io.regions import region_map
from .volume import affine_of, like, provenance_record, spacing_of

__all__ = [
    "RIGHT_CODES",
    "MirrorTransform",
    "fit_mirror",
    "mirror_cost",
    "mirror_labels",
    "rotation_matrix",
    "whole_brain_grid",
]

#: Left (801-805) -> right (806-810) hypothalamic subunit codes, applied on the mirrored (x > 0) side.
RIGHT_CODES: dict[int, int] = {801: 806, 802: 807, 803: 808, 804: 809, 805: 810}

_NBINS = 65536            # histogram bins per refinement level of the exact quantile
_MAX_LEVELS = 4           # 65536**4 bins: beyond float64 resolution, so the last bin holds equal values
_MAX_COLLECT = 4_000_000  # values of the quantile's bin gathered in memory (else refine the bin)
_MAX_COLUMNS = 2048       # footprint columns per axis for the gap
_SPLIT_EVERY = 8          # fan-in of the tree reductions
_N_COARSE = 20_000        # sample points used on the coarse angle grid (all n_sample for the refinement)


# ----------------------------------------------------------------------------------------------------------
# the transform
# ----------------------------------------------------------------------------------------------------------

def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """``R = Rx(rx) @ Ry(ry) @ Rz(rz)`` (right-handed, degrees); its first row does not depend on ``rx``.

    Example
    -------
    >>> rotation_matrix((0, 0, 90)).round(6)[0].tolist()
    [0.0, -1.0, 0.0]
    """
    rx, ry, rz = (math.radians(float(a)) for a in angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    rot_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rot_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rot_x @ rot_y @ rot_z


def _normals(angles: np.ndarray) -> np.ndarray:
    """First rows of ``Ry(ry) Rz(rz)`` for an (B, 2) array of (ry, rz) in degrees."""
    b = np.radians(angles[:, 0])
    c = np.radians(angles[:, 1])
    return np.stack([np.cos(b) * np.cos(c), -np.cos(b) * np.sin(c), np.sin(b)], axis=1)


def _rigid(angles_deg: Sequence[float], translation_mm: Sequence[float], centre_mm: Sequence[float]) -> np.ndarray:
    r = rotation_matrix(angles_deg)
    c = np.asarray(centre_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, dtype=np.float64) - r @ c
    return m


@dataclasses.dataclass
class MirrorTransform:
    """The fitted mirroring transform (world -> world, RAS+ mm) and its quality numbers.

    ``T(v) = R (v - centre) + centre + translation``, ``R = Rx(rx) Ry(ry) Rz(rz)`` from ``angles_deg``
    (``rx`` = 0: it does not change the cost); ``matrix`` is the same map as a 4x4. ``cost``,
    ``fraction_across`` (voxels with x > 0 after ``T``) and ``gap_mm`` (see the module docstring) are
    measured on all ``n_voxels`` mask voxels; ``cost_sample`` is the subsample cost per voxel that chose the
    angles. ``bbox_mm`` holds the 8 world corners of the mask's nonzero region (voxel extents included),
    ``spacing_mm`` the mask's smallest voxel size; :func:`whole_brain_grid` uses both.
    """

    matrix: np.ndarray
    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    cost: float
    fraction_across: float
    gap_mm: float
    alpha: float
    n_voxels: int
    n_sample: int = 0
    cost_sample: float = float("nan")
    gap_quantile: float = 0.5
    bbox_mm: np.ndarray | None = None
    spacing_mm: float | None = None

    def apply(self, points_mm: np.ndarray) -> np.ndarray:
        """World points (N x 3) after ``T``."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_dict(self) -> dict:
        """JSON-able dict (4x4 as nested lists, angles in degrees, translation in mm)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, tuple):
                v = [float(x) for x in v]
            d[f.name] = v
        d["convention"] = ("T(v) = R (v - centre_mm) + centre_mm + translation_mm, R = Rx(rx) Ry(ry) Rz(rz), "
                           "angles_deg = (rx, ry, rz); matrix = the same map as 4x4 world -> world (RAS+ mm); "
                           "mirror plane x = 0")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MirrorTransform":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        missing = {"matrix", "angles_deg", "translation_mm", "centre_mm", "cost", "fraction_across", "gap_mm",
                   "alpha", "n_voxels"} - set(kw)
        if missing:
            raise HelmError(f"the mirror transform lacks {sorted(missing)}",
                            hint="re-run the mirroring fit to write a complete transform.json")
        kw["matrix"] = np.asarray(kw["matrix"], dtype=np.float64).reshape(4, 4)
        for k in ("angles_deg", "translation_mm", "centre_mm"):
            kw[k] = tuple(float(x) for x in kw[k])
        if kw.get("bbox_mm") is not None:
            kw["bbox_mm"] = np.asarray(kw["bbox_mm"], dtype=np.float64).reshape(8, 3)
        return cls(**kw)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON (e.g. ``transform.json``)."""
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "MirrorTransform":
        """Read a transform written by :meth:`save_json`."""
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as exc:
            raise HelmError(f"cannot read the mirror transform ({exc})", path=path,
                            hint="check the path, or re-run the mirroring fit") from None
        try:
            return cls.from_dict(d)
        except HelmError as exc:
            raise HelmError(exc.message, path=path, hint=exc.hint) from None


def mirror_cost(points_mm: np.ndarray, matrix: np.ndarray, alpha: float) -> float:
    """The mirroring cost ``C(T)`` of world points (N x 3) under a 4x4 world transform (plain NumPy).

    Example
    -------
    >>> mirror_cost(np.array([[-2.0, 0, 0], [1.0, 0, 0]]), np.eye(4), 0.1)
    1.1
    """
    p = np.asarray(points_mm, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    x = p @ m[0, :3] + m[0, 3]
    return float(np.maximum(x, 0.0).sum() - alpha * x.sum())


# ----------------------------------------------------------------------------------------------------------
# chunk machinery (pure module-level functions: picklable, no closure over arrays)
# ----------------------------------------------------------------------------------------------------------

def _as_dask(vol: xr.DataArray, what: str) -> da.Array:
    if not isinstance(vol, xr.DataArray):
        raise HelmError(f"{what} must be a volume (xarray.DataArray with attrs['affine']), got {type(vol).__name__}",
                        hint="build it with helm_dask.make_volume or open it with helm_dask.io")
    if vol.ndim != 3:
        raise HelmError(f"{what} must be 3-D (x, y, z), got dims {vol.dims}",
                        path=vol.attrs.get("source") or None)
    return vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)


def _block_tasks(data: da.Array, fn: Callable, *args: Any) -> list:
    """One delayed ``fn(block, offset, *args)`` per chunk."""
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in data.chunks]
    blocks = data.to_delayed()
    dfn = dask.delayed(fn, pure=True)
    return [dfn(blocks[idx], tuple(int(offsets[d][idx[d]]) for d in range(3)), *args)
            for idx in np.ndindex(*blocks.shape)]


def _tree(parts: list, combine: Callable) -> Any:
    """Fixed-shape tree reduction of delayed partial results (deterministic grouping)."""
    dcomb = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        parts = [dcomb(*parts[i:i + _SPLIT_EVERY]) for i in range(0, len(parts), _SPLIT_EVERY)]
    return parts[0]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection of uint64 (distinct indices -> distinct hashes)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# pass 1: count, exact index sums, nonzero bounding box, bottom-K hash sample ---------------------------------

def _stats_block(block: np.ndarray, offset: tuple[int, int, int], shape: tuple[int, int, int], k: int,
                 key: int) -> tuple:
    sel = np.asarray(block) != 0
    flat = np.flatnonzero(sel)
    if flat.size == 0:
        return (0, (0, 0, 0), None, np.empty(0, np.uint64), np.empty(0, np.int64))
    loc = np.unravel_index(flat, sel.shape)
    g = [loc[d].astype(np.int64) + offset[d] for d in range(3)]
    sums = tuple(int(gd.sum(dtype=np.int64)) for gd in g)          # exact integers: order-free
    bbox = tuple((int(gd.min()), int(gd.max())) for gd in g)
    lin = (g[0] * shape[1] + g[1]) * shape[2] + g[2]
    h = _splitmix64(lin.astype(np.uint64) ^ np.uint64(key))
    if h.size > k:
        keep = np.argpartition(h, k - 1)[:k]
        h, lin = h[keep], lin[keep]
    return (int(flat.size), sums, bbox, h, lin)


def _stats_combine(*parts: tuple) -> tuple:
    count = sum(p[0] for p in parts)
    sums = tuple(sum(p[1][d] for p in parts) for d in range(3))
    boxes = [p[2] for p in parts if p[2] is not None]
    bbox = None if not boxes else tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes))
                                        for d in range(3))
    return count, sums, bbox, np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts])


class _StatsCombiner:
    """Combine pass-1 partials and keep the ``k`` smallest hashes (picklable callable)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, *parts: tuple) -> tuple:
        count, sums, bbox, h, lin = _stats_combine(*parts)
        if h.size > self.k:
            keep = np.argpartition(h, self.k - 1)[:self.k]
            h, lin = h[keep], lin[keep]
        return (count, sums, bbox, h, lin)


# passes 2-3: x after the rotation, histogram levels, footprint columns, the quantile's bin -------------------

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


def _hist_block(block: np.ndarray, offset: tuple[int, int, int], geom: dict, levels: tuple,
                level: tuple[float, float], columns: bool) -> tuple:
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
        view = out[cy - y0:cy - y0 + a.shape[0], cz - z0:cz - z0 + a.shape[1]]
        np.maximum(view, a, out=view)
    return (y0, z0, out)


def _hist_combine(*parts: tuple) -> tuple:
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), math.fsum(p[2] for p in parts),
            _merge_columns([p[3] for p in parts]))


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


def _run(data: da.Array, fn: Callable, combine: Callable, *args: Any) -> Any:
    (res,) = dask.compute(_tree(_block_tasks(data, fn, *args), combine))
    return res


# ----------------------------------------------------------------------------------------------------------
# the fit
# ----------------------------------------------------------------------------------------------------------

def _sample_cost(points_t: np.ndarray, angles: np.ndarray, alpha: float) -> np.ndarray:
    """Cost per voxel on the (centred) sample points, given as a contiguous (3, n) array, for each (ry, rz)
    row of ``angles`` (degrees), each with its best t_x."""
    n = points_t.shape[1]
    m = min(n, int(math.floor(alpha * n)) + 1)
    out = np.empty(len(angles))
    for s in range(0, len(angles), 16):                 # batches keep the (n, 16) arrays small
        u = _normals(angles[s:s + 16]) @ points_t          # (batch, n)
        q = np.partition(u, n - m, axis=1)[:, n - m]
        x = u - q[:, None]
        out[s:s + 16] = (np.maximum(x, 0.0).sum(axis=1) - alpha * x.sum(axis=1)) / n
    return out


def _search_angles(points: np.ndarray, alpha: float, half_deg: float, step_deg: float,
                   refine: bool) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    ticks = np.arange(-half_deg, half_deg + 0.5 * step_deg, step_deg)
    grid = np.array([(a, b) for a in ticks for b in ticks])
    # the points are in hash order, so any prefix is itself a uniform sample: the coarse grid only has to
    # find the basin, a smaller prefix does that at a fraction of the cost
    points = np.ascontiguousarray(points.T)
    coarse = np.ascontiguousarray(points[:, :_N_COARSE])
    costs = _sample_cost(coarse, grid, alpha)
    order = np.lexsort((np.arange(len(costs)), costs))      # stable: ties keep grid order

    def objective(pts: np.ndarray) -> Callable:
        return lambda a: float(_sample_cost(pts, np.asarray(a, dtype=np.float64)[None], alpha)[0])

    fun = objective(points)
    best = grid[order[0]].copy()
    if refine:
        # stage 1, on the coarse prefix: Nelder-Mead from the three best grid points (they may lie in different
        # basins); stage 2, on the whole sample: Nelder-Mead from the stage-1 winner, with a small simplex
        coarse_fun = objective(coarse)
        best_coarse = float(costs[order[0]])
        for idx in order[:3]:
            x0 = grid[idx]
            simplex = np.array([x0, x0 + [0.5 * step_deg, 0.0], x0 + [0.0, 0.5 * step_deg]])
            res = minimize(coarse_fun, x0, method="Nelder-Mead",
                           options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-12, "maxiter": 400})
            if float(res.fun) < best_coarse:
                best, best_coarse = np.asarray(res.x, dtype=np.float64), float(res.fun)
        step = max(0.05, 0.05 * step_deg)
        simplex = np.array([best, best + [step, 0.0], best + [0.0, step]])
        res = minimize(fun, best, method="Nelder-Mead",
                       options={"initial_simplex": simplex, "xatol": 1e-6, "fatol": 1e-13, "maxiter": 400})
        if float(res.fun) < fun(best):
            best = np.asarray(res.x, dtype=np.float64)
    return best, fun(best)


def _exact_quantile(data: da.Array, geom: dict, m: int, u_lo: float, u_hi: float,
                    columns: bool) -> dict:
    """The m-th largest x (after the rotation) over all mask voxels, with the sums the cost needs."""
    levels: list[tuple[float, float, int]] = []
    lo, width = u_lo, (u_hi - u_lo) / _NBINS
    n_above, s_above = 0, 0.0
    total, cols, rank = None, None, m
    for level in range(_MAX_LEVELS):
        inv_w = 1.0 / width if width > 0 else 0.0
        cnt, sums, tot, col = _run(data, _hist_block, _hist_combine, geom, tuple(levels), (lo, inv_w),
                                   columns and level == 0)
        if level == 0:
            total, cols = tot, col
        above = np.concatenate([np.cumsum(cnt[::-1])[::-1][1:], [0]])    # voxels in higher bins
        target = int(np.nonzero(above < rank)[0][0])
        rank -= int(above[target])
        n_above += int(above[target])
        s_above += math.fsum(sums[target + 1:])
        levels.append((lo, inv_w, target))
        if cnt[target] <= _MAX_COLLECT or width == 0.0:
            break
        lo, width = lo + target * width, width / _NBINS
    vals, cnts = _run(data, _collect_block, _collect_combine, geom, tuple(levels))
    vals, cnts = vals[::-1], cnts[::-1]                    # descending
    cum = np.cumsum(cnts)
    pos = int(np.searchsorted(cum, rank))                  # first value whose cumulative count reaches rank
    q = float(vals[pos])
    n_above += int(cum[pos - 1]) if pos > 0 else 0
    s_above += math.fsum((vals[:pos] * cnts[:pos]).tolist())
    return {"q": q, "n_across": n_above, "sum_across": s_above, "sum_all": total, "columns": cols}


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise HelmError(f"--alpha must be a number, got {alpha!r}") from None
    if not (0.0 < a < 0.5):
        raise HelmError(f"--alpha must be in (0, 0.5), got {alpha!r}",
                        hint="alpha is the fraction of the hemisphere allowed across the mirror plane; "
                             "the published value is 5e-4")
    return a


def fit_mirror(mask: xr.DataArray, *, alpha: float = 5e-4, n_sample: int = 200_000, seed: int = 0,
               grid_deg: tuple[float, float] = (30.0, 2.0), refine: bool = True,
               gap_quantile: float = 0.5) -> MirrorTransform:
    """Fit the mirroring transform of a LEFT hemisphere mask in RAS+ (medial face toward +x).

    Minimises ``C(T)`` (module docstring) over the mask's voxel centres (world mm from the mask's affine,
    oblique affines included): two angles on a ``grid_deg = (half range, step)`` grid then Nelder-Mead, on
    ``n_sample`` hash-chosen voxels (``seed`` picks the sample); the best x translation, the cost, the
    fraction across the plane and the gap are then computed exactly on ALL mask voxels. Computed eagerly by
    three chunked passes over the mask (each task holds one chunk; the result is a few numbers).

    Parameters
    ----------
    mask : volume
        Nonzero = brain. Any chunking; the result (transform) is identical for every chunking.
    alpha : float
        Fraction of the hemisphere allowed across the mirror plane (0 < alpha < 0.5).
    n_sample : int
        Voxels used to choose the angles (all of them if the mask is smaller).
    seed : int
        Chooses the subsample (the hash key); the same seed gives the same transform on any chunking.
    grid_deg : (float, float)
        Half range and step of the coarse angle grid, degrees (both angles). A warning is issued when the
        optimum lands at the edge of the range (widen it then).
    refine : bool
        Nelder-Mead refinement after the grid (on by default; off: the best grid point).
    gap_quantile : float
        Quantile of the footprint column gaps reported as ``gap_mm`` (0.5: median).

    Returns
    -------
    MirrorTransform

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> m = np.zeros((30, 20, 20), np.uint8); m[5:25, 3:17, 3:17] = 1
    >>> tr = fit_mirror(make_volume(da.from_array(m, chunks=10), np.eye(4), kind="mask"), alpha=1e-2,
    ...                 grid_deg=(4.0, 2.0))
    >>> tr.fraction_across, tr.apply([[24.0, 5, 5]]).round(6).tolist()
    (0.0, [[0.0, 5.0, 5.0]])
    """
    alpha = _check_alpha(alpha)
    data = _as_dask(mask, "the brain mask")
    if isinstance(n_sample, bool) or not isinstance(n_sample, (int, np.integer)) or n_sample < 100:
        raise HelmError(f"n_sample must be an integer of at least 100, got {n_sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        half_deg, step_deg = (float(g) for g in grid_deg)
    except (TypeError, ValueError):
        half_deg, step_deg = -1.0, 0.0
    if not (0.0 <= half_deg <= 80.0 and step_deg > 0.0):
        raise HelmError(f"grid_deg must be (half range in [0, 80], step > 0) degrees, got {grid_deg!r}")
    if not (0.0 <= float(gap_quantile) <= 1.0):
        raise HelmError(f"gap_quantile must be in [0, 1], got {gap_quantile!r}")
    affine = affine_of(mask)
    src = mask.attrs.get("source") or None
    shape = tuple(int(s) for s in data.shape)

    # pass 1: count, centroid, bounding box, sample ------------------------------------------------------------
    key = int(_splitmix64(np.array([seed], dtype=np.uint64))[0])
    k = int(n_sample)
    count, sums, bbox, _h, lin = _run(data, _stats_block, _StatsCombiner(k), shape, k, key)
    if count == 0:
        raise HelmError("the brain mask is empty (no nonzero voxel); cannot fit the mirror plane", path=src,
                        hint="check the background-removal stage output")
    if count < 10:
        raise HelmError(f"the brain mask has only {count} voxels; cannot fit the mirror plane", path=src)
    a3, at = affine[:3, :3], affine[:3, 3]
    centre = a3 @ (np.array(sums, dtype=np.float64) / count) + at
    order = np.argsort(_h, kind="stable")                  # canonical order: by hash, not by chunk
    ijk = np.stack(np.unravel_index(lin[order], shape), axis=1).astype(np.float64)
    points = ijk @ a3.T + (at - centre)                    # sample voxel centres relative to the centroid

    # the two angles on the sample ------------------------------------------------------------------------------
    best, cost_sample = _search_angles(points, alpha, half_deg, step_deg, refine)
    if half_deg > 0 and np.any(np.abs(best) > half_deg - 0.5 * step_deg):
        warnings.warn(f"the best mirror plane lies at the edge of the searched angles (ry, rz = "
                      f"{best[0]:.2f}, {best[1]:.2f} deg, range +-{half_deg:g}); widen grid_deg",
                      RuntimeWarning, stacklevel=2)
    angles = (0.0, float(best[0]), float(best[1]))
    r = rotation_matrix(angles)

    # exact t_x, cost, fraction and gap on all voxels ---------------------------------------------------------
    lo_box = np.array([b[0] for b in bbox], dtype=np.float64)
    hi_box = np.array([b[1] for b in bbox], dtype=np.float64)
    corners_c = np.array([[hi_box[d] if (c >> d) & 1 else lo_box[d] for d in range(3)] for c in range(8)])
    corners_w = corners_c @ a3.T + at
    rel = corners_w - centre
    sp = spacing_of(affine)
    col_mm = 2.0 * float(sp.max())
    y_c, z_c = rel @ r[1], rel @ r[2]
    extent = max(np.ptp(y_c), np.ptp(z_c))
    col_mm = max(col_mm, extent / (_MAX_COLUMNS - 2))
    geom = {"w": r[0] @ a3, "b": float(r[0] @ (at - centre)),
            "wy": r[1] @ a3, "by": float(r[1] @ (at - centre)),
            "wz": r[2] @ a3, "bz": float(r[2] @ (at - centre)),
            "y0": float(y_c.min() - col_mm), "z0": float(z_c.min() - col_mm), "inv_col": 1.0 / col_mm}
    u_c = rel @ r[0]
    pad = 1e-9 * max(1.0, float(np.abs(u_c).max()))
    m = min(count, int(math.floor(alpha * count)) + 1)
    ex = _exact_quantile(data, geom, m, float(u_c.min() - pad), float(u_c.max() + pad), columns=True)
    q = ex["q"]
    cost = (ex["sum_across"] - q * ex["n_across"]) - alpha * (ex["sum_all"] - q * count)
    y0c, z0c, col = ex["columns"]
    tops = col[np.isfinite(col)]
    gap = float(np.quantile(np.maximum(q - tops, 0.0), float(gap_quantile)))
    translation = (float(-q - centre[0]), 0.0, 0.0)        # x after T = (x after R, centred) - q
    ext_c = np.array([[hi_box[d] + 0.5 if (c >> d) & 1 else lo_box[d] - 0.5 for d in range(3)] for c in range(8)])
    return MirrorTransform(matrix=_rigid(angles, translation, centre), angles_deg=angles,
                           translation_mm=translation, centre_mm=tuple(float(c) for c in centre),
                           cost=float(cost), fraction_across=ex["n_across"] / count, gap_mm=gap, alpha=alpha,
                           n_voxels=int(count), n_sample=int(len(points)), cost_sample=float(cost_sample),
                           gap_quantile=float(gap_quantile), bbox_mm=ext_c @ a3.T + at,
                           spacing_mm=float(sp.min()))


# ----------------------------------------------------------------------------------------------------------
# the whole-brain grid
# ----------------------------------------------------------------------------------------------------------

def _nonzero_bbox_block(block: np.ndarray, offset: tuple[int, int, int]) -> tuple | None:
    sel = np.asarray(block) != 0
    if not sel.any():
        return None
    out = []
    for d in range(3):
        axes = tuple(a for a in range(3) if a != d)
        nz = np.flatnonzero(sel.any(axis=axes))
        out.append((int(nz[0]) + offset[d], int(nz[-1]) + offset[d]))
    return tuple(out)


def _bbox_combine(*parts: tuple | None) -> tuple | None:
    boxes = [p for p in parts if p is not None]
    if not boxes:
        return None
    return tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(3))


def _bbox_corners_mm(vol: xr.DataArray) -> np.ndarray:
    data = _as_dask(vol, "the hemisphere volume")
    box = _run(data, _nonzero_bbox_block, _bbox_combine)
    if box is None:
        raise HelmError("the hemisphere volume is empty (no nonzero voxel); nothing to mirror",
                        path=vol.attrs.get("source") or None)
    a = affine_of(vol)
    c = np.array([[box[d][1] + 0.5 if (n >> d) & 1 else box[d][0] - 0.5 for d in range(3)] for n in range(8)])
    return c @ a[:3, :3].T + a[:3, 3]


def whole_brain_grid(vol: xr.DataArray | None, transform: MirrorTransform, *, spacing_mm: float | None = None,
                     margin_mm: float = 10.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the axis-aligned RAS+ whole-brain grid (no data computed unless ``vol`` is given).

    The grid covers the hemisphere's bounding box after ``T`` (the 8 corners of its nonzero region, voxel
    extents included), its mirror image and ``margin_mm`` on every side, at ``spacing_mm`` (default: the
    smallest voxel size of ``vol``, or of the fitted mask). Along x it has an even number of voxels with
    centres ``(i + 0.5 - n_x / 2) * s``, symmetric about 0; along y and z the first centre sits on a multiple
    of ``s``. ``vol=None`` uses the mask bounding box stored in ``transform``; otherwise the nonzero bounding
    box of ``vol`` is computed (one chunked pass).

    Example
    -------
    >>> t = MirrorTransform(np.eye(4), (0, 0, 0), (0, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1,
    ...                     bbox_mm=np.array([[x, y, z] for x in (-9.5, 0.5) for y in (0.5, 3.5)
    ...                                       for z in (0.5, 2.5)]), spacing_mm=1.0)
    >>> shape, aff = whole_brain_grid(None, t, margin_mm=1.0)
    >>> shape, float(aff[0, 3]), float(aff[1, 3])
    ((22, 7, 6), -10.5, -1.0)
    """
    if vol is None:
        if transform.bbox_mm is None:
            raise HelmError("the mirror transform holds no bounding box; pass the hemisphere mask volume",
                            hint="whole_brain_grid(mask, transform)")
        corners = np.asarray(transform.bbox_mm, dtype=np.float64).reshape(8, 3)
        default_sp = transform.spacing_mm
    else:
        corners = _bbox_corners_mm(vol)
        default_sp = float(spacing_of(affine_of(vol)).min())
    s = float(spacing_mm) if spacing_mm is not None else default_sp
    if s is None or not (s > 0 and math.isfinite(s)):
        raise HelmError(f"spacing_mm must be a positive number, got {spacing_mm!r}")
    margin = float(margin_mm)
    if not (margin >= 0 and math.isfinite(margin)):
        raise HelmError(f"--margin-mm must be >= 0, got {margin_mm!r}")
    w = transform.apply(corners)
    lo, hi = w.min(axis=0), w.max(axis=0)
    half = max(-lo[0], hi[0], 0.0) + margin
    nx = 2 * max(1, int(math.ceil(half / s - 1e-9)))
    shape = [nx]
    origin = [(0.5 - nx / 2) * s]
    for d in (1, 2):
        o = math.floor((lo[d] - margin) / s + 1e-9) * s
        shape.append(int(math.ceil((hi[d] + margin - o) / s - 1e-9)) + 1)
        origin.append(o)
    aff = np.diag([s, s, s, 1.0])
    aff[:3, 3] = origin
    return (int(shape[0]), int(shape[1]), int(shape[2])), aff


# ----------------------------------------------------------------------------------------------------------
# the resampling
# ----------------------------------------------------------------------------------------------------------

def _source_coords(g: np.ndarray, d: int, i: float, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Continuous source index along ``d`` of output voxels (i, j[:, None], k[None, :]), with the float
    expression of ``scipy.ndimage.affine_transform``: ``((offset + m0 i) + m1 j) + m2 k``."""
    return ((g[d, 3] + g[d, 0] * i) + (g[d, 1] * j)[:, None]) + (g[d, 2] * k)[None, :]


def _gather_block(regions: list, start: tuple[int, int, int], g: np.ndarray, ranges: tuple,
                  src_shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """Nearest-neighbour gather of every map for one output block (all maps share the index computation)."""
    (i0, i1), (j0, j1), (k0, k1) = ranges
    regions = [np.asarray(r) for r in regions]
    rshape = regions[0].shape
    out = np.zeros((len(regions), i1 - i0, j1 - j0, k1 - k0), np.uint16)
    j = np.arange(j0, j1, dtype=np.float64)
    k = np.arange(k0, k1, dtype=np.float64)
    flats = [r.reshape(-1) for r in regions]
    for p, i in enumerate(range(i0, i1)):                  # plane by plane: small temporaries
        valid = np.ones((j1 - j0, k1 - k0), bool)
        flat = np.zeros((j1 - j0, k1 - k0), np.int64)
        for d in range(3):
            c = _source_coords(g, d, float(i), j, k)
            idx = np.floor(c + 0.5).astype(np.int64)
            if mode == "constant":
                valid &= (c >= 0) & (c <= src_shape[d] - 1)
            else:
                valid &= (idx >= 0) & (idx < src_shape[d])
            loc = idx - start[d]
            if np.any(valid & ((loc < 0) | (loc >= rshape[d]))):
                raise RuntimeError("mirror_labels: source region too small (internal error)")
            flat = flat * rshape[d] + np.clip(loc, 0, rshape[d] - 1)
        if not valid.any():
            continue
        sel = flat[valid]
        for mi, f in enumerate(flats):
            vals = f[sel]
            if vals.dtype.kind in "iu" and vals.size and (vals.min() < 0 or vals.max() > 65535):
                raise HelmError("a label map holds values outside 0..65535; cannot store it as uint16",
                                hint="check the label map's codes")
            out[mi, p][valid] = vals
    return out


def _right_codes_block(block: np.ndarray, codes: tuple) -> np.ndarray:
    out = block.copy()
    for left, right in codes:
        out[block == left] = right                       # masks from the unmodified input: no chaining
    return out


def _source_region(g: np.ndarray, ranges: tuple, src_shape: tuple[int, int, int]) -> tuple | None:
    """Index box of the source voxels an output block can reach (its 8 corners, +-1 voxel), clipped."""
    corners = np.array([[ranges[d][1] - 1 if (c >> d) & 1 else ranges[d][0] for d in range(3)] for c in range(8)],
                       dtype=np.float64)
    src = corners @ g[:3, :3].T + g[:3, 3]
    lo = np.floor(src.min(axis=0) + 0.5).astype(int) - 1
    hi = np.floor(src.max(axis=0) + 0.5).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(src_shape) - 1)
    if np.any(lo > hi):
        return None
    return tuple(int(v) for v in lo), tuple(int(v) + 1 for v in hi)


def _whole_brain_block(regions: list, lo: tuple, g: np.ndarray, parts: tuple, ry: tuple, rz: tuple,
                       src_shape: tuple[int, int, int], mode: str, codes: tuple) -> np.ndarray:
    """One whole-brain output chunk: its x < 0 part gathered directly, its x > 0 part gathered at the mirrored
    x < 0 positions, reversed along x and with the right-hemisphere codes."""
    width = sum(x1 - x0 for (x0, x1), _, _ in parts)
    out = np.zeros((len(regions), width, ry[1] - ry[0], rz[1] - rz[0]), np.uint16)
    for (x0, x1), at, mirrored in parts:
        blk = _gather_block(regions, lo, g, ((x0, x1), ry, rz), src_shape, mode)
        out[:, at:at + x1 - x0] = _right_codes_block(blk[:, ::-1], codes) if mirrored else blk
    return out


def mirror_labels(maps: Mapping[Any, xr.DataArray] | xr.DataArray, transform: MirrorTransform, *,
                  grid: tuple[Sequence[int], np.ndarray] | None = None, spacing_mm: float | None = None,
                  margin_mm: float = 10.0, right_codes: Mapping[int, int] | None = None,
                  chunks: int = 128, mode: str = "grid-constant") -> dict | xr.DataArray:
    """Whole-brain label maps: the transformed left hemisphere on x < 0, its mirror image on x > 0; lazy.

    Every output chunk is one task that reads from each source map only the bounded region it needs and
    gathers all maps with one shared index computation (nearest neighbour, index
    ``floor(c + 0.5)`` of the continuous source index ``c = G o``, ``G = inv(A_src) @ inv(T) @ A_out``, with
    the float expression of ``scipy.ndimage.affine_transform(order=0)``); chunks that reach no source voxel
    are zeros without reading. The x > 0 side is the x < 0 side reversed along x (exactly the mirror image,
    see :func:`whole_brain_grid`; a chunk there gathers at the mirrored x < 0 positions itself, so the output
    chunks are the store's and no task waits on another) with the codes of ``right_codes`` (default
    :data:`RIGHT_CODES`, 801-805 -> 806-810) renamed; k-means clusters keep their values.

    Memory: a map stored in Zarr (as :func:`helm_dask.io.store.open_volume` returns it) is read region by
    region inside each gather task, so no source data is shared between tasks and memory per task is bounded
    by the output chunk and its source region (all maps). Any other dask-backed map is fed to the gathers
    through its own chunks (one shared task per source chunk, held by the scheduler until every gather that
    overlaps it has run): fine for small or in-memory inputs; at 0.1 mm store the maps first.

    ``mode="grid-constant"`` (default): a source voxel covers its whole extent, so points up to half a voxel
    outside the outer voxel centres still take the edge voxel, further out 0 (scipy's ``"grid-constant"``).
    ``mode="constant"``: 0 beyond the outer voxel centres (scipy's default ``"constant"``).

    Compute (or store) all returned maps together (one ``dask.compute``) so that each gather runs once.

    Parameters
    ----------
    maps : volume or dict of volumes
        Hemisphere label maps on one grid (e.g. the six merged maps, k = 4..9). A single volume gives a single
        volume back, a dict a dict with the same keys.
    transform : MirrorTransform
        From :func:`fit_mirror`.
    grid : (shape, affine), optional
        Output grid; default :func:`whole_brain_grid` ``(None, transform, spacing_mm, margin_mm)`` with
        ``spacing_mm`` defaulting to the maps' smallest voxel size.
    chunks : int
        Output chunk edge (voxels).

    Returns
    -------
    uint16 volume(s), kind ``labels``, on the whole-brain grid.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((4, 3, 3), np.uint16); lab[3, 1, 1] = 801; lab[1, 1, 1] = 2
    >>> vol = make_volume(da.from_array(lab), np.eye(4), kind="labels")
    >>> shift = np.eye(4); shift[0, 3] = -4.0                  # T: x -> x - 4 (source x = 0..3 mm)
    >>> t = MirrorTransform(shift, (0, 0, 0), (-4, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)
    >>> grid = ((8, 3, 3), np.diag([1.0, 1, 1, 1]) + np.array([[0, 0, 0, -3.5]] + [[0] * 4] * 3))
    >>> mirror_labels(vol, t, grid=grid).values[:, 1, 1].tolist()      # output x = -3.5 .. 3.5 mm
    [2, 0, 801, 0, 0, 806, 0, 2]
    """
    single = isinstance(maps, xr.DataArray)
    items = [(None, maps)] if single else list(dict(maps).items())
    if not items:
        raise HelmError("no label map given to mirror")
    if mode not in ("grid-constant", "constant"):
        raise HelmError(f"mode must be 'grid-constant' or 'constant', got {mode!r}")
    if int(chunks) < 1:
        raise HelmError(f"chunks must be a positive number of voxels, got {chunks!r}")
    first = items[0][1]
    datas = []
    src_aff = affine_of(first)
    for name, v in items:
        what = "the label map" if name is None else f"label map {name!r}"
        d = _as_dask(v, what)
        if d.dtype.kind not in "biu":
            raise HelmError(f"{what} has dtype {d.dtype}; label maps must hold integer codes",
                            path=v.attrs.get("source") or None)
        if d.shape != first.shape or not np.allclose(affine_of(v), src_aff, rtol=0, atol=1e-6):
            raise HelmError(f"{what} is not on the same voxel grid as the first map "
                            f"(shape {d.shape} vs {first.shape})", path=v.attrs.get("source") or None,
                            hint="mirror maps that share the hemisphere's grid")
        datas.append(d)
    if grid is None:
        sp = float(spacing_of(src_aff).min()) if spacing_mm is None else spacing_mm   # the maps' spacing
        grid = whole_brain_grid(None, transform, spacing_mm=sp, margin_mm=margin_mm)
    out_shape = tuple(int(s) for s in grid[0])
    out_aff = np.asarray(grid[1], dtype=np.float64)
    if out_shape[0] % 2:
        raise HelmError(f"the whole-brain grid must have an even number of x voxels, got {out_shape[0]}",
                        hint="build it with whole_brain_grid")
    codes = tuple(sorted((int(a), int(b)) for a, b in (RIGHT_CODES if right_codes is None else right_codes).items()))
    g = np.linalg.inv(src_aff) @ np.linalg.inv(transform.matrix) @ out_aff    # output index -> source index
    src_shape = tuple(int(s) for s in first.shape)
    size = int(chunks)
    nx, half = out_shape[0], out_shape[0] // 2
    xch, ych, zch = (da.core.normalize_chunks(size, (n,))[0] for n in out_shape)
    nmaps = len(datas)

    # one task per output chunk (the store's chunks: nothing to rechunk), reading from each map only the
    # bounded box it reaches (one graph layer: store-backed maps are read box by box inside the task, others
    # pasted from their chunks; a chunk far from the source reads nothing). Output x on the right half is the
    # mirror of x' = nx - 1 - x on the left: the task gathers there itself, so no task waits on another.
    def plan(index, ranges):
        (a, b), ry, rz = ranges[1:]
        parts = []
        if a < half:
            parts.append(((a, min(b, half)), 0, False))
        if b > half:
            parts.append(((nx - b, nx - max(a, half)), max(a, half) - a, True))
        boxes = [bx for bx in (_source_region(g, (xr, ry, rz), src_shape) for xr, _, _ in parts) if bx is not None]
        if not boxes:
            return None
        lo = tuple(min(bx[0][d] for bx in boxes) for d in range(3))
        hi = tuple(max(bx[1][d] for bx in boxes) for d in range(3))
        return lo, hi, (lo, g, tuple(parts), ry, rz, src_shape, mode, codes)

    full = region_map(_whole_brain_block, datas, ((nmaps,), xch, ych, zch), plan, np.uint16,
                      name="mirror-gather")                           # (maps, x, y, z)
    params = {"matrix": transform.matrix.tolist(), "alpha": transform.alpha, "grid_shape": list(out_shape),
              "spacing_mm": float(spacing_of(out_aff).min()), "margin_mm": float(margin_mm), "mode": mode,
              "right_codes": {str(a): b for a, b in codes}}
    outs = {}
    for mi, (name, v) in enumerate(items):
        outs[name] = like(v, full[mi], affine=out_aff, kind="labels",
                          step=provenance_record("mirror.mirror_labels", params))
    return outs[None] if single else outs
