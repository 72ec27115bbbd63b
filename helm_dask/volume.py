"""The data model: a volume is a lazy ``xarray.DataArray`` that carries its exact voxel-to-world affine.

Dims are ``x, y, z`` (voxel axes in NIfTI order, plus ``echo`` last for multi-echo data); ``attrs["affine"]`` is
the 4x4 float64 matrix taking voxel centres to RAS+ world millimetres, exactly as in NIfTI, and ``attrs`` also
hold the ``kind`` (``image``, ``labels`` or ``mask``), the source file and the provenance. The coordinates
(mm, ``units`` attrs) are the OME-Zarr placement (:func:`ome_placement`): world RAS+ mm of the voxel centres,
exactly, on a grid whose affine is diagonal and positive, and otherwise the axis-aligned placement whose centre
is exact, with the worst corner's error in ``attrs["placement_error_mm"]`` (:func:`placement_error_mm`).
:func:`make_volume` builds a volume, :func:`like` derives one from another, :func:`affine_of`,
:func:`spacing_of` and :func:`orientation_code` read its geometry; the conventions in full are in
``docs/method/storage.md``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from ._version import __version__

DIMS = ("x", "y", "z")
KINDS = ("image", "labels", "mask")
#: A placement whose worst corner is off by less than this fraction of the smallest voxel counts as exact (an
#: affine computed in floating point may carry off-diagonal terms of 1e-17 that move nothing).
EXACT_PLACEMENT_VOXELS = 1e-6


def _as_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    return a


def spacing_of(affine: Any) -> np.ndarray:
    """Voxel size in mm along each voxel axis (norms of the affine's first three columns).

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.

    Returns
    -------
    numpy.ndarray
        Three float64 voxel sizes, in voxel-axis order.

    Example
    -------
    >>> spacing_of(np.diag([0.3, -0.5, 1.0, 1.0])).tolist()
    [0.3, 0.5, 1.0]
    """
    a = _as_affine(affine)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def is_axis_aligned(affine: Any, *, atol: float = 1e-9) -> bool:
    """Whether the 3x3 part is diagonal (voxel axes are world axes, any signs).

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    atol : float
        Off-diagonal entries up to ``atol`` times the largest entry count as zero.

    Returns
    -------
    bool

    Example
    -------
    >>> is_axis_aligned(np.diag([-1.0, 1.0, 2.0, 1.0])), is_axis_aligned(np.eye(4)[[1, 0, 2, 3]])
    (True, False)
    """
    m = _as_affine(affine)[:3, :3]
    return bool(np.all(np.abs(m - np.diag(np.diag(m))) <= atol * np.abs(m).max()))


def orientation_code(affine: Any) -> str:
    """Three-letter orientation code of the voxel axes (nibabel convention).

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.

    Returns
    -------
    str
        For example ``"RAS"`` or ``"LIA"``.

    Example
    -------
    >>> orientation_code(np.diag([-1.0, 1.0, 1.0, 1.0]))
    'LAS'
    """
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(_as_affine(affine)))


def _exactly_diagonal(affine: np.ndarray) -> bool:
    """Whether the 3x3 part is diagonal with positive entries, exactly (no tolerance)."""
    m = affine[:3, :3]
    return bool(np.all(m[~np.eye(3, dtype=bool)] == 0) and np.all(np.diag(m) > 0))


def ome_placement(affine: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned scale + translation (OME-Zarr 0.5) closest to an affine: exact at the volume's centre.

    ``scale`` is the voxel size (column norms of the affine); ``translation`` puts the centre voxel position
    ``c = (shape - 1) / 2`` where the affine puts it: ``t = A c + a - scale * c``. For an affine that is diagonal
    with positive entries this is the affine itself (``t`` is then its translation column, bit for bit);
    otherwise the other voxels are off by ``(A - diag(scale)) (i - c)``, at most
    :func:`placement_error_mm` at a corner.

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    shape : tuple of int
        The volume's shape (the first three entries are used).

    Returns
    -------
    scale, translation : numpy.ndarray
        Three float64 each: world position of voxel ``i`` along axis ``k`` is ``scale[k] * i + translation[k]``.

    Example
    -------
    >>> a = np.diag([0.5, 0.5, 0.5, 1.0]); a[:3, 3] = [10, 20, 30]
    >>> [v.tolist() for v in ome_placement(a, (5, 5, 5))]
    [[0.5, 0.5, 0.5], [10.0, 20.0, 30.0]]
    >>> flip = np.diag([-1.0, 1.0, 1.0, 1.0])            # x runs right to left: only the centre stays put
    >>> ome_placement(flip, (3, 1, 1))[1].tolist()
    [-2.0, 0.0, 0.0]
    """
    a = _as_affine(affine)
    if _exactly_diagonal(a):
        return np.diag(a)[:3].copy(), a[:3, 3].copy()
    scale = spacing_of(a)
    c = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return scale, a[:3, :3] @ c + a[:3, 3] - scale * c


def placement_error_mm(affine: Any, shape: tuple[int, ...]) -> float:
    """How far (mm) the :func:`ome_placement` puts the worst corner voxel centre from where the affine puts it.

    ``max over corners |(A - diag(scale)) (corner - c)|``: 0 for a diagonal positive affine. For a grid rotated
    by ``theta`` (``A = R diag(scale)``), the error at a voxel is ``2 sin(theta/2)`` times its distance from the
    centre perpendicular to the rotation axis, so at most ``2 sin(theta/2)`` times the half-diagonal (centre to
    corner voxel centre, mm); a flipped or permuted axis gives errors as large as the volume.

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    shape : tuple of int
        The volume's shape (the first three entries are used).

    Returns
    -------
    float
        Millimetres.

    Example
    -------
    >>> t = np.radians(12.0); c, s = np.cos(t), np.sin(t)
    >>> tilted = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    >>> err = placement_error_mm(tilted, (101, 101, 1))   # half-diagonal 50 * sqrt(2) mm
    >>> round(err, 3), round(float(2 * np.sin(t / 2) * 50 * np.sqrt(2)), 3)
    (14.783, 14.783)
    """
    a = _as_affine(affine)
    if _exactly_diagonal(a):
        return 0.0
    half = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    m = a[:3, :3] - np.diag(spacing_of(a))
    corners = np.array(list(itertools.product((-1.0, 1.0), repeat=3))) * half
    return float(np.linalg.norm(corners @ m.T, axis=1).max())


def placement_of(affine: Any, shape: tuple[int, ...]) -> tuple[str, float]:
    """``("exact" or "approximate", worst-corner error in mm)`` of a grid's :func:`ome_placement`.

    Exact: off by less than :data:`EXACT_PLACEMENT_VOXELS` of the smallest voxel anywhere.

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    shape : tuple of int
        The volume's shape.

    Returns
    -------
    tuple of (str, float)

    Example
    -------
    >>> placement_of(np.diag([0.5, 0.5, 0.5, 1.0]), (4, 4, 4)), placement_of(np.diag([-1.0, 1, 1, 1]), (5, 1, 1))
    (('exact', 0.0), ('approximate', 4.0))
    """
    err = placement_error_mm(affine, shape)
    exact = err <= EXACT_PLACEMENT_VOXELS * float(spacing_of(affine).min())
    return ("exact" if exact else "approximate"), err


def voxel_coords(affine: Any, shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], str]:
    """Millimetre coordinates of voxel centres for the three spatial dims: the OME-Zarr placement.

    ``scale * index + translation`` of :func:`ome_placement`: the world RAS+ position of each voxel centre when
    the affine is diagonal and positive; for other grids the axis-aligned placement that viewers show, exact at
    the centre (the exact geometry is the affine).

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    shape : tuple of int
        The volume's shape (the first three entries are used).

    Returns
    -------
    coords : dict
        ``{"x": ..., "y": ..., "z": ...}``, one float64 array per voxel axis.
    placement : str
        ``"exact"`` or ``"approximate"`` (see :func:`placement_of`).

    Example
    -------
    >>> coords, placement = voxel_coords(np.diag([0.5, 0.5, 0.5, 1.0]), (3, 1, 1))
    >>> coords["x"].tolist(), placement
    ([0.0, 0.5, 1.0], 'exact')
    """
    scale, trans = ome_placement(affine, shape)
    coords = {d: trans[i] + scale[i] * np.arange(shape[i]) for i, d in enumerate(DIMS)}
    return coords, placement_of(affine, shape)[0]


