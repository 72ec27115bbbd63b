"""Label maps from fitted k-means: :func:`kmeans_labels` (one k) and :func:`kmeans_maps` (every k from one task
per chunk) look each voxel up, lazily and per chunk, against the float32 thresholds between the sorted centroids,
so the maps are bit-identical for any chunking; a voxel exactly at a midpoint goes to the upper cluster."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..arrays import plane
from ..volume import like, provenance_record
from .common import TIE_RULE, KMeansResult, _flat_inputs, _inputs
from .kernels import _labels_nb


def _label_block(img: np.ndarray, msk: np.ndarray, *, thresholds: np.ndarray) -> np.ndarray:
    """One k's labels of one chunk: the number of thresholds <= each value, plus 1; 0 outside the mask."""
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
        The fit to apply (:func:`~helm_dask.kmeans.fit_kmeans` gives one per k).

    Returns
    -------
    xarray.DataArray
        ``kind="labels"`` volume with the image's affine (a dask array when ``image`` is not a DataArray).

    Examples
    --------
    >>> import numpy as np
    >>> r = KMeansResult(2, [1.5, 5.5], 16.0, "histogram", 64)
    >>> kmeans_labels(np.array([1.0, 3.5, 6.0]).reshape(1, 1, 3), np.ones((1, 1, 3)), r).compute().ravel()
    array([1, 2, 2], dtype=uint8)

    On volumes, after :func:`~helm_dask.kmeans.fit_kmeans`:

    >>> import dask.array as da
    >>> from helm_dask.kmeans import fit_kmeans
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

    Parameters
    ----------
    image, mask : xarray.DataArray (or arrays)
        As given to :func:`~helm_dask.kmeans.fit_kmeans`.
    results : mapping of int to KMeansResult (or its dict)
        The fits by k, as :func:`~helm_dask.kmeans.fit_kmeans` returns them.

    Returns
    -------
    dict of int to xarray.DataArray
        One lazy label map per k (dask arrays when ``image`` is not a DataArray), all from one task per chunk.

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
    return {k: _label_volume(image, plane(stack, i), r) for i, (k, r) in enumerate(zip(ks, res))}
