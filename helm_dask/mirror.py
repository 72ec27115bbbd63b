"""Stage 7 -- hemisphere mirroring: fit the mirror plane, then build the whole brain, out of core.

**The fit** (:func:`fit_mirror`). The rigid transform ``T`` (rotation ``R`` about the mask centroid ``c``,
then translation ``t``) minimises, over the brain-mask voxel centres ``v_i`` (world mm),

    C(T) = sum_i [x_i(T) > 0] x_i(T)  -  alpha * sum_i x_i(T),      T(v) = R (v - c) + c + t,

where ``x_i(T)`` is the world x after ``T`` and ``x = 0`` is the mirror plane. What the cost teaches is used
in full:

* only the first row ``n`` of ``R`` (the unit normal of the mirror plane in the input frame) and ``t_x``
  enter ``C``: a rotation about the x axis and the y/z translations change nothing, so the y/z translations
  are 0 (the hemisphere stays where it is in y and z) and ``R`` is the smallest rotation taking ``n`` to
  +x (:func:`minimal_rotation`; close to the identity when the header matches the anatomy) -- the search is
  over the normal alone, two angles;
* for a fixed rotation ``C`` is convex and piecewise linear in ``t_x`` with slope ``#(x > 0) - alpha N``,
  so the best ``t_x`` puts the ``m``-th largest x at 0, ``m = floor(alpha N) + 1`` (a quantile: at the
  optimum the fraction across the plane is ``floor(alpha N) / N ~ alpha``). Caveat: when the medial face is
  aligned with the voxel grid (as in the built-in phantom) its whole voxel layer shares one x; the exact
  optimum then puts that layer ON the plane and the fraction across is below alpha (often 0);
* the normal is searched over the WHOLE sphere, since a specimen may lie tilted in its bag and a header
  may disagree with the anatomy by any angle: the six axis directions and a Fibonacci lattice of
  ``n_normals`` (default 2000, neighbours 4.5 degrees apart) on the first 20 000 sample points; then
  Nelder-Mead in the tangent plane (exponential map: no pole) from the best normals of four distinct
  basins, on those points; then from the best result (and a rival minimum of nearly the same cost) on the
  whole sample. ``C(n)`` is about ``alpha N`` times the distance from the centroid to the supporting plane
  of normal ``n``: it has a sharp V-shaped minimum at a flat face and shallower ones elsewhere (e.g. the
  lateral convexity), which the lattice tells apart. All of it runs on a deterministic subsample of the
  mask voxels: the ``n_sample`` voxels with the smallest ``splitmix64`` hash of their global linear index
  (a uniform sample without replacement that does not depend on the chunking). ``grid_deg`` gives the
  former local search instead (a grid of two angles near +x);
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

**The anatomical check** (:func:`check_hypothalamus_plane`). The hypothalamus is a midline structure: its
labels must lie on the fitted plane. One chunked pass measures their centroid's distance from it (and the
90th percentile of the voxels' distances) and refuses a centroid farther than 15 mm: such labels come from
another scan, or the header or the mask is wrong.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .io.regions import region_map
from .labels import HYPOTHALAMUS, RIGHT_CODES
from .volume import affine_of, like, provenance_record, spacing_of

__all__ = [
    "RIGHT_CODES",
    "MirrorTransform",
    "check_hypothalamus_plane",
    "euler_angles",
    "fit_mirror",
    "minimal_rotation",
    "mirror_cost",
    "mirror_labels",
    "rotation_matrix",
    "sphere_normals",
    "whole_brain_grid",
]


_NBINS = 65536  # histogram bins per refinement level of the exact quantile
_MAX_LEVELS = 4  # 65536**4 bins: beyond float64 resolution, so the last bin holds equal values
_MAX_COLLECT = 4_000_000  # values of the quantile's bin gathered in memory (else refine the bin)
_MAX_COLUMNS = 2048  # footprint columns per axis for the gap
_SPLIT_EVERY = 8  # fan-in of the tree reductions
_N_COARSE = 20_000  # sample points used on the coarse grid of normals (all n_sample for the refinement)
_N_STARTS = 4  # distinct basins of the coarse grid refined on the prefix (the best then on all)
_BATCH = 8  # normals evaluated together: (batch, n) arrays; small batches are the fastest (BLAS)
#: The six world axis directions, tried before the sphere lattice: a medial face aligned with the voxel
#: grid (phantoms, resliced scans) is then found exactly, and wins ties.
_AXES = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])


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


def _rigid_matrix(r: np.ndarray, translation_mm: Sequence[float], centre_mm: Sequence[float]) -> np.ndarray:
    """4x4 of ``v -> r (v - centre) + centre + translation``."""
    c = np.asarray(centre_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, dtype=np.float64) - r @ c
    return m


@dataclasses.dataclass
class MirrorTransform:
    """The fitted mirroring transform (world -> world, RAS+ mm) and its quality numbers.

    ``T(v) = R (v - centre) + centre + translation``, ``R = Rx(rx) Ry(ry) Rz(rz)`` from ``angles_deg``;
    ``matrix`` is the same map as a 4x4 (built from ``R`` itself: it is the reference, the angles are
    rounded). ``normal`` is the unit normal of the mirror plane in the input world frame, pointing from the
    hemisphere to the plane (the first row of ``R``); ``R`` is the smallest rotation taking it to +x
    (:func:`minimal_rotation`), since the rotation about x and the y/z translations do not change the cost
    (they are 0). ``search`` says how the normal was found (``"sphere"``: every direction, ``"grid"``: a
    local grid near +x) and ``n_normals`` how many grid normals were tried. ``cost``,
    ``fraction_across`` (voxels with x > 0 after ``T``) and ``gap_mm`` (see the module docstring) are
    measured on all ``n_voxels`` mask voxels; ``cost_sample`` is the subsample cost per voxel that chose the
    normal. ``bbox_mm`` holds the 8 world corners of the mask's nonzero region (voxel extents included),
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
    normal: tuple[float, float, float] | None = None
    search: str | None = None
    n_normals: int = 0

    def __post_init__(self) -> None:
        if self.normal is None:  # transforms written before the field existed: the matrix holds it
            n = np.asarray(self.matrix, dtype=np.float64)[0, :3]
            self.normal = tuple(float(v) for v in n / np.linalg.norm(n))

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
        d["convention"] = (
            "T(v) = R (v - centre_mm) + centre_mm + translation_mm, R = Rx(rx) Ry(ry) Rz(rz), "
            "angles_deg = (rx, ry, rz); matrix = the same map as 4x4 world -> world (RAS+ mm); "
            "mirror plane x = 0; normal = the plane's unit normal in the input world frame "
            "(first row of R), R = the smallest rotation taking it to +x"
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MirrorTransform:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        missing = {
            "matrix",
            "angles_deg",
            "translation_mm",
            "centre_mm",
            "cost",
            "fraction_across",
            "gap_mm",
            "alpha",
            "n_voxels",
        } - set(kw)
        if missing:
            raise HelmError(
                f"the mirror transform lacks {sorted(missing)}",
                hint="re-run the mirroring fit to write a complete transform.json",
            )
        kw["matrix"] = np.asarray(kw["matrix"], dtype=np.float64).reshape(4, 4)
        for k in ("angles_deg", "translation_mm", "centre_mm", "normal"):
            if kw.get(k) is not None:
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
    def load_json(cls, path: str | os.PathLike) -> MirrorTransform:
        """Read a transform written by :meth:`save_json`."""
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as exc:
            raise HelmError(
                f"cannot read the mirror transform ({exc})",
                path=path,
                hint="check the path, or re-run the mirroring fit",
            ) from None
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
        raise HelmError(
            f"{what} must be a volume (xarray.DataArray with attrs['affine']), got {type(vol).__name__}",
            hint="build it with helm_dask.make_volume or open it with helm_dask.io",
        )
    if vol.ndim != 3:
        raise HelmError(f"{what} must be 3-D (x, y, z), got dims {vol.dims}", path=vol.attrs.get("source") or None)
    return vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)


