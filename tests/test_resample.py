"""Stage 3 (resampling): chunked results against whole-array NumPy/SciPy references, for several chunkings."""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from helm_dask.errors import HelmError
from helm_dask.resample import (
    antialias_sigma_mm,
    grid_mapping,
    resample,
    resample_labels,
    resample_to_grid,
    target_grid,
)
from helm_dask.volume import affine_of, make_volume, spacing_of, voxel_to_world, world_to_voxel

SHAPE = (30, 25, 20)
# (input chunks, output chunks): output chunk boundaries matter as much as input ones
CHUNKINGS = [(SHAPE, None), ((7, 9, 5), (5, 4, 3)), ((16, 8, 20), (3, 7, 2)), ((4, 25, 3), (7, 3, 8))]
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def make_affine(spacing, *, deg=0.0, perm=(0, 1, 2), signs=(1, 1, 1), origin=(-12.3, 4.5, 7.8)):
    """Voxel axis d points along world axis perm[d] (sign signs[d]), then everything rotated by ``deg``."""
    m = np.zeros((3, 3))
    for d in range(3):
        m[perm[d], d] = signs[d] * spacing[d]
    a = np.eye(4)
    a[:3, :3] = rotation((1, 2, 3), deg) @ m
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": lambda sp: make_affine(sp),
    "oblique_permuted": lambda sp: make_affine(sp, deg=8.0, perm=(2, 0, 1), signs=(-1, 1, -1)),
}


def smooth_random(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.normal(size=shape), 1.5) * 50 + 100 + rng.normal(size=shape)).astype(np.float32)


def vol_of(arr, affine, chunks, kind="image"):
    if isinstance(chunks, tuple) and len(chunks) == 2 and isinstance(chunks[0], tuple):
        chunks = chunks[0]  # a (input, output) pair from CHUNKINGS
    return make_volume(da.from_array(arr, chunks=chunks), affine, kind=kind)


def oc(chunks):
    """The output chunks of a CHUNKINGS pair."""
    return chunks[1]


