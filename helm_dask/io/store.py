"""Zarr v3 volume stores (OME-Zarr 0.5 multiscales, ``image-label`` for label maps, plus the exact affine),
written atomically and read lazily: :func:`save_volume` / :func:`save_volumes` write volumes with their pyramid
and metadata, batch by batch (:func:`store_batched`); :func:`open_volume` opens one as a lazy volume whose dask
array remembers its store (a :class:`~helm_dask.io.regions.StoredSource`); :func:`read_meta`,
:func:`is_complete` and :func:`describe` inspect one. Level 0 and its mm coordinates sit at the group's top and
the coarser levels in ``pyramid/`` (:func:`level_path`), so that ``xarray.open_zarr`` opens a store. The layout,
chunk size, compression and atomicity are described in ``docs/method/storage.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from itertools import product
from pathlib import Path
from typing import Any, Literal, cast

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from dask.layers import ArraySliceDep
from numba import njit
from zarr.codecs import BloscCodec

from ..errors import HelmError
from ..progress import current
from ..volume import (
    DIMS,
    affine_of,
    coord_attrs,
    make_volume,
    ome_placement,
    orientation_code,
    placement_of,
    spacing_of,
    voxel_coords,
)
from . import direct, location
from .location import (  # noqa: F401  (re-exported: they were defined here before)
    atomic_path,
    final_path_of,
    output_name,
    remove_live_temporaries,
    stop_pending_writes,
)
from .nifti import is_nifti_path, read_nifti_header
from .regions import StoredSource, attach_source, chunk_edges

DEFAULT_CHUNKS = (128, 128, 128)
PYRAMID_MIN_SIZE = 64  # stop adding levels once the largest dimension is below this
FORMAT = "helm-dask-volume"
#: 2: levels >= 1 in the ``pyramid/`` subgroup and level 0's coordinates beside it (1: every level at the top).
FORMAT_VERSION = 2
#: The subgroup of the coarser levels: OME-Zarr 0.5 names every level's dims ``x, y, z``, so levels of different
#: sizes side by side would give xarray conflicting sizes for one dim.
PYRAMID_GROUP = "pyramid"
#: Kinds stored as OME-Zarr ``image-label`` (napari opens them as labels layers).
LABEL_KINDS = ("labels", "mask")
#: The colours of a brain mask (1 = brain); background transparent.
MASK_COLOURS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    0: ("background", (0, 0, 0, 0)),
    1: ("brain", (0, 190, 255, 255)),
}


def level_path(level: int | str, format_version: int = FORMAT_VERSION) -> str:
    """The array path of a pyramid level inside its store (a scratch name is kept as it is).

    Parameters
    ----------
    level : int or str
        A level number (or a scratch array's name).
    format_version : int
        The store's ``format_version`` (1: every level at the top).

    Returns
    -------
    str

    Example
    -------
    >>> level_path(0), level_path(2), level_path(2, format_version=1), level_path("_landing")
    ('0', 'pyramid/2', '2', '_landing')
    """
    name = str(level)
    if not name.isdigit() or int(name) == 0 or format_version < 2:
        return name
    return f"{PYRAMID_GROUP}/{int(name)}"


def _local(path) -> Path | None:
    return None if location.is_url(path) else Path(os.fspath(path))


#: Blosc block size of the stores (bytes). Blosc's own choice at clevel 1 is a few tens of kB; whole 512 KiB
#: blocks give zstd more context and Blosc fewer blocks to frame. Measured on the template phantom's 0.3 mm
#: stores (128^3 chunks, one thread; Intel Xeon): scan float32 encode 13.7 -> 5.2 ms, decode 9.0 -> 3.6 ms per
#: chunk, ratio 1.32 -> 1.38; bias field 19.0 -> 12.3 / 9.9 -> 5.4 ms, ratio 4.75 -> 5.85; a whole-brain
#: uint16 label map 5.2 -> 3.1 / 4.0 -> 1.7 ms, ratio 19.4 -> 20.7; k-means uint8 3.1 -> 1.9 / 2.5 -> 1.3 ms.
BLOSC_BLOCKSIZE = 2**19


def compressor_for(dtype) -> BloscCodec:
    """Blosc for a stored volume: zstd level 1 (byte shuffle for floats, bit shuffle for labels) in blocks of
    :data:`BLOSC_BLOCKSIZE` bytes. (The export's scratch pieces, which live for one export only, have their own
    lz4 codec: :func:`helm_dask.io.convert._scratch_codec`.)

    Parameters
    ----------
    dtype : dtype-like
        The stored values' dtype.

    Returns
    -------
    zarr.codecs.BloscCodec

    Example
    -------
    >>> compressor_for("uint16").cname.value, compressor_for("float32").shuffle.value
    ('zstd', 'shuffle')
    """
    dtype = np.dtype(dtype)
    shuffle: Literal["shuffle", "bitshuffle"] = "shuffle" if dtype.kind == "f" else "bitshuffle"
    return BloscCodec(cname="zstd", clevel=1, shuffle=shuffle, typesize=dtype.itemsize, blocksize=BLOSC_BLOCKSIZE)


def normalize_chunks(chunks, shape) -> tuple[int, ...]:
    """Three positive chunk sizes for a volume of ``shape``, none larger than the volume.

    Parameters
    ----------
    chunks : int, sequence of three ints or None
        None: :data:`DEFAULT_CHUNKS`; an int: a cube.
    shape : sequence of int
        The volume's shape (the first three entries are used).

    Returns
    -------
    tuple of int

    Example
    -------
    >>> normalize_chunks(None, (300, 100, 50)), normalize_chunks(64, (300, 100, 50, 4))
    ((128, 100, 50), (64, 64, 50))
    """
    if chunks is None:
        chunks = DEFAULT_CHUNKS
    if isinstance(chunks, int):
        chunks = (chunks,) * 3
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 3 or any(c < 1 for c in chunks):
        raise HelmError(f"chunks must be three positive integers, got {chunks}", hint="e.g. --chunks 128,128,128")
    return tuple(min(c, s) for c, s in zip(chunks, shape[:3]))


# ----------------------------------------------------------------------------------------------------------------
# Atomic output


@contextlib.contextmanager
def atomic_store(path, *, overwrite: bool = False, storage_options: dict | None = None) -> Iterator[str]:
    """:func:`~helm_dask.io.location.atomic_path` for a Zarr volume: on object stores a failed write is also
    deleted.

    Locally this *is* ``atomic_path`` (temporary sibling, renamed when complete). For a URL the volume is
    written in place (an existing one is replaced as soon as the writer opens it with ``mode="w"``) and marked
    complete last; if the block fails, the unfinished store is deleted (best effort) so that no half volume is
    left behind. A killed client cannot clean up: its store stays flagged unfinished.

    Parameters
    ----------
    path : str or path-like
        The store (a local path or a URL).
    overwrite : bool
        Replace an existing store (refused otherwise).
    storage_options : dict, optional
        fsspec options for a URL.
    """
    if _local(path) is not None:
        with atomic_path(path, overwrite=overwrite) as tmp:
            yield tmp
        return
    with atomic_path(path, overwrite=overwrite, storage_options=storage_options) as p:
        try:
            yield p
        except BaseException:
            location.remove_quietly(p, storage_options)
            raise


def _format_kw(path, mode: str) -> dict:
    # On object stores, say "v3" when reading too: otherwise Zarr probes for v2 metadata (.zgroup, .zattrs,
    # .zmetadata), six more requests per open, dozens of opens per run.
    return {"zarr_format": 3} if (mode == "w" or _local(path) is None) else {}


def open_group(path, mode: Literal["r", "r+", "a", "w", "w-"], storage_options: dict | None = None) -> zarr.Group:
    """``zarr.open_group`` on a local path or a URL (with the storage options in force).

    Parameters
    ----------
    path : str or path-like
        The store.
    mode : {"r", "r+", "a", "w", "w-"}
        As ``zarr.open_group``.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    zarr.Group
    """
    return zarr.open_group(
        location.zarr_store(path, storage_options, read_only=mode == "r"), mode=mode, **_format_kw(path, mode)
    )


def open_array(path, level, storage_options: dict | None = None, *, format_version: int = FORMAT_VERSION) -> zarr.Array:
    """The (read-only) Zarr array of one level of a volume store, local path or URL.

    Parameters
    ----------
    path : str or path-like
        The store.
    level : int or str
        The pyramid level (see :func:`level_path`).
    storage_options : dict, optional
        fsspec options for a URL.
    format_version : int
        The store's ``format_version`` (``read_meta(path)["format_version"]``; only levels >= 1 depend on it).

    Returns
    -------
    zarr.Array
    """
    return zarr.open_array(
        location.zarr_store(path, storage_options, read_only=True),
        path=level_path(level, format_version),
        mode="r",
        **_format_kw(path, "r"),
    )


def _array_in(group: zarr.Group, key: str) -> zarr.Array:
    """The array ``key`` of ``group`` (a :class:`HelmError` if that node is a group)."""
    node = group[key]
    if not isinstance(node, zarr.Array):
        raise HelmError(f"{key!r} is a group, not an array", path=str(group.store_path), hint="check the store")
    return node


# ----------------------------------------------------------------------------------------------------------------
# Metadata


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return repr(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def level_affine(affine: np.ndarray, level: int, kind: str) -> np.ndarray:
    """Affine of pyramid ``level``: block means put voxel centres at block centres; strides at block corners.

    Parameters
    ----------
    affine : array-like, 4x4
        The full-resolution affine.
    level : int
        The level (each halves the resolution).
    kind : str
        ``"image"`` (block means) or anything else (strides: labels, masks).

    Returns
    -------
    numpy.ndarray
        4x4 float64.

    Example
    -------
    >>> level_affine(np.eye(4), 1, "image")[0].tolist(), level_affine(np.eye(4), 1, "labels")[0].tolist()
    ([2.0, 0.0, 0.0, 0.5], [2.0, 0.0, 0.0, 0.0])
    """
    a = np.asarray(affine, dtype=np.float64)
    f = 2.0**level
    shift = (f - 1.0) / 2.0 if kind == "image" else 0.0
    s = np.array([[f, 0, 0, shift], [0, f, 0, shift], [0, 0, f, shift], [0, 0, 0, 1.0]])
    return a @ s


def ome_multiscales(
    affine: np.ndarray, kind: str, nlevels: int, four_d: bool, name: str, shapes: list | None = None
) -> list:
    """OME-Zarr 0.5 ``multiscales``: per level, scale = voxel size, translation = :func:`ome_placement`'s.

    OME-Zarr 0.5 describes only axis-aligned scale + translation: exact for an affine that is diagonal and
    positive; for another (an oblique working grid), the translation puts each level's centre voxel exactly where
    the affine does, and corners are off by up to :func:`~helm_dask.volume.placement_error_mm`. The exact affine
    is kept beside it, in ``attrs["helm_dask"]`` (what helm-dask itself uses).

    Parameters
    ----------
    affine : array-like, 4x4
        The full-resolution affine.
    kind : str
        The volume's kind (see :func:`level_affine`).
    nlevels : int
        Number of pyramid levels.
    four_d : bool
        Whether the arrays have a leading ``echo`` axis.
    name : str
        The multiscale's name (the store's name).
    shapes : list of sequences of int, optional
        Each level's spatial shape (needed for the centre; a level without one, in an unfinished store, gets the
        translation of its voxel (0, 0, 0)).

    Returns
    -------
    list
        One multiscales entry.

    Example
    -------
    >>> ms = ome_multiscales(np.diag([0.5, 0.5, 0.5, 1.0]), "image", 2, False, "scan", [(8, 8, 8), (4, 4, 4)])
    >>> [(d["path"], d["coordinateTransformations"][0]["scale"]) for d in ms[0]["datasets"]]
    [('0', [0.5, 0.5, 0.5]), ('pyramid/1', [1.0, 1.0, 1.0])]
    """
    axes = [{"name": d, "type": "space", "unit": "millimeter"} for d in DIMS]
    if four_d:
        axes = [{"name": "echo", "type": "channel"}] + axes
    datasets = []
    for lev in range(nlevels):
        a = level_affine(affine, lev, kind)
        if shapes is not None and lev < len(shapes):
            sc, tr = ome_placement(a, tuple(shapes[lev]))
            scale, trans = sc.tolist(), tr.tolist()
        else:
            scale, trans = spacing_of(a).tolist(), a[:3, 3].tolist()
        if four_d:
            scale, trans = [1.0] + scale, [0.0] + trans
        datasets.append(
            {
                "path": level_path(lev),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": trans},
                ],
            }
        )
    return [{"name": name, "axes": axes, "datasets": datasets, "type": "mean" if kind == "image" else "stride"}]


def image_label_metadata(kind: str, label_colours: Mapping | None = None) -> dict:
    """OME-Zarr 0.5 ``image-label`` metadata: a colour and a name per label value.

    Parameters
    ----------
    kind : str
        ``"mask"`` (always :data:`MASK_COLOURS`) or ``"labels"``.
    label_colours : mapping, optional
        ``{code: (name, (R, G, B, A))}`` with A = opacity 0..255 (e.g.
        :func:`helm_dask.labels.label_colours`); without it a label map gets no colours (viewers pick their own).

    Returns
    -------
    dict
        ``{"version": "0.5", "colors": [...], "properties": [...]}``.

    Example
    -------
    >>> image_label_metadata("mask")["colors"][1]
    {'label-value': 1, 'rgba': [0, 190, 255, 255]}
    """
    table = MASK_COLOURS if kind == "mask" else label_colours
    meta: dict[str, Any] = {"version": "0.5"}
    if table:
        rows = sorted((int(c), str(n), [int(v) for v in rgba]) for c, (n, rgba) in table.items())
        meta["colors"] = [{"label-value": c, "rgba": rgba} for c, _, rgba in rows]
        meta["properties"] = [{"label-value": c, "name": n} for c, n, _ in rows]
    return meta


def set_label_colours(path, label_colours: Mapping, *, storage_options: dict | None = None) -> None:
    """Give a finished label store the colours of a label table (its ``image-label`` metadata).

    For stores written by another writer than :func:`save_volumes` (the pipeline's import of the manual labels).
    A store of another kind is left as it is.

    Parameters
    ----------
    path : str or path-like
        The store.
    label_colours : mapping
        As :func:`image_label_metadata` takes.
    storage_options : dict, optional
        fsspec options for a URL.
    """
    group = open_group(path, "r+", storage_options)
    meta = group.attrs.get("helm_dask")
    kind = meta.get("kind") if isinstance(meta, Mapping) else None
    if kind not in LABEL_KINDS:
        return
    ome = dict(cast(Mapping, group.attrs["ome"]))
    ome["image-label"] = image_label_metadata(str(kind), label_colours)
    group.attrs["ome"] = ome


# ----------------------------------------------------------------------------------------------------------------
# Writing


def create_level(
    group: zarr.Group, level: int | str, shape, dtype, chunks, *, four_d: bool, shards=None, compressor=None
) -> zarr.Array:
    """Create (replacing) the empty array of one level of a volume store, compressed by :func:`compressor_for`
    unless ``compressor`` says otherwise.

    Parameters
    ----------
    group : zarr.Group
        The volume's group, open for writing.
    level : int or str
        The array's name (a pyramid level, or a scratch name).
    shape : sequence of int
        ``(x, y, z)``, or ``(x, y, z, echo)`` when ``four_d`` (stored echo first).
    dtype : dtype-like
    chunks : sequence of three ints
        Spatial chunks (one echo per chunk when ``four_d``).
    four_d : bool
        Whether the volume has echoes.
    shards : sequence of three ints, optional
        Spatial shard shape (no sharding by default).
    compressor : zarr.codecs.BloscCodec, optional
        Another Blosc codec (a scratch array's, e.g. the import's landing).

    Returns
    -------
    zarr.Array
    """
    if four_d:
        nt, spatial = shape[3], shape[:3]
        arr_shape = (nt,) + tuple(spatial)
        arr_chunks = (1,) + tuple(chunks)
        dims = ["echo", "x", "y", "z"]
    else:
        arr_shape, arr_chunks, dims = tuple(shape), tuple(chunks), ["x", "y", "z"]
    return group.create_array(
        level_path(level),
        shape=arr_shape,
        dtype=np.dtype(dtype),
        chunks=arr_chunks,
        shards=None if shards is None else ((1,) if four_d else ()) + tuple(shards),
        compressors=[compressor_for(dtype) if compressor is None else compressor],
        fill_value=0,
        dimension_names=dims,
        overwrite=True,
    )


#: Output chunks per computation when a volume is written in batches (see :func:`store_batched`): ~64 chunks of
#: 128^3 float32 = 512 MB of output in flight at most, whatever the volume size.
STORE_BATCH_CHUNKS = 64


def _store_dask(arr: da.Array, target: zarr.Array) -> None:
    """Write a dask array into a zarr array, one whole zarr chunk per write (safe to repeat, no races)."""
    arr = arr.rechunk(target.chunks if arr.ndim == len(target.chunks) else arr.chunks)
    da.store(arr, store_target(target), lock=False, compute=True)


def _fill_state(value: np.ndarray, fill: Any) -> bool | None:
    """Whether ``value`` holds a voxel whose bits differ from the fill value's (then Zarr's own rule, a chunk
    equal to the fill value is not stored, would store it too): True; False when every voxel has the fill
    value's bits; None when the fast test does not apply (NaN fill, other dtypes): Zarr then decides."""
    dt = value.dtype
    if dt.kind not in "biuf" or dt.itemsize not in (1, 2, 4, 8):
        return None
    f = np.asarray(fill, dtype=dt)
    if dt.kind == "f" and np.isnan(f):
        return None
    bits = value.view(np.dtype(f"u{dt.itemsize}"))  # an exact test: Zarr compares 0.0 fills bit for bit too
    fbits = f.view(bits.dtype)
    return bool(bits.any()) if fbits == 0 else bool((bits != fbits).any())


