"""Streaming NIfTI <-> Zarr: bit-exact round trips, exact headers, and every bad input the foundation lists."""

from __future__ import annotations

import gzip
import importlib
import os
import zlib

import nibabel as nib
import numpy as np
import pytest

from helm_dask.errors import HelmError
from helm_dask.io import convert, describe, nifti_to_zarr, open_volume, read_nifti_header, save_volume
from helm_dask.io.store import read_meta
from helm_dask.volume import make_volume

OBLIQUE = np.array([[0.0, 0.02, -0.3, 12.5], [-0.29, 0.0, 0.01, 40.0], [0.01, 0.31, 0.0, -7.25], [0.0, 0.0, 0.0, 1.0]])


def _make(shape, dtype, rng):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(100, 30, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 5000), size=shape, dtype=dtype)


def _save(tmp_path, data, name, *, version=1, sform_code=2, qform_code=1, slope=None, inter=None, intent=None):
    cls = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = cls(data, OBLIQUE)
    img.header.set_sform(OBLIQUE, sform_code)
    img.header.set_qform(OBLIQUE, qform_code)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    if intent:
        img.header.set_intent(intent)
    path = tmp_path / name
    nib.save(img, path)
    return path


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "dtype,chunks",
    [("float32", 7), ("int16", (5, 9, 16)), ("uint8", 64), ("float64", 4), ("uint16", (3, 3, 3)), ("int32", 10)],
)
def test_round_trip_bit_exact(tmp_path, ext, version, dtype, chunks):
    rng = np.random.default_rng(42)
    data = _make((13, 11, 17), dtype, rng)
    src = _save(tmp_path, data, "in" + ext, version=version)
    store = tmp_path / "v.zarr"
    convert(src, store, chunks=chunks)
    vol = open_volume(store)
    assert vol.dims == ("x", "y", "z")
    np.testing.assert_array_equal(vol.values, data)
    np.testing.assert_allclose(vol.attrs["affine"], nib.load(src).affine, rtol=0, atol=0)
    out = tmp_path / ("out" + ext)
    convert(store, out)
    back = nib.load(out)
    assert back.header.get_data_dtype() == np.dtype(dtype)
    assert np.asanyarray(back.dataobj).tobytes() == data.tobytes()
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    assert back.header.get_xyzt_units()[0] == "mm"
    assert isinstance(back, nib.Nifti2Image if version == 2 else nib.Nifti1Image)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_round_trip_4d(tmp_path, ext):
    rng = np.random.default_rng(1)
    data = _make((9, 8, 10, 4), "float32", rng)
    src = _save(tmp_path, data, "echo" + ext)
    store = tmp_path / "e.zarr"
    convert(src, store, chunks=(4, 5, 3))
    vol = open_volume(store)
    assert vol.dims == ("x", "y", "z", "echo")
    np.testing.assert_array_equal(vol.values, data)
    out = tmp_path / ("back" + ext)
    convert(store, out)
    assert np.asanyarray(nib.load(out).dataobj).tobytes() == data.tobytes()


def test_echo_select_and_combine(tmp_path):
    rng = np.random.default_rng(2)
    data = np.abs(_make((9, 8, 10, 4), "float32", rng))
    src = _save(tmp_path, data, "echo.nii.gz")
    convert(src, tmp_path / "e2.zarr", echo=2, chunks=4)
    np.testing.assert_array_equal(open_volume(tmp_path / "e2.zarr").values, data[..., 2])
    convert(src, tmp_path / "rms.zarr", echo_combine="rms", chunks=4)
    ref = np.sqrt((data.astype(np.float64) ** 2).mean(axis=3)).astype(np.float32)
    np.testing.assert_allclose(open_volume(tmp_path / "rms.zarr").values, ref, rtol=1e-6)
    convert(src, tmp_path / "mean.zarr", echo_combine="mean", chunks=(3, 8, 5))
    np.testing.assert_allclose(open_volume(tmp_path / "mean.zarr").values, data.mean(axis=3), rtol=1e-6)
    with pytest.raises(HelmError, match="out of range"):
        convert(src, tmp_path / "bad.zarr", echo=7)


def test_scaling_honoured_and_kept(tmp_path):
    rng = np.random.default_rng(3)
    data = _make((10, 9, 8), "int16", rng)
    src = _save(tmp_path, data, "scaled.nii.gz", slope=0.5, inter=-3.0)
    store = tmp_path / "s.zarr"
    convert(src, store, chunks=4)
    np.testing.assert_allclose(open_volume(store).values, data * 0.5 - 3.0, rtol=1e-6)
    out = tmp_path / "s.nii.gz"
    convert(store, out)
    back = nib.load(out)
    assert np.asanyarray(back.dataobj.get_unscaled()).tobytes() == data.tobytes()
    # nibabel moves the scaling from the header to the data proxy on load
    assert (back.dataobj.slope, back.dataobj.inter) == (0.5, -3.0)


def test_big_endian_input(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=">i2").reshape(5, 6, 7)
    img = nib.Nifti1Image(data, np.diag([0.2, 0.2, 0.2, 1]))
    img.header.set_data_dtype(">i2")
    path = tmp_path / "be.nii"
    img.to_filename(path)
    convert(path, tmp_path / "be.zarr", chunks=3)
    np.testing.assert_array_equal(open_volume(tmp_path / "be.zarr").values, data.astype("<i2"))