def reference_resample(arr, affine, new_affine, new_shape, spacing_new, *, block_axes, order):
    """Independent whole-array reference: reshape-mean on block axes, gaussian_filter + affine_transform
    (mode nearest) on the others; the sampling positions are read off the two affines."""
    m = np.linalg.inv(affine) @ new_affine
    assert np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-12)  # voxel-space scaling only
    r, t = np.diag(m)[:3], m[:3, 3]
    y = np.asarray(arr, np.float64)
    shape, axes = [], []
    for d in range(3):
        if d in block_axes:
            k = int(round(r[d]))
            assert abs(t[d] - (k - 1) / 2) < 1e-9  # block voxel centre = mean of its k centres
            shape += [y.shape[d] // k, k]
            axes.append(len(shape) - 1)
        else:
            shape.append(y.shape[d])
    y = y.reshape(shape).mean(axis=tuple(axes)) if axes else y
    s = spacing_of(affine)
    sigma = np.array(
        [0.0 if d in block_axes else math.sqrt(max(spacing_new**2 - s[d] ** 2, 0)) / FWHM / s[d] for d in range(3)]
    )
    if sigma.any():
        y = ndi.gaussian_filter(y, sigma, mode="nearest", truncate=4.0)
    if len(block_axes) == 3:
        return y.astype(np.float32)
    matrix = np.array([1.0 if d in block_axes else r[d] for d in range(3)])
    offset = np.array([0.0 if d in block_axes else t[d] for d in range(3)])
    return ndi.affine_transform(y, matrix, offset=offset, output_shape=new_shape, order=order, mode="nearest").astype(
        np.float32
    )


# ---------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_target_grid_extent_spacing_and_directions(name):
    sp = np.array([0.12, 0.15, 0.1])
    a = AFFINES[name](sp)
    n = np.array(SHAPE)
    new_shape, new_a = target_grid(SHAPE, a, 0.3)
    # 3.6 / 0.3 = 12; 3.75 / 0.3 = 12.5 -> 13 (halves round up); 2.0 / 0.3 = 6.67 -> 7
    assert new_shape == (12, 13, 7)
    n_new = np.array(new_shape)
    np.testing.assert_allclose(spacing_of(new_a), 0.3, rtol=1e-12)
    # direction cosines kept (an oblique grid stays oblique)
    np.testing.assert_allclose(new_a[:3, :3] / 0.3, a[:3, :3] / sp, atol=1e-12)
    # centred on the old field of view: the FOV centres coincide
    np.testing.assert_allclose(voxel_to_world(new_a, [(n_new - 1) / 2]), voxel_to_world(a, [(n - 1) / 2]), atol=1e-12)
    # outer edges: along each voxel axis the new first outer edge lies n_new * 0.3 / 2 before the centre
    centre = voxel_to_world(a, [(n - 1) / 2])[0]
    for d in range(3):
        p = (n_new - 1) / 2.0
        p[d] = -0.5
        u = a[:3, d] / sp[d]
        assert float((voxel_to_world(new_a, [p])[0] - centre) @ u) == pytest.approx(-n_new[d] * 0.3 / 2, abs=1e-9)
    # axis 0 covers exactly the same field of view: outer edges coincide
    first_old = voxel_to_world(a, [[-0.5, 0, 0]])[0]
    first_new = voxel_to_world(new_a, [[-0.5, 0, 0]])[0]
    along = a[:3, 0] / sp[0]
    assert float((first_new - first_old) @ along) == pytest.approx(0.0, abs=1e-12)
    # the sampling positions: output voxel m at input voxel t + r*m
    shape2, r, t = grid_mapping(SHAPE, a, 0.3)
    m = np.linalg.inv(a) @ new_a
    np.testing.assert_allclose(m[:3, :3], np.diag(r), atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], t, atol=1e-12)
    np.testing.assert_allclose(t, (n - 1) / 2 - (n_new - 1) / 2 * r, atol=1e-12)


def test_target_grid_integer_factor_centres_are_block_means_and_tiny_volumes():
    a = make_affine([0.1, 0.1, 0.1], deg=5.0)
    new_shape, new_a = target_grid((30, 24, 21), a, [0.3, 0.2, 0.7])
    assert new_shape == (10, 12, 3)
    # new voxel (1, 2, 0) centre = mean of the centres of input voxels 3..5 x 4..5 x 0..6
    ijk = np.array([[i, j, k] for i in range(3, 6) for j in range(4, 6) for k in range(7)])
    np.testing.assert_allclose(voxel_to_world(new_a, [[1, 2, 0]])[0], voxel_to_world(a, ijk).mean(axis=0), atol=1e-12)
    # never fewer than one voxel; centre kept
    shape1, a1 = target_grid((2, 3, 2), np.eye(4), 10.0)
    assert shape1 == (1, 1, 1)
    np.testing.assert_allclose(a1[:3, 3], [0.5, 1.0, 0.5])


@pytest.mark.parametrize("bad", [0.0, -0.3, "abc", [0.3, 0.3], float("nan")])
def test_bad_spacing_is_a_helm_error(bad):
    with pytest.raises(HelmError, match="spacing"):
        target_grid(SHAPE, np.eye(4), bad)


def test_antialias_sigma_formula():
    np.testing.assert_allclose(antialias_sigma_mm(0.12, 0.3), math.sqrt(0.3**2 - 0.12**2) / FWHM)
    np.testing.assert_allclose(antialias_sigma_mm(0.3, 0.12), 0.0)


