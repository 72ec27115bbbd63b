"""Region tasks and stored sources: one hand-built graph layer whose tasks each compute an output chunk from a
bounded box of one or more sources (:func:`region_map`, :func:`chunk_tasks`), reading a source that comes from
a helm-dask store straight from the store, box by box through a per-process cache of decoded chunks, and any
other source from the dask chunks the box overlaps. A stored source is recognised by the :class:`StoredSource`
that :func:`helm_dask.io.store.open_volume` attaches to the lazy array it returns (and that
:func:`helm_dask.orient.to_ras` and :func:`~helm_dask.orient.flip_left_right` carry to their results through
:func:`carry_view`): :func:`stored_source_of`, :func:`store_view_of` and :func:`zarr_array_of` read it, and the
stage runner empties the caches with :func:`release_chunk_caches`. Why tasks read boxes this way, and how the
stored source is carried, is described in ``docs/method/storage.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import product
from typing import Any, Literal

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import direct

__all__ = [
    "CACHE_MB",
    "StoreView",
    "StoredSource",
    "attach_source",
    "box_cells",
    "box_tasks",
    "cache_owner",
    "carry_view",
    "chunk_edges",
    "chunk_tasks",
    "read_region",
    "region_map",
    "register_view",
    "release_cache",
    "release_chunk_caches",
    "store_view_of",
    "stored_source_of",
    "zarr_array_of",
]

#: Budget of the per-process cache of decoded source chunks, in MB (``HELM_CHUNK_CACHE_MB``; 0 disables it).
#: 512 MB holds 64 float32 chunks of 128^3: the boxes of the tasks that make one stored output chunk of a
#: 0.1 -> 0.3 mm resample (measured with 256 MB: every input chunk decoded ~8 times, 56 GB read).
CACHE_MB = float(os.environ.get("HELM_CHUNK_CACHE_MB", "512"))


class _ChunkCache:
    """Least-recently-used decoded chunks, bounded in bytes, shared by the threads of one process."""

    def __init__(self, budget_bytes: float):
        self.budget = budget_bytes
        self.items: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self.lock:
            arr = self.items.get(key)
            if arr is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return arr
            self.misses += 1
        arr = load()  # decoded outside the lock: threads decode different chunks at once
        if arr.nbytes > self.budget:
            return arr
        arr.setflags(write=False)  # shared between tasks: nobody may write into it
        with self.lock:
            if key not in self.items:
                self.items[key] = arr
                self.nbytes += arr.nbytes
            while self.nbytes > self.budget and self.items:
                _, old = self.items.popitem(last=False)
                self.nbytes -= old.nbytes
        return arr

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.nbytes = 0
            self.hits = self.misses = 0

    def drop(self, which: Callable[[Any], bool]) -> int:
        """Remove the chunks whose key ``which`` selects; the bytes they held."""
        with self.lock:
            keys = [k for k in self.items if which(k)]
            n = 0
            for k in keys:
                n += self.items.pop(k).nbytes
            self.nbytes -= n
            return n


_CACHE = _ChunkCache(CACHE_MB * 2**20)

#: Who builds the graphs in this context (a batch's subject thread): prefixes the cache scopes they draw, so that
#: releasing one subject's cached chunks leaves those of subjects running at the same time (empty: no owner).
_OWNER: ContextVar[str] = ContextVar("helm_dask_cache_owner", default="")


@contextmanager
def cache_owner(name: str) -> Iterator[None]:
    """Make ``name`` own the chunk-cache scopes of the graphs built in this context (a subject of a batch).

    :func:`release_chunk_caches` called in the same context then empties only that owner's cached chunks, so
    that subjects running at once in threads of one process (``--concurrent-subjects``) do not empty each other's
    caches mid-stage.

    Parameters
    ----------
    name : str
        The owner (a subject's name).

    Example
    -------
    >>> with cache_owner("sub01"):
    ...     _scope_prefix()
    'sub01:'
    """
    token = _OWNER.set(str(name))
    try:
        yield
    finally:
        _OWNER.reset(token)


def _scope_prefix() -> str:
    owner = _OWNER.get()
    return f"{owner}:" if owner else ""


def _clear_local_cache(prefix: str = "") -> int:
    """Empty this process's chunk cache (only the scopes starting with ``prefix`` if given); bytes it held."""
    if not prefix:
        n = _CACHE.nbytes
        _CACHE.clear()
        return n
    return _CACHE.drop(lambda key: isinstance(key[0], str) and key[0].startswith(prefix))


def release_chunk_caches(client: Any = None) -> None:
    """Empty the chunk cache here and on every worker of a distributed client (if any).

    The stage runner calls it after each stage: the cached chunks belong to that stage's graphs and would
    otherwise stay in every worker through the next stages (measured: ~0.5 GB per worker after a resample).
    Inside :func:`cache_owner` (a subject of a concurrent batch) only that owner's chunks are removed: the
    other subjects' running tasks keep theirs. Best effort: a closing cluster does not make it fail.

    Parameters
    ----------
    client : distributed.Client, optional
        Whose workers to clear; default: the current client, if there is one (none: only this process).

    Example
    -------
    >>> release_chunk_caches()
    >>> _CACHE.nbytes
    0
    """
    prefix = _scope_prefix()
    _clear_local_cache(prefix)
    if client is None:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):  # no distributed client: nothing else to clear
            return
    try:
        client.run(_clear_local_cache, prefix)
    except Exception:  # best effort (memory only): a closing cluster must not fail a stage
        pass


