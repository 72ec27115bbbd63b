"""Writing the phantom: one Zarr store (a group holding one volume per output) or a folder of NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import zarr

from .io.convert import save_nifti
from .io.store import atomic_path, save_volume

#: Output names of ``helm-dask phantom`` (a contract: other tools rely on them).
PHANTOM_FILES = ("scan", "hypothalamus", "truth_mask", "truth_tissue", "truth_bias")


def write_phantom(out, *, spacing_mm: float = 0.5, side: str = "L", echoes: int = 1, seed: int = 0, chunks=None,
                  overwrite: bool = False, quiet: bool = True) -> dict[str, str]:
    """Generate the phantom chunk by chunk and write it; returns ``{name: path}``.

    ``OUT.zarr`` gives one store with the volumes ``OUT.zarr/scan``, ``OUT.zarr/hypothalamus``, ... (each a
    helm-dask volume, open them with :func:`helm_dask.io.open_volume`); any other ``OUT`` is a folder with
    ``scan.nii.gz``, ``hypothalamus.nii.gz``, ``truth_mask.nii.gz``, ``truth_tissue.nii.gz`` and
    ``truth_bias.nii.gz``. Nothing is ever materialised: each chunk (or slab) is generated where it is written.
    """
    from .phantom import phantom

    out = os.fspath(out)
    if out.rstrip("/").endswith(".zarr"):
        vols = phantom(spacing_mm, side=side, echoes=echoes, seed=seed, chunks=chunks or (128, 128, 128))
        with atomic_path(out, overwrite=overwrite) as tmp:
            root = zarr.open_group(tmp, mode="w", zarr_format=3)
            root.attrs["helm_dask_collection"] = {"kind": "phantom", "volumes": list(PHANTOM_FILES),
                                                  "spacing_mm": spacing_mm, "side": side, "echoes": echoes,
                                                  "seed": seed}
            for name in PHANTOM_FILES:
                save_volume(vols[name], os.path.join(tmp, name), chunks=chunks)
        return {name: os.path.join(out, name) for name in PHANTOM_FILES}
    folder = Path(out)
    # Thin z-chunks (whole planes in x, y) so that every NIfTI slab is generated exactly once.
    vols = phantom(spacing_mm, side=side, echoes=echoes, seed=seed, chunks=chunks or (256, 256, 16))
    targets = {name: folder / f"{name}.nii.gz" for name in PHANTOM_FILES}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        from .errors import HelmError

        raise HelmError("already exists", path=existing[0], hint="pass --overwrite to replace it", exit_code=3)
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in targets.items():
        vol = vols[name]
        dtype = "float32" if vol.attrs.get("kind") == "image" else None
        save_nifti(vol, path, dtype=dtype, overwrite=overwrite, quiet=quiet)
    return {name: str(p) for name, p in targets.items()}