# ---------------------------------------------------------------------------------------------------------
# intensities
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("target", [0.2, [0.3, 0.2, 0.1]])
def test_integer_factor_is_exact_block_mean(chunks, target):
    arr = smooth_random((30, 24, 20), seed=1)
    a = make_affine([0.1, 0.1, 0.1], deg=3.0)
    out = resample(vol_of(arr, a, chunks), target, chunks=oc(chunks))
    assert isinstance(out.data, da.Array) and out.dtype == np.float32
    k = np.round(np.broadcast_to(target, (3,)) / 0.1).astype(int)
    expect = arr.astype(np.float64).reshape(30 // k[0], k[0], 24 // k[1], k[1], 20 // k[2], k[2]).mean(axis=(1, 3, 5))
    got = out.values
    assert got.shape == expect.shape
    np.testing.assert_allclose(got, expect.astype(np.float32), rtol=1e-6, atol=0)
    np.testing.assert_allclose(spacing_of(affine_of(out)), np.broadcast_to(target, (3,)), rtol=1e-12)
    # the new voxel centre is the mean of the block's input centres (voxel-centre-exact affine)
    ijk = np.array([[i, j, kk] for i in range(k[0]) for j in range(k[1]) for kk in range(k[2])]) + k * [2, 3, 1]
    np.testing.assert_allclose(
        voxel_to_world(affine_of(out), [[2, 3, 1]])[0], voxel_to_world(a, ijk).mean(axis=0), atol=1e-12
    )


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_non_integer_factor_012_to_03_matches_scipy(chunks, order, name):
    arr = smooth_random(SHAPE, seed=2)
    a = AFFINES[name]([0.12, 0.12, 0.12])
    out = resample(vol_of(arr, a, chunks), 0.3, order=order, chunks=oc(chunks))
    assert out.shape == (12, 10, 8)  # factor 2.5: 3.6, 3.0, 2.4 mm fields of view
    ref = reference_resample(arr, a, affine_of(out), out.shape, 0.3, block_axes=(), order=order)
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # anti-aliasing really happened: without it the values differ
    plain = resample(vol_of(arr, a, chunks), 0.3, order=order, prefilter=False, chunks=oc(chunks)).values
    assert np.abs(plain - ref).max() > 0.1


@pytest.mark.parametrize("chunks", CHUNKINGS[:3])
@pytest.mark.parametrize("order", [1, 3])
def test_mixed_block_and_interpolated_axes_match_scipy(chunks, order):
    # axis 0: 0.1 -> 0.3, 30 = 10*3 (aligned block mean); axis 1: 0.1 -> 0.3 but 25 != 8*3 (interpolated);
    # axis 2: 0.12 -> 0.3 (factor 2.5, interpolated)
    arr = smooth_random(SHAPE, seed=3)
    a = AFFINES["oblique_permuted"]([0.1, 0.1, 0.12])
    out = resample(vol_of(arr, a, chunks), 0.3, order=order, chunks=oc(chunks))
    assert out.shape == (10, 8, 8)
    assert out.attrs["provenance"][-1]["params"]["block_mean_axes"] == [0]
    ref = reference_resample(arr, a, affine_of(out), out.shape, 0.3, block_axes=(0,), order=order)
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("chunks", [((12, 10, 8), None), ((5, 3, 8), (9, 7, 20)), ((2, 10, 3), (30, 4, 6))])
@pytest.mark.parametrize("order", [1, 3])
def test_upsampling_03_to_012_matches_scipy(chunks, order):
    arr = smooth_random((12, 10, 8), seed=4)
    a = AFFINES["oblique_permuted"]([0.3, 0.3, 0.3])
    out = resample(vol_of(arr, a, chunks), 0.12, order=order, chunks=oc(chunks))
    assert out.shape == (30, 25, 20)
    ref = reference_resample(arr, a, affine_of(out), out.shape, 0.12, block_axes=(), order=order)
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("chunks", CHUNKINGS[:3])
@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("flip", [False, True])
def test_masked_resample_of_stored_reoriented_scan_matches_scipy(tmp_path, chunks, name, flip):
    """``resample(scan, mask=m)`` -- how run resamples: the stored scan and mask, reoriented to RAS+ (and
    flipped to a left hemisphere), read box by box by tasks without dependencies -- equals the whole-array
    reference of the masked image, and ``resample(apply_mask(scan, m))``."""
    from helm_dask.background import apply_mask
    from helm_dask.io import regions
    from helm_dask.io.store import open_volume, save_volume
    from helm_dask.orient import flip_left_right, to_ras

    arr = smooth_random(SHAPE, seed=6)
    m = (smooth_random(SHAPE, seed=7) > 100).astype(np.uint8)
    a = AFFINES[name]([0.12, 0.12, 0.12])
    stored = [
        open_volume(save_volume(vol_of(x, a, chunks, kind=k), tmp_path / f"{k}.zarr", pyramid=False, chunks=chunks[0]))
        for x, k in ((arr, "image"), (m, "mask"))
    ]
    scan, mask = (to_ras(v) for v in stored)
    if flip:
        scan, mask = flip_left_right(scan), flip_left_right(mask)
    out = resample(scan, 0.3, mask=mask, chunks=oc(chunks))
    deps = out.data.__dask_graph__().dependencies
    (name,) = [k for k in deps if str(k).startswith("resample-")]
    assert not deps[name]  # the tasks read the stores themselves
    assert all(regions.store_view_of(v.data) is not None for v in (scan, mask))
    masked = np.where(mask.values > 0, scan.values, 0).astype(np.float32)
    ref = reference_resample(masked, affine_of(scan), affine_of(out), out.shape, 0.3, block_axes=(), order=1)
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    np.testing.assert_array_equal(out.values, resample(apply_mask(scan, mask), 0.3, chunks=oc(chunks)).values)
    with pytest.raises(HelmError, match="mask grid"):
        resample(scan, 0.3, mask=mask[:-1])


def test_output_independent_of_chunking_and_explicit_output_chunks():
    arr = smooth_random(SHAPE, seed=5)
    a = AFFINES["ras"]([0.12, 0.12, 0.12])
    results = [
        resample(vol_of(arr, a, c), 0.3, order=3, chunks=out_chunks).values
        for c, _ in CHUNKINGS
        for out_chunks in (None, (3, 4, 5), (12, 1, 8))
    ]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-6, atol=1e-6 * float(np.abs(results[0]).max()))


