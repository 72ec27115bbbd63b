"""I/O: streaming NIfTI <-> Zarr v3 volume stores with exact affines, on local disks or object storage."""

from .convert import convert, nifti_to_zarr, save_nifti, zarr_to_nifti
from .nifti import NiftiInfo, read_nifti_header
from .regions import StoredSource, release_chunk_caches, stored_source_of
from .store import describe, is_complete, open_volume, read_meta, save_volume

__all__ = [
    "NiftiInfo",
    "StoredSource",
    "convert",
    "describe",
    "is_complete",
    "nifti_to_zarr",
    "open_volume",
    "read_meta",
    "read_nifti_header",
    "release_chunk_caches",
    "save_nifti",
    "save_volume",
    "stored_source_of",
    "zarr_to_nifti",
]
