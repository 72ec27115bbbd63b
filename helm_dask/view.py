"""Looking at large volumes: orthogonal slices with overlays, label colours, histograms, a slice browser.

Everything here is *bounded*: a full-resolution volume is never read whole. What is computed is

* single planes (three for :func:`orthogonal_slices`, one per move of the :func:`slice_browser` slider),
  read at a **pyramid level** chosen so that a plane has at most ``max_px`` pixels per side, and
* reductions (:func:`histogram`) over a coarse level (``max_voxels``), streamed chunk by chunk by dask.

Levels. Level ``L`` is the full-resolution grid decimated ``2**L`` times. For a volume opened from a helm-dask
store (:func:`helm_dask.io.open_volume`, which records ``attrs["store"]`` and ``attrs["level"]``) the store's
own pyramid is read (block means for images, strides for labels), so a plane of a 2-gigavoxel volume costs a
few chunk reads of a small array; beyond the store's coarsest level, and for any other (lazy or in-memory)
volume, level ``L`` is a stride ``[::2**L]`` of the data -- exact voxel values, only the chunks crossing the
plane are computed, and each is computed whole (so for a lazily *generated* 0.1 mm volume a plane costs the
chunks it crosses; write it to a store first to browse it quickly).

Coordinates. Planes are cut along the *voxel* axes ``x, y, z`` (dims of the volume). Their extents are in mm,
in the convention of the volume's own coordinates (``vol.x`` etc.): world RAS+ mm for an axis-aligned affine,
mm along the voxel axis from the first voxel centre otherwise (``attrs["coords"] == "voxel_mm"``; an oblique
scan stays oblique after :func:`helm_dask.orient.to_ras`, which only permutes and flips axes). Points
(``point_mm``) are always *world* RAS+ mm. Every extent is exact
for voxel centres at the level shown (its own affine: block centres for means, block corners for strides).

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> vol = make_volume(da.arange(60.0).reshape(5, 4, 3), np.diag([2.0, 1.0, 1.0, 1.0]))
>>> s = orthogonal_slices(vol, point_mm=(4.0, 1.0, 0.0))
>>> s["x"].data.tolist(), s["x"].extent_mm
([[24.0, 25.0, 26.0], [27.0, 28.0, 29.0], [30.0, 31.0, 32.0], [33.0, 34.0, 35.0]], (-0.5, 3.5, -0.5, 2.5))
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .volume import affine_of, is_axis_aligned, make_volume, orientation_code, provenance_record, spacing_of

__all__ = [
    "OrthoSlices",
    "Plane",
    "at_level",
    "choose_level",
    "crop_mm",
    "histogram",
    "label_centroid_mm",
    "label_colormap",
    "orthogonal_slices",
    "plot_orthogonal",
    "pyramid_levels",
    "slice_browser",
]

DIMS = ("x", "y", "z")
#: The in-plane axes of the plane that fixes each dim (rows, columns of ``Plane.data``).
IN_PLANE = {"x": ("y", "z"), "y": ("x", "z"), "z": ("x", "y")}
DEFAULT_MAX_PX = 512
DEFAULT_MAX_VOXELS = 1 << 24  # 16 M voxels: a histogram pass over a coarse level takes a second or two
_GRID_TOL = 1e-6


# ------------------------------------------------------------------------------------------------------------
# Pyramid levels


@dataclass
class _Grid:
    """One level of a volume: lazy 3-D data, its exact affine and where it came from."""

    data: da.Array
    affine: np.ndarray
    level: int
    source: str


def _check_volume(vol: Any, what: str = "volume") -> xr.DataArray:
    if not isinstance(vol, xr.DataArray) or "affine" not in vol.attrs:
        raise HelmError(
            f"the {what} must be a helm-dask volume (an xarray.DataArray with attrs['affine'])",
            hint="open it with helm_dask.io.open_volume or build it with helm_dask.make_volume",
        )
    if vol.ndim != 3:
        raise HelmError(
            f"the {what} is {vol.ndim}-D; only 3-D volumes can be sliced",
            hint="pick one echo first, e.g. vol.isel(echo=0)",
        )
    return vol


def _store_info(vol: xr.DataArray) -> dict | None:
    """The store behind ``vol`` if ``vol`` is exactly one of its levels (same grid, same dask data), else None.

    Derived volumes inherit ``attrs["store"]`` through :func:`helm_dask.volume.like`; these checks keep a
    reoriented, resampled or masked volume from being shown with its source's pyramid.
    """
    store, level = vol.attrs.get("store"), vol.attrs.get("level")
    if not store or level is None:
        return None
    try:
        import zarr

        from .io.store import read_meta

        meta = read_meta(store)
        if meta.get("four_d"):
            return None
        nlevels = int(meta.get("nlevels", 1))
        level = int(level)
        affines = [np.asarray(a, dtype=np.float64) for a in meta["level_affines"]]
        group = zarr.open_group(store, mode="r")
        shapes = [tuple(group[str(lev)].shape) for lev in range(nlevels)]
    except Exception:  # a missing / moved / foreign store: fall back to striding the data we have
        return None
    if not 0 <= level < nlevels or shapes[level] != tuple(vol.shape):
        return None
    if not np.allclose(affines[level], affine_of(vol), atol=_GRID_TOL, rtol=0):
        return None
    if vol.attrs.get("kind") != meta.get("kind", "image"):
        return None
    # Same data, not only the same grid: a masked or rescaled copy made with ``like`` keeps the attrs too.
    try:
        from .io.store import open_volume

        if not isinstance(vol.data, da.Array) or vol.data.name != open_volume(store, level=level).data.name:
            return None
    except Exception:
        return None
    return {"store": store, "level": level, "nlevels": nlevels, "shapes": shapes, "affines": affines}


def _full_res(vol: xr.DataArray) -> tuple[dict | None, tuple[int, ...], np.ndarray]:
    """(store info, full-resolution shape, full-resolution affine) of a volume."""
    info = _store_info(vol)
    if info is not None:
        return info, info["shapes"][0], info["affines"][0]
    return None, tuple(vol.shape), affine_of(vol)


def _stride_affine(affine: np.ndarray, f: int) -> np.ndarray:
    return np.asarray(affine, dtype=np.float64) @ np.diag([f, f, f, 1.0])


def _level_shape(vol: xr.DataArray, level: int) -> tuple[int, int, int]:
    info, shape0, _ = _full_res(vol)
    if info is not None:
        top = min(level, info["nlevels"] - 1)
        f = 2 ** (level - top)
        return tuple(-(-n // f) for n in info["shapes"][top])
    f = 2**level
    return tuple(-(-n // f) for n in shape0)


def _grid(vol: xr.DataArray, level: int) -> _Grid:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise HelmError(f"level must be a non-negative integer, got {level!r}", hint="e.g. level=0 (full resolution)")
    level = int(level)
    info = _store_info(vol)
    if info is not None:
        from .io.store import open_volume

        top = min(level, info["nlevels"] - 1)
        if top == info["level"]:
            data, aff = vol.data, affine_of(vol)
        else:
            v = open_volume(info["store"], level=top)
            data, aff = v.data, affine_of(v)
        f = 2 ** (level - top)
        src = f"store level {top}" + (f", stride {f}" if f > 1 else "")
        if f > 1:
            data, aff = data[::f, ::f, ::f], _stride_affine(aff, f)
        return _Grid(data, aff, level, src)
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    f = 2**level
    if f > 1:
        return _Grid(data[::f, ::f, ::f], _stride_affine(affine_of(vol), f), level, f"stride {f}")
    return _Grid(data, affine_of(vol), 0, "full resolution")


def pyramid_levels(vol: xr.DataArray, *, extra: int = 0) -> list[dict]:
    """The levels of a volume's pyramid: shape, voxel size (mm), voxel count and how each is read (no data read).

    ``extra`` adds that many strided levels beyond the stored ones (or beyond level 0 for a volume that is not
    read from a store).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> [lv["shape"] for lv in pyramid_levels(make_volume(da.zeros((8, 6, 4)), np.eye(4)), extra=1)]
    [(8, 6, 4), (4, 3, 2)]
    """
    vol = _check_volume(vol)
    info, _, aff0 = _full_res(vol)
    n = (info["nlevels"] if info is not None else 1) + int(extra)
    out = []
    for lev in range(n):
        if info is not None and lev < info["nlevels"]:
            shape, aff, src = info["shapes"][lev], info["affines"][lev], f"store level {lev}"
        else:
            top = info["nlevels"] - 1 if info is not None else 0
            f = 2 ** (lev - top)
            base = info["affines"][top] if info is not None else aff0
            shape, aff = _level_shape(vol, lev), _stride_affine(base, f)
            src = "full resolution" if f == 1 else f"stride {f}" + (f" of store level {top}" if info else "")
        out.append(
            {
                "level": lev,
                "shape": tuple(int(s) for s in shape),
                "spacing_mm": tuple(float(s) for s in spacing_of(aff)),
                "voxels": int(np.prod(shape)),
                "source": src,
            }
        )
    return out


def choose_level(
    vol: xr.DataArray,
    *,
    max_px: int | None = DEFAULT_MAX_PX,
    max_voxels: int | None = None,
    box: Sequence[int] | None = None,
) -> int:
    """The finest level whose shape (or ``box`` of full-resolution voxels) fits ``max_px`` per side and ``max_voxels``.

    Cheap: reads metadata only.
    """
    vol = _check_volume(vol)
    for lev in range(64):
        shape = _level_shape(vol, lev)
        if box is not None:  # a crop: its size at this level (+1: the box may straddle a voxel boundary)
            shape = tuple(min(s, -(-int(b) // 2**lev) + 1) for s, b in zip(shape, box))
        ok = (max_px is None or max(shape) <= max_px) and (max_voxels is None or int(np.prod(shape)) <= max_voxels)
        if ok or max(shape) <= 1:
            return lev
    return 63  # pragma: no cover  (2**63 voxels)


def at_level(vol: xr.DataArray, level: int) -> xr.DataArray:
    """The volume at pyramid ``level`` (lazy): the store's level if it has one, else a ``2**level`` stride.

    Level 0 is the full-resolution grid (the store's level 0 for a volume opened from a store at any level).
    The result carries that level's exact affine.
    """
    vol = _check_volume(vol)
    info = _store_info(vol)
    if info is not None and 0 <= level < info["nlevels"]:
        from .io.store import open_volume

        return vol if level == info["level"] else open_volume(info["store"], level=int(level))
    g = _grid(vol, level)
    if info is None and g.level == 0:
        return vol
    attrs = {
        k: v
        for k, v in vol.attrs.items()
        if k not in ("affine", "units", "kind", "coords", "source", "provenance", "store", "level")
    }
    prov = list(vol.attrs.get("provenance", [])) + [
        provenance_record("view.at_level", {"level": int(level), "read": g.source})
    ]
    return make_volume(
        g.data,
        g.affine,
        kind=vol.attrs.get("kind", "image"),
        name=vol.name,
        source=vol.attrs.get("source", ""),
        provenance=prov,
        attrs=attrs,
    )


def crop_mm(vol: xr.DataArray, point_mm: Sequence[float], radius_mm: float) -> xr.DataArray:
    """The lazy sub-volume of the voxels whose centres lie within +- ``radius_mm`` of a world point, per axis.

    Only the chunks that overlap the box are ever computed or read, so a small region of a 2-gigavoxel (or
    lazily generated) volume can be looked at -- or processed -- at full resolution. The result carries its
    exact affine (the input's, shifted to the first voxel of the box).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume, affine_of
    >>> small = crop_mm(make_volume(da.zeros((100, 100, 100)), np.eye(4)), (50.0, 10.0, 0.0), 2.0)
    >>> small.shape, affine_of(small)[:3, 3].tolist()
    ((5, 5, 3), [48.0, 8.0, 0.0])
    """
    vol = _check_volume(vol)
    aff = affine_of(vol)
    point = np.asarray(point_mm, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise HelmError(f"point_mm must be three finite world coordinates (mm), got {point_mm!r}")
    if not (np.isscalar(radius_mm) and float(radius_mm) > 0):
        raise HelmError(f"radius_mm must be a positive number of mm, got {radius_mm!r}")
    u = np.linalg.solve(aff[:3, :3], point - aff[:3, 3])
    h = float(radius_mm) / spacing_of(aff)
    shape = np.asarray(vol.shape)
    lo = np.clip(np.ceil(u - h - 1e-9).astype(int), 0, shape)
    hi = np.clip(np.floor(u + h + 1e-9).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        raise HelmError(
            f"the box of +-{radius_mm} mm around {np.round(point, 3).tolist()} holds no voxel of the volume",
            hint="choose a point inside the field of view or a larger radius",
        )
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    shift = np.eye(4)
    shift[:3, 3] = lo
    attrs = {
        k: v
        for k, v in vol.attrs.items()
        if k not in ("affine", "units", "kind", "coords", "source", "provenance", "store", "level")
    }
    prov = list(vol.attrs.get("provenance", [])) + [
        provenance_record(
            "view.crop_mm",
            {"point_mm": point.tolist(), "radius_mm": float(radius_mm), "start": lo.tolist(), "stop": hi.tolist()},
        )
    ]
    return make_volume(
        data[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))],
        aff @ shift,
        kind=vol.attrs.get("kind", "image"),
        name=vol.name,
        source=vol.attrs.get("source", ""),
        provenance=prov,
        attrs=attrs,
    )


def _block_moments(block: np.ndarray, offset: tuple[int, int, int], codes: np.ndarray | None) -> np.ndarray:
    hit = block != 0 if codes is None else np.isin(block, codes)
    idx = np.nonzero(hit)
    out = np.zeros(4, dtype=np.int64)
    out[0] = idx[0].size
    for d in range(3):
        out[1 + d] = int(idx[d].sum(dtype=np.int64)) + offset[d] * idx[0].size
    return out


def label_centroid_mm(vol: xr.DataArray, codes: Iterable[int] | None = None) -> np.ndarray | None:
    """World centroid (RAS+ mm) of the voxels holding ``codes`` (default: every nonzero voxel); None if there is none.

    One chunked pass with exact integer index sums per chunk (the same answer for any chunking); computed eagerly,
    only four numbers per chunk come back. Handy to aim :func:`plot_orthogonal` at a structure.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((6, 4, 4), np.uint16); lab[2:4, 1, 3] = 801
    >>> label_centroid_mm(make_volume(da.from_array(lab, chunks=3), np.diag([2.0, 1, 1, 1]))).tolist()
    [5.0, 1.0, 3.0]
    """
    vol = _check_volume(vol)
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    arr = None if codes is None else np.asarray(sorted({int(c) for c in codes}))
    starts = [np.cumsum((0,) + c[:-1]) for c in data.chunks]
    blocks = data.to_delayed()
    parts = [
        dask.delayed(_block_moments)(blocks[i, j, k], (int(starts[0][i]), int(starts[1][j]), int(starts[2][k])), arr)
        for i in range(blocks.shape[0])
        for j in range(blocks.shape[1])
        for k in range(blocks.shape[2])
    ]
    total = np.sum(dask.compute(*parts), axis=0)
    if total[0] == 0:
        return None
    ijk = total[1:] / total[0]
    aff = affine_of(vol)
    return aff[:3, :3] @ ijk + aff[:3, 3]


# ------------------------------------------------------------------------------------------------------------
# Orthogonal slices


@dataclass
class Plane:
    """One plane of a volume.

    ``data`` is 2-D with rows along ``axes[0]`` and columns along ``axes[1]`` (plain voxel order: show it with
    ``ax.imshow(plane.data.T, origin="lower", extent=plane.extent_mm)``). ``extent_mm`` is
    ``(first axis: outer edge of the first row, outer edge of the last row, second axis: the same)`` in mm;
    ``index`` the plane's index along the fixed axis at the level shown; ``position_mm`` its coordinate.
    """

    dim: str
    axes: tuple[str, str]
    data: Any
    extent_mm: tuple[float, float, float, float]
    index: int
    position_mm: float
    coords_mm: tuple[np.ndarray, np.ndarray] = field(repr=False, default=None)


@dataclass
class OrthoSlices:
    """Three orthogonal planes through one point: ``slices["x"]`` is the (y, z) plane at the point's x, etc."""

    planes: dict
    level: int
    source: str
    affine: np.ndarray
    shape: tuple
    index: tuple
    point_mm: np.ndarray
    coords: str
    axis_codes: str

    def __getitem__(self, dim: str) -> Plane:
        return self.planes[dim]


def _frame(ref_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-axis (scale, offset) turning a continuous voxel index of the reference grid into its mm coordinate."""
    a = np.asarray(ref_affine, dtype=np.float64)
    if is_axis_aligned(a):
        return np.diag(a)[:3].copy(), a[:3, 3].copy(), "world"
    return spacing_of(a), np.zeros(3), "voxel_mm"


def _index_map(ref_affine: np.ndarray, affine: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (alpha, beta) with ref_index = alpha * index + beta; refuses grids whose axes are not parallel."""
    m = np.linalg.inv(np.asarray(ref_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    diag = np.diag(m)[:3]
    off = m[:3, :3] - np.diag(diag)
    if np.abs(off).max() > 1e-6 * max(1.0, np.abs(diag).max()) or np.any(diag <= 0):
        raise HelmError(
            f"the {what} is not on a grid parallel to the volume's (its voxel axes point elsewhere)",
            hint="bring it onto the volume's grid first, e.g. helm_dask.resample.resample_to_grid",
        )
    return diag.copy(), m[:3, 3].copy()


def _slices(
    vol: xr.DataArray, *, point_mm, level, max_px, radius_mm, ref_affine, compute: bool, what: str = "volume"
) -> OrthoSlices:
    vol = _check_volume(vol, what)
    _, shape0, aff0 = _full_res(vol)
    if point_mm is None:
        centre = (np.asarray(shape0, dtype=np.float64) - 1.0) / 2.0
        point = aff0[:3, :3] @ centre + aff0[:3, 3]
    else:
        point = np.asarray(point_mm, dtype=np.float64).reshape(-1)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise HelmError(f"point_mm must be three finite world coordinates (mm), got {point_mm!r}")
    if radius_mm is not None and not (np.isscalar(radius_mm) and float(radius_mm) > 0):
        raise HelmError(f"radius_mm must be a positive number of mm, got {radius_mm!r}")
    if level is None:
        box = None
        if radius_mm is not None:
            box = np.minimum(2 * float(radius_mm) / spacing_of(aff0) + 1, shape0).astype(int)
        level = choose_level(vol, max_px=max_px, box=box)
    g = _grid(vol, level)
    shape = tuple(int(s) for s in g.data.shape)
    scale, offset, kind = _frame(ref_affine)
    alpha, beta = _index_map(ref_affine, g.affine, what)
    u = np.linalg.solve(g.affine[:3, :3], point - g.affine[:3, 3])  # continuous voxel index at this level
    if np.any(u < -0.5 - 1e-6) or np.any(u > np.asarray(shape) - 0.5 + 1e-6):
        raise HelmError(
            f"point_mm {np.round(point, 3).tolist()} is outside the {what} (voxel index "
            f"{np.round(u, 2).tolist()} at level {g.level}, shape {list(shape)})",
            hint="choose a point inside the field of view (default: its centre)",
        )
    idx = np.clip(np.floor(u + 0.5).astype(int), 0, np.asarray(shape) - 1)
    lo, hi = np.zeros(3, int), np.asarray(shape)
    if radius_mm is not None:
        # Voxels whose centres lie within +- radius_mm of the point along each axis (at least the point's voxel).
        h = float(radius_mm) / spacing_of(g.affine)
        lo = np.minimum(np.clip(np.ceil(u - h - 1e-9).astype(int), 0, shape), idx)
        hi = np.maximum(np.clip(np.floor(u + h + 1e-9).astype(int) + 1, 0, shape), idx + 1)

    def mm(d: int, i):
        return scale[d] * (alpha[d] * np.asarray(i, dtype=np.float64) + beta[d]) + offset[d]

    lazy = {}
    for fixed, d in zip(DIMS, range(3)):
        sl = [slice(int(lo[k]), int(hi[k])) for k in range(3)]
        sl[d] = int(idx[d])
        lazy[fixed] = g.data[tuple(sl)]
    arrays = dask.compute(*lazy.values()) if compute else tuple(lazy.values())
    planes = {}
    for (fixed, arr), d in zip(zip(DIMS, arrays), range(3)):
        a, b = [DIMS.index(n) for n in IN_PLANE[fixed]]
        ext = (
            float(mm(a, lo[a] - 0.5)),
            float(mm(a, hi[a] - 0.5)),
            float(mm(b, lo[b] - 0.5)),
            float(mm(b, hi[b] - 0.5)),
        )
        planes[fixed] = Plane(
            fixed,
            IN_PLANE[fixed],
            arr,
            ext,
            int(idx[d]),
            float(mm(d, idx[d])),
            (mm(a, np.arange(lo[a], hi[a])), mm(b, np.arange(lo[b], hi[b]))),
        )
    return OrthoSlices(
        planes,
        g.level,
        g.source,
        g.affine.copy(),
        shape,
        tuple(int(i) for i in idx),
        point,
        kind,
        orientation_code(g.affine),
    )


def orthogonal_slices(
    vol: xr.DataArray,
    *,
    point_mm: Sequence[float] | None = None,
    level: int | None = None,
    max_px: int = DEFAULT_MAX_PX,
    radius_mm: float | None = None,
    compute: bool = True,
) -> OrthoSlices:
    """Three orthogonal planes of a volume through a world point, at a pyramid level, with mm extents.

    Bounded: only the three planes are read (at ``level``), never the volume. Computed eagerly (three small
    arrays) unless ``compute=False``, which returns the planes as dask arrays (to inspect what they would cost).

    Parameters
    ----------
    vol : volume
        3-D helm-dask volume (from a store, lazy or in memory).
    point_mm : 3 floats, optional
        World (RAS+, mm) point the planes go through (the voxel centre nearest to it at the level shown);
        default the centre of the field of view. :class:`HelmError` if it is outside the volume.
    level : int, optional
        Pyramid level (0 = full resolution, ``2**level`` times coarser each). Default: the finest level whose
        planes have at most ``max_px`` pixels per side (the store's pyramid if ``vol`` came from
        :func:`helm_dask.io.open_volume`, else a stride of the data).
    radius_mm : float, optional
        Crop each plane to +- ``radius_mm`` around the point (a close-up; the auto level then fits the crop, so
        a small region is shown at full resolution).

    Returns
    -------
    OrthoSlices
        ``slices["x"]``, ``["y"]``, ``["z"]``: :class:`Plane` (2-D ``data``, ``axes``, ``extent_mm``,
        ``index``, ``position_mm``), plus ``level``, ``source``, ``affine`` / ``shape`` of the level read,
        ``index`` (the point's voxel at that level), ``coords`` (``"world"`` or ``"voxel_mm"``) and
        ``axis_codes`` (orientation letters of the voxel axes).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> vol = make_volume(da.zeros((512, 64, 64), chunks=64), np.eye(4))
    >>> s = orthogonal_slices(vol, max_px=256)
    >>> s.level, s["z"].data.shape, s["z"].extent_mm
    (1, (256, 32), (-1.0, 511.0, -1.0, 63.0))
    """
    return _slices(
        vol,
        point_mm=point_mm,
        level=level,
        max_px=max_px,
        radius_mm=radius_mm,
        ref_affine=affine_of(_check_volume(vol)),
        compute=compute,
    )


# ------------------------------------------------------------------------------------------------------------
# Colours


def _fallback_colour(code: int) -> tuple[float, float, float]:
    """A fixed colour for a code no table knows (same code -> same colour, everywhere)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return tuple(float(c) for c in cmap(zlib.crc32(str(int(code)).encode()) % 20)[:3])


def _as_table(table: Any):
    from .labels import LabelTable, load_label_table

    if isinstance(table, LabelTable):
        return table
    return load_label_table(os.fspath(table) if isinstance(table, os.PathLike) else table)


def label_colormap(
    codes: Any = None, *, table: Any = "freesurfer", background_alpha: float = 0.0, n_clusters: int | None = None
):
    """A matplotlib colormap and norm that give each label code its colour from a label table (LUT).

    Parameters
    ----------
    codes : iterable of int, LabelTable, path or "freesurfer"
        The codes to colour; a table (or ``None``) means every code of ``table``.
    table : LabelTable, "freesurfer" or path of a FreeSurfer ColorLUT / JSON / TSV table
        Where colours come from (e.g. the ``lut.txt`` written next to the label maps). A code missing from it
        gets: for k-means clusters 1..99 the package's grey ramp (:func:`helm_dask.labels.cluster_colour`,
        ``n_clusters`` = the largest such code), otherwise a fixed colour derived from the code.
    background_alpha : float
        Opacity of code 0 (0 = transparent, so an overlay shows the image under it).

    Returns
    -------
    (matplotlib.colors.ListedColormap, matplotlib.colors.BoundaryNorm)
        Use as ``ax.imshow(labels, cmap=cmap, norm=norm, interpolation="nearest")``; ``cmap.codes`` lists the
        codes in colour order. Colours are the table's RGB / 255, opaque (FreeSurfer's "A" column is 0 for
        opaque entries).

    Example
    -------
    >>> cmap, norm = label_colormap([0, 801, 250])
    >>> [round(float(v), 3) for v in cmap(norm(801))]
    [0.98, 1.0, 0.196, 1.0]
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from .labels import LabelTable, cluster_colour

    if codes is None or isinstance(codes, (LabelTable, str, os.PathLike)):
        table = _as_table(table if codes is None else codes)
        codes = list(table.entries)
    else:
        table = _as_table(table)
    try:
        arr = np.asarray(list(codes) if not isinstance(codes, np.ndarray) else codes).ravel()
        if arr.size and not np.all(np.isfinite(arr.astype(np.float64))) or np.any(arr != np.round(arr)):
            raise ValueError
        codes = sorted({int(c) for c in arr.tolist()})
    except (TypeError, ValueError):
        raise HelmError("label codes must be integers", hint="pass the codes present in a label map") from None
    if not codes:
        codes = [0]
    clusters = [c for c in codes if 1 <= c <= 99 and c not in table.entries and table.out_code(c) not in table.entries]
    n = int(n_clusters) if n_clusters is not None else max(clusters, default=2)
    colours = []
    for c in codes:
        entry = table.entries.get(c) or table.entries.get(table.out_code(c))
        if entry is not None:
            rgb = tuple(v / 255.0 for v in entry[1][:3])
        elif c in clusters:
            rgb = tuple(v / 255.0 for v in cluster_colour(c, n)[:3])
        else:
            rgb = _fallback_colour(c)
        colours.append((*rgb, float(background_alpha) if c == 0 else 1.0))
    cmap = ListedColormap(colours, name="helm-labels")
    cmap.codes = list(codes)
    bounds = [codes[0] - 0.5] + [(a + b) / 2.0 for a, b in zip(codes[:-1], codes[1:])] + [codes[-1] + 0.5]
    return cmap, BoundaryNorm(bounds, ncolors=len(codes))


# ------------------------------------------------------------------------------------------------------------
# Plotting


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _plane_line(ax, plane: Plane, fixed_d: int, ref_affine: np.ndarray, point, normal, **kw) -> None:
    """Draw the intersection of the world plane ``normal . p = normal . point`` with a displayed plane."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    c = float(n @ np.asarray(point, dtype=np.float64))
    scale, offset, _ = _frame(ref_affine)
    a3, t = ref_affine[:3, :3], ref_affine[:3, 3]
    h = (a3.T @ n) / scale  # n . p = sum_d h_d (mm_d - offset_d) + n . t
    r = c - n @ t + float(h @ offset)  # -> sum_d h_d mm_d = r
    ia, ib = [DIMS.index(d) for d in plane.axes]
    r = r - h[fixed_d] * plane.position_mm
    ea, eb = plane.extent_mm[:2], plane.extent_mm[2:]
    if abs(h[ib]) >= abs(h[ia]):
        xa = np.array(ea)
        xb = (r - h[ia] * xa) / h[ib]
    elif abs(h[ia]) > 0:
        xb = np.array(eb)
        xa = (r - h[ib] * xb) / h[ia]
    else:
        return
    ax.plot(xa, xb, **kw)
    ax.set_xlim(*ea)
    ax.set_ylim(*eb)


def _robust_limits(arrays) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def plot_orthogonal(
    vol: xr.DataArray,
    *,
    overlay: xr.DataArray | None = None,
    contour: Any = None,
    point_mm: Sequence[float] | None = None,
    level: int | None = None,
    max_px: int = DEFAULT_MAX_PX,
    radius_mm: float | None = None,
    ax: Any = None,
    lut: Any = "freesurfer",
    title: str | None = None,
    planes: Any = None,
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    overlay_alpha: float = 0.5,
    overlay_cmap: str = "magma",
    contour_colors: Any = None,
    contour_labels: Sequence[str] | None = None,
    plane_colors: Any = None,
    plane_labels: Sequence[str] | None = None,
    crosshair: bool = True,
    colorbar: bool = True,
):
    """Three orthogonal slices of a volume with optional label/image overlay, mask outlines and world planes.

    Bounded like :func:`orthogonal_slices` (three planes per layer are read, at the level chosen for ``vol``;
    each overlay/outline is cut at the same world point, on its own grid, which must be parallel to ``vol``'s).

    Parameters
    ----------
    vol : volume
        The base layer: grey levels for an image (``vmin``/``vmax`` default to the 0.5/99.5 percentiles of the
        planes shown), the LUT colours for ``kind="labels"``.
    overlay : volume, optional
        Drawn on top with ``overlay_alpha``: labels in their ``lut`` colours (0 transparent), an image (e.g. a
        bias field) with ``overlay_cmap`` and a colour bar.
    contour : volume or list of volumes, optional
        Outlines of ``> 0`` (masks, label maps), in ``contour_colors``; ``contour_labels`` names them in a legend.
    planes : list of (point_mm, normal), optional
        World planes (e.g. a mirror plane) drawn as dashed lines where they cut each slice, in
        ``plane_colors``; ``plane_labels`` names them in the legend.
    ax : three matplotlib Axes, optional
        Where to draw (default: a new 1 x 3 figure with ``title`` above; with ``ax`` -- a row of a bigger
        figure -- the title goes above the middle panel).
    lut : label table for label colours (see :func:`label_colormap`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    vol = _check_volume(vol)
    base = orthogonal_slices(vol, point_mm=point_mm, level=level, max_px=max_px, radius_mm=radius_mm)
    ref = affine_of(vol)
    if ax is None:
        fig = Figure(figsize=(13, 4.4), layout="constrained")
        axes = list(fig.subplots(1, 3))
    else:
        axes = list(np.ravel(ax))
        if len(axes) != 3:
            raise HelmError(f"ax must be three matplotlib Axes, got {len(axes)}")
        fig = axes[0].figure

    # Overlays are cut at the base's point and at the level of the same voxel size as the base planes.
    def cut(v, what):
        v = _check_volume(v, what)
        # The level whose voxels are closest to the base planes' (the same level number on the same grid).
        _, _, aff0 = _full_res(v)
        ratio = float(np.median(spacing_of(base.affine) / spacing_of(aff0)))
        lev = max(0, int(round(math.log2(ratio)))) if ratio > 0 else 0
        return _slices(
            v,
            point_mm=base.point_mm,
            level=lev,
            max_px=max_px,
            radius_mm=radius_mm,
            ref_affine=ref,
            compute=True,
            what=what,
        )

    ov = cut(overlay, "overlay") if overlay is not None else None
    contours = [cut(c, "contour") for c in _as_list(contour)]
    ccolors = _as_list(contour_colors) or ["#00e5ff", "#ff3d00", "#76ff03", "#ffea00", "#d500f9"]
    pcolors = _as_list(plane_colors) or ["#ffea00", "#ff3d00", "#00e5ff"]
    kind = vol.attrs.get("kind", "image")
    if kind == "labels":
        codes = np.unique(np.concatenate([np.unique(np.asarray(p.data)) for p in base.planes.values()]))
        bcmap, bnorm = label_colormap(codes, table=lut, background_alpha=1.0)
        base_kw = {"cmap": bcmap, "norm": bnorm, "interpolation": "nearest"}
    else:
        lo, hi = _robust_limits(p.data for p in base.planes.values())
        base_kw = {
            "cmap": cmap,
            "vmin": lo if vmin is None else vmin,
            "vmax": hi if vmax is None else vmax,
            "interpolation": "nearest",
        }
    ov_kw, ov_img = {}, None
    if ov is not None:
        if overlay.attrs.get("kind", "image") in ("labels", "mask"):
            codes = np.unique(np.concatenate([np.unique(np.asarray(p.data)) for p in ov.planes.values()]))
            ocmap, onorm = label_colormap(codes, table=lut)
            ov_kw = {"cmap": ocmap, "norm": onorm, "interpolation": "nearest", "alpha": overlay_alpha}
        else:
            lo, hi = _robust_limits(p.data for p in ov.planes.values())
            ov_kw = {"cmap": overlay_cmap, "vmin": lo, "vmax": hi, "interpolation": "nearest", "alpha": overlay_alpha}

    letters = base.axis_codes
    unit = "mm" if base.coords == "world" else "mm along axis"
    for a, fixed in zip(axes, DIMS):
        p = base[fixed]
        d = DIMS.index(fixed)
        a.imshow(np.asarray(p.data).T, origin="lower", extent=p.extent_mm, aspect="equal", **base_kw)
        if ov is not None:
            q = ov[fixed]
            im = a.imshow(np.asarray(q.data).T, origin="lower", extent=q.extent_mm, aspect="equal", **ov_kw)
            ov_img = im
        for c, color in zip(contours, ccolors * (len(contours) // len(ccolors) + 1)):
            q = c[fixed]
            m = (np.asarray(q.data) > 0).astype(np.float32)
            if m.shape[0] >= 2 and m.shape[1] >= 2 and 0 < m.sum() < m.size:
                xs, ys = q.coords_mm
                a.contour(xs, ys, m.T, levels=[0.5], colors=[color], linewidths=1.0)
        for (pt, nrm), color in zip(_as_list(planes), pcolors * (len(_as_list(planes)) // len(pcolors) + 1)):
            _plane_line(a, p, d, ref, pt, nrm, color=color, linewidth=1.2, linestyle="--")
        if crosshair:
            other = [DIMS.index(n) for n in p.axes]
            sc, off, _ = _frame(ref)
            u_ref = np.linalg.solve(ref[:3, :3], base.point_mm - ref[:3, 3])
            pa, pb = (sc[k] * u_ref[k] + off[k] for k in other)
            a.axvline(pa, color="w", lw=0.5, alpha=0.4)
            a.axhline(pb, color="w", lw=0.5, alpha=0.4)
        a.set_xlim(*p.extent_mm[:2])
        a.set_ylim(*p.extent_mm[2:])
        ia, ib = [DIMS.index(n) for n in p.axes]
        a.set_xlabel(f"{p.axes[0]} -> {letters[ia]} ({unit})")
        a.set_ylabel(f"{p.axes[1]} -> {letters[ib]} ({unit})")
        a.set_title(f"{fixed} = {p.position_mm:.1f} mm", fontsize=10)
    if ov_img is not None and ov_kw.get("cmap") == overlay_cmap and colorbar:
        fig.colorbar(ov_img, ax=axes, shrink=0.8, label=str(overlay.name or "overlay"))
    handles = [Line2D([], [], color=col, label=lab) for lab, col in zip(_as_list(contour_labels), ccolors)]
    handles += [
        Line2D([], [], color=col, linestyle="--", label=lab) for lab, col in zip(_as_list(plane_labels), pcolors)
    ]
    if handles:
        axes[-1].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.6)
    sp = spacing_of(base.affine)
    head = title if title is not None else str(vol.name or "volume")
    head = f"{head}   [level {base.level}: {base.source}, {sp.min():.3g} mm voxels, axes {letters}]"
    if ax is None:
        fig.suptitle(head, fontsize=11)
    else:  # a row of a bigger figure: the row's title goes above its middle panel
        axes[1].set_title(f"{head}\n{axes[1].get_title()}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------------------
# Histogram


_HIST_PIECE = 1 << 20  # voxels per piece inside a chunk: bounds the int64 bin-index temporaries (8 MB)


def _block_histogram(x: np.ndarray, m: np.ndarray | None = None, *, edges: np.ndarray) -> np.ndarray:
    """Counts of one chunk with numpy.histogram's bins (searchsorted on the edges: no sort of the data)."""
    nb = edges.size - 1
    out = np.zeros(nb, dtype=np.int64)
    flat = x.reshape(-1)
    keep = None if m is None else m.reshape(-1)
    for start in range(0, flat.size, _HIST_PIECE):
        v = flat[start : start + _HIST_PIECE]
        if keep is not None:
            v = v[keep[start : start + _HIST_PIECE]]
        idx = np.searchsorted(edges, v, side="right") - 1
        idx[v == edges[-1]] = nb - 1  # the last bin is closed on the right
        idx = idx[(idx >= 0) & (idx < nb)]  # below, above or NaN: not counted
        out += np.bincount(idx, minlength=nb)
    return out.reshape(1, 1, 1, nb)


def histogram(
    vol: xr.DataArray,
    mask: xr.DataArray | None = None,
    *,
    bins: Any = 256,
    range: tuple[float, float] | None = None,
    level: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity histogram of a volume (inside ``mask`` if given), computed by dask at a coarse level.

    Parameters
    ----------
    vol : volume
        Image volume.
    mask : volume, optional
        Voxels with ``mask > 0`` are counted. Read at the same level (a store's mask pyramid is a stride, an
        image's a block mean: at a coarse level the mask is the block's corner voxel -- fine for a histogram).
    bins : int or 1-D array of edges
    range : (lo, hi), optional
        Default: min and max of the (masked) values at that level (one extra pass over that level).
    level : int, optional
        Default: the finest level with at most ``max_voxels`` voxels (``level=0``: the exact full-resolution
        histogram, streamed chunk by chunk -- memory bounded by the chunks, time by the volume).

    Returns
    -------
    (counts, edges)
        int64 counts and float64 edges, exactly ``numpy.histogram(values, bins=edges)`` (the last bin includes
        its right edge; values outside ``range`` and NaN are not counted). Computed eagerly as one integer
        histogram per chunk (memory: a chunk and its bin indices), summed; only the counts come back.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> vol = make_volume(da.arange(8.0).reshape(2, 2, 2), np.eye(4))
    >>> histogram(vol, bins=4)[0].tolist()
    [2, 2, 2, 2]
    """
    vol = _check_volume(vol)
    if level is None:
        level = choose_level(vol, max_px=None, max_voxels=max_voxels)
    x = _grid(vol, level).data
    m = None
    if mask is not None:
        m = _grid(_check_volume(mask, "mask"), level).data
        if m.shape != x.shape:
            diff = np.abs(np.subtract(m.shape, x.shape))
            if diff.max() > 1:
                raise HelmError(
                    f"the mask (shape {list(m.shape)} at level {level}) is not on the volume's grid "
                    f"(shape {list(x.shape)})",
                    hint="pass a mask made on the same grid as the volume",
                )
            # A store level is floor(n / 2), a stride ceil(n / 2): the same grid, one voxel apart at the far end.
            common = tuple(min(a, b) for a, b in zip(m.shape, x.shape))
            x, m = x[tuple(slice(0, c) for c in common)], m[tuple(slice(0, c) for c in common)]
        m = (m > 0).rechunk(x.chunks)
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        if bins < 1:
            raise HelmError(f"bins must be a positive integer or an array of edges, got {bins!r}")
        if range is None:
            xf = x if x.dtype.kind == "f" else x.astype(np.float64)
            if m is not None:
                xf = da.where(m, xf, np.nan)
            lo, hi, n = dask.compute(da.nanmin(xf), da.nanmax(xf), m.sum() if m is not None else da.asarray(1))
            if int(n) == 0:
                raise HelmError(
                    "the mask is empty: no voxel to make a histogram of", hint="check the mask (or pass mask=None)"
                )
            lo, hi = float(lo), float(hi)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise HelmError("the volume holds no finite value at this level; pass range=(lo, hi)")
            range = (lo, hi if hi > lo else lo + 1.0)
        edges = np.linspace(float(range[0]), float(range[1]), int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise HelmError("bins must be a positive integer or an increasing 1-D array of edges")
    nb = edges.size - 1
    args = (x,) if m is None else (x, m)
    # One integer histogram per chunk (exact, so the sum does not depend on the chunking or the order), then a
    # tree sum of those small arrays.
    per_chunk = da.map_blocks(
        _block_histogram,
        *args,
        edges=edges,
        new_axis=3,
        dtype=np.int64,
        chunks=tuple((1,) * len(c) for c in x.chunks) + ((nb,),),
    )
    counts = per_chunk.sum(axis=(0, 1, 2), dtype=np.int64).compute()
    return np.asarray(counts, dtype=np.int64), edges


# ------------------------------------------------------------------------------------------------------------
# Interactive browsing


def slice_browser(
    vol: xr.DataArray,
    *,
    overlay: xr.DataArray | None = None,
    contour: Any = None,
    level: int | None = None,
    max_px: int = DEFAULT_MAX_PX,
    lut: Any = "freesurfer",
):
    """An interactive slice browser (ipywidgets): pick a plane and move through it; one plane is read per move.

    Returns an ``ipywidgets.VBox`` (display it in Jupyter: a plane menu, an index slider and the picture) or,
    when ipywidgets is not installed, a short message saying how to get it (a string, so a notebook still runs).
    The picture is a PNG in an ``ipywidgets.Image`` (rendered here with matplotlib's Agg backend), so the browser
    needs no Output widget and works the same in JupyterLab, VS Code or a headless run; ``browser.figure`` is
    the matplotlib Figure last drawn.
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        return (
            "slice_browser needs ipywidgets (pip install ipywidgets); use plot_orthogonal(vol, point_mm=...) meanwhile"
        )
    import io

    from matplotlib.figure import Figure

    vol = _check_volume(vol)
    first = orthogonal_slices(vol, level=level, max_px=max_px, compute=False)
    lev, shape, aff = first.level, first.shape, first.affine
    letters = first.axis_codes
    dim_w = widgets.Dropdown(
        options=[(f"{d} (-> {letters[i]})", d) for i, d in enumerate(DIMS)], value="z", description="plane"
    )
    idx_w = widgets.IntSlider(
        value=shape[2] // 2, min=0, max=shape[2] - 1, description="index", continuous_update=False
    )
    image = widgets.Image(format="png")
    box = widgets.VBox([widgets.HBox([dim_w, idx_w]), image])

    def draw(plane: str, index: int) -> Figure:
        d = DIMS.index(plane)
        ijk = np.asarray(shape, dtype=np.float64) / 2.0 - 0.5
        ijk[d] = index
        point = aff[:3, :3] @ ijk + aff[:3, 3]
        fig = Figure(figsize=(6.5, 5), layout="constrained")
        ax = fig.subplots(1, 1)
        # One plane per move: the three planes are built lazily and only the wanted one is computed.
        p = _slices(
            vol, point_mm=point, level=lev, max_px=max_px, radius_mm=None, ref_affine=affine_of(vol), compute=False
        )[plane]
        p.data = np.asarray(p.data.compute())
        if vol.attrs.get("kind") == "labels":
            cm, nm = label_colormap(np.unique(p.data), table=lut, background_alpha=1.0)
            ax.imshow(p.data.T, origin="lower", extent=p.extent_mm, cmap=cm, norm=nm, interpolation="nearest")
        else:
            lo, hi = _robust_limits([p.data])
            ax.imshow(
                p.data.T, origin="lower", extent=p.extent_mm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest"
            )
        for layer, color in ((overlay, None), *[(c, "#00e5ff") for c in _as_list(contour)]):
            if layer is None:
                continue
            q = _slices(
                layer,
                point_mm=point,
                level=lev,
                max_px=max_px,
                radius_mm=None,
                ref_affine=affine_of(vol),
                compute=False,
            )[plane]
            qd = np.asarray(q.data.compute())
            if color is None:
                cm, nm = label_colormap(np.unique(qd), table=lut)
                ax.imshow(
                    qd.T, origin="lower", extent=q.extent_mm, cmap=cm, norm=nm, alpha=0.5, interpolation="nearest"
                )
            elif qd.shape[0] >= 2 and qd.shape[1] >= 2 and 0 < (qd > 0).sum() < qd.size:
                ax.contour(*q.coords_mm, (qd > 0).T.astype(np.float32), levels=[0.5], colors=[color])
        ax.set_title(f"{plane} = {p.position_mm:.1f} mm (index {index} at level {lev})")
        ax.set_xlabel(f"{p.axes[0]} (mm)")
        ax.set_ylabel(f"{p.axes[1]} (mm)")
        return fig

    def render(_change=None):
        fig = draw(dim_w.value, int(idx_w.value))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        image.value = buf.getvalue()
        box.figure = fig

    def on_dim(change):
        n = shape[DIMS.index(change["new"])]
        with idx_w.hold_trait_notifications():
            idx_w.max = n - 1
            idx_w.value = min(idx_w.value, n - 1)
        render()

    dim_w.observe(on_dim, names="value")
    idx_w.observe(render, names="value")
    render()
    return box