#: The former name of :func:`release_chunk_caches` (with no arguments: the current client).
release_cache = release_chunk_caches


def _then(
    flips0: tuple[bool, ...], perm0: tuple[int, ...], flips: Sequence[bool], perm: Sequence[int]
) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """The (flips, perm) of a view (``flips0``, ``perm0``) flipped along its axes ``flips``, then transposed by
    ``perm``: flips are kept per array axis, so a flip of a view axis lands on the array axis behind it."""
    f = list(flips0)
    for d, flip in enumerate(flips):
        if flip:
            f[perm0[d]] = not f[perm0[d]]
    return tuple(f), tuple(perm0[p] for p in perm)


class StoreView:
    """A 3-D Zarr array seen through axis flips, then a transpose -- what :func:`helm_dask.orient.to_ras` and
    :func:`helm_dask.orient.flip_left_right` make of a stored volume -- so that a box of the view can be read
    straight from the store (the flipped box of the array, flipped and transposed back).

    Parameters
    ----------
    array : zarr.Array
        The stored array (3-D).
    flips : sequence of bool
        Per array axis, whether the view reverses it.
    perm : sequence of int
        The view's axis ``d`` is the array's axis ``perm[d]`` (after the flips).
    """

    def __init__(self, array: Any, flips: Sequence[bool] = (False, False, False), perm: Sequence[int] = (0, 1, 2)):
        self.array, self.flips, self.perm = array, tuple(bool(f) for f in flips), tuple(int(p) for p in perm)
        self.shape = tuple(int(array.shape[p]) for p in self.perm)
        self.dtype = array.dtype

    def __reduce__(self):
        return direct.shared_reduce(self, StoreView, self.array, self.flips, self.perm)

    def then(self, flips: Sequence[bool], perm: Sequence[int]) -> StoreView:
        """This view flipped along its axes ``flips``, then transposed by ``perm``.

        Parameters
        ----------
        flips : sequence of bool
            Per axis of this view, whether to reverse it.
        perm : sequence of int
            The transpose applied after the flips.

        Returns
        -------
        StoreView
        """
        return StoreView(self.array, *_then(self.flips, self.perm, flips, perm))

    def read(self, lo: Sequence[int], hi: Sequence[int], scope: str = "") -> np.ndarray:
        """The box ``[lo, hi)`` of the view, read from the store (through the chunk cache under ``scope``).

        Parameters
        ----------
        lo, hi : sequence of int
            The box, in the view's axes.
        scope : str
            Cache namespace (see :func:`read_region`); empty: no cache.

        Returns
        -------
        numpy.ndarray
            C-contiguous, never a cached array.
        """
        zlo, zhi = [0, 0, 0], [0, 0, 0]
        for d, a in enumerate(self.perm):
            n = int(self.array.shape[a])
            zlo[a], zhi[a] = (n - int(hi[d]), n - int(lo[d])) if self.flips[a] else (int(lo[d]), int(hi[d]))
        box = read_region(self.array, zlo, zhi, scope)
        if any(self.flips):
            box = box[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        if self.perm != (0, 1, 2):
            box = box.transpose(self.perm)
        return np.ascontiguousarray(box)


@dataclasses.dataclass(frozen=True)
class StoredSource:
    """Where a lazy array's values are stored: one level of a helm-dask volume store, seen through axis flips,
    then a transpose.

    Attached to the dask array that :func:`helm_dask.io.store.open_volume` returns (:func:`attach_source`) and
    carried by the reorientations of :mod:`helm_dask.orient` (:func:`carry_view`); region tasks and the NIfTI
    export use it to read boxes straight from the store. Equality ignores the open array and the options.

    Parameters
    ----------
    store : str
        The store's path or URL.
    level : int
        The pyramid level.
    array : zarr.Array
        That level, opened read-only (it holds the storage options, and pickles with them to the workers).
    storage_options : dict, optional
        The fsspec options the store was opened with (None: the defaults in force).
    flips : tuple of bool
        Per array axis, whether the data reverses it.
    perm : tuple of int
        The data's axis ``d`` is the array's axis ``perm[d]`` (after the flips).
    """

    store: str
    level: int
    array: Any = dataclasses.field(repr=False, compare=False)
    storage_options: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    flips: tuple[bool, ...] = (False, False, False)
    perm: tuple[int, ...] = (0, 1, 2)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the data (the array's, permuted)."""
        return tuple(int(self.array.shape[p]) for p in self.perm)

    @property
    def untouched(self) -> bool:
        """Whether the data is the stored array as it is (no flip, no transpose)."""
        return not any(self.flips) and self.perm == tuple(range(len(self.perm)))

    def then(self, flips: Sequence[bool], perm: Sequence[int]) -> StoredSource:
        """This source flipped along the data's axes ``flips``, then transposed by ``perm`` (3-D only).

        Parameters
        ----------
        flips : sequence of bool
            Per axis of the data, whether it is reversed.
        perm : sequence of int
            The transpose applied after the flips.

        Returns
        -------
        StoredSource
        """
        f, p = _then(self.flips, self.perm, flips, perm)
        return dataclasses.replace(self, flips=f, perm=p)

    def view(self) -> StoreView:
        """A :class:`StoreView` reading boxes of the data from the store (3-D only)."""
        return StoreView(self.array, self.flips, self.perm)


#: The attribute of a dask array that holds ``(name of the array when attached, StoredSource)``. Carried by the
#: array object itself, so that it travels wherever the array goes (``like()``, xarray wrappers) and is absent
#: from any array an operation derives from it; the name guards against an in-place ``__setitem__``.
_SOURCE_ATTR = "_helm_dask_stored_source"


def attach_source(data: da.Array, source: StoredSource) -> da.Array:
    """Record on the dask array ``data`` that its values are ``source`` (no copy, no graph change).

    Parameters
    ----------
    data : dask.array.Array
        The array whose values are those of ``source``.
    source : StoredSource

    Returns
    -------
    dask.array.Array
        ``data`` itself.
    """
    setattr(data, _SOURCE_ATTR, (data.name, source))
    return data


def stored_source_of(data: Any) -> StoredSource | None:
    """The :class:`StoredSource` of a lazy array or volume, or None when its values are not stored ones.

    Parameters
    ----------
    data : dask.array.Array or xarray.DataArray
        A volume's data (or the volume).

    Returns
    -------
    StoredSource or None
        None for computed data: every operation that derives a new array (arithmetic, ``astype``, slicing,
        rechunking to other chunks) returns an array without one, and an array changed in place is refused.
    """
    if not isinstance(data, da.Array):
        data = getattr(data, "data", None)  # a volume: its lazy array
    record = getattr(data, _SOURCE_ATTR, None) if isinstance(data, da.Array) else None
    if record is None or not isinstance(data, da.Array):
        return None
    name, source = record
    if name != data.name or source.shape != tuple(data.shape) or source.array.dtype != data.dtype:
        return None
    return source


def carry_view(result: da.Array, source: da.Array, flips: Sequence[bool], perm: Sequence[int]) -> None:
    """Record that ``result`` is ``source`` flipped along ``flips`` then transposed by ``perm`` (3-D only), so
    that region tasks read it from the store behind ``source`` (if there is one).

    Parameters
    ----------
    result : dask.array.Array
        The flipped and transposed array.
    source : dask.array.Array
        The array it was made from.
    flips : sequence of bool
        Per axis of ``source``, whether it was reversed.
    perm : sequence of int
        The transpose applied after the flips.
    """
    if result.ndim != 3:
        return
    base = stored_source_of(source)
    if base is not None and len(base.array.shape) == 3:
        attach_source(result, base.then(flips, perm))


#: The former name of :func:`carry_view`.
register_view = carry_view


def store_view_of(data: Any) -> StoreView | None:
    """How to read ``data`` from its store: a stored 3-D volume as opened, or a flip/transpose of one.

    Parameters
    ----------
    data : dask.array.Array or xarray.DataArray

    Returns
    -------
    StoreView or None
        None when ``data`` is not stored (see :func:`stored_source_of`) or not 3-D.
    """
    source = stored_source_of(data)
    if source is None or len(source.array.shape) != 3:
        return None
    return source.view()


def zarr_array_of(data: Any) -> Any:
    """The Zarr array behind an untouched stored array (as :func:`helm_dask.io.store.open_volume` returns it).

    Parameters
    ----------
    data : dask.array.Array or xarray.DataArray

    Returns
    -------
    zarr.Array or None
        None for computed data, and for a flip or transpose of a stored array (see :func:`store_view_of`).
    """
    source = stored_source_of(data)
    return source.array if source is not None and source.untouched else None


def _overlapping(bounds: Sequence[np.ndarray], lo: Sequence[int], hi: Sequence[int]) -> list[range]:
    """Per axis, the indices of the chunks (edges ``bounds``) that overlap ``[lo, hi)``."""
    return [
        range(int(np.searchsorted(b, l, side="right")) - 1, int(np.searchsorted(b, h, side="left")))
        for b, l, h in zip(bounds, lo, hi)
    ]


def _paste(
    pieces: Sequence[np.ndarray], starts: Sequence[Sequence[int]], lo: Sequence[int], hi: Sequence[int]
) -> np.ndarray:
    """The box ``[lo, hi)`` assembled from chunks that start at ``starts`` and together cover it."""
    pieces = [np.asarray(p) for p in pieces]
    if len(pieces) == 1 and tuple(starts[0]) == tuple(lo) and pieces[0].shape == tuple(h - l for l, h in zip(lo, hi)):
        return pieces[0]
    out = np.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=pieces[0].dtype)
    for arr, off in zip(pieces, starts):
        direct.copy_overlap(out, lo, arr, off)
    return out


def read_region(zarr_array: Any, lo: Sequence[int], hi: Sequence[int], scope: str = "") -> np.ndarray:
    """The box ``[lo, hi)`` of a Zarr array, decoded chunk by chunk through the process's chunk cache.

    Every chunk is decoded whole by Zarr in any case, so the cache costs no extra decoding.

    Parameters
    ----------
    zarr_array : zarr.Array
        The stored array.
    lo, hi : sequence of int
        The box.
    scope : str
        Names the array for the cache (callers draw a fresh one per graph); empty: no cache.

    Returns
    -------
    numpy.ndarray
        A new array (never one held by the cache).
    """
    lo, hi = [int(v) for v in lo], [int(v) for v in hi]
    if not scope or _CACHE.budget <= 0:
        return direct.read_box(zarr_array, lo, hi)
    cs = zarr_array.chunks
    shape = zarr_array.shape
    idx = [range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, cs)]
    pieces, starts = [], []
    for cell in product(*idx):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, cs, shape))

        def load(cell=cell):
            return direct.read_chunk(zarr_array, cell)

        pieces.append(_CACHE.get((scope, cell), load))
        starts.append(tuple(b.start for b in box))
    out = _paste(pieces, starts, lo, hi)
    return out if not any(out is p for p in pieces) else out.copy()  # never hand out a cached array


