"""NIfTI <-> Zarr conversion, streamed: :func:`nifti_to_zarr` imports a NIfTI-1/2 or FreeSurfer MGH/MGZ file
(3-D or 4-D) into a helm-dask store in one ordered pass, :func:`save_nifti` and :func:`zarr_to_nifti` export a
volume as ``.nii``/``.nii.gz`` in z-slabs encoded on the workers, and :func:`convert` picks the direction from
the names; how both directions keep memory flat is described in ``docs/method/io.md``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dask
import dask.array as da
import nibabel as nib
import numcodecs
import numpy as np
import xarray as xr
from dask.base import tokenize
from numba import njit
from zarr.codecs import BloscCname, BloscCodec

from ..errors import HelmError
from ..progress import Progress
from ..volume import affine_of, orientation_code, provenance_record
from . import direct, location, regions
from . import nifti as nii
from .mgh import is_mgh_path, read_mgh_header
from .store import (
    atomic_path,
    atomic_store,
    build_pyramid,
    compressor_for,
    create_level,
    distributed_client,
    normalize_chunks,
    open_group,
    open_volume,
    read_meta,
    select_echo,
    store_target,
    write_attrs,
    write_chunks,
)

ECHO_COMBINE = ("rms", "mean")


def read_header(src: Any, *, storage_options: dict | None = None) -> nii.NiftiInfo:
    """The header of a volume file to import: NIfTI-1/2 (``.nii``/``.nii.gz``) or FreeSurfer ``.mgh``/``.mgz``.

    Both lay their voxels out the same way (Fortran order after a fixed offset), so either header feeds
    :class:`~helm_dask.io.nifti.SlabReader`.

    Parameters
    ----------
    src : path-like or URL
        The file; ``.mgh``/``.mgz`` names are read as MGH, anything else as NIfTI.
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`).

    Returns
    -------
    NiftiInfo
        The validated header (see :func:`~helm_dask.io.nifti.read_nifti_header`).
    """
    if is_mgh_path(src):
        return read_mgh_header(src, storage_options=storage_options)
    return nii.read_nifti_header(src, storage_options=storage_options)


# ----------------------------------------------------------------------------------------------------------------
# Import (NIfTI / MGH -> Zarr)


@dataclass
class _ImportPlan:
    """What an import writes, decided from the header and the options before any voxel is read."""

    info: nii.NiftiInfo
    kind: str
    chunks: tuple[int, ...]
    four_d: bool
    nt: int
    out_shape: tuple[int, ...]
    keep: list[int] | None  # echoes the reader yields (None: all)
    out_four_d: bool
    raw_dtype: np.dtype
    reader_scaled: bool  # the reader applies scl_slope/scl_inter (to zero non-finite values)
    combine: bool  # echoes combined into one 3-D volume
    nifti_meta: dict
    ornt: np.ndarray  # per file axis: (stored axis, +1 or -1 if reversed), nibabel's orientation array
    affine: np.ndarray  # of the stored voxel order

    @property
    def perm(self) -> list[int]:
        """The file axis stored as each stored axis (the transpose after the flips)."""
        return [int(a) for a in np.argsort(self.ornt[:, 0])]

    @property
    def z_axis(self) -> int:
        """The stored axis the file's slowest (z) axis becomes: slabs are thin along it."""
        return int(self.ornt[2, 0])

    @property
    def z_reversed(self) -> bool:
        return bool(self.ornt[2, 1] < 0)


def _storage_ornt(info: nii.NiftiInfo, src: Any, ras: bool) -> np.ndarray:
    """The orientation (nibabel's ``io_orientation``) that stores the file in RAS+ voxel order, or the identity.

    The same permutation and flips as :func:`helm_dask.orient.to_ras`, so a stored volume's affine is nibabel's
    ``as_closest_canonical`` of the file's and every voxel keeps its world position exactly.
    """
    if not ras:
        return np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    ornt = nib.orientations.io_orientation(np.asarray(info.affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise HelmError(
            "the affine is degenerate (a voxel axis has no direction); cannot store it in RAS+ order",
            path=src,
            hint="check the sform/qform of the input file",
        )
    return ornt


def _voxel_order_record(plan: _ImportPlan) -> dict[str, Any]:
    """The import's provenance entry for the RAS+ order: the file's order and how the stored one was reached."""
    return {
        "voxel_order": {
            "stored": "RAS",
            "file": orientation_code(plan.info.affine),
            "axis_order": plan.perm,
            "flipped_file_axes": [int(i) for i in np.nonzero(plan.ornt[:, 1] < 0)[0]],
        }
    }


def _stored_slab(plan: _ImportPlan, data: np.ndarray, z0: int, z1: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """A file slab (planes ``z0:z1``) in the stored voxel order, and the spatial region it fills there.

    Flips first, in file axis order, then the transpose: the order of nibabel's ``apply_orientation``. Views
    only (no copy) when the file is already in the stored order.
    """
    flips = tuple(slice(None, None, -1) if f < 0 else slice(None) for f in plan.ornt[:, 1])
    out = data[flips].transpose(plan.perm)
    where = [slice(None)] * 3
    nz = int(plan.info.shape[2])
    where[plan.z_axis] = slice(nz - z1, nz - z0) if plan.z_reversed else slice(z0, z1)
    return tuple(where), out


def _import_plan(
    info: nii.NiftiInfo,
    src: Any,
    *,
    chunks: Any,
    echo: int | None,
    echo_combine: str | None,
    kind: str,
    nonfinite: str,
    ras: bool = False,
) -> _ImportPlan:
    """Check the header against the echo options and decide the output's shape, voxel order, dtype and NIfTI
    metadata (``ras``: stored in RAS+ voxel order, otherwise in the file's)."""
    if info.stored_ndim < 3:
        # padded to one plane it would import, and fail much later with messages about something else
        raise HelmError(
            f"is a {info.stored_ndim}-D image (shape {tuple(info.shape[: info.stored_ndim])}), not a 3-D volume",
            path=src,
            hint="give a 3-D volume (or a 4-D multi-echo scan)",
        )
    four_d = len(info.shape) == 4
    nt = info.shape[3] if four_d else 1
    if not four_d and echo not in (None, 0):
        raise HelmError(f"is a 3-D volume; --echo {echo} does not exist", path=src, hint="drop --echo")
    if four_d and echo is not None and not 0 <= echo < nt:
        raise HelmError(
            f"has {nt} echoes; --echo {echo} is out of range (0..{nt - 1})",
            path=src,
            hint=f"choose an echo between 0 and {nt - 1}",
        )
    if kind == "auto":
        kind = "labels" if int(info.header["intent_code"]) == nii.INTENT_LABEL else "image"
    ornt = _storage_ornt(info, src, ras)
    shape3 = tuple(int(info.shape[int(a)]) for a in np.argsort(ornt[:, 0]))
    affine = np.asarray(info.affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, info.shape[:3])
    chunks = normalize_chunks(chunks, shape3)  # in the stored order, like the shape
    keep: list[int] | None
    if four_d and echo is not None:
        out_shape, keep, out_four_d = shape3, [echo], False
    elif four_d and echo_combine is not None:
        out_shape, keep, out_four_d = shape3, None, False
    else:
        out_shape, keep, out_four_d = shape3 + tuple(info.shape[3:]), None, four_d
    raw_dtype = info.dtype.newbyteorder("=")
    if info.scaled and nonfinite == "zero":
        # Zeroing non-finite values needs the scaled values; store them scaled (float).
        raw_dtype = info.out_dtype
    reader_scaled = info.scaled and nonfinite == "zero"
    nifti_meta = {
        "version": info.version,
        "sform_code": info.sform_code,
        "qform_code": info.qform_code,
        "dtype": str(info.dtype.newbyteorder("=")),
        "shape": list(info.shape),
        "scaling": [1.0, 0.0] if reader_scaled else [info.slope, info.inter],
        "header_b64": base64.b64encode(info.header.binaryblock).decode("ascii"),
    }
    return _ImportPlan(
        info=info,
        kind=kind,
        chunks=tuple(chunks),
        four_d=four_d,
        nt=nt,
        out_shape=tuple(out_shape),
        keep=keep,
        out_four_d=out_four_d,
        raw_dtype=raw_dtype,
        reader_scaled=reader_scaled,
        combine=four_d and echo_combine is not None,
        nifti_meta=nifti_meta,
        ornt=ornt,
        affine=affine,
    )


def _stream_slabs(
    reader: nii.SlabReader,
    landing: Any,
    plan: _ImportPlan,
    kept: list[int],
    direct: bool,
    *,
    nonfinite: str,
    src: Any,
    dst: Any,
    tmp: Any,
    quiet: bool,
    assembler: _LayerAssembler | None = None,
) -> int:
    """Read the file once, in order, writing every slab into ``landing``; returns the non-finite voxel count.
    Each slab written is reported to ``assembler``, which starts the final chunks of a layer once it is whole."""
    total_nonfinite = 0
    prog = Progress(len(kept) * plan.info.shape[2], f"reading {Path(src).name}", quiet=quiet)
    point = f"write:{location.name(dst)}"
    for slab in _raw_slabs(reader, scaled=plan.reader_scaled):
        location.fault(point, tmp)
        data = slab.data
        if slab.nonfinite:
            total_nonfinite += slab.nonfinite
            if nonfinite == "zero":
                data = np.where(np.isfinite(data), data, 0).astype(data.dtype)
            else:
                continue  # keep reading to count them all; nothing will be kept
        where, data = _stored_slab(plan, data, slab.z0, slab.z1)
        if direct and not plan.out_four_d:
            write_chunks(landing, where, data)
        else:
            write_chunks(landing, (kept.index(slab.t or 0), *where), data)
        if assembler is not None:
            assembler.landed(where[plan.z_axis])
        prog.update(slab.z1 - slab.z0)
    prog.close()
    return total_nonfinite


def _level0_from_landing(
    group: Any, landing: Any, target: Any, plan: _ImportPlan, *, echo_combine: str | None, src: Any
) -> tuple[da.Array, Any, int]:
    """``(level 0 as a lazy array over the thin landing chunks, the array it is stored in, its z axis)``: one
    final chunk per Dask task (combined echoes: a new float32 level 0)."""
    info = plan.info
    landed = da.moveaxis(direct.from_zarr(landing, chunks=(1,) + tuple(plan.chunks)), 0, 3)
    if plan.combine:
        if info.scaled and not plan.reader_scaled:
            ft = info.out_dtype.type
            landed = landed.astype(info.out_dtype) * ft(info.slope) + ft(info.inter)
        level0 = select_echo(landed, echo=None, echo_combine=echo_combine, path=src)
        target = create_level(group, 0, plan.out_shape, np.float32, plan.chunks, four_d=False)
        plan.nifti_meta["scaling"] = [1.0, 0.0]
        plan.nifti_meta["dtype"] = "float32"
        return level0.rechunk(target.chunks), target, plan.z_axis
    if plan.out_four_d:
        return da.moveaxis(landed, 3, 0).rechunk(target.chunks), target, plan.z_axis + 1
    return landed[..., 0].rechunk(target.chunks), target, plan.z_axis


class _LayerAssembler:
    """Builds level 0 from the landing layer by layer, while the file is still being read.

    The stream is one serial process (gunzip, checksum, landing writes) and the assembly is the workers' (read
    the thin chunks, write whole ones): one after the other, the workers idle through the stream and the
    stream's process through the assembly. A chunk layer along the stored z axis is complete as soon as its
    planes of every kept echo are landed; its final chunks are then handed to the cluster (futures, no wait).
    Without a distributed client everything is assembled at the end, as one computation.
    """

    def __init__(self, level0: da.Array, target: Any, zax: int, layer: int, n_echoes: int):
        self.level0, self.target, self.zax, self.layer = level0, store_target(target), zax, layer
        self.need = n_echoes
        self.client = distributed_client()
        self.seen: dict[int, int] = {}
        self.futures: list = []

    def landed(self, zs: slice) -> None:
        """Planes ``zs`` (stored order, within one chunk layer) of one echo are in the landing."""
        i = zs.start // self.layer
        self.seen[i] = self.seen.get(i, 0) + (zs.stop - zs.start)
        lo, hi = i * self.layer, min((i + 1) * self.layer, self.level0.shape[self.zax])
        if self.client is not None and self.seen[i] == (hi - lo) * self.need:
            region = tuple(slice(lo, hi) if d == self.zax else slice(0, n) for d, n in enumerate(self.level0.shape))
            stored = da.store(self.level0[region], self.target, regions=region, lock=False, compute=False)
            self.futures.append(self.client.compute(stored))

    def finish(self) -> None:
        """Wait for the layers handed out; without a client, assemble everything now."""
        if self.client is None:
            da.store(self.level0, self.target, lock=False, compute=True)
            return
        for f in self.futures:
            f.result()
        self.futures = []

    def cancel(self) -> None:
        if self.futures and self.client is not None:
            self.client.cancel(self.futures)
        self.futures = []


def _landing_codec(plan: _ImportPlan) -> BloscCodec:
    """Blosc lz4 for the landing's thin chunks, which are written once and read once: on a 0.2 mm template scan
    (float32) it encodes at 3.3 GB/s and decodes at 6.4 GB/s, against zstd level 1's 0.9 and 2.3 GB/s (the stored
    volumes' codec), for 1% more bytes (ratio 0.762 against 0.755)."""
    return dataclasses.replace(compressor_for(plan.raw_dtype), cname=BloscCname.lz4)


def _import_level0(
    group: Any,
    plan: _ImportPlan,
    *,
    src: Any,
    dst: Any,
    tmp: Any,
    echo: int | None,
    echo_combine: str | None,
    nonfinite: str,
    layer_mb: float,
    quiet: bool,
) -> tuple[nii.SlabReader, int]:
    """Stream the file into level 0 of ``group``; returns the reader (with the file's checksum) and the count
    of non-finite voxels."""
    info, chunks, zax = plan.info, plan.chunks, plan.z_axis
    target = create_level(group, 0, plan.out_shape, plan.raw_dtype, chunks, four_d=plan.out_four_d)
    # Whole Zarr chunks need chunk_z planes of every (x, y) tile, and a sequential stream delivers whole
    # planes: writing chunks directly would hold x * y * chunk_z voxels, which grows with the volume. So,
    # when that layer is over budget, the stream lands in thin chunks (chunk_z split to fit the budget) and
    # Dask then assembles the final chunks from them, one chunk per task: memory stays flat with size.
    # Multi-echo data to be combined always lands first (echoes of one z-range lie far apart in the file).
    # Stored in RAS+ order, the file's z axis is the stored axis ``zax`` (reversed, maybe): slabs are thin
    # along it, and when it is reversed the first slab holds n mod thin_z planes, so that every slab fills
    # whole chunks (no chunk is written twice).
    thin_z = _slab_planes(info.shape, np.dtype(plan.raw_dtype).itemsize, chunks[zax], int(layer_mb * 2**20))
    kept = [echo] if (plan.four_d and echo is not None) else list(range(plan.nt))
    direct = thin_z == chunks[zax] and not plan.combine
    if direct:
        landing = target
    else:
        land_shape = tuple(plan.out_shape[:3]) + (len(kept),)
        land_chunks = tuple(thin_z if d == zax else c for d, c in enumerate(chunks))
        # the landing array sits next to level 0, under a name rather than a level number
        landing = create_level(
            group, "_landing", land_shape, plan.raw_dtype, land_chunks, four_d=True, compressor=_landing_codec(plan)
        )
    first = (int(info.shape[2]) % thin_z or thin_z) if plan.z_reversed else thin_z
    reader = nii.SlabReader(info, thin_z, echoes=plan.keep, first_planes=first, reuse=True)
    assembler = None
    if not direct:
        level0, target, zax0 = _level0_from_landing(group, landing, target, plan, echo_combine=echo_combine, src=src)
        assembler = _LayerAssembler(level0, target, zax0, chunks[zax], len(kept))
    try:
        total_nonfinite = _stream_slabs(
            reader,
            landing,
            plan,
            kept,
            direct,
            nonfinite=nonfinite,
            src=src,
            dst=dst,
            tmp=tmp,
            quiet=quiet,
            assembler=assembler,
        )
        if total_nonfinite and nonfinite == "error":
            raise HelmError(
                f"has {total_nonfinite:,} NaN or infinite voxels",
                path=src,
                hint="fix the scan, or pass --nonfinite zero to set them to 0",
            )
        if assembler is not None:
            assembler.finish()
    finally:
        if assembler is not None:
            assembler.cancel()  # an error: no write of this import may outlive it
    if not direct:
        del group["_landing"]
    return reader, total_nonfinite


def _write_import_attrs(
    group: Any,
    plan: _ImportPlan,
    src: Any,
    dst: Any,
    params: dict,
    reader: nii.SlabReader,
    nlevels: int,
    total_nonfinite: int,
) -> None:
    """The finished store's attributes: geometry, the source's NIfTI metadata and provenance, complete."""
    sha256 = cast(str, reader.sha256)  # set once the reader has gone through the file
    prov = [provenance_record("import", params, {os.fspath(src): sha256})]
    write_attrs(
        group,
        affine=plan.affine,
        kind=plan.kind,
        name=Path(os.fspath(dst).rstrip("/")).stem,
        nlevels=nlevels,
        four_d=plan.out_four_d,
        complete=True,
        extra={
            "source": os.fspath(src),
            "nifti": plan.nifti_meta,
            "provenance": prov,
            "input_sha256": reader.sha256,
            "nonfinite_zeroed": total_nonfinite,
        },
    )


def nifti_to_zarr(
    src: Any,
    dst: Any,
    *,
    chunks: Any = None,
    echo: int | None = None,
    echo_combine: str | None = None,
    kind: str = "auto",
    nonfinite: str = "error",
    overwrite: bool = False,
    pyramid: bool = True,
    layer_mb: float = 64,
    quiet: bool = True,
    storage_options: dict | None = None,
    ras: bool = False,
) -> dict:
    """Convert a NIfTI file (``.nii``/``.nii.gz``, NIfTI-1/2, 3-D or 4-D) to a helm-dask Zarr volume.

    A FreeSurfer ``.mgh``/``.mgz`` file (e.g. a SAMSEG segmentation) is read the same way, streamed; its store
    keeps a NIfTI header made from its geometry (see :mod:`helm_dask.io.mgh`). The data are kept as stored on
    disk (dtype and ``scl_slope``/``scl_inter``); :func:`open_volume` applies the scaling, and converting back
    gives the original file's data bit for bit (in RAS+ voxel order with ``ras``: the same voxels, reordered).

    Parameters
    ----------
    src, dst : path-like or URL
        Input NIfTI file and output store (written under a temporary name, renamed when complete; on object
        storage written in place and flagged complete last). Either may be an fsspec URL (``s3://...``).
    chunks : int or 3 ints
        Zarr chunk shape (default 128^3).
    echo : int, optional
        For a 4-D file: keep only this echo (0-based).
    echo_combine : {"rms", "mean"}, optional
        For a 4-D file: combine the echoes into one 3-D volume. With neither option a 4-D file gives a 4-D store
        (lossless).
    kind : {"auto", "image", "labels"}
        ``auto``: labels when the header's intent is NIFTI_INTENT_LABEL, otherwise image.
    nonfinite : {"error", "zero"}
        NaN/inf voxels: refuse (the default; the message counts them) or set them to 0.
    overwrite : bool
        Replace an existing store.
    pyramid : bool
        Build the coarser pyramid levels (3-D stores only).
    layer_mb : float
        Memory budget of the planes held while streaming (see ``docs/method/io.md``).
    quiet : bool
        No progress bar.
    storage_options : dict, optional
        fsspec options for URLs (see :mod:`helm_dask.io.location`).
    ras : bool
        Store the voxels in RAS+ order (axis flips and a transpose, exact, while streaming: nibabel's
        ``as_closest_canonical``, :func:`helm_dask.orient.to_ras`), not the file's; the pipeline does.

    Returns
    -------
    dict
        ``{"path", "sha256", "nonfinite", "shape", "dtype"}`` (the stored shape).
    """
    if nonfinite not in ("error", "zero"):
        raise ValueError("nonfinite must be 'error' or 'zero'")
    if echo_combine is not None and echo_combine not in ECHO_COMBINE:
        raise HelmError(f"unknown --echo-combine {echo_combine!r}", hint="use rms or mean")
    info = read_header(src, storage_options=storage_options)
    plan = _import_plan(
        info, src, chunks=chunks, echo=echo, echo_combine=echo_combine, kind=kind, nonfinite=nonfinite, ras=ras
    )
    with atomic_store(dst, overwrite=overwrite, storage_options=storage_options) as tmp:
        group = open_group(tmp, "w", storage_options)
        write_attrs(
            group,
            affine=plan.affine,
            kind=plan.kind,
            name=Path(dst).stem,
            nlevels=1,
            four_d=plan.out_four_d,
            complete=False,
        )
        reader, total_nonfinite = _import_level0(
            group,
            plan,
            src=src,
            dst=dst,
            tmp=tmp,
            echo=echo,
            echo_combine=echo_combine,
            nonfinite=nonfinite,
            layer_mb=layer_mb,
            quiet=quiet,
        )
        nlevels = build_pyramid(group, kind=plan.kind, chunks=plan.chunks) if (pyramid and not plan.out_four_d) else 1
        params = {"echo": echo, "echo_combine": echo_combine, "nonfinite": nonfinite, "chunks": list(plan.chunks)}
        params.update(_voxel_order_record(plan) if ras else {})
        _write_import_attrs(group, plan, src, dst, params, reader, nlevels, total_nonfinite)
    return {
        "path": os.fspath(dst),
        "sha256": reader.sha256,
        "nonfinite": total_nonfinite,
        "shape": list(plan.out_shape),
        "dtype": str(np.dtype(plan.raw_dtype if not (plan.four_d and echo_combine) else np.float32)),
    }


def _raw_slabs(reader: nii.SlabReader, *, scaled: bool) -> Iterator[nii.Slab]:
    """Slabs as stored: raw on-disk values (scaling kept in metadata) unless ``scaled``."""
    info = reader.info
    if scaled or not info.scaled:
        yield from reader
        return
    # Read raw values: temporarily present the header as unscaled.
    slope, inter = info.slope, info.inter
    info.slope, info.inter = 1.0, 0.0
    try:
        yield from reader
    finally:
        info.slope, info.inter = slope, inter


def _slab_planes(vol_shape: Sequence[int], itemsize: int, chunk_z: int, budget_bytes: int) -> int:
    """Largest divisor of the chunk depth whose slab fits the budget: slabs never straddle chunk layers."""
    plane = int(vol_shape[0]) * int(vol_shape[1]) * itemsize
    for dz in sorted((d for d in range(1, chunk_z + 1) if chunk_z % d == 0), reverse=True):
        if dz * plane <= budget_bytes:
            return dz
    return 1


# ----------------------------------------------------------------------------------------------------------------
# Export (Zarr / any volume -> NIfTI)


def _export_header(
    vol: xr.DataArray,
    data: da.Array,
    dtype: np.dtype,
    *,
    sform_code: int | None,
    qform_code: int | None,
    version: int | None,
    scaling: Sequence[float],
    provenance: dict | None,
) -> bytes:
    """The bytes that start the file: the header (codes and version from the source file's when known)."""
    kind = vol.attrs.get("kind", "image")
    raw_meta = vol.attrs.get("nifti")
    nmeta: dict = raw_meta if isinstance(raw_meta, dict) else {}
    hdr = nii.build_header(
        data.shape,
        dtype,
        affine_of(vol),
        kind=kind,
        sform_code=sform_code if sform_code is not None else nmeta.get("sform_code", 1),
        qform_code=qform_code if qform_code is not None else nmeta.get("qform_code", 1),
        version=version or (nmeta.get("version") if nmeta else None),
        provenance=provenance,
    )
    if tuple(scaling) != (1.0, 0.0):
        hdr.set_slope_inter(*scaling)
    return nii.header_bytes(hdr)


def _slab_plan(
    data: da.Array, dtype: np.dtype, slab_mb: float
) -> tuple[da.Array, int, int, list[tuple[int, int, int]]]:
    """``(data, chunk_z, dz, slabs)``: regular chunks, slab depth ``dz`` (a divisor of the chunk depth that
    fits ``slab_mb``) and every slab ``(t, z0, z1)`` in file order."""
    nt = data.shape[3] if data.ndim == 4 else 1
    regular = tuple(c[0] for c in data.chunks)
    if any(len(set(c[:-1])) > 1 or c[-1] > c[0] for c in data.chunks):
        data = data.rechunk(regular)  # slabs and scratch chunks must nest in the source blocks
    chunk_z = data.chunks[2][0]
    dz = _slab_planes(data.shape, dtype.itemsize, chunk_z, int(slab_mb * 2**20))
    slabs = [(t, z0, min(data.shape[2], z0 + dz)) for t in range(nt) for z0 in range(0, data.shape[2], dz)]
    return data, chunk_z, dz, slabs


def _thin_scratch(
    data: da.Array, dz: int, *, dst: str, tmp: str, remote: bool, storage_options: dict | None, cleanup: Any
) -> dict[tuple[int, int], list]:
    """Split ``data`` into pieces ``dz`` planes deep, written by the workers to a scratch folder (deleted by
    ``cleanup``): one file per source chunk. Returns, per slab ``(t, z0)``, where its pieces are (see
    :func:`_scratch_slab`); all-zero pieces are not stored."""
    if remote:  # workers write it: it must live where they can see it, next to the output
        location.remove_stale_siblings(dst, ".thin", storage_options)  # a killed writer's copy
        folder = location.sibling(dst, ".thin")
        cleanup.callback(location.remove_quietly, folder, storage_options)
    else:
        folder = f"{tmp}.thin"
        cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
        os.makedirs(folder)
    # Each source chunk is decoded once and its pieces, already in file order, written as ONE file (a Zarr
    # scratch store of thin chunks cost a Zarr write and a Zarr read per piece: 86k of each for a 0.1 mm
    # whole-brain map, most of the export's time). Memory: one chunk at a time per task.
    view = regions.store_view_of(data) if data.ndim == 3 else None
    if view is not None:
        found = _split_stored(view, data, folder, dz, storage_options, remote)
    else:
        # map_blocks (not to_delayed): the chunk's read or computation fuses into the task, so no chunk travels
        # between workers
        found = da.map_blocks(
            _split_block,
            data,
            folder,
            dz,
            storage_options,
            remote,
            dtype=object,
            chunks=tuple((1,) * len(c) for c in data.chunks),
            meta=np.empty((0,) * data.ndim, dtype=object),
        ).compute()
    where: dict[tuple[int, int], list] = {}
    for path, origin, pieces in (entry for found_box in found.flat for entry in found_box):
        for t, z0, offset, nbytes, (nx, ny) in pieces:
            x0, y0 = origin[0], origin[1]
            where.setdefault((t, z0), []).append((path, offset, nbytes, x0, x0 + nx, y0, y0 + ny))
    return where


def _split_block(
    block: np.ndarray, folder: str, dz: int, storage_options: dict | None, remote: bool, block_info: Any = None
) -> np.ndarray:
    """:func:`_split_chunk` of one block of a dask array, named by its place: a one-element object array holding
    ``[(file, origin, pieces)]``."""
    info = block_info[0]
    origin = tuple(int(a) for a, _ in info["array-location"])
    path = _scratch_file(folder, info["chunk-location"], remote)
    out = np.empty((1,) * block.ndim, dtype=object)
    out.flat[0] = [(path, origin, _split_chunk(block, path, origin, dz, storage_options))]
    return out


def _scratch_file(folder: str, chunk_index: Sequence[int], remote: bool) -> str:
    name = ".".join(str(int(i)) for i in chunk_index)
    return location.join(folder, name) if remote else os.path.join(folder, name)


#: Source chunks per axis that one task splits when the source is stored (2: eight chunks per task). One task per
#: chunk of a 0.1 mm whole-brain map was 3,136 tasks of 5.6 ms, and the scheduler's and client's ~2 ms per task,
#: on the cores the two workers share with them, kept the workers busy 65% of the split (13.7-14.2 s); in boxes
#: of eight, 392 tasks, 87% (9.2-9.7 s).
_SCRATCH_GROUP = 2


def _split_stored(
    view: regions.StoreView, data: da.Array, folder: str, dz: int, storage_options: dict | None, remote: bool
) -> np.ndarray:
    """:func:`_split_chunk` of every chunk of ``data``, a stored volume read through ``view``: one task
    per box of :data:`_SCRATCH_GROUP` chunks per axis, reading the store itself. Returns an object array of
    ``[(file, origin, pieces), ...]`` lists, one per box."""
    name = "split-stored-" + tokenize(data.name, folder, dz, _SCRATCH_GROUP)
    args = (view, folder, dz, storage_options, remote)
    return regions.box_tasks(_split_stored_box, data.chunks, _SCRATCH_GROUP, *args, name=name).compute()


def _split_stored_box(
    first: list[int],
    edges: list,
    view: regions.StoreView,
    folder: str,
    dz: int,
    storage_options: dict | None,
    remote: bool,
) -> np.ndarray:
    """The chunks of one box (``edges`` per axis; ``first``: the box's first chunk index) read from the store
    one after the other and split (:func:`_split_chunk`); a one-element object array holding their list."""
    found = []
    for cell, lo, hi in regions.box_cells(edges):
        path = _scratch_file(folder, [f + i for f, i in zip(first, cell)], remote)
        found.append((path, tuple(lo), _split_chunk(view.read(lo, hi), path, tuple(lo), dz, storage_options)))
    out = np.empty((1,) * len(edges), dtype=object)
    out.flat[0] = found
    return out


def _scratch_codec(dtype: np.dtype) -> Any:
    """Blosc lz4 (bit shuffle for integers, byte shuffle for floats): the fastest to encode and decode of the
    Blosc codecs on label maps and images, at bytes that live only for one export."""
    shuffle = numcodecs.Blosc.SHUFFLE if np.dtype(dtype).kind == "f" else numcodecs.Blosc.BITSHUFFLE
    return numcodecs.Blosc(cname="lz4", clevel=1, shuffle=shuffle)


def _split_chunk(
    block: np.ndarray, path: str, origin: tuple[int, ...], dz: int, storage_options: dict | None
) -> list[tuple[int, int, int, int, tuple[int, int]]]:
    """Write the non-zero ``dz``-plane pieces of one source chunk as one file; returns ``(t, z0, offset, nbytes,
    (nx, ny))`` of each piece written (``t`` the echo, ``z0`` the piece's first plane in the volume)."""
    b4 = block if block.ndim == 4 else block[..., None]
    codec = _scratch_codec(block.dtype)
    found, parts, offset = [], [], 0
    for t in range(b4.shape[3]):
        vol = b4[..., t]
        if not vol.any():
            continue
        # Pieces keep the chunk's axis order (x, y, dz): cutting them out is a copy of short runs (128^3 uint16
        # into 4-plane pieces: 2.8 ms), and the slab task turns them into the file's order as it places them
        # (_place_nb). Reversing the chunk's axes here instead cost 6.1 ms per chunk on the AMD machine (the
        # 2-D transposes' rows are 32 KB apart, one cache set) and made Blosc slower on the reversed pieces
        # (encode + decode 7.3 -> 4.3 ms, 13% larger). Measured per 128^3 uint16 chunk of a label map.
        for k in range(0, vol.shape[2], dz):
            piece = np.ascontiguousarray(vol[:, :, k : k + dz])
            if not piece.any():
                continue
            enc = codec.encode(piece)
            parts.append(enc)
            found.append((origin[3] + t if block.ndim == 4 else 0, origin[2] + k, offset, len(enc), vol.shape[:2]))
            offset += len(enc)
    if parts:
        payload = b"".join(parts)
        if location.is_url(path):
            with location.open_write(path, overwrite=True, storage_options=storage_options) as f:
                f.write(payload)
        else:
            with open(path, "wb") as f:
                f.write(payload)
    return found


def _read_pieces(pieces: list, storage_options: dict | None) -> list[bytes]:
    """The encoded bytes of ``pieces`` (``(file, offset, nbytes, ...)``), one read each (remote: all at once)."""
    if pieces and location.is_url(pieces[0][0]):
        fs, _ = location.filesystem(pieces[0][0], storage_options)
        paths = [location.filesystem(p[0], storage_options)[1] for p in pieces]
        return list(fs.cat_ranges(paths, [p[1] for p in pieces], [p[1] + p[2] for p in pieces]))
    out = []
    for path, offset, nbytes, *_ in pieces:
        fd = os.open(path, os.O_RDONLY)
        try:
            out.append(os.pread(fd, nbytes, offset))
        finally:
            os.close(fd)
    return out


def _scratch_slab(
    pieces: list,
    shape: tuple[int, int, int],
    src_dtype: np.dtype,
    dtype: np.dtype,
    gz: bool,
    level: int,
    storage_options: dict | None,
) -> bytes | nii.GzipPart:
    """A slab of ``shape`` (x, y, planes) assembled from its scratch pieces (zeros elsewhere), encoded."""
    nx, ny, nz = shape
    out = np.zeros((nz, ny, nx), dtype=src_dtype)  # C order (z, y, x): the slab's Fortran-order bytes
    codec = _scratch_codec(src_dtype)
    for (_, _, _, x0, x1, y0, y1), enc in zip(pieces, _read_pieces(pieces, storage_options)):
        piece = np.frombuffer(codec.decode(enc), dtype=src_dtype).reshape(x1 - x0, y1 - y0, nz)
        _place_nb(piece, out, x0, y0)
    return nii.encode_slab(out.T, dtype, gz, level)  # out.T: the (x, y, z) slab, Fortran-contiguous (no copy)


@njit(cache=True, nogil=True)
def _place_nb(piece: np.ndarray, out: np.ndarray, x0: int, y0: int) -> None:  # pragma: no cover - compiled
    """``out[z, y0 + y, x0 + x] = piece[x, y, z]``: a piece in the chunk's axis order placed into a slab in the
    file's. The few planes of a piece are the innermost loop, so each row of the slab is written in order
    (32 pieces of 128 x 128 x 4 uint16: 1.9 ms)."""
    px, py, pz = piece.shape
    for y in range(py):
        for x in range(px):
            for z in range(pz):
                out[z, y0 + y, x0 + x] = piece[x, y, z]


def _slab_task(
    data: da.Array,
    stored: Any,
    t: int,
    z0: int,
    z1: int,
    dtype: np.dtype,
    gz: bool,
    compresslevel: int,
    storage_options: dict | None = None,
) -> Any:
    """The delayed encoded planes ``z0:z1`` of echo ``t`` (raw bytes, or a :class:`~helm_dask.io.nifti.GzipPart`),
    read from the scratch pieces or the store inside the task when possible."""
    four_d = data.ndim == 4
    if isinstance(stored, dict):
        shape = (int(data.shape[0]), int(data.shape[1]), z1 - z0)
        return dask.delayed(_scratch_slab, pure=False)(
            stored.get((t, z0), []), shape, data.dtype, dtype, gz, compresslevel, storage_options
        )
    if stored is not None:
        # Read the slab inside the task: a dask slice of a stored volume would be one task per chunk,
        # spread over the workers and shipped to one of them to be concatenated.
        return dask.delayed(_encode_stored_slab, pure=False)(
            stored, t if four_d else None, z0, z1, dtype, gz, compresslevel
        )
    block = data[:, :, z0:z1, t] if four_d else data[:, :, z0:z1]
    return dask.delayed(nii.encode_slab, pure=True)(block, dtype, gz, compresslevel)


def save_nifti(
    vol: xr.DataArray,
    dst: Any,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    compresslevel: int = nii.DEFAULT_COMPRESSLEVEL,
    sform_code: int | None = None,
    qform_code: int | None = None,
    version: int | None = None,
    scaling: Sequence[float] = (1.0, 0.0),
    provenance: dict | None = None,
    slab_mb: float = 32,
    quiet: bool = True,
    storage_options: dict | None = None,
) -> str:
    """Write a (lazy) 3-D or 4-D volume to ``.nii``/``.nii.gz`` in z-slabs, with an exact header.

    sform = qform = the volume's affine, ``xyzt_units`` mm, intent label for labels/masks. A ``.nii.gz`` is one
    gzip member whose slabs the workers compress in parallel. Memory: the slabs in flight (two per worker
    thread, each at most ``slab_mb`` MB raw). A URL ``dst`` is one multipart upload,
    completed only when every slab is written (an error or Ctrl-C aborts it: no object, or the old one
    untouched); the thin pieces on scratch, which workers write, are then a hidden sibling folder on the same
    object storage, deleted afterwards.

    Parameters
    ----------
    vol : xarray.DataArray
        The volume (dask- or NumPy-backed), with ``attrs["affine"]``.
    dst : path-like or URL
        Output file, ending in ``.nii`` or ``.nii.gz`` (``s3://bucket/out.nii.gz`` too).
    dtype : dtype, optional
        Output data type; default the volume's (label maps should be uint8/uint16 and images float32 by the
        time they are written).
    overwrite : bool
        Replace an existing file.
    compresslevel : int
        gzip level for ``.nii.gz`` (see :func:`~helm_dask.io.nifti.gzip_member`).
    sform_code, qform_code : int, optional
        Header codes; default the source file's (``attrs["nifti"]``), else 1 = scanner.
    version : int, optional
        NIfTI version (1 or 2); default the source file's, else the smallest that fits.
    scaling : (float, float)
        ``scl_slope``, ``scl_inter`` written to the header (the data are written as they are).
    provenance : dict, optional
        JSON-able record stored in a header extension (:func:`~helm_dask.io.nifti.read_nifti_provenance`).
    slab_mb : float
        Largest raw slab (MB).
    quiet : bool
        No progress bar.
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`).

    Returns
    -------
    str
        ``dst``.
    """
    dst = os.fspath(dst)
    if not nii.is_nifti_path(dst):
        raise HelmError("output must end in .nii or .nii.gz", path=dst, hint="choose a NIfTI file name")
    gz = dst.lower().endswith(".gz")
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    dtype = np.dtype(dtype or data.dtype)
    head = _export_header(
        vol,
        data,
        dtype,
        sform_code=sform_code,
        qform_code=qform_code,
        version=version,
        scaling=scaling,
        provenance=provenance,
    )
    data, chunk_z, dz, slabs = _slab_plan(data, dtype, slab_mb)
    remote = location.is_url(dst)
    with (
        atomic_path(dst, overwrite=overwrite, storage_options=storage_options) as tmp,
        contextlib.ExitStack() as cleanup,
    ):
        stored: Any
        if dz < chunk_z:
            # A slab thinner than a chunk would re-read (or recompute) every chunk chunk_z/dz times. Split the
            # chunks once into thin pieces on scratch instead; each slab then reads exactly its own pieces.
            stored = _thin_scratch(
                data, dz, dst=dst, tmp=tmp, remote=remote, storage_options=storage_options, cleanup=cleanup
            )
        else:
            stored = regions.zarr_array_of(data) if data.ndim == 4 else regions.store_view_of(data)
        with (
            location.open_write(tmp, overwrite=True, storage_options=storage_options) if remote else open(tmp, "wb")
        ) as f:
            tasks = [_slab_task(data, stored, *s, dtype, gz, compresslevel, storage_options) for s in slabs]
            _write_parts(f, head, tasks, gz=gz, compresslevel=compresslevel, dst=dst, tmp=tmp, quiet=quiet)
    return dst


def _write_parts(
    f: Any, head: bytes, tasks: list, *, gz: bool, compresslevel: int, dst: str, tmp: str, quiet: bool
) -> None:
    """The file's bytes in order: the header, then each slab as its task delivers it. For ``.nii.gz`` all of it is
    ONE gzip member (browser readers stop after the first): the workers deflate the slabs, this process adds the
    gzip header, the header bytes' part, and a trailer whose CRC-32 it combines slab by slab."""
    member = nii.GzipMemberWriter(f, compresslevel) if gz else None
    if member is not None:
        member.write_bytes(head)
    else:
        f.write(head)
    prog = Progress(len(tasks), f"writing {Path(dst).name}", quiet=quiet)
    point = f"write:{location.name(dst)}"
    for part in _ordered_results(tasks):
        location.fault(point, tmp)
        if member is not None:
            member.write(part)
        else:
            f.write(part)
        prog.update(1)
    if member is not None:
        member.close()
    prog.close()


