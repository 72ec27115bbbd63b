"""Stage 6 -- merging the manual hypothalamus labels into the k-means maps: :func:`close_labels` closes their
union with a sphere in mm, exactly and chunk by chunk, and gives every voxel the closing adds the nearest manual
label; :func:`merge_labels` lets those labels override the k-means clusters (the closing does not depend on k:
compute it once per subject); :func:`binary_closing_mm`, :func:`ball` and :func:`closing_depth` are the
building blocks. The method (structuring element, exact Euclidean closing, boundary, chunking, ties) is
described in ``docs/method/merge.md``.

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> lab = np.zeros((20, 20, 20), np.uint16); lab[5:9, 8:12, 8:12] = 801; lab[10:14, 8:12, 8:12] = 803
>>> vol = make_volume(da.from_array(lab, chunks=7), np.diag([0.3, 0.3, 0.3, 1.0]), kind="labels")
>>> closed = close_labels(vol, 1.2).values          # the gap at x = 9 is closed in the middle of the faces
>>> closed[9, 10, 10], int((closed != 0).sum() - (lab != 0).sum())
(np.uint16(801), 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .arrays import EPS, _bbox, _closing_np, _nearest_sq, _r2, _radius, _spacing3, as_dask, ball, half_extent
from .errors import HelmError
from .io.regions import chunk_tasks, halo_box, pad_halo, region_map
from .volume import affine_of, like, provenance_record, spacing_of

__all__ = [
    "EPS",
    "ball",
    "binary_closing_mm",
    "close_labels",
    "closing_additions",
    "closing_depth",
    "half_extent",
    "merge_labels",
    "overlay_labels",
]


def closing_depth(radius_mm: float, spacing_mm: Any) -> tuple[int, int, int]:
    """Overlap, in voxels per side and axis, that an exact chunked closing needs: ``2 h``.

    A voxel of the closing depends on the set within ``h`` voxels for the dilation and ``h`` more for the
    erosion (``docs/method/merge.md``).

    Parameters
    ----------
    radius_mm : float
        Sphere radius (mm).
    spacing_mm : float or 3 floats
        Voxel size (mm).

    Returns
    -------
    tuple of 3 ints
        ``2 h`` per axis (:func:`half_extent`).

    Example
    -------
    >>> closing_depth(1.2, 0.1), closing_depth(1.2, 0.3)
    ((24, 24, 24), (8, 8, 8))
    """
    h = half_extent(radius_mm, spacing_mm)
    return 2 * h[0], 2 * h[1], 2 * h[2]


# ----------------------------------------------------------------------------------------------------------
# per-block NumPy kernels
# ----------------------------------------------------------------------------------------------------------


def _closing_block(
    block: np.ndarray, *, spacing: tuple[float, float, float], half: tuple[int, int, int], r2: float
) -> np.ndarray:
    """The closing of one overlapped block, restricted to the bounding box of its voxels (plus ``2 h``)."""
    mask = block != 0
    out = np.zeros(block.shape, dtype=bool)
    box = _bbox(mask, tuple(2 * h for h in half))
    if box is None:
        return out  # no label within reach: nothing to close (the common case)
    out[box] = _closing_np(mask[box], spacing, r2)
    return out


def _close_labels_block(
    block: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    half: tuple[int, int, int],
    r2: float,
    codes: np.ndarray | None,
) -> np.ndarray:
    """The closed labels of one overlapped block: manual voxels keep their code, added ones the nearest code."""
    lab = block if codes is None else np.where(np.isin(block, codes), block, 0)
    mask = lab != 0
    out = np.zeros(block.shape, dtype=np.uint16)
    box = _bbox(mask, tuple(2 * h for h in half))
    if box is None:
        return out
    out[mask] = lab[mask]
    lab_c, mask_c = lab[box], mask[box]
    added = _closing_np(mask_c, spacing, r2) & ~mask_c
    if not added.any():
        return out
    # The nearest label of an added voxel is within the ball (h voxels per axis); look 2 h around the added
    # voxels so that every code close to the minimum (ties) is seen too.
    sub = _bbox(added, tuple(2 * h for h in half))
    lab_s, added_s = lab_c[sub], added[sub]
    present = np.unique(lab_s[lab_s != 0])
    if present.size == 0:  # cannot happen (the closing only adds voxels within r of a label)
        return out
    q = np.stack([_nearest_sq(lab_s == c, spacing)[added_s] for c in present])  # codes x added voxels
    qmin = q.min(axis=0)
    tied = q <= qmin * (1.0 + EPS)
    choice = present[np.argmax(tied, axis=0)]  # first (= smallest) code among the tied ones
    view = out[box][sub]
    view[added_s] = choice  # basic slices: ``view`` writes through into ``out``
    return out


# ----------------------------------------------------------------------------------------------------------
# chunked application
# ----------------------------------------------------------------------------------------------------------


def _overlap_apply(data: da.Array, func: Callable, depth: tuple[int, ...], dtype: Any, **kwargs: Any) -> da.Array:
    """``func`` on every chunk with ``depth`` voxels of context per side, background (0) beyond the volume.

    One task per chunk (:func:`helm_dask.io.regions.region_map`): it reads the chunk's box plus ``depth`` (a
    stored volume straight from its store), pads the part beyond the volume with
    zeros, applies ``func`` and keeps the chunk. No overlap graph: nothing is held between tasks, so memory
    per task is the box (``(chunk + 2 depth)^3``), whatever the volume's size.
    """
    if max(depth) == 0:
        return da.map_blocks(func, data, dtype=dtype, **kwargs)  # what data.map_blocks calls
    shape = tuple(int(n) for n in data.shape)

    def plan(index, ranges):
        lo, hi = halo_box(ranges, depth, shape)
        return lo, hi, (ranges, lo, hi, tuple(depth), func, kwargs)

    # no chunk cache: label volumes are mostly empty (missing chunks read as zeros without decoding), so
    # re-reading a neighbour's chunk costs little, while a cache would hold 512 MB per worker for nothing
    return region_map(_overlap_task, [data], data.chunks, plan, dtype, name="closing", cache=False)


def _overlap_task(
    regions: list, ranges: tuple, lo: tuple, hi: tuple, depth: tuple, func: Callable, kwargs: dict
) -> np.ndarray:
    """One chunk: ``func`` on its box plus ``depth`` (zeros beyond the volume), cropped back to the chunk."""
    out = func(pad_halo(regions[0], ranges, lo, hi, depth, "constant"), **kwargs)
    return out[tuple(slice(d, d + b - a) for (a, b), d in zip(ranges, depth))]


def _geometry(vol: Any, spacing_mm: Any) -> tuple[da.Array, tuple[float, float, float]]:
    """The input's dask array and voxel size (from the affine of a volume, refusing sheared axes)."""
    if isinstance(vol, xr.DataArray):
        if vol.ndim != 3:
            raise HelmError(f"the closing needs a 3-D volume, got dims {vol.dims}")
        a = affine_of(vol)
        m = a[:3, :3]
        sp = spacing_of(a)
        gram = (m.T @ m) / np.outer(sp, sp)
        if np.abs(gram - np.eye(3)).max() > 1e-6:
            raise HelmError(
                "the volume's affine has sheared voxel axes: a sphere in mm is not an ellipsoid in voxels there",
                hint="resample it to an orthogonal grid first",
            )
        data = as_dask(vol)
        return data, _spacing3(sp)
    if spacing_mm is None:
        raise HelmError("spacing_mm is required when the input is a plain array (a volume carries its affine)")
    data = as_dask(vol)
    if data.ndim != 3:
        raise HelmError(f"the closing needs a 3-D array, got shape {data.shape}")
    return data, _spacing3(spacing_mm)


