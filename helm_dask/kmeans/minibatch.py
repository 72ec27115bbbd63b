"""The ``"minibatch"`` k-means method (for comparison): scikit-learn ``MiniBatchKMeans.partial_fit`` models, one
per k, initialised at the optimal k-means of a uniform random sample of the mask and fed one stream defined on a
fixed block grid with seeded orders, so that the result does not depend on the chunking (described in
``docs/method/kmeans.md``). Entry point: :func:`_fit_minibatch`, called by :func:`helm_dask.kmeans.fit_kmeans`."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np

from ..errors import HelmError
from ..io.regions import chunk_edges
from ..labels import K_MAX
from .common import (
    _FAN_IN,
    TIE_RULE,
    KMeansResult,
    _block_pairs,
    _check_data,
    _check_distinct,
    _inertia_pass,
    _masked_f32,
    _thresholds,
)
from .lloyd import _dp_inits, _fit_bins, _Points

_U64 = TypeVar("_U64", np.ndarray, np.uint64)


def _grid_blocks(shape: tuple[int, ...], block_shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Slices of a fixed block grid, in C order of the block indices."""
    starts = [range(0, n, b) for n, b in zip(shape, block_shape)]
    return [
        tuple(slice(i, min(i + b, n)) for i, b, n in zip(corner, block_shape, shape))
        for corner in itertools.product(*starts)
    ]


