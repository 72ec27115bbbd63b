"""The exact ``"histogram"`` k-means method (the default): one exact integer histogram pass, Lloyd on the bins
for every k from several deterministic starts, then refinement passes that resolve the few bins straddling a
decision midpoint until the result is the fixed point of full-precision Lloyd on the voxels (the method is
described in ``docs/method/kmeans.md``). Entry point: :func:`_fit_histogram`, called by
:func:`helm_dask.kmeans.fit_kmeans`."""

from __future__ import annotations

import dask.array as da
import numpy as np

from ..errors import HelmError
from .binning import _histogram_pass, _refine_pass, _shift_for
from .common import TIE_RULE, KMeansResult, _check_data, _check_distinct, _thresholds
from .lloyd import _dp_inits, _fit_bins, _lloyd, _Points


def _qc_histogram(P: _Points, n: int = 128) -> dict:
    lo, hi = float(P.p[0]), float(P.p[-1])
    edges = np.linspace(lo, hi, n + 1) if hi > lo else np.array([lo - 0.5, hi + 0.5])
    counts, _ = np.histogram(P.p, bins=edges, weights=P.w)
    return {
        "edges": edges.tolist(),
        "counts": np.rint(counts).astype(np.int64).tolist(),
        "note": "QC only: counts of the fine bins, each placed at its mean",
    }


def _fit_histogram(
    img: da.Array,
    msk: da.Array,
    ks: list[int],
    *,
    seed: int,
    n_bins: int,
    n_init: int,
    max_refine_passes: int,
    max_iter: int,
) -> dict[int, KMeansResult]:
    """The ``"histogram"`` method of :func:`helm_dask.kmeans.fit_kmeans` on checked inputs."""
    if int(n_init) < 0 or int(max_refine_passes) < 0 or int(max_iter) < 1:
        raise HelmError("n_init and max_refine_passes must be >= 0 and max_iter >= 1")
    n_init, max_refine_passes, max_iter = int(n_init), int(max_refine_passes), int(max_iter)
    s = _shift_for(n_bins)
    hist, refined, passes = _first_passes(img, msk, s, ks)
    n_vox = int(hist[1].sum())
    P = _Points(hist, s, refined)
    if refined:  # every bin resolved: the points are the distinct intensities
        _check_distinct(ks, len(P))
    # (otherwise there are >= max(ks) non-empty bins, hence >= max(ks) distinct intensities)
    dp = _dp_inits(P, ks)
    fits = {k: _fit_bins(P, k, seed, n_init, max_iter, dp.get(k)) for k in ks}
    P, n_refine = _refine_fits(img, msk, s, hist, refined, P, fits, max_refine_passes, max_iter)
    run = {
        "data_passes": passes + n_refine,
        "n_bins_per_octave": int(n_bins),
        "n_hist_bins": int(hist[0].size),
        "n_refined_bins": len(refined),
        "seed": int(seed),
    }
    return _histogram_results(P, fits, n_vox, run)


def _first_passes(img: da.Array, msk: da.Array, s: int, ks: list[int]) -> tuple[tuple, dict[int, tuple], int]:
    """Pass 1 with the data checks, and a pass resolving every bin when there are fewer bins than some k.

    Returns the histogram, the refined bins (``{key: (values, counts)}``) and the number of passes made.
    """
    hist = _histogram_pass(img, msk, s)
    passes = 1
    key, cnt = hist[0], hist[1]
    _check_data(int(cnt.sum()), int(hist[4]))
    refined: dict[int, tuple] = {}
    if key.size < max(ks):
        # fewer bins than k: resolve every bin to exact values so that distinct intensities are counted exactly
        refined.update(_refine_pass(img, msk, s, key))
        passes += 1
    return hist, refined, passes


def _refine_fits(
    img: da.Array,
    msk: da.Array,
    s: int,
    hist: tuple,
    refined: dict[int, tuple],
    P: _Points,
    fits: dict[int, dict],
    max_refine_passes: int,
    max_iter: int,
) -> tuple[_Points, int]:
    """Refinement passes: resolve the bins that straddle a midpoint of some fit and resume Lloyd, until none does.

    ``refined`` and ``fits`` are updated in place; returns the final points and the number of passes made.
    """
    passes = 0
    for _ in range(max_refine_passes):
        todo = np.unique(np.concatenate([P.key[P.straddlers(f["centroids"])] for f in fits.values()]))
        if todo.size == 0:
            break
        refined.update(_refine_pass(img, msk, s, todo))
        passes += 1
        P = _Points(hist, s, refined)
        for f in fits.values():
            c, n_iter, conv = _lloyd(P, f["centroids"], max_iter)
            f.update(centroids=c, n_iter=f["n_iter"] + n_iter, converged=conv, inertia=P.inertia(c))
    return P, passes


def _histogram_results(P: _Points, fits: dict[int, dict], n_vox: int, run: dict) -> dict[int, KMeansResult]:
    """One result per k from the final points, with the run's details (``run``) and the fit's in ``extra``."""
    qc = _qc_histogram(P)
    out = {}
    for k, f in fits.items():
        c = f["centroids"]
        b = P.bounds(c)
        sizes = np.rint(P.cw[b[1:]] - P.cw[b[:-1]]).astype(np.int64)
        # exact: Lloyd converged and no bin of unknown values straddles a midpoint, so the centroids are the
        # exact means of the voxel clusters and the inertia is the exact inertia of the label map
        exact = bool(f["converged"] and P.straddlers(c).size == 0)
        extra = {
            "data_passes": run["data_passes"],
            "exact": exact,
            "converged": f["converged"],
            "n_bins_per_octave": run["n_bins_per_octave"],
            "n_hist_bins": run["n_hist_bins"],
            "n_refined_bins": run["n_refined_bins"],
            "init": f["init"],
            "n_inits": f["n_inits"],
            "n_iter": int(f["n_iter"]),
            "seed": run["seed"],
            "cluster_sizes": sizes,
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": True,
            "histogram": qc,
        }
        out[k] = KMeansResult(k, c, P.inertia(c, b), "histogram", n_vox, extra)
    return out
