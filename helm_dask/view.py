"""Looking at large volumes in a notebook -- and the functions the QC page draws with: orthogonal slices with label
overlays, outlines and world planes (:func:`plot_orthogonal`, on :func:`orthogonal_slices`), histograms computed
by dask (:func:`histogram`) and drawn with k-means centroids (:func:`plot_histogram`), label colours
(:func:`label_colormap`), pyramid levels (:func:`pyramid_levels`, :func:`choose_level`, :func:`at_level`),
crops (:func:`crop_mm`), label centroids (:func:`label_centroid_mm`) and an interactive :func:`slice_browser`.
Everything is bounded -- single planes read from the store's pyramid, reductions over a coarse level -- and a
full-resolution volume is never read whole; levels and coordinates are explained in ``docs/method/qc.md``.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from numpy.typing import ArrayLike

from .arrays import as_dask, index_sums
from .draw import (
    CONTOUR_COLOURS,
    DEFAULT_MAX_PX,
    DIMS,
    PLANE_COLOURS,
    Frame,
    OrthoSlices,
    Plane,
    check_volume,
    choose_level,
    cluster_rgb,
    cut_slices,
    figure_rows,
    full_res,
    grid_at,
    is_positive,
    label_colormap,
    level_shape,
    png_bytes,
    robust_limits,
    store_info,
    stride_affine,
)
from .errors import HelmError
from .io.store import open_volume
from .volume import affine_of, make_volume, provenance_record, spacing_of

__all__ = [
    "OrthoSlices",
    "Plane",
    "at_level",
    "choose_level",
    "crop_mm",
    "figure_rows",
    "histogram",
    "label_centroid_mm",
    "label_colormap",
    "orthogonal_slices",
    "plot_histogram",
    "plot_orthogonal",
    "pyramid_levels",
    "slice_browser",
]

DEFAULT_MAX_VOXELS = 1 << 24  # 16 M voxels: a histogram pass over a coarse level takes a second or two
_DERIVED_DROP = ("affine", "units", "kind", "coords", "source", "provenance", "store", "level")


# ------------------------------------------------------------------------------------------------------------
# Pyramid levels


def pyramid_levels(vol: xr.DataArray, *, extra: int = 0) -> list[dict]:
    """The levels of a volume's pyramid: shape, voxel size (mm), voxel count and how each is read (no data read).

    Parameters
    ----------
    vol : volume
        A 3-D helm-dask volume (from a store, lazy or in memory).
    extra : int
        That many strided levels beyond the stored ones (or beyond level 0 for a volume that is not read from a
        store).

    Returns
    -------
    list of dict
        Per level: ``level``, ``shape``, ``spacing_mm``, ``voxels`` and ``source`` (``"store level L"``,
        ``"stride F"``...).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> [lv["shape"] for lv in pyramid_levels(make_volume(da.zeros((8, 6, 4)), np.eye(4)), extra=1)]
    [(8, 6, 4), (4, 3, 2)]
    """
    vol = check_volume(vol)
    info, _, aff0 = full_res(vol)
    n = (info["nlevels"] if info is not None else 1) + int(extra)
    out = []
    for lev in range(n):
        if info is not None and lev < info["nlevels"]:
            shape, aff, src = info["shapes"][lev], info["affines"][lev], f"store level {lev}"
        else:
            top = info["nlevels"] - 1 if info is not None else 0
            f = 2 ** (lev - top)
            base = info["affines"][top] if info is not None else aff0
            shape, aff = level_shape(vol, lev), stride_affine(base, f)
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


def _derived(vol: xr.DataArray, data: da.Array, affine: np.ndarray, stage: str, params: dict) -> xr.DataArray:
    """A new volume of ``data`` on ``affine`` with ``vol``'s kind, name and attrs, one provenance record added
    (without ``store``/``level``: it is not a level of the source's store)."""
    attrs = {k: v for k, v in vol.attrs.items() if k not in _DERIVED_DROP}
    prov = list(vol.attrs.get("provenance", [])) + [provenance_record(stage, params)]
    return make_volume(
        data,
        affine,
        kind=vol.attrs.get("kind", "image"),
        name=None if vol.name is None else str(vol.name),
        source=vol.attrs.get("source", ""),
        provenance=prov,
        attrs=attrs,
    )


def at_level(vol: xr.DataArray, level: int) -> xr.DataArray:
    """The volume at pyramid ``level`` (lazy): the store's level if it has one, else a ``2**level`` stride.

    Parameters
    ----------
    vol : volume
        A 3-D helm-dask volume.
    level : int
        0 is the full-resolution grid (the store's level 0 for a volume opened from a store at any level).

    Returns
    -------
    xarray.DataArray
        The lazy volume at that level, with that level's exact affine.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> at_level(make_volume(da.zeros((8, 6, 4)), np.eye(4)), 1).shape
    (4, 3, 2)
    """
    vol = check_volume(vol)
    info = store_info(vol)
    if info is not None and 0 <= level < info["nlevels"]:
        return vol if level == info["level"] else open_volume(info["store"], level=int(level))
    g = grid_at(vol, level)
    if info is None and g.level == 0:
        return vol
    return _derived(vol, g.data, g.affine, "view.at_level", {"level": int(level), "read": g.source})


def crop_mm(vol: xr.DataArray, point_mm: ArrayLike, radius_mm: float) -> xr.DataArray:
    """The lazy sub-volume of the voxels whose centres lie within +- ``radius_mm`` of a world point, per axis.

    Only the chunks that overlap the box are ever computed or read, so a small region of a 2-gigavoxel (or
    lazily generated) volume can be looked at -- or processed -- at full resolution.

    Parameters
    ----------
    vol : volume
        A 3-D helm-dask volume.
    point_mm : 3 floats
        World (RAS+) point, mm.
    radius_mm : float
        Half-width of the box along each voxel axis, mm.

    Returns
    -------
    xarray.DataArray
        The crop, with its exact affine (the input's, shifted to the first voxel of the box).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume, affine_of
    >>> small = crop_mm(make_volume(da.zeros((100, 100, 100)), np.eye(4)), (50.0, 10.0, 0.0), 2.0)
    >>> small.shape, affine_of(small)[:3, 3].tolist()
    ((5, 5, 3), [48.0, 8.0, 0.0])
    """
    vol = check_volume(vol)
    aff = affine_of(vol)
    point = np.asarray(point_mm, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise HelmError(f"point_mm must be three finite world coordinates (mm), got {point_mm!r}")
    if not is_positive(radius_mm):
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
    params = {"point_mm": point.tolist(), "radius_mm": float(radius_mm), "start": lo.tolist(), "stop": hi.tolist()}
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return _derived(vol, data[box], aff @ shift, "view.crop_mm", params)


def label_centroid_mm(vol: xr.DataArray, codes: Iterable[int] | None = None) -> np.ndarray | None:
    """World centroid (RAS+ mm) of the voxels holding ``codes`` (default: every nonzero voxel); None if there is none.

    One chunked pass with exact integer index sums per chunk (the same answer for any chunking); computed eagerly,
    only four numbers per chunk come back. Handy to aim :func:`plot_orthogonal` at a structure.

    Parameters
    ----------
    vol : volume
        A label volume.
    codes : iterable of int, optional
        The labels to locate.

    Returns
    -------
    numpy.ndarray or None
        Three world coordinates (mm).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((6, 4, 4), np.uint16); lab[2:4, 1, 3] = 801
    >>> label_centroid_mm(make_volume(da.from_array(lab, chunks=3), np.diag([2.0, 1, 1, 1]))).tolist()
    [5.0, 1.0, 3.0]
    """
    vol = check_volume(vol)
    total = index_sums(as_dask(vol), codes)
    if total[0] == 0:
        return None
    ijk = total[1:] / total[0]
    aff = affine_of(vol)
    return aff[:3, :3] @ ijk + aff[:3, 3]


# ------------------------------------------------------------------------------------------------------------
# Orthogonal slices


def orthogonal_slices(
    vol: xr.DataArray,
    *,
    point_mm: ArrayLike | None = None,
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
    return cut_slices(
        vol,
        point_mm=point_mm,
        level=level,
        max_px=max_px,
        radius_mm=radius_mm,
        ref_affine=affine_of(check_volume(vol)),
        compute=compute,
    )


# ------------------------------------------------------------------------------------------------------------
# Plotting


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _cycle(colours: Sequence[Any], n: int) -> list:
    return list(colours) * (n // max(1, len(colours)) + 1)


def _plane_line(ax, plane: Plane, fixed_d: int, ref_affine: np.ndarray, point, normal, **kw) -> None:
    """Draw the intersection of the world plane ``normal . p = normal . point`` with a displayed plane."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    c = float(n @ np.asarray(point, dtype=np.float64))
    frame = Frame(ref_affine)
    a3, t = ref_affine[:3, :3], ref_affine[:3, 3]
    h = (a3.T @ n) / frame.scale  # n . p = sum_d h_d (mm_d - offset_d) + n . t
    r = c - n @ t + float(h @ frame.offset)  # -> sum_d h_d mm_d = r
    ia, ib = [DIMS.index(d) for d in plane.axes]
    r = r - h[fixed_d] * plane.position_mm
    ea, eb = plane.extent_mm[:2], plane.extent_mm[2:]
    if h[ia] == 0 and h[ib] == 0:
        return  # the plane is parallel to this panel (e.g. x = 0 on a sagittal panel): no line to draw
    if abs(h[ib]) >= abs(h[ia]):
        xa = np.array(ea)
        xb = (r - h[ia] * xa) / h[ib]
    else:
        xb = np.array(eb)
        xa = (r - h[ib] * xb) / h[ia]
    ax.plot(xa, xb, **kw)
    ax.set_xlim(*ea)
    ax.set_ylim(*eb)


def _cut_like(base: OrthoSlices, v: xr.DataArray, what: str, *, ref, max_px, radius_mm) -> OrthoSlices:
    """A layer's planes through the base's point, on its own grid, at the level whose voxels match the base's
    planes (the same level number on the same grid)."""
    v = check_volume(v, what)
    _, _, aff0 = full_res(v)
    ratio = float(np.median(spacing_of(base.affine) / spacing_of(aff0)))
    lev = max(0, int(round(math.log2(ratio)))) if ratio > 0 else 0
    return cut_slices(
        v,
        point_mm=base.point_mm,
        level=lev,
        max_px=max_px,
        radius_mm=radius_mm,
        ref_affine=ref,
        compute=True,
        what=what,
    )


def _layer_style(slices: OrthoSlices, labels: bool, *, cmap, vmin, vmax, labels_kw: dict) -> dict:
    """imshow keywords of a layer: its label colours, or a colour map with a robust window (or ``vmin/vmax``)."""
    if labels:
        codes = np.unique(np.concatenate([np.unique(np.asarray(p.data)) for p in slices.planes.values()]))
        lcmap, lnorm = label_colormap(codes, **labels_kw)
        return {"cmap": lcmap, "norm": lnorm, "interpolation": "nearest"}
    lo, hi = robust_limits(p.data for p in slices.planes.values())
    return {
        "cmap": cmap,
        "vmin": lo if vmin is None else vmin,
        "vmax": hi if vmax is None else vmax,
        "interpolation": "nearest",
    }


def _show(ax, plane: Plane, **kw):
    return ax.imshow(np.asarray(plane.data).T, origin="lower", extent=plane.extent_mm, aspect="equal", **kw)


def _show_veil(ax, plane: Plane) -> None:
    """Black where the mask is 0: hides what lies outside the brain."""
    m = np.asarray(plane.data) == 0
    veil = np.zeros(m.shape + (4,), np.float32)
    veil[m] = (0, 0, 0, 1)
    ax.imshow(veil.transpose(1, 0, 2), origin="lower", extent=plane.extent_mm, aspect="equal", interpolation="nearest")


def _show_outline(ax, plane: Plane, color) -> None:
    m = (np.asarray(plane.data) > 0).astype(np.float32)
    if m.shape[0] >= 2 and m.shape[1] >= 2 and 0 < m.sum() < m.size:
        xs, ys = plane.coords_mm
        ax.contour(xs, ys, m.T, levels=[0.5], colors=[color], linewidths=1.0)


@dataclass
class _Layers:
    """What every panel of :func:`plot_orthogonal` draws: the planes of each layer, their styles, the lines."""

    base: OrthoSlices
    ref: np.ndarray
    base_style: dict
    overlay: OrthoSlices | None = None
    overlay_style: dict = field(default_factory=dict)
    veil: OrthoSlices | None = None
    contours: list[OrthoSlices] = field(default_factory=list)
    contour_colours: list = field(default_factory=list)
    planes: list = field(default_factory=list)
    plane_colours: list = field(default_factory=list)
    crosshair: bool = True

    def add_lines(self, contours: list[OrthoSlices], contour_colors: Any, planes: list, plane_colors: Any) -> None:
        """Outlines and world planes, with their colours (the defaults' cycle if none are given)."""
        self.contours, self.planes = contours, planes
        self.contour_colours = _cycle(_as_list(contour_colors) or CONTOUR_COLOURS, len(contours))
        self.plane_colours = _cycle(_as_list(plane_colors) or PLANE_COLOURS, len(planes))


def _draw_panel(a, fixed: str, layers: _Layers):
    """One panel: base, overlay, veil, outlines, world planes and crosshair; returns the overlay's image."""
    base = layers.base
    p = base[fixed]
    d = DIMS.index(fixed)
    _show(a, p, **layers.base_style)
    ov_img = _show(a, layers.overlay[fixed], **layers.overlay_style) if layers.overlay is not None else None
    if layers.veil is not None:
        _show_veil(a, layers.veil[fixed])
    for c, color in zip(layers.contours, layers.contour_colours):
        _show_outline(a, c[fixed], color)
    for (pt, nrm), color in zip(layers.planes, layers.plane_colours):
        _plane_line(a, p, d, layers.ref, pt, nrm, color=color, linewidth=1.2, linestyle="--")
    if layers.crosshair:
        other = [DIMS.index(n) for n in p.axes]
        at = Frame(layers.ref).of_world(base.point_mm)
        a.axvline(at[other[0]], color="w", lw=0.5, alpha=0.4)
        a.axhline(at[other[1]], color="w", lw=0.5, alpha=0.4)
    a.set_xlim(*p.extent_mm[:2])
    a.set_ylim(*p.extent_mm[2:])
    letters, unit = base.axis_codes, "mm" if base.coords == "world" else "mm along axis"
    ia, ib = [DIMS.index(n) for n in p.axes]
    a.set_xlabel(f"{p.axes[0]} -> {letters[ia]} ({unit})")
    a.set_ylabel(f"{p.axes[1]} -> {letters[ib]} ({unit})")
    a.set_title(f"{fixed} = {p.position_mm:.1f} mm", fontsize=10)
    return ov_img


def _panel_axes(ax) -> tuple[Any, list]:
    """(figure, three axes): a new 1 x 3 figure, or the three axes given (a row of a bigger figure)."""
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 4.4), layout="constrained")
        return fig, list(fig.subplots(1, 3))
    axes = list(np.ravel(ax))
    if len(axes) != 3:
        raise HelmError(f"ax must be three matplotlib Axes, got {len(axes)}")
    return axes[0].figure, axes


def _panel_legend(axes: list, contour_labels, ccolors, plane_labels, pcolors) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=col, label=lab) for lab, col in zip(_as_list(contour_labels), ccolors)]
    handles += [
        Line2D([], [], color=col, linestyle="--", label=lab) for lab, col in zip(_as_list(plane_labels), pcolors)
    ]
    if handles:
        axes[-1].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.6)