def test_native_and_laziness_and_errors():
    arr = smooth_random(SHAPE, seed=6)
    v = vol_of(arr, np.eye(4), 10)
    assert resample(v, "native") is v
    assert resample_labels(v, "native") is v

    def boom(block):
        raise AssertionError("computed while building the graph")

    lazy = make_volume(da.zeros(SHAPE, chunks=10).map_blocks(boom, dtype=float), np.diag([0.12] * 3 + [1]))
    out = resample(lazy, 0.3)  # building the graph must not compute anything
    assert isinstance(out.data, da.Array)
    assert out.attrs["provenance"][-1]["stage"] == "resample"
    with pytest.raises(ValueError):
        resample(v, 0.3, order=2)
    with pytest.raises(ValueError, match="3-D"):
        resample(make_volume(da.zeros((4, 4, 4, 2)), np.eye(4)), 2.0)
    with pytest.raises(ValueError, match="resample_labels"):
        resample(vol_of(arr.astype(np.uint16), np.eye(4), 10, kind="labels"), 2.0)


def test_smooth_blob_round_trip_keeps_centroid():
    g = np.indices(SHAPE).astype(float)
    c = np.array([13.3, 11.7, 9.2])
    blob = np.exp(-(((g - c[:, None, None, None]) ** 2).sum(0)) / (2 * 3.0**2)).astype(np.float32)
    a = AFFINES["oblique_permuted"]([0.12, 0.12, 0.12])
    down = resample(vol_of(blob, a, (7, 9, 5)), 0.3, chunks=(5, 4, 8))
    back = resample(down, 0.12, chunks=(15, 25, 11))
    assert back.shape == SHAPE
    np.testing.assert_allclose(affine_of(back), a, atol=1e-12)  # same FOV -> the very same grid

    def centroid(arr, aff):
        w = np.clip(arr, 0, None)
        ijk = (np.indices(arr.shape).reshape(3, -1) * w.ravel()).sum(1) / w.sum()
        return voxel_to_world(aff, [ijk])[0]

    shift = np.linalg.norm(centroid(back.values, a) - centroid(blob, a))
    assert shift < 0.5 * 0.12


