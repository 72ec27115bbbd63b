"""Writing a phantom (:func:`write_phantom`): one Zarr store (a group holding one volume per output) or a folder
of NIfTI files, generated chunk by chunk where it is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zarr

from .errors import HelmError
from .io.convert import save_nifti
from .io.store import atomic_path, save_volume
from .phantom import phantom

#: Output names of ``helm-dask phantom`` (a contract: other tools rely on them).
PHANTOM_FILES = ("scan", "hypothalamus", "truth_mask", "truth_tissue", "truth_bias")

#: Options of the template phantom (``anatomy="mni152"``); the geometric phantom has none of them.
MNI_OPTIONS = ("fluid", "bag_gap_mm", "header_rotation_deg", "header_rotation_axis")


def write_phantom(
    out: str | os.PathLike,
    *,
    spacing_mm: float = 0.5,
    side: str = "L",
    echoes: int = 1,
    seed: int = 0,
    chunks: Any = None,
    overwrite: bool = False,
    quiet: bool = True,
    anatomy: str = "geometric",
    fluid: str | None = None,
    bag_gap_mm: float | None = None,
    header_rotation_deg: float | None = None,
    header_rotation_axis: str | None = None,
) -> dict[str, str]:
    """Generate the phantom chunk by chunk and write it.

    Nothing is ever materialised: each chunk (or slab) is generated where it is written. The store's collection
    attributes record the anatomy and, for the template phantom, its options and the template files' checksums.

    Parameters
    ----------
    out : path-like
        ``OUT.zarr`` gives one store with the volumes ``OUT.zarr/scan``, ``OUT.zarr/hypothalamus``, ... (each a
        helm-dask volume, open them with :func:`helm_dask.io.open_volume`); any other ``OUT`` is a folder with
        ``scan.nii.gz``, ``hypothalamus.nii.gz``, ``truth_mask.nii.gz``, ``truth_tissue.nii.gz`` and
        ``truth_bias.nii.gz``.
    spacing_mm, side, echoes, seed
        As in :func:`helm_dask.phantom.phantom`.
    chunks : optional
        Dask chunks; default 128^3 for Zarr, thin z-chunks (256, 256, 16) for NIfTI.
    overwrite : bool
        Replace existing outputs.
    quiet : bool
        No progress bars.
    anatomy : {"geometric", "mni152"}
        :func:`helm_dask.phantom.phantom` (the default) or the template phantom
        (:func:`helm_dask.phantom_mni.phantom_mni`).
    fluid, bag_gap_mm, header_rotation_deg, header_rotation_axis : optional
        Options of the template phantom (``"mni152"`` only; ``None``: its default -- bright, 5 mm, 0 degrees,
        about z).

    Returns
    -------
    dict of str to str
        ``{name: path}`` of the written volumes.
    """
    given = {
        k: v
        for k, v in zip(MNI_OPTIONS, (fluid, bag_gap_mm, header_rotation_deg, header_rotation_axis))
        if v is not None
    }
    out = os.fspath(out)
    is_zarr = out.rstrip("/").endswith(".zarr")
    # Zarr: cubic chunks; NIfTI: thin z-chunks (whole planes in x, y) so that every slab is generated exactly once.
    vols = phantom(
        spacing_mm,
        side=side,
        echoes=echoes,
        seed=seed,
        anatomy=anatomy,
        chunks=chunks or ((128, 128, 128) if is_zarr else (256, 256, 16)),
        **given,
    )
    info = vols["scan"].attrs["phantom"]
    collection: dict[str, Any] = {
        "kind": "phantom",
        "volumes": list(PHANTOM_FILES),
        "anatomy": anatomy,
        "spacing_mm": spacing_mm,
        "side": side,
        "echoes": echoes,
        "seed": seed,
    }
    if anatomy == "mni152":
        collection.update(
            {k: info[k] for k in MNI_OPTIONS}, template=info["template"], model_version=info["model_version"]
        )
    if is_zarr:
        with atomic_path(out, overwrite=overwrite) as tmp:
            root = zarr.open_group(tmp, mode="w", zarr_format=3)
            root.attrs["helm_dask_collection"] = collection
            for name in PHANTOM_FILES:
                save_volume(vols[name], os.path.join(tmp, name), chunks=chunks)
        return {name: os.path.join(out, name) for name in PHANTOM_FILES}
    folder = Path(out)
    targets = {name: folder / f"{name}.nii.gz" for name in PHANTOM_FILES}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise HelmError("already exists", path=existing[0], hint="pass --overwrite to replace it", exit_code=3)
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in targets.items():
        vol = vols[name]
        dtype = "float32" if vol.attrs.get("kind") == "image" else None
        save_nifti(vol, path, dtype=dtype, overwrite=overwrite, quiet=quiet)
    return {name: str(p) for name, p in targets.items()}
