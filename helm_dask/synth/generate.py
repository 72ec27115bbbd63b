"""Synthetic samples in memory: :func:`generate_sample` (one pair) and :func:`iter_samples` (a stream)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr

from ..errors import HelmError
from ..volume import make_volume, provenance_record
from .config import SynthConfig
from .gather import _gather_labels
from .intensity import _synthesize
from .params import SampleParams, _check_seed, sample_params
from .plan import plan_sample
from .source import LabelSource


def generate_sample(
    source: Any, params: SampleParams, config: SynthConfig | None = None
) -> tuple[xr.DataArray, xr.DataArray]:
    """One synthetic ``(image, labels)`` pair, computed eagerly on its output grid.

    Parameters
    ----------
    source : DataArray, path or LabelSource
        The label map (a lazy volume, a ``.zarr`` store, a ``.nii``/``.nii.gz`` -- imported on each call, so
        open a :class:`LabelSource` once for many samples).
    params : SampleParams
        From :func:`sample_params`; they decide which steps run (a step switched off in the config that drew
        them has neutral values).
    config : SynthConfig, optional
        The output grid, the centre, the level and the model ranges (default: :class:`SynthConfig`'s defaults).

    Returns
    -------
    image, labels : DataArray
        Two in-memory (NumPy-backed) volumes on the output grid, float32 and uint16, with the exact output
        affine; ``attrs["synth"]`` holds the params, the per-label ``(mean, std)`` and the level read. Only the
        source chunks holding a needed voxel are computed (see :func:`~helm_dask.synth.gather_tasks`).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((30, 30, 30), np.uint16); lab[10:20, 10:20, 10:20] = 801
    >>> cfg = SynthConfig(crop=(8, 8, 8)).without_augmentation()
    >>> img, labels = generate_sample(make_volume(da.from_array(lab, chunks=10), np.eye(4), kind="labels"),
    ...                               sample_params(cfg, 0, 0), cfg)
    >>> int(labels.values.min()), labels.attrs["affine"][:3, 3].tolist()
    (801, [11.0, 11.0, 11.0])
    """
    cfg = config or SynthConfig()
    own = not isinstance(source, (LabelSource, xr.DataArray))
    src = LabelSource.open(source)
    try:
        plan = plan_sample(src, params, cfg)
        labels = _gather_labels(plan, src.path)
        image, model = _synthesize(labels, params, cfg)
    finally:
        if own:
            src.close()
    info = {
        "params": params.to_dict(),
        "intensities": {str(k): v for k, v in model.items()},
        "level": plan.level,
        "center_mm": plan.center_mm.tolist(),
        "source": src.path or src.name,
    }
    step = provenance_record("synth", dict(info, config=cfg.to_dict()))
    img_vol = make_volume(
        image,
        plan.out_affine,
        kind="image",
        name="image",
        source=src.path or src.name,
        provenance=[step],
        attrs={"synth": info},
    )
    lab_vol = make_volume(
        labels,
        plan.out_affine,
        kind="labels",
        name="labels",
        source=src.path or src.name,
        provenance=[step],
        attrs={"synth": info},
    )
    return img_vol, lab_vol


def iter_samples(
    labels: Any,
    n: int | None,
    seed: int,
    config: SynthConfig | None = None,
    *,
    start: int = 0,
    tmp_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` (``None``: endless) ``(image, labels)`` NumPy pairs for a training loop.

    Sample ``i`` is ``generate_sample(labels, sample_params(config, seed, start + i), config)``; the label map
    is opened once (a NIfTI file is imported into a temporary store, removed when the iterator ends) and the
    hypothalamus centroid computed once. No deep-learning framework is needed: wrap the arrays as you like.

    Parameters
    ----------
    labels : DataArray, path or LabelSource
        The label map.
    n : int or None
        Number of samples; None: no end.
    seed : int
        The run's seed.
    config : SynthConfig, optional
        The generator's configuration (default: :class:`SynthConfig`'s defaults).
    start : int, optional
        Index of the first sample.
    tmp_dir : path, optional
        Where a NIfTI label map's temporary store goes.

    Yields
    ------
    image, labels : ndarray
        float32 and uint16 arrays of shape ``config.crop``.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((30, 30, 30), np.uint16); lab[10:20, 10:20, 10:20] = 805
    >>> vol = make_volume(da.from_array(lab, chunks=10), np.eye(4), kind="labels")
    >>> [im.shape for im, _ in iter_samples(vol, 2, seed=3, config=SynthConfig(crop=(8, 8, 8)))]
    [(8, 8, 8), (8, 8, 8)]
    """
    cfg = config or SynthConfig()
    seed, start = _check_seed(seed), _check_seed(start, "start")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise HelmError(f"n must be a non-negative integer or None, got {n!r}", hint="e.g. --n 10")
    own = not isinstance(labels, LabelSource)
    src = LabelSource.open(labels, tmp_dir=tmp_dir)
    try:
        i = 0
        while n is None or i < n:
            img, lab = generate_sample(src, sample_params(cfg, seed, start + i), cfg)
            yield img.values, lab.values
            i += 1
    finally:
        if own:
            src.close()