def _encode_stored_slab(
    src: Any, t: int | None, z0: int, z1: int, dtype: Any, gz: bool, level: int
) -> bytes | nii.GzipPart:
    """Planes ``z0:z1`` (of echo ``t``) read from a Zarr array or a :class:`regions.StoreView`, encoded."""
    if isinstance(src, regions.StoreView):
        block = src.read((0, 0, z0), (src.shape[0], src.shape[1], z1))
    elif t is None:
        block = direct.read_box(src, (0, 0, z0), (src.shape[0], src.shape[1], z1))
    else:
        block = src[:, :, z0:z1, t]
    return nii.encode_slab(block, dtype, gz, level)


def _ordered_results(tasks: list, window: int | None = None) -> Iterator[Any]:
    """Compute delayed tasks with a bounded number in flight, yielding results in order."""
    client = distributed_client()
    if client is not None:
        if window is None:
            # two per worker thread: with one more than the threads, a 0.1 mm label map's slabs kept two workers
            # busy 77% of the time (12.8 s) against 87% (12.0 s) with two each; more gained nothing
            nthreads = sum(client.nthreads().values()) or 1
            window = 2 * nthreads
        futures = []
        it = iter(tasks)
        for t in it:
            futures.append(client.compute(t))
            if len(futures) >= window:
                break
        while futures:
            fut = futures.pop(0)
            res = fut.result()
            fut.release()
            nxt = next(it, None)
            if nxt is not None:
                futures.append(client.compute(nxt))
            yield res
    else:
        window = window or 2
        for i in range(0, len(tasks), window):
            yield from dask.compute(*tasks[i : i + window])


