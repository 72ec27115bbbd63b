"""Region tasks (helm_dask.io.regions): boxes read from stores or pasted from chunks equal NumPy slicing."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from helm_dask.io import regions
from helm_dask.io.store import open_volume, save_volume
from helm_dask.volume import make_volume

SHAPE = (23, 17, 12)
SHIFT = np.array([3, -2, 1])  # output voxel i <- source voxel i + SHIFT (clipped), read with a margin
MARGIN = 2


def reference(src: np.ndarray) -> np.ndarray:
    idx = [np.clip(np.arange(n) + s, 0, n - 1) for n, s in zip(src.shape, SHIFT)]
    return src[np.ix_(*idx)]


def shifted(regions_, lo, ranges):
    """The output chunk ``ranges`` from the box starting at ``lo`` (margin included)."""
    idx = [np.clip(np.arange(a, b) + s, 0, n - 1) - l for (a, b), s, n, l in zip(ranges, SHIFT, SHAPE, lo)]
    return regions_[0][np.ix_(*idx)].astype(np.float64)


def plan(index, ranges):
    lo = [max(0, a + s - MARGIN) for (a, b), s in zip(ranges, SHIFT)]
    hi = [min(n, b + s + MARGIN) for (a, b), s, n in zip(ranges, SHIFT, SHAPE)]
    lo = [min(a, n - 1) for a, n in zip(lo, SHAPE)]
    hi = [max(h, a + 1) for h, a in zip(hi, lo)]
    return lo, hi, (lo, ranges)


@pytest.fixture
def volume():
    return np.random.default_rng(3).random(SHAPE).astype(np.float32)


@pytest.fixture
def stored(tmp_path, volume):
    def make(chunks, name="v.zarr"):
        vol = make_volume(da.from_array(volume, chunks=chunks), np.eye(4))
        return open_volume(save_volume(vol, tmp_path / name, pyramid=False, chunks=chunks)).data

    return make


@pytest.mark.parametrize("src_chunks", [(5, 4, 3), (23, 17, 12), (8, 16, 5)])
@pytest.mark.parametrize("out_chunks", [(4, 5, 6), (23, 17, 12), (1, 17, 2)])
@pytest.mark.parametrize("backed", [True, False])
def test_region_map_equals_numpy(volume, stored, src_chunks, out_chunks, backed):
    src = stored(src_chunks) if backed else da.from_array(volume, chunks=src_chunks)
    assert (regions.zarr_array_of(src) is not None) == backed
    chunks = da.core.normalize_chunks(out_chunks, SHAPE)
    out = regions.region_map(shifted, [src], chunks, plan, np.float64)
    layer_deps = out.__dask_graph__().dependencies[out.name]
    assert (len(layer_deps) == 0) == backed  # store-backed: the tasks read the store themselves
    np.testing.assert_array_equal(out.compute(), reference(volume).astype(np.float64))


def test_cache_shares_chunks_between_overlapping_boxes_and_stays_in_budget(volume, stored, monkeypatch):
    src = stored((6, 6, 6))
    cache = regions._ChunkCache(8 * 6**3 * 4)  # room for eight chunks only
    monkeypatch.setattr(regions, "_CACHE", cache)
    chunks = da.core.normalize_chunks((3, 3, 3), SHAPE)
    out = regions.region_map(shifted, [src], chunks, plan, np.float64)
    np.testing.assert_array_equal(out.compute(scheduler="synchronous"), reference(volume))
    assert cache.hits > cache.misses > 0 and cache.nbytes <= cache.budget and len(cache.items) <= 8
    # without the cache every box decodes its chunks itself: the same values
    out = regions.region_map(shifted, [src], chunks, plan, np.float64, cache=False)
    hits = cache.hits
    np.testing.assert_array_equal(out.compute(scheduler="synchronous"), reference(volume))
    assert cache.hits == hits


def test_rewritten_store_is_never_served_from_the_cache(tmp_path, volume):
    """A store rewritten in place (a rerun with other parameters) is read anew by the next graph."""
    path = tmp_path / "v.zarr"
    chunks = da.core.normalize_chunks((5, 5, 5), SHAPE)
    for scale in (1.0, 2.0):
        vol = make_volume(da.from_array(volume * scale, chunks=6), np.eye(4))
        src = open_volume(save_volume(vol, path, pyramid=False, chunks=6, overwrite=True)).data
        out = regions.region_map(shifted, [src], chunks, plan, np.float64)
        np.testing.assert_array_equal(out.compute(scheduler="synchronous"), reference(volume * scale))


def test_regions_are_private_copies(volume, stored):
    """A task may write into its region: the cached chunk stays intact."""
    src = stored((23, 17, 12))  # one chunk: the box is exactly the cached chunk

    def scribble(regions_, lo, ranges):
        r = regions_[0]
        out = shifted(regions_, lo, ranges)
        r[...] = -1.0
        return out

    chunks = da.core.normalize_chunks((23, 17, 12), SHAPE)
    for _ in range(2):
        out = regions.region_map(scribble, [src], chunks, lambda i, r: ((0, 0, 0), SHAPE, ((0, 0, 0), r)), np.float64)
        np.testing.assert_array_equal(out.compute(scheduler="synchronous"), reference(volume))


def test_empty_plan_gives_zeros_without_reading(volume):
    src = da.from_array(volume, chunks=5)
    chunks = da.core.normalize_chunks((10, 17, 12), SHAPE)
    out = regions.region_map(shifted, [src], chunks, lambda i, r: None if i[0] == 1 else plan(i, r), np.float32)
    got = out.compute()
    assert got.dtype == np.float32 and np.all(got[10:20] == 0)
    np.testing.assert_array_equal(got[:10], reference(volume)[:10])
    np.testing.assert_array_equal(got[20:], reference(volume)[20:])


def test_a_number_as_plan_fills_the_chunk_without_reading(volume):
    read = []

    def load(block, block_info=None):
        read.append(block_info[0]["chunk-location"])
        return block

    src = da.from_array(volume, chunks=5)
    src = src.map_blocks(load, dtype=src.dtype)
    chunks = da.core.normalize_chunks((10, 17, 12), SHAPE)
    out = regions.region_map(shifted, [src], chunks, lambda i, r: 7 if i[0] == 1 else None, np.uint8)
    got = out.compute(scheduler="synchronous")
    assert got.dtype == np.uint8 and np.all(got[10:20] == 7) and not got[:10].any() and not got[20:].any()
    assert read == []


@pytest.mark.parametrize("mask_chunks", [(5, 4, 3), (9, 17, 12)])
@pytest.mark.parametrize("backed", [True, False])
def test_chunk_tasks_cover_the_first_sources_grid(volume, stored, mask_chunks, backed):
    mask = (volume > 0.3).astype(np.uint8)
    img = stored((5, 4, 3)) if backed else da.from_array(volume, chunks=(5, 4, 3))
    msk = da.from_array(mask, chunks=mask_chunks)

    def masked_sum(regions_, scale):
        a, m = regions_
        assert a.shape == m.shape
        return np.array([float(a[m != 0].astype(np.float64).sum()) * scale, a.size])

    parts = regions.chunk_tasks(masked_sum, [img, msk], 2.0)
    assert len(parts) == img.npartitions
    got = np.sum(dask.compute(*parts), axis=0)
    assert got[1] == volume.size
    np.testing.assert_allclose(got[0], 2.0 * volume[mask != 0].astype(np.float64).sum(), rtol=1e-12)


def test_store_views_read_flipped_and_transposed_boxes(volume, stored):
    """A stored volume flipped and transposed (twice, composed) reads any box as NumPy indexing does; dask
    arrays built by helm_dask.orient from a store are recognised as such views."""
    import itertools

    from helm_dask.orient import flip_left_right, to_ras

    z = regions.zarr_array_of(stored((5, 4, 3)))
    rng = np.random.default_rng(5)
    for perm1, perm2 in [((0, 1, 2), (2, 0, 1)), ((1, 2, 0), (0, 2, 1)), ((2, 1, 0), (1, 0, 2))]:
        for f1, f2 in itertools.islice(
            itertools.product(itertools.product([False, True], repeat=3), repeat=2), 0, 64, 9
        ):
            view = regions.StoreView(z).then(f1, perm1).then(f2, perm2)
            ref = volume[tuple(slice(None, None, -1) if f else slice(None) for f in f1)].transpose(perm1)
            ref = ref[tuple(slice(None, None, -1) if f else slice(None) for f in f2)].transpose(perm2)
            assert view.shape == ref.shape
            lo = [int(rng.integers(0, n - 1)) for n in ref.shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, ref.shape)]
            np.testing.assert_array_equal(view.read(lo, hi, "t"), ref[tuple(slice(a, b) for a, b in zip(lo, hi))])
    # orient's reorientation of a stored volume (LPI-like affine) is such a view; computed data is not
    vol = make_volume(stored((5, 4, 3), "w.zarr"), np.diag([-1.0, -2.0, 1.5, 1.0])[[1, 0, 2, 3]])
    ras = flip_left_right(to_ras(vol))
    view = regions.store_view_of(ras.data)
    assert view is not None
    np.testing.assert_array_equal(view.read((0, 0, 0), ras.shape), ras.values)
    assert regions.store_view_of(ras.data + 1) is None


def test_releasing_the_chunk_caches_empties_them(tmp_path, volume, stored):
    """The cached chunks of a computation's box tasks are dropped by release_chunk_caches (the stage runner
    calls it after each stage; writing a volume no longer reaches into the cluster)."""
    src = stored((6, 6, 6))
    chunks = da.core.normalize_chunks((3, 3, 3), SHAPE)
    out = regions.region_map(shifted, [src], chunks, plan, np.float64)
    out.compute(scheduler="synchronous")
    assert regions._CACHE.nbytes > 0
    save_volume(make_volume(out, np.eye(4)), tmp_path / "out.zarr", pyramid=False)
    regions.release_chunk_caches()
    assert regions._CACHE.nbytes == 0 and not regions._CACHE.items
    np.testing.assert_array_equal(open_volume(tmp_path / "out.zarr").values, reference(volume))


def _float_sum(block, offset):
    """A float32 partial whose combine below is not associative: the tree's shape shows in the last bits."""
    return np.float32(block.astype(np.float32).sum() * np.float32(1.1) + np.float32(offset[0]) * np.float32(0.7))


