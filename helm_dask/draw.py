"""The drawing code shared by the notebooks' :mod:`helm_dask.view` and the QC page of :mod:`helm_dask.qc`: the
pyramid level to read (:func:`choose_level`, for a volume or a store path), three orthogonal planes cut through a
world point with their mm extents (:func:`cut_slices`, in the display :class:`Frame` of a reference grid), label
and k-means cluster colours (:func:`label_colormap`, :func:`cluster_rgb`, :func:`label_legend`), grey windows
(:func:`robust_limits`), figure layout (:func:`figure_rows`, :func:`add_legend`) and PNG export
(:func:`png_bytes`). Everything here reads single planes or metadata, never a whole volume; the conventions are
described in ``docs/method/qc.md``.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .io.regions import stored_source_of
from .io.store import level_path, open_volume, read_meta
from .labels import RIGHT_OFFSET, SHORT_NAMES, SIDE_CODES, LabelTable, cluster_colour, load_label_table
from .volume import DIMS, affine_of, is_axis_aligned, orientation_code, spacing_of

__all__ = [
    "CLUSTER_STYLES",
    "DEFAULT_MAX_PX",
    "DIMS",
    "Frame",
    "OrthoSlices",
    "Plane",
    "add_legend",
    "choose_level",
    "cluster_rgb",
    "cut_slices",
    "figure_rows",
    "label_colormap",
    "label_legend",
    "png_bytes",
    "robust_limits",
]

#: The in-plane axes of the plane that fixes each dim (rows, columns of ``Plane.data``).
IN_PLANE = {"x": ("y", "z"), "y": ("x", "z"), "z": ("x", "y")}
DEFAULT_MAX_PX = 512
#: Resolution of saved pictures (PNG): a 13-inch-wide figure is 1300 pixels.
DPI = 100
#: Default colours of mask outlines (the first is the brain mask's everywhere) and of world planes.
CONTOUR_COLOURS = ("#00e5ff", "#ff3d00", "#76ff03", "#ffea00", "#d500f9")
PLANE_COLOURS = ("#ffea00", "#ff3d00", "#00e5ff")
#: The mirror plane x = 0 of the whole-brain map.
MIRROR_COLOUR = "#ff2bd6"
#: How k-means cluster codes are coloured in a label layer: the LUT's grey ramp (as in ``lut.txt``), a viridis
#: ramp (distinct colours, dark = low intensity) or not at all (transparent: only the table's labels show).
CLUSTER_STYLES = ("grey", "viridis", "none")
_GRID_TOL = 1e-6


# ------------------------------------------------------------------------------------------------------------
# Pyramid levels


@dataclass
class Grid:
    """One level of a volume: lazy 3-D data, its exact affine and where it came from."""

    data: da.Array
    affine: np.ndarray
    level: int
    source: str


def check_volume(vol: Any, what: str = "volume") -> xr.DataArray:
    """``vol`` itself if it is a 3-D helm-dask volume, else a :class:`HelmError` saying what to pass.

    Parameters
    ----------
    vol : object
        What the caller was given.
    what : str
        Its name in the error message.

    Returns
    -------
    xarray.DataArray
    """
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


def store_info(vol: xr.DataArray) -> dict | None:
    """The store behind ``vol`` if ``vol`` is exactly one of its levels (same grid, same dask data), else None.

    The data's stored source (:func:`helm_dask.io.regions.stored_source_of`) says which store and level, and
    only while the values are the stored ones, untransposed and unflipped: a reoriented, resampled or masked
    volume is never shown with its source's pyramid.

    Parameters
    ----------
    vol : xarray.DataArray
        A volume.

    Returns
    -------
    dict or None
        ``store``, ``level``, ``nlevels`` and every level's ``shapes`` and ``affines``.
    """
    src = stored_source_of(vol)
    if src is None or not src.untouched:
        return None
    store, level = src.store, src.level
    try:
        import zarr

        meta = read_meta(store)
        if meta.get("four_d"):
            return None
        nlevels = int(meta.get("nlevels", 1))
        level = int(level)
        affines = [np.asarray(a, dtype=np.float64) for a in meta["level_affines"]]
        group = zarr.open_group(store, mode="r")
        version = int(meta.get("format_version", 1))
        shapes = [tuple(group[level_path(lev, version)].shape) for lev in range(nlevels)]  # type: ignore[union-attr]
    except Exception:  # a missing / moved / foreign store: fall back to striding the data we have
        return None
    if not 0 <= level < nlevels or shapes[level] != tuple(vol.shape):
        return None
    if not np.allclose(affines[level], affine_of(vol), atol=_GRID_TOL, rtol=0):
        return None
    if vol.attrs.get("kind") != meta.get("kind", "image"):
        return None
    return {"store": store, "level": level, "nlevels": nlevels, "shapes": shapes, "affines": affines}


def full_res(vol: xr.DataArray) -> tuple[dict | None, tuple[int, ...], np.ndarray]:
    """(store info, full-resolution shape, full-resolution affine) of a volume.

    Parameters
    ----------
    vol : xarray.DataArray
        A volume (a store level, or any lazy volume).

    Returns
    -------
    tuple
        :func:`store_info` (or None), the level-0 shape and affine (the volume's own when it is not a store level).
    """
    info = store_info(vol)
    if info is not None:
        return info, info["shapes"][0], info["affines"][0]
    return None, tuple(vol.shape), affine_of(vol)


def stride_affine(affine: np.ndarray, f: int) -> np.ndarray:
    """The affine of the stride ``[::f, ::f, ::f]`` of a grid (same first voxel centre, ``f`` times the step).

    Parameters
    ----------
    affine : array_like
        4x4 voxel-to-world affine.
    f : int
        The stride.

    Returns
    -------
    numpy.ndarray
    """
    return np.asarray(affine, dtype=np.float64) @ np.diag([f, f, f, 1.0])


def level_shape(vol: xr.DataArray, level: int) -> tuple[int, ...]:
    """Shape of ``vol`` at pyramid ``level``: the store's level, or a stride beyond its coarsest (no data read).

    Parameters
    ----------
    vol : xarray.DataArray
        A volume.
    level : int
        The pyramid level (0: full resolution).

    Returns
    -------
    tuple of int
    """
    info, shape0, _ = full_res(vol)
    if info is not None:
        top = min(level, info["nlevels"] - 1)
        f = 2 ** (level - top)
        return tuple(-(-n // f) for n in info["shapes"][top])
    f = 2**level
    return tuple(-(-n // f) for n in shape0)


def grid_at(vol: xr.DataArray, level: int) -> Grid:
    """The lazy data and exact affine of ``vol`` at ``level`` (a store level, else a ``2**level`` stride).

    Parameters
    ----------
    vol : xarray.DataArray
        A volume.
    level : int
        The pyramid level (0: full resolution).

    Returns
    -------
    Grid
        The lazy data and its affine.
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise HelmError(f"level must be a non-negative integer, got {level!r}", hint="e.g. level=0 (full resolution)")
    level = int(level)
    info = store_info(vol)
    if info is not None:
        top = min(level, info["nlevels"] - 1)
        if top == info["level"]:
            data, aff = vol.data, affine_of(vol)
        else:
            v = open_volume(info["store"], level=top)
            data, aff = v.data, affine_of(v)
        f = 2 ** (level - top)
        src = f"store level {top}" + (f", stride {f}" if f > 1 else "")
        if f > 1:
            data, aff = data[::f, ::f, ::f], stride_affine(aff, f)
        return Grid(data, aff, level, src)
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    f = 2**level
    if f > 1:
        return Grid(data[::f, ::f, ::f], stride_affine(affine_of(vol), f), level, f"stride {f}")
    return Grid(data, affine_of(vol), 0, "full resolution")


def _stored_shapes(path: str | os.PathLike) -> Iterator[tuple[int, ...]]:
    """The spatial shape of each level of a store, finest first (metadata only; a 4-D store's echoes dropped)."""
    for lev in range(int(read_meta(path).get("nlevels", 1))):
        yield tuple(open_volume(path, level=lev).shape[:3])


def choose_level(
    vol: xr.DataArray | str | os.PathLike,
    max_px: int | None = DEFAULT_MAX_PX,
    *,
    max_voxels: int | None = None,
    box: Sequence[int] | None = None,
) -> int:
    """The finest pyramid level whose shape (or ``box`` of full-resolution voxels) fits ``max_px`` and ``max_voxels``.

    Cheap: reads metadata only.

    Parameters
    ----------
    vol : volume, or the path of a volume store
        A volume may be shown at any level (beyond its store's coarsest level, or for a volume that is not read
        from a store, level ``L`` is a ``2**L`` stride). For a *path* only the store's own levels count, so the
        answer can be passed to ``open_volume(path, level=...)``: the coarsest one when none fits.
    max_px : int, optional
        Largest number of voxels along any axis (``None``: no limit).
    max_voxels : int, optional
        Largest number of voxels in all.
    box : 3 ints, optional
        Fit a crop of this many full-resolution voxels per axis instead of the whole grid.

    Returns
    -------
    int
        The level (0 = full resolution).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> choose_level(make_volume(da.zeros((1000, 300, 200)), np.eye(4)), 256)
    2
    """
    if isinstance(vol, (str, os.PathLike)):
        shapes: Iterable[tuple[int, ...]] = _stored_shapes(vol)
        last = None
    else:
        volume = check_volume(vol)
        shapes = (level_shape(volume, lev) for lev in range(64))
        last = 63  # 2**63 voxels
    lev = 0
    for lev, shape in enumerate(shapes):
        if box is not None:  # a crop: its size at this level (+1: the box may straddle a voxel boundary)
            shape = tuple(min(s, -(-int(b) // 2**lev) + 1) for s, b in zip(shape, box))
        fits = (max_px is None or max(shape) <= max_px) and (max_voxels is None or int(np.prod(shape)) <= max_voxels)
        if fits or max(shape) <= 1:
            return lev
    return lev if last is None else last


# ------------------------------------------------------------------------------------------------------------
# Display frames and planes


class Frame:
    """Display coordinates (mm) along the voxel axes of a reference grid.

    World mm (``kind == "world"``) if the grid is axis-aligned, else mm from the first voxel centre along each
    voxel axis (``"voxel_mm"``: an oblique grid is drawn as voxel planes, which keeps every voxel intact).
    Layers on parallel grids (other pyramid levels, the half-voxel shift of block-mean levels) are placed through
    their exact affines.

    Example
    -------
    >>> f = Frame(np.diag([2.0, 1.0, 1.0, 1.0]))
    >>> f.kind, f.of_world([4.0, 1.0, 0.0]).tolist(), f.obliquity_deg()
    ('world', [4.0, 1.0, 0.0], 0.0)
    """

    def __init__(self, ref_affine: Any):
        self.ref = np.asarray(ref_affine, dtype=np.float64)
        self.aligned = is_axis_aligned(self.ref)
        self.kind = "world" if self.aligned else "voxel_mm"
        if self.aligned:
            self.scale, self.offset = np.diag(self.ref)[:3].copy(), self.ref[:3, 3].copy()
        else:
            self.scale, self.offset = spacing_of(self.ref), np.zeros(3)

    def of_world(self, point_mm: Any) -> np.ndarray:
        """Display coordinates of a world point."""
        u = np.linalg.solve(self.ref[:3, :3], np.asarray(point_mm, dtype=np.float64) - self.ref[:3, 3])
        return self.scale * u + self.offset

    def obliquity_deg(self) -> float:
        """Largest angle between a voxel axis and its nearest world axis."""
        cols = self.ref[:3, :3] / spacing_of(self.ref)
        return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0).min(), -1, 1))))


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
    coords_mm: tuple[np.ndarray, np.ndarray] = field(repr=False, default=None)  # type: ignore[assignment]


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