def test_labels_intent_and_pyramid(tmp_path):
    lab = np.zeros((150, 140, 130), np.uint16)
    lab[20:60, 30:90, 40:100] = 801
    src = _save(tmp_path, lab, "lab.nii.gz", intent="label")
    store = tmp_path / "lab.zarr"
    convert(src, store, chunks=64)
    meta = read_meta(store)
    assert meta["kind"] == "labels" and meta["nlevels"] == 2
    lvl1 = open_volume(store, level=1)
    # Labels: stride 2 (no new values); the affine steps two voxels with the first voxel's centre kept.
    np.testing.assert_array_equal(lvl1.values, lab[::2, ::2, ::2][:75, :70, :65])
    a1 = np.asarray(lvl1.attrs["affine"])
    a0 = nib.load(src).affine
    np.testing.assert_allclose(a1[:3, :3], a0[:3, :3] * 2)
    np.testing.assert_allclose(a1[:3, 3], a0[:3, 3])
    out = tmp_path / "lab_out.nii.gz"
    convert(store, out)
    assert nib.load(out).header.get_intent()[0] == "label"


def test_image_pyramid_geometry(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.random((130, 132, 128), dtype=np.float32)
    aff = np.diag([0.1, 0.1, 0.1, 1.0])
    aff[:3, 3] = [-5, 3, 7]
    out = save_volume(make_volume(img, aff), tmp_path / "p.zarr", chunks=64)
    lvl1 = open_volume(out, level=1)
    ref = img[:130, :132, :128].reshape(65, 2, 66, 2, 64, 2).astype(np.float64).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(lvl1.values, ref, rtol=1e-6)
    # The level-1 voxel (0,0,0) is the mean of fine voxels 0 and 1: its centre sits half a fine voxel further.
    np.testing.assert_allclose(np.asarray(lvl1.attrs["affine"])[:3, 3], [-5 + 0.05, 3 + 0.05, 7 + 0.05])
    np.testing.assert_allclose(float(lvl1.x[0]), -4.95)
    ome = __import__("zarr").open_group(out, mode="r").attrs["ome"]
    assert ome["version"] == "0.5"
    ds = ome["multiscales"][0]["datasets"]
    assert ds[1]["coordinateTransformations"][0]["scale"] == pytest.approx([0.2, 0.2, 0.2])


def _mean_level_numpy(a):
    """The image pyramid's rule, in NumPy: the 2x2x2 means of the float64 copy, trimmed to even sizes."""
    n = [s // 2 for s in a.shape]
    f = a[: 2 * n[0], : 2 * n[1], : 2 * n[2]].astype(np.float64)
    return (
        f.reshape(n[0], 2, n[1], 2, n[2], 2).mean(axis=(1, 3, 5)).astype(np.float32 if a.dtype.kind != "f" else a.dtype)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])
def test_image_pyramid_levels_equal_numpy_bit_for_bit(tmp_path, dtype):
    rng = np.random.default_rng(7)
    shape = (283, 70, 67)  # odd sizes: every level trims a plane somewhere
    if np.dtype(dtype).kind == "f":
        img = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 6, shape)).astype(dtype)
        img[:4] = -0.0  # NumPy's mean of -0.0s is +0.0
        img[5, 5, 5] = np.nan
    else:
        info = np.iinfo(dtype)
        img = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    out = save_volume(make_volume(img, np.eye(4)), tmp_path / "p.zarr", chunks=(37, 20, 21))
    ref = img
    assert read_meta(out)["nlevels"] >= 3
    for level in range(1, read_meta(out)["nlevels"]):
        ref = _mean_level_numpy(ref)
        got = open_volume(out, level=level).values
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), ref.view(f"u{ref.itemsize}"))  # signed zeros too


def test_coordinates_are_voxel_centres_in_mm(tmp_path):
    aff = np.diag([0.3, 0.4, 0.5, 1.0])
    aff[:3, 3] = [10, -20, 30]
    vol = make_volume(np.zeros((4, 5, 6), np.float32), aff)
    np.testing.assert_allclose(vol.x.values, 10 + 0.3 * np.arange(4))
    np.testing.assert_allclose(vol.z.values, 30 + 0.5 * np.arange(6))
    assert vol.attrs["placement"] == "exact" and vol.attrs["placement_error_mm"] == 0.0
    assert vol.x.attrs["units"] == "mm"


