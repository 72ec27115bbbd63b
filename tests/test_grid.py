"""The working grid (``run --grid ras|scan``) and the RAS+ voxel order of imported volumes.

The RAS+ grid of a tilted scan against its geometry (axis-aligned, covering the rotated field of view) and against
the scan's grid for a scan that is not tilted (the same grid, so the same outputs); the anti-aliased resampling and
the 3-D majority vote onto any grid against whole-array references written independently (world coordinates,
``scipy.ndimage``); the import's RAS+ order against nibabel's ``as_closest_canonical`` and every voxel's world
position; ``helm.zarr`` as a Zarr group; and whole runs with each grid on a tilted template phantom.
"""

from __future__ import annotations

import itertools
import json

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from helm_dask import resample as rs
from helm_dask.errors import HelmError
from helm_dask.io.convert import nifti_to_zarr
from helm_dask.io.store import open_volume
from helm_dask.orient import ras_grid, to_ras
from helm_dask.pipeline.steps import working_grid
from helm_dask.resample import (
    FWHM_TO_SIGMA,
    grid_antialias_sigma,
    is_ras_aligned,
    ras_target_grid,
    resample,
    resample_labels,
    resample_labels_to_grid,
    resample_to_grid,
    target_grid,
)
from helm_dask.volume import affine_of, make_volume, spacing_of


def _rotation(deg: float, axis) -> np.ndarray:
    """Rotation by ``deg`` degrees about a unit ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    t = np.deg2rad(deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _affine(spacing, rot=None, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = (np.eye(3) if rot is None else rot) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _corners(shape, affine, edge: bool) -> np.ndarray:
    """World positions of the 8 corners: outer voxel edges (``edge``) or the corner voxels' centres."""
    lo, d = (-0.5, 0.5) if edge else (0.0, 1.0)
    n = np.asarray(shape[:3]) - d
    pts = np.array(list(itertools.product(*[(lo, n[i]) for i in range(3)])))
    return pts @ affine[:3, :3].T + affine[:3, 3]


# ---------------------------------------------------------------------------------------------------- the grids


@pytest.mark.parametrize("spacing", [0.3, 0.5, 0.25, [0.3, 0.4, 0.5], "native"])
@pytest.mark.parametrize(
    "shape, vox", [((25, 31, 17), (0.1, 0.1, 0.1)), ((40, 33, 21), (0.12, 0.15, 0.2)), ((7, 9, 11), (1.0, 1.0, 1.0))]
)
def test_ras_grid_is_the_scan_grid_for_an_axis_aligned_scan(shape, vox, spacing):
    a = _affine(vox)
    a[0, 1] = 1e-9  # float32 header noise does not count as a tilt
    ref_shape, ref_aff = (shape, a) if spacing == "native" else target_grid(shape, a, spacing)
    got_shape, got_aff = ras_target_grid(shape, a, spacing)
    assert tuple(got_shape) == tuple(ref_shape)
    assert np.array_equal(got_aff, ref_aff)  # exactly: block means apply, outputs are bit-identical
    vol = make_volume(da.zeros(shape, chunks=8), a)
    assert working_grid(vol, spacing, "ras")[2] and working_grid(vol, spacing, "scan")[2]


@pytest.mark.parametrize("deg, axis", [(12.0, (0, 0, 1)), (12.0, (1, 2, 3)), (30.0, (1, 0, 0)), (0.5, (0, 1, 1))])
def test_ras_grid_covers_the_rotated_field_of_view(deg, axis):
    shape, vox, s_new = (60, 45, 30), (0.1, 0.12, 0.15), 0.3
    a = _affine(vox, _rotation(deg, axis))
    assert not is_ras_aligned(a)
    new_shape, new_aff = ras_target_grid(shape, a, s_new)
    assert is_ras_aligned(new_aff) and np.array_equal(new_aff[:3, :3], np.diag([s_new] * 3))
    fov = _corners(shape, a, edge=True)
    lo, hi = fov.min(axis=0), fov.max(axis=0)
    grid = _corners(new_shape, new_aff, edge=True)
    g_lo, g_hi = grid.min(axis=0), grid.max(axis=0)
    assert np.all(g_lo <= lo + 1e-9) and np.all(g_hi >= hi - 1e-9)  # covers every corner of the field of view
    assert np.all((g_hi - g_lo) - (hi - lo) < s_new + 1e-9)  # by less than one voxel more
    assert np.allclose((g_lo + g_hi) / 2, (lo + hi) / 2)  # centred on it
    vol = make_volume(da.zeros(shape, chunks=16), a)
    ws_shape, ws_aff, on_scan = working_grid(vol, s_new, "ras")
    assert not on_scan and ws_shape == new_shape and np.array_equal(ws_aff, new_aff)
    scan_shape, scan_aff, on_scan = working_grid(vol, s_new, "scan")
    ref_shape, ref_aff = target_grid(shape, a, s_new)
    assert on_scan and scan_shape == ref_shape and np.array_equal(scan_aff, ref_aff)