def binary_closing_mm(mask: Any, radius_mm: float, *, spacing_mm: Any = None) -> Any:
    """Exact closing of a binary volume with a sphere of radius ``radius_mm`` (lazy, chunked).

    Parameters
    ----------
    mask : xarray.DataArray volume, dask or NumPy array
        Nonzero voxels form the set. A volume gives its spacing through its affine.
    radius_mm : float
        Sphere radius in mm (0: no change).
    spacing_mm : float or 3 floats, optional
        Voxel size, required for plain arrays.

    Returns
    -------
    xarray.DataArray or dask.array.Array
        A ``kind="mask"`` uint8 (0/1) volume for a volume input (same affine), else a lazy dask bool array.
        Equal to ``scipy.ndimage.binary_closing(np.pad(m, h), ball(radius_mm, spacing))`` cropped back
        (``docs/method/merge.md``), for any chunking.

    Example
    -------
    >>> m = np.zeros((16, 16, 16), bool); m[4:12, 4:12, 4:7] = m[4:12, 4:12, 8:12] = True
    >>> c = binary_closing_mm(da.from_array(m, chunks=5), 0.6, spacing_mm=0.3).compute()
    >>> bool(c[8, 8, 7]), int(c.sum() - m.sum())
    (True, 36)
    """
    data, spacing = _geometry(mask, spacing_mm)
    r = _radius(radius_mm)
    half = half_extent(r, spacing)
    out = _overlap_apply(data, _closing_block, tuple(2 * h for h in half), bool, spacing=spacing, half=half, r2=_r2(r))
    if isinstance(mask, xr.DataArray):
        return like(
            mask,
            out.astype(np.uint8),
            kind="mask",
            step=provenance_record("closing.binary_closing_mm", {"radius_mm": r, "spacing_mm": list(spacing)}),
        )
    return out