def _world_point(point_mm: Any, shape0: tuple[int, ...], aff0: np.ndarray) -> np.ndarray:
    """The requested world point (checked), or the centre of the field of view."""
    if point_mm is None:
        centre = (np.asarray(shape0, dtype=np.float64) - 1.0) / 2.0
        return aff0[:3, :3] @ centre + aff0[:3, 3]
    point = np.asarray(point_mm, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise HelmError(f"point_mm must be three finite world coordinates (mm), got {point_mm!r}")
    return point


def is_positive(value: Any) -> bool:
    """Whether ``value`` is one number (a scalar) greater than 0.

    Parameters
    ----------
    value : object

    Returns
    -------
    bool
    """
    return bool(np.isscalar(value) and float(cast(Any, value)) > 0)


def _check_radius(radius_mm: Any) -> None:
    if radius_mm is not None and not is_positive(radius_mm):
        raise HelmError(f"radius_mm must be a positive number of mm, got {radius_mm!r}")


def cut_slices(
    vol: xr.DataArray,
    *,
    point_mm: Any,
    level: int | None,
    max_px: int,
    radius_mm: float | None,
    ref_affine: np.ndarray,
    compute: bool,
    what: str = "volume",
) -> OrthoSlices:
    """Three orthogonal planes of ``vol`` through a world point, with extents in the :class:`Frame` of
    ``ref_affine`` (a parallel grid: the volume's own, or the base layer's for an overlay).

    The engine of :func:`helm_dask.view.orthogonal_slices` (see there for the parameters); ``what`` names the
    volume in error messages.

    Parameters
    ----------
    vol : xarray.DataArray
        The volume to cut.
    point_mm, level, max_px, radius_mm, compute
        As for :func:`helm_dask.view.orthogonal_slices`.
    ref_affine : numpy.ndarray
        The affine of the frame the extents are given in.
    what : str
        The volume's name in error messages.

    Returns
    -------
    OrthoSlices
    """
    vol = check_volume(vol, what)
    _, shape0, aff0 = full_res(vol)
    point = _world_point(point_mm, shape0, aff0)
    _check_radius(radius_mm)
    if level is None:
        box = None
        if radius_mm is not None:
            box = np.minimum(2 * float(radius_mm) / spacing_of(aff0) + 1, shape0).astype(int)
        level = choose_level(vol, max_px=max_px, box=None if box is None else box.tolist())
    g = grid_at(vol, level)
    shape = tuple(int(s) for s in g.data.shape)
    frame = Frame(ref_affine)
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

    def mm(d: int, i: Any) -> Any:
        return frame.scale[d] * (alpha[d] * np.asarray(i, dtype=np.float64) + beta[d]) + frame.offset[d]

    lazy = {}
    for d, fixed in enumerate(DIMS):
        sl: list[Any] = [slice(int(lo[k]), int(hi[k])) for k in range(3)]
        sl[d] = int(idx[d])
        lazy[fixed] = g.data[tuple(sl)]
    arrays = dask.compute(*lazy.values()) if compute else tuple(lazy.values())
    planes = {}
    for d, (fixed, arr) in enumerate(zip(DIMS, arrays)):
        a, b = [DIMS.index(n) for n in IN_PLANE[fixed]]
        ext = (
            float(mm(a, lo[a] - 0.5)),
            float(mm(a, hi[a] - 0.5)),
            float(mm(b, lo[b] - 0.5)),
            float(mm(b, hi[b] - 0.5)),
        )
        coords = (mm(a, np.arange(lo[a], hi[a])), mm(b, np.arange(lo[b], hi[b])))
        planes[fixed] = Plane(fixed, IN_PLANE[fixed], arr, ext, int(idx[d]), float(mm(d, idx[d])), coords)
    index = tuple(int(i) for i in idx)
    return OrthoSlices(
        planes, g.level, g.source, g.affine.copy(), shape, index, point, frame.kind, orientation_code(g.affine)
    )


# ------------------------------------------------------------------------------------------------------------
# Colours


def cluster_rgb(j: int, k: int) -> tuple[float, float, float]:
    """Colour of k-means cluster ``j`` (1..k) in the viridis ramp: dark = low intensity.

    Ordered like the intensities (a perceptual ramp) yet distinct for k up to 9; the last 10 % of viridis (pale
    yellow) is left out so that every line stays visible on a white histogram.

    Parameters
    ----------
    j : int
        The cluster (1..k, by increasing intensity).
    k : int
        The number of clusters.

    Returns
    -------
    tuple of 3 floats
        RGB in 0..1.

    Example
    -------
    >>> [round(c, 3) for c in cluster_rgb(1, 6)]
    [0.267, 0.005, 0.329]
    """
    from matplotlib import colormaps

    r, g, b, _ = colormaps["viridis"](0.9 * (j - 1) / max(k - 1, 1))
    return (float(r), float(g), float(b))


def _fallback_colour(code: int) -> tuple[float, ...]:
    """A fixed colour for a code no table knows (same code -> same colour, everywhere)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return tuple(float(c) for c in cmap(zlib.crc32(str(int(code)).encode()) % 20)[:3])


def _as_table(table: Any):
    if isinstance(table, LabelTable):
        return table
    return load_label_table(os.fspath(table) if isinstance(table, os.PathLike) else table)


def _int_codes(codes: Any) -> list[int]:
    try:
        arr = np.asarray(list(codes) if not isinstance(codes, np.ndarray) else codes).ravel()
        if arr.size and not np.all(np.isfinite(arr.astype(np.float64))) or np.any(arr != np.round(arr)):
            raise ValueError
        return sorted({int(c) for c in arr.tolist()})
    except (TypeError, ValueError):
        raise HelmError("label codes must be integers", hint="pass the codes present in a label map") from None


def label_colormap(
    codes: Any = None,
    *,
    table: Any = "freesurfer",
    background_alpha: float = 0.0,
    n_clusters: int | None = None,
    clusters: str = "grey",
):
    """A matplotlib colormap and norm that give each label code its colour from a label table (LUT).

    Parameters
    ----------
    codes : iterable of int, LabelTable, path or "freesurfer"
        The codes to colour; a table (or ``None``) means every code of ``table``.
    table : LabelTable, "freesurfer" or path of a FreeSurfer ColorLUT / JSON / TSV table
        Where colours come from (e.g. the ``lut.txt`` written next to the label maps). A code missing from it
        gets: for k-means clusters 1..99 a ramp (``clusters``; ``n_clusters`` = the largest such code unless
        given), otherwise a fixed colour derived from the code.
    background_alpha : float
        Opacity of code 0 (0 = transparent, so an overlay shows the image under it).
    n_clusters : int, optional
        The k of the map: cluster colours are spread over 1..k.
    clusters : {"grey", "viridis", "none"}
        Ramp of the clusters the table does not colour: the package's grey ramp
        (:func:`helm_dask.labels.cluster_colour`, as in ``lut.txt``), :func:`cluster_rgb` (distinct, as the QC's
        k-means figure and histogram), or transparent (only the table's labels show).

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

    if clusters not in CLUSTER_STYLES:
        raise HelmError(f"clusters must be one of {', '.join(CLUSTER_STYLES)}, got {clusters!r}")
    if codes is None or isinstance(codes, (LabelTable, str, os.PathLike)):
        table = _as_table(table if codes is None else codes)
        codes = list(table.entries)
    else:
        table = _as_table(table)
    codes = _int_codes(codes) or [0]
    in_clusters = [
        c for c in codes if 1 <= c <= 99 and c not in table.entries and table.out_code(c) not in table.entries
    ]
    n = int(n_clusters) if n_clusters is not None else max(in_clusters, default=2)
    colours = []
    for c in codes:
        entry = table.entries.get(c) or table.entries.get(table.out_code(c))
        alpha = float(background_alpha) if c == 0 else 1.0
        if entry is not None:
            rgb: tuple[float, ...] = tuple(v / 255.0 for v in entry[1][:3])
        elif c in in_clusters:
            rgb = tuple(v / 255.0 for v in cluster_colour(c, n)[:3]) if clusters == "grey" else cluster_rgb(c, n)
            alpha = 0.0 if clusters == "none" else alpha
        else:
            rgb = _fallback_colour(c)
        colours.append((*rgb, alpha))
    cmap = ListedColormap(colours, name="helm-labels")
    cmap.codes = list(codes)  # type: ignore[attr-defined]
    bounds = [codes[0] - 0.5] + [(a + b) / 2.0 for a, b in zip(codes[:-1], codes[1:])] + [codes[-1] + 0.5]
    return cmap, BoundaryNorm(bounds, ncolors=len(codes))


def label_legend(
    codes: Iterable[int],
    *,
    table: Any = "freesurfer",
    n_clusters: int | None = None,
    clusters: str = "none",
    both_sides: bool = False,
) -> list[tuple[str, tuple[float, ...]]]:
    """Legend entries ``(text, rgb)`` for label codes and k-means clusters, coloured as :func:`label_colormap` does.

    Parameters
    ----------
    codes : iterable of int
        Label codes to list (``"801 L anterior-inferior"``; codes without a display name are skipped).
    table, n_clusters, clusters :
        As for :func:`label_colormap`; ``clusters="viridis"`` lists every cluster 1..``n_clusters``,
        ``"grey"`` the darkest and the brightest, ``"none"`` none.
    both_sides : bool
        Name a left code with its right twin (``"anterior-inferior (801 L / 806 R)"``) for a whole-brain map.

    Example
    -------
    >>> [t for t, _ in label_legend([801, 250], n_clusters=4, clusters="grey")]
    ['801 L anterior-inferior', '250 fornix', 'cluster 1 (darkest)', 'cluster 4 (brightest)']
    """
    k = int(n_clusters or 0)
    named = [int(c) for c in codes if int(c) in SHORT_NAMES]
    shown = {"viridis": list(range(1, k + 1)), "grey": sorted({1, k}) if k else [], "none": []}[clusters]
    cmap, norm = label_colormap([*named, *shown], table=table, n_clusters=k or None, clusters=clusters)

    def text(c: int) -> str:
        if both_sides and c in SIDE_CODES["L"]:
            return f"{SHORT_NAMES[c][2:]} ({c} L / {c + RIGHT_OFFSET} R)"
        return f"{c} {SHORT_NAMES[c]}"

    items = [(text(c), tuple(float(v) for v in cmap(norm(c))[:3])) for c in named]
    for j in shown:
        which = " (darkest)" if j == 1 else " (brightest)" if j == k else ""
        items.append((f"cluster {j}{which}", tuple(float(v) for v in cmap(norm(j))[:3])))
    return items


def robust_limits(arrays: Iterable[Any]) -> tuple[float, float]:
    """Grey window of some planes: the 0.5th and 99.5th percentiles of their finite values.

    Parameters
    ----------
    arrays : iterable of array_like
        The planes.

    Returns
    -------
    tuple of 2 floats
        ``(vmin, vmax)`` with ``vmax > vmin``; ``(0, 1)`` when nothing is finite.

    Example
    -------
    >>> robust_limits([np.arange(1001.0)])
    (5.0, 995.0)
    """
    vals = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------------------
# Figures


def figure_rows(nrows: int, *, width: float = 13.0, row_height: float = 4.2, extra_height: float = 0.0):
    """A figure of ``nrows`` x 3 panels for :func:`helm_dask.view.plot_orthogonal` rows (``ax=axes[i]``).

    A plain matplotlib ``Figure`` with constrained layout (not registered with pyplot: safe in threads and
    without a display; a notebook shows it when it is a cell's value). ``extra_height`` (inches) makes room
    for a legend below the rows (:func:`add_legend`).

    Parameters
    ----------
    nrows : int
        Rows of three panels.
    width, row_height, extra_height : float
        Figure width, height per row, and extra height below the rows (inches).

    Returns
    -------
    (matplotlib.figure.Figure, numpy.ndarray of Axes, shape (nrows, 3))

    Example
    -------
    >>> fig, axes = figure_rows(2)
    >>> axes.shape, fig.get_size_inches().tolist()
    ((2, 3), [13.0, 8.4])
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, nrows * row_height + extra_height), layout="constrained")
    return fig, fig.subplots(nrows, 3, squeeze=False)


def add_legend(fig, items: Sequence[tuple], *, fontsize: float = 9) -> None:
    """A legend under a (constrained-layout) figure: ``(text, colour)`` patches and ``(text, colour, linestyle)``
    lines, in as many columns as fit the figure's width (a wider legend would be cut off).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    items : sequence of tuple
        ``(text, colour)`` or ``(text, colour, linestyle)``.
    fontsize : float
        Legend font size.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not items:
        return
    handles: list[Any] = []
    for item in items:
        if len(item) == 3:
            handles.append(Line2D([0], [0], color=item[1], lw=2, ls=item[2]))
        else:
            handles.append(Patch(facecolor=item[1], edgecolor="black", lw=0.5))
    ncol = max(1, min(len(items), int(fig.get_figwidth() / 2.3)))
    fig.legend(
        handles, [it[0] for it in items], loc="outside lower center", ncol=ncol, fontsize=fontsize, frameon=False
    )


def legend_height(n_items: int, width: float = 13.0) -> float:
    """Inches to add to a figure's height for :func:`add_legend` with ``n_items`` entries.

    Parameters
    ----------
    n_items : int
        Legend entries.
    width : float
        The figure's width (inches).

    Returns
    -------
    float
    """
    if not n_items:
        return 0.0
    return 0.3 * -(-n_items // max(1, int(width / 2.3))) + 0.2


def png_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    dpi : int
        Resolution.

    Returns
    -------
    bytes

    Example
    -------
    >>> fig, _ = figure_rows(1, width=3, row_height=1)
    >>> png_bytes(fig)[:4]
    b'\\x89PNG'
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