def _block_tasks(data: da.Array, fn: Callable, *args: Any) -> list:
    """One delayed ``fn(block, offset, *args)`` per chunk."""
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in data.chunks]
    blocks = data.to_delayed()
    dfn = dask.delayed(fn, pure=True)
    return [
        dfn(blocks[idx], tuple(int(offsets[d][idx[d]]) for d in range(3)), *args) for idx in np.ndindex(*blocks.shape)
    ]


def _tree(parts: list, combine: Callable) -> Any:
    """Fixed-shape tree reduction of delayed partial results (deterministic grouping)."""
    dcomb = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        parts = [dcomb(*parts[i : i + _SPLIT_EVERY]) for i in range(0, len(parts), _SPLIT_EVERY)]
    return parts[0]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection of uint64 (distinct indices -> distinct hashes)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# pass 1: count, exact index sums, nonzero bounding box, bottom-K hash sample ---------------------------------


def _stats_block(
    block: np.ndarray, offset: tuple[int, int, int], shape: tuple[int, int, int], k: int, key: int
) -> tuple:
    sel = np.asarray(block) != 0
    flat = np.flatnonzero(sel)
    if flat.size == 0:
        return (0, (0, 0, 0), None, np.empty(0, np.uint64), np.empty(0, np.int64))
    loc = np.unravel_index(flat, sel.shape)
    g = [loc[d].astype(np.int64) + offset[d] for d in range(3)]
    sums = tuple(int(gd.sum(dtype=np.int64)) for gd in g)  # exact integers: order-free
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
    bbox = None if not boxes else tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(3))
    return count, sums, bbox, np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts])