@pytest.mark.parametrize("spacing", ["native", 0.25, [0.2, 0.3, 0.25]])
def test_ras_grid_cut_to_the_content_loses_nothing(spacing):
    """The tilted scan's RAS grid cut to the brain (mask and labels) plus the resampling's reach: the same voxel
    centres as the whole grid, and the whole grid's outputs hold nothing nonzero outside the cut."""
    rng = np.random.default_rng(3)
    shape = (44, 38, 30)
    a_in = _affine((0.1, 0.1, 0.1), _rotation(14, (1, 2, 3)))
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mask = ((ii - 16) / 10.0) ** 2 + ((jj - 20) / 12.0) ** 2 + ((kk - 14) / 8.0) ** 2 <= 1.0
    labels = np.zeros(shape, np.uint16)
    labels[24:29, 18:22, 12:15] = 801  # partly outside the mask: it must stay inside the cut too
    img = (rng.random(shape) * 100 + 50).astype(np.float32)
    vm = make_volume(da.from_array(mask, chunks=(16, 13, 11)), a_in, kind="mask")
    vl = make_volume(da.from_array(labels, chunks=(16, 13, 11)), a_in, kind="labels")
    vi = make_volume(da.from_array(img, chunks=(16, 13, 11)), a_in)
    full_shape, full_aff, on_scan = working_grid(vi, spacing, "ras")
    cut_shape, cut_aff, _ = working_grid(vi, spacing, "ras", (vm, vl))
    assert not on_scan and np.prod(cut_shape) < (0.6 if spacing == "native" else 0.9) * np.prod(full_shape)
    s = spacing_of(full_aff)
    np.testing.assert_array_equal(cut_aff[:3, :3], full_aff[:3, :3])
    off = np.round((cut_aff[:3, 3] - full_aff[:3, 3]) / s).astype(int)
    np.testing.assert_allclose(full_aff[:3, 3] + off * s, cut_aff[:3, 3], atol=1e-9)
    box = tuple(slice(o, o + n) for o, n in zip(off, cut_shape, strict=True))
    for name, fn in (
        ("image", lambda sh, af: resample_to_grid(vi, sh, af, order=1, antialias=True, mask=vm)),
        ("mask", lambda sh, af: resample_labels_to_grid(vm, sh, af, method="majority")),
        ("labels", lambda sh, af: resample_labels_to_grid(vl, sh, af, method="majority")),
    ):
        full, cut = fn(full_shape, full_aff).values, fn(cut_shape, cut_aff).values
        assert np.count_nonzero(cut) > 0, name
        np.testing.assert_allclose(cut, full[box], rtol=1e-6, atol=1e-4, err_msg=name)
        rest = full.copy()
        rest[box] = 0
        assert not rest.any(), (name, np.count_nonzero(rest))