def close_labels(labels_vol: xr.DataArray, radius_mm: float = 1.2, *, codes: Any = None) -> xr.DataArray:
    """Close the union of the manual labels with a sphere in mm; added voxels take the nearest label (lazy).

    Parameters
    ----------
    labels_vol : xarray.DataArray
        Manual labels (e.g. 801-810, 250 for the fornix; 0 background) on the working grid.
    radius_mm : float
        Sphere radius, ``--closing-radius-mm`` (1.2 in the paper; 0 leaves the labels as they are).
    codes : sequence of int, optional
        The label values that form the manual set; other nonzero values are dropped (0 in the output).
        Default: every nonzero value.

    Returns
    -------
    xarray.DataArray
        ``kind="labels"`` uint16, same grid. Manual voxels keep their code; each voxel the closing adds gets the
        code of the nearest manual voxel in mm (ties within a relative 1e-9: smallest code). Identical for any
        chunking. It does not depend on k: compute it once and :func:`merge_labels` it into every k-means map.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((9, 9, 9), np.uint16); lab[1:4, 2:7, 2:7] = 801; lab[6:8, 2:7, 2:7] = 802
    >>> v = make_volume(da.from_array(lab, chunks=4), np.eye(4), kind="labels")
    >>> c = close_labels(v, 1.5).values                 # a 2-voxel gap between two plates, x = 4 and 5
    >>> c[4, 1:8, 4].tolist(), c[5, 1:8, 4].tolist()
    ([0, 801, 801, 801, 801, 801, 0], [0, 802, 802, 802, 802, 802, 0])
    """
    data, spacing = _geometry(labels_vol, None)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.bool_)):
        raise HelmError(
            f"manual labels must be integer codes, got dtype {data.dtype}",
            hint="validate them with helm_dask.labels.validate_manual_labels first",
        )
    r = _radius(radius_mm)
    code_arr = None if codes is None else np.unique(np.asarray(list(codes), dtype=np.int64))
    if code_arr is not None and (code_arr.size == 0 or code_arr.min() < 1 or code_arr.max() > 65535):
        raise HelmError(f"codes must be label values in 1..65535, got {list(codes)!r}")
    half = half_extent(r, spacing)
    out = _overlap_apply(
        data,
        _close_labels_block,
        tuple(2 * h for h in half),
        np.uint16,
        spacing=spacing,
        half=half,
        r2=_r2(r),
        codes=code_arr,
    )
    params = {
        "radius_mm": r,
        "spacing_mm": list(spacing),
        "depth_voxels": [2 * h for h in half],
        "codes": None if code_arr is None else code_arr.tolist(),
    }
    return like(labels_vol, out, kind="labels", step=provenance_record("closing.close_labels", params))