def test_info(tmp_path):
    src = _save(tmp_path, np.zeros((6, 7, 8), np.float32), "x.nii.gz")
    d = describe(src)
    assert d["shape"] == [6, 7, 8] and d["orientation"] == "".join(nib.aff2axcodes(OBLIQUE))
    assert d["spacing_mm"] == pytest.approx(np.sqrt((OBLIQUE[:3, :3] ** 2).sum(0)).tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one readable HelmError naming the file, no output left behind, input untouched.


def _assert_clean(tmp_path, expect_files):
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(expect_files), left


def _fails(src, dst, match, **kw):
    before = open(src, "rb").read() if os.path.isfile(src) else None
    with pytest.raises(HelmError, match=match) as ei:
        convert(src, dst, **kw)
    assert str(src) in str(ei.value) or str(dst) in str(ei.value)
    if before is not None:
        assert open(src, "rb").read() == before
    return ei.value


def test_missing_file(tmp_path):
    _fails(tmp_path / "nope.nii.gz", tmp_path / "o.zarr", "not found")
    _assert_clean(tmp_path, [])


def test_not_nifti(tmp_path):
    p = tmp_path / "notes.nii"
    p.write_text("this is not an image\n" * 40)
    _fails(p, tmp_path / "o.zarr", "not a NIfTI")
    _assert_clean(tmp_path, ["notes.nii"])


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    _fails(p, tmp_path / "o.zarr", "not a NIfTI")


@pytest.fixture(params=["isal", "zlib"])
def gzip_backend(request, monkeypatch):
    """Run a test with ISA-L's gzip (the default when installed) and with zlib's (the fallback)."""
    from helm_dask.io import nifti

    if request.param == "zlib":
        monkeypatch.setattr(nifti, "_igzip", None)
    elif nifti._igzip is None:
        pytest.skip("isal is not installed")
    return request.param


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_truncated(tmp_path, ext, gzip_backend):
    data = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    full = _save(tmp_path, data, "full" + ext)
    raw = open(full, "rb").read()
    cut = tmp_path / ("cut" + ext)
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    _fails(cut, tmp_path / "o.zarr", "truncated|could not be read", chunks=8)
    _assert_clean(tmp_path, ["full" + ext, "cut" + ext])


def test_corrupt_gzip(tmp_path, gzip_backend):
    data = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    full = _save(tmp_path, data, "full.nii.gz")
    raw = bytearray(open(full, "rb").read())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    _fails(bad, tmp_path / "o.zarr", "could not be read|truncated|corrupt", chunks=8)
    _assert_clean(tmp_path, ["full.nii.gz", "bad.nii.gz"])


def test_dims_do_not_match_file_size(tmp_path):
    data = np.zeros((10, 10, 10), np.float32)
    p = _save(tmp_path, data, "d.nii")
    raw = bytearray(open(p, "rb").read())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr.set_data_shape((10, 10, 40))
    raw[:348] = hdr.binaryblock
    p.write_bytes(bytes(raw))
    _fails(p, tmp_path / "o.zarr", "truncated")


def test_zero_voxel_size(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["pixdim"][2] = 0
    img.header.set_qform(None, 0)
    img.header.set_sform(None, 0)
    p = tmp_path / "z.nii"
    img.to_filename(p)
    raw = bytearray(open(p, "rb").read())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["pixdim"][1:4] = [1.0, 0.0, 1.0]
    raw[:348] = hdr.binaryblock
    p.write_bytes(bytes(raw))
    _fails(p, tmp_path / "o.zarr", "zero or negative voxel")


def test_singular_affine(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_qform(None, 0)
    p = tmp_path / "s.nii"
    img.to_filename(p)
    # Patch the written header: a collapsed third axis (nibabel refuses to build this itself).
    raw = bytearray(p.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["srow_z"] = [0.0, 0.0, 0.0, 0.0]
    raw[:348] = hdr.binaryblock
    p.write_bytes(bytes(raw))
    _fails(p, tmp_path / "o.zarr", "singular")


def test_5d_input(tmp_path):
    p = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4)), p)
    err = _fails(p, tmp_path / "o.zarr", "5-D")
    assert "3-D" in str(err)


def test_nonfinite(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.inf
    p = _save(tmp_path, data, "nan.nii.gz")
    _fails(p, tmp_path / "o.zarr", "has 2 NaN", chunks=4)
    _assert_clean(tmp_path, ["nan.nii.gz"])
    convert(p, tmp_path / "z.zarr", nonfinite="zero", chunks=4)
    v = open_volume(tmp_path / "z.zarr").values
    assert v[1, 2, 3] == 0 and v[4, 4, 4] == 0 and v.sum() == 510


def test_existing_output_refused(tmp_path):
    p = _save(tmp_path, np.zeros((4, 4, 4), np.float32), "a.nii.gz")
    convert(p, tmp_path / "a.zarr")
    with pytest.raises(HelmError, match="already exists") as ei:
        convert(p, tmp_path / "a.zarr")
    assert "--overwrite" in str(ei.value)
    convert(p, tmp_path / "a.zarr", overwrite=True)
    assert open_volume(tmp_path / "a.zarr").shape == (4, 4, 4)


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_batched_store_equals_one_store(tmp_path, batch):
    """Writing in boxes of output chunks (bounded memory) gives the same store as one computation, also for a
    flipped array whose chunks do not line up with the store's."""
    import dask.array as da
    import zarr

    from helm_dask.io.store import store_batched

    x = np.random.default_rng(0).normal(size=(37, 23, 30)).astype(np.float32)
    a = da.from_array(x, chunks=8)[::-1, :, ::-1] * 2 + 1  # chunks (5, 8, 8, 8, 8) ... after the flip
    y = (x[::-1, :, ::-1] * 2 + 1).astype(np.float32)
    t1 = zarr.create_array(tmp_path / "a.zarr", shape=x.shape, chunks=(8, 8, 8), dtype="f4")
    t2 = zarr.create_array(tmp_path / "b.zarr", shape=x.shape, chunks=(8, 8, 8), dtype="f4")
    store_batched([a.rechunk(8), (a > 1).astype(np.float32).rechunk(8)], [t1, t2], batch_chunks=batch)
    assert np.array_equal(t1[...], y) and np.array_equal(t2[...], (y > 1).astype(np.float32))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batched_store_writes_maps_computed_together_in_one_task_per_chunk(tmp_path, batch):
    """Maps computed together (planes of one stack, :func:`helm_dask.arrays.plane`) are computed and written in
    ONE task per chunk index, with the values ``da.store`` writes; ``upto`` writes the chunks before it only."""
    import dask
    import dask.array as da
    import zarr
    from dask.array.optimization import optimize
    from dask.utils import key_split

    from helm_dask.arrays import plane
    from helm_dask.io.store import _stored_together, store_batched

    x = np.random.default_rng(1).integers(0, 9, size=(24, 16, 20)).astype(np.uint16)
    src = da.from_array(x, chunks=8)
    stack = da.map_blocks(lambda b: np.stack([b, 2 * b, 3 * b]), src, new_axis=0, chunks=((3,), *src.chunks))
    maps = [plane(stack, i) for i in range(3)]

    def targets(tag):
        return [
            zarr.create_array(tmp_path / f"{tag}{i}.zarr", shape=x.shape, chunks=(8, 8, 8), dtype="u2")
            for i in range(3)
        ]

    got, want = targets("got"), targets("want")
    store_batched(maps, got, batch_chunks=batch)
    da.store([stack[i] for i in range(3)], want, lock=False)
    for g, w, f in zip(got, want, (1, 2, 3)):
        assert np.array_equal(g[...], w[...]) and np.array_equal(g[...], f * x)
    written = _stored_together(maps, [zarr.create_array({}, shape=x.shape, chunks=(8, 8, 8), dtype="u2")] * 3, None)
    keys = list(dask.core.flatten(written.__dask_keys__()))
    graph = optimize(written.__dask_graph__(), keys)
    computing = [k for k, t in dict(graph).items() if not isinstance(t, dask._task_spec.Alias)]
    assert len(computing) == 3 * 2 * 3 == len(keys)  # one task per chunk index: source, stack, maps and writes
    assert not {key_split(k) for k in computing} & {"plane", "getitem"}
    half = targets("half")
    store_batched(maps, half, batch_chunks=batch, upto=16)
    assert np.array_equal(half[0][:16], x[:16]) and not half[0][16:].any()
    with pytest.raises(ValueError, match="chunk boundary"):
        store_batched(maps, half, upto=12)


def test_leftovers_of_a_killed_writer_are_cleared(tmp_path):
    """A writer killed mid-way leaves `.NAME.tmp-*` (and, between the two renames, `.NAME.old-*`); the next write of
    that output removes them and leaves other outputs' temporaries alone."""
    p = _save(tmp_path, np.arange(64, dtype=np.float32).reshape(4, 4, 4), "a.nii.gz")
    (tmp_path / ".a.zarr.tmp-dead0000" / "0").mkdir(parents=True)
    (tmp_path / ".a.zarr.old-dead0000").mkdir()
    (tmp_path / ".a.zarr.tmp-dead0000.thin.zarr").mkdir()
    (tmp_path / ".b.zarr.tmp-dead0000").mkdir()
    convert(p, tmp_path / "a.zarr")
    left = sorted(q.name for q in tmp_path.iterdir() if q.name.startswith("."))
    assert left == [".b.zarr.tmp-dead0000"]
    assert np.array_equal(open_volume(tmp_path / "a.zarr").values, np.arange(64, dtype=np.float32).reshape(4, 4, 4))


def test_a_running_writers_temporaries_are_left_alone(tmp_path):
    """Temporary names record their writer (pid, host): a second writer of the same output removes only what
    killed writers left -- not the temporary of a writer that is still running, here or on another host."""
    import subprocess
    import sys
    import time

    from helm_dask.io import location

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = location._HOST
        other = "0" * 8 if host != "0" * 8 else "1" * 8
        names = {
            f".a.zarr.tmp-0123abcdp{live.pid}h{host}": True,  # running here: kept
            f".a.zarr.tmp-0123abcdp{dead.pid}h{host}": False,  # its process is gone
            f".a.zarr.tmp-0123abcdp{live.pid}h{other}": True,  # another host, recent
            f".a.zarr.old-0123abcdp{live.pid}h{other}.old": False,  # another host, a day old
            ".a.zarr.tmp-dead0000": False,
        }  # no writer recorded
        for n in names:
            (tmp_path / n).mkdir()
        old = time.time() - location.FOREIGN_WRITER_GRACE_S - 60
        os.utime(tmp_path / f".a.zarr.old-0123abcdp{live.pid}h{other}.old", (old, old))
        p = _save(tmp_path, np.arange(8, dtype=np.float32).reshape(2, 2, 2), "a.nii.gz")
        convert(p, tmp_path / "a.zarr")
        left = {q.name for q in tmp_path.iterdir() if q.name.startswith(".")}
        assert left == {n for n, keep in names.items() if keep}
        tmp = location.sibling(tmp_path / "a.zarr", ".tmp")
        assert location._TOKEN.search(tmp).group(1) == str(os.getpid())
    finally:
        live.kill()
        live.wait()


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead (cannot be created either).
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "out.zarr"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out.zarr"
    p = _save(tmp_path, np.zeros((4, 4, 4), np.float32), "a.nii.gz")
    with pytest.raises(HelmError, match="output folder"):
        convert(p, target)


def test_store_that_is_not_a_helm_volume(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("data", shape=(3,), dtype="f4")
    with pytest.raises(HelmError, match="not a helm-dask volume"):
        open_volume(tmp_path / "other.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(HelmError, match="not a Zarr"):
        open_volume(tmp_path / "plain")


def test_interrupted_store_is_refused(tmp_path):
    import zarr

    from helm_dask.io.store import write_attrs

    g = zarr.open_group(tmp_path / "half.zarr", mode="w")
    write_attrs(g, affine=np.eye(4), kind="image", name="half", nlevels=1, four_d=False, complete=False)
    with pytest.raises(HelmError, match="unfinished"):
        open_volume(tmp_path / "half.zarr")


def test_two_file_nifti_refused(tmp_path):
    img = nib.Nifti1Pair(np.zeros((3, 3, 3), np.float32), np.eye(4))
    nib.save(img, tmp_path / "pair.img")
    hdr = (tmp_path / "pair.hdr").read_bytes()
    (tmp_path / "pair.nii").write_bytes(hdr)
    _fails(tmp_path / "pair.nii", tmp_path / "o.zarr", "two-file")


def test_header_reader_reports_info(tmp_path):
    p = _save(tmp_path, np.zeros((5, 6, 7), np.int16), "h.nii.gz", version=2)
    info = read_nifti_header(p)
    assert info.version == 2 and info.gz and info.shape == (5, 6, 7) and info.sform_code == 2


def test_gzip_member_is_plain_gzip(gzip_backend):
    """Whichever library compresses, zlib reads the member back exactly; levels other than 1 are zlib's own."""
    from helm_dask.io.nifti import gzip_member

    rng = np.random.default_rng(3)
    data = (rng.integers(0, 12, size=200_000, dtype=np.uint16) * (rng.random(200_000) < 0.3)).tobytes()
    member = gzip_member(data)
    assert member[:3] == b"\x1f\x8b\x08" and member[4:8] == bytes(4)  # gzip, deflate, mtime 0
    assert zlib.decompress(member, wbits=31) == data and len(member) < len(data) // 3
    assert gzip_member(data) == member  # reproducible
    assert gzip_member(data, 6) == gzip.compress(data, compresslevel=6, mtime=0)


def test_gzip_members_are_one_stream(tmp_path, gzip_backend):
    """Our .nii.gz is ONE gzip member made of many slab parts (tests/test_nifti_single_member.py checks more)."""
    rng = np.random.default_rng(5)
    data = rng.normal(size=(30, 20, 64)).astype(np.float32)
    store = save_volume(make_volume(data, np.eye(4)), tmp_path / "m.zarr", chunks=(30, 20, 8))
    from helm_dask.io.convert import save_nifti

    out = save_nifti(open_volume(store), tmp_path / "m.nii.gz", slab_mb=0.01)
    raw = open(out, "rb").read()
    d = zlib.decompressobj(31)
    assert len(d.decompress(raw)) == 352 + data.nbytes and d.eof and d.unused_data == b""  # one member
    payload = gzip.decompress(raw)
    assert len(payload) == 352 + data.nbytes
    np.testing.assert_array_equal(nib.load(out).get_fdata(dtype=np.float32), data)


def test_provenance_extension_round_trip(tmp_path):
    from helm_dask.io.convert import save_nifti
    from helm_dask.io.nifti import read_nifti_provenance

    data = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    vol = make_volume(data, np.diag([0.3, 0.3, 0.3, 1.0]), kind="labels")
    prov = {"stage": "merge", "params": {"radius_mm": 1.2}, "inputs": {"scan.nii.gz": "ab" * 32}}
    out = save_nifti(vol, tmp_path / "l.nii.gz", provenance=prov)
    assert read_nifti_provenance(out) == prov
    img = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert img.header.get_intent()[0] == "label" and img.header.get_data_dtype() == np.uint16


@pytest.mark.parametrize("variant", ["3d", "4d", "echo", "rms", "scaled"])
def test_thin_landing_and_thin_export_paths(tmp_path, variant):
    """Tiny memory budgets force the bounded-memory paths (thin landing chunks, thin scratch copy on export)."""
    from helm_dask.io.convert import save_nifti

    rng = np.random.default_rng(7)
    shape = (12, 10, 24) + ((3,) if variant in ("4d", "echo", "rms") else ())
    dtype = "int16" if variant == "scaled" else "float32"
    data = np.abs(_make(shape, dtype, rng))
    kw = dict(slope=0.25, inter=1.0) if variant == "scaled" else {}
    src = _save(tmp_path, data, "in.nii.gz", **kw)
    store = tmp_path / "v.zarr"
    extra = {"echo": 1} if variant == "echo" else {"echo_combine": "rms"} if variant == "rms" else {}
    nifti_to_zarr(src, store, chunks=8, layer_mb=1e-4, **extra)
    got = open_volume(store).values
    if variant == "echo":
        np.testing.assert_array_equal(got, data[..., 1])
    elif variant == "rms":
        ref = np.sqrt((data.astype(np.float64) ** 2).mean(axis=3)).astype(np.float32)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    elif variant == "scaled":
        np.testing.assert_allclose(got, data * 0.25 + 1.0, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, data)
    out = tmp_path / "out.nii.gz"
    if variant in ("3d", "4d", "scaled"):
        meta_scaling = (0.25, 1.0) if variant == "scaled" else (1.0, 0.0)
        save_nifti(open_volume(store, apply_scaling=False), out, slab_mb=1e-4, scaling=meta_scaling)
        assert np.asanyarray(nib.load(out).dataobj.get_unscaled()).tobytes() == data.tobytes()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or "thin" in p.name]


@pytest.mark.parametrize("slab_mb", [1e-4, 64])
def test_export_reads_stored_views_in_the_task(tmp_path, slab_mb):
    """A stored volume seen through flips/transposes (orient.to_ras, flip_left_right) is exported from the store
    slab by slab -- through the thin scratch copy (tiny slabs) or straight from the chunks -- as NumPy's flip."""
    from helm_dask.io import regions
    from helm_dask.io.convert import save_nifti
    from helm_dask.orient import flip_left_right

    data = np.random.default_rng(4).integers(0, 9, size=(11, 9, 20)).astype(np.uint16)
    store = save_volume(
        make_volume(data, np.diag([0.5, 0.5, 0.5, 1.0]), kind="labels"), tmp_path / "s.zarr", chunks=(4, 5, 8)
    )
    vol = flip_left_right(open_volume(store))
    assert regions.store_view_of(vol.data) is not None
    out = save_nifti(vol, tmp_path / "f.nii.gz", slab_mb=slab_mb)
    img = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data[::-1])
    np.testing.assert_allclose(img.affine, np.asarray(vol.attrs["affine"]))


def test_thin_export_splits_a_stored_volume_in_boxes_of_chunks(tmp_path, monkeypatch):
    """A stored volume seen through to_ras's flips and transpose, on a chunk grid the 2 x 2 x 2 boxes do not
    divide, with an all-zero chunk: the split reads the store in one task per box, and the file holds NumPy's
    reoriented volume."""
    from helm_dask.io import regions
    from helm_dask.io.convert import save_nifti
    from helm_dask.orient import to_ras

    data = (np.random.default_rng(12).random((16, 10, 24)) * 300).astype(np.uint16)
    data[:8, :4, 8:16] = 0  # one whole stored chunk (and its scratch pieces) of zeros
    affine = np.array([[0, 0, -0.5, 9], [-0.5, 0, 0, 5], [0, 0.5, 0, -3], [0, 0, 0, 1.0]])  # not RAS: permuted
    store = save_volume(make_volume(data, affine, kind="labels"), tmp_path / "s.zarr", chunks=(8, 4, 8))
    vol = to_ras(open_volume(store))
    view = regions.store_view_of(vol.data)
    assert view is not None and view.perm != (0, 1, 2)
    expected = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj)
    boxes = []
    convert_mod = importlib.import_module("helm_dask.io.convert")
    real = convert_mod._split_stored_box
    monkeypatch.setattr(convert_mod, "_split_stored_box", lambda *a: boxes.append(a[0]) or real(*a))
    plane = vol.shape[0] * vol.shape[1] * 2
    dz = convert_mod._slab_plan(vol.data, np.dtype(np.uint16), 2.5 * plane / 2**20)[2]
    assert dz == 2 < vol.data.chunks[2][0]  # slabs thinner than the chunks: the scratch path
    out = save_nifti(vol, tmp_path / "r.nii.gz", slab_mb=2.5 * plane / 2**20)
    grid = [len(c) for c in vol.data.chunks]
    assert sorted(boxes) == sorted(
        [a, b, c] for a in range(0, grid[0], 2) for b in range(0, grid[1], 2) for c in range(0, grid[2], 2)
    )
    img = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected)
    np.testing.assert_allclose(img.affine, nib.as_closest_canonical(nib.Nifti1Image(data, affine)).affine)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or "thin" in p.name]


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_thin_export_of_a_mostly_empty_label_map(tmp_path, ext):
    """Through the thin pieces (tiny slabs), a label map whose chunks and pieces are mostly all zero (not stored
    on scratch) and a cast to another dtype are written as nibabel reads them back, in ONE gzip member."""
    import zlib

    import dask.array as da

    from helm_dask.io.convert import save_nifti

    data = np.zeros((20, 18, 33), dtype=np.int32)
    data[3:9, 11:17, 5:7] = 7  # a few non-zero pieces in one chunk column, the rest empty
    data[19, 0, 32] = 65535  # the last voxel, in a partial edge chunk
    lazy = da.from_array(data, chunks=(8, 8, 16))
    out = save_nifti(make_volume(lazy, np.eye(4), kind="labels"), tmp_path / f"m{ext}", dtype="uint16", slab_mb=1e-4)
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data.astype(np.uint16))
    if ext == ".nii.gz":
        d = zlib.decompressobj(31)
        d.decompress(open(out, "rb").read())
        assert d.eof and d.unused_data == b""
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or "thin" in p.name]


