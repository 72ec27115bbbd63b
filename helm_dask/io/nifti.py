"""Streaming NIfTI-1/2 reading and writing with exact headers: :func:`read_nifti_header` validates a header
without touching the voxels, :class:`SlabReader` reads the file once, in order, one z-slab at a time, and
:func:`build_header`, :func:`header_bytes`, :func:`encode_slab` and :class:`GzipMemberWriter` write a file as a
header followed by slabs (for ``.nii.gz`` one gzip member made of raw DEFLATE parts that the workers compress in
parallel, as pigz does); why the voxels are streamed rather than loaded with nibabel, and why gzip goes through
ISA-L, is in ``docs/method/io.md``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, NamedTuple

import nibabel as nib
import numpy as np

from ..errors import HelmError
from . import location

_igzip: ModuleType | None
_isal_zlib: ModuleType | None
try:  # ISA-L: same gzip format, several times faster (see docs/method/io.md)
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib_module
except ImportError:  # pragma: no cover - platforms without an isal wheel fall back to zlib
    _igzip = _isal_zlib = None
    GZIP_ERRORS: tuple = (OSError, EOFError, zlib.error)
else:
    _isal_zlib = _isal_zlib_module  # raw DEFLATE parts, crc32 and crc32_combine (isal >= 1.4)
    GZIP_ERRORS = (OSError, EOFError, zlib.error, _isal_zlib_module.error)

GZ_MAGIC = b"\x1f\x8b"
NIFTI_EXTS = (".nii", ".nii.gz")
#: gzip level for .nii.gz output; 1 is nibabel's default and the fastest level that still compresses labels well.
DEFAULT_COMPRESSLEVEL = 1
SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
)
INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether a name is a single-file NIfTI name (``.nii`` or ``.nii.gz``, any case).

    Parameters
    ----------
    path : str or path-like
        File name, path or URL.

    Returns
    -------
    bool

    Example
    -------
    >>> is_nifti_path("scan.NII.gz"), is_nifti_path("scan.zarr")
    (True, False)
    """
    name = os.fspath(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


@dataclass
class NiftiInfo:
    """What a NIfTI header says, validated."""

    path: str
    gz: bool
    version: int  # 1 or 2
    shape: tuple[int, ...]  # 3-D or 4-D (x, y, z[, t])
    dtype: np.dtype  # on-disk dtype (with its byte order)
    vox_offset: int
    slope: float  # 1.0 / 0.0 when the header does not scale
    inter: float
    affine: np.ndarray  # the best affine (sform if its code > 0, else qform, else pixdim)
    sform_code: int
    qform_code: int
    header: nib.Nifti1Header = field(repr=False)
    #: fsspec options for a URL ``path`` (used by :class:`SlabReader` in this process; never stored).
    storage_options: dict | None = field(default=None, repr=False, compare=False)
    #: dimensions the header declares before padding (2 for a 2-D image, which ``shape`` pads to x, y, 1)
    stored_ndim: int = 3

    @property
    def scaled(self) -> bool:
        return not (self.slope == 1.0 and self.inter == 0.0)

    @property
    def plane_bytes(self) -> int:
        return int(self.shape[0]) * int(self.shape[1]) * self.dtype.itemsize

    @property
    def volume_bytes(self) -> int:
        return self.plane_bytes * int(self.shape[2])

    @property
    def data_bytes(self) -> int:
        return self.volume_bytes * (int(self.shape[3]) if len(self.shape) == 4 else 1)

    @property
    def out_dtype(self) -> np.dtype:
        """The dtype of the values a reader should see: the scaled float type, or the native raw type."""
        if self.scaled:
            return np.dtype(np.float64 if self.dtype.itemsize > 4 and self.dtype.kind == "f" else np.float32)
        return self.dtype.newbyteorder("=")


#: Read-ahead for remote header reads: a header (with helm-dask's provenance extension) is a few kB; the
#: default fsspec block (tens of MB) would download much of the file for one header.
_HEADER_BLOCK = 1 << 18


def _as_path(path):
    """A :class:`Path` for local files; URLs stay strings (``Path`` would fold ``s3://`` into ``s3:/``)."""
    return os.fspath(path) if location.is_url(path) else Path(path)


def _open_raw(path, storage_options: dict | None = None, *, block_size: int | None = None):
    try:
        if location.is_url(path):
            return location.open_read(path, storage_options, block_size=block_size)
        return open(path, "rb")
    except FileNotFoundError:
        raise HelmError("file not found", path=path, hint="check the path and the working directory") from None
    except IsADirectoryError:
        raise HelmError("is a folder, not a NIfTI file", path=path, hint="give a .nii or .nii.gz file") from None
    except PermissionError:
        raise HelmError("cannot be read (permission denied)", path=path, hint="check the file's permissions") from None


class _CountingHasher(io.RawIOBase):
    """Wraps a binary file: hashes and counts the raw (on-disk) bytes as they are read, once, in order."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.raw.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.nbytes += n
        return n

    def close(self):
        self.raw.close()
        super().close()


def _is_gz(path, storage_options: dict | None = None) -> bool:
    with _open_raw(path, storage_options, block_size=_HEADER_BLOCK) as f:
        return f.read(2) == GZ_MAGIC


def _read_head(p: Any, storage_options: dict | None) -> tuple[bool, bytes]:
    """Whether the file is gzipped, and its first 540 bytes (decompressed): room for either header."""
    gz = _is_gz(p, storage_options)
    raw = _open_raw(p, storage_options, block_size=_HEADER_BLOCK)
    try:
        stream = _gunzip(raw) if gz else raw
        try:
            head = stream.read(540)
        except GZIP_ERRORS as e:
            raise HelmError(
                f"is not a readable gzip file ({e})",
                path=p,
                hint="the file is corrupt or not compressed NIfTI; re-export it",
            ) from None
    finally:
        raw.close()
    return gz, head


def _parse_header(head: bytes, p: Any) -> tuple[int, Any]:
    """``(version, header)``: the NIfTI version from the magic and size fields, and nibabel's parse of it."""
    if len(head) < 348:
        raise HelmError(
            f"is not a NIfTI file (only {len(head)} bytes, a header needs 348)",
            path=p,
            hint="the file is empty or truncated; re-export it",
        )
    version = None
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
            version = 1
        elif size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            version = 2
    if version is None:
        raise HelmError(
            "is not a NIfTI-1 or NIfTI-2 file (no NIfTI magic in the header)",
            path=p,
            hint="convert it to NIfTI first (e.g. with FreeSurfer mri_convert or dcm2niix)",
        )
    if version == 2 and len(head) < 540:
        raise HelmError("is truncated inside its NIfTI-2 header", path=p, hint="re-export the file")
    magic = head[344:348] if version == 1 else head[4:8]
    if magic in (b"ni1\x00", b"ni2\x00"):
        raise HelmError(
            "is a two-file (.hdr/.img) NIfTI header", path=p, hint="convert the pair to a single .nii or .nii.gz file"
        )
    hdr_cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        hdr = hdr_cls.from_fileobj(io.BytesIO(head[: hdr_cls.sizeof_hdr] + b"\x00" * 4), check=False)
    except Exception as e:  # nibabel raises several types for garbage headers
        raise HelmError(f"has an unreadable NIfTI header ({e})", path=p, hint="re-export the file") from None
    return version, hdr


def _data_shape(hdr: Any, p: Any) -> tuple[int, tuple[int, ...]]:
    """``(dim[0], shape)``: the declared number of dimensions and the 3-D or 4-D shape read as."""
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if ndim < 1 or ndim > 7:
        raise HelmError(f"has an invalid dim[0] = {ndim} in its header", path=p, hint="re-export the file")
    shape = tuple(dim[1 : ndim + 1])
    if any(s < 1 for s in shape):
        raise HelmError(f"has a zero or negative dimension {shape}", path=p, hint="re-export the file")
    # Trailing singleton dimensions (a 3-D volume stored as x, y, z, 1, 1) are harmless: drop them.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if len(shape) > 4:
        raise HelmError(
            f"is {len(shape)}-D (shape {shape}); helm-dask reads 3-D scans and 4-D multi-echo scans",
            path=p,
            hint="split it into 3-D or 4-D files first (e.g. with fslsplit)",
        )
    return ndim, shape


def _data_dtype(hdr: Any, p: Any) -> np.dtype:
    """The on-disk dtype, one of :data:`SUPPORTED_DTYPES` (in either byte order)."""
    try:
        dtype = hdr.get_data_dtype()
    except Exception:
        dtype = None
    if dtype is None or dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise HelmError(
            f"has an unsupported data type ({dtype})", path=p, hint="convert it to an integer or float32/float64 NIfTI"
        )
    return dtype


def _best_affine(hdr: Any, p: Any) -> np.ndarray:
    """The header's best voxel-to-world affine, refused when the voxel sizes or the matrix are unusable."""
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise HelmError(
            f"has zero or negative voxel sizes (pixdim {zooms.tolist()})",
            path=p,
            hint="fix the header's pixdim (e.g. with nibabel or fslhd/fslchpixdim)",
        )
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as e:
        raise HelmError(
            f"has an unusable orientation (sform/qform) ({e})", path=p, hint="fix the header's sform/qform"
        ) from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * max(
        1.0, np.abs(affine[:3, :3]).max() ** 3
    ):
        raise HelmError(
            "has a singular or non-finite voxel-to-world affine (sform/qform)",
            path=p,
            hint="fix the header's sform/qform so that it maps voxels to millimetres",
        )
    return affine


def _slope_inter(hdr: Any) -> tuple[float, float]:
    """``scl_slope``, ``scl_inter`` with NIfTI's "no scaling" cases (zero or non-finite slope) as 1, 0."""
    # nibabel returns (None, None) when scl_slope is 0 or NaN, which NIfTI defines as "no scaling".
    s, i = hdr.get_slope_inter()
    slope = 1.0 if s is None else float(s)
    inter = 0.0 if i is None else float(i)
    if not np.isfinite(slope) or slope == 0:
        slope, inter = 1.0, 0.0
    if not np.isfinite(inter):
        inter = 0.0
    return slope, inter


def read_nifti_header(path: str | os.PathLike, *, storage_options: dict | None = None) -> NiftiInfo:
    """Parse and validate a NIfTI-1/2 header without reading the voxel data.

    Parameters
    ----------
    path : path-like or URL
        A single-file NIfTI (``.nii`` or ``.nii.gz``; compression is detected from the gzip magic); an fsspec
        URL such as ``s3://bucket/scan.nii.gz`` too.
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`).

    Returns
    -------
    NiftiInfo
        Shape (3-D, or 4-D), on-disk dtype, data offset, scaling and the best affine.

    Raises
    ------
    HelmError
        A missing file, a file that is not NIfTI, a truncated header, dimensions that do not match the file size
        (uncompressed files), zero/negative voxel sizes, a singular or non-finite affine, 5-D (or higher) data,
        and unsupported data types.
    """
    p = _as_path(path)
    gz, head = _read_head(p, storage_options)
    version, hdr = _parse_header(head, p)
    ndim, shape = _data_shape(hdr, p)
    dtype = _data_dtype(hdr, p)
    sform_code = int(hdr["sform_code"])
    qform_code = int(hdr["qform_code"])
    affine = _best_affine(hdr, p)
    vox_offset = int(hdr["vox_offset"])
    min_offset = type(hdr).sizeof_hdr + 4
    if vox_offset < min_offset:
        vox_offset = min_offset  # NIfTI allows 0 meaning "right after the header" in old writers
    slope, inter = _slope_inter(hdr)
    info = NiftiInfo(
        path=str(p),
        gz=gz,
        version=version,
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        vox_offset=vox_offset,
        slope=slope,
        inter=inter,
        affine=affine,
        sform_code=sform_code,
        qform_code=qform_code,
        header=hdr,
        storage_options=storage_options,
        stored_ndim=ndim,
    )
    if not gz:
        check_complete(info, dtype)
    return info


def check_complete(info: NiftiInfo, dtype_label: Any) -> None:
    """An uncompressed file must hold the bytes its header describes (a gzip stream is checked as it is read).

    Parameters
    ----------
    info : NiftiInfo
        The file's header.
    dtype_label : object
        The data type as the error message names it.

    Raises
    ------
    HelmError
        When the file is shorter than ``vox_offset`` plus the data.
    """
    size = location.size(info.path, info.storage_options)
    need = info.vox_offset + info.data_bytes
    if size < need:
        raise HelmError(
            f"is truncated: its header describes {need:,} bytes ({info.shape} {dtype_label}) but the file has {size:,}",
            path=info.path,
            hint="the copy is incomplete; copy or export the file again",
        )


@dataclass
class Slab:
    """One slab of planes z0:z1 of echo ``t`` (None for 3-D), shape (x, y, z1 - z0), values after scaling."""

    t: int | None
    z0: int
    z1: int
    data: np.ndarray
    nonfinite: int


class SlabReader:
    """Reads a NIfTI file once, in order, slab by slab.

    Iterating yields :class:`Slab` objects. ``sha256`` and ``nbytes`` of the on-disk file are available once the
    iteration finished (the file is hashed while it is read, so provenance costs no extra pass).

    Parameters
    ----------
    info : NiftiInfo
    slab_planes : int
        z planes per slab (memory: ``slab_planes * x * y * itemsize``).
    echoes : sequence of int, optional
        Which volumes of a 4-D file to yield (default all); the others are skipped (decompressed but not kept).
    first_planes : int, optional
        Planes of the first slab of each echo (default ``slab_planes``): a thinner first slab makes the others
        end where the chunks of a reversed z axis do (an import that stores the volume in RAS+ order).
    reuse : bool
        Read every slab into one buffer, so that a slab's ``data`` holds the next slab's values once the
        iteration goes on (for a reader that is done with each slab by then). A new buffer per slab is a fresh
        mapping of 63 MB for a 0.1 mm scan's slab, whose pages the kernel zeroes and maps one by one as they
        are filled: 14% of the page faults of a 0.2 mm scan's import.
    """

    def __init__(
        self,
        info: NiftiInfo,
        slab_planes: int,
        echoes=None,
        *,
        first_planes: int | None = None,
        reuse: bool = False,
    ):
        self.info = info
        self.slab_planes = max(1, int(slab_planes))
        first = self.slab_planes if first_planes is None else int(first_planes)
        self.first_planes = min(max(1, first), self.slab_planes)
        nt = info.shape[3] if len(info.shape) == 4 else 1
        self.echoes = list(range(nt)) if echoes is None else list(echoes)
        self.sha256: str | None = None
        self.nbytes = 0
        self.reuse = reuse

    def __iter__(self) -> Iterator[Slab]:
        info = self.info
        p = _as_path(info.path)
        raw = _open_raw(p, info.storage_options)
        hasher = _CountingHasher(raw)
        buffered = io.BufferedReader(hasher, buffer_size=1 << 22)
        stream = _gunzip(buffered, background=True) if info.gz else buffered
        four_d = len(info.shape) == 4
        nt = info.shape[3] if four_d else 1
        nz = info.shape[2]
        pos = 0
        spare = bytearray()
        try:
            self._skip(stream, info.vox_offset)
            pos = info.vox_offset
            for t in range(nt):
                keep = t in self.echoes
                # slab ends: first_planes, then every slab_planes (the first slab may be thinner)
                for end in range(self.first_planes, nz + self.slab_planes, self.slab_planes):
                    z0, z1 = max(0, end - self.slab_planes), min(nz, end)
                    nbytes = (z1 - z0) * info.plane_bytes
                    if not keep:
                        self._skip(stream, nbytes)
                        pos += nbytes
                        continue
                    if not self.reuse or len(spare) < nbytes:
                        spare = bytearray(nbytes)
                    buf = memoryview(spare)[:nbytes]
                    got = self._readinto(stream, buf)
                    pos += got
                    if got < nbytes:
                        raise HelmError(
                            f"is truncated: the data end after {pos:,} of {info.vox_offset + info.data_bytes:,} "
                            f"bytes (echo {t}, plane {z0 + got // info.plane_bytes} of {nz})",
                            path=p,
                            hint="the copy is incomplete; copy or export the file again",
                        )
                    arr = np.frombuffer(buf, dtype=info.dtype).reshape(info.shape[:2] + (z1 - z0,), order="F")
                    if info.scaled:
                        arr = arr.astype(info.out_dtype) * info.out_dtype.type(info.slope) + info.out_dtype.type(
                            info.inter
                        )
                    elif not arr.dtype.isnative:
                        arr = arr.astype(arr.dtype.newbyteorder("="))
                    nonfinite = int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0
                    yield Slab(t if four_d else None, z0, z1, arr, nonfinite)
            # Drain the rest so the checksum covers the whole file (and a corrupt gzip tail is reported).
            while True:
                chunk = stream.read(1 << 22)
                if not chunk:
                    break
        except GZIP_ERRORS as e:
            raise HelmError(
                f"could not be read past byte {pos:,}: {e}",
                path=p,
                hint="the file is truncated or its compression is corrupt; export it again",
            ) from None
        finally:
            stream.close()
            raw.close()
        self.sha256 = hasher.sha.hexdigest()
        self.nbytes = hasher.nbytes

    @staticmethod
    def _readinto(stream, buf) -> int:
        view = memoryview(buf)
        total = 0
        while total < len(buf):
            n = stream.readinto(view[total:])
            if not n:
                break
            total += n
        return total

    @staticmethod
    def _skip(stream, nbytes: int) -> None:
        remaining = nbytes
        scratch = bytearray(min(nbytes, 1 << 22) or 1)
        while remaining > 0:
            n = stream.readinto(memoryview(scratch)[: min(remaining, len(scratch))])
            if not n:
                raise EOFError(f"unexpected end of file ({remaining:,} bytes missing)")
            remaining -= n


def file_sha256(path: str | os.PathLike, *, block: int = 1 << 22, storage_options: dict | None = None) -> str:
    """SHA-256 of a file's bytes, streamed.

    Parameters
    ----------
    path : path-like or URL
        The file.
    block : int
        Bytes read at a time.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    str
        The hex digest.
    """
    h = hashlib.sha256()
    with _open_raw(_as_path(path), storage_options) as f:
        while True:
            b = f.read(block)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Writing


def build_header(
    shape,
    dtype,
    affine,
    *,
    kind: str = "image",
    sform_code: int = 1,
    qform_code: int = 1,
    version: int | None = None,
    descrip: str = "helm-dask",
    provenance: dict | None = None,
):
    """A nibabel header for a single-file NIfTI with sform = qform = ``affine``.

    Parameters
    ----------
    shape : sequence of int
        Data shape (3-D or 4-D).
    dtype : dtype
        Data type written.
    affine : array_like, 4x4
        Voxel-centre to world (mm) matrix.
    kind : str
        ``"labels"`` and ``"mask"`` get intent NIFTI_INTENT_LABEL.
    sform_code, qform_code : int
        Header codes (0 becomes 1, so that viewers use the affine).
    version : int, optional
        1 or 2; default NIfTI-2 only when a dimension does not fit NIfTI-1's int16.
    descrip : str
        The ``descrip`` field (79 bytes at most).
    provenance : dict, optional
        JSON-able record put into a header extension (code 6, "comment"), which viewers ignore and
        :func:`read_nifti_provenance` reads back: the file itself says how it was made.

    Returns
    -------
    nibabel.Nifti1Header or nibabel.Nifti2Header
        With unit scaling, units mm/s and ``vox_offset`` 0 (nibabel sets it when writing).

    Example
    -------
    >>> hdr = build_header((4, 5, 6), "uint8", np.eye(4), kind="labels")
    >>> int(hdr["sform_code"]), int(hdr["intent_code"]), hdr.get_data_shape()
    (1, 1002, (4, 5, 6))
    """
    shape = tuple(int(s) for s in shape)
    if version is None:
        version = 2 if max(shape) > 32767 else 1
    hdr = (nib.Nifti2Header if version == 2 else nib.Nifti1Header)()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.dtype(dtype))
    affine = np.asarray(affine, dtype=np.float64)
    # Codes: copied from the input when they are set; a zero code would make viewers ignore our affine.
    hdr.set_qform(affine, int(qform_code) or 1)
    hdr.set_sform(affine, int(sform_code) or 1)
    hdr.set_xyzt_units("mm", "sec")
    if kind in ("labels", "mask"):
        hdr.set_intent("label")
    hdr["descrip"] = descrip.encode()[:79]
    hdr.set_slope_inter(1.0, 0.0)
    if provenance is not None:
        payload = json.dumps(provenance, sort_keys=True, default=str).encode()
        hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", payload))
    hdr["vox_offset"] = 0  # nibabel sets the smallest valid offset (after the extensions) when writing
    return hdr