def test_content_extent_is_the_voxels_extent_for_any_chunking():
    rng = np.random.default_rng(5)
    m = rng.random((23, 19, 17)) > 0.97
    a = _affine((0.2, 0.3, 0.25), _rotation(20, (2, -1, 1)))
    idx = np.argwhere(m)
    corners = (idx[:, None, :] + np.array(list(itertools.product((-0.5, 0.5), repeat=3)))[None]).reshape(-1, 3)
    w = corners @ a[:3, :3].T + a[:3, 3]
    for chunks in ((23, 19, 17), (5, 7, 3), (8, 19, 4)):
        lo, hi = rs.content_extent_mm(make_volume(da.from_array(m, chunks=chunks), a, kind="mask"))
        np.testing.assert_allclose(lo, w.min(axis=0), atol=1e-9)
        np.testing.assert_allclose(hi, w.max(axis=0), atol=1e-9)
    assert rs.content_extent_mm(make_volume(da.zeros((4, 4, 4), chunks=2, dtype=bool), a, kind="mask")) is None


def test_grid_antialias_sigma_is_the_spacing_rule():
    # a rotation does not change the blur of isotropic voxels: sqrt(r^2 - 1) FWHM_TO_SIGMA input voxels
    m = np.eye(4)
    m[:3, :3] = _rotation(17, (1, 1, 0)) * 3.0
    assert np.allclose(grid_antialias_sigma(m), np.sqrt(8.0) * FWHM_TO_SIGMA)
    assert np.array_equal(grid_antialias_sigma(np.diag([0.5, 1.0, 2.0, 1.0]))[:2], [0.0, 0.0])


# ------------------------------------------------------------------------------------- resampling onto any grid


def _tilted_case(seed=0):
    rng = np.random.default_rng(seed)
    shape = (36, 30, 24)
    a_in = _affine((0.1, 0.1, 0.1), _rotation(12, (1, 2, 3)))
    out_shape, a_out = ras_target_grid(shape, a_in, 0.3)
    return rng, shape, a_in, out_shape, a_out


def test_antialiased_resampling_equals_the_whole_array_computation():
    rng, shape, a_in, out_shape, a_out = _tilted_case()
    x = ndi.gaussian_filter(rng.normal(size=shape), 1.0)
    mask = (rng.random(shape) > 0.2).astype(np.uint8)
    mask[18:] = 0  # boxes with an empty mask too (their chunks are zeros without filtering)
    # reference: the masked image filtered as a whole, then interpolated at x = inv(A_in) A_out m
    m = np.linalg.inv(a_in) @ a_out
    y = ndi.gaussian_filter(np.where(mask > 0, x, 0.0), grid_antialias_sigma(m), mode="nearest", truncate=4.0)
    idx = np.indices(out_shape).reshape(3, -1).astype(np.float64)
    coords = m[:3, :3] @ idx + m[:3, 3:4]
    ref = ndi.map_coordinates(y, coords, order=1, mode="nearest").reshape(out_shape)
    inside = np.all((coords > -0.5) & (coords < np.array(shape)[:, None] - 0.5), axis=0).reshape(out_shape)
    ref = np.where(inside, ref, 0).astype(np.float32)
    for chunks in ((8, 9, 10), (17, 17, 17)):
        vol = make_volume(da.from_array(x, chunks=chunks), a_in)
        msk = make_volume(da.from_array(mask, chunks=chunks), a_in, kind="mask")
        for out_chunks in ((5, 7, 6), None):
            got = resample_to_grid(vol, out_shape, a_out, order=1, antialias=True, mask=msk, chunks=out_chunks)
            assert got.dtype == np.float32 and np.array_equal(affine_of(got), a_out)
            np.testing.assert_allclose(got.values, ref, rtol=0, atol=1e-6)


def _world_vote(lab: np.ndarray, a_in: np.ndarray, out_shape, a_out: np.ndarray) -> np.ndarray:
    """The vote computed from world coordinates, voxel by voxel: ``q`` points per output axis at the centres of
    equal sub-cells of the output voxel, each taking the input voxel whose centre is nearest (0 outside)."""
    n_in = np.array(lab.shape)
    q = np.maximum(1, np.ceil(np.round(spacing_of(a_out) / spacing_of(a_in).min(), 6))).astype(int)
    inv = np.linalg.inv(a_in)
    codes = np.union1d(np.unique(lab), [0])
    counts = np.zeros((len(codes),) + tuple(out_shape), dtype=np.int32)
    idx = np.indices(out_shape).reshape(3, -1).astype(np.float64)
    for sub in itertools.product(*[(np.arange(q[e]) + 0.5) / q[e] - 0.5 for e in range(3)]):
        world = a_out[:3, :3] @ (idx + np.array(sub)[:, None]) + a_out[:3, 3:4]
        x = inv[:3, :3] @ world + inv[:3, 3:4]
        inside = np.all((x >= -0.5) & (x < n_in[:, None] - 0.5), axis=0)
        i = np.clip(np.floor(x + 0.5).astype(int), 0, n_in[:, None] - 1)
        v = np.where(inside, lab[i[0], i[1], i[2]], 0)
        for c_i, c in enumerate(codes):
            counts[c_i] += (v == c).reshape(out_shape)
    return codes[np.argmax(counts, axis=0)].astype(lab.dtype)