@pytest.mark.parametrize("dtype", ["uint16", "float32", "uint8"])
@pytest.mark.parametrize("four_d", [False, True])
def test_thin_export_with_pieces_several_planes_deep(tmp_path, dtype, four_d):
    """Scratch pieces 4 planes deep (the last of each edge chunk shorter), in the chunks' axis order, are placed
    into the file's order as NumPy's Fortran order of the volume: a non-square plane, partial edge chunks in
    x, y and z, one all-zero chunk, every echo of a 4-D volume."""
    import dask.array as da

    from helm_dask.io.convert import _slab_plan, save_nifti

    rng = np.random.default_rng(11)
    shape = (21, 13, 23) + ((2,) if four_d else ())
    data = (rng.random(shape) * 200).astype(dtype)
    data[8:16, :8, :8] = 0  # an all-zero chunk (not stored on scratch)
    lazy = da.from_array(data, chunks=(8, 8, 8) + ((1,) if four_d else ()))
    slab_mb = (4.5 * 21 * 13 * np.dtype(dtype).itemsize) / 2**20  # 4 planes fit, 8 do not
    assert _slab_plan(lazy, np.dtype(dtype), slab_mb)[2] == 4
    out = save_nifti(make_volume(lazy, np.eye(4)), tmp_path / "p.nii.gz", slab_mb=slab_mb)
    img = nib.load(out)
    assert img.get_data_dtype() == np.dtype(dtype)
    assert np.asanyarray(img.dataobj).tobytes(order="F") == data.tobytes(order="F")
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or "thin" in p.name]


