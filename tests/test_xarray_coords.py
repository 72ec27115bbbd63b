"""xarray view of volumes and stores: coordinates are the OME placement (mm, with ``units``) everywhere --
make_volume, open_volume at any level, and ``xr.open_zarr`` on a store -- and volumes on one grid align
exactly while volumes on different grids do not."""

from __future__ import annotations

import subprocess
import sys
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from helm_dask.io import open_volume, save_volume
from helm_dask.volume import make_volume, placement_error_mm, spacing_of, voxel_to_world

HELM = [sys.executable, "-m", "helm_dask.cli"]


def _tilted(deg=10.0, origin=(-30.0, 12.0, 5.0), sp=(0.6, 0.8, 1.0)) -> np.ndarray:
    t = np.radians(deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = rz @ np.diag(sp), origin
    return a


def _ome_coords(store, level) -> dict:
    """scale * index + translation of one level, read from the store's OME metadata (not from helm_dask)."""
    ome = zarr.open_group(str(store), mode="r").attrs["ome"]["multiscales"][0]
    ds = ome["datasets"][level]
    scale = ds["coordinateTransformations"][0]["scale"][-3:]
    trans = ds["coordinateTransformations"][1]["translation"][-3:]
    shape = zarr.open_array(str(store), path=ds["path"], mode="r").shape[-3:]
    return {d: trans[i] + scale[i] * np.arange(shape[i]) for i, d in enumerate("xyz")}


def _open_zarr(path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either, beyond the consolidated-metadata one
        warnings.filterwarnings("ignore", message=".*consolidated metadata.*")
        return xr.open_zarr(path)


def test_axis_aligned_coordinates_are_world_mm_with_units():
    a = np.diag([0.3, 0.4, 0.5, 1.0])
    a[:3, 3] = [10, -20, 30]
    vol = make_volume(np.zeros((4, 5, 6), np.float32), a)
    # voxel centres' world positions, from the affine
    world = voxel_to_world(a, np.stack([np.arange(4), np.zeros(4), np.zeros(4)], 1))
    np.testing.assert_array_equal(vol.x.values, world[:, 0])
    assert vol.attrs["placement"] == "exact" and vol.attrs["placement_error_mm"] == 0.0
    for d in "xyz":
        assert vol[d].attrs["units"] == "mm" and "long_name" in vol[d].attrs


@pytest.mark.parametrize("level", [0, 1])
def test_tilted_coordinates_are_the_ome_placement_exact_at_the_centre(tmp_path, level):
    a = _tilted()
    out = save_volume(make_volume(da.ones((150, 40, 30), dtype="f4", chunks=64), a), tmp_path / "t.zarr")
    vol = open_volume(out, level=level)
    ome = _ome_coords(out, level)
    for d in "xyz":
        np.testing.assert_allclose(vol[d].values, ome[d], rtol=0, atol=1e-9)
        assert vol[d].attrs["units"] == "mm"
    assert vol.attrs["placement"] == "approximate"
    la = np.asarray(vol.attrs["affine"])
    assert vol.attrs["placement_error_mm"] == pytest.approx(placement_error_mm(la, vol.shape))
    # the centre voxel's coordinates are its world position (odd sizes: a voxel sits at the centre)
    c = (np.array(vol.shape) - 1) // 2
    if np.all((np.array(vol.shape) - 1) % 2 == 0):
        np.testing.assert_allclose([vol[d].values[c[i]] for i, d in enumerate("xyz")], voxel_to_world(la, [c])[0])
    # the centre of the grid is where the affine puts it, for any shape
    centre = (np.array(vol.shape) - 1) / 2
    placed = [np.interp(centre[i], np.arange(vol.shape[i]), vol[d].values) for i, d in enumerate("xyz")]
    np.testing.assert_allclose(placed, voxel_to_world(la, [centre])[0], atol=1e-9)
    np.testing.assert_allclose(np.diff(vol.x.values), spacing_of(la)[0])


@pytest.mark.parametrize("kind", ["axis-aligned", "tilted"])
def test_xr_open_zarr_opens_a_store_with_the_same_coordinates_as_open_volume(tmp_path, kind):
    a = np.diag([0.5, 0.5, 0.5, 1.0]) if kind == "axis-aligned" else _tilted()
    a[:3, 3] = [-4.0, 7.5, 2.25]
    data = np.random.default_rng(1).random((140, 20, 10), dtype=np.float32)
    out = save_volume(make_volume(da.from_array(data, chunks=64), a), tmp_path / "img.zarr")
    ds = _open_zarr(out)
    assert ds["0"].dims == ("x", "y", "z") and ds["0"].shape == data.shape
    np.testing.assert_array_equal(ds["0"].values, data)
    vol = open_volume(out)
    for d in "xyz":
        np.testing.assert_array_equal(ds[d].values, vol[d].values)
        assert ds[d].attrs["units"] == "mm"
    assert ds.attrs["helm_dask"]["ome_placement"] == vol.attrs["placement"]
    # the pyramid is not in the way (levels >= 1 live in pyramid/, which open_zarr does not descend into)
    assert list(ds.data_vars) == ["0"]
    assert open_volume(out, level=1).shape == (70, 10, 5)


def test_xr_open_zarr_on_a_four_d_store(tmp_path):
    a = np.diag([1.0, 1.0, 1.0, 1.0])
    data = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)
    out = save_volume(make_volume(da.from_array(data), a), tmp_path / "echo.zarr")
    ds = _open_zarr(out)
    assert ds["0"].dims == ("echo", "x", "y", "z")
    np.testing.assert_array_equal(ds["0"].transpose("x", "y", "z", "echo").values, data)
    np.testing.assert_array_equal(ds.x.values, [0.0, 1.0, 2.0, 3.0])


def test_align_same_grid_exact_and_different_grids_refused(tmp_path):
    a = _tilted()
    img = make_volume(da.ones((60, 30, 20), dtype="f4", chunks=32), a)
    mask = make_volume(da.ones((60, 30, 20), dtype="u1", chunks=32), a, kind="mask")
    p_img, p_mask = save_volume(img, tmp_path / "img.zarr"), save_volume(mask, tmp_path / "mask.zarr")
    x, y = xr.align(open_volume(p_img), open_volume(p_mask), join="exact")
    assert x.shape == y.shape == (60, 30, 20)
    xa, ya = xr.align(_open_zarr(p_img)["0"], _open_zarr(p_mask)["0"], join="exact")
    assert float((xa * ya).sum()) == 60 * 30 * 20
    # another grid (shifted by a third of a voxel): no coordinate in common
    b = a.copy()
    b[:3, 3] += a[:3, :3] @ [1 / 3, 0, 0]
    p_other = save_volume(make_volume(da.ones((60, 30, 20), dtype="f4", chunks=32), b), tmp_path / "other.zarr")
    with pytest.raises(ValueError):
        xr.align(open_volume(p_img), open_volume(p_other), join="exact")
    inner = xr.align(open_volume(p_img), open_volume(p_other), join="inner")
    assert inner[0].size == 0  # nothing in common: inner alignment of different grids is empty, not an error


@pytest.mark.slow
@pytest.mark.e2e
def test_align_two_outputs_of_one_run(tmp_path):
    ph = tmp_path / "ph"
    subprocess.run([*HELM, "phantom", str(ph), "--spacing", "1.0", "--quiet", "--workers", "1"], check=True)
    cmd = [*HELM, "run", str(ph / "scan.nii.gz"), "--hypothalamus", str(ph / "hypothalamus.nii.gz")]
    cmd += ["--out", str(tmp_path / "out"), "--spacing", "native", "--until", "preprocess", "--no-qc", "--no-nifti"]
    subprocess.run([*cmd, "--scheduler", "threads", "--quiet"], check=True)
    store = next((tmp_path / "out").glob("*/helm.zarr"))
    pre, mask = open_volume(store / "preprocessed"), open_volume(store / "mask")
    x, y = xr.align(pre, mask, join="exact")  # one working grid: same coordinates to the bit
    assert x.shape == pre.shape
    ds_pre, ds_mask = _open_zarr(store / "preprocessed"), _open_zarr(store / "mask")
    xr.align(ds_pre, ds_mask, join="exact")
    brain_mean = float(ds_pre["0"].where(ds_mask["0"] > 0).mean())
    assert brain_mean == pytest.approx(float(pre.data[mask.data > 0].mean().compute()), rel=1e-6)
    # the scan's own grid is another grid: exact alignment refuses (resample first)
    if open_volume(store / "scan_raw").shape != pre.shape or not np.array_equal(
        open_volume(store / "scan_raw").x.values, pre.x.values
    ):
        with pytest.raises(ValueError):
            xr.align(open_volume(store / "scan_raw"), pre, join="exact")