def zarr_to_nifti(
    src: Any,
    dst: Any,
    *,
    level: int = 0,
    echo: int | None = None,
    echo_combine: str | None = None,
    overwrite: bool = False,
    compresslevel: int = nii.DEFAULT_COMPRESSLEVEL,
    quiet: bool = True,
    storage_options: dict | None = None,
) -> str:
    """Convert a helm-dask Zarr volume to NIfTI. Raw stored values and their scaling are kept (bit-exact).

    Parameters
    ----------
    src : path-like or URL
        The store.
    dst : path-like or URL
        Output ``.nii``/``.nii.gz`` file.
    level : int
        Pyramid level to write.
    echo, echo_combine : optional
        For a 4-D store: one echo, or the echoes combined (``"rms"``/``"mean"``), written with scaling applied.
    overwrite : bool
        Replace an existing file.
    compresslevel : int
        gzip level for ``.nii.gz``.
    quiet : bool
        No progress bar.
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    str
        The output path.
    """
    so = storage_options
    meta = read_meta(src, storage_options=so)
    vol = open_volume(src, level=level, echo=echo, echo_combine=echo_combine, apply_scaling=False, storage_options=so)
    nmeta = meta.get("nifti") or {}
    scaling = tuple(nmeta.get("scaling", (1.0, 0.0)))
    if vol.ndim == 3 and meta.get("four_d"):
        # A combined/selected echo of a scaled raw store: write the scaled values.
        vol = open_volume(src, level=level, echo=echo, echo_combine=echo_combine, storage_options=so)
        scaling = (1.0, 0.0)
    return save_nifti(
        vol,
        dst,
        overwrite=overwrite,
        compresslevel=compresslevel,
        scaling=scaling,
        version=nmeta.get("version"),
        quiet=quiet,
        storage_options=so,
    )