class _ChunkTarget:
    """A Zarr array as the target of ``da.store``, for whole-chunk writes.

    Zarr tests every chunk it writes against the fill value (``write_empty_chunks=False``), with a NumPy
    comparison that builds a full temporary array and cannot stop early: it cost half of a chunk write (128^3
    uint16: 12.7 -> 5.7 ms per chunk written with the test skipped; the Blosc encode is ~3 ms). Here a chunk that
    holds data is found with one early-exit bitwise pass and written without Zarr's test (by
    :func:`~helm_dask.io.direct.write_chunk` on a local store); a chunk equal to the fill value follows Zarr's own
    rule (not stored, an older chunk deleted: :func:`~helm_dask.io.direct.drop_chunk`, or Zarr itself on other
    stores), so the store holds the same chunks as a plain Zarr write. Writes reach :func:`location.fault` first
    when fault injection is on."""

    def __init__(self, arr: zarr.Array, fault: bool):
        self.arr = arr
        self.dense = arr.with_config({"write_empty_chunks": True})
        self.fault = fault
        self.point = f"write:{output_name(arr.store_path)}"
        self.path = str(arr.store_path).split("://", 1)[-1]

    def __reduce__(self):
        return direct.shared_reduce(self, _ChunkTarget, self.arr, self.fault)

    # (explicit properties, not __getattr__: a plain unpickle would call __getattr__ before ``arr`` exists;
    # shared_reduce rebuilds the target through __init__, but the properties stay safe either way)
    @property
    def shape(self):
        return self.arr.shape

    @property
    def dtype(self):
        return self.arr.dtype

    @property
    def chunks(self):
        return self.arr.chunks

    @property
    def ndim(self):
        return self.arr.ndim

    def __setitem__(self, key, value) -> None:
        if self.fault:
            location.fault(self.point, self.path)
        v = np.asarray(value)
        state = _fill_state(v, self.arr.fill_value) if v.dtype == self.arr.dtype else None
        if state:
            # the chunk's bytes written here when the store is local (direct.write_chunk: the same file as
            # Zarr's), without Zarr's hand-offs to its event loop (~8% of the workers' busy samples in a 0.2 mm
            # run once the reads were direct)
            if not direct.write_chunk(self.arr, key, v):
                self.dense[key] = v
        elif state is False and direct.drop_chunk(self.arr, key):
            # A chunk of fill values is not stored: Zarr would find that out by comparing it with the fill value
            # (a full temporary array, 7.0% of the busy samples of a 0.2 mm run: the empty chunks of label maps
            # and their pyramids) and then delete its file, which is all that is done here.
            pass
        else:
            self.arr[key] = v


