"""Direct chunk reads (helm_dask.io.direct) return what Zarr returns, on the layouts helm-dask writes and on the
ones it falls back for."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from helm_dask.io import direct
from helm_dask.io.store import open_volume, save_volume
from helm_dask.volume import make_volume


def _array(tmp_path, dtype, shape=(37, 29, 23), chunks=(16, 8, 10), compressors="blosc", fill=0, sparse=True):
    rng = np.random.default_rng(3)
    data = (rng.random(shape) * 300).astype(dtype)
    if sparse:
        data[16:32, :8] = fill  # whole chunks equal to the fill value: not stored
    comp = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle") if compressors == "blosc" else compressors
    z = zarr.create_array(
        store=str(tmp_path / f"a_{np.dtype(dtype).name}.zarr"),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=comp,
        fill_value=fill,
    )
    z[:] = data
    return zarr.open_array(str(tmp_path / f"a_{np.dtype(dtype).name}.zarr"), mode="r"), data


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64", "bool"])
def test_every_chunk_and_box_is_zarrs(tmp_path, dtype):
    z, data = _array(tmp_path, dtype)
    assert direct._layout(z) is not None  # the direct path, not the fallback
    for cell in np.ndindex(*[-(-s // c) for s, c in zip(z.shape, z.chunks)]):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, z.chunks, z.shape))
        got = direct.read_chunk(z, cell)
        assert got.flags.c_contiguous and got.flags.writeable and got.dtype == z.dtype
        np.testing.assert_array_equal(got, data[box])
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo = [int(rng.integers(0, s)) for s in z.shape]
        hi = [int(rng.integers(a, s + 1)) for a, s in zip(lo, z.shape)]
        got = direct.read_box(z, lo, hi)
        np.testing.assert_array_equal(got, data[tuple(slice(a, b) for a, b in zip(lo, hi))])


def test_missing_chunks_take_the_fill_value(tmp_path):
    z, data = _array(tmp_path, "float32", fill=-1.5)
    chunk_files = {p.relative_to(tmp_path) for p in tmp_path.rglob("c/*/*/*")}
    n_cells = int(np.prod([-(-s // c) for s, c in zip(z.shape, z.chunks)]))
    assert len(chunk_files) < n_cells  # some chunks are not stored
    np.testing.assert_array_equal(direct.read_box(z, (0, 0, 0), z.shape), data)
    assert (direct.read_chunk(z, (1, 0, 0)) == -1.5).all()


def test_other_layouts_fall_back_to_zarr(tmp_path):
    z, data = _array(tmp_path, "uint16", compressors=ZstdCodec(level=1))
    assert direct._layout(z) is None
    np.testing.assert_array_equal(direct.read_box(z, (3, 2, 1), (30, 20, 19)), data[3:30, 2:20, 1:19])
    mem = zarr.create_array(store={}, shape=(5, 4), chunks=(2, 3), dtype="u2")
    mem[:] = np.arange(20).reshape(5, 4)
    assert direct._layout(mem) is None
    np.testing.assert_array_equal(direct.read_chunk(mem, (2, 1)), [[19]])


def test_direct_array_in_dask_equals_from_zarr(tmp_path):
    z, data = _array(tmp_path, "uint16")
    wrapped = direct.DirectArray(z)
    assert pickle.loads(pickle.dumps(wrapped)).shape == z.shape
    for chunks in (z.chunks, (32, 16, 20), (5, 7, 9)):
        arr = da.from_array(wrapped, chunks=chunks, meta=np.empty((0, 0, 0), z.dtype))
        np.testing.assert_array_equal(arr.compute(scheduler="sync"), data)
    np.testing.assert_array_equal(wrapped[::2, 3, 1:9], data[::2, 3, 1:9])  # other indexes: Zarr's


def test_zarr_arrays_in_task_arguments_are_built_once_per_process(tmp_path):
    """The objects that carry a Zarr array into tasks unpickle, message after message, as one object per process
    that reads what the array holds; an array rewritten with other metadata is a new object, never the cached
    one; the cache stays bounded."""
    from helm_dask.io.regions import StoreView
    from helm_dask.io.store import store_target

    z, data = _array(tmp_path, "uint16")
    view = StoreView(z, flips=(True, False, False), perm=(1, 0, 2))
    target = store_target(z)
    for obj in (direct.DirectArray(z), view, target):
        first, second = pickle.loads(pickle.dumps(obj)), pickle.loads(pickle.dumps([obj]))[0]
        assert first is second and first is not obj and type(first) is type(obj)
    got = pickle.loads(pickle.dumps(view))
    np.testing.assert_array_equal(got.read((0, 0, 0), got.shape), data[::-1].transpose(1, 0, 2))
    assert pickle.loads(pickle.dumps(target)).fault == target.fault

    # the same path rewritten with another shape: a new pickle, a new object with the new metadata
    path = str(tmp_path / "a_uint16.zarr")
    z2 = zarr.create_array(store=path, shape=(5, 4, 3), chunks=(5, 4, 3), dtype="uint16", overwrite=True)
    z2[...] = 7
    again = pickle.loads(pickle.dumps(direct.DirectArray(z2)))
    assert again.shape == (5, 4, 3) and int(again[...].max()) == 7

    many = [direct.DirectArray(z) for _ in range(direct._SHARED_MAX + 10)]
    for m in many:
        pickle.loads(pickle.dumps(m))
    assert len(direct._SENT) <= direct._SHARED_MAX and len(direct._RECEIVED) <= direct._SHARED_MAX


def test_stored_volume_reads_the_same_through_dask(tmp_path):
    """A helm-dask store (its level 0 and a pyramid level) opens onto the direct reads, values unchanged."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 9, size=(140, 50, 40)).astype(np.uint16)
    store = save_volume(make_volume(data, np.eye(4), kind="labels"), tmp_path / "v.zarr", chunks=(32, 32, 32))
    vol = open_volume(store)
    np.testing.assert_array_equal(vol.values, data)
    np.testing.assert_array_equal(open_volume(store, level=1).values, data[::2, ::2, ::2])


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "bool"])
def test_direct_chunk_writes_are_zarrs_bytes(tmp_path, dtype):
    """write_chunk stores the bytes Zarr stores for the same whole chunk (edge chunks padded with the fill value),
    through store_target as the stages write; other keys and layouts are left to Zarr."""
    from helm_dask.io.store import store_target

    shape, chunks = (37, 29, 23), (16, 8, 10)
    rng = np.random.default_rng(9)
    data = (rng.random(shape) * 300).astype(dtype)
    kw = {"compressors": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=2**19), "fill_value": 0}
    ref = zarr.create_array(str(tmp_path / "ref.zarr"), shape=shape, chunks=chunks, dtype=dtype, **kw)
    ours = zarr.create_array(str(tmp_path / "ours.zarr"), shape=shape, chunks=chunks, dtype=dtype, **kw)
    ref[...] = data
    da.store(da.from_array(data, chunks=chunks), store_target(ours), lock=False)
    files = {
        name: {p.relative_to(tmp_path / name).as_posix(): p.read_bytes() for p in (tmp_path / name).rglob("c/*/*/*")}
        for name in ("ref.zarr", "ours.zarr")
    }
    assert files["ref.zarr"] == files["ours.zarr"] and files["ref.zarr"]
    assert not list(tmp_path.rglob("*.partial"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr"), mode="r")[...], data)
    assert not direct.write_chunk(ours, (slice(0, 8), slice(0, 8), slice(0, 10)), data[:8, :8, :10])  # half a chunk
    assert not direct.write_chunk(ours, (slice(0, 16), slice(0, 8), slice(0, 10)), data[:16, :8, :10].astype("f8"))


def test_slab_writes_chunk_by_chunk_are_zarrs(tmp_path):
    """store.write_chunks (the import's landing writes: whole planes of an echo, one slab at a time) stores the
    chunks a plain Zarr write of the same slabs stores, byte for byte: the fill-valued chunks left out, the edge
    chunks padded, an integer index as a one-wide slice; a slab off the chunk grid is Zarr's to write."""
    from helm_dask.io.store import write_chunks

    shape, chunks = (2, 37, 29, 23), (1, 16, 8, 4)
    rng = np.random.default_rng(4)
    data = rng.normal(size=shape).astype("float32")
    data[:, :16, :8, :] = 0  # whole chunks of the fill value
    kw = {"compressors": BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", blocksize=2**19), "fill_value": 0}
    ref = zarr.create_array(str(tmp_path / "ref.zarr"), shape=shape, chunks=chunks, dtype="float32", **kw)
    ours = zarr.create_array(str(tmp_path / "ours.zarr"), shape=shape, chunks=chunks, dtype="float32", **kw)
    for t in range(2):
        for z0 in range(0, 23, 8):  # slabs of two chunk layers, the last one short
            key = (t, slice(None), slice(None), slice(z0, min(z0 + 8, 23)))
            ref[key] = data[key]
            write_chunks(ours, key, data[key])
    files = {
        name: {p.relative_to(tmp_path / name).as_posix(): p.read_bytes() for p in (tmp_path / name).rglob("c/*/*/*/*")}
        for name in ("ref.zarr", "ours.zarr")
    }
    assert files["ref.zarr"] == files["ours.zarr"]
    assert "c/0/0/0/0" not in files["ours.zarr"] and "c/1/2/3/5" in files["ours.zarr"]
    write_chunks(ours, (0, slice(3, 20), slice(None), slice(1, 6)), np.ones((17, 29, 5), "float32"))  # off the grid
    write_chunks(ours, (-1, slice(None), slice(None), slice(20, 23)), np.full((37, 29, 3), 2, "float32"))
    with pytest.raises(IndexError):  # as Zarr refuses it
        write_chunks(ours, (2, slice(None), slice(None), slice(0, 4)), np.ones((37, 29, 4), "float32"))
    expect = data.copy()
    expect[0, 3:20, :, 1:6] = 1
    expect[1, :, :, 20:23] = 2
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr"), mode="r")[...], expect)