class _Static:
    """Task arguments dask must pass through untouched (a tuple in a task whose first item is callable
    would otherwise be run as a task of its own)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return _Static, (self.value,)


def _region_task(parts: list, static: _Static) -> np.ndarray:
    func, starts, views, scopes, lo, hi, args, dtype = static.value
    regions = [
        v.read(lo, hi, sc) if v is not None else _paste(p, st, lo, hi)
        for p, st, v, sc in zip(parts, starts, views, scopes)
    ]
    out = func(regions, *args)
    return out if dtype is None else np.asarray(out).astype(dtype, copy=False)


def _full(shape: tuple[int, ...], dtype, value) -> np.ndarray:
    return np.zeros(shape, dtype) if value == 0 else np.full(shape, value, dtype)


class _Sources:
    """The sources of one layer: how each is read (store box or pasted chunks) and its cache scope."""

    def __init__(self, sources: Sequence[da.Array], scope: str, cache: bool):
        self.sources = list(sources)
        self.views = [store_view_of(s) if s.ndim == 3 else None for s in self.sources]
        self.bounds = [chunk_edges(s.chunks) for s in self.sources]
        self.scopes = [f"{scope}-{i}" if cache else "" for i in range(len(self.sources))]

    def task(self, func: Callable, lo: Sequence[int], hi: Sequence[int], args: Sequence, dtype=None) -> tuple:
        lo, hi = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
        keys: list[list[tuple]] = []
        starts: list[list[tuple[int, ...]]] = []
        for s, sb, v in zip(self.sources, self.bounds, self.views):
            if v is not None:
                keys.append([])
                starts.append([])
                continue
            cells = list(product(*_overlapping(sb, lo, hi)))
            keys.append([(s.name,) + cell for cell in cells])
            starts.append([tuple(int(sb[ax][cell[ax]]) for ax in range(len(cell))) for cell in cells])
        return (_region_task, keys, _Static((func, starts, self.views, self.scopes, lo, hi, tuple(args), dtype)))

    def dependencies(self) -> list[Any]:
        """The sources read through their chunks (the layer depends on them)."""
        return [s for s, v in zip(self.sources, self.views) if v is None]


def _digest(plans: list) -> str:
    """A token of the plans of a layer's chunks: SHA-1 of their pickle, which is ~10x faster than dask's
    recursive tokenizer on thousands of small tuples (at 0.1 mm: seconds per layer); plans that do not pickle
    (a lambda in the arguments) go through :func:`dask.base.tokenize`."""
    try:
        return hashlib.sha1(pickle.dumps(plans, protocol=5)).hexdigest()
    except Exception:
        return tokenize(plans)


def region_map(
    func: Callable,
    sources: Sequence[da.Array],
    out_chunks: tuple[tuple[int, ...], ...],
    plan: Callable,
    dtype: Any,
    *,
    name: str = "region",
    cache: bool = True,
) -> da.Array:
    """A lazy array with chunks ``out_chunks``, each chunk computed from one box of every source.

    One graph layer, one task per output chunk. A source that comes from a store (:func:`store_view_of`) is
    read inside the task, box by box (through the chunk cache when ``cache``): the task has no dependency on
    it. Any other source is pasted from the dask chunks the box overlaps, on which the task depends directly.

    Parameters
    ----------
    func : callable
        ``func(regions, *args) -> ndarray`` of the chunk's shape (cast to ``dtype``); ``regions`` holds, per
        source, the box ``[lo, hi)`` of that source as a NumPy array (do not write into it).
    sources : sequence of dask.array.Array
        Arrays of the same number of dimensions as the boxes.
    out_chunks : tuple of tuples of int
        The output's chunks (normalised dask chunks).
    plan : callable
        ``plan(block_index, ranges) -> (lo, hi, args)``, None or a number; ``ranges`` are the chunk's
        ``(start, stop)`` per output axis. None makes the chunk zeros, a number fills it with that value,
        without reading anything.
    dtype : dtype-like
        The output's dtype.
    name : str
        Prefix of the layer's name (the rest is a token of everything that makes the values).
    cache : bool
        Read store-backed sources through the chunk cache (for boxes that overlap each other).

    Returns
    -------
    dask.array.Array

    Example
    -------
    >>> src = da.arange(10.0, chunks=4).reshape(10, 1, 1)
    >>> def box(index, ranges):        # output chunk i <- source voxels [2i, 2i + 2)
    ...     (a, b), = ranges[:1]
    ...     return (2 * a, 0, 0), (2 * b, 1, 1), ()
    >>> out = region_map(lambda regions: regions[0].reshape(-1, 2, 1, 1).mean(axis=1), [src],
    ...                  ((2, 2, 1), (1,), (1,)), box, np.float64)
    >>> out.compute().ravel().tolist()
    [0.5, 2.5, 4.5, 6.5, 8.5]
    """
    bounds = chunk_edges(out_chunks)
    dtype = np.dtype(dtype)
    plans = []
    for index in product(*(range(len(c)) for c in out_chunks)):
        ranges = tuple((int(bounds[d][i]), int(bounds[d][i + 1])) for d, i in enumerate(index))
        plans.append((index, ranges, plan(index, ranges)))
    # same function, inputs, grid and boxes: same values, so the same keys (deterministic graphs)
    name = f"{name}-{tokenize(func, [s.name for s in sources], out_chunks, dtype, _digest([p for _, _, p in plans]))}"
    # the cache's namespace is new for every layer instead: a store rewritten at the same path since (a rerun
    # with other parameters) keeps its dask name, and must never be served from chunks cached before
    src = _Sources(sources, _scope_prefix() + uuid.uuid4().hex, cache)
    layer: dict = {}
    for index, ranges, p in plans:
        if p is None or np.isscalar(p):
            layer[(name,) + index] = (_full, tuple(b - a for a, b in ranges), dtype, 0 if p is None else p)
        else:
            lo, hi, args = p
            layer[(name,) + index] = src.task(func, lo, hi, args, dtype=dtype)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=src.dependencies())
    return da.Array(graph, name, chunks=out_chunks, dtype=dtype)


def halo_box(
    ranges: Sequence[tuple[int, int]], depth: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A chunk's box grown by ``depth`` voxels per side, clipped to a volume of ``shape``: what a
    :func:`region_map` plan reads for a filter of that reach.

    Parameters
    ----------
    ranges : sequence of (int, int)
        The chunk's ``(start, stop)`` per axis.
    depth : sequence of int
        The margin per axis.
    shape : sequence of int
        The volume's shape.

    Returns
    -------
    lo, hi : tuple of int

    Example
    -------
    >>> halo_box(((0, 4), (4, 8)), (2, 2), (10, 8))
    ((0, 2), (6, 8))
    """
    lo = tuple(max(0, int(a) - int(d)) for (a, _), d in zip(ranges, depth))
    hi = tuple(min(int(n), int(b) + int(d)) for (_, b), d, n in zip(ranges, depth, shape))
    return lo, hi