def write_chunks(arr: zarr.Array, key: tuple, value: np.ndarray) -> None:
    """``arr[key] = value`` written chunk by chunk as :func:`store_target` writes a chunk, when ``key`` spans
    whole chunks (an integer index, e.g. one echo, counts as a one-wide slice); Zarr writes any other ``key``.

    The import's stream writes whole planes of thin chunks from one process, the only serial part of the import:
    through Zarr, a 0.2 mm scan's landing writes took 15% of the import's busy samples, 2/3 of them outside the
    Blosc encode.

    Parameters
    ----------
    arr : zarr.Array
    key : tuple of slice or int
        One entry per axis of ``arr``.
    value : numpy.ndarray
        The region's values (an integer index's axis dropped).
    """
    shape, chunks = arr.shape, arr.chunks
    bounds = []
    for k, n in zip(key, shape):
        if not isinstance(k, slice):
            k = slice(int(k) % n, int(k) % n + 1) if -n <= int(k) < n else slice(n, n)  # out of range: Zarr's
        a, b, _ = k.indices(n)
        bounds.append((a, b))
    aligned = all(a % c == 0 and (b % c == 0 or b == n) and a < b for (a, b), c, n in zip(bounds, chunks, shape))
    if len(key) != len(shape) or not aligned or np.asarray(value).dtype != arr.dtype:
        arr[key] = value
        return
    value = np.asarray(value).reshape(tuple(b - a for a, b in bounds))
    target = store_target(arr)
    starts = [range(a, b, c) for (a, b), c in zip(bounds, chunks)]
    for corner in product(*starts):
        box = tuple(slice(i, min(i + c, b)) for i, c, (_, b) in zip(corner, chunks, bounds))
        local = tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(box, bounds))
        target[box] = np.ascontiguousarray(value[local])


def store_target(target):
    """``target`` as ``da.store`` should write it: a Zarr array is wrapped so that its chunks holding data skip
    Zarr's fill-value scan and its writes reach :func:`~helm_dask.io.location.fault` when ``HELM_DASK_FAULT``
    is set; any other target is returned as it is.

    Parameters
    ----------
    target : zarr.Array or any ``da.store`` target

    Returns
    -------
    zarr.Array wrapper or ``target``
    """
    if isinstance(target, zarr.Array):
        return _ChunkTarget(target, fault=bool(os.environ.get(location.FAULT_ENV)))
    return target