def test_majority_vote_onto_a_tilted_grid_equals_a_world_space_reference():
    rng, shape, a_in, out_shape, a_out = _tilted_case(1)
    # blobs of three codes (smoothed noise thresholded), so most output voxels hold several codes
    f = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    lab = np.digitize(f, np.quantile(f, [0.4, 0.7, 0.9])).astype(np.uint16) * 100
    lab[lab == 300] = 801
    ref = _world_vote(lab, a_in, out_shape, a_out)
    vol = make_volume(da.from_array(lab, chunks=(11, 13, 9)), a_in, kind="labels")
    for chunks in ((4, 5, 6), (8, 8, 8), None):
        got = resample_labels_to_grid(vol, out_shape, a_out, chunks=chunks)
        assert got.dtype == np.uint16 and got.attrs["kind"] == "labels"
        assert np.array_equal(got.values, ref)  # bit-identical for every chunking
    # and nearly what the nearest neighbour gives on a smooth map (the vote is not a different map)
    near = resample_labels_to_grid(vol, out_shape, a_out, method="nearest").values
    assert np.mean(near == ref) > 0.85
    # a uniform map: inside the field of view its code, at the rotated corners the vote with the 0s outside
    uniform = np.full(shape, 7, dtype=np.uint8)
    ref = _world_vote(uniform, a_in, out_shape, a_out)
    assert 0 < np.mean(ref == 7) < 1
    got = resample_labels_to_grid(make_volume(da.from_array(uniform, chunks=9), a_in, kind="mask"), out_shape, a_out)
    assert np.array_equal(got.values, ref)


def _native_tilted_case(seed=0):
    """A scan tilted by 12 degrees onto its RAS+ grid at the same spacing (the pipeline's ``--spacing native``):
    float32 header noise leaves an anti-aliasing sigma of ~1e-6 voxels, one sample per voxel in the vote."""
    rng = np.random.default_rng(seed)
    shape = (30, 26, 22)
    a_in = _affine((0.2, 0.2, 0.2), _rotation(12, (1, 2, 3))).astype(np.float32).astype(np.float64)
    out_shape, a_out = ras_target_grid(shape, a_in, "native")
    return rng, shape, a_in, out_shape, a_out


def test_native_linear_resampling_is_scipy_map_coordinates_bit_for_bit():
    rng, shape, a_in, out_shape, a_out = _native_tilted_case()
    m = np.linalg.inv(a_in) @ a_out
    assert 0 < grid_antialias_sigma(m).max() < 1e-3  # a filter of one tap (weight 1): the values stay as they are
    x = (rng.normal(size=shape) * 100).astype(np.float32)
    mask = (rng.random(shape) > 0.2).astype(np.uint8)
    mask[20:] = 0  # boxes with an empty mask too
    # reference: the masked float64 image interpolated as a whole (scipy), 0 outside the field of view
    idx = np.indices(out_shape).reshape(3, -1).astype(np.float64)
    coords = np.stack([m[d, 0] * idx[0] + m[d, 1] * idx[1] + m[d, 2] * idx[2] + m[d, 3] for d in range(3)])
    ref = ndi.map_coordinates(np.where(mask > 0, x, 0).astype(np.float64), coords, order=1, mode="nearest")
    inside = np.all((coords >= -0.5) & (coords < np.array(shape)[:, None] - 0.5), axis=0)
    ref = np.where(inside, ref, 0).astype(np.float32).reshape(out_shape)
    vol = make_volume(da.from_array(x, chunks=(11, 9, 8)), a_in)
    msk = make_volume(da.from_array(mask, chunks=(11, 9, 8)), a_in, kind="mask")
    for out_chunks in ((7, 8, 9), (32, 32, 32)):
        got = resample_to_grid(vol, out_shape, a_out, order=1, antialias=True, mask=msk, chunks=out_chunks).values
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))  # box-local coordinates change nothing