def header_bytes(hdr: Any) -> bytes:
    """The header, its extensions and the padding up to ``vox_offset``, as they start the file.

    Parameters
    ----------
    hdr : nibabel.Nifti1Header or nibabel.Nifti2Header
        From :func:`build_header`.

    Returns
    -------
    bytes

    Example
    -------
    >>> len(header_bytes(build_header((4, 5, 6), "uint8", np.eye(4))))
    352
    """
    bio = io.BytesIO()
    hdr.write_to(bio)
    out = bio.getvalue()
    pad = int(hdr["vox_offset"]) - len(out)
    return out + b"\x00" * max(0, pad)


def _gunzip(fileobj, *, background: bool = False):
    """A reading gzip stream over ``fileobj`` (all members, as one stream): ISA-L when installed, else zlib.

    ``background``: ISA-L reads and inflates ``fileobj`` in a thread of its own, 1 MiB ahead of the reader (for a
    file read through once). A scan's stream is the one serial part of an import: inflating and hashing a 0.2 mm
    template scan (1.5 GB of gzip) took 8 s of the importing process's 14 s of CPU, which its writes of the
    landing chunks now overlap."""
    if _igzip is not None:
        if background:
            from isal import igzip_threaded

            return igzip_threaded.open(fileobj, "rb", threads=1)
        return _igzip.GzipFile(fileobj=fileobj, mode="rb")
    return gzip.GzipFile(fileobj=fileobj, mode="rb")