def block_batches(numblocks: tuple[int, ...], n: int) -> Iterator[tuple[slice, ...]]:
    """Compact boxes of about ``n`` blocks covering the block grid (in C order): the batches of
    :func:`store_batched` (a graph whose tasks serve several output chunks can group them by these boxes, so
    that no task is needed by two batches, which would run it twice).

    Example
    -------
    >>> [tuple((s.start, s.stop) for s in b) for b in block_batches((3, 2), 4)]
    [((0, 2), (0, 2)), ((2, 3), (0, 2))]
    """
    edge = max(1, round(n ** (1.0 / len(numblocks))))
    steps = [min(nb, edge) for nb in numblocks]
    for start in np.ndindex(*[-(-nb // st) for nb, st in zip(numblocks, steps)]):
        yield tuple(slice(i * st, min((i + 1) * st, nb)) for i, st, nb in zip(start, steps, numblocks))


def store_batched(
    sources: list,
    targets: list,
    *,
    batch_chunks: int = STORE_BATCH_CHUNKS,
    offset: tuple[int, ...] | None = None,
    announce: bool = True,
    upto: int | None = None,
) -> None:
    """``da.store`` in batches of neighbouring output chunks, one computation per batch.

    Why: when an output chunk needs several input chunks that other output chunks need too (a flipped axis whose
    length is not a multiple of the chunk size, overlaps of a filter, a rechunk), one computation over the whole
    volume lets the scheduler hold such shared pieces across a whole cross-section of the volume -- peak memory
    then grows with the volume (measured: 2.3 GB at 0.2 mm, 6.1 GB at 0.1 mm for the brain mask). A batch is a
    box of about ``batch_chunks`` output chunks, so what can be held is bounded by the box, not the volume; the
    price is re-reading the inputs shared across box faces. Targets are whole-chunk aligned, so every write
    stays one whole chunk. Sources on one chunk grid are written by one task per chunk index, which writes that
    chunk of every source (:func:`_stored_together`). Inside a pipeline stage every chunk written is counted by
    the stage's progress (:func:`helm_dask.progress.current`).

    Parameters
    ----------
    sources : list of dask.array.Array
        What to write; sources that do not share one chunk grid are written one after the other.
    targets : list of zarr.Array
        Where, one per source, chunked like it.
    batch_chunks : int
        Output chunks per computation.
    offset : tuple of int, optional
        Where the sources start in the targets (chunk-aligned; default: at 0, the sources fill the targets).
    announce : bool
        Tell the stage's progress that these stores begin (False: the caller did, for a store written in parts).
    upto : int, optional
        Write only the sources' chunks before this index along the first axis (a chunk boundary); nothing of
        the sources beyond it is computed.
    """
    grids = {s.chunks for s in sources}
    if len(grids) != 1:
        for s_, t_ in zip(sources, targets):
            store_batched([s_], [t_], batch_chunks=batch_chunks, offset=offset, announce=announce, upto=upto)
        return
    chunks = sources[0].chunks
    if upto is not None:  # the chunks before ``upto`` along the first axis
        ends = [int(e) for e in np.cumsum(chunks[0])]
        if upto != 0 and upto not in ends:
            raise ValueError(f"store_batched: upto={upto} is not a chunk boundary of the first axis")
        chunks = (chunks[0][: ends.index(upto) + 1] if upto else (), *chunks[1:])
        if not chunks[0]:
            return
    numblocks = tuple(len(c) for c in chunks)
    targets = [store_target(t) for t in targets]
    tracker = current()
    if tracker is not None and announce:
        tracker.begin_outputs([int(np.prod(numblocks))] * len(sources))

    # One writer over the whole sources, one task per chunk index writing that chunk of every source; a batch
    # computes the writer's chunks in its box (its graph culled to them), so the tasks a batch holds are those
    # of the box, as when each source was sliced to the box -- which added a slicing task per source and chunk.
    written = _stored_together(sources, targets, offset)  # one voxel per chunk index: a box of it is a batch

    def store(box: tuple[slice, ...]) -> None:
        _compute_counted([written[box]], tracker, weight=len(sources))

    if int(np.prod(numblocks)) <= batch_chunks:
        store(tuple(slice(0, n) for n in numblocks))
        return
    _in_batches(numblocks, batch_chunks, store)


def _store_chunks(*blocks: Any, targets: tuple, offset: tuple[int, ...] | None) -> np.ndarray:
    """Write one chunk of every source (``blocks``: the sources' chunks, then their slice in the sources) into
    its target; returns a one-voxel marker."""
    *data, index = blocks
    if offset is not None:
        index = tuple(slice(i.start + o, i.stop + o) for i, o in zip(index, offset))
    for b, t in zip(data, targets):
        if b.size:
            t[index] = b
    return np.zeros((1,) * len(index), np.int8)


def _stored_together(sources: list, targets: list, offset: tuple[int, ...] | None) -> da.Array:
    """The lazy write of ``sources`` (one chunk grid) into ``targets`` (at ``offset``): ONE task per chunk
    index writes that chunk of every source, where ``da.store`` has a task per source and chunk.

    Why: the stages write several maps computed together (six k-means or whole-brain maps per chunk), and
    ``da.store`` gave each map's chunk its own task beside the one that computes them all -- at 0.1 mm ~30k
    extra tasks in the mirror alone, each ~2 ms of the scheduler's and the client's CPU, which the two workers
    of a 2-core machine then lack. Blockwise sources fuse into the task, as into ``da.store``'s, and a source
    computed by one task per chunk fuses with it too (a linear chain). The result holds one int8 voxel per
    chunk index."""
    chunks = sources[0].chunks
    paths = [getattr(t, "path", None) or tokenize(t) for t in targets]
    ind = tuple(range(len(chunks)))
    args: list = []
    for s_ in sources:
        args += [s_, ind]
    return da.blockwise(
        _store_chunks,
        ind,
        *args,
        ArraySliceDep(chunks),
        ind,
        targets=tuple(targets),
        offset=offset,
        adjust_chunks=dict.fromkeys(ind, 1),
        dtype=np.int8,
        meta=np.empty((0,) * len(chunks), np.int8),
        name="store-chunks-" + tokenize(*sources, paths, offset),
        align_arrays=False,  # one grid (checked above)
    )


def _reflect_start(target: zarr.Array) -> int:
    """The first chunk boundary along the first axis at or after its midpoint (at most its length)."""
    n, c = int(target.shape[0]), int(target.chunks[0])
    return min(n, -(-(n // 2) // c) * c)


@njit(cache=True, nogil=True)
def _reversed_lookup_nb(src: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out = lut[src[::-1]]`` along the first axis, in one pass."""
    n = src.shape[0]
    for i in range(n):
        for j in range(src.shape[1]):
            for k in range(src.shape[2]):
                out[n - 1 - i, j, k] = lut[src[i, j, k]]


def _reflected_block(target: zarr.Array, lut: np.ndarray, start: int, block_info=None) -> np.ndarray:
    """Output chunk ``x0 .. x1`` (offset by ``start``) of the second half: the stored ``n - x1 .. n - x0``,
    reversed and looked up in one compiled pass (one read of at most two stored chunks): 14 ms per 0.2 mm chunk
    against 35 ms for NumPy's reverse, table lookup and rechunk."""
    (q0, q1), (y0, y1), (z0, z1) = block_info[None]["array-location"]
    n = int(target.shape[0])
    src = direct.read_box(target, (n - q1 - start, y0, z0), (n - q0 - start, y1, z1))
    out = np.empty(src.shape, dtype=np.uint16)
    _reversed_lookup_nb(src, lut, out)
    return out


def store_reflected(sources: list, targets: list, luts: list, *, batch_chunks: int = STORE_BATCH_CHUNKS) -> None:
    """:func:`store_batched`, where the sources with a code table (``luts[i]``, else None) are mirror images of
    themselves along the first axis: ``out[x] = lut[out[n - 1 - x]]`` for ``x >= n / 2`` (``n`` even).

    Their chunks before the first chunk boundary at or after ``n / 2`` (``start``) come from the source; then
    the chunks from ``start`` on are read back from the target, reversed and looked up: ``n - 1 - x < n / 2 <=
    start`` for every such ``x``, so they read only what the first part wrote. Nothing of the source beyond
    ``start`` is computed. Bit-identical to writing the source whole when the source is such a mirror image.

    Parameters
    ----------
    sources, targets : list
        As :func:`store_batched` (3-D sources where a table is given).
    luts : list of numpy.ndarray or None
        A uint16 table of 65536 codes per source, or None (written whole).
    batch_chunks : int
        Output chunks per computation.
    """
    tracker = current()
    if tracker is not None:
        tracker.begin_outputs([int(np.prod([len(c) for c in s.chunks])) for s in sources])
    starts = [_reflect_start(t) if lut is not None else int(t.shape[0]) for t, lut in zip(targets, luts)]
    firsts: dict[int, tuple[list, list]] = {}  # start -> (sources, targets): one upto per store_batched
    for s_, t, st in zip(sources, targets, starts):
        srcs, tgts = firsts.setdefault(st, ([], []))
        srcs.append(s_)
        tgts.append(t)
    for st, (srcs, tgts) in firsts.items():
        store_batched(srcs, tgts, batch_chunks=batch_chunks, announce=False, upto=st)
    second: dict[int, tuple[list, list]] = {}  # start -> (sources, targets): one offset per store_batched
    for t, lut, st in zip(targets, luts, starts):
        n = int(t.shape[0])
        if lut is None or st >= n:
            continue
        if n % 2:
            raise HelmError(f"a mirrored volume needs an even length along x, got {n}", path=str(t.store_path))
        # x = st .. n-1 reads x' = n-1-x = n-1-st .. 0, written before
        shape = (n - st, *(int(v) for v in t.shape[1:]))
        table = np.ascontiguousarray(lut, dtype=np.uint16)
        name = "reflect-" + tokenize(str(t.store_path), st, table.tobytes())
        chunks = da.core.normalize_chunks(t.chunks, shape)
        meta = np.empty((0, 0, 0), np.uint16)
        back = da.map_blocks(_reflected_block, t, table, st, chunks=chunks, dtype=np.uint16, meta=meta, name=name)
        srcs, tgts = second.setdefault(st, ([], []))
        srcs.append(back)
        tgts.append(t)
    for st, (srcs, tgts) in second.items():
        store_batched(srcs, tgts, batch_chunks=batch_chunks, offset=(st, 0, 0), announce=False)


def _in_batches(numblocks: tuple[int, ...], batch_chunks: int, run: Callable[[tuple], None]) -> None:
    """``run(box)`` for every box of blocks of :func:`block_batches`, one after the other.

    Before each box the scheduler is given time to forget the previous box's tasks (:func:`_scheduler_settler`,
    a few seconds at most: on a shared cluster others' tasks keep the count up); a box that still meets the
    spurious KeyError of dask/dask#9888 runs once more after a longer wait -- boxes are idempotent (whole-chunk
    writes, pure reductions).
    """
    settle = _scheduler_settler()
    for box in block_batches(numblocks, batch_chunks):
        settle(5.0)
        try:
            run(box)
        except KeyError:
            settle(60.0)
            run(box)


def compute_batched(
    arrays: list, *, batch_chunks: int = STORE_BATCH_CHUNKS, each: Callable[[tuple, list], None] | None = None
) -> list[np.ndarray]:
    """``dask.compute`` of small results of big graphs (e.g. coarse block sums of a whole volume), in boxes.

    The same boxes as :func:`store_batched`, for the same reason: a reduction whose chunks need pieces of several
    input chunks (a rechunk to blocks that do not divide the chunks) lets the scheduler hold such pieces across a
    whole cross-section when the volume is one computation (at 0.1 mm: 1.8 GB per worker in the bias fit's coarse
    copy). Each box computes all the arrays at once (shared inputs read once per box). The values are those of
    one computation, task for task. Inside a pipeline stage every chunk is counted by the stage's progress.

    Parameters
    ----------
    arrays : list of dask.array.Array
        Arrays sharing one chunk grid (:class:`ValueError` otherwise).
    batch_chunks : int
        Chunks per computation.
    each : callable, optional
        ``each(region, values)`` receives every box's values (``region``: its slices of the arrays) instead:
        nothing is assembled and ``[]`` returned (a reduction that keeps less than the arrays).

    Returns
    -------
    list of numpy.ndarray

    Example
    -------
    >>> x = da.arange(16.0).reshape(4, 4).rechunk(2)
    >>> compute_batched([x, 2 * x], batch_chunks=1)[1][3].tolist()
    [24.0, 26.0, 28.0, 30.0]
    """
    arrays = list(arrays)
    chunks = arrays[0].chunks
    if any(a.chunks != chunks for a in arrays):
        raise ValueError("compute_batched: the arrays must share their chunk grid")
    nchunks = int(np.prod([len(c) for c in chunks]))
    tracker = current()
    if tracker is not None:
        tracker.begin_pass(nchunks * len(arrays))

    if nchunks <= batch_chunks:
        values = [np.asarray(v) for v in _compute_counted(arrays, tracker, values=True)]
        if each is None:
            return values
        each(tuple(slice(0, int(n)) for n in arrays[0].shape), values)
        return []
    out = [] if each is not None else [np.empty(a.shape, dtype=a.dtype) for a in arrays]
    offsets = chunk_edges(chunks)

    def run(box):
        region = tuple(slice(int(o[b.start]), int(o[b.stop])) for o, b in zip(offsets, box))
        values = _compute_counted([a[region] for a in arrays], tracker, values=True)
        if each is not None:
            each(region, values)
            return
        for o, v in zip(out, values):
            o[region] = v

    _in_batches(tuple(len(c) for c in chunks), batch_chunks, run)
    return out


def distributed_client() -> Any:
    """The active ``distributed.Client`` (None without one, or when an in-process scheduler is configured)."""
    if dask.config.get("scheduler", None) in ("threads", "synchronous", "sync", "processes"):
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


#: The output keys of the last batch this thread computed on a distributed scheduler (see _scheduler_settler).
_LAST_BATCH = threading.local()


def _compute_counted(arrays: list, tracker: Any, *, values: bool = False, weight: int = 1) -> list:
    """``dask.compute(*arrays)`` that counts each of their chunks on ``tracker`` (if any) as it is done, as
    ``weight`` units (a task that writes a chunk of each of ``weight`` stores).

    With a distributed client the arrays are persisted (the same optimised graph that ``dask.compute`` submits)
    and their chunk futures counted client-side as they complete (:func:`distributed.as_completed`: public API,
    so it works with any remote scheduler, no scheduler plugin or pickled function); in-process schedulers count
    through a local callback, and with neither a client nor a tracker it is plain ``dask.compute``. A failure
    takes back the chunks it had counted (a batch that is retried counts them again) and releases the futures,
    as ``dask.compute`` does.

    Returns
    -------
    list
        The computed values when ``values``, else an empty list.
    """
    client = distributed_client()
    if client is None and tracker is None:  # nothing to count: the plain computation
        result = dask.compute(*arrays)
        return list(result) if values else []
    counted = 0
    try:
        if client is None:
            from dask.callbacks import Callback
            from dask.core import flatten

            keys = {k for a in arrays for k in flatten(a.__dask_keys__())}

            def tick(key, *_):
                nonlocal counted
                if key in keys:
                    counted += weight
                    tracker.update(weight)

            with Callback(posttask=tick):
                result = dask.compute(*arrays)
            return list(result) if values else []
        from distributed import as_completed, futures_of

        persisted = client.persist(arrays)
        futures = futures_of(persisted)
        _LAST_BATCH.keys = [f.key for f in futures]
        try:
            for fut in as_completed(futures):
                if fut.status != "finished":
                    fut.result()  # raises the task's error (or the cancellation)
                counted += weight
                if tracker is not None:
                    tracker.update(weight)
            return list(dask.compute(*persisted)) if values else []
        finally:
            for fut in futures:
                fut.release()  # the scheduler forgets the batch now (the next batch waits for that)
    except BaseException:
        if tracker is not None:
            tracker.update(-counted)
        raise


def _n_present(keys: list, dask_scheduler: Any = None) -> int:
    """How many of ``keys`` the scheduler still holds (run on the scheduler)."""
    return sum(1 for k in keys if k in dask_scheduler.tasks)


def _scheduler_settler() -> Callable[[float], None]:
    """``settle(timeout_s)``: wait until a distributed scheduler has forgotten the previous batch's tasks.

    Consecutive batches share keys (the inputs on a box face); a graph that reaches the scheduler while it is
    still forgetting those keys fails with a spurious KeyError in update_graph (dask/dask#9888; seen at 0.1 mm).
    Waiting (at most ``timeout_s``) until the scheduler holds none of the previous batch's output keys avoids it:
    their dependencies are forgotten in the same transitions as they are. Only this thread's own batch is waited
    for -- counting all the scheduler's tasks made every batch of a subject wait the full timeout while another
    subject of a ``--concurrent-subjects`` batch kept tasks in flight. A no-op without a distributed client.
    """
    client = distributed_client()
    if client is None:
        return lambda timeout_s: None

    def settle(timeout_s: float) -> None:
        keys = getattr(_LAST_BATCH, "keys", None)
        if not keys:
            return
        deadline = time.monotonic() + timeout_s
        while client.run_on_scheduler(_n_present, keys) and time.monotonic() < deadline:
            time.sleep(0.02)

    return settle


@njit(cache=True, nogil=True)
def _mean_of_2x2x2_nb(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out`` = the float64 mean of each 2x2x2 block of ``x``, summed in NumPy's order for
    ``np.mean(axis=(1, 3, 5))`` of the (n, 2, n, 2, n, 2) view: from +0.0, pairs along the last axis."""
    for a in range(out.shape[0]):
        for b in range(out.shape[1]):
            for c in range(out.shape[2]):
                acc = 0.0
                for i in range(2 * a, 2 * a + 2):
                    for j in range(2 * b, 2 * b + 2):
                        acc += np.float64(x[i, j, 2 * c]) + np.float64(x[i, j, 2 * c + 1])
                out[a, b, c] = acc / 8.0


def _mean_of_2x2x2(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The pyramid's image level from a block of even shape: the 2x2x2 means in float64, as ``dtype``.

    Compiled: 21 -> 0.5 ms per 128^3 float32 chunk against ``da.coarsen(np.mean)`` on the float64 copy, the same
    values to the bit (tests/test_io.py compares them); the float pyramids were ~20% of the bias stage.
    """
    out = np.empty(tuple(s // 2 for s in block.shape), dtype=dtype)
    _mean_of_2x2x2_nb(block, out)
    return out


def build_pyramid(group: zarr.Group, *, kind: str, chunks, max_levels: int | None = None) -> int:
    """Add levels 1.. to a group whose level 0 is written; each level is computed from the stored one below.

    Levels halve the resolution (block means in float64 for images, strides for labels) until the largest
    dimension falls below ``2 * PYRAMID_MIN_SIZE``; 4-D levels are never downsampled.

    Parameters
    ----------
    group : zarr.Group
        The volume's group, open for writing, with level ``0`` written.
    kind : str
        ``"image"`` (block means) or labels/mask (strides).
    chunks : sequence of three ints
        The levels' chunks (clipped to their shape).
    max_levels : int, optional
        At most this many levels in all.

    Returns
    -------
    int
        The number of levels, level 0 included.
    """
    lev = 0
    while True:
        below = _array_in(group, level_path(lev))
        shape = below.shape
        if len(shape) != 3 or max(shape) < PYRAMID_MIN_SIZE * 2 or min(shape) < 2:
            break
        if max_levels is not None and lev + 1 >= max_levels:
            break
        # Each task reads the 2x2x2 block of chunks behind exactly one output chunk: no re-merging of halves
        # afterwards (which lets the scheduler buffer pieces), memory of one 8-chunk region per task.
        src = direct.from_zarr(below, chunks=tuple(2 * c for c in below.chunks))
        n = [s // 2 * 2 for s in shape]
        if kind == "image":
            # Block mean in float64 then back: exact for integer factors, no overflow for integer inputs.
            dtype = np.dtype(np.float32 if src.dtype.kind != "f" else src.dtype)
            even = src[: n[0], : n[1], : n[2]]
            halves = tuple(tuple(c // 2 for c in ch) for ch in even.chunks)
            name = f"pyramid-mean-{tokenize(even, dtype)}"
            down = da.map_blocks(_mean_of_2x2x2, even, dtype, chunks=halves, dtype=dtype, name=name)
        else:
            down = src[: n[0] : 2, : n[1] : 2, : n[2] : 2]
        lvl_chunks = tuple(min(c, s) for c, s in zip(chunks, down.shape))
        target = create_level(group, lev + 1, down.shape, down.dtype, lvl_chunks, four_d=False)
        _store_dask(down, target)
        lev += 1
    return lev + 1


def write_attrs(
    group: zarr.Group,
    *,
    affine,
    kind: str,
    name: str,
    nlevels: int,
    four_d: bool,
    extra: dict | None = None,
    complete: bool,
    label_colours: Mapping | None = None,
) -> None:
    """Write a volume's group attributes: OME-Zarr ``multiscales`` (and ``image-label``) and the ``helm_dask``
    metadata; once complete, also level 0's coordinates (:func:`write_coords`).

    The OME placement needs each level's shape: it is read from the group's arrays (a level not created yet gets
    its voxel (0, 0, 0)'s translation: the store is unfinished then). Beside the exact affine, the ``helm_dask``
    metadata says how far the OME placement is from it: ``ome_placement`` (``"exact"`` or ``"approximate"``) and
    ``ome_placement_error_mm`` (worst corner of level 0, :func:`~helm_dask.volume.placement_error_mm`), and
    gives the affine in RFC-5 form (``ome_affine``).

    Parameters
    ----------
    group : zarr.Group
        The volume's group, open for writing.
    affine : array-like, 4x4
        The full-resolution affine.
    kind : str
        The volume's kind.
    name : str
        Its name (the store's name: the multiscale's ``name``).
    nlevels : int
        Number of pyramid levels.
    four_d : bool
        Whether it has echoes.
    extra : dict, optional
        Further ``helm_dask`` metadata (made JSON-able).
    complete : bool
        The completeness flag: False while writing, True once everything else is written.
    label_colours : mapping, optional
        Colours of a label map (see :func:`image_label_metadata`).
    """
    affine = np.asarray(affine, dtype=np.float64)
    shapes = _level_shapes(group, nlevels, four_d)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "affine": affine.tolist(),
        "kind": kind,
        "units": "mm",
        "nlevels": nlevels,
        "four_d": four_d,
        "level_affines": [level_affine(affine, lev, kind).tolist() for lev in range(nlevels)],
        "complete": complete,
    }
    meta.update(_jsonable(extra or {}))
    meta.update(_placement_meta(affine, shapes[0] if shapes else None))
    ome: dict[str, Any] = {
        "version": "0.5",
        "multiscales": ome_multiscales(affine, kind, nlevels, four_d, name, shapes),
    }
    if kind in LABEL_KINDS:
        ome["image-label"] = image_label_metadata(kind, label_colours)
    if complete and shapes:
        write_coords(group, affine, shapes[0])
    group.attrs.update({"ome": ome, "helm_dask": meta})


def _level_shapes(group: zarr.Group, nlevels: int, four_d: bool) -> list[tuple[int, ...]]:
    """The spatial shapes of the levels that exist, in order (stops at the first missing one)."""
    shapes = []
    for lev in range(nlevels):
        try:
            shape = tuple(int(n) for n in _array_in(group, level_path(lev)).shape)
        except KeyError:
            break
        shapes.append(shape[1:] if four_d else shape)
    return shapes


def _placement_meta(affine: np.ndarray, shape: tuple[int, ...] | None) -> dict:
    """``ome_placement``, ``ome_placement_error_mm`` (level 0) and ``ome_affine`` (RFC-5 form) of a store."""
    out: dict[str, Any] = {
        "ome_affine": {
            "type": "affine",
            "affine": affine[:3].tolist(),
            "input": {"path": level_path(0), "name": "array"},
            "output": {"name": "world RAS+ mm"},
        }
    }
    if shape is not None:
        placement, err = placement_of(affine, shape)
        out.update(ome_placement=placement, ome_placement_error_mm=err)
    return out


def write_coords(group: zarr.Group, affine, shape) -> None:
    """Level 0's coordinates as 1-D arrays ``x``, ``y``, ``z`` beside it (mm, ``units`` attributes), for xarray.

    The values are :func:`~helm_dask.volume.voxel_coords` (the OME placement), as in :func:`open_volume`.

    Parameters
    ----------
    group : zarr.Group
        The volume's group, open for writing.
    affine : array-like, 4x4
        The full-resolution affine.
    shape : sequence of int
        Level 0's spatial shape.
    """
    values, _ = voxel_coords(affine, tuple(shape))
    for d, v in values.items():
        arr = group.create_array(
            d,
            shape=v.shape,
            dtype=np.float64,
            chunks=v.shape,
            compressors=None,
            fill_value=0.0,
            dimension_names=[d],
            attributes=coord_attrs(d),
            overwrite=True,
        )
        arr[:] = v


def volume_attrs_for_store(vol: xr.DataArray) -> dict:
    """The DataArray attrs that go into the store's ``helm_dask`` metadata (JSON-able).

    Parameters
    ----------
    vol : xarray.DataArray

    Returns
    -------
    dict
        Every attribute but the affine, units, kind and placement (kept elsewhere in the metadata).

    Example
    -------
    >>> from helm_dask.volume import make_volume
    >>> sorted(volume_attrs_for_store(make_volume(np.zeros((2, 2, 2)), np.eye(4), source="a.nii")))
    ['provenance', 'source']
    """
    skip = {"affine", "units", "kind", "coords", "placement", "placement_error_mm"}
    return _jsonable({k: v for k, v in vol.attrs.items() if k not in skip})


def save_volume(
    vol: xr.DataArray,
    path,
    *,
    chunks=None,
    overwrite: bool = False,
    pyramid: bool = True,
    shards=None,
    extra: dict | None = None,
    storage_options: dict | None = None,
    batch_chunks: int | None = None,
    label_colours: Mapping | None = None,
) -> str:
    """Write a (lazy) volume to a new Zarr v3 store, atomically, with its pyramid and metadata.

    The computation runs on the current Dask scheduler (a ``dask.distributed`` client if one is active), one
    whole chunk per task; memory is bounded by the chunk size. The caches of decoded chunks that the
    computation's region tasks filled are not emptied here: the stage runner does it after each stage
    (:func:`helm_dask.io.regions.release_chunk_caches`).

    Parameters
    ----------
    vol : xarray.DataArray
        The volume (see :func:`helm_dask.volume.make_volume`).
    path : str or path-like
        The new store (a local path or a URL).
    chunks, overwrite, pyramid, shards, extra, storage_options, batch_chunks, label_colours :
        As :func:`save_volumes`.

    Returns
    -------
    str
        ``path``.

    Example
    -------
    >>> import dask.array as da, tempfile
    >>> from helm_dask.volume import make_volume
    >>> vol = make_volume(da.ones((8, 8, 8), chunks=4, dtype="f4"), np.diag([0.5, 0.5, 0.5, 1]))
    >>> out = save_volume(vol, os.path.join(tempfile.mkdtemp(), "v.zarr"))
    >>> float(open_volume(out).sum())
    512.0
    """
    return save_volumes(
        {os.fspath(path): vol},
        chunks=chunks,
        overwrite=overwrite,
        pyramid=pyramid,
        shards=shards,
        extra=extra,
        storage_options=storage_options,
        batch_chunks=batch_chunks,
        label_colours=label_colours,
    )[0]


def save_volumes(
    vols: dict,
    *,
    chunks=None,
    overwrite: bool = False,
    pyramid: bool = True,
    shards=None,
    extra: dict | None = None,
    storage_options: dict | None = None,
    batch_chunks: int | None = None,
    label_colours: Mapping | None = None,
    reflect: Mapping[Any, np.ndarray] | None = None,
) -> list[str]:
    """Write several volumes ``{path: vol}`` with ONE Dask computation for their full-resolution data.

    Volumes derived from the same inputs (the six k-means maps of one image, say) share their graph, so the
    inputs are read once for all of them. Each store is still written atomically on its own: created flagged
    unfinished, filled, given its pyramid, then flagged complete.

    Parameters
    ----------
    vols : dict
        ``{path: volume}``; paths may be URLs.
    chunks : int or sequence of three ints, optional
        Stored chunks (:func:`normalize_chunks`; default :data:`DEFAULT_CHUNKS`).
    overwrite : bool
        Replace existing stores (refused otherwise).
    pyramid : bool
        Add the downsampled levels (3-D volumes only).
    shards : sequence of three ints, optional
        Zarr shard shape (for object stores that charge per request).
    extra : dict, optional
        Further ``helm_dask`` metadata for every store.
    storage_options : dict, optional
        fsspec options for URLs (see :mod:`helm_dask.io.location`).
    batch_chunks : int, optional
        Output chunks per computation (:func:`store_batched`; default :data:`STORE_BATCH_CHUNKS`) -- fewer when
        each output chunk needs much more input than its own size (a downsampling resample).
    label_colours : mapping, optional
        ``{code: (name, (R, G, B, A))}`` for the label maps among the volumes (their OME ``image-label``
        colours, see :func:`image_label_metadata`); masks always get :data:`MASK_COLOURS`.
    reflect : mapping, optional
        ``{path: lut}`` for 3-D volumes whose second half along the first axis (of even length ``n``) is the
        mirror image of the first, through a uint16 code table: ``out[x] = lut[out[n - 1 - x]]`` for
        ``x >= n / 2`` (the whole-brain maps of :func:`helm_dask.mirror.mirror_labels`). Their chunks up to the
        first chunk boundary at or after ``n / 2`` are computed from the volume; the rest is then read back
        from them (:func:`store_reflected`), a decode and a table lookup per chunk instead of its computation.

    Returns
    -------
    list of str
        The paths, in order.
    """
    reflect = dict(reflect or {})
    with contextlib.ExitStack() as stack:
        sources, targets, pending = [], [], []
        for path, vol in vols.items():
            src, target, todo = _begin_volume(stack, path, vol, chunks, overwrite, shards, extra, storage_options)
            sources.append(src)
            targets.append(target)
            pending.append(todo)
        if reflect:
            luts = [reflect.get(path) for path in vols]
            store_reflected(sources, targets, luts, batch_chunks=batch_chunks or STORE_BATCH_CHUNKS)
        else:
            store_batched(sources, targets, batch_chunks=batch_chunks or STORE_BATCH_CHUNKS)
        for group, kind, affine, name, four_d, ch, attrs in pending:
            nlevels = build_pyramid(group, kind=kind, chunks=ch) if (pyramid and not four_d) else 1
            write_attrs(
                group,
                affine=affine,
                kind=kind,
                name=name,
                nlevels=nlevels,
                four_d=four_d,
                extra=attrs,
                complete=True,
                label_colours=label_colours,
            )
    return [os.fspath(p) for p in vols]


def _begin_volume(
    stack: contextlib.ExitStack,
    path,
    vol: xr.DataArray,
    chunks,
    overwrite: bool,
    shards,
    extra: dict | None,
    storage_options: dict | None,
) -> tuple[da.Array, zarr.Array, tuple]:
    """Create the store of one volume under its temporary name (held open by ``stack``: :func:`atomic_store`),
    flagged unfinished, with its empty level 0.

    Returns the data to write (echo axis first, chunked like the level), the level's array, and what finishing
    the store needs: ``(group, kind, affine, name, four_d, chunks, attrs)``.
    """
    kind = vol.attrs.get("kind", "image")
    affine = affine_of(vol)
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    four_d = data.ndim == 4
    ch = normalize_chunks(chunks, data.shape)
    tmp = stack.enter_context(atomic_store(path, overwrite=overwrite, storage_options=storage_options))
    group = open_group(tmp, "w", storage_options)
    attrs = volume_attrs_for_store(vol)
    attrs.update(extra or {})
    name = Path(os.fspath(path).rstrip("/")).stem  # the store's name, whatever the volume is called
    target = create_level(group, 0, data.shape, data.dtype, ch, four_d=four_d, shards=shards)
    write_attrs(group, affine=affine, kind=kind, name=name, nlevels=1, four_d=four_d, extra=attrs, complete=False)
    src = da.moveaxis(data, 3, 0) if four_d else data
    return src.rechunk(target.chunks), target, (group, kind, affine, name, four_d, ch, attrs)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_meta(path, *, storage_options: dict | None = None) -> dict:
    """The ``helm_dask`` metadata of a finished volume store.

    Parameters
    ----------
    path : str or path-like
        The store (a local path or a URL).
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    dict
        :class:`HelmError` if ``path`` is missing, not a Zarr v3 group, not a helm-dask volume, or unfinished.
    """
    p = os.fspath(path)
    local = _local(p)
    if local is not None and not local.exists():
        raise HelmError("store not found", path=p, hint="check the path")
    try:
        group = open_group(p, "r", storage_options)
    except HelmError:
        raise
    except Exception:
        if local is None and not location.exists(p, storage_options):
            raise HelmError("store not found", path=p, hint="check the URL (bucket and key)") from None
        raise HelmError(
            "is not a Zarr v3 group",
            path=p,
            hint="give a store written by helm-dask (helm-dask convert IN.nii.gz OUT.zarr)",
        ) from None
    raw = group.attrs.get("helm_dask")
    meta = dict(raw) if isinstance(raw, Mapping) else {}
    if meta.get("format") != FORMAT:
        raise HelmError(
            "is a Zarr store but not a helm-dask volume (no helm_dask metadata)",
            path=p,
            hint="create it with 'helm-dask convert' or 'helm-dask phantom'",
        )
    if not meta.get("complete", False):
        raise HelmError(
            "is an unfinished helm-dask volume (its writer was interrupted)",
            path=p,
            hint="rerun the command that makes it (or delete it and start again)",
        )
    return meta


def is_complete(path, *, storage_options: dict | None = None) -> bool:
    """Whether ``path`` is a finished helm-dask volume store (see :func:`read_meta`).

    Parameters
    ----------
    path : str or path-like
    storage_options : dict, optional

    Returns
    -------
    bool

    Example
    -------
    >>> is_complete("no/such/store.zarr")
    False
    """
    try:
        read_meta(path, storage_options=storage_options)
        return True
    except HelmError:
        return False


#: ``helm_dask`` metadata keys that describe the store rather than the data (not copied to a volume's attrs).
_STORE_KEYS = (
    "affine",
    "kind",
    "units",
    "level_affines",
    "complete",
    "format",
    "format_version",
    "nlevels",
    "four_d",
    "ome_placement",
    "ome_placement_error_mm",
    "ome_affine",
)


def open_volume(
    path,
    *,
    level: int = 0,
    echo: int | None = None,
    echo_combine: str | None = None,
    apply_scaling: bool = True,
    name: str | None = None,
    storage_options: dict | None = None,
) -> xr.DataArray:
    """Open a helm-dask Zarr volume lazily as an xarray DataArray (dims ``x, y, z``; coordinates in mm: the
    OME placement of that level, see :func:`~helm_dask.volume.voxel_coords`).

    The dask array of a volume returned as stored (3-D, no scaling applied) carries a
    :class:`~helm_dask.io.regions.StoredSource` (store, level, options), so that region tasks and the NIfTI
    export read it straight from the store (see :func:`helm_dask.io.regions.stored_source_of`).
    ``attrs["store"]`` and ``attrs["level"]`` name the store too.

    Parameters
    ----------
    path : str or path-like
        The store (a local path or an fsspec URL).
    level : int
        Pyramid level (0 = full resolution); the affine is that level's.
    echo, echo_combine :
        For multi-echo stores: pick one echo (0-based) or combine them (``"rms"`` or ``"mean"``); with neither,
        a 4-D volume with a trailing ``echo`` dim is returned.
    apply_scaling : bool
        Apply a NIfTI ``scl_slope``/``scl_inter`` kept from the source file (values become float32).
    name : str, optional
        The volume's name (default: the stored one, else the store's stem).
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`); the returned lazy array carries them to
        the workers (they are not kept in ``attrs``, which may be saved).

    Returns
    -------
    xarray.DataArray
    """
    p = os.fspath(path)
    meta = read_meta(p, storage_options=storage_options)
    nlevels = int(meta.get("nlevels", 1))
    if not 0 <= level < nlevels:
        raise HelmError(
            f"has no pyramid level {level} (levels 0..{nlevels - 1})", path=p, hint="choose an existing level"
        )
    data = _stored_data(p, meta, level, apply_scaling, storage_options)
    if data.ndim == 4:
        data = select_echo(data, echo=echo, echo_combine=echo_combine, path=p)
    elif echo not in (None, 0):
        raise HelmError(f"is a single-echo volume; --echo {echo} does not exist", path=p, hint="drop --echo")
    attrs = {k: v for k, v in meta.items() if k not in _STORE_KEYS}
    attrs["store"] = p
    attrs["level"] = level
    affine = np.asarray(meta["level_affines"][level] if "level_affines" in meta else meta["affine"])
    return make_volume(
        data,
        affine,
        kind=meta.get("kind", "image"),
        name=name or meta.get("name") or Path(p.rstrip("/")).stem,
        source=meta.get("source", p),
        provenance=meta.get("provenance", []),
        attrs=attrs,
    )


def _stored_data(p: str, meta: dict, level: int, apply_scaling: bool, storage_options: dict | None) -> da.Array:
    """The lazy array of one level (echo last), marked as stored, then scaled if the metadata says so.

    Any operation after the marking (moving the echo axis, scaling) makes a new array, which is not marked: it
    is computed data, no longer the store's.
    """
    arr = open_array(p, level, storage_options, format_version=int(meta.get("format_version", 1)))
    identity = tuple(range(len(arr.shape)))
    source = StoredSource(p, level, arr, storage_options, flips=(False,) * len(identity), perm=identity)
    data = attach_source(direct.from_zarr(arr), source)
    if meta.get("four_d"):
        data = da.moveaxis(data, 0, 3)
    scl = meta.get("nifti", {}).get("scaling") if isinstance(meta.get("nifti"), dict) else None
    if apply_scaling and scl and (scl[0] != 1.0 or scl[1] != 0.0):
        ft = np.float64 if data.dtype.itemsize > 4 and data.dtype.kind == "f" else np.float32
        data = data.astype(ft) * ft(scl[0]) + ft(scl[1])
    return data


def select_echo(data4: da.Array, *, echo: int | None, echo_combine: str | None, path=None) -> da.Array:
    """Reduce a (x, y, z, echo) array to 3-D: one echo, or the RMS / mean over echoes (float32).

    Parameters
    ----------
    data4 : dask.array.Array
        Echo last.
    echo : int, optional
        The echo to keep (0-based).
    echo_combine : {"rms", "mean"}, optional
        How to combine every echo (when ``echo`` is None); with neither, ``data4`` is returned.
    path : str, optional
        Named by errors.

    Returns
    -------
    dask.array.Array

    Example
    -------
    >>> x = da.from_array(np.array([3.0, 4.0]).reshape(1, 1, 1, 2))
    >>> float(select_echo(x, echo=None, echo_combine="rms")[0, 0, 0]), float(select_echo(x, echo=1, echo_combine=None))
    (3.535533905029297, 4.0)
    """
    nt = data4.shape[3]
    if echo is not None:
        if not 0 <= echo < nt:
            raise HelmError(
                f"has {nt} echoes; --echo {echo} is out of range (0..{nt - 1})",
                path=path,
                hint=f"choose an echo between 0 and {nt - 1}",
            )
        return data4[..., echo]
    if echo_combine is None:
        return data4
    x = data4.astype(np.float32)
    if echo_combine == "rms":
        # Accumulate in float64 so the result does not depend on the echo chunking.
        return da.sqrt((x.astype(np.float64) ** 2).mean(axis=3)).astype(np.float32)
    if echo_combine == "mean":
        return x.astype(np.float64).mean(axis=3).astype(np.float32)
    raise HelmError(f"unknown --echo-combine {echo_combine!r}", path=path, hint="use rms or mean")


def describe(path, *, storage_options: dict | None = None) -> dict:
    """Shape, spacing, orientation, dtype, chunks, size and affine of a store or NIfTI file (cheap).

    Parameters
    ----------
    path : str or path-like
        A helm-dask store or a NIfTI file (a local path or a URL).
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    dict
        JSON-able; see :func:`dumps_info`.
    """
    p = os.fspath(path)
    kind: str | None
    if is_nifti_path(p):
        info = read_nifti_header(p, storage_options=storage_options)
        shape, dtype, affine, chunks = info.shape, info.out_dtype, info.affine, None
        kind = "labels" if int(info.header["intent_code"]) == 1002 else "image"
        nbytes = location.size(p, storage_options)
        extra = {
            "format": f"NIfTI-{info.version}" + (" (gzip)" if info.gz else ""),
            "sform_code": info.sform_code,
            "qform_code": info.qform_code,
            "scaling": [info.slope, info.inter],
        }
    else:
        meta = read_meta(p, storage_options=storage_options)
        arr = open_array(p, 0, storage_options)
        shape = tuple(arr.shape[1:]) + (arr.shape[0],) if meta.get("four_d") else tuple(arr.shape)
        chunks = tuple(arr.chunks[1:]) if meta.get("four_d") else tuple(arr.chunks)
        dtype, affine, kind = arr.dtype, np.asarray(meta["affine"]), meta.get("kind")
        nbytes = location.du(p, storage_options)
        extra = {"format": "Zarr v3 (helm-dask, OME-Zarr 0.5)", "levels": meta.get("nlevels", 1)}
        if "ome_placement" in meta:
            extra.update(ome_placement=meta["ome_placement"], ome_placement_error_mm=meta["ome_placement_error_mm"])
    sp = spacing_of(affine)
    return {
        "path": p,
        "shape": list(shape),
        "spacing_mm": [round(float(s), 6) for s in sp],
        "orientation": orientation_code(affine),
        "dtype": str(np.dtype(dtype)),
        "kind": kind,
        "chunks": None if chunks is None else list(chunks),
        "voxels": int(np.prod(shape)),
        "size_bytes": nbytes,
        "affine": np.asarray(affine).tolist(),
        **extra,
    }


def dumps_info(d: dict) -> str:
    """:func:`describe`'s dict as indented JSON.

    Parameters
    ----------
    d : dict

    Returns
    -------
    str

    Example
    -------
    >>> dumps_info({"shape": [2, 2, 2]})
    '{\\n  "shape": [\\n    2,\\n    2,\\n    2\\n  ]\\n}'
    """
    return json.dumps(d, indent=2)