def _float_combine(*parts):
    out = np.float32(0.3)
    for p in parts:
        out = np.float32(out * np.float32(0.999) + p)
    return out


def _where_max(block, offset):
    """Exact whatever the layout: the largest value and its index in the whole volume."""
    i = np.unravel_index(int(np.argmax(block)), block.shape)
    return float(block[i]), tuple(int(a + b) for a, b in zip(i, offset))


def _max_combine(*parts):
    return max(parts) if parts else None


@pytest.mark.parametrize("view", ["as stored", "to_ras"])
def test_block_reduce_of_a_stored_volume_reads_the_store_and_keeps_the_tree(tmp_path, view):
    """On a stored volume, block_reduce gives the value of the per-chunk tree to the bit, with an order-sensitive
    float combine, on 3 x 2 x 3 = 18 chunks (not a multiple of the fan-in): its first level is one task per
    fan-in of consecutive chunks, reading the store itself. Through to_ras's flips and transpose it reads the
    store only for a function that does not depend on the layout (``any_layout``), here an exact maximum."""
    import importlib

    from helm_dask.arrays import block_reduce, block_tasks, tree_reduce
    from helm_dask.orient import to_ras

    data = (np.random.default_rng(3).random((16, 10, 24)) * 1000).astype(np.float32)
    affine = np.array([[0, 0, -0.5, 9], [-0.5, 0, 0, 5], [0, 0.5, 0, -3], [0, 0, 0, 1.0]])
    vol = open_volume(save_volume(make_volume(data, affine), tmp_path / "v.zarr", chunks=(8, 4, 8)))
    if view == "to_ras":
        vol = to_ras(vol)
        assert regions.store_view_of(vol.data).perm != (0, 1, 2)
    arr = vol.data
    assert regions.store_view_of(arr) is not None and arr.npartitions == 18
    calls: list = []
    arrays_mod = importlib.import_module("helm_dask.arrays")
    real = arrays_mod._reduce_stored

    def run(fn, combine, fan_in, **kw):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(arrays_mod, "_reduce_stored", lambda *a: calls.append(len(a[1])) or real(*a))
            got = dask.compute(block_reduce(arr, fn, combine, fan_in=fan_in, **kw), scheduler="sync")[0]
        ref = dask.compute(tree_reduce(block_tasks(arr, fn), combine, fan_in), scheduler="sync")[0]
        return got, ref

    grouped = [sorted([f] * (18 // f) + [18 % f]) for f in (8, 4)]
    for fan_in, first_level in zip((8, 4), grouped):
        got, ref = run(_float_sum, _float_combine, fan_in)
        assert got.tobytes() == ref.tobytes()
        assert sorted(calls) == (first_level if view == "as stored" else [])
        got, ref = run(_where_max, _max_combine, fan_in, any_layout=True)
        assert (
            got == ref == (float(data.max()), tuple(int(i) for i in np.unravel_index(np.argmax(vol.values), vol.shape)))
        )
        assert sorted(calls) == first_level
    # a computed volume keeps the per-chunk tasks
    lazy = arr + 0
    assert regions.store_view_of(lazy) is None
    got = block_reduce(lazy, _float_sum, _float_combine).compute(scheduler="sync")
    assert (
        got.tobytes() == tree_reduce(block_tasks(lazy, _float_sum), _float_combine).compute(scheduler="sync").tobytes()
    )