def _merge_block(km: np.ndarray, man: np.ndarray) -> np.ndarray:
    """Manual codes where there are any, k-means clusters elsewhere."""
    return np.where(man != 0, man, km).astype(np.uint16)


def merge_labels(kmeans_vol: xr.DataArray, closed_labels_vol: xr.DataArray) -> xr.DataArray:
    """Manual (closed) labels override the k-means clusters: ``closed if closed != 0 else kmeans`` (lazy).

    Parameters
    ----------
    kmeans_vol : xarray.DataArray
        A k-means cluster map.
    closed_labels_vol : xarray.DataArray
        The closed manual labels (:func:`close_labels`) on the same grid (shape and affine).

    Returns
    -------
    xarray.DataArray
        uint16, ``kind="labels"``, on the k-means map's chunks and with its attributes.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> km = make_volume(da.from_array(np.array([1, 2, 3, 0], np.uint8).reshape(4, 1, 1)), np.eye(4), kind="labels")
    >>> man = make_volume(da.from_array(np.array([0, 801, 0, 250], np.uint16).reshape(4, 1, 1)), np.eye(4),
    ...                   kind="labels")
    >>> merge_labels(km, man).values.ravel().tolist()
    [1, 801, 3, 250]
    """
    if kmeans_vol.shape != closed_labels_vol.shape:
        raise HelmError(
            f"the k-means map {kmeans_vol.shape} and the manual labels {closed_labels_vol.shape} "
            "are not on the same grid",
            hint="resample the labels to the working grid first",
        )
    a, b = affine_of(kmeans_vol), affine_of(closed_labels_vol)
    if not np.allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(a).max()))):
        raise HelmError(
            "the k-means map and the manual labels have different affines (not the same grid)",
            hint="resample the labels to the working grid first",
        )
    km, man = as_dask(kmeans_vol), as_dask(closed_labels_vol)
    man = man.rechunk(km.chunks)
    out = da.map_blocks(_merge_block, km, man, dtype=np.uint16)
    return like(kmeans_vol, out, kind="labels", step=provenance_record("closing.merge_labels", {}))