def gzip_member(data: bytes | memoryview, level: int = DEFAULT_COMPRESSLEVEL) -> bytes:
    """One self-contained gzip member (mtime 0 so output is byte-reproducible).

    Parameters
    ----------
    data : bytes
        The bytes to compress.
    level : int
        zlib's meaning (0-9). Level 1, the default, is compressed by ISA-L's level 1 when ``isal`` is installed:
        the same ratio as zlib's level 1 on scans and label maps at 3-9x the speed. Other levels keep zlib, so
        that asking for 6 or 9 gets exactly zlib's 6 or 9.

    Returns
    -------
    bytes
        One gzip member (concatenated members read as one stream).

    Example
    -------
    >>> gzip.decompress(gzip_member(b"slab 1") + gzip_member(b", slab 2"))
    b'slab 1, slab 2'
    """
    if level == 1 and _igzip is not None:
        return _igzip.compress(data, compresslevel=1, mtime=0)
    return gzip.compress(data, compresslevel=level, mtime=0)


def slab_bytes(arr: np.ndarray, dtype) -> bytes:
    """Fortran-order bytes of a (x, y, dz) slab in the output dtype (native byte order, as nibabel writes).

    Parameters
    ----------
    arr : numpy.ndarray
        The slab.
    dtype : dtype
        Output data type.

    Returns
    -------
    bytes

    Example
    -------
    >>> slab_bytes(np.array([[1, 2], [3, 4]]).reshape(2, 2, 1), "uint8")
    b'\\x01\\x03\\x02\\x04'
    """
    a = np.asarray(arr).astype(np.dtype(dtype), copy=False)
    if a.ndim == 3 and not a.flags.f_contiguous:
        return reversed_axes(a).tobytes()  # the C-order bytes of the reversed axes are a's Fortran-order bytes
    return a.tobytes(order="F")


