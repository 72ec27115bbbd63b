"""Zarr v3 volume stores: OME-Zarr 0.5 multiscales plus the exact affine, written atomically.

A helm-dask volume is a Zarr v3 *group*::

    scan.zarr/
      zarr.json          attributes: {"ome": {"version": "0.5", "multiscales": [...]},
                                      "helm_dask": {"affine": 4x4, "kind": ..., "complete": true, ...}}
      0/                 full resolution, dims (x, y, z) -- or (echo, x, y, z) for multi-echo data
      1/, 2/, ...        pyramid levels (2x per level: block mean for images, stride for labels)

Chunks: 128^3 voxels by default. At 0.1 mm a hemisphere (about 1920 x 820 x 1300) is then ~1,200 chunks of
8 MiB (float32) per level: big enough that task overhead and object count stay small (S3 and parallel file
systems cope well with a thousand objects), small enough that a task holding a few chunks plus an overlap margin
(the 1.2 mm closing needs 24 voxels at 0.1 mm) stays in the tens of MB, and cubic so that no stage (z-slab
I/O, y-row mirroring, 3-D filters) is favoured at the others' expense. Sharding is off by default: it pays off
when chunks are small and objects are many, which is not the case at this chunk size, and a shard must be
written whole by one task, which would force slabs of several chunk-layers into memory during NIfTI import.
``shards=`` is available for object stores that charge per request.

Compression: Blosc-zstd level 1 with byte shuffle for intensities and bit shuffle for labels: ~1 GB/s per core,
so chunk I/O is never the bottleneck next to gzip (~50-100 MB/s) or the stages' arithmetic.

Atomicity: a volume is written under a temporary sibling name and renamed into place once complete
(``attrs["helm_dask"]["complete"] = true`` is written last, so even on stores without rename -- object stores --
a reader can tell a finished volume from an interrupted one).

Object storage: every ``path`` may also be an fsspec URL (``s3://bucket/scan.zarr``) with ``storage_options``
(see :mod:`helm_dask.io.location`). There is no rename there, so a volume is written in place: an existing one
is deleted first (with ``overwrite``), the ``complete`` flag is set last, and a write that fails is deleted
(best effort; a killed client leaves an unfinished store that readers refuse and the next run rewrites). The Zarr
arrays handed to Dask hold the filesystem with its options, so workers need no configuration of their own.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from ..errors import HelmError
from ..volume import affine_of, make_volume, spacing_of
from . import location
from .regions import release_cache

DEFAULT_CHUNKS = (128, 128, 128)
PYRAMID_MIN_SIZE = 64  # stop adding levels once the largest dimension is below this
FORMAT = "helm-dask-volume"
FORMAT_VERSION = 1


def _local(path) -> Path | None:
    return None if location.is_url(path) else Path(os.fspath(path))


def compressor_for(dtype, *, scratch: bool = False) -> BloscCodec:
    """Blosc for a stored volume: zstd level 1 (byte shuffle for floats, bit shuffle for labels).

    ``scratch=True``: lz4 for copies that live only for one export; it encodes ~1.7x and decodes ~2x faster
    than zstd on label maps, at ~10% more bytes that never stay on disk.
    """
    dtype = np.dtype(dtype)
    shuffle = "shuffle" if dtype.kind == "f" else "bitshuffle"
    return BloscCodec(cname="lz4" if scratch else "zstd", clevel=1, shuffle=shuffle, typesize=dtype.itemsize)


def normalize_chunks(chunks, shape) -> tuple[int, ...]:
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
def atomic_path(path, *, overwrite: bool = False, storage_options: dict | None = None) -> Iterator[str]:
    """Yield a temporary sibling path to write to; rename it onto ``path`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the writes still in flight are stopped first
    (:func:`stop_pending_writes`: Dask tasks and Zarr's own I/O, which would otherwise recreate the temporary
    after its removal), then the temporary output is removed and ``path`` is untouched. A full disk or a
    read-only file system while writing becomes a one-line :class:`HelmError` (exit 3) naming ``path``.
    An existing ``path`` is refused unless ``overwrite``; with ``overwrite`` the old output is replaced only
    after the new one is complete.

    For a URL (object store: no rename) the existence check is the same but ``path`` itself is yielded: the
    writer must make the output appear whole (:func:`location.open_write` for files, :func:`atomic_store` and
    the ``complete`` flag for Zarr volumes).
    """
    local = _local(path)
    if local is None:  # object store: no rename; completeness is marked in the metadata instead
        if not overwrite and location.exists(path, storage_options):
            raise HelmError(
                "already exists", path=path, hint="pass --overwrite to replace it, or choose another name", exit_code=3
            )
        yield os.fspath(path)
        return
    local = local.absolute()
    if local.exists() and not overwrite:
        raise HelmError(
            "already exists", path=local, hint="pass --overwrite to replace it, or choose another name", exit_code=3
        )
    parent = local.parent
    location.makedirs(parent)
    try:
        # Probe by writing: permission bits do not tell the whole story (root, read-only mounts, ACLs).
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise location.output_error(e, parent) from None
    # leftovers of an earlier writer of this output that was killed (SIGKILL, lost node); a writer that is still
    # running keeps its temporaries (the names record the writing process)
    for prefix in (".tmp", ".old"):
        location.remove_stale_siblings(local, prefix)
    tmp = parent / f".{local.name}.tmp-{location.writer_token()}"
    _LIVE.add(str(tmp))
    try:
        yield str(tmp)
        _replace(tmp, local)
    except BaseException as e:
        # stays in _LIVE: after an interrupt the CLI sweeps once more when the workers are gone
        stop_pending_writes()
        _remove_temporary(tmp)
        if isinstance(e, OSError) and e.errno in location.WRITE_ONLY_ERRNOS:
            # several outputs written by one computation: name the one whose write failed
            raise location.output_error(e, final_path_of(e.filename) or local) from None
        raise
    _LIVE.discard(str(tmp))


def _replace(tmp: Path, local: Path) -> None:
    """Move the finished ``tmp`` onto ``local``. A file is replaced in one atomic rename; a folder (a store)
    cannot be renamed onto an existing one, so the old one is moved aside first -- in a loop, because another
    process finishing the same output at the same moment may put its copy in place in between (the last
    complete copy wins; both are complete)."""
    if not tmp.is_dir():
        os.replace(tmp, local)
        return
    for _ in range(100):
        try:
            os.replace(tmp, local)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        trash = local.parent / f".{local.name}.old-{location.writer_token()}"
        try:
            os.replace(local, trash)
        except FileNotFoundError:
            continue
        location.remove(trash)
    raise OSError(errno.EBUSY, "other writers keep replacing this output", str(local))


def _remove_temporary(tmp: Path) -> None:
    """Remove a temporary output and what was written beside it under its name (e.g. a scratch store)."""
    location.remove(tmp)
    for extra in tmp.parent.glob(glob.escape(tmp.name) + "*"):
        location.remove(extra)


#: Temporaries this process is writing now (see :func:`remove_live_temporaries`).
_LIVE: set[str] = set()


def remove_live_temporaries() -> None:
    """After an interrupt: stop the writes in flight and remove every temporary this process was writing.

    :func:`atomic_path` already does it for its own output; the CLI calls this once more after the cluster is
    shut down, so that a straggling write of a worker cannot leave a ``.<name>.tmp-*`` behind.
    """
    stop_pending_writes()
    for t in list(_LIVE):
        _remove_temporary(Path(t))


def stop_pending_writes(timeout_s: float = 30.0) -> None:
    """Wait (at most ``timeout_s``) until no chunk write started by this process is still running.

    A computation that fails or is interrupted leaves its running tasks running: in Dask's thread pool, on the
    workers of a ``distributed`` cluster (the client has released the futures, so nothing new starts, but
    running tasks finish), and in Zarr's I/O event loop (a write whose caller was interrupted). Each of them
    can still write a chunk -- and recreate the temporary folder a cleanup has just removed.
    """
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        return  # inside a task (or a helper thread): the caller that owns the computation waits
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Exception):
        from distributed import get_client

        client = get_client()
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(Exception):
        import dask.threaded as dt

        pools = [dt.default_pool] + [p for d in list(dt.pools.values()) for p in d.values()]
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        dt.default_pool = None  # dask makes a new one for the next computation
        dt.pools.clear()
    with contextlib.suppress(Exception):
        _drain_zarr_io(max(0.1, deadline - time.monotonic()))


def _drain_zarr_io(timeout_s: float) -> None:
    import asyncio

    from zarr.core import sync as zsync

    loop = zsync.loop[0] if getattr(zsync, "loop", None) else None
    if loop is None or not loop.is_running():
        return

    async def drain():
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s + 1.0)


@contextlib.contextmanager
def atomic_store(path, *, overwrite: bool = False, storage_options: dict | None = None) -> Iterator[str]:
    """:func:`atomic_path` for a Zarr volume: on object stores a failed write is also deleted.

    Locally this *is* :func:`atomic_path` (temporary sibling, renamed when complete). For a URL the volume is
    written in place (an existing one is replaced as soon as the writer opens it with ``mode="w"``) and marked
    complete last; if the block fails, the unfinished store is deleted (best effort) so that no half volume is
    left behind. A killed client cannot clean up: its store stays flagged unfinished.
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


def open_group(path, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """``zarr.open_group`` on a local path or a URL (with the storage options in force)."""
    return zarr.open_group(
        location.zarr_store(path, storage_options, read_only=mode == "r"), mode=mode, **_format_kw(path, mode)
    )


def open_array(path, level, storage_options: dict | None = None) -> zarr.Array:
    """The (read-only) Zarr array of one level of a volume store, local path or URL."""
    return zarr.open_array(
        location.zarr_store(path, storage_options, read_only=True), path=str(level), mode="r", **_format_kw(path, "r")
    )


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
    """Affine of pyramid ``level``: block means put voxel centres at block centres; strides at block corners."""
    a = np.asarray(affine, dtype=np.float64)
    f = 2.0**level
    shift = (f - 1.0) / 2.0 if kind == "image" else 0.0
    s = np.array([[f, 0, 0, shift], [0, f, 0, shift], [0, 0, f, shift], [0, 0, 0, 1.0]])
    return a @ s


def ome_multiscales(affine: np.ndarray, kind: str, nlevels: int, four_d: bool, name: str) -> list:
    """OME-Zarr 0.5 ``multiscales``: scale = voxel size, translation = world position of voxel (0,0,0).

    OME-Zarr describes only axis-aligned scale + translation; the exact (possibly oblique) affine is kept in
    ``attrs["helm_dask"]["affine"]`` and is what helm-dask itself uses.
    """
    axes = [{"name": d, "type": "space", "unit": "millimeter"} for d in ("x", "y", "z")]
    if four_d:
        axes = [{"name": "echo", "type": "channel"}] + axes
    datasets = []
    for lev in range(nlevels):
        a = level_affine(affine, lev, kind)
        scale = spacing_of(a).tolist()
        trans = a[:3, 3].tolist()
        if four_d:
            scale, trans = [1.0] + scale, [0.0] + trans
        datasets.append(
            {
                "path": str(lev),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": trans},
                ],
            }
        )
    return [{"name": name, "axes": axes, "datasets": datasets, "type": "mean" if kind == "image" else "stride"}]


# ----------------------------------------------------------------------------------------------------------------
# Writing


def create_level(group: zarr.Group, level: int, shape, dtype, chunks, *, four_d: bool, shards=None) -> zarr.Array:
    if four_d:
        nt, spatial = shape[3], shape[:3]
        arr_shape = (nt,) + tuple(spatial)
        arr_chunks = (1,) + tuple(chunks)
        dims = ["echo", "x", "y", "z"]
    else:
        arr_shape, arr_chunks, dims = tuple(shape), tuple(chunks), ["x", "y", "z"]
    kw = {}
    if shards is not None:
        kw["shards"] = ((1,) if four_d else ()) + tuple(shards)
    return group.create_array(
        str(level),
        shape=arr_shape,
        dtype=np.dtype(dtype),
        chunks=arr_chunks,
        compressors=[compressor_for(dtype)],
        fill_value=0,
        dimension_names=dims,
        overwrite=True,
        **kw,
    )


# Output chunks per computation when a volume is written in batches (see store_batched): ~64 chunks of 128^3
# float32 = 512 MB of output in flight at most, whatever the volume size.
STORE_BATCH_CHUNKS = 64


def _store_dask(arr: da.Array, target: zarr.Array) -> None:
    """Write a dask array into a zarr array, one whole zarr chunk per write (safe to repeat, no races)."""
    arr = arr.rechunk(target.chunks if arr.ndim == len(target.chunks) else arr.chunks)
    da.store(arr, with_fault_hook(target), lock=False, compute=True)


_TEMP_NAME = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}p\d+h[0-9a-f]{8}$")


def output_name(path) -> str:
    """The name an output will have once complete (``scan_raw`` for ``.scan_raw.tmp-<token>``)."""
    for part in reversed(Path(str(path).split("://", 1)[-1]).parts):
        m = _TEMP_NAME.match(part)
        if m:
            return m.group(1)
    return Path(str(path)).name


def final_path_of(path) -> str | None:
    """The final path of the output a path inside a temporary belongs to (``.../.kmeans_k4.tmp-<token>/0/c/0``
    -> ``.../kmeans_k4``), or None when ``path`` is not inside one."""
    if not isinstance(path, str):
        return None
    parts = Path(path.split("://", 1)[-1]).parts
    last = max((i for i, part in enumerate(parts) if _TEMP_NAME.match(part)), default=None)
    if last is None:
        return None
    # outputs inside outputs (a phantom store's volumes): every temporary name on the way becomes its final one
    return str(Path(*[m.group(1) if (m := _TEMP_NAME.match(part)) else part for part in parts[: last + 1]]))


class _FaultHookTarget:
    """A Zarr array whose writes go through :func:`location.fault` first (only used when the fault-injection
    variable is set: normal runs hand Dask the Zarr array itself)."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.point = f"write:{output_name(arr.store_path)}"
        self.path = str(arr.store_path).split("://", 1)[-1]

    # (explicit properties, not __getattr__: the target is pickled to the workers, and unpickling calls
    # __getattr__ before ``arr`` exists)
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
        location.fault(self.point, self.path)
        self.arr[key] = value


def with_fault_hook(target):
    """``target`` wrapped by :class:`_FaultHookTarget` when ``HELM_DASK_FAULT`` is set, else itself."""
    if os.environ.get(location.FAULT_ENV) and isinstance(target, zarr.Array):
        return _FaultHookTarget(target)
    return target


def _block_batches(numblocks: tuple[int, ...], n: int) -> Iterator[tuple[slice, ...]]:
    """Compact boxes of about ``n`` blocks covering the block grid (in C order)."""
    edge = max(1, round(n ** (1.0 / len(numblocks))))
    steps = [min(nb, edge) for nb in numblocks]
    for start in np.ndindex(*[-(-nb // st) for nb, st in zip(numblocks, steps)]):
        yield tuple(slice(i * st, min((i + 1) * st, nb)) for i, st, nb in zip(start, steps, numblocks))


def store_batched(sources: list, targets: list, *, batch_chunks: int = STORE_BATCH_CHUNKS) -> None:
    """``da.store`` in batches of neighbouring output chunks, one computation per batch.

    Why: when an output chunk needs several input chunks that other output chunks need too (a flipped axis whose
    length is not a multiple of the chunk size, overlaps of a filter, a rechunk), one computation over the whole
    volume lets the scheduler hold such shared pieces across a whole cross-section of the volume -- peak memory
    then grows with the volume (measured: 2.3 GB at 0.2 mm, 6.1 GB at 0.1 mm for the brain mask). A batch is a
    box of about ``batch_chunks`` output chunks, so what can be held is bounded by the box, not the volume; the
    price is re-reading the inputs shared across box faces. Sources must share their chunk grid (they do in a
    stage: all outputs on one grid); targets are whole-chunk aligned, so every write stays one whole chunk.
    """
    grids = {s.chunks for s in sources}
    if len(grids) != 1:
        for s_, t_ in zip(sources, targets):
            store_batched([s_], [t_], batch_chunks=batch_chunks)
        return
    chunks = sources[0].chunks
    numblocks = tuple(len(c) for c in chunks)
    targets = [with_fault_hook(t) for t in targets]
    if int(np.prod(numblocks)) <= batch_chunks:
        da.store(sources, targets, lock=False, compute=True)
        return
    _in_batches(
        chunks,
        batch_chunks,
        lambda region: da.store(
            [s_[region] for s_ in sources], targets, regions=[region] * len(targets), lock=False, compute=True
        ),
    )


def _in_batches(chunks: tuple, batch_chunks: int, run: Callable[[tuple], None]) -> None:
    """``run(region)`` for the chunk-aligned region of every box of :func:`_block_batches`, one after the other.

    Before each box the scheduler is given time to forget the previous box's tasks (:func:`_scheduler_settler`,
    a few seconds at most: on a shared cluster others' tasks keep the count up); a box that still meets the
    spurious KeyError of dask/dask#9888 runs once more after a longer wait -- boxes are idempotent (whole-chunk
    writes, pure reductions).
    """
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    settle = _scheduler_settler()
    for box in _block_batches(tuple(len(c) for c in chunks), batch_chunks):
        region = tuple(slice(int(o[b.start]), int(o[b.stop])) for o, b in zip(offsets, box))
        settle(5.0)
        try:
            run(region)
        except KeyError:
            settle(60.0)
            run(region)


def compute_batched(arrays: list, *, batch_chunks: int = STORE_BATCH_CHUNKS) -> list[np.ndarray]:
    """``dask.compute`` of small results of big graphs (e.g. coarse block sums of a whole volume), in boxes.

    The same boxes as :func:`store_batched`, for the same reason: a reduction whose chunks need pieces of several
    input chunks (a rechunk to blocks that do not divide the chunks) lets the scheduler hold such pieces across a
    whole cross-section when the volume is one computation (at 0.1 mm: 1.8 GB per worker in the bias fit's coarse
    copy). Arrays must share their chunk grid; each box computes all of them at once (shared inputs read once
    per box). The values are those of one computation, task for task.
    """
    arrays = list(arrays)
    chunks = arrays[0].chunks
    if any(a.chunks != chunks for a in arrays):
        raise ValueError("compute_batched: the arrays must share their chunk grid")
    if int(np.prod([len(c) for c in chunks])) <= batch_chunks:
        return [np.asarray(v) for v in dask.compute(*arrays)]
    out = [np.empty(a.shape, dtype=a.dtype) for a in arrays]

    def run(region):
        for o, v in zip(out, dask.compute(*[a[region] for a in arrays])):
            o[region] = v

    _in_batches(chunks, batch_chunks, run)
    return out


def _n_scheduler_tasks(dask_scheduler=None) -> int:
    return len(dask_scheduler.tasks)


def _scheduler_settler() -> Callable[[float], None]:
    """``settle(timeout_s)``: wait until a distributed scheduler has forgotten the previous batch's tasks.

    Consecutive batches share keys (the inputs on a box face); a graph that reaches the scheduler while it is
    still forgetting those keys fails with a spurious KeyError in update_graph (dask/dask#9888; seen at 0.1 mm).
    Waiting (at most ``timeout_s``) for the task count to fall back to what it was before the first batch
    (others' data may be there) avoids it; a no-op without a distributed client.
    """
    import time

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        return lambda timeout_s: None
    if dask.config.get("scheduler", None) in ("threads", "synchronous", "sync", "processes"):
        return lambda timeout_s: None
    base = client.run_on_scheduler(_n_scheduler_tasks)

    def settle(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while client.run_on_scheduler(_n_scheduler_tasks) > base and time.monotonic() < deadline:
            time.sleep(0.02)

    return settle


def build_pyramid(group: zarr.Group, *, kind: str, chunks, max_levels: int | None = None) -> int:
    """Add levels 1.. to a group whose level 0 is written; each level is computed from the stored one below."""
    lev = 0
    while True:
        below = group[str(lev)]
        shape = below.shape
        if len(shape) != 3 or max(shape) < PYRAMID_MIN_SIZE * 2 or min(shape) < 2:
            break
        if max_levels is not None and lev + 1 >= max_levels:
            break
        # Each task reads the 2x2x2 block of chunks behind exactly one output chunk: no re-merging of halves
        # afterwards (which lets the scheduler buffer pieces), memory of one 8-chunk region per task.
        src = da.from_zarr(below, chunks=tuple(2 * c for c in below.chunks))
        if kind == "image":
            # Block mean in float64 then back: exact for integer factors, no overflow for integer inputs.
            down = da.coarsen(np.mean, src.astype(np.float64), {0: 2, 1: 2, 2: 2}, trim_excess=True)
            down = down.astype(np.float32 if src.dtype.kind != "f" else src.dtype)
        else:
            n = [s // 2 * 2 for s in shape]
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
) -> None:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "affine": np.asarray(affine).tolist(),
        "kind": kind,
        "units": "mm",
        "nlevels": nlevels,
        "four_d": four_d,
        "level_affines": [level_affine(affine, lev, kind).tolist() for lev in range(nlevels)],
        "complete": complete,
    }
    meta.update(_jsonable(extra or {}))
    group.attrs.update(
        {
            "ome": {"version": "0.5", "multiscales": ome_multiscales(affine, kind, nlevels, four_d, name)},
            "helm_dask": meta,
        }
    )


def volume_attrs_for_store(vol: xr.DataArray) -> dict:
    """The DataArray attrs that go into the store's ``helm_dask`` metadata."""
    skip = {"affine", "units", "kind", "coords"}
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
) -> str:
    """Write a (lazy) volume to a new Zarr v3 store, atomically, with its pyramid and metadata.

    The computation runs on the current Dask scheduler (a ``dask.distributed`` client if one is active), one
    whole chunk per task; memory is bounded by the chunk size.

    Example
    -------
    >>> import numpy as np, dask.array as da, tempfile, os
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
) -> list[str]:
    """Write several volumes ``{path: vol}`` with ONE Dask computation for their full-resolution data.

    Volumes derived from the same inputs (the six k-means maps of one image, say) share their graph, so the
    inputs are read once for all of them. Each store is still written atomically on its own. Paths may be
    URLs (``storage_options`` as in :mod:`helm_dask.io.location`). ``batch_chunks``: output chunks per
    computation (:func:`store_batched`; default :data:`STORE_BATCH_CHUNKS`) -- fewer when each output chunk
    needs much more input than its own size (a downsampling resample).
    """
    with contextlib.ExitStack() as stack:
        sources, targets, pending = [], [], []
        for path, vol in vols.items():
            kind = vol.attrs.get("kind", "image")
            affine = affine_of(vol)
            data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
            four_d = data.ndim == 4
            ch = normalize_chunks(chunks, data.shape)
            tmp = stack.enter_context(atomic_store(path, overwrite=overwrite, storage_options=storage_options))
            group = open_group(tmp, "w", storage_options)
            attrs = volume_attrs_for_store(vol)
            attrs.update(extra or {})
            name = str(vol.name or Path(os.fspath(path).rstrip("/")).stem)
            write_attrs(
                group, affine=affine, kind=kind, name=name, nlevels=1, four_d=four_d, extra=attrs, complete=False
            )
            target = create_level(group, 0, data.shape, data.dtype, ch, four_d=four_d, shards=shards)
            src = da.moveaxis(data, 3, 0) if four_d else data
            sources.append(src.rechunk(target.chunks))
            targets.append(target)
            pending.append((group, kind, affine, name, four_d, ch, attrs))
        try:
            store_batched(sources, targets, batch_chunks=batch_chunks or STORE_BATCH_CHUNKS)
        finally:
            release_cache()  # the decoded chunks of this computation's box tasks: not needed again
        for group, kind, affine, name, four_d, ch, attrs in pending:
            nlevels = build_pyramid(group, kind=kind, chunks=ch) if (pyramid and not four_d) else 1
            write_attrs(
                group, affine=affine, kind=kind, name=name, nlevels=nlevels, four_d=four_d, extra=attrs, complete=True
            )
    return [os.fspath(p) for p in vols]


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_meta(path, *, storage_options: dict | None = None) -> dict:
    """The ``helm_dask`` metadata of a volume store; :class:`HelmError` if it is not a finished helm-dask volume."""
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
    meta = dict(group.attrs.get("helm_dask") or {})
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
    try:
        read_meta(path, storage_options=storage_options)
        return True
    except HelmError:
        return False


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
    """Open a helm-dask Zarr volume lazily as an xarray DataArray (dims ``x, y, z``; coordinates in mm).

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
    storage_options : dict, optional
        fsspec options for a URL (see :mod:`helm_dask.io.location`); the returned lazy array carries them to
        the workers (they are not kept in ``attrs``, which may be saved).
    """
    p = os.fspath(path)
    meta = read_meta(p, storage_options=storage_options)
    nlevels = int(meta.get("nlevels", 1))
    if not 0 <= level < nlevels:
        raise HelmError(
            f"has no pyramid level {level} (levels 0..{nlevels - 1})", path=p, hint="choose an existing level"
        )
    arr = open_array(p, level, storage_options)
    data = da.from_zarr(arr)
    kind = meta.get("kind", "image")
    affine = np.asarray(meta["level_affines"][level] if "level_affines" in meta else meta["affine"])
    if meta.get("four_d"):
        data = da.moveaxis(data, 0, 3)
    scl = meta.get("nifti", {}).get("scaling") if isinstance(meta.get("nifti"), dict) else None
    if apply_scaling and scl and (scl[0] != 1.0 or scl[1] != 0.0):
        ft = np.float64 if data.dtype.itemsize > 4 and data.dtype.kind == "f" else np.float32
        data = data.astype(ft) * ft(scl[0]) + ft(scl[1])
    if data.ndim == 4:
        data = select_echo(data, echo=echo, echo_combine=echo_combine, path=p)
    elif echo not in (None, 0):
        raise HelmError(f"is a single-echo volume; --echo {echo} does not exist", path=p, hint="drop --echo")
    attrs = {
        k: v
        for k, v in meta.items()
        if k
        not in ("affine", "kind", "units", "level_affines", "complete", "format", "format_version", "nlevels", "four_d")
    }
    attrs["store"] = p
    attrs["level"] = level
    return make_volume(
        data,
        affine,
        kind=kind,
        name=name or meta.get("name") or Path(p.rstrip("/")).stem,
        source=meta.get("source", p),
        provenance=meta.get("provenance", []),
        attrs=attrs,
    )


def select_echo(data4: da.Array, *, echo: int | None, echo_combine: str | None, path=None) -> da.Array:
    """Reduce a (x, y, z, echo) array to 3-D: one echo, or the RMS / mean over echoes (float32)."""
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
    """Shape, spacing, orientation, dtype, chunks, size and affine of a store or NIfTI file (cheap)."""
    from ..volume import orientation_code
    from .nifti import is_nifti_path, read_nifti_header

    p = os.fspath(path)
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
    return json.dumps(d, indent=2)