def test_export_of_irregularly_chunked_lazy_volume(tmp_path):
    import dask.array as da

    from helm_dask.io.convert import save_nifti

    data = np.random.default_rng(3).normal(size=(10, 9, 30)).astype(np.float32)
    lazy = da.from_array(data, chunks=((4, 6), (9,), (7, 3, 12, 8)))
    out = save_nifti(make_volume(lazy, np.eye(4)), tmp_path / "irr.nii.gz", slab_mb=1e-4)
    np.testing.assert_array_equal(nib.load(out).get_fdata(dtype=np.float32), data)


def test_import_and_export_respect_a_configured_in_process_scheduler(tmp_path, monkeypatch):
    """With a distributed client open but ``dask.config`` set to an in-process scheduler, a NIfTI import and
    export run in this process (as every other computation does then): nothing is submitted to the cluster,
    and the files are the same."""
    import dask
    from distributed import Client, LocalCluster

    from helm_dask.io.convert import save_nifti

    data = np.random.default_rng(5).integers(0, 300, size=(12, 10, 27)).astype(np.uint16)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), src)

    def refuse(*a, **k):
        raise AssertionError("submitted to the cluster")

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
        dask.config.set(scheduler="synchronous"),
    ):
        monkeypatch.setattr(client, "compute", refuse)
        monkeypatch.setattr(client, "submit", refuse)
        store = nifti_to_zarr(src, tmp_path / "s.zarr", chunks=8, layer_mb=1e-4)["path"]
        out = save_nifti(open_volume(store, apply_scaling=False), tmp_path / "out.nii.gz", slab_mb=1e-4)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), data)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_batched_store_under_a_distributed_client(tmp_path, batch):
    """The same on a distributed scheduler, where consecutive batches share input keys (the flipped chunks on a
    box face) and each batch is its own graph: every batch runs and the store equals one computation, also
    when the same targets are written again (a resumed run). (At this size the scheduler forgets fast enough
    that the dask/dask#9888 race the settler guards against does not show: this covers the distributed path,
    not the race, which was reproduced at 0.2 mm only.)"""
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    from helm_dask.io.store import store_batched

    x = np.random.default_rng(1).normal(size=(30, 21, 24)).astype(np.float32)
    y = (x[::-1, :, ::-1] * 2 + 1).astype(np.float32)
    t = zarr.create_array(tmp_path / "a.zarr", shape=x.shape, chunks=(8, 8, 8), dtype="f4")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        for _ in range(2):
            t[...] = 0
            a = da.from_array(x, chunks=(7, 9, 5))[::-1, :, ::-1] * 2 + 1
            store_batched([a.rechunk(8)], [t], batch_chunks=batch)
            assert np.array_equal(t[...], y)