def _panel_title(fig, axes: list, base: OrthoSlices, head: str, own_figure: bool) -> None:
    sp = spacing_of(base.affine)
    head = f"{head}   [level {base.level}: {base.source}, {sp.min():.3g} mm voxels, axes {base.axis_codes}]"
    if own_figure:
        fig.suptitle(head, fontsize=11)
    else:  # a row of a bigger figure: the row's title goes above its middle panel
        axes[1].set_title(f"{head}\n{axes[1].get_title()}", fontsize=10)


def plot_orthogonal(
    vol: xr.DataArray,
    *,
    overlay: xr.DataArray | None = None,
    contour: Any = None,
    point_mm: ArrayLike | None = None,
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
    overlay_vmin: float | None = None,
    overlay_vmax: float | None = None,
    veil: xr.DataArray | None = None,
    clusters: str = "grey",
    n_clusters: int | None = None,
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
        bias field) with ``overlay_cmap`` (window ``overlay_vmin``/``overlay_vmax``, default robust) and a
        colour bar named after the overlay.
    contour : volume or list of volumes, optional
        Outlines of ``> 0`` (masks, label maps), in ``contour_colors``; ``contour_labels`` names them in a legend.
    veil : volume, optional
        A mask: where it is 0 the panels are black (e.g. a bias field shown only inside the brain).
    planes : list of (point_mm, normal), optional
        World planes (e.g. a mirror plane) drawn as dashed lines where they cut each slice, in
        ``plane_colors``; ``plane_labels`` names them in the legend.
    ax : three matplotlib Axes, optional
        Where to draw (default: a new 1 x 3 figure with ``title`` above; with ``ax`` -- a row of a bigger
        figure, see :func:`figure_rows` -- the title goes above the middle panel).
    lut, clusters, n_clusters :
        Label colours (see :func:`label_colormap`): the table, how k-means clusters are coloured (``"grey"``,
        ``"viridis"`` or ``"none"``) and the map's k.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> fig = plot_orthogonal(make_volume(da.random.random((8, 6, 4)), np.eye(4)), title="noise")
    >>> len(fig.axes)
    3
    """
    vol = check_volume(vol)
    base = orthogonal_slices(vol, point_mm=point_mm, level=level, max_px=max_px, radius_mm=radius_mm)
    ref = affine_of(vol)
    fig, axes = _panel_axes(ax)
    labels_kw = {"table": lut, "clusters": clusters, "n_clusters": n_clusters}
    is_labels = vol.attrs.get("kind", "image") == "labels"
    base_style = _layer_style(
        base, is_labels, cmap=cmap, vmin=vmin, vmax=vmax, labels_kw=dict(labels_kw, background_alpha=1.0)
    )
    cut = dict(ref=ref, max_px=max_px, radius_mm=radius_mm)
    layers = _Layers(base, ref, base_style, crosshair=crosshair)
    layers.veil = _cut_like(base, veil, "veil", **cut) if veil is not None else None
    contours = [_cut_like(base, c, "contour", **cut) for c in _as_list(contour)]
    layers.add_lines(contours, contour_colors, _as_list(planes), plane_colors)
    overlay_labels = overlay is not None and overlay.attrs.get("kind", "image") in ("labels", "mask")
    if overlay is not None:
        layers.overlay = _cut_like(base, overlay, "overlay", **cut)
        style = _layer_style(
            layers.overlay, overlay_labels, cmap=overlay_cmap, vmin=overlay_vmin, vmax=overlay_vmax, labels_kw=labels_kw
        )
        layers.overlay_style = dict(style, alpha=overlay_alpha)
    images = [_draw_panel(a, fixed, layers) for a, fixed in zip(axes, DIMS)]
    if overlay is not None and not overlay_labels and colorbar:
        fig.colorbar(images[-1], ax=axes, shrink=0.8, label=str(overlay.name or "overlay"))
    _panel_legend(axes, contour_labels, layers.contour_colours, plane_labels, layers.plane_colours)
    _panel_title(fig, axes, base, title if title is not None else str(vol.name or "volume"), ax is None)
    return fig


def plot_histogram(
    counts: Any,
    edges: Any,
    *,
    centroids: ArrayLike | None = None,
    thresholds: ArrayLike | None = None,
    ax: Any = None,
    label: str | None = None,
    color: Any = None,
    log: bool = True,
    title: str | None = None,
    xlabel: str = "intensity",
):
    """Draw a histogram (e.g. from :func:`histogram`) as a filled step curve, with k-means centroids and thresholds.

    Parameters
    ----------
    counts, edges : 1-D arrays
        Voxels per bin and the ``len(counts) + 1`` bin edges.
    centroids : floats, optional
        k-means centroids (sorted, as the clusters are numbered): solid lines numbered 1..k in the clusters'
        viridis colours (:func:`helm_dask.draw.cluster_rgb`, as in a ``clusters="viridis"`` overlay).
    thresholds : floats, optional
        Decision thresholds between clusters: dotted lines.
    ax : matplotlib Axes, optional
        Where to draw (default a new figure); call again with the same ``ax`` to compare histograms.
    label, color :
        Legend entry and colour of the curve (default: the next colour of the axes' cycle).
    log : bool
        Logarithmic counts: the small classes (CSF, bright vessels...) matter as much as the big white-matter peak.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plot_histogram([3, 40, 5], [0.0, 1.0, 2.0, 3.0], centroids=[0.5, 1.5], thresholds=[1.0])
    >>> len(fig.axes[0].lines)
    4
    """
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=(11.5, 4.2), layout="constrained").subplots()
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    floor = 0.5 if log else 0.0  # empty bins on a log axis: drawn at half a voxel
    y = np.maximum(counts, floor)
    (line,) = ax.step(centres, y, where="mid", lw=0.8, color=color, label=label)
    ax.fill_between(centres, y, floor, step="mid", color=line.get_color(), alpha=0.3, lw=0)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
    ax.margins(x=0)
    for i, t in enumerate(np.ravel(thresholds) if thresholds is not None else []):
        ax.axvline(float(t), color="#444444", lw=0.9, ls=":", label="thresholds" if i == 0 else None)
    cents = np.ravel(centroids).tolist() if centroids is not None else []
    for j, c in enumerate(cents, 1):
        col = cluster_rgb(j, len(cents))
        ax.axvline(float(c), color=col, lw=2.4, label=f"cluster {j}: centroid {c:.4g}")
        ax.text(
            float(c),
            1.01,
            str(j),
            color=col,
            ha="center",
            va="bottom",
            fontsize=11,
            fontweight="bold",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("voxels per bin" + (" (log)" if log else ""))
    if title is not None:
        ax.set_title(title, fontsize=10, pad=18 if cents else 6)
    if cents or thresholds is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    elif label is not None:
        ax.legend(fontsize=8)
    return ax.figure


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


def _level_data(vol: xr.DataArray, mask: xr.DataArray | None, level: int) -> tuple[da.Array, da.Array | None]:
    """The volume's data at ``level`` and the mask's (``> 0``, on the same chunks), cut to a common shape."""
    x = grid_at(vol, level).data
    if mask is None:
        return x, None
    m = grid_at(check_volume(mask, "mask"), level).data
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
    return x, (m > 0).rechunk(x.chunks)


def _histogram_edges(x: da.Array, m: da.Array | None, bins: Any, range: tuple[float, float] | None) -> np.ndarray:
    """The bin edges: ``bins`` itself (checked), or ``bins`` equal bins over ``range`` (default the values' range)."""
    if not (isinstance(bins, (int, np.integer)) and not isinstance(bins, bool)):
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise HelmError("bins must be a positive integer or an increasing 1-D array of edges")
        return edges
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
    return np.linspace(float(range[0]), float(range[1]), int(bins) + 1)


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
    vol = check_volume(vol)
    if level is None:
        level = choose_level(vol, max_px=None, max_voxels=max_voxels)
    x, m = _level_data(vol, mask, level)
    edges = _histogram_edges(x, m, bins, range)
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


def _browser_figure(vol, plane: str, index: int, first: OrthoSlices, *, overlay, contour, max_px, lut):
    """The browser's picture: one plane of ``vol`` (and of its overlay / outlines) at the level of ``first``."""
    from matplotlib.figure import Figure

    d = DIMS.index(plane)
    ijk = np.asarray(first.shape, dtype=np.float64) / 2.0 - 0.5
    ijk[d] = index
    point = first.affine[:3, :3] @ ijk + first.affine[:3, 3]
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots(1, 1)
    cut = dict(point_mm=point, level=first.level, max_px=max_px, radius_mm=None, ref_affine=affine_of(vol))
    # One plane per move: the three planes are built lazily and only the wanted one is computed.
    p = cut_slices(vol, compute=False, **cut)[plane]
    p.data = np.asarray(p.data.compute())
    if vol.attrs.get("kind") == "labels":
        cm, nm = label_colormap(np.unique(p.data), table=lut, background_alpha=1.0)
        ax.imshow(p.data.T, origin="lower", extent=p.extent_mm, cmap=cm, norm=nm, interpolation="nearest")
    else:
        lo, hi = robust_limits([p.data])
        ax.imshow(p.data.T, origin="lower", extent=p.extent_mm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    for layer, color in ((overlay, None), *[(c, CONTOUR_COLOURS[0]) for c in _as_list(contour)]):
        if layer is None:
            continue
        q = cut_slices(layer, compute=False, **cut)[plane]
        qd = np.asarray(q.data.compute())
        if color is None:
            cm, nm = label_colormap(np.unique(qd), table=lut)
            ax.imshow(qd.T, origin="lower", extent=q.extent_mm, cmap=cm, norm=nm, alpha=0.5, interpolation="nearest")
        elif qd.shape[0] >= 2 and qd.shape[1] >= 2 and 0 < (qd > 0).sum() < qd.size:
            ax.contour(*q.coords_mm, (qd > 0).T.astype(np.float32), levels=[0.5], colors=[color])
    ax.set_title(f"{plane} = {p.position_mm:.1f} mm (index {index} at level {first.level})")
    ax.set_xlabel(f"{p.axes[0]} (mm)")
    ax.set_ylabel(f"{p.axes[1]} (mm)")
    return fig


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

    Parameters
    ----------
    vol : volume
        The volume to browse (grey levels, or label colours for ``kind="labels"``).
    overlay, contour :
        A label overlay (half transparent) and outlines, as in :func:`plot_orthogonal`.
    level, max_px :
        The pyramid level (default: the finest whose planes have at most ``max_px`` pixels per side).
    lut :
        Label colours (see :func:`label_colormap`).

    Returns
    -------
    ipywidgets.VBox or str
        A plane menu, an index slider and the picture (display it in Jupyter) or, when ipywidgets is not
        installed, a short message saying how to get it (a string, so a notebook still runs). The picture is a PNG
        in an ``ipywidgets.Image`` (rendered with matplotlib's Agg backend), so the browser needs no Output widget
        and works the same in JupyterLab, VS Code or a headless run; ``browser.figure`` is the matplotlib Figure
        last drawn.
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        return (
            "slice_browser needs ipywidgets (pip install ipywidgets); use plot_orthogonal(vol, point_mm=...) meanwhile"
        )

    vol = check_volume(vol)
    first = orthogonal_slices(vol, level=level, max_px=max_px, compute=False)
    shape, letters = first.shape, first.axis_codes
    dim_w = widgets.Dropdown(
        options=[(f"{d} (-> {letters[i]})", d) for i, d in enumerate(DIMS)], value="z", description="plane"
    )
    idx_w = widgets.IntSlider(
        value=shape[2] // 2, min=0, max=shape[2] - 1, description="index", continuous_update=False
    )
    image = widgets.Image(format="png")
    box = widgets.VBox([widgets.HBox([dim_w, idx_w]), image])

    def render(_change=None):
        fig = _browser_figure(
            vol, dim_w.value, int(idx_w.value), first, overlay=overlay, contour=contour, max_px=max_px, lut=lut
        )
        image.value = png_bytes(fig, dpi=80)
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