# ---------------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------------


def blob_labels(shape, seed=0, codes=(801, 802, 803, 804, 805, 3), dtype=np.uint16):
    """Ellipsoid blobs with different codes (overlaps: later wins) on background 0."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(float)
    lab = np.zeros(shape, dtype)
    for code in codes:
        c = rng.uniform(0.2, 0.8, 3) * np.array(shape)
        rad = rng.uniform(3, 7, 3)
        lab[(((g - c[:, None, None, None]) / rad[:, None, None, None]) ** 2).sum(0) <= 1] = code
    return lab


@pytest.mark.parametrize(
    "chunks, target",
    [(c, t) for c in CHUNKINGS for t in (0.3, 0.2)] + [(CHUNKINGS[0], 0.05), (((7, 9, 5), (20, 33, 16)), 0.05)],
)
def test_nearest_labels_equal_scipy_order0(chunks, target):
    lab = blob_labels(SHAPE, seed=1)
    a = AFFINES["oblique_permuted"]([0.12, 0.1, 0.1])
    out = resample_labels(vol_of(lab, a, chunks, kind="labels"), target, chunks=oc(chunks))
    assert out.dtype == np.uint16 and out.attrs["kind"] == "labels"
    new_shape, r, t = grid_mapping(SHAPE, a, target)
    assert out.shape == new_shape
    np.testing.assert_allclose(
        np.linalg.inv(a) @ affine_of(out),
        np.block([[np.diag(r), t[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]),
        atol=1e-12,
    )
    coords = [t[d] + r[d] * np.arange(new_shape[d]) for d in range(3)]
    grid = np.stack(np.meshgrid(*coords, indexing="ij"))
    ref = ndi.map_coordinates(lab, grid, order=0, mode="nearest")
    np.testing.assert_array_equal(out.values, ref)


def majority_reference(lab, r, t, new_shape):
    """Brute force: per output voxel, the codes of input voxels with centres in [x - r/2, x + r/2)."""
    out = np.zeros(new_shape, lab.dtype)
    sel = []
    for d in range(3):
        j = np.arange(lab.shape[d])
        per = []
        for m in range(new_shape[d]):
            x = t[d] + r[d] * m
            ok = (j >= np.round(x - r[d] / 2, 9)) & (j < np.round(x + r[d] / 2, 9))
            if not ok.any():
                ok = j == min(max(int(np.floor(x + 0.5)), 0), lab.shape[d] - 1)
            per.append(np.nonzero(ok)[0])
        sel.append(per)
    for idx in np.ndindex(*new_shape):
        vals = lab[np.ix_(sel[0][idx[0]], sel[1][idx[1]], sel[2][idx[2]])].ravel()
        codes, counts = np.unique(vals, return_counts=True)
        out[idx] = codes[np.argmax(counts)]  # np.unique sorts: argmax picks the smallest tied code
    return out


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("target", [0.3, [0.24, 0.3, 0.15], 0.33])  # 0.33: the FOV is not a multiple
def test_majority_labels_equal_brute_force(chunks, target):
    lab = blob_labels(SHAPE, seed=2)
    rng = np.random.default_rng(0)
    noisy = lab.copy()
    flip = rng.random(SHAPE) < 0.2  # salt the map so that votes are close
    noisy[flip] = rng.choice([0, 3, 801, 802], size=int(flip.sum()))
    a = AFFINES["ras"]([0.12, 0.12, 0.12])
    out = resample_labels(vol_of(noisy, a, chunks, kind="labels"), target, method="majority", chunks=oc(chunks))
    new_shape, r, t = grid_mapping(SHAPE, a, target)
    np.testing.assert_array_equal(out.values, majority_reference(noisy, r, t, new_shape))
    assert out.dtype == noisy.dtype


def test_majority_ties_go_to_smallest_code_and_upsampling_falls_back_to_nearest():
    lab = np.array([5, 3, 3, 5, 9, 9, 2, 2], np.uint8).reshape(8, 1, 1)
    v = vol_of(lab, np.eye(4), 3, kind="labels")
    out = resample_labels(v, [2.0, 1.0, 1.0], method="majority", chunks=(1, 1, 1)).values.ravel()
    np.testing.assert_array_equal(out, [3, 3, 9, 2])
    up_near = resample_labels(v, [0.5, 1.0, 1.0], method="nearest").values
    up_major = resample_labels(v, [0.5, 1.0, 1.0], method="majority").values
    np.testing.assert_array_equal(up_major, up_near)
    with pytest.raises(ValueError):
        resample_labels(v, 2.0, method="mode")


# ---------------------------------------------------------------------------------------------------------
# arbitrary grids
# ---------------------------------------------------------------------------------------------------------


def to_grid_reference(arr, a_in, shape, a_out, order):
    m = np.linalg.inv(a_in) @ a_out
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    x = m[:3, :3] @ ijk + m[:3, 3:4]
    vals = ndi.map_coordinates(np.asarray(arr, np.float64) if order else arr, x, order=order, mode="nearest")
    n = np.array(arr.shape)[:, None]
    inside = np.all((x >= -0.5) & (x < n - 0.5), axis=0)
    return np.where(inside, vals, 0).reshape(shape)


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_to_grid_matches_map_coordinates(chunks, order):
    a_in = AFFINES["oblique_permuted"]([0.2, 0.2, 0.25])
    shape_out = (24, 22, 26)
    # a rotated grid, shifted so that it sticks out of the input field of view on some sides
    centre_in = voxel_to_world(a_in, [(np.array(SHAPE) - 1) / 2])[0]
    a_out = make_affine([0.22, 0.22, 0.22], deg=-6.0)
    a_out[:3, 3] = centre_in + [0.8, -0.5, 0.3] - a_out[:3, :3] @ ((np.array(shape_out) - 1) / 2)
    # (cubic: the 16-voxel spline margin makes tiny output chunks slow, so keep those for orders 0 and 1)
    out_chunks = (7, 11, 9) if oc(chunks) is None or order == 3 else oc(chunks)
    if order == 0:
        arr = blob_labels(SHAPE, seed=3)
        out = resample_to_grid(vol_of(arr, a_in, chunks, kind="labels"), shape_out, a_out, order=0, chunks=out_chunks)
        ref = to_grid_reference(arr, a_in, shape_out, a_out, 0)
        assert out.dtype == arr.dtype
        np.testing.assert_array_equal(out.values, ref)
        assert (ref == 0).any() and (ref != 0).any()
    else:
        arr = smooth_random(SHAPE, seed=7)
        out = resample_to_grid(vol_of(arr, a_in, chunks), shape_out, a_out, order=order, chunks=out_chunks)
        ref = to_grid_reference(arr, a_in, shape_out, a_out, order).astype(np.float32)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    np.testing.assert_array_equal(affine_of(out), a_out)


def test_resample_to_grid_rejects_interpolating_labels_and_skips_far_chunks():
    lab = blob_labels(SHAPE, seed=4)
    v = vol_of(lab, np.eye(4), 10, kind="labels")
    with pytest.raises(ValueError, match="order=0"):
        resample_to_grid(v, SHAPE, np.eye(4), order=1)
    far = np.eye(4)
    far[0, 3] = 1000.0
    out = resample_to_grid(v, (5, 5, 5), far, chunks=5)
    assert not out.values.any()


# ---------------------------------------------------------------------------------------------------------
# round trips (label centroids move by less than half a voxel)
# ---------------------------------------------------------------------------------------------------------


def world_centroids(lab, aff):
    out = {}
    for code in np.unique(lab):
        if code == 0:
            continue
        ijk = np.argwhere(lab == code).mean(axis=0)
        out[int(code)] = voxel_to_world(aff, [ijk])[0]
    return out


@pytest.mark.parametrize("method", ["nearest", "majority"])
def test_label_round_trip_right_phantom_moves_centroids_less_than_half_a_voxel(method):
    shape = (60, 50, 40)
    lab = blob_labels(shape, seed=5, codes=(806, 807, 808, 809, 810, 3))
    # a right hemisphere (x < 0), non-RAS and slightly oblique, at 0.12 mm
    a = make_affine([0.12, 0.12, 0.12], deg=4.0, perm=(1, 0, 2), signs=(-1, 1, 1), origin=(-3.0, -10.0, 5.0))
    v = vol_of(lab, a, (17, 23, 40), kind="labels")
    down = resample_labels(v, 0.3, method=method, chunks=(9, 8, 16))
    back = resample_to_grid(down, shape, a, order=0, chunks=(20, 25, 13))
    c0, c1 = world_centroids(lab, a), world_centroids(back.values, a)
    assert set(c0) == set(c1)
    shifts = {k: float(np.linalg.norm(c0[k] - c1[k])) for k in c0}
    assert max(shifts.values()) < 0.5 * 0.3, shifts  # half a 0.3 mm voxel
    assert np.median(list(shifts.values())) < 0.5 * 0.12, shifts


_PHANTOM = Path(__file__).resolve().parents[1] / "helm_dask" / "phantom.py"


@pytest.mark.skipif(not _PHANTOM.exists(), reason="helm_dask.phantom not written yet")
def test_label_round_trip_with_builtin_right_phantom():
    """The built-in right phantom, cropped around its hypothalamus at 0.25 mm, to 0.625 mm (the 0.12 -> 0.3
    ratio, 2.5) and back: no label centroid (five subunits and the fornix) moves by half a coarse voxel."""
    phantom_mod = importlib.import_module("helm_dask.phantom")
    s, s_coarse = 0.25, 0.625
    geom = phantom_mod.phantom_geometry(s, "R")
    lab = phantom_mod.phantom(s, side="R", chunks=24)["hypothalamus"]
    centre = np.round(world_to_voxel(geom["affine"], [geom["hypothalamus_centroid_mm"]])[0]).astype(int)
    half = int(round(9.0 / s))
    crop = tuple(slice(c - half, c + half) for c in centre)
    a = affine_of(lab)
    a[:3, 3] = voxel_to_world(a, [[c.start for c in crop]])[0]
    arr = np.asarray(lab.data[crop].compute())  # once: the phantom itself is not under test here
    assert {806, 807, 808, 809, 810} <= set(np.unique(arr).tolist())
    hyp = arr >= 806  # the crop holds the whole hypothalamus (the fornix is cut)
    assert not (hyp[[0, -1]].any() or hyp[:, [0, -1]].any() or hyp[:, :, [0, -1]].any())
    v = make_volume(da.from_array(arr, chunks=(20, 36, 25)), a, kind="labels")
    c0 = world_centroids(arr, a)
    for method in ("nearest", "majority"):
        down = resample_labels(v, s_coarse, method=method, chunks=(12, 9, 29))
        back = resample_to_grid(down, arr.shape, a, order=0, chunks=(36, 25, 40)).values
        c1 = world_centroids(back, a)
        assert set(c1) == set(c0)
        shifts = {k: float(np.linalg.norm(c0[k] - c1[k])) for k in c0}
        assert max(shifts.values()) < 0.5 * s_coarse, (method, shifts)
