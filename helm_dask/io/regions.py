"""Region tasks: one hand-built graph layer whose tasks each work on a bounded box of one or more sources.

Several stages compute an output chunk from a box of the input that is not one of its chunks (resampling:
the chunk's footprint plus a filter margin; mirroring: the box a rotated chunk reaches). Slicing the dask
array once per output chunk (``data[box]`` then ``from_delayed``) builds a graph layer per output chunk: at
0.1 mm that is tens of thousands of tasks in thousands of layers, which the client keeps alive (about 1 GB
measured after a 0.1 -> 0.3 mm resample) and which make the scheduler hold source chunks for neighbouring
tasks. :func:`region_map` instead builds one layer with one task per output chunk:

* a source opened from a helm-dask Zarr store (an untouched ``from_zarr`` array, or its reorientation by
  :mod:`helm_dask.orient`, see :func:`register_view`) is read inside the task,
  box by box, through a small per-process cache of decoded chunks (:data:`CACHE_MB`): the task has no
  dependency, so the scheduler holds nothing between tasks, and neighbouring boxes share the chunks they
  overlap instead of decoding them again;
* any other source (computed data) is pasted from the dask chunks the box overlaps, on which the task
  depends directly (no intermediate slicing tasks).

The cache is keyed by a token drawn when the layer is built, so a store rewritten later (a rerun with
other parameters) can never be served from it.

Example
-------
>>> import numpy as np, dask.array as da
>>> src = da.arange(10.0, chunks=4).reshape(10, 1, 1)
>>> def box(index, ranges):        # output chunk i <- source voxels [2i, 2i + 2)
...     (a, b), = ranges[:1]
...     return (2 * a, 0, 0), (2 * b, 1, 1), ()
>>> out = region_map(lambda regions: regions[0].reshape(-1, 2, 1, 1).mean(axis=1), [src],
...                  ((2, 2, 1), (1,), (1,)), box, np.float64)
>>> out.compute().ravel().tolist()
[0.5, 2.5, 4.5, 6.5, 8.5]
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import product
from typing import Any

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

__all__ = [
    "CACHE_MB",
    "StoreView",
    "chunk_tasks",
    "read_region",
    "region_map",
    "register_view",
    "release_cache",
    "store_view_of",
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


_CACHE = _ChunkCache(CACHE_MB * 2**20)


def _clear_local_cache() -> int:
    n = _CACHE.nbytes
    _CACHE.clear()
    return n


def release_cache() -> None:
    """Empty the chunk cache here and on every worker of the current distributed client (if any).

    Called when a volume has been written: the cached chunks belong to that computation's graph and would
    otherwise stay in every worker through the next stages (measured: ~0.5 GB per worker after a resample).
    """
    _clear_local_cache()
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):  # no distributed client: nothing else to clear
        return
    try:
        client.run(_clear_local_cache)
    except Exception:  # best effort (memory only): a closing cluster must not fail a write
        pass


def zarr_array_of(data: da.Array) -> Any:
    """The Zarr array behind an untouched ``dask.array.from_zarr`` array (as ``open_volume`` returns), else
    None (then the data is computed and must come through its dask chunks)."""
    try:
        import zarr

        orig = "original-" + data.name
        layers = data.dask.layers
        if not data.name.startswith("from-zarr") or set(layers) != {data.name, orig}:
            return None
        values = list(layers[orig].values())
        arr = values[0] if len(values) == 1 else None
        if isinstance(arr, zarr.Array) and tuple(arr.shape) == tuple(data.shape) and arr.dtype == data.dtype:
            return arr
    except Exception:  # any other graph: use the generic path
        return None
    return None


class StoreView:
    """A 3-D Zarr array seen through axis flips, then a transpose -- what :func:`helm_dask.orient.to_ras` and
    :func:`helm_dask.orient.flip_left_right` make of a stored volume -- so that a box of the view can be read
    straight from the store (the flipped box of the array, flipped and transposed back)."""

    def __init__(self, array: Any, flips: Sequence[bool] = (False, False, False), perm: Sequence[int] = (0, 1, 2)):
        self.array, self.flips, self.perm = array, tuple(bool(f) for f in flips), tuple(int(p) for p in perm)
        self.shape = tuple(int(array.shape[p]) for p in self.perm)
        self.dtype = array.dtype

    def then(self, flips: Sequence[bool], perm: Sequence[int]) -> StoreView:
        """This view flipped along its axes ``flips``, then transposed by ``perm``."""
        f = list(self.flips)
        for d, flip in enumerate(flips):
            if flip:
                f[self.perm[d]] = not f[self.perm[d]]
        return StoreView(self.array, f, [self.perm[p] for p in perm])

    def read(self, lo: Sequence[int], hi: Sequence[int], scope: str = "") -> np.ndarray:
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


_VIEWS: OrderedDict = OrderedDict()  # dask array name -> StoreView (recent ones; names are unique tokens)


def register_view(result: da.Array, source: da.Array, flips: Sequence[bool], perm: Sequence[int]) -> None:
    """Record that ``result`` is ``source`` flipped along ``flips`` then transposed by ``perm`` (3-D only), so
    that region tasks can read it from the store behind ``source`` (if any)."""
    if result.ndim != 3 or result.name == source.name:
        return
    base = store_view_of(source)
    if base is not None:
        _VIEWS[result.name] = base.then(flips, perm)
        while len(_VIEWS) > 1024:
            _VIEWS.popitem(last=False)


def store_view_of(data: da.Array) -> StoreView | None:
    """How to read ``data`` from a store: a stored volume as opened, or a registered flip/transpose of one."""
    z = zarr_array_of(data)
    if z is not None:
        return StoreView(z) if len(z.shape) == 3 else None
    view = _VIEWS.get(data.name)
    if view is not None and view.shape == tuple(data.shape) and view.dtype == data.dtype:
        return view
    return None


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
        src, dst = [], []
        for ax in range(out.ndim):
            a0, a1 = max(off[ax], lo[ax]), min(off[ax] + arr.shape[ax], hi[ax])
            src.append(slice(a0 - off[ax], a1 - off[ax]))
            dst.append(slice(a0 - lo[ax], a1 - lo[ax]))
        out[tuple(dst)] = arr[tuple(src)]
    return out


def read_region(zarr_array: Any, lo: Sequence[int], hi: Sequence[int], scope: str = "") -> np.ndarray:
    """The box ``[lo, hi)`` of a Zarr array, decoded chunk by chunk through the process's chunk cache.

    ``scope`` names the array for the cache (callers draw a fresh one per graph); an empty scope bypasses
    the cache. Every chunk is decoded whole by Zarr in any case, so the cache costs no extra decoding.
    """
    lo, hi = [int(v) for v in lo], [int(v) for v in hi]
    if not scope or _CACHE.budget <= 0:
        return np.asarray(zarr_array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    cs = zarr_array.chunks
    shape = zarr_array.shape
    idx = [range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, cs)]
    pieces, starts = [], []
    for cell in product(*idx):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, cs, shape))

        def load(box=box):
            return np.asarray(zarr_array[box])

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
        self.bounds = [[np.r_[0, np.cumsum(c)].astype(np.int64) for c in s.chunks] for s in self.sources]
        self.scopes = [f"{scope}-{i}" if cache else "" for i in range(len(self.sources))]

    def task(self, func: Callable, lo: Sequence[int], hi: Sequence[int], args: Sequence, dtype=None) -> tuple:
        lo, hi = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
        keys, starts = [], []
        for s, sb, v in zip(self.sources, self.bounds, self.views):
            if v is not None:
                keys.append([])
                starts.append([])
                continue
            cells = list(product(*_overlapping(sb, lo, hi)))
            keys.append([(s.name,) + cell for cell in cells])
            starts.append([tuple(int(sb[ax][cell[ax]]) for ax in range(len(cell))) for cell in cells])
        return (_region_task, keys, _Static((func, starts, self.views, self.scopes, lo, hi, tuple(args), dtype)))

    def dependencies(self) -> list[da.Array]:
        return [s for s, v in zip(self.sources, self.views) if v is None]


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

    Parameters
    ----------
    func : ``func(regions, *args) -> ndarray`` of the chunk's shape (cast to ``dtype``); ``regions`` holds, per
        source, the box ``[lo, hi)`` of that source as a NumPy array (do not write into it).
    sources : dask arrays of the same number of dimensions as the boxes.
    out_chunks : the output's chunks (normalised dask chunks).
    plan : ``plan(block_index, ranges) -> (lo, hi, args)``, None or a number; ``ranges`` are the chunk's
        ``(start, stop)`` per output axis. None makes the chunk zeros, a number fills it with that value,
        without reading anything.
    dtype : output dtype.
    name : prefix of the layer's name.
    cache : read store-backed sources through the chunk cache (for boxes that overlap each other).
    """
    scope = uuid.uuid4().hex
    name = f"{name}-{scope}"
    src = _Sources(sources, scope, cache)
    bounds = [np.r_[0, np.cumsum(c)].astype(np.int64) for c in out_chunks]
    dtype = np.dtype(dtype)
    layer: dict = {}
    for index in product(*(range(len(c)) for c in out_chunks)):
        ranges = tuple((int(bounds[d][i]), int(bounds[d][i + 1])) for d, i in enumerate(index))
        p = plan(index, ranges)
        if p is None or np.isscalar(p):
            layer[(name,) + index] = (_full, tuple(b - a for a, b in ranges), dtype, 0 if p is None else p)
        else:
            layer[(name,) + index] = src.task(func, *p, dtype=dtype)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=src.dependencies())
    return da.Array(graph, name, chunks=out_chunks, dtype=dtype)