@pytest.mark.parametrize("batch", [1, 7])
def test_compute_batched_equals_one_computation(batch, monkeypatch):
    """Coarse block sums of a volume whose blocks do not divide its chunks (a rechunk in the graph), computed in
    boxes: bit-identical to one computation and to the NumPy sums; block_mean takes the same path."""
    import dask
    import dask.array as da

    import helm_dask.coarse as bg
    import helm_dask.io.store as store
    from helm_dask.coarse import _aligned_block_sums, block_mean
    from helm_dask.volume import make_volume

    monkeypatch.setattr(bg, "_BLOCK_TARGET", 10)  # block-sum chunks of 10 x 9 x 8 voxels: 5 x 4 x 4 of them
    x = np.random.default_rng(2).normal(size=(41, 33, 29))
    m = (np.random.default_rng(3).random(x.shape) < 0.7).astype(np.uint8)
    a = da.from_array(x, chunks=8)
    sums = [_aligned_block_sums(a, (5, 3, 4)), _aligned_block_sums(a * a, (5, 3, 4))]
    assert sums[0].numblocks == (5, 4, 4)
    got = store.compute_batched(sums, batch_chunks=batch)
    ref = dask.compute(*sums)
    assert all(np.array_equal(g, r) for g, r in zip(got, ref))
    pad = np.pad(x, [(0, 4), (0, 0), (0, 3)])
    np.testing.assert_allclose(got[0], pad.reshape(9, 5, 11, 3, 8, 4).sum(axis=(1, 3, 5)), rtol=1e-12)
    monkeypatch.setitem(store.compute_batched.__kwdefaults__, "batch_chunks", batch)
    vol, msk = make_volume(a, np.eye(4)), make_volume(da.from_array(m, chunks=(7, 9, 8)), np.eye(4), kind="mask")
    mean, frac = block_mean(vol, (5, 3, 4), mask=msk)
    xm, mm = np.pad(x * m, [(0, 4), (0, 0), (0, 3)]), np.pad(m, [(0, 4), (0, 0), (0, 3)]).astype(float)
    s, c = (v.reshape(9, 5, 11, 3, 8, 4).sum(axis=(1, 3, 5)) for v in (xm, mm))
    np.testing.assert_allclose(mean, np.divide(s, c, out=np.zeros_like(s), where=c > 0), rtol=1e-12)


