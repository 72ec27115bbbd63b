"""Synthetic samples on disk: :func:`write_samples` writes NIfTI (and Zarr) pairs and a ``samples.json``."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import HelmError
from ..io.convert import save_nifti
from ..io.regions import release_chunk_caches
from ..io.store import save_volume
from ..progress import Progress
from .config import SynthConfig
from .generate import generate_sample
from .params import _check_seed, sample_params
from .source import LabelSource


def write_samples(
    label_path: Any,
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    config: SynthConfig | None = None,
    *,
    start: int = 0,
    zarr: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
) -> list[dict]:
    """Write ``n`` samples as ``sample_{i:04d}_image.nii.gz`` / ``_labels.nii.gz`` (and ``.zarr``) in ``out_dir``.

    Also writes ``samples.json`` (config, and per sample its params, per-label intensities, files). A NIfTI
    label map is imported into a temporary store inside ``out_dir`` first.

    Parameters
    ----------
    label_path : DataArray, path or LabelSource
        The label map.
    out_dir : path
        The output folder (created if needed).
    n, seed : int
        Number of samples and the run's seed.
    config : SynthConfig, optional
        The generator's configuration (default: :class:`SynthConfig`'s defaults).
    start : int, optional
        Index of the first sample.
    zarr : bool, optional
        Also write each volume as a ``.zarr`` store.
    overwrite : bool, optional
        Replace existing outputs (without it an existing ``samples.json`` is an error, exit status 3).
    quiet : bool, optional
        No progress bar.

    Returns
    -------
    list of dict
        The per-sample records of ``samples.json``: index, params, intensities, level, centre and files.
    """
    cfg = config or SynthConfig()
    seed, start = _check_seed(seed), _check_seed(start, "start")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise HelmError(f"n must be a non-negative integer, got {n!r}", hint="e.g. --n 10")
    out = Path(out_dir)
    manifest = _prepare_output(out, overwrite)
    records = []
    with contextlib.ExitStack() as stack:
        src = LabelSource.open(label_path, tmp_dir=out)
        if not isinstance(label_path, LabelSource):
            stack.callback(src.close)
        prog = Progress(n, "synth", quiet=quiet)
        for i in range(start, start + n):
            records.append(_write_sample(src, cfg, seed, i, out, zarr=zarr, overwrite=overwrite))
            prog.update(1)
        prog.close()
    doc = {
        "source": os.fspath(label_path)
        if not isinstance(label_path, (xr.DataArray, LabelSource))
        else str(getattr(label_path, "name", "")),
        "seed": seed,
        "config": cfg.to_dict(),
        "samples": records,
    }
    # written last and renamed into place: a samples.json lists only samples that were all written
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, manifest)
    return records


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Create the output folder; return its ``samples.json``, an error (exit 3) if it exists without overwrite."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HelmError(
            f"cannot create the output folder ({e.strerror or e})",
            path=out,
            hint="choose a folder you can write to",
            exit_code=3,
        ) from None
    manifest = out / "samples.json"
    if manifest.exists() and not overwrite:
        raise HelmError(
            "already exists", path=manifest, hint="pass --overwrite to replace it, or choose another --out", exit_code=3
        )
    return manifest


def _write_sample(
    src: LabelSource, cfg: SynthConfig, seed: int, i: int, out: Path, *, zarr: bool, overwrite: bool
) -> dict:
    """Generate sample ``i``, write its image and labels, and return its ``samples.json`` record."""
    params = sample_params(cfg, seed, i)
    img, lab = generate_sample(src, params, cfg)
    rec = {
        "index": i,
        "params": params.to_dict(),
        "intensities": img.attrs["synth"]["intensities"],
        "level": img.attrs["synth"]["level"],
        "center_mm": img.attrs["synth"]["center_mm"],
    }
    for what, vol in (("image", img), ("labels", lab)):
        rec[what] = save_nifti(vol, out / f"sample_{i:04d}_{what}.nii.gz", overwrite=overwrite)
        if zarr:
            try:
                rec[f"{what}_zarr"] = save_volume(vol, out / f"sample_{i:04d}_{what}.zarr", overwrite=overwrite)
            finally:
                release_chunk_caches()  # the label map's chunks cached for the gather
    return rec