def halo_box(
    ranges: Sequence[tuple[int, int]], depth: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(lo, hi)`` of a chunk's box grown by ``depth`` voxels per side, clipped to a volume of ``shape``:
    what a :func:`region_map` plan reads for a filter of that reach."""
    lo = tuple(max(0, int(a) - int(d)) for (a, _), d in zip(ranges, depth))
    hi = tuple(min(int(n), int(b) + int(d)) for (_, b), d, n in zip(ranges, depth, shape))
    return lo, hi


def pad_halo(
    box: np.ndarray,
    ranges: Sequence[tuple[int, int]],
    lo: Sequence[int],
    hi: Sequence[int],
    depth: Sequence[int],
    mode: str,
) -> np.ndarray:
    """The box read for :func:`halo_box` padded back to the chunk plus ``depth`` per side where the volume
    ended (``mode`` as ``np.pad``: ``"edge"`` = scipy's "nearest", ``"constant"`` = zeros beyond the volume)."""
    pads = [(d - (a - l), d - (h - b)) for (a, b), l, h, d in zip(ranges, lo, hi, depth)]
    if any(p for pair in pads for p in pair):
        box = np.pad(box, pads, mode=mode)
    return box


def chunk_tasks(func: Callable, sources: Sequence[da.Array], *args: Any, name: str = "chunk-task") -> list:
    """One delayed ``func(regions, *args)`` per chunk of the first source (its chunk grid; the others are
    read over the same boxes), for reductions over a volume: ``regions`` are the chunk of every source.
    Store-backed sources are read inside the task (no cache: each box is read once)."""
    from dask.delayed import Delayed

    scope = uuid.uuid4().hex
    name = f"{name}-{scope}"
    src = _Sources(sources, scope, cache=False)
    first = src.bounds[0]
    layer: dict = {}
    for index in product(*(range(len(b) - 1) for b in first)):
        lo = [int(first[d][i]) for d, i in enumerate(index)]
        hi = [int(first[d][i + 1]) for d, i in enumerate(index)]
        layer[(name,) + index] = src.task(func, lo, hi, args)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=src.dependencies())
    return [Delayed(key, graph, layer=name) for key in layer]
