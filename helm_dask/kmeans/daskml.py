"""The ``"dask-ml"`` k-means method (for comparison): ``dask_ml.cluster.KMeans`` (k-means|| initialisation, then
parallel Lloyd) on the masked voxels, validated by the exact histogram pass and scored by the exact inertia pass;
it makes many passes and depends on the chunking (see ``docs/method/kmeans.md``). dask-ml is optional. Entry
point: :func:`_fit_daskml`, called by :func:`helm_dask.kmeans.fit_kmeans`."""

from __future__ import annotations

import dask.array as da
import numpy as np

from ..errors import HelmError
from .binning import _histogram_pass, _refine_pass, _shift_for
from .common import TIE_RULE, KMeansResult, _check_data, _check_distinct, _inertia_pass, _thresholds
from .lloyd import _Points


def _fit_daskml(img: da.Array, msk: da.Array, ks: list[int], *, seed: int, n_bins: int) -> dict[int, KMeansResult]:
    """The ``"dask-ml"`` method of :func:`helm_dask.kmeans.fit_kmeans` on checked inputs."""
    try:
        from dask_ml.cluster import KMeans as DaskKMeans
    except ImportError:
        raise HelmError(
            "method='dask-ml' needs the optional package dask-ml, which is not installed",
            hint="pip install dask-ml, or use method='histogram' (exact, the default)",
        ) from None
    # validation (empty mask, non-finite values, distinct intensities) from the exact histogram pass
    s = _shift_for(n_bins)
    hist = _histogram_pass(img, msk, s)
    _check_data(int(hist[1].sum()), int(hist[4]))
    n_vox = int(hist[1].sum())
    if hist[0].size < max(ks):
        P = _Points(hist, s, _refine_pass(img, msk, s, hist[0]))
        _check_distinct(ks, len(P))
    vals = img.astype(np.float32)[msk != 0]
    vals.compute_chunk_sizes()
    X = vals.astype(np.float64)[:, None]
    cents, iters = [], []
    for k in ks:
        km = DaskKMeans(n_clusters=k, init="k-means||", random_state=seed).fit(X)
        cents.append(np.sort(np.asarray(km.cluster_centers_, dtype=np.float64).ravel()))
        iters.append(int(getattr(km, "n_iter_", -1)))
    stats = _inertia_pass(img, msk, cents)
    out = {}
    for k, c, it, (inert, sizes) in zip(ks, cents, iters, stats):
        extra = {
            "n_iter": it,
            "seed": int(seed),
            "cluster_sizes": sizes,
            "data_passes": "many: a validation pass, a chunk-size pass, then per k one per k-means|| "
            "round and Lloyd iteration, and a final inertia pass",
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": False,
        }
        out[k] = KMeansResult(k, c, inert, "dask-ml", n_vox, extra)
    return out
