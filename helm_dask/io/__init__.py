"""I/O: streaming NIfTI <-> Zarr v3 volume stores with exact affines."""

from .convert import convert, nifti_to_zarr, save_nifti, zarr_to_nifti
from .nifti import NiftiInfo, read_nifti_header
from .store import describe, is_complete, open_volume, read_meta, save_volume

__all__ = [
    "NiftiInfo",
    "convert",
    "describe",
    "is_complete",
    "nifti_to_zarr",
    "open_volume",
    "read_meta",
    "read_nifti_header",
    "save_nifti",
    "save_volume",
    "zarr_to_nifti",
]