def test_a_batch_meeting_the_spurious_keyerror_runs_again(tmp_path, monkeypatch):
    """dask/dask#9888: a box whose graph reaches the scheduler while it still forgets the previous box's keys fails
    with a KeyError. That box runs once more (boxes are idempotent) and the store is complete; any other error,
    or a second KeyError, propagates."""
    import dask.array as da
    import zarr

    import helm_dask.io.store as store

    x = np.random.default_rng(4).normal(size=(24, 16, 16)).astype(np.float32)
    t = zarr.create_array(tmp_path / "a.zarr", shape=x.shape, chunks=(8, 8, 8), dtype="f4")
    real, calls = store.dask.compute, {"n": 0}  # one computation per box

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("('getitem-1234', 0, 0, 0)")
        return real(*a, **kw)

    monkeypatch.setattr(store.dask, "compute", flaky)
    store.store_batched([da.from_array(x, chunks=8)], [t], batch_chunks=2)
    boxes = len(list(store.block_batches((3, 2, 2), 2)))
    assert np.array_equal(t[...], x) and boxes > 2 and calls["n"] == boxes + 1  # one box ran twice

    def always(*a, **kw):
        raise KeyError("x")

    monkeypatch.setattr(store.dask, "compute", always)
    with pytest.raises(KeyError):
        store.store_batched([da.from_array(x, chunks=8)], [t], batch_chunks=2)


def test_reversed_axes_and_slab_bytes_equal_numpy():
    """The per-plane reversal equals NumPy's 3-D transpose copy, for any strides and dtype; slab bytes are the
    Fortran-order bytes whatever the slab's memory order."""
    from helm_dask.io import nifti as nii

    rng = np.random.default_rng(3)
    for shape in [(1, 1, 1), (5, 1, 7), (3, 4, 5), (17, 9, 128), (128, 2, 3)]:
        for dtype in (np.uint8, np.uint16, np.float32, np.float64):
            base = (rng.random(tuple(2 * s for s in shape)) * 200).astype(dtype)
            for arr in (base[: shape[0], : shape[1], : shape[2]], base[::2, ::2, ::2], np.asfortranarray(base)):
                got = nii.reversed_axes(arr)
                assert got.flags.c_contiguous and got.dtype == arr.dtype
                np.testing.assert_array_equal(got, arr.transpose(2, 1, 0))
                for out_dtype in (dtype, np.float32):
                    assert nii.slab_bytes(arr, out_dtype) == arr.astype(out_dtype).tobytes(order="F")