def pad_halo(
    box: np.ndarray,
    ranges: Sequence[tuple[int, int]],
    lo: Sequence[int],
    hi: Sequence[int],
    depth: Sequence[int],
    mode: Literal["edge", "constant"],
) -> np.ndarray:
    """The box read for :func:`halo_box` padded back to the chunk plus ``depth`` per side where the volume ended.

    Parameters
    ----------
    box : numpy.ndarray
        The box ``[lo, hi)`` as read.
    ranges : sequence of (int, int)
        The chunk's ``(start, stop)`` per axis.
    lo, hi : sequence of int
        The box (from :func:`halo_box`).
    depth : sequence of int
        The margin per axis.
    mode : {"edge", "constant"}
        As ``np.pad``: ``"edge"`` is scipy's "nearest", ``"constant"`` zeros beyond the volume.

    Returns
    -------
    numpy.ndarray
        The chunk's shape plus ``2 * depth`` per axis (``box`` itself when nothing is missing).

    Example
    -------
    >>> pad_halo(np.arange(6).reshape(6, 1), ((0, 4), (0, 1)), (0, 0), (6, 1), (2, 0), "edge").ravel().tolist()
    [0, 0, 0, 1, 2, 3, 4, 5]
    """
    pads = [(d - (a - l), d - (h - b)) for (a, b), l, h, d in zip(ranges, lo, hi, depth)]
    if any(p for pair in pads for p in pair):
        box = np.pad(box, pads, mode=mode)
    return box