def test_linear_kernel_equals_map_coordinates_on_random_boxes():
    # any affine map (scalings, shears, far outside), any box: clamping at the box's faces as mode="nearest"
    rng = np.random.default_rng(5)
    for trial in range(150):
        m = np.eye(4)
        m[:3, :3] = rng.normal(size=(3, 3)) * rng.uniform(0.2, 3.0)
        m[:3, 3] = rng.uniform(-60, 60, 3)
        ranges = tuple((int(a), int(a) + int(rng.integers(1, 12))) for a in rng.integers(0, 60, 3))
        n_in = tuple(int(v) for v in rng.integers(1, 60, 3))
        lo = [int(rng.integers(0, n)) for n in n_in]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, n_in)]
        sub = (rng.normal(size=tuple(b - a for a, b in zip(lo, hi))) * 100).astype(np.float32)
        msk = (rng.random(sub.shape) > 0.3).astype(np.uint8)
        regions = [sub, msk] if trial % 3 else [sub]
        got = rs._to_grid_block(regions, lo, m, ranges, n_in, 1, np.float32)
        y = sub.astype(np.float64) if trial % 3 == 0 else np.where(msk > 0, sub, 0).astype(np.float64)
        x = rs._grid_coords(m, ranges)
        local = x - np.asarray(lo, dtype=np.float64).reshape(3, 1, 1, 1)
        ref = ndi.map_coordinates(y, local, order=1, mode="nearest")
        ref = np.where(np.all((x >= -0.5) & (x < np.reshape(n_in, (3, 1, 1, 1)) - 0.5), axis=0), ref, 0)
        assert np.array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32)), trial


def test_native_majority_vote_is_the_nearest_voxel():
    rng, shape, a_in, out_shape, a_out = _native_tilted_case(1)
    f = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    lab = np.digitize(f, np.quantile(f, [0.4, 0.7, 0.9])).astype(np.uint16) * 100
    ref = _world_vote(lab, a_in, out_shape, a_out)  # one sample per voxel: the nearest input voxel, 0 outside
    vol = make_volume(da.from_array(lab, chunks=(11, 13, 9)), a_in, kind="labels")
    near = resample_labels_to_grid(vol, out_shape, a_out, method="nearest").values
    for chunks in ((4, 5, 6), None):
        got = resample_labels_to_grid(vol, out_shape, a_out, chunks=chunks).values
        assert np.array_equal(got, near)
        assert np.mean(got == ref) > 0.999  # world coordinates round differently at a handful of voxels


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_majority_vote_on_an_aligned_grid_is_the_block_majority(factor):
    rng = np.random.default_rng(factor)
    shape = (12 * factor, 9 * factor, 6 * factor)
    lab = rng.integers(0, 4, size=shape).astype(np.uint8)
    a_in = _affine((0.1, 0.1, 0.1))
    vol = make_volume(da.from_array(lab, chunks=7), a_in, kind="labels")
    ref = resample_labels(vol, 0.1 * factor, method="majority")
    got = resample_labels_to_grid(vol, ref.shape, affine_of(ref), chunks=(5, 4, 3))
    assert np.array_equal(got.values, ref.values)


def test_intensity_resampling_on_the_ras_grid_of_an_aligned_scan_is_the_block_mean():
    rng = np.random.default_rng(3)
    a = _affine((0.1, 0.1, 0.1))
    vol = make_volume(da.from_array(rng.random((30, 24, 18)), chunks=12), a)
    shape, aff = ras_target_grid(vol.shape, a, 0.3)
    ref = vol.values.reshape(10, 3, 8, 3, 6, 3).mean(axis=(1, 3, 5)).astype(np.float32)
    assert shape == (10, 8, 6) and np.array_equal(resample(vol, 0.3).values, ref)


