"""Stage 7 (hemisphere mirroring): fit against known medial planes and plain NumPy/SciPy references."""

from __future__ import annotations

import json
import math
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from helm_dask import mirror
from helm_dask.errors import HelmError
from helm_dask.io import regions
from helm_dask.mirror import (
    RIGHT_CODES,
    MirrorTransform,
    fit_mirror,
    mirror_cost,
    mirror_labels,
    rotation_matrix,
    whole_brain_grid,
)
from helm_dask.volume import affine_of, make_volume

# ----------------------------------------------------------------------------------------------------------
# synthetic left hemispheres with a known medial plane
# ----------------------------------------------------------------------------------------------------------

SEMI = (22.0, 30.0, 20.0)  # half-ellipsoid semi-axes (depth x, y, z), mm; flat medial face X = 0


def make_hemisphere(
    *, ry=7.0, rz=-11.0, rx=3.0, semi=SEMI, shape=(34, 70, 50), spacing=1.0, oblique=2.0, shift=(4.0, -3.0, 2.0)
):
    """A half-ellipsoid whose flat medial face (object plane X = 0, normal +X) is placed in the world by a
    known rotation/translation and sampled on a slightly oblique grid. Returns the mask, the affine, the
    object -> world rotation and shift, and the object coordinates of every voxel centre."""
    a, b, c = semi
    rs = rotation_matrix((rx, ry, rz))
    shift = np.asarray(shift, dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = rotation_matrix((0.0, oblique, -oblique)) * spacing
    centre_vox = (np.array(shape) - 1) / 2.0
    aff[:3, 3] = rs @ np.array([-a / 2, 0.0, 0.0]) + shift - aff[:3, :3] @ centre_vox
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    obj = (world - shift) @ rs  # rs^T (p - shift)
    inside = (obj[:, 0] <= 0) & ((obj[:, 0] / a) ** 2 + (obj[:, 1] / b) ** 2 + (obj[:, 2] / c) ** 2 <= 1)
    return inside.reshape(shape).astype(np.uint8), aff, rs, shift, obj.reshape(shape + (3,))


def face_points(rs, shift, semi=SEMI, n=40):
    """World points on the true medial face (inside its ellipse)."""
    _, b, c = semi
    yy, zz = np.meshgrid(np.linspace(-b, b, n), np.linspace(-c, c, n))
    ok = (yy / b) ** 2 + (zz / c) ** 2 <= 0.95
    return np.stack([np.zeros(ok.sum()), yy[ok], zz[ok]], 1) @ rs.T + shift


def mask_points(mask, aff):
    ijk = np.argwhere(mask).astype(np.float64)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


@pytest.fixture(scope="module")
def hemi():
    mask, aff, rs, shift, obj = make_hemisphere()
    return {"mask": mask, "affine": aff, "rs": rs, "shift": shift, "obj": obj}


def as_volume(arr, aff, chunks, kind="mask"):
    return make_volume(da.from_array(arr, chunks=chunks), aff, kind=kind)


@pytest.fixture(scope="module")
def fitted(hemi):
    """One fit per (alpha, chunking), shared by the tests that look at it."""
    cache = {}

    def get(alpha, chunks):
        if (alpha, chunks) not in cache:
            cache[alpha, chunks] = fit_mirror(as_volume(hemi["mask"], hemi["affine"], chunks), alpha=alpha)
        return cache[alpha, chunks]

    return get


# ----------------------------------------------------------------------------------------------------------
# the fit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [2e-3, 5e-4])
def test_fit_finds_the_known_medial_plane(hemi, fitted, alpha):
    tr = fitted(alpha, (17, 25, 20))
    n_vox = int(hemi["mask"].sum())
    assert tr.n_voxels == n_vox
    # the plane's normal is the true face normal (object +X in the world)
    n_true = hemi["rs"][:, 0]
    err_deg = math.degrees(math.acos(min(1.0, float(tr.matrix[0, :3] @ n_true))))
    assert err_deg < 0.5, err_deg
    # the rotation about x and the y/z translations are not identifiable from the cost: R is the smallest
    # rotation taking the normal to +x (its angle, from the trace, is the normal's angle to +x), t_y = t_z = 0
    n = np.asarray(tr.normal)
    np.testing.assert_allclose(tr.matrix[0, :3], n, atol=1e-15)
    assert np.trace(tr.matrix[:3, :3]) == pytest.approx(1.0 + 2.0 * n[0], abs=1e-12)
    np.testing.assert_allclose(rotation_matrix(tr.angles_deg), tr.matrix[:3, :3], atol=1e-12)
    assert tr.translation_mm[1:] == (0.0, 0.0) and tr.search == "sphere" and tr.n_normals == 2006
    # fraction across the plane = alpha (within 20%), measured independently
    x = tr.apply(mask_points(hemi["mask"], hemi["affine"]))[:, 0]
    frac = float(np.mean(x > 0))
    # (the voxel that defines the plane sits on x = 0: through the 4x4 it may land 1e-15 mm across)
    assert tr.fraction_across == pytest.approx(frac, abs=1.0 / n_vox + 1e-12)
    assert abs(frac - alpha) <= 0.2 * alpha, (frac, alpha, alpha * n_vox)
    # the true medial face lies on the plane: its largest distance to x = 0 is far below 2 voxels
    fx = tr.apply(face_points(hemi["rs"], hemi["shift"]))[:, 0]
    assert np.abs(fx).max() < 0.5, np.abs(fx).max()
    assert 0.0 <= tr.gap_mm < 2.0
    # the hemisphere stays on the x < 0 side, the transform is rigid
    assert tr.apply(np.array([tr.centre_mm]))[0, 0] < -5.0
    np.testing.assert_allclose(tr.matrix[:3, :3] @ tr.matrix[:3, :3].T, np.eye(3), atol=1e-12)


def test_exact_quantile_and_cost_equal_plain_numpy(hemi, fitted):
    """Out-of-core t_x, cost and fraction equal a whole-array NumPy computation for the fitted rotation."""
    alpha = 2e-3
    tr = fitted(alpha, (17, 25, 20))
    pts = mask_points(hemi["mask"], hemi["affine"])
    n = len(pts)
    centroid = pts.mean(axis=0)
    np.testing.assert_allclose(tr.centre_mm, centroid, atol=1e-9)
    u = (pts - centroid) @ tr.matrix[0, :3]
    m = int(math.floor(alpha * n)) + 1
    q = np.sort(u)[::-1][m - 1]  # the m-th largest: best t_x in closed form
    assert tr.translation_mm[0] == pytest.approx(-q - centroid[0], abs=1e-9)
    assert tr.cost == pytest.approx(mirror_cost(pts, tr.matrix, alpha), rel=1e-10)
    # the closed-form t_x is a minimum of C along t_x
    for dt in (-0.05, -0.005, 0.005, 0.05):
        shifted = tr.matrix.copy()
        shifted[0, 3] += dt
        assert mirror_cost(pts, shifted, alpha) >= tr.cost - 1e-9


def test_fit_is_chunking_independent(hemi, fitted):
    ref = fitted(2e-3, (17, 25, 20))
    for chunks in [(34, 70, 50), (8, 33, 13), (11, 9, 50)]:
        tr = fitted(2e-3, chunks)
        np.testing.assert_array_equal(tr.matrix, ref.matrix)
        assert (tr.fraction_across, tr.gap_mm, tr.n_voxels, tr.centre_mm) == (
            ref.fraction_across,
            ref.gap_mm,
            ref.n_voxels,
            ref.centre_mm,
        )
        assert tr.cost == pytest.approx(ref.cost, rel=1e-12)  # float sums: last digits may differ


def test_subsample_seed_changes_sample_not_result(hemi):
    vol = as_volume(hemi["mask"], hemi["affine"], (17, 25, 20))
    a = fit_mirror(vol, alpha=2e-3, n_sample=6000, seed=1)
    b = fit_mirror(vol, alpha=2e-3, n_sample=6000, seed=2)
    assert a.n_sample == b.n_sample == 6000
    assert not np.array_equal(a.matrix, b.matrix)  # different samples ...
    na, nb = a.matrix[0, :3], b.matrix[0, :3]
    assert math.degrees(math.acos(min(1.0, float(na @ nb)))) < 1.0  # ... about the same plane
    n_true = hemi["rs"][:, 0]
    assert math.degrees(math.acos(min(1.0, float(na @ n_true)))) < 1.0


def _six_parameter_cost(params, pts, centre, alpha):
    r = rotation_matrix(params[:3])
    x = (pts - centre) @ r[0] + centre[0] + params[3]
    return float(np.maximum(x, 0.0).sum() - alpha * x.sum())


@pytest.mark.parametrize("n_sample", [200_000, 4000])
def test_cost_no_worse_than_dense_nelder_mead(n_sample):
    """A plain Nelder-Mead over all six parameters, from several starts, on all mask voxels, does not beat
    the fit (which chooses the angles on a subsample when n_sample < N, then solves t_x exactly)."""
    mask, aff, _, _, _ = make_hemisphere(semi=(14.0, 20.0, 13.0), shape=(24, 46, 34), ry=-5.0, rz=9.0)
    alpha = 2e-3
    pts = mask_points(mask, aff)
    tr = fit_mirror(as_volume(mask, aff, 16), alpha=alpha, n_sample=n_sample)
    centre = pts.mean(axis=0)
    x_max = float((pts[:, 0]).max())
    rng = np.random.default_rng(0)
    starts = [np.array([0.0, 0.0, 0.0, -x_max, 0.0, 0.0]), np.zeros(6)]
    starts += [
        np.concatenate([rng.uniform(-10, 10, 3), [-x_max + rng.uniform(-3, 3)], rng.uniform(-3, 3, 2)])
        for _ in range(3)
    ]
    best = np.inf
    for x0 in starts:
        res = minimize(
            _six_parameter_cost,
            x0,
            args=(pts, centre, alpha),
            method="Nelder-Mead",
            options={"maxiter": 4000, "maxfev": 4000, "xatol": 1e-7, "fatol": 1e-9},
        )
        best = min(best, float(res.fun))
    ours = mirror_cost(pts, tr.matrix, alpha)
    assert ours == pytest.approx(tr.cost, rel=1e-10)
    tol = 1e-9 * abs(best) if n_sample >= len(pts) else 2e-3 * abs(best)
    assert ours <= best + tol, (ours, best)


def test_gap_reveals_a_wedge(hemi):
    """With the angle search switched off (plane forced to x = const), the tilted face leaves a wedge: the
    gap grows to several voxels, while the fitted plane's gap stays below one voxel."""
    vol = as_volume(hemi["mask"], hemi["affine"], 25)
    forced = fit_mirror(vol, alpha=2e-3, grid_deg=(0.0, 1.0), refine=False)
    assert forced.angles_deg == (0.0, 0.0, 0.0)
    fitted = fit_mirror(vol, alpha=2e-3)
    assert fitted.gap_mm < 1.0 < 3.0 < forced.gap_mm
    assert fitted.cost < forced.cost


def test_fit_warns_when_the_optimum_is_at_the_grid_edge(hemi):
    vol = as_volume(hemi["mask"], hemi["affine"], 25)
    with pytest.warns(RuntimeWarning, match="widen grid_deg"):
        fit_mirror(vol, alpha=2e-3, grid_deg=(4.0, 2.0), refine=False)


def test_axis_aligned_ties_are_exact():
    """A box aligned with the grid: the whole medial layer shares one x value (ties); exact answer."""
    m = np.zeros((30, 20, 20), np.uint8)
    m[5:25, 3:17, 3:17] = 1
    for chunks in (7, 30):
        tr = fit_mirror(as_volume(m, np.diag([0.5, 0.5, 0.5, 1.0]), chunks), alpha=1e-2, grid_deg=(4.0, 2.0))
        assert tr.angles_deg == (0.0, 0.0, 0.0)
        assert tr.translation_mm[0] == pytest.approx(-12.0, abs=1e-12)  # face voxel centres at x = 12 mm
        assert tr.fraction_across == 0.0 and tr.gap_mm == 0.0
        pts = mask_points(m, np.diag([0.5, 0.5, 0.5, 1.0]))
        assert tr.cost == pytest.approx(mirror_cost(pts, tr.matrix, 1e-2), rel=1e-12)


@pytest.mark.parametrize("nbins,max_collect", [(4, 10), (64, 2)])
def test_quantile_refinement_levels_give_the_same_answer(hemi, fitted, monkeypatch, nbins, max_collect):
    """Force the exact quantile through several histogram refinement levels (tiny bins budget)."""
    ref = fitted(2e-3, (17, 25, 20))
    monkeypatch.setattr(mirror.quantile, "_NBINS", nbins)
    monkeypatch.setattr(mirror.quantile, "_MAX_COLLECT", max_collect)
    tr = fit_mirror(as_volume(hemi["mask"], hemi["affine"], (17, 25, 20)), alpha=2e-3)
    np.testing.assert_array_equal(tr.matrix, ref.matrix)
    assert (tr.fraction_across, tr.gap_mm) == (ref.fraction_across, ref.gap_mm)
    assert tr.cost == pytest.approx(ref.cost, rel=1e-10)
    box = np.zeros((12, 10, 10), np.uint8)
    box[2:10, 2:8, 2:8] = 1
    tb = fit_mirror(as_volume(box, np.eye(4), 5), alpha=0.05, grid_deg=(2.0, 2.0))
    assert tb.translation_mm[0] == -9.0 and tb.fraction_across == 0.0


def test_transform_json_roundtrip(tmp_path, fitted):
    tr = fitted(2e-3, (17, 25, 20))
    path = tmp_path / "transform.json"
    tr.save_json(path)
    d = json.loads(path.read_text())
    assert len(d["matrix"]) == 4 and len(d["angles_deg"]) == 3 and "convention" in d
    for key in ("cost", "fraction_across", "gap_mm", "alpha", "n_voxels", "translation_mm"):
        assert key in d
    back = MirrorTransform.load_json(path)
    np.testing.assert_array_equal(back.matrix, tr.matrix)
    np.testing.assert_array_equal(back.bbox_mm, tr.bbox_mm)
    assert (back.angles_deg, back.translation_mm, back.cost, back.gap_mm) == (
        tr.angles_deg,
        tr.translation_mm,
        tr.cost,
        tr.gap_mm,
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HelmError, match="bad.json"):
        MirrorTransform.load_json(bad)
    bad.write_text(json.dumps({"matrix": np.eye(4).tolist()}))
    with pytest.raises(HelmError, match="lacks"):
        MirrorTransform.load_json(bad)


# ----------------------------------------------------------------------------------------------------------
# the whole brain
# ----------------------------------------------------------------------------------------------------------


def make_maps(hemi):
    """Two hemisphere label maps on the mask grid: 'clusters' (uint8, 1..4 in bands) and 'merged' (uint16,
    clusters plus the five hypothalamus codes 801-805 in a patch on the medial face)."""
    mask, obj = hemi["mask"].astype(bool), hemi["obj"]
    clusters = np.where(
        mask, 1 + (np.floor(obj[..., 0] / 3.0).astype(int) + np.floor(obj[..., 1] / 5.0).astype(int)) % 4, 0
    ).astype(np.uint8)
    merged = clusters.astype(np.uint16)
    hyp = mask & (obj[..., 0] > -6) & (np.abs(obj[..., 1]) < 9) & (np.abs(obj[..., 2]) < 7)
    sub = 801 + np.clip(((obj[..., 1] + 9) / 18 * 5).astype(int), 0, 4)
    merged[hyp] = sub[hyp]
    assert set(np.unique(merged[hyp])) == {801, 802, 803, 804, 805}
    return {"clusters": clusters, "merged": merged}


def reference_whole_brain(src, tr, src_aff, grid, mode, codes=RIGHT_CODES):
    """The whole small volume through scipy.ndimage.affine_transform(order=0): x < 0 directly, x > 0 as the
    mirror image (output voxel i takes voxel n - 1 - i) with the left codes renamed."""
    shape, out_aff = grid
    g = np.linalg.inv(src_aff) @ np.linalg.inv(tr.matrix) @ out_aff
    full = ndi.affine_transform(
        src, g[:3, :3], offset=g[:3, 3], output_shape=tuple(shape), order=0, mode=mode, cval=0
    ).astype(np.uint16)
    half = shape[0] // 2
    left = full[:half]
    right = left[::-1].copy()
    for a, b in codes.items():
        right[left[::-1] == a] = b
    return np.concatenate([left, right], axis=0), full


@pytest.mark.parametrize("mode", ["grid-constant", "constant"])
@pytest.mark.parametrize("out_chunks,src_chunks", [(16, (17, 25, 20)), (23, (34, 70, 50)), (64, (9, 31, 13))])
def test_mirror_labels_equals_scipy_affine_transform(hemi, fitted, mode, out_chunks, src_chunks):
    tr = fitted(2e-3, (17, 25, 20))
    maps = make_maps(hemi)
    aff = hemi["affine"]
    vols = {k: as_volume(v, aff, src_chunks, kind="labels") for k, v in maps.items()}
    out = mirror_labels(vols, tr, margin_mm=4.0, chunks=out_chunks, mode=mode)
    grid = whole_brain_grid(None, tr, margin_mm=4.0)
    got = dask.compute(*[out[k].data for k in maps])
    for k, arr in zip(maps, got):
        assert out[k].dtype == np.uint16 and out[k].shape == grid[0]
        np.testing.assert_allclose(affine_of(out[k]), grid[1])
        assert out[k].attrs["kind"] == "labels" and out[k].attrs["provenance"][-1]["stage"] == "mirror.mirror_labels"
        expected, full = reference_whole_brain(maps[k], tr, aff, grid, mode)
        np.testing.assert_array_equal(arr, expected)
        # the x > 0 side is also what the direct mirror map gives (scipy with the flip folded into the matrix;
        # equal up to float ties, which do not occur here)
        n = grid[0][0]
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, n - 1
        g = np.linalg.inv(aff) @ np.linalg.inv(tr.matrix) @ grid[1] @ flip
        direct = ndi.affine_transform(
            maps[k], g[:3, :3], offset=g[:3, 3], output_shape=grid[0], order=0, mode=mode, cval=0
        )
        right_direct = direct[n // 2 :].astype(np.uint16)
        for a, b in RIGHT_CODES.items():
            right_direct[direct[n // 2 :] == a] = b
        np.testing.assert_array_equal(arr[n // 2 :], right_direct)


def test_mirrored_map_is_symmetric(hemi, fitted):
    tr = fitted(5e-4, (17, 25, 20))
    maps = make_maps(hemi)
    out = mirror_labels(as_volume(maps["merged"], hemi["affine"], 20, kind="labels"), tr, chunks=24)
    arr = out.values
    aff = affine_of(out)
    n = arr.shape[0]
    x = aff[0, 3] + aff[0, 0] * np.arange(n)
    np.testing.assert_allclose(x, -x[::-1], atol=1e-9)  # voxel centres symmetric about 0
    assert np.all(x[: n // 2] < 0) and np.all(x[n // 2 :] > 0)
    left, right = arr[: n // 2], arr[n // 2 :][::-1]  # right[i] = voxel n - 1 - i
    for code, rcode in RIGHT_CODES.items():
        assert (left == code).sum() > 0
        np.testing.assert_array_equal(left == code, right == rcode)  # every left code has its right twin
        assert not (arr[n // 2 :] == code).any() and not (arr[: n // 2] == rcode).any()
    clusters = left < 800
    np.testing.assert_array_equal(left[clusters], right[clusters])  # clusters keep their values
    # nearest-neighbour resampling at the same spacing keeps the hemisphere's volume (within 3%)
    n_vox = int(hemi["mask"].sum())
    assert abs((left > 0).sum() / n_vox - 1) < 0.03
    # the hemisphere touches the plane: labels in the voxel layer next to x = 0, on both sides
    assert (arr[n // 2 - 1] > 0).sum() > 100 and (arr[n // 2] > 0).sum() == (arr[n // 2 - 1] > 0).sum()


def test_whole_brain_grid_covers_both_hemispheres(hemi, fitted):
    tr = fitted(2e-3, (17, 25, 20))
    vol = as_volume(hemi["mask"], hemi["affine"], 20)
    shape, aff = whole_brain_grid(vol, tr, margin_mm=10.0)
    assert (shape, aff.tolist()) == (lambda s, a: (s, a.tolist()))(*whole_brain_grid(None, tr, margin_mm=10.0))
    assert shape[0] % 2 == 0
    np.testing.assert_allclose(aff, np.diag([1.0, 1.0, 1.0, 1.0]) + np.pad(aff[:3, 3:], ((0, 1), (3, 0))))
    pts = tr.apply(mask_points(hemi["mask"], hemi["affine"]))
    for sign in (1.0, -1.0):
        p = pts * np.array([sign, 1.0, 1.0])
        ijk = (p - aff[:3, 3]) / np.diag(aff)[:3]
        assert np.all(ijk >= 10.0 - 1e-6) and np.all(ijk <= np.array(shape) - 1 - 10.0 + 1e-6)
    shape2, aff2 = whole_brain_grid(None, tr, spacing_mm=0.5, margin_mm=10.0)
    assert np.allclose(np.diag(aff2)[:3], 0.5) and shape2[0] % 2 == 0 and shape2[1] >= 2 * shape[1] - 2


def test_empty_output_chunks_read_nothing(hemi, fitted):
    tr = fitted(2e-3, (17, 25, 20))
    maps = make_maps(hemi)
    vol = as_volume(maps["clusters"], hemi["affine"], 20, kind="labels")
    out = mirror_labels(vol, tr, margin_mm=24.0, chunks=16)
    layers = out.data.__dask_graph__().layers
    (layer,) = [v for k, v in layers.items() if str(k).startswith("mirror-gather")]
    tasks = [layer[k] for k in layer]
    gathers = [t for t in tasks if t[0] is regions._region_task]
    zeros = [t for t in tasks if t[0] is regions._full and t[3] == 0]
    assert len(tasks) == math.prod(len(c) for c in out.data.chunks)  # one task per output chunk
    assert len(gathers) + len(zeros) == len(tasks)
    assert 0 < len(gathers) < 0.6 * len(tasks)  # far-out chunks: zeros, no read
    # each gather depends on source chunks only (no intermediate slicing tasks), never on all of them
    src_names = {vol.data.name}
    for t in gathers:
        keys = [key for per_map in t[1] for key in per_map]
        assert {key[0] for key in keys} == src_names and len(keys) < vol.data.npartitions
    expected, _ = reference_whole_brain(
        maps["clusters"], tr, hemi["affine"], whole_brain_grid(None, tr, margin_mm=24.0), "grid-constant"
    )
    np.testing.assert_array_equal(out.values, expected)


def test_store_backed_maps_are_read_region_by_region(tmp_path, hemi, fitted):
    """Maps opened from helm-dask stores: each gather reads its own source region (the gather layer has no
    dependency, so no source chunk is held between tasks); a map that is not store-backed in the same call
    still goes through its chunks. Same result as the whole-array reference either way."""
    from helm_dask.io.store import open_volume, save_volume

    tr = fitted(2e-3, (17, 25, 20))
    maps = make_maps(hemi)
    aff = hemi["affine"]
    stored = open_volume(
        save_volume(as_volume(maps["merged"], aff, 12, kind="labels"), tmp_path / "m.zarr", pyramid=False)
    )
    assert regions.zarr_array_of(stored.data) is not None
    assert regions.zarr_array_of(stored.data + 0) is None  # derived data: generic path
    in_memory = as_volume(maps["clusters"], aff, 15, kind="labels")
    for vols, n_deps in (({"merged": stored}, 0), ({"merged": stored, "clusters": in_memory}, 1)):
        out = mirror_labels(vols, tr, margin_mm=4.0, chunks=20)
        graph = out["merged"].data.__dask_graph__()
        (name,) = [k for k in graph.layers if str(k).startswith("mirror-gather")]
        assert len(graph.dependencies[name]) == n_deps
        got = dask.compute(*[o.data for o in out.values()])
        grid = whole_brain_grid(None, tr, margin_mm=4.0)
        for key, arr in zip(out, got):
            np.testing.assert_array_equal(arr, reference_whole_brain(maps[key], tr, aff, grid, "grid-constant")[0])


def _shifted_transform(dx_mm):
    """x -> x + dx_mm, nothing else (an axis-aligned fit)."""
    m = np.eye(4)
    m[0, 3] = dx_mm
    return MirrorTransform(m, (0, 0, 0), (dx_mm, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)


@pytest.mark.parametrize("mode", ["grid-constant", "constant"])
def test_compiled_gather_rounds_ties_like_scipy(mode):
    """Output voxels half as big as the source's, on an axis-aligned grid: source indices fall exactly on .5 (and
    on the outer half-voxel edges), where ``floor(c + 0.5)`` decides; the compiled gather must pick scipy's voxel
    every time, on both sides of the plane."""
    rng = np.random.default_rng(5)
    src = rng.integers(1, 9, (9, 7, 6)).astype(np.uint16)
    src[rng.random(src.shape) < 0.3] = 0
    src[8, 2:5, 1:4] = 801 + np.arange(3)[:, None]  # left codes on the medial face
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    tr = _shifted_transform(-9.0)  # source x = 0..8 mm -> -9..-1 mm, the medial face at -0.5
    grid = ((44, 18, 16), np.diag([0.5, 0.5, 0.5, 1.0]))
    grid[1][:3, 3] = (0.25 - 11.0, -1.5, -1.0)  # x centres symmetric about 0; y, z: ties, and 1-1.5 mm past the edges
    c = (np.linalg.inv(tr.matrix) @ grid[1])[:3, :3].diagonal()
    assert np.all(c == 0.5)
    out = mirror_labels(as_volume(src, aff, (4, 3, 5), kind="labels"), tr, grid=grid, chunks=7, mode=mode).values
    expected, full = reference_whole_brain(src, tr, aff, grid, mode)
    assert (full[:22] > 800).any() and (expected[22:] > 805).any()
    np.testing.assert_array_equal(out, expected)


def test_wide_and_bool_maps_and_codes_beyond_uint16():
    """int32 and bool maps gather like uint16 ones; a value uint16 cannot hold is refused where it is gathered,
    and only there."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 6, (8, 6, 5)).astype(np.uint16)
    aff = np.eye(4)
    tr = _shifted_transform(-8.0)
    grid = ((18, 8, 7), np.eye(4))
    grid[1][:3, 3] = (-8.5, -1.0, -1.0)
    ref = mirror_labels(as_volume(src, aff, 4, kind="labels"), tr, grid=grid, chunks=5).values
    wide = mirror_labels(as_volume(src.astype(np.int32), aff, 4, kind="labels"), tr, grid=grid, chunks=5).values
    np.testing.assert_array_equal(wide, ref)
    flags = mirror_labels(as_volume(src > 2, aff, 4, kind="labels"), tr, grid=grid, chunks=5).values
    np.testing.assert_array_equal(flags, ref > 2)
    big = src.astype(np.int64)
    big[3, 2, 2] = 70000
    with pytest.raises(HelmError, match="outside 0..65535"):
        mirror_labels(as_volume(big, aff, 4, kind="labels"), tr, grid=grid, chunks=5).compute()
    big[3, 2, 2] = -1
    with pytest.raises(HelmError, match="outside 0..65535"):
        mirror_labels(as_volume(big, aff, 4, kind="labels"), tr, grid=grid, chunks=5).compute()
    # a grid that reaches only source x >= 4: the out-of-range voxel at x = 3 is read (its box) but never gathered
    part = ((8, 8, 7), grid[1].copy())
    part[1][0, 3] = -3.5
    got = mirror_labels(as_volume(big, aff, 8, kind="labels"), tr, grid=part, chunks=8).values
    np.testing.assert_array_equal(got, reference_whole_brain(src, tr, aff, part, "grid-constant")[0])


# ----------------------------------------------------------------------------------------------------------
# the built-in phantom (RAS+ via stage 1), whose medial plane is known
# ----------------------------------------------------------------------------------------------------------


def test_phantom_medial_plane():
    phantom_mod = pytest.importorskip("helm_dask.phantom")
    orient = pytest.importorskip("helm_dask.orient")
    spacing = 2.0
    mask = orient.to_ras(phantom_mod.phantom(spacing, side="L", chunks=40)["truth_mask"])
    plane = phantom_mod.phantom_geometry(spacing, "L")["medial_plane"]
    tr = fit_mirror(mask, alpha=2e-3)
    normal = np.asarray(plane["normal"], dtype=np.float64)
    err = math.degrees(math.acos(min(1.0, float(tr.matrix[0, :3] @ normal / np.linalg.norm(normal)))))
    assert err < 0.1, err
    # The phantom's voxel grid is aligned with its object frame, so the medial face is one voxel layer whose
    # voxels all share one x: the exact minimiser of C puts that layer ON the plane and nothing across it
    # (no tilt can reach a fraction of alpha without costing more). Never more than alpha across:
    assert tr.fraction_across <= 1.2 * 2e-3
    pts = tr.apply(np.argwhere(mask.values).astype(float) @ affine_of(mask)[:3, :3].T + affine_of(mask)[:3, 3])
    assert np.mean(pts[:, 0] > spacing / 4) <= 1.2 * 2e-3 and np.mean(pts[:, 0] > -spacing / 4) > 5e-3
    assert tr.gap_mm < 2 * spacing
    # the true medial plane's point lands on x = 0 (within a voxel)
    assert abs(tr.apply(np.asarray(plane["point_mm"], dtype=np.float64)[None])[0, 0]) < spacing


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs(hemi, fitted):
    aff = hemi["affine"]
    with pytest.raises(HelmError, match="empty"):
        fit_mirror(as_volume(np.zeros((8, 8, 8), np.uint8), aff, 4))
    vol = as_volume(hemi["mask"], aff, 20)
    for alpha in (0.0, -1e-3, 0.6, "x"):
        with pytest.raises(HelmError, match="alpha"):
            fit_mirror(vol, alpha=alpha)
    with pytest.raises(HelmError, match="3-D"):
        fit_mirror(make_volume(da.zeros((4, 4, 4, 2), dtype=np.uint8), aff, kind="mask"))
    with pytest.raises(HelmError, match="volume"):
        fit_mirror(hemi["mask"])
    for grid_deg in ((30.0, 0.0), (90.0, 2.0), (30.0,), "x"):
        with pytest.raises(HelmError, match="grid_deg"):
            fit_mirror(vol, grid_deg=grid_deg)
    for n_sample in (10, 2.5, True):
        with pytest.raises(HelmError, match="n_sample"):
            fit_mirror(vol, n_sample=n_sample)
    with pytest.raises(HelmError, match="seed"):
        fit_mirror(vol, seed=-1)
    for n_normals in (10, 2.5, True):
        with pytest.raises(HelmError, match="n_normals"):
            fit_mirror(vol, n_normals=n_normals)
    tr = fitted(2e-3, (17, 25, 20))
    maps = make_maps(hemi)
    good = as_volume(maps["clusters"], aff, 20, kind="labels")
    shifted = aff.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(HelmError, match="same voxel grid"):
        mirror_labels({4: good, 5: as_volume(maps["merged"], shifted, 20, kind="labels")}, tr)
    with pytest.raises(HelmError, match="integer"):
        mirror_labels(as_volume(maps["clusters"].astype(np.float32), aff, 20, kind="image"), tr)
    with pytest.raises(HelmError, match="even number"):
        mirror_labels(good, tr, grid=((9, 9, 9), np.eye(4)))
    with pytest.raises(HelmError, match="mode"):
        mirror_labels(good, tr, mode="nearest")
    with pytest.raises(HelmError, match="no label map"):
        mirror_labels({}, tr)
    no_box = MirrorTransform(np.eye(4), (0, 0, 0), (0, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)
    with pytest.raises(HelmError, match="bounding box"):
        whole_brain_grid(None, no_box)
    with pytest.raises(HelmError, match="margin"):
        whole_brain_grid(None, tr, margin_mm=-1.0)
    with pytest.raises(HelmError, match="spacing_mm"):
        whole_brain_grid(None, tr, spacing_mm=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole_brain_grid(None, tr)


# ----------------------------------------------------------------------------------------------------------
# the global search: a header rotated by any angle about any axis (the phantom's medial face points anywhere)
# ----------------------------------------------------------------------------------------------------------

PH_SPACING = 2.0
PH_ALPHA = 5e-4


def axis_rotation(axis, deg):
    """3x3 rotation by ``deg`` degrees about world axis ``axis`` (0, 1, 2 = x, y, z, or a 3-vector)."""
    k = np.eye(3)[axis] if isinstance(axis, int) else np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = math.radians(deg)
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def brute_costs(points_c, normals, alpha):
    """C for each normal with its closed-form t_x (the m-th largest projection on x = 0), on every point.

    ``C = sum_(x > 0) x - alpha sum x``: after a partition at the m-th largest projection q, the terms
    with x > 0 are exactly those above it, and ``sum x = n . sum(points) - N q``."""
    n = len(points_c)
    m = int(math.floor(alpha * n)) + 1
    pt = np.ascontiguousarray(points_c.T)
    total = normals @ pt.sum(axis=1)
    out = np.empty(len(normals))
    for s in range(0, len(normals), 8):
        u = np.partition(normals[s : s + 8] @ pt, n - m, axis=1)
        q = u[:, n - m]
        out[s : s + 8] = np.maximum(u[:, n - m + 1 :] - q[:, None], 0.0).sum(axis=1) - alpha * (
            total[s : s + 8] - n * q
        )
    return out


def tangent_patch(n0, half_deg, step_deg):
    """A square grid of normals around ``n0`` (gnomonic: n0 + tan(a) e1 + tan(b) e2, normalised)."""
    e1 = np.cross(n0, [0.0, 0.0, 1.0] if abs(n0[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n0, e1)
    t = np.tan(np.radians(np.arange(-half_deg, half_deg + step_deg / 2, step_deg)))
    a, b = np.meshgrid(t, t, indexing="ij")
    p = n0 + a.reshape(-1, 1) * e1 + b.reshape(-1, 1) * e2
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def brute_force_normal(points, alpha):
    """An independent exhaustive search: a 2-degree latitude-longitude grid over the whole sphere (rings of
    ~equal spacing: ~10 000 normals), then dense 0.1-degree patches (+-3 degrees) around the three best
    distinct grid minima, then a 0.004-degree patch (+-0.12 degrees) around the best; all on every point.
    Returns (normal, cost)."""
    pc = points - points.mean(axis=0)
    grid = []
    for theta in np.radians(np.arange(0.0, 180.1, 2.0)):
        k = max(1, int(round(180 * math.sin(theta))))
        phi = np.arange(k) * (2 * math.pi / k)
        grid.append(
            np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.full(k, math.cos(theta))], -1)
        )
    grid = np.concatenate(grid)
    costs = brute_costs(pc, grid, alpha)
    starts = []
    for i in np.argsort(costs, kind="stable"):
        if all(grid[i] @ grid[j] < math.cos(math.radians(10.0)) for j in starts):
            starts.append(i)
        if len(starts) == 3:
            break
    best_n, best_c = None, np.inf
    for i in starts:
        patch = tangent_patch(grid[i], 3.0, 0.1)
        c = brute_costs(pc, patch, alpha)
        if c.min() < best_c:
            best_n, best_c = patch[np.argmin(c)], float(c.min())
    patch = tangent_patch(best_n, 0.12, 0.004)
    c = brute_costs(pc, patch, alpha)
    if c.min() < best_c:
        best_n, best_c = patch[np.argmin(c)], float(c.min())
    return best_n, best_c


@pytest.fixture(scope="module")
def ph_mask():
    """The phantom's true mask in RAS+ (in memory), its medial-plane normal, and the brute-force optimum.

    The cost of a normal is invariant under a rigid rotation of the header applied to both (the voxel
    centres rotate, the normal with them): one brute-force search in the stored frame serves every rotated
    header below (each case also re-evaluates it in its own frame)."""
    phantom_mod = pytest.importorskip("helm_dask.phantom")
    orient = pytest.importorskip("helm_dask.orient")
    mask = orient.to_ras(phantom_mod.phantom(PH_SPACING, side="L", chunks=40)["truth_mask"])
    arr = np.asarray(mask.values)
    aff = affine_of(mask)
    normal = np.asarray(phantom_mod.phantom_geometry(PH_SPACING, "L")["medial_plane"]["normal"], float)
    pts = mask_points(arr, aff)
    with threadpool_limits(limits=1, user_api="blas"):  # thin products: one BLAS thread is 5x faster here
        bn, bc = brute_force_normal(pts, PH_ALPHA)
    fov_centre = aff[:3, :3] @ ((np.array(arr.shape) - 1) / 2.0) + aff[:3, 3]
    return {
        "arr": arr,
        "affine": aff,
        "normal": normal / np.linalg.norm(normal),
        "points": pts,
        "brute_normal": bn,
        "brute_cost": bc,
        "fov_centre": fov_centre,
    }


def angle_deg(a, b):
    return math.degrees(math.acos(max(-1.0, min(1.0, float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))))))


def test_brute_force_finds_the_phantom_plane(ph_mask):
    """The reference itself: the brute-force optimum is the phantom's true medial plane, and its cost formula
    is the plain one (mirror_cost with the m-th largest projection on x = 0)."""
    assert angle_deg(ph_mask["brute_normal"], ph_mask["normal"]) < 0.5
    pts = ph_mask["points"]
    pc = pts - pts.mean(axis=0)
    m = int(math.floor(PH_ALPHA * len(pts))) + 1
    for normal in (ph_mask["brute_normal"], ph_mask["normal"], np.array([0.0, 0.6, 0.8])):
        u = pc @ normal
        mat = np.eye(4)
        mat[:3, :3] = mirror.minimal_rotation(normal)
        mat[0, 3] = -(normal @ pts.mean(axis=0)) - np.sort(u)[::-1][m - 1]
        assert brute_costs(pc, normal[None], PH_ALPHA)[0] == pytest.approx(mirror_cost(pts, mat, PH_ALPHA), rel=1e-9)


@pytest.mark.parametrize(
    "axis,deg", [(0, 0.0)] + [(a, d) for a in range(3) for d in (30.0, 60.0, 90.0)] + [((1, 2, 3), 150.0), (2, 180.0)]
)
def test_fit_is_global_under_any_header_rotation(ph_mask, axis, deg):
    """Header rotated (about the FOV centre) by 0-90 degrees about x, y or z (and by 150 degrees about an
    oblique axis, 180 about z: the medial face then points towards -x): the fitted plane is the true medial
    plane rotated the same way, and the fit is at least as good as the exhaustive search."""
    q3 = axis_rotation(axis, deg)
    q = np.eye(4)
    q[:3, :3] = q3
    q[:3, 3] = ph_mask["fov_centre"] - q3 @ ph_mask["fov_centre"]
    aff = q @ ph_mask["affine"]
    tr = fit_mirror(as_volume(ph_mask["arr"], aff, (21, 40, 33)), alpha=PH_ALPHA)
    n = np.asarray(tr.normal)
    assert angle_deg(n, q3 @ ph_mask["normal"]) < 2.0
    assert angle_deg(n, q3 @ ph_mask["brute_normal"]) < 2.0
    # no better plane exists on the exhaustive grid (the same search, re-evaluated in this frame)
    pts = ph_mask["points"] @ q3.T + q[:3, 3]
    pc = pts - pts.mean(axis=0)
    brute_here = float(brute_costs(pc, (q3 @ ph_mask["brute_normal"])[None], PH_ALPHA)[0])
    assert brute_here == pytest.approx(ph_mask["brute_cost"], rel=1e-9)
    assert tr.cost == pytest.approx(mirror_cost(pts, tr.matrix, PH_ALPHA), rel=1e-10)
    assert tr.cost <= ph_mask["brute_cost"] * (1 + 1e-9)
    # the conventions: the hemisphere on x < 0 against the plane x = 0, the smallest rotation to +x
    x = tr.apply(pts)[:, 0]
    assert np.mean(x > 0) <= 1.2 * PH_ALPHA and x.max() < 1.0 and np.median(x) < -10.0
    np.testing.assert_allclose(tr.matrix[0, :3], n, atol=1e-15)
    np.testing.assert_allclose(tr.matrix[:3, :3] @ tr.matrix[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.trace(tr.matrix[:3, :3]) == pytest.approx(1.0 + 2.0 * n[0], abs=1e-12)
    assert tr.search == "sphere"


def test_global_search_equals_the_local_one_on_an_untilted_scan(ph_mask, hemi, fitted):
    """Where the former +-30 degree search sufficed, the global one gives the same plane."""
    for arr, aff, alpha, cached in (
        (ph_mask["arr"], ph_mask["affine"], PH_ALPHA, None),
        (hemi["mask"], hemi["affine"], 2e-3, fitted(2e-3, (17, 25, 20))),
    ):
        vol = as_volume(arr, aff, 25)
        loc = fit_mirror(vol, alpha=alpha, grid_deg=(30.0, 2.0))
        glob = cached or fit_mirror(vol, alpha=alpha)
        assert loc.search == "grid" and glob.search == "sphere"
        assert angle_deg(loc.normal, glob.normal) < 0.05
        assert glob.cost == pytest.approx(loc.cost, rel=1e-4)
        np.testing.assert_allclose(glob.matrix, loc.matrix, atol=0.05)


def test_minimal_rotation_and_euler_angles():
    rng = np.random.default_rng(3)
    normals = np.concatenate(
        [rng.normal(size=(200, 3)), mirror._AXES, [[-1.0, 1e-9, 0.0], [-1.0, 0.0, -1e-12], [-1.0, 1e-5, 1e-5]]]
    )
    for v in normals:
        n = v / np.linalg.norm(v)
        r = mirror.minimal_rotation(v)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(r @ n, [1.0, 0.0, 0.0], atol=1e-12)
        # minimal: the rotation angle (from the trace) is the angle between n and +x
        assert np.trace(r) == pytest.approx(1.0 + 2.0 * n[0], abs=1e-9)
        np.testing.assert_allclose(rotation_matrix(mirror.euler_angles(r)), r, atol=1e-12)
    np.testing.assert_array_equal(mirror.minimal_rotation([2.0, 0, 0]), np.eye(3))
    np.testing.assert_array_equal(mirror.minimal_rotation([-1.0, 0, 0]), np.diag([-1.0, -1.0, 1.0]))
    assert mirror.euler_angles(np.eye(3)) == (0.0, 0.0, 0.0)
    p = mirror.sphere_normals(2000)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0)
    # every direction has a lattice normal within the spacing (4.5 degrees at 2000 normals)
    probe = rng.normal(size=(2000, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    assert math.degrees(math.acos(float((probe @ p.T).max(axis=1).min()))) < 4.5


def test_old_transform_json_without_the_new_fields(tmp_path, fitted):
    """A transform.json written before ``normal``/``search`` existed still loads (normal from the matrix)."""
    tr = fitted(2e-3, (17, 25, 20))
    d = tr.to_dict()
    assert d["normal"] == list(tr.normal) and d["search"] == "sphere"
    for k in ("normal", "search", "n_normals"):
        del d[k]
    back = MirrorTransform.from_dict(d)
    np.testing.assert_allclose(back.normal, tr.normal, atol=1e-15)
    assert back.search is None


# ----------------------------------------------------------------------------------------------------------
# the anatomical check: the hypothalamus lies on the fitted plane
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ph_labels(ph_mask):
    phantom_mod = pytest.importorskip("helm_dask.phantom")
    orient = pytest.importorskip("helm_dask.orient")
    lab = orient.to_ras(phantom_mod.phantom(PH_SPACING, side="L", chunks=40)["hypothalamus"])
    tr = fit_mirror(as_volume(ph_mask["arr"], ph_mask["affine"], 40), alpha=PH_ALPHA)
    return np.asarray(lab.values), affine_of(lab), tr


def test_hypothalamus_on_the_medial_face_passes(ph_labels):
    lab, aff, tr = ph_labels
    ref = None
    for chunks in ((41, 96, 65), (7, 13, 11)):
        r = mirror.check_hypothalamus_plane(tr, as_volume(lab, aff, chunks, kind="labels"))
        assert r["ok"] and r["codes"] == "801-810"
        # plain NumPy: the subunits' world centroid and their distances from the plane (x after T)
        sel = (lab >= 801) & (lab <= 810)
        pts = mask_points(sel, aff)
        d = tr.apply(pts)[:, 0]
        np.testing.assert_allclose(r["centroid_mm"], pts.mean(axis=0), atol=1e-9)
        assert r["centroid_distance_mm"] == pytest.approx(d.mean(), abs=1e-9)
        assert r["n_voxels"] == int(sel.sum())
        assert r["min_distance_mm"] == pytest.approx(d.min(), abs=1e-9)
        assert r["max_distance_mm"] == pytest.approx(d.max(), abs=1e-9)
        assert np.quantile(np.abs(d), 0.9) - 1e-9 <= r["p90_distance_mm"] <= np.quantile(np.abs(d), 0.9) + 0.01 + 1e-9
        assert abs(r["centroid_distance_mm"]) < 5.0 and r["p90_distance_mm"] < 10.0
        assert ref is None or r == ref  # the same numbers for every chunking
        ref = r
    # only the fornix (250): the fallback uses every nonzero voxel
    fornix = np.where(lab == 250, lab, 0)
    r = mirror.check_hypothalamus_plane(tr, as_volume(fornix, aff, 20, kind="labels"))
    assert r["codes"] == "nonzero" and r["n_voxels"] == int((lab == 250).sum())
    r = mirror.check_hypothalamus_plane(tr, as_volume(lab, aff, 20, kind="labels"), codes=[801, 802])
    assert r["codes"] == [801, 802] and r["n_voxels"] == int(np.isin(lab, [801, 802]).sum())


@pytest.mark.parametrize("away_mm", [30.0, -30.0])
def test_hypothalamus_far_from_the_plane_is_refused(ph_labels, away_mm):
    """Labels moved 30 mm off the plane (along its normal, either way): one clear line naming the causes."""
    lab, aff, tr = ph_labels
    moved = aff.copy()
    moved[:3, 3] += away_mm * np.asarray(tr.normal)
    with pytest.raises(HelmError) as err:
        mirror.check_hypothalamus_plane(tr, as_volume(lab, moved, 20, kind="labels"), path="hyp.nii.gz")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("hyp.nii.gz: ")
    for cause in ("another scan or subject", "header (affine)", "brain mask", "from the fitted mirror plane"):
        assert cause in msg
    # 14 mm off: still accepted with the default limit, refused with a tighter one
    near = aff.copy()
    near[:3, 3] -= 12.0 * np.asarray(tr.normal)
    r = mirror.check_hypothalamus_plane(tr, as_volume(lab, near, 20, kind="labels"))
    assert 10.0 < -r["centroid_distance_mm"] < 15.0
    with pytest.raises(HelmError, match="at most 8 mm"):
        mirror.check_hypothalamus_plane(tr, as_volume(lab, near, 20, kind="labels"), max_distance_mm=8.0)
    with pytest.raises(HelmError, match="empty"):
        mirror.check_hypothalamus_plane(tr, as_volume(np.zeros_like(lab), aff, 20, kind="labels"))
    with pytest.raises(HelmError, match="max_distance_mm"):
        mirror.check_hypothalamus_plane(tr, as_volume(lab, aff, 20, kind="labels"), max_distance_mm=0.0)


@pytest.mark.parametrize("chunks", [16, 23, 40, 200])
def test_reflected_write_equals_the_whole_gather(tmp_path, hemi, fitted, chunks):
    """save_volumes(reflect=...): the x > 0 half read back from the written x < 0 half (reversed, renamed through
    reflection_lut) is the gathered half bit for bit, at every pyramid level; chunkings where n / 2 falls inside
    a chunk, on a boundary of none, and one chunk for the whole x axis (nothing to read back)."""
    from helm_dask.io.store import open_volume, save_volumes
    from helm_dask.mirror import reflection_lut

    tr = fitted(2e-3, (17, 25, 20))
    maps = make_maps(hemi)
    vols = {k: as_volume(v, hemi["affine"], 20, kind="labels") for k, v in maps.items()}
    extra = {803: 2803}  # a renaming beyond RIGHT_CODES, as --extra-labels gives
    out = mirror_labels(vols, tr, margin_mm=4.0, chunks=chunks, right_codes={**RIGHT_CODES, **extra})
    lut = reflection_lut({**RIGHT_CODES, **extra})
    whole = {tmp_path / f"w_{k}.zarr": v for k, v in out.items()}
    halves = {tmp_path / f"r_{k}.zarr": v for k, v in out.items()}
    save_volumes(whole, chunks=chunks)
    save_volumes(halves, chunks=chunks, reflect=dict.fromkeys(halves, lut))
    n = next(iter(out.values())).shape[0]
    assert n % 2 == 0
    for k in out:
        a, b = open_volume(tmp_path / f"w_{k}.zarr"), open_volume(tmp_path / f"r_{k}.zarr")
        np.testing.assert_array_equal(a.values, b.values)
        assert (a.values[n // 2 :] == 2803).any() == (k == "merged")
        np.testing.assert_array_equal(affine_of(a), affine_of(b))
        for level in ("pyramid/1", "pyramid/2"):  # the levels a volume this small has, if any
            paths = [tmp_path / f"{p}_{k}.zarr" / level for p in ("w", "r")]
            assert paths[0].exists() == paths[1].exists()
            if paths[0].exists():
                za, zb = (zarr.open_array(p, mode="r") for p in paths)
                np.testing.assert_array_equal(za[...], zb[...])
    assert reflection_lut({0: 5}) is None  # a table renaming 0 would not give the gather's zeros


# -- the fit's compiled block passes against their plain NumPy forms ----------------------------------------------


def _stats_block_numpy(block, offset, shape, k, key):
    """Pass 1 of the fit in NumPy: flatnonzero, unravel_index, the hash on whole arrays (the earlier code)."""
    sel = np.asarray(block) != 0
    flat = np.flatnonzero(sel)
    if flat.size == 0:
        return (0, (0, 0, 0), None, np.empty(0, np.uint64), np.empty(0, np.int64))
    g = [loc.astype(np.int64) + offset[d] for d, loc in enumerate(np.unravel_index(flat, sel.shape))]
    lin = (g[0] * shape[1] + g[1]) * shape[2] + g[2]
    h = mirror.fit._splitmix64(lin.astype(np.uint64) ^ np.uint64(key))
    if h.size > k:
        keep = np.argpartition(h, k - 1)[:k]
        h, lin = h[keep], lin[keep]
    sums = tuple(int(gd.sum()) for gd in g)
    return (int(flat.size), sums, tuple((int(gd.min()), int(gd.max())) for gd in g), h, lin)


def _lin_numpy(block, offset, w, b):
    """``((b + w0 i) + w1 j) + w2 k`` on the whole block, then its nonzero voxels selected (C order)."""
    sel = np.asarray(block) != 0
    i, j, k = (np.arange(o, o + n, dtype=np.float64) for o, n in zip(offset, sel.shape))
    return (((b + w[0] * i)[:, None, None] + (w[1] * j)[None, :, None]) + (w[2] * k)[None, None, :])[sel]


def _bin_of_numpy(u, lo, inv_w):
    return np.clip(np.floor((u - lo) * inv_w), 0, mirror.quantile._NBINS - 1).astype(np.int64)


def _select_numpy(u, levels):
    for lo, inv_w, target in levels:
        u = u[_bin_of_numpy(u, lo, inv_w) == target]
    return u


def _hist_block_numpy(block, offset, geom, levels, level, columns):
    """The exact quantile's histogram pass in NumPy: values on the whole block, boolean selection,
    ``maximum.at`` for the columns, ``bincount`` (the earlier code)."""

    def lin(w, b):
        return _lin_numpy(block, offset, w, b)

    u = lin(geom["w"], geom["b"])
    col = None
    if columns and u.size:
        iy = np.floor((lin(geom["wy"], geom["by"]) - geom["y0"]) * geom["inv_col"]).astype(np.int64)
        iz = np.floor((lin(geom["wz"], geom["bz"]) - geom["z0"]) * geom["inv_col"]).astype(np.int64)
        arr = np.full((iy.max() - iy.min() + 1, iz.max() - iz.min() + 1), -np.inf)
        np.maximum.at(arr, (iy - iy.min(), iz - iz.min()), u)
        col = (int(iy.min()), int(iz.min()), arr)
    total = float(u.sum())
    u = _select_numpy(u, levels)
    b = _bin_of_numpy(u, *level)
    n = mirror.quantile._NBINS
    return (np.bincount(b, minlength=n), np.bincount(b, weights=u, minlength=n).astype(np.float64), total, col)


def _collect_block_numpy(block, offset, geom, levels):
    """The collect pass in NumPy: the values inside every level's bin, then their distinct values and counts."""
    return np.unique(_select_numpy(_lin_numpy(block, offset, geom["w"], geom["b"]), levels), return_counts=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.uint16])
def test_compiled_fit_passes_equal_numpy_bit_for_bit(dtype):
    """The compiled pass-1 statistics, histogram (with the footprint columns) and collect of the mirror fit give
    the same integers and the same float64 bits as their NumPy forms, for random blocks, offsets and levels."""
    rng = np.random.default_rng(7)
    for trial in range(30):
        sh = tuple(int(v) for v in rng.integers(1, 24, 3))
        blk = (rng.random(sh) < (0.0, 0.3, 1.0)[trial % 3]).astype(dtype)
        off = tuple(int(v) for v in rng.integers(0, 400, 3))
        shape = tuple(o + s + 3 for o, s in zip(off, sh))
        key, kk = int(rng.integers(0, 2**63)), int(rng.integers(1, 300))
        got, ref = mirror.fit._stats_block(blk, off, shape, kk, key), _stats_block_numpy(blk, off, shape, kk, key)
        assert got[:3] == ref[:3]
        np.testing.assert_array_equal(got[3], ref[3])
        np.testing.assert_array_equal(got[4], ref[4])
        geom = {"b": float(rng.normal()), "by": 0.7, "bz": -1.3, "y0": -250.0, "z0": -180.0, "inv_col": 1 / 0.6}
        geom.update(w=rng.normal(size=3) * 0.3, wy=rng.normal(size=3) * 0.3, wz=rng.normal(size=3) * 0.3)
        lo, inv_w = -300.0, mirror.quantile._NBINS / 600.0
        levels = () if trial % 2 else ((lo, inv_w, int(rng.integers(20000, 40000))),)
        for lv, cols in (((), True), (levels, False)):
            g = mirror.quantile._hist_block(blk, off, geom, lv, (lo, inv_w), cols)
            r = _hist_block_numpy(blk, off, geom, lv, (lo, inv_w), cols)
            np.testing.assert_array_equal(g[0], r[0])
            assert g[1].tobytes() == r[1].tobytes() and g[2] == r[2]
            assert (g[3] is None) == (r[3] is None)
            if g[3] is not None:
                assert g[3][:2] == r[3][:2] and g[3][2].tobytes() == r[3][2].tobytes()
        vals, cnts = mirror.quantile._collect_block(blk, off, geom, levels)
        ref_u = _hist_block_numpy(blk, off, geom, (), (lo, inv_w), False)
        assert cnts.sum() == (ref_u[0].sum() if not levels else ref_u[0][levels[0][2]])
        assert vals.dtype == np.float64 and np.all(np.diff(vals) > 0)
        ref_vals, ref_cnts = _collect_block_numpy(blk, off, geom, levels)
        assert vals.tobytes() == ref_vals.tobytes()
        np.testing.assert_array_equal(cnts, ref_cnts)
