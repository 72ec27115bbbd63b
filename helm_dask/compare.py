"""``helm-dask compare``: label maps or whole output folders, through :mod:`helm_dask.metrics`.

NIfTI inputs are streamed once into a temporary Zarr store (never loaded whole), so full-resolution maps are
compared out of core; Zarr stores are opened directly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import HelmError
from .io import nifti_to_zarr, open_volume
from .io.nifti import is_nifti_path

LABEL_EXTS = (".nii.gz", ".nii", ".zarr")


@contextlib.contextmanager
def opened_labels(path, workdir: str):
    """A lazy label volume for a .nii/.nii.gz file (imported to ``workdir``) or a helm-dask store."""
    p = os.fspath(path)
    if is_nifti_path(p):
        store = Path(workdir) / (Path(p).name.split(".")[0] + f"-{abs(hash(p)) % 10**8}.zarr")
        nifti_to_zarr(p, store, kind="labels", pyramid=False, overwrite=True)
        vol = open_volume(store)
    else:
        vol = open_volume(p)
    vol.attrs["source"] = p
    yield vol


def compare_files(a, b, *, labels=None, groups="paper", resample_b: bool = False) -> list[dict]:
    from .metrics import compare_volumes

    with tempfile.TemporaryDirectory(prefix="helm-compare-") as tmp:
        with opened_labels(a, tmp) as va, opened_labels(b, tmp) as vb:
            return compare_volumes(va, vb, labels=labels, groups=groups, resample_b=resample_b)


def _label_files(folder: Path, filename: str) -> list[str]:
    """The maps in a folder: ``<subject>/<filename>`` for pipeline output folders, else the label files in it."""
    nested = sorted(str(p) for p in folder.glob(f"*/{filename}"))
    if nested:
        return nested
    return sorted(str(p) for p in folder.iterdir() if p.name.endswith(LABEL_EXTS) and not p.name.startswith("."))


def compare_folders(
    a, b, *, filename: str = "hypothalamus.nii.gz", labels=None, groups="paper", resample_b: bool = False
):
    """Pair subjects by name and compare each pair; returns (per-subject rows, summary rows, unpaired names)."""
    from .metrics import pair_by_name, summarise

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
        pa = pa if Path(pa).is_file() or pa.endswith(".zarr") else str(Path(pa) / filename)
        pb = pb if Path(pb).is_file() or pb.endswith(".zarr") else str(Path(pb) / filename)
        per_subject[name] = compare_files(pa, pb, labels=labels, groups=groups, resample_b=resample_b)
    return per_subject, summarise(per_subject), (only_a, only_b)