# --------------------------------------------------------------------------------------------- RAS+ import order


def _file(tmp_path, data, affine, name="x.nii.gz"):
    f = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), f)
    return f


_ORDERS = {  # file axis -> world axis, and the sign
    "LPI": ((0, 1, 2), (-1, -1, -1)),
    "PLI": ((1, 0, 2), (-1, -1, -1)),
    "ASL": ((1, 2, 0), (1, 1, -1)),
    "RAS": ((0, 1, 2), (1, 1, 1)),
}


@pytest.mark.parametrize("code", sorted(_ORDERS))
@pytest.mark.parametrize("tilt", [0.0, 9.0])
@pytest.mark.parametrize("layer_mb, chunks", [(64, 8), (0.002, (6, 5, 7))])  # direct writes; thin landing
def test_import_stores_ras_order_with_every_voxel_in_place(tmp_path, code, tilt, layer_mb, chunks):
    perm, signs = _ORDERS[code]
    shape = (13, 11, 23)  # 23 planes: not a multiple of the chunk or slab depth (the thinner first slab)
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    for i, (w, sg) in enumerate(zip(perm, signs)):
        a[w, i] = sg * (0.5 + 0.1 * i)
    a[:3, :3] = _rotation(tilt, (1, 2, 3)) @ a[:3, :3]
    a[:3, 3] = (12.0, -7.0, 30.0)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)  # every value once: where did it go?
    assert "".join(nib.aff2axcodes(a)) == code
    f = _file(tmp_path, data, a)
    a = nib.load(f).affine  # as the header holds it (float32)
    out = nifti_to_zarr(f, tmp_path / "x.zarr", chunks=chunks, layer_mb=layer_mb, ras=True)
    vol = open_volume(out["path"])
    stored, a_st = vol.values, affine_of(vol)
    can = nib.as_closest_canonical(nib.Nifti1Image(data, a))
    assert np.array_equal(stored, np.asanyarray(can.dataobj)) and out["shape"] == list(stored.shape)
    assert "".join(nib.aff2axcodes(a_st)) == "RAS"
    assert ras_grid(shape, a)[0] == stored.shape and np.array_equal(ras_grid(shape, a)[1], a_st)
    # the world position of every voxel centre, from the file and from the store
    src = np.unravel_index(stored.ravel(), shape)
    w_file = a[:3, :3] @ np.array(src, dtype=np.float64) + a[:3, 3:4]
    w_store = a_st[:3, :3] @ np.indices(stored.shape).reshape(3, -1) + a_st[:3, 3:4]
    np.testing.assert_allclose(w_store, w_file, rtol=0, atol=1e-9)
    # downstream code calls to_ras: the identity now, values and affine unchanged
    again = to_ras(vol)
    assert np.array_equal(again.values, stored) and np.array_equal(affine_of(again), a_st)
    # the command line's default (convert) keeps the file's order
    kept = open_volume(nifti_to_zarr(_file(tmp_path, data, a), tmp_path / "k.zarr", chunks=chunks)["path"])
    assert np.array_equal(kept.values, data) and "".join(nib.aff2axcodes(affine_of(kept))) == code


def test_import_ras_order_of_a_four_d_scan_and_combined_echoes(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(9, 8, 13, 3)).astype(np.int16)
    a = np.diag([-0.5, -0.5, -0.5, 1.0])[[1, 0, 2, 3]]  # PLI
    f = _file(tmp_path, data, a)
    can = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, a)).dataobj)
    four = open_volume(nifti_to_zarr(f, tmp_path / "4d.zarr", chunks=4, layer_mb=0.001, ras=True)["path"])
    assert np.array_equal(four.values, can)
    rms = open_volume(nifti_to_zarr(f, tmp_path / "c.zarr", chunks=4, echo_combine="rms", ras=True)["path"])
    np.testing.assert_allclose(rms.values, np.sqrt((can.astype(np.float64) ** 2).mean(axis=3)), rtol=1e-6)
    one = open_volume(nifti_to_zarr(f, tmp_path / "e.zarr", chunks=4, echo=2, ras=True)["path"])
    assert np.array_equal(one.values, can[..., 2])