def coord_attrs(dim: str) -> dict[str, Any]:
    """The attrs of a spatial coordinate: ``units`` and ``long_name``.

    Parameters
    ----------
    dim : str
        ``"x"``, ``"y"`` or ``"z"`` (or a pyramid level's ``"x_1"`` ...).

    Returns
    -------
    dict

    Example
    -------
    >>> coord_attrs("x")["units"]
    'mm'
    """
    return {"units": "mm", "long_name": f"{dim}: voxel centre position (OME-Zarr placement, RAS+ mm)"}


def make_volume(
    data: Any,
    affine: Any,
    *,
    kind: str = "image",
    name: Hashable | None = None,
    source: str | None = None,
    provenance: list | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a 3-D (or 4-D, echo last) NumPy/Dask array and its affine into a volume DataArray.

    Parameters
    ----------
    data : numpy or dask array
        The voxels, in voxel-axis order (the array object itself is kept, not copied).
    affine : array-like, 4x4
        Voxel-to-world matrix (RAS+ mm, voxel centres).
    kind : {"image", "labels", "mask"}
        What the values are.
    name : hashable, optional
        The DataArray's name (usually a str).
    source : str, optional
        The file the data came from (default: ``attrs["source"]`` or ``""``).
    provenance : list of dict, optional
        One record per stage that made the data (default: ``attrs["provenance"]`` or ``[]``; deep-copied).
    attrs : mapping, optional
        Further attributes (``affine``, ``units``, ``kind``, ``placement`` and ``placement_error_mm`` are always
        set here).

    Returns
    -------
    xarray.DataArray
        Dims ``("x", "y", "z")`` (plus ``"echo"``), millimetre coordinates with ``units`` attrs (see
        :func:`voxel_coords`); ``attrs["placement"]`` says whether they are exact world positions.

    Example
    -------
    >>> import dask.array as da
    >>> vol = make_volume(da.zeros((4, 5, 6), chunks=2), np.diag([0.3, 0.3, 0.3, 1.0]))
    >>> float(vol.x[1]), orientation_code(affine_of(vol)), vol.attrs["kind"]
    (0.3, 'RAS', 'image')
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if data.ndim not in (3, 4):
        raise ValueError(f"a volume is 3-D (x, y, z) or 4-D (x, y, z, echo); got {data.ndim}-D")
    a = _as_affine(affine)
    dims = DIMS if data.ndim == 3 else DIMS + ("echo",)
    values, _ = voxel_coords(a, data.shape)
    placement, error_mm = placement_of(a, data.shape)
    coords = {d: xr.Variable(d, v, attrs=coord_attrs(d)) for d, v in values.items()}
    all_attrs = {k: v for k, v in (attrs or {}).items() if k != "coords"}  # "coords": its name before placement
    all_attrs.update(
        affine=a.copy(),
        units="mm",
        kind=kind,
        placement=placement,
        placement_error_mm=error_mm,
        source=source if source is not None else all_attrs.get("source", ""),
        provenance=copy.deepcopy(list(provenance if provenance is not None else all_attrs.get("provenance", []))),
    )
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=all_attrs)