def _with_origin(regions: list, func: Callable, lo: tuple[int, ...], *args: Any) -> Any:
    return func(regions, lo, *args)


def chunk_tasks(
    func: Callable, sources: Sequence[da.Array], *args: Any, name: str = "chunk-task", with_origin: bool = False
) -> list:
    """One delayed ``func(regions, *args)`` per chunk of the first source, for reductions over a volume.

    The tasks follow the first source's chunk grid and read the others over the same boxes: ``regions`` are the
    chunk of every source. Store-backed sources are read inside the task (no cache: each box is read once), so
    a pass costs one task per chunk, not two (a read task, then the function's).

    Parameters
    ----------
    func : callable
        ``func(regions, *args)``, any result.
    sources : sequence of dask.array.Array
        Arrays of the same shape.
    *args
        Passed to ``func``.
    name : str
        Prefix of the layer's name (the rest is a token of the function, the sources and ``args``).
    with_origin : bool
        Call ``func(regions, origin, *args)``, ``origin`` the chunk's first voxel index.

    Returns
    -------
    list of dask.delayed.Delayed
        One per chunk, in C order of the chunk grid.

    Example
    -------
    >>> import dask
    >>> parts = chunk_tasks(lambda r, w: float(r[0].sum()) * w, [da.ones((4, 2, 2), chunks=2)], 0.5)
    >>> len(parts), sum(dask.compute(*parts))
    (2, 8.0)
    """
    from dask.delayed import Delayed

    name = f"{name}-{tokenize(func, [s.name for s in sources], sources[0].chunks, args, with_origin)}"
    src = _Sources(sources, "", cache=False)
    first = src.bounds[0]
    layer: dict = {}
    for index in product(*(range(len(b) - 1) for b in first)):
        lo = [int(first[d][i]) for d, i in enumerate(index)]
        hi = [int(first[d][i + 1]) for d, i in enumerate(index)]
        if with_origin:
            layer[(name,) + index] = src.task(_with_origin, lo, hi, (func, tuple(lo), *args))
        else:
            layer[(name,) + index] = src.task(func, lo, hi, args)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=src.dependencies())
    return [Delayed(key, graph, layer=name) for key in layer]


