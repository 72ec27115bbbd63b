"""``helm-dask compare``: two label maps (:func:`compare_files`) or two folders of maps paired by subject
(:func:`compare_folders`), through :mod:`helm_dask.metrics`; NIfTI inputs are streamed once into a temporary
Zarr store (never loaded whole), so full-resolution maps are compared out of core, and Zarr stores are opened
directly."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xarray as xr

from .errors import HelmError
from .io import nifti_to_zarr, open_volume
from .io.nifti import is_nifti_path
from .layout import SubjectLayout
from .metrics import compare_volumes, pair_by_name, summarise

LABEL_EXTS = (".nii.gz", ".nii", ".zarr")


@contextlib.contextmanager
def opened_labels(path: str | os.PathLike, workdir: str) -> Iterator[xr.DataArray]:
    """A lazy label volume for a .nii/.nii.gz file (imported to ``workdir``) or a helm-dask store.

    Parameters
    ----------
    path : path-like
        A NIfTI file or a store.
    workdir : str
        Folder for the imported store of a NIfTI file.

    Yields
    ------
    xarray.DataArray
        The labels, ``attrs["source"]`` set to ``path``.
    """
    p = os.fspath(path)
    if is_nifti_path(p):
        store = Path(workdir) / (Path(p).name.split(".")[0] + f"-{abs(hash(p)) % 10**8}.zarr")
        nifti_to_zarr(p, store, kind="labels", pyramid=False, overwrite=True)
        vol = open_volume(store)
    else:
        vol = open_volume(p)
    vol.attrs["source"] = p
    yield vol


def compare_files(
    a: str | os.PathLike, b: str | os.PathLike, *, labels: Any = None, groups: Any = "paper", resample_b: bool = False
) -> list[dict]:
    """Compare two label maps (NIfTI files or stores) with :func:`helm_dask.metrics.compare_volumes`.

    Parameters
    ----------
    a, b : path-like
        The maps (A is the reference grid).
    labels, groups, resample_b
        As in :func:`~helm_dask.metrics.compare_volumes`.

    Returns
    -------
    list of dict
        One row per label then per group.
    """
    with tempfile.TemporaryDirectory(prefix="helm-compare-") as tmp:
        with opened_labels(a, tmp) as va, opened_labels(b, tmp) as vb:
            return compare_volumes(va, vb, labels=labels, groups=groups, resample_b=resample_b)


def _label_files(folder: Path, filename: str) -> list[str]:
    """The maps in a folder: ``<subject>/<filename>`` for pipeline output folders, else the label files in it."""
    # pipeline output folders: OUT/<subject>/<filename>
    subjects = (
        SubjectLayout(str(folder), d.name) for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    nested = sorted(f for f in (lay.file(filename) for lay in subjects) if Path(f).exists())
    if nested:
        return nested
    return sorted(str(p) for p in folder.iterdir() if p.name.endswith(LABEL_EXTS) and not p.name.startswith("."))


def compare_folders(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    filename: str = "hypothalamus.nii.gz",
    labels: Any = None,
    groups: Any = "paper",
    resample_b: bool = False,
) -> tuple[dict[str, list[dict]], list[dict], tuple[list[str], list[str]]]:
    """Pair subjects by name and compare each pair.

    Parameters
    ----------
    a, b : path-like
        Folders of maps, or pipeline output folders (``<subject>/<filename>``; the subject is the folder name).
    filename : str
        The map compared in pipeline output folders.
    labels, groups, resample_b
        As in :func:`~helm_dask.metrics.compare_volumes`.

    Returns
    -------
    tuple
        ``(per_subject, summary, (only_a, only_b))``: rows per subject, :func:`~helm_dask.metrics.summarise`
        rows, and the names found in one folder only.
    """
    fa, fb = _label_files(Path(a), filename), _label_files(Path(b), filename)

    def names(files):
        # For pipeline folders the subject is the parent folder's name.
        return [f if Path(f).name != filename else str(Path(f).parent) for f in files]

    pairs, only_a, only_b = pair_by_name(names(fa), names(fb))
    if not pairs:
        raise HelmError(
            f"no subject appears in both folders ({len(fa)} maps in A, {len(fb)} in B)",
            path=a,
            hint="name the maps (or subject folders) the same way in both folders",
        )
    per_subject = {}
    for name, pa, pb in pairs:
        pa = pa if Path(pa).is_file() or pa.endswith(".zarr") else SubjectLayout.of_folder(pa).file(filename)
        pb = pb if Path(pb).is_file() or pb.endswith(".zarr") else SubjectLayout.of_folder(pb).file(filename)
        per_subject[name] = compare_files(pa, pb, labels=labels, groups=groups, resample_b=resample_b)
    return per_subject, summarise(per_subject), (only_a, only_b)
