"""Stage 5: whole-brain k-means on the intensities inside the brain mask, every k from one pass.
:func:`fit_kmeans` fits 1-D k-means for every k with one of three methods (:data:`METHODS`): ``"histogram"``
(default, exact and chunking-independent: :mod:`.histogram`, on the passes of :mod:`.binning` and the Lloyd of
:mod:`.lloyd`), ``"minibatch"`` (:mod:`.minibatch`) and ``"dask-ml"`` (:mod:`.daskml`), the latter two for
comparison; it returns small :class:`KMeansResult` objects, from which :func:`kmeans_labels` and
:func:`kmeans_maps` (:mod:`.labelling`) make the lazy label maps. How and why the methods work is told in
``docs/method/kmeans.md``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import HelmError
from ..labels import DEFAULT_KS, K_MAX, K_MIN
from .binning import _DENSE_SPAN as _DENSE_SPAN
from .binning import _hist_block as _hist_block
from .binning import _hist_block_np as _hist_block_np
from .binning import _keys as _keys
from .binning import _refine_block as _refine_block
from .binning import _shift_for as _shift_for
from .common import TIE_RULE, KMeansResult, _check_ks, _inputs
from .common import _masked_f32 as _masked_f32
from .daskml import _fit_daskml
from .histogram import _fit_histogram
from .labelling import kmeans_labels, kmeans_maps
from .minibatch import _fit_minibatch

__all__ = [
    "KMeansResult",
    "fit_kmeans",
    "kmeans_labels",
    "kmeans_maps",
    "METHODS",
    "TIE_RULE",
    "K_MIN",
    "K_MAX",
    "DEFAULT_KS",
]

METHODS = ("histogram", "minibatch", "dask-ml")


def fit_kmeans(
    image: Any,
    mask: Any,
    *,
    ks: Iterable[int] | int = DEFAULT_KS,
    method: str = "histogram",
    seed: int = 0,
    n_bins: int = 2048,
    n_init: int = 10,
    max_refine_passes: int = 2,
    max_iter: int = 10000,
    batch_size: int = 65536,
    n_epochs: int = 1,
    block_shape: Any = (128, 128, 128),
    blocks_per_compute: int = 4,
    init_size: int = 1 << 17,
) -> dict[int, KMeansResult]:
    """Fit 1-D k-means to the intensities inside ``mask`` for every k in ``ks``, from as few passes as possible.

    Computes eagerly and returns only small fitted parameters; the label maps are made lazily by
    :func:`kmeans_labels`. Passes over the volume (``extra["data_passes"]``): ``"histogram"`` 1 + the
    refinement passes, usually 2 in all for every k together; ``"minibatch"`` 2 + ``n_epochs``; ``"dask-ml"``
    many. Memory per task is bounded by the chunk (plus a histogram of at most ~1e6 bins).

    Parameters
    ----------
    image : xarray.DataArray or array
        3-D intensity volume (lazy; clustered as float32).
    mask : xarray.DataArray or array
        Brain mask on the same grid; voxels with ``mask != 0`` are clustered.
    ks : iterable of int or int
        Numbers of clusters, each in 2..20 (default 4..9). All are fitted from the same pass(es).
    method : {"histogram", "minibatch", "dask-ml"}
        ``"histogram"`` (default) is exact and chunking-independent; the others are for comparison.
    seed : int
        Seed of every random choice (k-means++ starts, minibatch stream and models, dask-ml).
    n_bins : int
        ``"histogram"``: bins per octave (factor-of-two intensity range), a power of two in 256..65536;
        default 2048 = bins 0.05 % wide. Finer bins straddle fewer midpoints but cost memory per chunk.
    n_init : int
        ``"histogram"``: number of weighted k-means++ starts, in addition to the dynamic-programming and
        quantile starts (all deterministic; the lowest inertia wins).
    max_refine_passes : int
        ``"histogram"``: at most this many extra passes to resolve bins straddling a midpoint (0 = one pass
        only, then ``extra["exact"]`` may be False).
    max_iter : int
        ``"histogram"``: Lloyd iterations per start (on bins: microseconds each).
    batch_size, n_epochs, block_shape, blocks_per_compute, init_size
        ``"minibatch"``: batch size; passes of the stream; the fixed block grid that defines the stream
        (independent of the chunking); blocks read per compute; size of the uniform random sample (chosen
        by a hash of the global voxel index) whose optimal k-means clustering initialises the models.

    Returns
    -------
    dict of int to KMeansResult
        One result per k, centroids ascending (label j + 1 <-> ``centroids[j]``).

    Raises
    ------
    HelmError
        k outside 2..20, an empty mask, fewer distinct intensities in the mask than some k, NaN/inf inside the
        mask, unknown method, dask-ml missing.

    Example
    -------
    >>> import numpy as np
    >>> img = np.repeat([1.0, 2.0, 5.0, 6.0], 16).reshape(4, 4, 4)
    >>> res = fit_kmeans(img, np.ones((4, 4, 4)), ks=[2])
    >>> res[2].centroids.tolist(), res[2].inertia
    ([1.5, 5.5], 16.0)
    """
    ks_ = _check_ks(ks)
    if method not in METHODS:
        raise HelmError(f"unknown k-means method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    seed = int(seed)
    img, msk = _inputs(image, mask)
    if method == "histogram":
        kw = {"n_bins": n_bins, "n_init": n_init, "max_refine_passes": max_refine_passes, "max_iter": max_iter}
        return _fit_histogram(img, msk, ks_, seed=seed, **kw)
    if method == "minibatch":
        return _fit_minibatch(
            img,
            msk,
            ks_,
            seed=seed,
            batch_size=batch_size,
            block_shape=block_shape,
            blocks_per_compute=max(1, int(blocks_per_compute)),
            n_init=int(n_init),
            n_epochs=n_epochs,
            init_size=init_size,
        )
    return _fit_daskml(img, msk, ks_, seed=seed, n_bins=n_bins)