class _StatsCombiner:
    """Combine pass-1 partials and keep the ``k`` smallest hashes (picklable callable)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, *parts: tuple) -> tuple:
        count, sums, bbox, h, lin = _stats_combine(*parts)
        if h.size > self.k:
            keep = np.argpartition(h, self.k - 1)[: self.k]
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


def _run(data: da.Array, fn: Callable, combine: Callable, *args: Any) -> Any:
    (res,) = dask.compute(_tree(_block_tasks(data, fn, *args), combine))
    return res


# ----------------------------------------------------------------------------------------------------------
# the fit
# ----------------------------------------------------------------------------------------------------------


def _sample_cost(points_t: np.ndarray, normals: np.ndarray, alpha: float) -> np.ndarray:
    """Cost per voxel on the (centred) sample points, given as a contiguous (3, n) array, for each unit normal
    (row of ``normals``), each with its best t_x (the closed-form quantile)."""
    n = points_t.shape[1]
    m = min(n, int(math.floor(alpha * n)) + 1)
    normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    total = normals @ points_t.sum(axis=1)  # sum of u, linear in the normal: no pass over u
    out = np.empty(len(normals))
    for s in range(0, len(normals), _BATCH):  # batches keep the (batch, n) arrays small
        u = np.partition(normals[s : s + _BATCH] @ points_t, n - m, axis=1)  # (batch, n)
        q = u[:, n - m]  # the m-th largest: the best t_x in closed form
        above = (u[:, n - m + 1 :] - q[:, None]).sum(axis=1)  # after the partition: exactly those >= q
        out[s : s + _BATCH] = (above - alpha * (total[s : s + _BATCH] - n * q)) / n
    return out


def sphere_normals(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the whole sphere (a Fibonacci lattice), deterministic.

    Point ``i`` has ``z = 1 - (2 i + 1) / n`` and longitude ``i`` times the golden angle: equal areas per
    point, nearest neighbours about ``sqrt(4 pi / n)`` rad apart (4.5 degrees for 2000 points).

    Example
    -------
    >>> p = sphere_normals(500)
    >>> p.shape, bool(np.allclose(np.linalg.norm(p, axis=1), 1.0)), bool(abs(p.mean(axis=0)).max() < 0.01)
    ((500, 3), True, True)
    """
    i = np.arange(int(n), dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * (math.pi * (3.0 - math.sqrt(5.0)))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _tangent_basis(n0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing ``n0`` to an orthonormal frame (a fixed rule: deterministic)."""
    axis = np.zeros(3)
    axis[int(np.argmin(np.abs(n0)))] = 1.0  # the world axis least aligned with n0
    e1 = np.cross(n0, axis)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(n0, e1)


def _normal_at(frame: tuple, ab_deg: np.ndarray) -> np.ndarray:
    """The unit normal ``(a, b)`` degrees away from ``n0`` along the frame's tangent axes (exponential map:
    geodesic distance ``sqrt(a^2 + b^2)``; exactly ``n0`` at (0, 0), no pole anywhere)."""
    n0, e1, e2 = frame
    a, b = (math.radians(float(v)) for v in ab_deg)
    theta = math.hypot(a, b)
    if theta == 0.0:
        return n0.copy()
    t = (a * e1 + b * e2) / theta
    n = math.cos(theta) * n0 + math.sin(theta) * t
    return n / np.linalg.norm(n)


def _refine(
    pts_t: np.ndarray, n0: np.ndarray, alpha: float, step_deg: float, xatol: float, fatol: float
) -> tuple[np.ndarray, float]:
    """Nelder-Mead over the two tangent angles around ``n0`` (simplex edge ``step_deg``); returns the best
    normal and its cost. The start is kept unless something is strictly better (exact ties stay exact)."""
    from scipy.optimize import minimize

    frame = (n0, *_tangent_basis(n0))

    def fun(ab: np.ndarray) -> float:
        return float(_sample_cost(pts_t, _normal_at(frame, ab)[None], alpha)[0])

    start = fun(np.zeros(2))
    simplex = np.array([[0.0, 0.0], [step_deg, 0.0], [0.0, step_deg]])
    res = minimize(
        fun,
        np.zeros(2),
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": xatol, "fatol": fatol, "maxiter": 600},
    )
    if float(res.fun) < start:
        return _normal_at(frame, res.x), float(res.fun)
    return n0.copy(), start


def _distinct_best(normals: np.ndarray, costs: np.ndarray, k: int, min_sep_deg: float) -> list[int]:
    """Indices of the ``k`` cheapest normals that are pairwise more than ``min_sep_deg`` apart (one start per
    basin rather than k neighbours of one grid minimum); ties keep the grid order."""
    cos_sep = math.cos(math.radians(min_sep_deg))
    picked: list[int] = []
    for idx in np.lexsort((np.arange(len(costs)), costs)):
        if all(float(normals[idx] @ normals[j]) < cos_sep for j in picked):
            picked.append(int(idx))
            if len(picked) == k:
                break
    return picked


def _search_normal(
    points: np.ndarray, alpha: float, candidates: np.ndarray, spacing_deg: float, refine: bool
) -> tuple[np.ndarray, float]:
    """The plane normal minimising the sample cost: the candidate normals on a prefix of the sample, then
    Nelder-Mead from the best distinct ones (on the prefix), then from the best result (and a close rival
    minimum) on the whole sample. Returns the unit normal and its cost per voxel on the whole sample."""
    from threadpoolctl import threadpool_limits

    # (batch, 3) @ (3, n) products: multithreaded BLAS gains nothing on them and, next to dask workers on the
    # same cores, loses up to 5x (measured); one thread also keeps the same kernel on every run
    with threadpool_limits(limits=1, user_api="blas"):
        return _search_normal_1(points, alpha, candidates, spacing_deg, refine)


def _search_normal_1(
    points: np.ndarray, alpha: float, candidates: np.ndarray, spacing_deg: float, refine: bool
) -> tuple[np.ndarray, float]:
    # the points are in hash order, so any prefix is itself a uniform sample: the coarse grid only has to
    # find the basins, a smaller prefix does that at a fraction of the cost
    pts = np.ascontiguousarray(points.T)
    coarse = np.ascontiguousarray(pts[:, :_N_COARSE])
    costs = _sample_cost(coarse, candidates, alpha)
    starts = _distinct_best(candidates, costs, _N_STARTS, 2.5 * spacing_deg)
    if not refine:
        best = candidates[starts[0]].copy()
        return best, float(_sample_cost(pts, best[None], alpha)[0])
    # stage 1, on the prefix: one local search per basin (the V-shaped minimum of a flat face is narrow, so
    # the simplex starts at half the grid spacing)
    stage1 = [_refine(coarse, candidates[i], alpha, 0.5 * spacing_deg, 1e-3, 1e-12) for i in starts]
    order = sorted(range(len(stage1)), key=lambda i: (stage1[i][1], i))
    # stage 2, on the whole sample, from the best minimum, and from the runner-up too when it is another
    # minimum (> 1 degree away) of nearly the same cost (within 5%: the prefix may rank those wrongly); starts
    # in one wide basin (the usual case) converge together and are refined once
    first = stage1[order[0]]
    runs = [first[0]] + [
        stage1[i][0]
        for i in order[1:2]
        if float(stage1[i][0] @ first[0]) < math.cos(math.radians(1.0))
        and stage1[i][1] <= first[1] + 0.05 * abs(first[1])
    ]
    best, best_cost = None, math.inf
    for n0 in runs:
        n, c = _refine(pts, n0, alpha, max(0.05, 0.05 * spacing_deg), 1e-6, 1e-13)
        if c < best_cost:
            best, best_cost = n, c
    return best, best_cost


def minimal_rotation(normal: Sequence[float]) -> np.ndarray:
    """The smallest rotation ``R`` taking the unit vector ``normal`` to +x (``R @ normal = e_x``).

    Its axis is ``normal x e_x`` (perpendicular to x), its angle the angle between the two; its first row is
    ``normal`` itself. For ``normal = -x`` (every 180 degree turn about an axis in the y-z plane is minimal)
    it is the turn about z, ``diag(-1, -1, 1)``, the limit when ``normal`` approaches -x from the y side.

    Example
    -------
    >>> r = minimal_rotation([0.0, 1.0, 0.0])              # +y -> +x: a quarter turn about -z
    >>> r.round(12).tolist()
    [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    n = n / np.linalg.norm(n)
    nx, ny, nz = (float(v) for v in n)
    s = ny * ny + nz * nz
    if s == 0.0:
        return np.eye(3) if nx > 0 else np.diag([-1.0, -1.0, 1.0])
    # Rodrigues for the axis n x e_x: R = I + [v]x + [v]x^2 / (1 + nx), v = (0, nz, -ny). 1 + nx is
    # computed as s / (1 - nx) when nx < 0: no cancellation near -x, so R stays orthonormal there too.
    h = 1.0 / (1.0 + nx) if nx >= 0 else (1.0 - nx) / s
    return (
        np.array([[nx, ny, nz], [-ny, 1.0 - ny * ny * h, -ny * nz * h], [-nz, -ny * nz * h, 1.0 - nz * nz * h]]) + 0.0
    )  # + 0.0: no -0.0


def euler_angles(r: np.ndarray) -> tuple[float, float, float]:
    """``(rx, ry, rz)`` degrees with ``rotation_matrix((rx, ry, rz)) == r`` (to rounding).

    At ``ry = +-90`` degrees (gimbal lock) ``rz`` is set to 0.

    Example
    -------
    >>> [round(a, 9) for a in euler_angles(rotation_matrix((10.0, -20.0, 30.0)))]
    [10.0, -20.0, 30.0]
    """
    r = np.asarray(r, dtype=np.float64)
    ry = math.asin(max(-1.0, min(1.0, float(r[0, 2]))))
    if math.cos(ry) > 1e-12:
        rz = math.atan2(-float(r[0, 1]), float(r[0, 0]))
    else:
        rz = 0.0
    rx_m = r @ rotation_matrix((0.0, math.degrees(ry), math.degrees(rz))).T
    rx = math.atan2(float(rx_m[2, 1]), float(rx_m[1, 1]))
    return tuple(math.degrees(a) + 0.0 for a in (rx, ry, rz))  # + 0.0: no -0.0 in the JSON


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


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise HelmError(f"--alpha must be a number, got {alpha!r}") from None
    if not (0.0 < a < 0.5):
        raise HelmError(
            f"--alpha must be in (0, 0.5), got {alpha!r}",
            hint="alpha is the fraction of the hemisphere allowed across the mirror plane; the published value is 5e-4",
        )
    return a


def fit_mirror(
    mask: xr.DataArray,
    *,
    alpha: float = 5e-4,
    n_sample: int = 200_000,
    seed: int = 0,
    n_normals: int = 2000,
    grid_deg: tuple[float, float] | None = None,
    refine: bool = True,
    gap_quantile: float = 0.5,
) -> MirrorTransform:
    """Fit the mirroring transform of a LEFT hemisphere mask (the plane may face any direction).

    Minimises ``C(T)`` (module docstring) over the mask's voxel centres (world mm from the mask's affine,
    oblique affines included). The search is over the plane's unit normal ``n`` (in the input world frame):
    by default over the WHOLE sphere -- the six axis directions and ``n_normals`` lattice normals
    (:func:`sphere_normals`) on the first 20 000 sample points, then Nelder-Mead in the tangent plane from
    the best distinct basins (on those points, then on the whole sample) -- so a specimen tilted in its bag
    or a header that disagrees with the anatomy by any angle is handled. ``R`` is then the smallest rotation
    taking ``n`` to +x (:func:`minimal_rotation`): the hemisphere lands on x < 0 and, for a header that
    matches the anatomy (``n`` close to +x), ``R`` is close to the identity. The search runs on ``n_sample``
    hash-chosen voxels (``seed`` picks the sample); the best x translation, the cost, the fraction across
    the plane and the gap are then computed exactly on ALL mask voxels. Computed eagerly by three chunked
    passes over the mask (each task holds one chunk; the result is a few numbers).

    Parameters
    ----------
    mask : volume
        Nonzero = brain. Any chunking; the result (transform) is identical for every chunking.
    alpha : float
        Fraction of the hemisphere allowed across the mirror plane (0 < alpha < 0.5).
    n_sample : int
        Voxels used to choose the normal (all of them if the mask is smaller).
    seed : int
        Chooses the subsample (the hash key); the same seed gives the same transform on any chunking.
    n_normals : int
        Lattice normals of the global search (>= 50; 2000: neighbours 4.5 degrees apart).
    grid_deg : (float, float), optional
        Instead of the global search, a local one near +x (for a header known to match the anatomy, or to
        force the plane): ``(half range, step)`` degrees of a grid of the two angles ``(ry, rz)`` of the
        normal ``(cos ry cos rz, -cos ry sin rz, sin ry)``. A warning is issued when the optimum lands at
        the edge of the range (widen it then). ``(0, 1)`` with ``refine=False`` forces the plane x = const.
    refine : bool
        Nelder-Mead refinement after the grid (on by default; off: the best grid normal).
    gap_quantile : float
        Quantile of the footprint column gaps reported as ``gap_mm`` (0.5: median).

    Returns
    -------
    MirrorTransform

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> i, j, k = np.ogrid[:30, :30, :30]                     # a half ball, flat face at i = 24
    >>> m = (((i - 24) ** 2 + (j - 15) ** 2 + (k - 15) ** 2 <= 144) & (i <= 24)).astype(np.uint8)
    >>> aff = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # header 90 deg off
    >>> tr = fit_mirror(make_volume(da.from_array(m, chunks=10), aff, kind="mask"), alpha=1e-2)
    >>> face = aff[:3, :3] @ [24.0, 15, 15]                   # world centre of the face: (-15, 24, 15)
    >>> tr.normal, tr.fraction_across, round(float(tr.apply([face])[0, 0]), 9)
    ((0.0, 1.0, 0.0), 0.0, 0.0)
    """
    alpha = _check_alpha(alpha)
    data = _as_dask(mask, "the brain mask")
    if isinstance(n_sample, bool) or not isinstance(n_sample, (int, np.integer)) or n_sample < 100:
        raise HelmError(f"n_sample must be an integer of at least 100, got {n_sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(n_normals, bool) or not isinstance(n_normals, (int, np.integer)) or not 50 <= n_normals <= 10**6:
        raise HelmError(f"n_normals must be an integer in [50, 1000000], got {n_normals!r}")
    if grid_deg is not None:
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
        raise HelmError(
            "the brain mask is empty (no nonzero voxel); cannot fit the mirror plane",
            path=src,
            hint="check the background-removal stage output",
        )
    if count < 10:
        raise HelmError(f"the brain mask has only {count} voxels; cannot fit the mirror plane", path=src)
    a3, at = affine[:3, :3], affine[:3, 3]
    centre = a3 @ (np.array(sums, dtype=np.float64) / count) + at
    order = np.argsort(_h, kind="stable")  # canonical order: by hash, not by chunk
    ijk = np.stack(np.unravel_index(lin[order], shape), axis=1).astype(np.float64)
    points = ijk @ a3.T + (at - centre)  # sample voxel centres relative to the centroid

    # the plane normal on the sample ------------------------------------------------------------------------------
    if grid_deg is None:
        candidates = np.concatenate([_AXES, sphere_normals(int(n_normals))])
        spacing_deg = math.degrees(math.sqrt(4.0 * math.pi / int(n_normals)))
        search = "sphere"
    else:
        ticks = np.arange(-half_deg, half_deg + 0.5 * step_deg, step_deg)
        candidates = _normals(np.array([(a, b) for a in ticks for b in ticks]))
        spacing_deg = step_deg
        search = "grid"
    normal, cost_sample = _search_normal(points, alpha, candidates, spacing_deg, refine)
    if grid_deg is not None and half_deg > 0:
        ry = math.degrees(math.asin(max(-1.0, min(1.0, float(normal[2])))))
        rz = math.degrees(math.atan2(-float(normal[1]), float(normal[0])))
        if max(abs(ry), abs(rz)) > half_deg - 0.5 * step_deg:
            warnings.warn(
                f"the best mirror plane lies at the edge of the searched angles (ry, rz = "
                f"{ry:.2f}, {rz:.2f} deg, range +-{half_deg:g}); widen grid_deg (or drop it: "
                f"the default search covers every direction)",
                RuntimeWarning,
                stacklevel=2,
            )
    r = minimal_rotation(normal)
    angles = euler_angles(r)

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
    geom = {
        "w": r[0] @ a3,
        "b": float(r[0] @ (at - centre)),
        "wy": r[1] @ a3,
        "by": float(r[1] @ (at - centre)),
        "wz": r[2] @ a3,
        "bz": float(r[2] @ (at - centre)),
        "y0": float(y_c.min() - col_mm),
        "z0": float(z_c.min() - col_mm),
        "inv_col": 1.0 / col_mm,
    }
    u_c = rel @ r[0]
    pad = 1e-9 * max(1.0, float(np.abs(u_c).max()))
    m = min(count, int(math.floor(alpha * count)) + 1)
    ex = _exact_quantile(data, geom, m, float(u_c.min() - pad), float(u_c.max() + pad), columns=True)
    q = ex["q"]
    cost = (ex["sum_across"] - q * ex["n_across"]) - alpha * (ex["sum_all"] - q * count)
    y0c, z0c, col = ex["columns"]
    tops = col[np.isfinite(col)]
    gap = float(np.quantile(np.maximum(q - tops, 0.0), float(gap_quantile)))
    translation = (float(-q - centre[0]), 0.0, 0.0)  # x after T = (x after R, centred) - q
    ext_c = np.array([[hi_box[d] + 0.5 if (c >> d) & 1 else lo_box[d] - 0.5 for d in range(3)] for c in range(8)])
    return MirrorTransform(
        matrix=_rigid_matrix(r, translation, centre),
        angles_deg=angles,
        translation_mm=translation,
        centre_mm=tuple(float(c) for c in centre),
        cost=float(cost),
        fraction_across=ex["n_across"] / count,
        gap_mm=gap,
        alpha=alpha,
        n_voxels=int(count),
        n_sample=int(len(points)),
        cost_sample=float(cost_sample),
        gap_quantile=float(gap_quantile),
        bbox_mm=ext_c @ a3.T + at,
        spacing_mm=float(sp.min()),
        normal=tuple(float(v) + 0.0 for v in r[0]),
        search=search,
        n_normals=int(len(candidates)),
    )


# ----------------------------------------------------------------------------------------------------------
# the anatomical check: the hypothalamus is a midline structure
# ----------------------------------------------------------------------------------------------------------

_HYPOTHALAMUS_CODES = tuple(HYPOTHALAMUS)  # FreeSurfer's subunits, both sides (the fornix is left out)
_DIST_BIN_MM = 0.01  # bin of the |distance| histogram (the percentile's resolution)


def _plane_block(
    block: np.ndarray, offset: tuple[int, int, int], codes: tuple | None, w: np.ndarray, b: float
) -> tuple:
    """[count, exact index sums, min/max signed distance, |distance| histogram] of the selected voxels."""
    blk = np.asarray(block)
    if not blk.any():  # most chunks: labels are small
        return (0, (0, 0, 0), math.inf, -math.inf, np.zeros(0, np.int64))
    sel = (blk != 0) if codes is None else np.isin(blk, codes)
    flat = np.flatnonzero(sel)
    if flat.size == 0:
        return (0, (0, 0, 0), math.inf, -math.inf, np.zeros(0, np.int64))
    loc = np.unravel_index(flat, sel.shape)
    g = [loc[d].astype(np.int64) + offset[d] for d in range(3)]
    # signed distance from the plane (world x after T) of the selected voxels only: labels are sparse
    d = ((b + w[0] * g[0]) + w[1] * g[1]) + w[2] * g[2]
    hist = np.bincount(np.ceil(np.abs(d) / _DIST_BIN_MM).astype(np.int64))  # bin i: |d| in ((i-1)w, iw]
    return (int(flat.size), tuple(int(gd.sum(dtype=np.int64)) for gd in g), float(d.min()), float(d.max()), hist)


def _plane_combine(*parts: tuple) -> tuple:
    size = max(p[4].size for p in parts)
    hist = np.zeros(size, np.int64)
    for p in parts:
        hist[: p[4].size] += p[4]
    return (
        sum(p[0] for p in parts),
        tuple(sum(p[1][d] for p in parts) for d in range(3)),
        min(p[2] for p in parts),
        max(p[3] for p in parts),
        hist,
    )


def check_hypothalamus_plane(
    transform: MirrorTransform,
    hypothalamus_volume: xr.DataArray,
    *,
    max_distance_mm: float = 15.0,
    codes: Sequence[int] | None = None,
    path: str | os.PathLike | None = None,
) -> dict:
    """Check that the hypothalamus labels lie on the fitted mirror plane (it is a midline structure).

    The hypothalamus lines the third ventricle, so in a hemisphere it sits on the medial face, which the fit
    puts on the plane ``x = 0`` (after ``T``). Its labels' centroid far from that plane means the inputs do
    not belong together: labels from another scan or subject, a header (affine) that does not match the
    anatomy (then the labels were placed wrongly relative to the mask), or a wrong brain mask (then the plane
    is). A HELM phantom's hypothalamus centroid lies about 2 mm from its medial plane.

    Computed eagerly in one chunked pass (each task holds one chunk and returns a few numbers and a histogram
    of the distances in 0.01 mm bins): exact integer index sums for the centroid, so the result does not
    depend on the chunking.

    Parameters
    ----------
    transform : MirrorTransform
        The fitted (or read) mirroring transform, world -> world.
    hypothalamus_volume : volume
        The labels on any grid (world coordinates are used).
    max_distance_mm : float
        Largest accepted distance of the labels' centroid from the plane.
    codes : sequence of int, optional
        The labels that make the hypothalamus; default its subunits 801-810 (the fornix is not midline),
        falling back to every nonzero voxel when none of those is present.
    path : str, optional
        Named in the error (default: the volume's ``source``).

    Returns
    -------
    dict
        ``centroid_mm`` (world), ``centroid_distance_mm`` (signed: > 0 across the plane, < 0 on the
        hemisphere's side), ``p90_distance_mm`` (90th percentile of the voxels' absolute distances, rounded
        up to 0.01 mm), ``min_distance_mm`` / ``max_distance_mm`` (signed extremes), ``n_voxels``, ``codes``
        (``"801-810"``, the codes given, or ``"nonzero"``), ``limit_mm`` and ``ok`` (always True: a failure
        raises).

    Raises
    ------
    HelmError
        When the centroid is farther than ``max_distance_mm`` from the plane, or the volume holds no label.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((10, 4, 4), np.uint16); lab[8:10, 1:3, 1:3] = 801        # on the face x = 9
    >>> shift = np.eye(4); shift[0, 3] = -9.0
    >>> t = MirrorTransform(shift, (0, 0, 0), (-9, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)
    >>> r = check_hypothalamus_plane(t, make_volume(da.from_array(lab, chunks=5), np.eye(4), kind="labels"))
    >>> r["centroid_distance_mm"], r["p90_distance_mm"]
    (-0.5, 1.0)
    """
    data = _as_dask(hypothalamus_volume, "the hypothalamus labels")
    src = path if path is not None else (hypothalamus_volume.attrs.get("source") or None)
    limit = float(max_distance_mm)
    if not (limit > 0 and math.isfinite(limit)):
        raise HelmError(f"max_distance_mm must be a positive number, got {max_distance_mm!r}")
    aff = affine_of(hypothalamus_volume)
    row = np.asarray(transform.matrix, dtype=np.float64)[0]
    w = row[:3] @ aff[:3, :3]  # voxel index -> world x after T
    b = float(row[:3] @ aff[:3, 3] + row[3])
    use = tuple(int(c) for c in (_HYPOTHALAMUS_CODES if codes is None else codes))
    count, sums, dmin, dmax, hist = _run(data, _plane_block, _plane_combine, use, w, b)
    used: Any = "801-810" if codes is None else list(use)
    if count == 0 and codes is None:  # e.g. another numbering: every label
        count, sums, dmin, dmax, hist = _run(data, _plane_block, _plane_combine, None, w, b)
        used = "nonzero"
    if count == 0:
        raise HelmError(
            "the hypothalamus labels are empty; cannot check them against the mirror plane",
            path=src,
            hint="check the hypothalamus label file",
        )
    centroid = aff[:3, :3] @ (np.array(sums, dtype=np.float64) / count) + aff[:3, 3]
    dist = float(row[:3] @ centroid + row[3])
    p90 = float(np.searchsorted(np.cumsum(hist), 0.9 * count)) * _DIST_BIN_MM  # the bin's upper edge
    result = {
        "centroid_mm": [float(c) for c in centroid],
        "centroid_distance_mm": dist,
        "p90_distance_mm": round(p90, 6),
        "min_distance_mm": dmin,
        "max_distance_mm": dmax,
        "n_voxels": int(count),
        "codes": used,
        "limit_mm": limit,
        "ok": True,
    }
    if abs(dist) > limit:
        raise HelmError(
            f"the hypothalamus labels lie {abs(dist):.1f} mm from the fitted mirror plane (centroid; 90% of "
            f"their voxels within {p90:.1f} mm; at most {limit:g} mm expected, the hypothalamus is a midline "
            "structure): the labels may come from another scan or subject, the header (affine) may not match "
            "the anatomy, or the brain mask may be wrong",
            path=src,
            hint="check that the labels were drawn on this scan, that the scan's header matches the anatomy, "
            "and the brain mask (mask.nii.gz)",
        )
    return result


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
        raise HelmError(
            "the hemisphere volume is empty (no nonzero voxel); nothing to mirror", path=vol.attrs.get("source") or None
        )
    a = affine_of(vol)
    c = np.array([[box[d][1] + 0.5 if (n >> d) & 1 else box[d][0] - 0.5 for d in range(3)] for n in range(8)])
    return c @ a[:3, :3].T + a[:3, 3]


def whole_brain_grid(
    vol: xr.DataArray | None, transform: MirrorTransform, *, spacing_mm: float | None = None, margin_mm: float = 10.0
) -> tuple[tuple[int, int, int], np.ndarray]:
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
            raise HelmError(
                "the mirror transform holds no bounding box; pass the hemisphere mask volume",
                hint="whole_brain_grid(mask, transform)",
            )
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


def _gather_block(
    regions: list, start: tuple[int, int, int], g: np.ndarray, ranges: tuple, src_shape: tuple[int, int, int], mode: str
) -> np.ndarray:
    """Nearest-neighbour gather of every map for one output block (all maps share the index computation)."""
    (i0, i1), (j0, j1), (k0, k1) = ranges
    regions = [np.asarray(r) for r in regions]
    rshape = regions[0].shape
    out = np.zeros((len(regions), i1 - i0, j1 - j0, k1 - k0), np.uint16)
    j = np.arange(j0, j1, dtype=np.float64)
    k = np.arange(k0, k1, dtype=np.float64)
    flats = [r.reshape(-1) for r in regions]
    for p, i in enumerate(range(i0, i1)):  # plane by plane: small temporaries
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
                raise HelmError(
                    "a label map holds values outside 0..65535; cannot store it as uint16",
                    hint="check the label map's codes",
                )
            out[mi, p][valid] = vals
    return out


def _right_codes_block(block: np.ndarray, codes: tuple) -> np.ndarray:
    out = block.copy()
    for left, right in codes:
        out[block == left] = right  # masks from the unmodified input: no chaining
    return out


def _source_region(g: np.ndarray, ranges: tuple, src_shape: tuple[int, int, int]) -> tuple | None:
    """Index box of the source voxels an output block can reach (its 8 corners, +-1 voxel), clipped."""
    corners = np.array(
        [[ranges[d][1] - 1 if (c >> d) & 1 else ranges[d][0] for d in range(3)] for c in range(8)], dtype=np.float64
    )
    src = corners @ g[:3, :3].T + g[:3, 3]
    lo = np.floor(src.min(axis=0) + 0.5).astype(int) - 1
    hi = np.floor(src.max(axis=0) + 0.5).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(src_shape) - 1)
    if np.any(lo > hi):
        return None
    return tuple(int(v) for v in lo), tuple(int(v) + 1 for v in hi)


def _whole_brain_block(
    regions: list,
    lo: tuple,
    g: np.ndarray,
    parts: tuple,
    ry: tuple,
    rz: tuple,
    src_shape: tuple[int, int, int],
    mode: str,
    codes: tuple,
) -> np.ndarray:
    """One whole-brain output chunk: its x < 0 part gathered directly, its x > 0 part gathered at the mirrored
    x < 0 positions, reversed along x and with the right-hemisphere codes."""
    width = sum(x1 - x0 for (x0, x1), _, _ in parts)
    out = np.zeros((len(regions), width, ry[1] - ry[0], rz[1] - rz[0]), np.uint16)
    for (x0, x1), at, mirrored in parts:
        blk = _gather_block(regions, lo, g, ((x0, x1), ry, rz), src_shape, mode)
        out[:, at : at + x1 - x0] = _right_codes_block(blk[:, ::-1], codes) if mirrored else blk
    return out


def mirror_labels(
    maps: Mapping[Any, xr.DataArray] | xr.DataArray,
    transform: MirrorTransform,
    *,
    grid: tuple[Sequence[int], np.ndarray] | None = None,
    spacing_mm: float | None = None,
    margin_mm: float = 10.0,
    right_codes: Mapping[int, int] | None = None,
    chunks: int = 128,
    mode: str = "grid-constant",
) -> dict | xr.DataArray:
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
            raise HelmError(
                f"{what} has dtype {d.dtype}; label maps must hold integer codes", path=v.attrs.get("source") or None
            )
        if d.shape != first.shape or not np.allclose(affine_of(v), src_aff, rtol=0, atol=1e-6):
            raise HelmError(
                f"{what} is not on the same voxel grid as the first map (shape {d.shape} vs {first.shape})",
                path=v.attrs.get("source") or None,
                hint="mirror maps that share the hemisphere's grid",
            )
        datas.append(d)
    if grid is None:
        sp = float(spacing_of(src_aff).min()) if spacing_mm is None else spacing_mm  # the maps' spacing
        grid = whole_brain_grid(None, transform, spacing_mm=sp, margin_mm=margin_mm)
    out_shape = tuple(int(s) for s in grid[0])
    out_aff = np.asarray(grid[1], dtype=np.float64)
    if out_shape[0] % 2:
        raise HelmError(
            f"the whole-brain grid must have an even number of x voxels, got {out_shape[0]}",
            hint="build it with whole_brain_grid",
        )
    codes = tuple(sorted((int(a), int(b)) for a, b in (RIGHT_CODES if right_codes is None else right_codes).items()))
    g = np.linalg.inv(src_aff) @ np.linalg.inv(transform.matrix) @ out_aff  # output index -> source index
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

    full = region_map(
        _whole_brain_block, datas, ((nmaps,), xch, ych, zch), plan, np.uint16, name="mirror-gather"
    )  # (maps, x, y, z)
    params = {
        "matrix": transform.matrix.tolist(),
        "alpha": transform.alpha,
        "grid_shape": list(out_shape),
        "spacing_mm": float(spacing_of(out_aff).min()),
        "margin_mm": float(margin_mm),
        "mode": mode,
        "right_codes": {str(a): b for a, b in codes},
    }
    outs = {}
    for mi, (name, v) in enumerate(items):
        outs[name] = like(
            v, full[mi], affine=out_aff, kind="labels", step=provenance_record("mirror.mirror_labels", params)
        )
    return outs[None] if single else outs