def affine_of(vol: xr.DataArray) -> np.ndarray:
    """A copy of the volume's 4x4 affine.

    Parameters
    ----------
    vol : xarray.DataArray
        A volume (see :func:`make_volume`).

    Returns
    -------
    numpy.ndarray
        The 4x4 float64 voxel-to-world matrix; :class:`ValueError` if ``vol`` has none.

    Example
    -------
    >>> affine_of(make_volume(np.zeros((2, 2, 2)), np.eye(4)))[3].tolist()
    [0.0, 0.0, 0.0, 1.0]
    """
    try:
        return _as_affine(vol.attrs["affine"]).copy()
    except KeyError:
        raise ValueError("this DataArray has no attrs['affine']; build it with helm_dask.make_volume") from None


def like(
    vol: xr.DataArray,
    data: Any,
    *,
    affine: Any = None,
    kind: str | None = None,
    name: str | None = None,
    step: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """A new volume derived from ``vol``: same attrs, new data and (optionally) a new affine or kind.

    Parameters
    ----------
    vol : xarray.DataArray
        The volume the new one derives from.
    data : numpy or dask array
        The new voxels (the array object is kept as it is).
    affine : array-like, optional
        The new affine (default: ``vol``'s).
    kind : str, optional
        The new kind (default: ``vol``'s).
    name : str, optional
        The new name (default: ``vol``'s).
    step : mapping, optional
        A provenance record (see :func:`provenance_record`) appended to the provenance list.

    Returns
    -------
    xarray.DataArray

    Example
    -------
    >>> v = make_volume(np.zeros((2, 2, 2)), np.eye(4), name="scan")
    >>> w = like(v, np.ones((2, 2, 2)), kind="mask", step=provenance_record("demo"))
    >>> w.name, w.attrs["kind"], [p["stage"] for p in w.attrs["provenance"]]
    ('scan', 'mask', ['demo'])
    """
    prov = copy.deepcopy(list(vol.attrs.get("provenance", [])))
    if step is not None:
        prov.append(dict(step))
    extra = {
        k: v
        for k, v in vol.attrs.items()
        if k not in ("affine", "units", "kind", "coords", "placement", "placement_error_mm", "source", "provenance")
    }
    return make_volume(
        data,
        affine_of(vol) if affine is None else affine,
        kind=kind or vol.attrs.get("kind", "image"),
        name=name or vol.name,
        source=vol.attrs.get("source", ""),
        provenance=prov,
        attrs=extra,
    )


def provenance_record(
    stage: str, params: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None
) -> dict:
    """One provenance entry: stage name, JSON-able parameters, package version, input checksums.

    Parameters
    ----------
    stage : str
        The stage's name, e.g. ``"orient.to_ras"``.
    params : mapping, optional
        Its parameters (JSON-able).
    inputs : mapping, optional
        Input name -> checksum.

    Returns
    -------
    dict
        ``{"stage", "params", "version", "inputs"}``.

    Example
    -------
    >>> sorted(provenance_record("resample", {"spacing_mm": 0.5}))
    ['inputs', 'params', 'stage', 'version']
    """
    return {"stage": stage, "params": dict(params or {}), "version": __version__, "inputs": dict(inputs or {})}


def world_to_voxel(affine: Any, points_mm: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world points.

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    points_mm : array-like, N x 3
        World coordinates (mm).

    Returns
    -------
    numpy.ndarray
        N x 3 float64 voxel indices.

    Example
    -------
    >>> world_to_voxel(np.diag([0.5, 0.5, 0.5, 1.0]), np.array([[1.0, 0.5, 0.0]])).tolist()
    [[2.0, 1.0, 0.0]]
    """
    a = _as_affine(affine)
    inv = np.linalg.inv(a)
    p = np.asarray(points_mm, dtype=np.float64)
    return p @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(affine: Any, ijk: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of voxel indices.

    Parameters
    ----------
    affine : array-like, 4x4
        Voxel-to-world matrix.
    ijk : array-like, N x 3
        Voxel indices (may be fractional).

    Returns
    -------
    numpy.ndarray
        N x 3 float64 world coordinates.

    Example
    -------
    >>> voxel_to_world(np.diag([0.5, 0.5, 0.5, 1.0]), np.array([[2, 1, 0]])).tolist()
    [[1.0, 0.5, 0.0]]
    """
    a = _as_affine(affine)
    return np.asarray(ijk, dtype=np.float64) @ a[:3, :3].T + a[:3, 3]