def _splitmix64(x: _U64) -> _U64:
    """A bijective 64-bit mixer (SplitMix64 finaliser): a reproducible pseudo-random key per voxel index."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _sample_block(img: np.ndarray, msk: np.ndarray, offset: tuple, shape: tuple, size: int, seed: int) -> tuple:
    """Per chunk: the ``size`` mask voxels with the smallest keys, voxel count, non-finite count, a few values.

    The key of a voxel is a hash of its *global* linear index and the seed, so the union over chunks of the
    smallest keys is a uniform random sample that does not depend on the chunking.
    """
    m = np.asarray(msk) != 0
    v = _masked_f32(img, m)
    nonfinite = int(v.size - np.count_nonzero(np.isfinite(v)))
    distinct = np.unique(v[np.isfinite(v)])[: K_MAX + 1]
    if v.size == 0:
        return np.zeros(0, np.uint64), v, 0, nonfinite, distinct
    ijk = [a.astype(np.int64) + o for a, o in zip(np.nonzero(m), offset)]
    idx = np.ravel_multi_index(ijk, shape).astype(np.uint64)
    key = _splitmix64(idx ^ _splitmix64(np.uint64(seed)))
    if key.size > size:
        keep = np.argpartition(key, size - 1)[:size]
        key, v_s = key[keep], v[keep]
    else:
        v_s = v
    return key, v_s, int(v.size), nonfinite, distinct


def _merge_samples(*parts: tuple, size: int) -> tuple:
    key = np.concatenate([p[0] for p in parts])
    val = np.concatenate([p[1] for p in parts])
    order = np.argsort(key)[:size]  # keys are distinct (bijective hash of distinct indices)
    distinct = np.unique(np.concatenate([p[4] for p in parts]))[: K_MAX + 1]
    return key[order], val[order], sum(p[2] for p in parts), sum(p[3] for p in parts), distinct


def _sample_pass(img: da.Array, msk: da.Array, size: int, seed: int) -> tuple:
    """One pass: uniform random sample of ``size`` mask voxels (in random order), counts, distinct values."""
    offsets = list(itertools.product(*[e[:-1].tolist() for e in chunk_edges(img.chunks)]))
    parts = [
        dask.delayed(_sample_block, pure=True)(bi, bm, tuple(int(o) for o in off), img.shape, size, seed)
        for (bi, bm), off in zip(_block_pairs(img, msk), offsets)
    ]
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge_samples, pure=True)(*parts[i : i + _FAN_IN], size=size)
            for i in range(0, len(parts), _FAN_IN)
        ]
    (res,) = dask.compute(parts[0])
    return res


def _init_centres(x: np.ndarray, ks: list[int], seed: int, n_init: int) -> dict[int, np.ndarray]:
    """Initial centres: the k-means optimum of the uniform random sample (as the histogram method finds it).

    A single pass of mini-batch updates cannot leave the basin of its seeding, and k-means++ seedings of 1-D
    intensities with k = 4..9 land 1-15 % above the optimum on the phantom (so does scikit-learn's in-memory
    ``MiniBatchKMeans(n_init=10).fit``); starting from the best clustering of the sample fixes that.
    """
    P = _Points.from_values(x)
    dp = _dp_inits(P, ks)
    return {k: _fit_bins(P, k, seed, n_init, 10000, dp.get(k))["centroids"] for k in ks}


def _fit_minibatch(img: da.Array, msk: da.Array, ks: list[int], **kw: Any) -> dict[int, KMeansResult]:
    """The ``"minibatch"`` method of :func:`helm_dask.kmeans.fit_kmeans` on checked inputs (keywords as there)."""
    from threadpoolctl import threadpool_limits

    # scikit-learn's OpenMP threads on 1-D batches of ~1e4..1e5 values cost more than they save, and they
    # oversubscribe the cores dask is already using
    with threadpool_limits(limits=1):
        return _fit_minibatch_1(img, msk, ks, **kw)


def _fit_minibatch_1(
    img: da.Array,
    msk: da.Array,
    ks: list[int],
    *,
    seed: int,
    batch_size: int,
    block_shape: Any,
    blocks_per_compute: int,
    n_init: int,
    n_epochs: int,
    init_size: int,
) -> dict[int, KMeansResult]:
    batch_size = int(batch_size)
    if batch_size < K_MAX:
        raise HelmError(f"batch_size must be at least {K_MAX}, got {batch_size}")
    if int(n_epochs) < 1:
        raise HelmError(f"n_epochs must be >= 1, got {n_epochs}")
    init_size = int(init_size)
    models, n_vox, n_sample = _init_models(img, msk, ks, seed, batch_size, n_init, init_size)
    block_shape = tuple(int(b) for b in (block_shape if np.ndim(block_shape) else (block_shape,) * 3))
    _stream(img, msk, list(models.values()), seed, batch_size, block_shape, blocks_per_compute, n_epochs)
    cents = [np.sort(models[k].cluster_centers_.ravel()) for k in ks]
    # last pass: exact inertia and cluster sizes of the label maps
    stats = _inertia_pass(img, msk, cents)
    out = {}
    for k, c, (inert, sizes) in zip(ks, cents, stats):
        extra = {
            "data_passes": int(n_epochs) + 2,
            "batch_size": batch_size,
            "block_shape": list(block_shape),
            "n_epochs": int(n_epochs),
            "init_size": n_sample,
            "n_steps": int(models[k].n_steps_),
            "seed": int(seed),
            "cluster_sizes": sizes,
            "thresholds": _thresholds(c).astype(np.float64),
            "tie_rule": TIE_RULE,
            "chunking_independent": True,
            "stream": "init: optimal k-means of a uniform random sample (hash of the global voxel "
            "index); stream: fixed block grid, seeded permuted block order per epoch, C order in "
            "blocks, seeded shuffle in windows of 16 batches",
        }
        out[k] = KMeansResult(k, c, inert, "minibatch", n_vox, extra)
    return out


def _init_models(
    img: da.Array, msk: da.Array, ks: list[int], seed: int, batch_size: int, n_init: int, init_size: int
) -> tuple[dict[int, Any], int, int]:
    """Pass 1: validation and a uniform random sample (chunking-independent) whose optimum initialises the models.

    Returns the models by k, the number of mask voxels and the size of the sample.
    """
    from sklearn.cluster import MiniBatchKMeans

    _, sample, n_vox, nonfinite, distinct = _sample_pass(img, msk, max(init_size, K_MAX), seed)
    _check_data(n_vox, nonfinite)
    _check_distinct(ks, distinct.size)
    init = _init_centres(sample.astype(np.float64), ks, seed, n_init)
    models = {
        k: MiniBatchKMeans(
            n_clusters=k,
            random_state=seed,
            batch_size=batch_size,
            n_init=1,
            init=init[k][:, None],
            compute_labels=False,
        )
        for k in ks
    }
    return models, n_vox, int(sample.size)


def _stream(
    img: da.Array,
    msk: da.Array,
    models: list[Any],
    seed: int,
    batch_size: int,
    block_shape: tuple[int, ...],
    blocks_per_compute: int,
    n_epochs: int,
) -> None:
    """Passes 2..: ``n_epochs`` passes of the stream, every batch fed to every model (``partial_fit``)."""
    blocks = _grid_blocks(img.shape, block_shape)
    window = 16 * batch_size
    rng = np.random.default_rng([seed, 1])
    buf: list[np.ndarray] = []
    nbuf = 0

    def drain(final: bool) -> None:
        nonlocal buf, nbuf
        if not buf:
            return
        x = np.concatenate(buf)
        x = x[rng.permutation(x.size)]
        nfull = x.size if final else x.size // batch_size * batch_size
        xb = x[:nfull].astype(np.float64)[:, None]
        for i in range(0, nfull, batch_size):
            for m in models:
                m.partial_fit(xb[i : i + batch_size])
        buf = [x[nfull:]] if nfull < x.size else []
        nbuf = x.size - nfull

    for _ in range(int(n_epochs)):
        order = rng.permutation(len(blocks))
        for g in range(0, len(order), blocks_per_compute):
            sel = [blocks[i] for i in order[g : g + blocks_per_compute]]
            for bi, bm in dask.compute(*[(img[sl], msk[sl]) for sl in sel]):
                v = _masked_f32(bi, bm)
                if v.size:
                    buf.append(v)
                    nbuf += v.size
                    if nbuf >= window:
                        drain(False)
    drain(True)