def _overlay_block(closed: np.ndarray, manual: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The manual voxels of ``codes`` over the closed labels."""
    keep = np.isin(manual, codes)
    return np.where(keep, manual, closed).astype(np.uint16)


def overlay_labels(closed_vol: xr.DataArray, manual_vol: xr.DataArray, codes: Any) -> xr.DataArray:
    """The manual voxels of ``codes`` (``--extra-labels``) written over the closed hypothalamus labels (lazy).

    Users' own structures do not join the closing (it would bridge them with their neighbours, and they are drawn
    as the user wants them): they keep exactly their manual voxels, and win over the closing's additions there.

    Parameters
    ----------
    closed_vol : xarray.DataArray
        :func:`close_labels` of the hypothalamus codes.
    manual_vol : xarray.DataArray
        The manual labels on the same grid.
    codes : sequence of int
        The codes laid over.

    Returns
    -------
    xarray.DataArray
        uint16, ``kind="labels"``.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> man = make_volume(da.from_array(np.array([801, 0, 2000, 0], np.uint16).reshape(4, 1, 1)), np.eye(4))
    >>> closed = make_volume(da.from_array(np.array([801, 801, 801, 0], np.uint16).reshape(4, 1, 1)), np.eye(4))
    >>> overlay_labels(closed, man, [2000]).values.ravel().tolist()
    [801, 801, 2000, 0]
    """
    code_arr = np.unique(np.asarray(list(codes), dtype=np.int64))
    c, m = as_dask(closed_vol), as_dask(manual_vol)
    out = da.map_blocks(_overlay_block, c, m.rechunk(c.chunks), codes=code_arr, dtype=np.uint16)
    step = provenance_record("closing.overlay_labels", {"codes": code_arr.tolist()})
    return like(closed_vol, out, kind="labels", step=step)


def _added_by_label(regions: list) -> dict[int, int]:
    """Voxels the closing added (closed, not manual) per label code, in one chunk ``[closed, manual]``."""
    closed, manual = regions
    if not closed.any():
        return {}
    added = (closed != 0) & (manual == 0)
    if not added.any():
        return {}
    codes, n = np.unique(closed[added], return_counts=True)
    return {int(c): int(x) for c, x in zip(codes.tolist(), n.tolist())}


def _added_by_cluster(regions: list) -> list[dict[int, int]]:
    """Per k-means map: voxels the closing added, by the cluster they took over (0: outside the mask), in one
    chunk ``[closed, manual, *kmeans maps]``."""
    closed, manual, *kms = regions
    added = (closed != 0) & (manual == 0)
    out = []
    for km in kms:
        codes, n = np.unique(km[added], return_counts=True)
        out.append({int(c): int(x) for c, x in zip(codes.tolist(), n.tolist())})
    return out


def closing_additions(
    manual_vol: xr.DataArray, closed_vol: xr.DataArray, kmeans_vols: dict | None = None
) -> dict[str, Any]:
    """How many voxels the closing added, per label and per k-means cluster it took over (eager; small result).

    Two passes over the label chunks: the first counts the additions per label in every chunk (label volumes are
    mostly empty), the second reads the k-means maps only in the chunks that have additions.

    Parameters
    ----------
    manual_vol : xarray.DataArray
        The manual labels (``hypothalamus``).
    closed_vol : xarray.DataArray
        The closed labels (``closed_labels``), same grid.
    kmeans_vols : dict, optional
        ``{k: k-means map}`` on the same grid.

    Returns
    -------
    dict
        ``{"by_label": {code: voxels}, "by_cluster": {k: {cluster: voxels}}, "voxel_mm3": float}`` (string keys,
        JSON-ready; cluster 0 is outside the brain mask).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = lambda a: make_volume(da.from_array(np.array(a, np.uint16).reshape(-1, 1, 1), chunks=2), np.eye(4))
    >>> closing_additions(v([801, 0, 0, 250]), v([801, 801, 801, 250]), {4: v([1, 2, 3, 4])})["by_cluster"]
    {'4': {'2': 1, '3': 1}}
    """
    closed, man = as_dask(closed_vol), as_dask(manual_vol)
    # chunk_tasks: each task reads its chunks of every map itself (separate read tasks cost a transfer of one of
    # the two per chunk: 1.6 -> 0.6 s for the 0.2 mm phantom's 140 chunks)
    per_block = dask.compute(*chunk_tasks(_added_by_label, [closed, man], name="closing-added"))
    by_label: dict[int, int] = {}
    hit = []
    for i, d in enumerate(per_block):
        for c, n in d.items():
            by_label[c] = by_label.get(c, 0) + n
        if d:
            hit.append(i)
    kmeans_vols = dict(kmeans_vols or {})
    ks = sorted(kmeans_vols)
    by_cluster: dict[int, dict[int, int]] = {k: {} for k in ks}
    if ks and hit:
        kms = [as_dask(kmeans_vols[k]) for k in ks]
        tasks = chunk_tasks(_added_by_cluster, [closed, man, *kms], name="closing-added-by-cluster")
        for part in dask.compute(*[tasks[i] for i in hit]):  # only the chunks with additions are read
            for k, d in zip(ks, part):
                for c, n in d.items():
                    by_cluster[k][c] = by_cluster[k].get(c, 0) + n
    vox = float(abs(np.linalg.det(affine_of(closed_vol)[:3, :3]))) if isinstance(closed_vol, xr.DataArray) else 1.0
    return {
        "by_label": {str(c): by_label[c] for c in sorted(by_label)},
        "by_cluster": {str(k): {str(c): v[c] for c in sorted(v)} for k, v in by_cluster.items()},
        "voxel_mm3": vox,
    }
