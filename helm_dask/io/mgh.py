"""FreeSurfer MGH (``.mgh``) and MGZ (``.mgz``, the same gzip-compressed) headers, for streamed reading:
:func:`read_mgh_header` returns a :class:`~helm_dask.io.nifti.NiftiInfo` (with a NIfTI header built from the
MGH geometry), so :class:`~helm_dask.io.nifti.SlabReader` streams the voxels like a NIfTI file's; the file
layout and why this works are in ``docs/method/io.md``.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nibabel.freesurfer import mghformat

from ..errors import HelmError
from . import nifti as nii

MGH_EXTS = (".mgh", ".mgz")
#: Byte offset of the voxel data (the header is padded to it).
MGH_DATA_OFFSET = int(mghformat.DATA_OFFSET)


def is_mgh_path(path: str | os.PathLike) -> bool:
    """Whether a name is an MGH/MGZ name (``.mgh``, ``.mgz``, ``.mgh.gz``; gzip is detected from the bytes).

    Parameters
    ----------
    path : str or path-like
        File name, path or URL.

    Returns
    -------
    bool

    Example
    -------
    >>> is_mgh_path("aseg.mgz"), is_mgh_path("scan.nii.gz")
    (True, False)
    """
    name = os.fspath(path).lower()
    return name.endswith((".mgh", ".mgz", ".mgh.gz"))


def read_mgh_header(path: str | os.PathLike, *, storage_options: dict | None = None) -> nii.NiftiInfo:
    """Parse and validate an MGH/MGZ header without reading the voxel data.

    Parameters
    ----------
    path : path-like or URL
        The ``.mgh``/``.mgz`` file (compression is detected from the gzip magic, not the name).
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`).

    Returns
    -------
    NiftiInfo
        Shape (3-D, or 4-D with frames), on-disk big-endian dtype, ``vox_offset`` 284, the vox2ras affine, no
        scaling; readable with :class:`~helm_dask.io.nifti.SlabReader`.

    Raises
    ------
    HelmError
        Missing or truncated file, not MGH (version 1), zero dimensions, unknown voxel type, zero voxel sizes or
        a singular affine.
    """
    p = nii._as_path(path)
    gz = nii._is_gz(p, storage_options)
    raw = nii._open_raw(p, storage_options, block_size=nii._HEADER_BLOCK)
    try:
        stream = nii._gunzip(raw) if gz else raw
        try:
            head = stream.read(MGH_DATA_OFFSET)
        except nii.GZIP_ERRORS as e:
            raise HelmError(
                f"is not a readable gzip file ({e})",
                path=p,
                hint="the file is corrupt or not a compressed MGH (.mgz); re-export it",
            ) from None
    finally:
        raw.close()
    fixed = mghformat.MGHHeader._hdrdtype
    if len(head) < fixed.itemsize:
        raise HelmError(
            f"is not an MGH file (only {len(head)} bytes, a header needs {fixed.itemsize})",
            path=p,
            hint="the file is empty or truncated; re-export it",
        )
    fields = np.ndarray(shape=(), dtype=fixed, buffer=head[: fixed.itemsize])
    if int(fields["version"]) != 1:
        raise HelmError(
            f"is not a FreeSurfer MGH file (version field {int(fields['version'])}, expected 1)",
            path=p,
            hint="give a .mgz/.mgh written by FreeSurfer, or convert it to NIfTI",
        )
    dims = [int(d) for d in fields["dims"]]
    if min(dims) < 1:
        raise HelmError(f"has a zero or negative dimension {tuple(dims)}", path=p, hint="re-export the file")
    try:
        hdr = mghformat.MGHHeader(head, check=False)
        dtype = hdr.get_data_dtype()
    except Exception as e:  # an unknown voxel type code (nibabel raises KeyError or MGHError)
        raise HelmError(
            f"has an unsupported MGH voxel type (type code {int(fields['type'])}: {e})",
            path=p,
            hint="convert it to an integer or float MGH/NIfTI (e.g. mri_convert)",
        ) from None
    shape = tuple(dims[:3]) + ((dims[3],) if dims[3] > 1 else ())
    zooms = np.asarray(hdr.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise HelmError(f"has zero or negative voxel sizes ({zooms.tolist()})", path=p, hint="re-export the file")
    affine = np.asarray(hdr.get_affine(), dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * max(1.0, zooms.max() ** 3):
        raise HelmError(
            "has a singular or non-finite vox2ras matrix",
            path=p,
            hint="fix its geometry (e.g. mri_convert with the scan as --like template)",
        )
    native = dtype.newbyteorder("=")
    nhdr = nii.build_header(shape, native, affine, kind="image", sform_code=1, qform_code=1)
    info = nii.NiftiInfo(
        path=str(p),
        gz=gz,
        version=2 if isinstance(nhdr, nib.Nifti2Header) else 1,
        shape=shape,
        dtype=dtype,
        vox_offset=MGH_DATA_OFFSET,
        slope=1.0,
        inter=0.0,
        affine=affine,
        sform_code=1,
        qform_code=1,
        header=nhdr,
        storage_options=storage_options,
    )
    if not gz:
        nii.check_complete(info, native)
    return info