def chunk_edges(chunks: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The voxel edges of a chunk grid (dask's ``chunks``) along each axis: ``[0, c0, c0 + c1, ...]`` as int64.
    Chunk ``i`` of an axis spans ``edges[i]:edges[i + 1]``; ``edges[:-1]`` are the chunks' first voxels.

    Example
    -------
    >>> [e.tolist() for e in chunk_edges(((4, 2), (3,)))]
    [[0, 4, 6], [0, 3]]
    """
    return [np.concatenate([[0], np.cumsum(c, dtype=np.int64)]) for c in chunks]


def box_cells(edges: Sequence[np.ndarray]) -> Iterator[tuple[tuple[int, ...], list[int], list[int]]]:
    """The chunks of a box whose chunk edges along each axis are ``edges``, in C order: ``(cell, lo, hi)``, the
    chunk's index in the box and its voxel bounds.

    Example
    -------
    >>> [(c, lo, hi) for c, lo, hi in box_cells([np.array([0, 4, 6]), np.array([2, 5])])]
    [((0, 0), [0, 2], [4, 5]), ((1, 0), [4, 2], [6, 5])]
    """
    for cell in np.ndindex(*(len(e) - 1 for e in edges)):
        yield cell, [int(e[i]) for e, i in zip(edges, cell)], [int(e[i + 1]) for e, i in zip(edges, cell)]


def box_tasks(func: Callable, chunks: tuple, group: int, *args: Any, name: str) -> da.Array:
    """A lazy object array of one task per box of ``group`` chunks per axis of the chunk grid ``chunks``:
    ``func(first, edges, *args)``, ``first`` the box's first chunk index and ``edges`` its chunks' edges along
    each axis (:func:`box_cells` walks them). The tasks depend on nothing: ``func`` reads what it needs itself
    (a :class:`StoreView` in ``args``), so a pass over a stored volume is one task per box.

    Why boxes: one task per chunk of a few ms cost the 2-core machine's scheduler and client ~2 ms per task on
    the cores the workers share with them (the workers were 56-65% busy in such passes, 80-87% in boxes of 2x2x2
    chunks; see the callers' measurements).

    Parameters
    ----------
    func : callable
        ``func(first, edges, *args)``; its result is the box's block: a one-element object array with one
        axis per axis of ``chunks``.
    chunks : tuple of tuple of int
        The chunk grid (dask's ``chunks``).
    group : int
        Chunks per box along each axis (the last boxes may hold fewer).
    *args
        Passed to ``func``.
    name : str
        The layer's name (give it a token of the inputs).

    Returns
    -------
    dask.array.Array
        dtype object, one element per box.

    Example
    -------
    >>> def sizes(first, edges):
    ...     out = np.empty(1, dtype=object)
    ...     out[0] = (first, [len(e) - 1 for e in edges])
    ...     return out
    >>> box_tasks(sizes, ((2, 2, 2),), 2, name="sizes").compute().tolist()
    [([0], [2]), ([2], [1])]
    """
    edges = chunk_edges(chunks)
    grid = tuple(-(-(len(e) - 1) // group) for e in edges)
    layer: dict = {
        (name, *idx): (
            func,
            [i * group for i in idx],
            [e[i * group : i * group + group + 1] for e, i in zip(edges, idx)],
            *args,
        )
        for idx in np.ndindex(*grid)
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[])
    return da.Array(graph, name, chunks=tuple((1,) * n for n in grid), dtype=object)