@pytest.mark.parametrize("variant", ["3d", "4d", "rms", "ras"])
def test_thin_landing_assembled_layer_by_layer_under_a_client(tmp_path, variant, monkeypatch):
    """Under a distributed client the final chunks of each chunk layer are handed to the workers as soon as the
    stream has landed the layer (every kept echo of it; in a RAS+ import of a file whose z axis is reversed the
    layers complete from the top): one computation per layer, and the store equals the one made without a
    client (everything assembled after the stream)."""
    import importlib

    from distributed import Client, LocalCluster

    conv = importlib.import_module("helm_dask.io.convert")  # the package exports a function of the same name
    rng = np.random.default_rng(11)
    shape = (12, 10, 27) + ((3,) if variant in ("4d", "rms") else ())
    data = np.abs(_make(shape, "float32", rng))
    src = tmp_path / "in.nii.gz"
    aff = np.diag([-1.0, 1.0, -1.0, 1.0]) if variant == "ras" else np.eye(4)
    nib.save(nib.Nifti1Image(data, aff), src)
    kw = dict(chunks=8, layer_mb=1e-4, echo_combine="rms" if variant == "rms" else None, ras=variant == "ras")
    plain = open_volume(nifti_to_zarr(src, tmp_path / "plain.zarr", **kw)["path"], apply_scaling=False).values
    handed = []
    finish = conv._LayerAssembler.finish

    def counting_finish(self):
        handed.append(len(self.futures))
        finish(self)

    monkeypatch.setattr(conv._LayerAssembler, "finish", counting_finish)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        got = open_volume(nifti_to_zarr(src, tmp_path / "c.zarr", **kw)["path"], apply_scaling=False).values
    assert handed == [4]  # 27 planes in chunks of 8: four layers, each handed out before the stream ended
    assert got.dtype == plain.dtype and got.tobytes() == plain.tobytes()
    ref = np.sqrt((data.astype(np.float64) ** 2).mean(axis=3)).astype(np.float32) if variant == "rms" else data
    if variant == "ras":
        ref = ref[::-1, :, ::-1]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    assert "_landing" not in zarr_keys(tmp_path / "c.zarr")


def zarr_keys(path):
    import zarr

    return list(zarr.open_group(path, mode="r").keys())


@pytest.mark.parametrize("codec", ["zarr-default", "blosc"])
def test_dense_chunk_writes_store_what_zarr_stores(tmp_path, codec):
    """Whole-chunk writes through store_target give the same chunks (keys and bytes of the values) as plain Zarr
    writes: chunks equal to the fill value are not stored, and an older chunk so overwritten is deleted (by Zarr,
    or, for helm-dask's Blosc layout, by removing its file directly); the fast fill test agrees with Zarr's own
    (negative zero, NaN and non-zero fills, bool, ints)."""
    import dask.array as da
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.core.buffer.cpu import NDBuffer

    from helm_dask.io import direct
    from helm_dask.io.store import _fill_state, store_target

    cases = [
        (np.zeros(5, np.float32), 0.0),
        (np.array([0.0, -0.0], np.float32), 0.0),
        (np.array([1.5, 1.5]), 1.5),
        (np.array([1.5, np.nan]), np.nan),
        (np.full(3, np.nan), np.nan),
        (np.array([False, True]), False),
        (np.zeros(4, bool), False),
        (np.array([7, 7], np.uint16), 7),
        (np.array([7, 8], np.int64), 7),
        (np.zeros(3, np.uint8), 0),
    ]
    for v, fill in cases:
        state = _fill_state(v, fill)
        if state:  # never claims data where Zarr sees only the fill value
            assert not NDBuffer.from_numpy_array(v).all_equal(np.asarray(fill, v.dtype))
        elif v.dtype.kind != "f" or not np.isnan(fill):
            assert state is False  # the test applies to every fill but NaN
            assert NDBuffer.from_numpy_array(v).all_equal(np.asarray(fill, v.dtype))
    rng = np.random.default_rng(5)
    x = rng.integers(1, 9, size=(16, 12, 8)).astype(np.uint16)
    x[:8] = 0  # whole empty chunks
    x[8:, :4, :4] = 0
    for first in (np.ones_like(x), np.zeros_like(x)):
        kw = {"compressors": BloscCodec(cname="zstd", clevel=1)} if codec == "blosc" else {}
        plain = zarr.create_array(
            tmp_path / f"p{first[0, 0, 0]}.zarr", shape=x.shape, chunks=(4, 4, 4), dtype="u2", **kw
        )
        fast = zarr.create_array(
            tmp_path / f"f{first[0, 0, 0]}.zarr", shape=x.shape, chunks=(4, 4, 4), dtype="u2", **kw
        )
        assert (direct._layout(fast) is not None) == (codec == "blosc")
        plain[...], fast[...] = first, first  # a resumed run overwrites an older store
        da.store(da.from_array(x, chunks=4), plain, lock=False)
        da.store(da.from_array(x, chunks=4), store_target(fast), lock=False)
        keys = [
            sorted(p.relative_to(r).as_posix() for p in r.rglob("c/**/*") if p.is_file())
            for r in (
                tmp_path / f"p{first[0, 0, 0]}.zarr",
                tmp_path / f"f{first[0, 0, 0]}.zarr",
            )
        ]
        assert keys[0] == keys[1] and 0 < len(keys[0]) < 4 * 3 * 2
        np.testing.assert_array_equal(fast[...], x)