def test_convert_keeps_the_file_order_unless_asked(tmp_path):
    from helm_dask.cli import main

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    a = np.diag([-0.5, -0.5, -0.5, 1.0])[[1, 0, 2, 3]]  # PLI
    f = _file(tmp_path, data, a)
    for flag, code in (([], "PLI"), (["--ras"], "RAS")):
        out = tmp_path / f"x{len(flag)}.zarr"
        assert main(["convert", str(f), str(out), *flag, "--scheduler", "threads", "--quiet"]) == 0
        assert "".join(nib.aff2axcodes(affine_of(open_volume(out)))) == code
    back = tmp_path / "back.nii.gz"  # the flag means nothing Zarr -> NIfTI: accepted, ignored
    assert main(["convert", str(tmp_path / "x1.zarr"), str(back), "--ras", "--scheduler", "threads", "--quiet"]) == 0
    assert np.array_equal(np.asanyarray(nib.load(back).dataobj), data[::-1, ::-1, ::-1].transpose(1, 0, 2))


def test_import_refuses_a_degenerate_affine_for_ras_order(tmp_path):
    a = np.eye(4)
    a[:3, 0] = 0.0
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.header.set_sform(a, 1)
    img.header.set_qform(None, 0)
    f = tmp_path / "bad.nii"
    nib.save(img, f)
    with pytest.raises(HelmError, match="singular|degenerate"):  # the header check comes first
        nifti_to_zarr(f, tmp_path / "bad.zarr", ras=True)


# --------------------------------------------------------------------------------------------------- manifests


def test_manifest_accepts_grid(tmp_path):
    from helm_dask.batch import subject_params
    from helm_dask.pipeline import RunParams
    from helm_dask.pipeline.options import run_option_actions

    base = RunParams(scan="s.nii.gz", hypothalamus="h.nii.gz", out=str(tmp_path))
    assert base.grid == run_option_actions()["grid"].default == "ras"
    assert subject_params(base, {"grid": "scan"}, {"scan": "a.nii.gz"}).grid == "scan"
    assert subject_params(base, {"grid": "scan"}, {"scan": "a.nii.gz", "grid": "ras"}).grid == "ras"
    with pytest.raises(HelmError, match="grid"):
        subject_params(base, {"grid": "oblique"}, {"scan": "a.nii.gz"})


# ----------------------------------------------------------------------------------------------------- whole runs

SPACING = 2.0


@pytest.fixture(scope="module")
def tilted(tmp_path_factory):
    """The template phantom with its header tilted 12 degrees, run with each grid up to the k-means."""
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    root = tmp_path_factory.mktemp("tilted")
    ph = root / "phantom"
    write_phantom(ph, anatomy="mni152", spacing_mm=SPACING, side="L", seed=2, bag_gap_mm=5.0, header_rotation_deg=12)
    runs = {}
    for grid in ("ras", "scan"):
        params = RunParams(
            scan=str(ph / "scan.nii.gz"),
            hypothalamus=str(ph / "hypothalamus.nii.gz"),
            out=str(root / grid),
            subject="t",
            spacing=SPACING,
            grid=grid,
            ks=(4,),
            until="kmeans",
            nifti=False,
            qc=False,
        )
        runs[grid] = (root / grid / "t", run_subject(params, quiet=True))
    return ph, runs


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.e2e
@pytest.mark.slow
def test_tilted_run_on_the_ras_grid_agrees_with_the_scan_grid(tilted):
    from helm_dask.metrics import kmeans_agreement, reference_on_grid

    ph, runs = tilted
    truth = {
        n: open_volume(nifti_to_zarr(ph / f"{n}.nii.gz", ph / f"{n}.zarr", ras=True)["path"])
        for n in ("truth_mask", "truth_tissue")
    }
    result = {}
    for grid, (d, info) in runs.items():
        st = d / "helm.zarr"
        vols = {n: open_volume(st / n) for n in ("image_ws", "mask", "hypothalamus", "preprocessed", "kmeans_k4")}
        affs = {n: affine_of(v) for n, v in vols.items()}
        assert all(np.array_equal(a, affs["mask"]) for a in affs.values())  # one working grid
        assert is_ras_aligned(affs["mask"]) == (grid == "ras"), grid
        assert info["stages"]["resample"]["params"]["grid"] == grid
        ref_mask = reference_on_grid(truth["truth_mask"], vols["mask"], spacing=SPACING)
        ref_tissue = reference_on_grid(truth["truth_tissue"], vols["mask"], spacing=SPACING)
        ag = kmeans_agreement(vols["kmeans_k4"], ref_tissue, vols["mask"])
        result[grid] = {"dice_mask": _dice(vols["mask"].values, ref_mask.values), "ari": ag["ari"]}
        assert np.count_nonzero(vols["hypothalamus"].values) > 0
    # The grids differ by the tilt: the ras one covers the brain's rotated box, every working
    # volume on it is axis-aligned, and what the run finds is the same to within what resampling costs
    # (measured at 2 mm: Dice of the mask 0.9776 and 0.9777; adjusted Rand index 0.264 and 0.204 -- 0.213 on the
    # ras grid before it was cut to the brain's box: the bias field's basis and the k-means samples follow the
    # grid's extent). The ras grid must not do worse.
    assert result["ras"]["dice_mask"] > 0.95 and result["scan"]["dice_mask"] > 0.95, result
    assert abs(result["ras"]["dice_mask"] - result["scan"]["dice_mask"]) < 0.01, result
    assert result["ras"]["ari"] > result["scan"]["ari"] - 0.05, result
    # scan_raw is stored in RAS+ order on both
    for d, _ in runs.values():
        assert "".join(nib.aff2axcodes(affine_of(open_volume(d / "helm.zarr" / "scan_raw")))) == "RAS"


