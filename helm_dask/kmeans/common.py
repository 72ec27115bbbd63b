"""What the k-means methods share: the fitted result (:class:`KMeansResult`) and its float32 decision thresholds,
the checks of the inputs and of the data, the plumbing that runs one task per chunk and reduces the parts in a
fixed-shape tree, and the exact inertia pass that scores the approximate methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..arrays import FAN_IN, as_dask, tree_reduce
from ..errors import HelmError
from ..io.regions import chunk_tasks
from ..labels import K_MAX, K_MIN
from ..volume import affine_of

TIE_RULE = "a value exactly at the midpoint of two centroids goes to the upper cluster"

_DEFAULT_CHUNKS = (128, 128, 128)
_FAN_IN = FAN_IN  # tree-reduction fan-in of per-chunk histograms


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

    Example
    -------
    >>> r = KMeansResult(2, [1.0, 3.0], 2.0, "histogram", 4)
    >>> r.thresholds
    array([2.], dtype=float32)
    >>> KMeansResult.from_dict(r.to_dict()).centroids.tolist()
    [1.0, 3.0]
    """

    k: int
    centroids: np.ndarray
    inertia: float
    method: str
    n_voxels: int
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
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
# Inputs and data checks
# --------------------------------------------------------------------------------------------------------------


def _as_dask(x: Any) -> da.Array:
    shape = np.shape(x.data if isinstance(x, xr.DataArray) else x)
    return as_dask(x, chunks=tuple(min(c, s) for c, s in zip(_DEFAULT_CHUNKS, shape)) if len(shape) == 3 else "auto")


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


def _masked_f32(img: np.ndarray, msk: np.ndarray) -> np.ndarray:
    """Intensities inside the mask (C order) as float32, with -0.0 turned into +0.0 (one value, one bin)."""
    v = np.asarray(img)[np.asarray(msk) != 0].astype(np.float32, copy=False)
    # adding +0.0 is a full copy: pay for it only when some sign bit is set (any -0.0 has one)
    if v.size and v.view(np.uint32).max() >= 0x80000000:
        v = v + np.float32(0.0)
    return v


def _flat_inputs(img: np.ndarray, msk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's float32 values and mask as flat arrays for the compiled loops (views when contiguous)."""
    v = np.ascontiguousarray(np.asarray(img), dtype=np.float32).reshape(-1)
    m = np.asarray(msk)
    if m.dtype != np.bool_ and m.dtype != np.uint8:
        m = m != 0
    return v, np.ascontiguousarray(m).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# One task per chunk, tree reductions
# --------------------------------------------------------------------------------------------------------------


def _on_pair(regions: list, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(regions[0], regions[1], *args)


def _pair_tasks(img: da.Array, msk: da.Array, fn: Callable[..., Any], *args: Any) -> list:
    """One delayed ``fn(image chunk, mask chunk, *args)`` per image chunk.

    Volumes opened from a store are read inside the task (image and mask together): no separate read tasks whose
    decoded chunks the scheduler would hold or move between workers -- the passes then cost little more than
    decoding.
    """
    return chunk_tasks(_on_pair, [img, msk], fn, *args, name=f"kmeans{fn.__name__}")


def _block_pairs(img: da.Array, msk: da.Array) -> list[tuple]:
    bi = img.to_delayed().ravel()
    bm = msk.to_delayed().ravel()
    return list(zip(bi, bm))


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
    (tot,) = dask.compute(tree_reduce(parts, _sum_arrays))
    out, i = [], 0
    for c in cents:
        out.append((float(tot[i]), np.rint(tot[i + 1 : i + 1 + c.size]).astype(np.int64)))
        i += 1 + c.size
    return out