def convert(src: Any, dst: Any, **kw: Any) -> str:
    """Convert in the direction the extensions say: ``.nii``/``.nii.gz``/``.mgh``/``.mgz`` -> ``.zarr``, or
    ``.zarr`` -> ``.nii``/``.nii.gz``; paths or URLs.

    Parameters
    ----------
    src, dst : path-like or URL
        Input and output; their names decide the direction.
    **kw
        Options of :func:`nifti_to_zarr` or :func:`zarr_to_nifti` (those of the other direction are dropped).

    Returns
    -------
    str
        The output path.
    """
    s, d = os.fspath(src), os.fspath(dst)
    if (nii.is_nifti_path(s) or is_mgh_path(s)) and d.rstrip("/").endswith(".zarr"):
        kw.pop("level", None)
        kw.pop("compresslevel", None)
        return nifti_to_zarr(s, d, **kw)["path"]
    if s.rstrip("/").endswith(".zarr") and nii.is_nifti_path(d):
        for k in ("chunks", "kind", "nonfinite", "ras"):
            kw.pop(k, None)
        return zarr_to_nifti(s, d, **kw)
    raise HelmError(
        f"cannot tell the direction from the names {s!r} -> {d!r}",
        hint="convert .nii/.nii.gz to .zarr or .zarr to .nii/.nii.gz",
    )