@pytest.mark.e2e
@pytest.mark.slow
def test_helm_zarr_is_a_zarr_group_listing_its_stores(tilted):
    _, runs = tilted
    d, _ = runs["ras"]
    group = zarr.open_group(str(d / "helm.zarr"), mode="r")
    members = {name for name, _ in group.members()}
    expected = {"scan_raw", "labels_raw", "mask_ras", "image_ws", "mask", "hypothalamus", "bias", "preprocessed"}
    assert expected | {"kmeans_k4"} <= members
    attrs = dict(group.attrs)["helm_dask"]
    assert attrs["subject"] == "t" and set(attrs["stores"]) == members
    assert json.loads((d / "helm.zarr" / "zarr.json").read_text())["node_type"] == "group"


@pytest.mark.e2e
@pytest.mark.slow
def test_an_axis_aligned_scan_gives_the_same_outputs_with_either_grid(tmp_path):
    """The template phantom with its affine snapped to the nearest axis-aligned one (a PLI scan that is not
    tilted): ``--grid ras`` and ``--grid scan`` are the same grid, so every working volume is bit-identical."""
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    ph = tmp_path / "ph"
    write_phantom(ph, anatomy="mni152", spacing_mm=3.0, side="L", seed=1, bag_gap_mm=5.0)
    for name in ("scan", "hypothalamus"):
        img = nib.load(ph / f"{name}.nii.gz")
        a = img.affine.copy()
        a[:3, :3] = np.round(a[:3, :3] / 3.0) * 3.0  # the nearest signed permutation, 3 mm voxels
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), a, img.header), ph / f"{name}_aligned.nii.gz")
    outs = {}
    for grid in ("ras", "scan"):
        params = RunParams(
            scan=str(ph / "scan_aligned.nii.gz"),
            hypothalamus=str(ph / "hypothalamus_aligned.nii.gz"),
            out=str(tmp_path / grid),
            subject="a",
            spacing=1.5,
            grid=grid,
            until="preprocess",
            nifti=False,
            qc=False,
        )
        run_subject(params, quiet=True)
        outs[grid] = tmp_path / grid / "a" / "helm.zarr"
    for name in ("image_ws", "mask", "hypothalamus", "preprocessed", "bias"):
        a, b = open_volume(outs["ras"] / name), open_volume(outs["scan"] / name)
        assert np.array_equal(affine_of(a), affine_of(b)) and is_ras_aligned(affine_of(a)), name
        assert np.array_equal(a.values, b.values), name