def reversed_axes(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a 3-D array with its axes reversed: ``np.ascontiguousarray(arr.transpose(2, 1, 0))``,
    made as one 2-D transpose per index of the middle axis.

    The C order of a Zarr chunk (z fastest) and the Fortran order of a NIfTI file (x fastest) are each other's
    reversed axes. NumPy's 3-D strided copy walks one array against its cache lines; its 2-D transpose is
    blocked. Measured (2 cores, Intel Xeon): a 128^3 uint16 chunk 14.4 -> 2.1 ms, float32 15.5 -> 2.5 ms; a
    4 x 1816 x 1476 uint16 slab 43.7 -> 18.2 ms.

    Parameters
    ----------
    arr : numpy.ndarray
        Any 3-D array (any strides).

    Returns
    -------
    numpy.ndarray
        Shape ``arr.shape[::-1]``, C-contiguous, the same dtype.

    Example
    -------
    >>> a = np.arange(24).reshape(2, 3, 4)
    >>> bool((reversed_axes(a) == a.transpose(2, 1, 0)).all()), reversed_axes(a).flags.c_contiguous
    (True, True)
    """
    a = np.asarray(arr)
    out = np.empty(a.shape[::-1], a.dtype)
    for j in range(a.shape[1]):
        out[:, j, :] = a[:, j, :].T
    return out


class GzipPart(NamedTuple):
    """A piece of one gzip member, compressed on a worker: raw DEFLATE blocks ending on a byte boundary.

    ``data`` ends with a sync flush (an empty stored block), so parts compressed independently can be
    concatenated into one DEFLATE stream; ``crc32`` and ``size`` describe the uncompressed bytes, which the
    writer combines into the member's trailer without seeing them (:class:`GzipMemberWriter`).
    """

    data: bytes
    crc32: int
    size: int


def _crc32(data: bytes | memoryview) -> int:
    return _isal_zlib.crc32(data) if _isal_zlib is not None else zlib.crc32(data)


def deflate_part(data: bytes | memoryview, level: int = DEFAULT_COMPRESSLEVEL) -> GzipPart:
    """Compress bytes as a part of a gzip member: raw DEFLATE (no header), ended by a sync flush. Runs on a worker.

    Parameters
    ----------
    data : bytes
        The uncompressed bytes (may be empty).
    level : int
        As for :func:`gzip_member`: ISA-L's level 1 for 1 when ``isal`` is installed, zlib's level otherwise.

    Returns
    -------
    GzipPart
        The compressed bytes, the CRC-32 of ``data`` and its length.

    Example
    -------
    >>> part = deflate_part(b"slab")
    >>> zlib.decompressobj(-15).decompress(part.data), part.crc32 == zlib.crc32(b"slab"), part.size
    (b'slab', True, 4)
    """
    view = memoryview(data).cast("B")
    # A sync flush, not a full one: every part has its own compressor, so no part refers back into another.
    if level == 1 and _igzip is not None and _isal_zlib is not None:
        c = _isal_zlib.compressobj(1, _isal_zlib.DEFLATED, -15)
        out = b"".join((c.compress(view), c.flush(_isal_zlib.Z_SYNC_FLUSH)))
    else:
        z = zlib.compressobj(level, zlib.DEFLATED, -15)
        out = b"".join((z.compress(view), z.flush(zlib.Z_SYNC_FLUSH)))
    return GzipPart(out, _crc32(view), len(view))


# CRC-32 combination without the data (zlib's crc32_combine, the GF(2) matrix method): appending n zero bytes to
# a message multiplies its CRC register by a fixed 32x32 bit matrix, the n-th power of the one-zero-byte operator.
_CRC32_POLY = 0xEDB88320  # the reflected CRC-32 polynomial of gzip


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator "apply ``b``, then ``a``"."""
    return tuple(_gf2_times(a, col) for col in b)


@functools.lru_cache(maxsize=16)
def _crc32_zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The matrix that advances a CRC-32 register over ``nbytes`` zero bytes (cached: slabs repeat their size)."""
    power: tuple[int, ...] = (_CRC32_POLY,) + tuple(1 << n for n in range(31))  # one zero bit
    for _ in range(3):  # 8 zero bits
        power = _gf2_compose(power, power)
    result = tuple(1 << n for n in range(32))
    while nbytes:
        if nbytes & 1:
            result = _gf2_compose(power, result)
        nbytes >>= 1
        if nbytes:
            power = _gf2_compose(power, power)
    return result


def crc32_combine_py(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``: zlib's ``crc32_combine`` in Python.

    The fallback for ISA-L's ``isal_zlib.crc32_combine`` when ``isal`` is not installed.

    Parameters
    ----------
    crc1, crc2 : int
        CRC-32 of the first and of the second block.
    len2 : int
        Length of the second block in bytes (any size, 4 GiB and more included).

    Returns
    -------
    int

    Example
    -------
    >>> crc32_combine_py(zlib.crc32(b"head"), zlib.crc32(b"slab"), 4) == zlib.crc32(b"headslab")
    True
    """
    if len2 <= 0:
        return crc1
    return _gf2_times(_crc32_zeros_operator(int(len2)), crc1) ^ crc2


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``: ISA-L's, else :func:`crc32_combine_py`.

    Parameters
    ----------
    crc1, crc2 : int
        CRC-32 of the first and of the second block.
    len2 : int
        Length of the second block in bytes.

    Returns
    -------
    int

    Example
    -------
    >>> crc32_combine(zlib.crc32(b"a"), zlib.crc32(b"bc"), 2) == zlib.crc32(b"abc")
    True
    """
    if _igzip is not None and _isal_zlib is not None and len2 > 0:
        return _isal_zlib.crc32_combine(crc1, crc2, len2)
    return crc32_combine_py(crc1, crc2, len2)


class GzipMemberWriter:
    """Writes ONE gzip member from raw DEFLATE parts compressed elsewhere (pigz's scheme).

    The gzip header (mtime 0, so output is byte-reproducible), then each :class:`GzipPart` as it comes, then an
    empty final DEFLATE block and the trailer: the CRC-32 combined part by part and the total size modulo
    2**32. One member, because browser readers (NiiVue, nifti-reader-js) stop after the first; the final block
    is written here, so a part never needs to know that it is the last.

    Parameters
    ----------
    f : binary file
        Open for writing, positioned at the start.
    level : int
        gzip level of the parts (only sets the header's XFL hint).

    Example
    -------
    >>> bio = io.BytesIO()
    >>> w = GzipMemberWriter(bio)
    >>> w.write_bytes(b"header, ")
    >>> w.write(deflate_part(b"slab 1, ")); w.write(deflate_part(b"slab 2"))
    >>> w.close()
    >>> d = zlib.decompressobj(31); d.decompress(bio.getvalue()), d.eof, d.unused_data
    (b'header, slab 1, slab 2', True, b'')
    """

    _FINAL_EMPTY_BLOCK = b"\x03\x00"  # BFINAL=1, fixed Huffman, end-of-block: what zlib's Z_FINISH of nothing is

    def __init__(self, f: BinaryIO, level: int = DEFAULT_COMPRESSLEVEL):
        self.f = f
        self.level = level
        self.crc32 = 0
        self.size = 0
        xfl = 4 if level == 1 else 2 if level == 9 else 0  # "fastest" / "best", as Python's gzip writes
        # magic, deflate, no flags, mtime 0, XFL, OS 255 (unknown)
        f.write(b"\x1f\x8b\x08\x00" + b"\x00" * 4 + bytes((xfl, 255)))

    def write(self, part: GzipPart) -> None:
        """Append a part (in file order)."""
        self.f.write(part.data)
        self.crc32 = crc32_combine(self.crc32, part.crc32, part.size)
        self.size += part.size

    def write_bytes(self, data: bytes | memoryview) -> None:
        """Compress and append bytes here (the header: small)."""
        self.write(deflate_part(data, self.level))

    def close(self) -> None:
        """End the DEFLATE stream and write the trailer (CRC-32, size mod 2**32). The file stays open."""
        self.f.write(self._FINAL_EMPTY_BLOCK + struct.pack("<II", self.crc32, self.size & 0xFFFFFFFF))


def encode_slab(arr: np.ndarray, dtype, gz: bool, level: int = DEFAULT_COMPRESSLEVEL) -> bytes | GzipPart:
    """A slab as it goes into the file: raw bytes, or a :class:`GzipPart` of the file's gzip member. Runs on a
    worker.

    Parameters
    ----------
    arr : numpy.ndarray
        The slab (x, y, dz).
    dtype : dtype
        Output data type.
    gz : bool
        Compress (raw DEFLATE, see :func:`deflate_part`).
    level : int
        gzip level (see :func:`gzip_member`).

    Returns
    -------
    bytes or GzipPart

    Example
    -------
    >>> encode_slab(np.ones((2, 1, 1)), "uint8", False), encode_slab(np.ones((2, 1, 1)), "uint8", True).size
    (b'\\x01\\x01', 2)
    """
    a = np.asarray(arr)
    if gz and a.ndim == 3 and a.dtype == np.dtype(dtype) and a.flags.f_contiguous:
        # Compress the slab's memory as it is: its Fortran order is the file's (a.T is C-contiguous), so no copy
        # into bytes first (a 32 MB slab: ~5 ms of the ~45 ms its deflate takes).
        return deflate_part(a.T.data.cast("B"), level)
    b = slab_bytes(a, dtype)
    return deflate_part(b, level) if gz else b


def read_nifti_provenance(path: str | os.PathLike, *, storage_options: dict | None = None) -> dict | None:
    """The provenance JSON that helm-dask wrote into a NIfTI header extension.

    Parameters
    ----------
    path : path-like or URL
        A NIfTI file.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    dict or None
        The record, or None when the file has none (or it cannot be read).
    """
    info = read_nifti_header(path, storage_options=storage_options)
    raw = _open_raw(_as_path(path), storage_options, block_size=_HEADER_BLOCK)
    try:
        stream = _gunzip(raw) if info.gz else raw
        head = stream.read(info.vox_offset)
    except GZIP_ERRORS:
        return None
    finally:
        raw.close()
    hdr_cls = type(info.header)
    try:
        hdr = hdr_cls.from_fileobj(io.BytesIO(head), check=False)
    except Exception:
        return None
    for ext in hdr.extensions:
        if ext.get_code() == 6:
            try:
                return json.loads(ext.get_content())
            except (ValueError, TypeError):
                continue
    return None
