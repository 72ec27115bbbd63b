"""The data model: a volume is a lazy ``xarray.DataArray`` that carries its exact voxel-to-world affine.

Conventions (every stage relies on them):

* dims are ``("x", "y", "z")`` -- the voxel axes in NIfTI order (i, j, k) -- plus ``"echo"`` last for
  multi-echo data;
* ``attrs["affine"]`` is the 4x4 float64 voxel-to-world matrix (RAS+ world, millimetres) mapping the
  *centre* of voxel (i, j, k) to world coordinates, exactly as in NIfTI;
* coordinates are millimetres at voxel centres: for an axis-aligned affine (diagonal 3x3, as after
  reorientation to RAS+) they are the world coordinates themselves (``attrs["coords"] == "world"``); for an
  oblique or permuted affine they are the distance from the first voxel centre along that voxel axis
  (``attrs["coords"] == "voxel_mm"``) -- the affine is always the exact geometry;
* ``attrs["kind"]`` is ``"image"`` (float intensities), ``"labels"`` (integer codes) or ``"mask"`` (0/1 uint8);
* ``attrs["provenance"]`` is a list of dicts, one per stage that made the data (name, parameters, version,
  input checksums); ``attrs["source"]`` the file the data came from; ``attrs["units"] == "mm"``.

Example
-------
>>> import numpy as np, dask.array as da
>>> vol = make_volume(da.zeros((4, 5, 6), chunks=2), np.diag([0.3, 0.3, 0.3, 1.0]))
>>> float(vol.x[1]), orientation_code(affine_of(vol))
(0.3, 'RAS')
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

DIMS = ("x", "y", "z")
KINDS = ("image", "labels", "mask")


def _as_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    return a


def spacing_of(affine: Any) -> np.ndarray:
    """Voxel size in mm along each voxel axis (norms of the affine's first three columns)."""
    a = _as_affine(affine)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def is_axis_aligned(affine: Any, *, atol: float = 1e-9) -> bool:
    """True when the 3x3 part is diagonal (voxel axes are world axes, any signs)."""
    m = _as_affine(affine)[:3, :3]
    return bool(np.all(np.abs(m - np.diag(np.diag(m))) <= atol * np.abs(m).max()))


def orientation_code(affine: Any) -> str:
    """Three-letter orientation code of the voxel axes, e.g. ``"RAS"`` or ``"LIA"`` (nibabel convention)."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(_as_affine(affine)))


def voxel_coords(affine: Any, shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], str]:
    """Millimetre coordinates of voxel centres for the three spatial dims, and which kind they are."""
    a = _as_affine(affine)
    if is_axis_aligned(a):
        coords = {d: a[i, 3] + a[i, i] * np.arange(shape[i]) for i, d in enumerate(DIMS)}
        return coords, "world"
    sp = spacing_of(a)
    return {d: sp[i] * np.arange(shape[i]) for i, d in enumerate(DIMS)}, "voxel_mm"


def make_volume(
    data: Any,
    affine: Any,
    *,
    kind: str = "image",
    name: str | None = None,
    source: str | None = None,
    provenance: list | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a 3-D (or 4-D, echo last) NumPy/Dask array and its affine into a volume DataArray."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if data.ndim not in (3, 4):
        raise ValueError(f"a volume is 3-D (x, y, z) or 4-D (x, y, z, echo); got {data.ndim}-D")
    a = _as_affine(affine)
    dims = DIMS if data.ndim == 3 else DIMS + ("echo",)
    coords, coord_kind = voxel_coords(a, data.shape)
    all_attrs = dict(attrs or {})
    all_attrs.update(
        affine=a.copy(),
        units="mm",
        kind=kind,
        coords=coord_kind,
        source=source if source is not None else all_attrs.get("source", ""),
        provenance=copy.deepcopy(list(provenance if provenance is not None else all_attrs.get("provenance", []))),
    )
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=all_attrs)


def affine_of(vol: xr.DataArray) -> np.ndarray:
    """A copy of the volume's 4x4 affine."""
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

    ``step`` (a provenance record, see :func:`provenance_record`) is appended to the provenance list.
    """
    prov = copy.deepcopy(list(vol.attrs.get("provenance", [])))
    if step is not None:
        prov.append(dict(step))
    extra = {
        k: v for k, v in vol.attrs.items() if k not in ("affine", "units", "kind", "coords", "source", "provenance")
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
    """One provenance entry: stage name, JSON-able parameters, package version, input checksums."""
    from . import __version__

    return {"stage": stage, "params": dict(params or {}), "version": __version__, "inputs": dict(inputs or {})}


def world_to_voxel(affine: Any, points_mm: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world points (N x 3)."""
    a = _as_affine(affine)
    inv = np.linalg.inv(a)
    p = np.asarray(points_mm, dtype=np.float64)
    return p @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(affine: Any, ijk: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of voxel indices (N x 3)."""
    a = _as_affine(affine)
    return np.asarray(ijk, dtype=np.float64) @ a[:3, :3].T + a[:3, 3]
