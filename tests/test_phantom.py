"""Tests of the built-in phantom: chunking independence, geometry, ground truths, noise model, laziness."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from helm_dask import phantom as P
from helm_dask.errors import HelmError
from helm_dask.phantom import (
    ECHO_TIMES_MS,
    FORNIX_LABEL,
    HYPOTHALAMUS_CODES,
    NOISE_SIGMA,
    TISSUE_CSF,
    TISSUE_DEEP_GM,
    TISSUE_GM,
    TISSUE_HYPOTHALAMUS,
    TISSUE_WM,
    phantom,
    phantom_geometry,
)
from helm_dask.volume import affine_of, is_axis_aligned, orientation_code, spacing_of, voxel_to_world, world_to_voxel

SP = 1.5  # 128 x 55 x 87 voxels: quick
NAMES = ("scan", "hypothalamus", "truth_mask", "truth_tissue", "truth_bias")


@pytest.fixture(scope="module")
def ref4():
    """Reference: 4 echoes, one single chunk (so no chunk boundary at all)."""
    vols = phantom(SP, side="L", echoes=4, chunks=(1000, 1000, 1000))
    return {k: v.values for k, v in vols.items()}


@pytest.fixture(scope="module")
def left_right():
    out = {}
    for side in "LR":
        vols = phantom(SP, side=side, chunks=64)
        out[side] = ({k: v.values for k, v in vols.items()}, affine_of(vols["scan"]))
    return out


@pytest.mark.parametrize("chunks", [(32, 32, 32), (50, 17, 29), ((7, 121), (55,), (40, 40, 7))])
def test_bit_identical_across_chunkings(ref4, chunks):
    vols = phantom(SP, side="L", echoes=4, chunks=chunks)
    assert vols["scan"].data.chunks[:3] == da.core.normalize_chunks(chunks, vols["truth_mask"].shape)
    for name in NAMES:
        got = vols[name].values
        assert got.dtype == ref4[name].dtype
        assert got.shape == ref4[name].shape
        np.testing.assert_array_equal(got, ref4[name], err_msg=name)  # bit for bit, NaN-free


def test_one_echo_is_first_echo(ref4):
    one = phantom(SP, side="L", echoes=1, chunks=(40, 30, 50))
    assert one["scan"].dims == ("x", "y", "z")
    np.testing.assert_array_equal(one["scan"].values, ref4["scan"][..., 0])


def test_outputs_types_attrs_and_values(ref4):
    vols = phantom(SP, side="L", echoes=4, seed=3)
    aff = affine_of(vols["scan"])
    kinds = {
        "scan": "image",
        "hypothalamus": "labels",
        "truth_mask": "mask",
        "truth_tissue": "labels",
        "truth_bias": "image",
    }
    dtypes = {
        "scan": np.float32,
        "hypothalamus": np.uint16,
        "truth_mask": np.uint8,
        "truth_tissue": np.uint8,
        "truth_bias": np.float32,
    }
    for name, vol in vols.items():
        assert isinstance(vol.data, da.Array)
        assert vol.attrs["kind"] == kinds[name] and vol.dtype == dtypes[name]
        assert vol.attrs["source"] == "phantom"
        assert np.array_equal(affine_of(vol), aff)
        rec = vol.attrs["provenance"][0]
        assert rec["stage"] == "phantom" and rec["params"]["spacing_mm"] == SP and rec["params"]["seed"] == 3
        assert vol.attrs["phantom"]["side"] == "L" and vol.attrs["phantom"]["echoes"] == 4
    assert vols["scan"].dims == ("x", "y", "z", "echo")
    assert vols["scan"].shape == (128, 55, 87, 4)
    np.testing.assert_allclose(vols["scan"]["echo"].values, ECHO_TIMES_MS)
    # another seed: same anatomy, other noise
    assert np.array_equal(vols["truth_tissue"].values, ref4["truth_tissue"])
    assert not np.array_equal(vols["scan"].values, ref4["scan"])

    scan, tissue, mask, hyp, bias = (
        ref4[k] for k in ("scan", "truth_tissue", "truth_mask", "hypothalamus", "truth_bias")
    )
    assert np.isfinite(scan).all() and scan.min() >= 0
    assert set(np.unique(mask)) == {0, 1}
    assert set(np.unique(tissue)) == {0, 1, 2, 3, 4, 5}
    assert np.array_equal(mask == 1, tissue > 0)
    assert set(np.unique(hyp)) == {0, FORNIX_LABEL, *HYPOTHALAMUS_CODES["L"]}
    assert np.array_equal(np.isin(hyp, HYPOTHALAMUS_CODES["L"]), tissue == TISSUE_HYPOTHALAMUS)
    assert (tissue[hyp == FORNIX_LABEL] == TISSUE_WM).all()
    # bias: smooth, positive, about 0.7 .. 1.4 over the brain
    b = bias[mask == 1]
    assert 0.65 < b.min() < 0.8 and 1.3 < b.max() < 1.45
    assert np.abs(np.diff(bias, axis=0)).max() < 0.05 * SP
    # contrast (first echo, bias removed): CSF > GM > hypothalamus > deep GM > WM, all separated
    flat = scan[..., 0] / bias
    means = [flat[tissue == c].mean() for c in (TISSUE_CSF, TISSUE_GM, TISSUE_HYPOTHALAMUS, TISSUE_DEEP_GM, TISSUE_WM)]
    assert all(a > b + 3 for a, b in zip(means, means[1:])), means


def test_echo_decay(ref4):
    scan, tissue = ref4["scan"], ref4["truth_tissue"]
    for cls, t2s in ((TISSUE_WM, 26.0), (TISSUE_GM, 32.0)):
        m = np.array([scan[..., e][tissue == cls].mean() for e in range(4)])
        assert np.all(np.diff(m) < 0), m
        # the decay between echoes follows exp(-dTE / T2*) (noise bias is small at this SNR)
        np.testing.assert_allclose(
            m[1:] / m[0], np.exp(-(np.array(ECHO_TIMES_MS[1:]) - ECHO_TIMES_MS[0]) / t2s), rtol=0.03
        )


def _splitmix64(v: int) -> int:
    mask = (1 << 64) - 1
    v = (v + 0x9E3779B97F4A7C15) & mask
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & mask
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & mask
    return v ^ (v >> 31)


def test_noise_matches_scalar_reference(ref4):
    """Recompute the Rician noise of a few voxels with plain Python (math.log, math.cos, Python ints)."""
    scan, tissue, hyp, bias = (ref4[k] for k in ("scan", "truth_tissue", "hypothalamus", "truth_bias"))
    shape = tissue.shape
    s1 = {TISSUE_GM: 60.0, TISSUE_WM: 38.0, TISSUE_DEEP_GM: 49.0}
    t2s = {TISSUE_GM: 32.0, TISSUE_WM: 26.0, TISSUE_DEEP_GM: 22.0}
    cand = np.argwhere(np.isin(tissue, list(s1)) & (hyp == 0))
    pick = cand[np.random.default_rng(1).choice(len(cand), 12, replace=False)]
    mask = (1 << 64) - 1
    for e in range(4):
        key = _splitmix64(_splitmix64(_splitmix64(0) ^ 0x4C) ^ (0x1000 + e))
        for i, j, k in pick:
            idx = (int(i) * shape[1] + int(j)) * shape[2] + int(k)
            h = _splitmix64((key + idx * 0x9E3779B97F4A7C15) & mask)
            u1 = ((h >> 41) + 0.5) / 2**23
            v = (h & 0xFFFFFF) / 2**24
            c = int(tissue[i, j, k])
            s = np.float32(s1[c] * math.exp(-(ECHO_TIMES_MS[e] - ECHO_TIMES_MS[0]) / t2s[c])) * bias[i, j, k]
            r = NOISE_SIGMA * math.sqrt(-2.0 * math.log(u1))
            expect = math.hypot(float(s) + r * math.cos(math.pi * v), r * math.sin(math.pi * v))
            assert scan[i, j, k, e] == pytest.approx(expect, rel=2e-6, abs=2e-5)


def test_noise_statistics():
    """Rayleigh in the air, Rician second moment S^2 + 2 sigma^2 in the white matter, independent echoes."""
    vols = phantom(SP, side="L", echoes=2, chunks=64)
    y, x, z = P._axes_full(SP, "L")
    comp = P._compartments(P._features_y(y), P._features_x(x), P._features_z(z))
    scan = vols["scan"].values
    bias = vols["truth_bias"].values
    air = scan[..., 0][comp == P._AIR]
    assert air.size > 50_000
    assert air.mean() == pytest.approx(NOISE_SIGMA * math.sqrt(math.pi / 2), rel=0.01)
    assert (air**2).mean() == pytest.approx(2 * NOISE_SIGMA**2, rel=0.02)
    wm = comp == P._WM
    s = 38.0 * bias[wm]
    excess = (scan[..., 0][wm].astype(np.float64) ** 2 - s**2).mean()
    assert excess == pytest.approx(2 * NOISE_SIGMA**2, rel=0.05)
    # echo noise independent: correlation of the residuals of the two echoes ~ 0
    r0 = scan[..., 0][wm] - s
    r1 = scan[..., 1][wm] - 38.0 * math.exp(-(ECHO_TIMES_MS[1] - ECHO_TIMES_MS[0]) / 26.0) * bias[wm]
    assert abs(np.corrcoef(r0, r1)[0, 1]) < 0.02


def test_rician_magnitude_is_never_nan():
    """Where the signal cancels the in-phase noise (S = -sigma r cos), float32 rounding took |S + n|^2 a few ulps
    below 0: the magnitude must be a small non-negative number there, not NaN."""
    h = np.random.default_rng(0).integers(0, 2**63, size=200_000, dtype=np.int64).astype(np.uint64)
    u1 = ((h >> np.uint64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    v = (h & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    sigma = np.float32(NOISE_SIGMA)
    cancel = -np.sqrt(P._neg2log(u1)) * P._cos_pi(v) * sigma  # the signal that cancels n1
    for scale in (np.float32(1 - 2e-7), np.float32(1), np.float32(1 + 2e-7)):
        m = P._rician((cancel * scale).astype(np.float32), h, float(sigma))
        assert np.isfinite(m).all() and (m >= 0).all()
        # and it is the quadrature part |sigma r sin| up to float32 rounding (r^2 sin^2 = r^2 - (r cos)^2)
        ref = np.sqrt(np.maximum(P._neg2log(u1).astype(np.float64) * sigma**2 - cancel.astype(np.float64) ** 2, 0))
        assert np.abs(m - ref).max() < 0.05 * sigma


@pytest.mark.parametrize("spacing", [0.1, 0.37, 1.0, 1.5, 2.0])
def test_affine_oblique_non_ras(spacing):
    g = phantom_geometry(spacing, "L")
    aff = g["affine"]
    assert np.allclose(spacing_of(aff), spacing, rtol=0, atol=1e-9)
    assert orientation_code(aff) == g["orientation"] == "PLI"
    assert not is_axis_aligned(aff)
    assert np.linalg.det(aff[:3, :3]) > 0
    assert g["shape"] == tuple(int(round(f / spacing)) for f in (192.0, 82.0, 130.0))
    # the centre of the field of view is the same world point at every spacing
    centre = voxel_to_world(aff, (np.array(g["shape"])[None] - 1) / 2.0)[0]
    g0 = phantom_geometry(1.0, "L")
    np.testing.assert_allclose(
        centre, voxel_to_world(g0["affine"], (np.array(g0["shape"])[None] - 1) / 2.0)[0], atol=1e-9
    )
    # the three voxel axes are rotated a few degrees from the world axes
    cosines = np.abs(aff[:3, :3] / spacing).max(axis=0)
    assert np.all(cosines < math.cos(math.radians(2))) and np.all(cosines > math.cos(math.radians(15)))


def test_large_grid_is_lazy_and_has_two_gigavoxels():
    vols = phantom(0.1, side="L")
    assert vols["scan"].shape == (1920, 820, 1300)
    assert math.prod(vols["scan"].shape) >= 2e9
    for vol in vols.values():
        assert isinstance(vol.data, da.Array) and vol.data.npartitions == 15 * 7 * 11
        assert vol.data.chunksize == (128, 128, 128)


def test_one_native_chunk_near_hypothalamus():
    """At 0.1 mm, one 128^3 chunk computed alone equals the same region from another chunking."""
    g = phantom_geometry(0.1, "L")
    c = world_to_voxel(g["affine"], g["hypothalamus_centroid_mm"][None])[0]
    bidx = tuple(int(v // 128) for v in c)
    a = phantom(0.1, side="L", chunks=128)
    b = phantom(0.1, side="L", chunks=(100, 90, 70))
    region = tuple(slice(i * 128, (i + 1) * 128) for i in bidx)
    for name in ("scan", "hypothalamus"):
        one = a[name].data.blocks[bidx].compute()
        assert one.shape == (128, 128, 128)
        np.testing.assert_array_equal(one, b[name].data[region].compute())
    labels = a["hypothalamus"].data.blocks[bidx].compute()
    assert np.isin(labels, HYPOTHALAMUS_CODES["L"]).sum() > 50_000  # the chunk is in the hypothalamus


def test_mask_has_ventricles_and_no_holes(ref4):
    mask, tissue = ref4["truth_mask"].astype(bool), ref4["truth_tissue"]
    assert (tissue == TISSUE_CSF).sum() > 100
    assert mask[tissue == TISSUE_CSF].all()
    assert np.array_equal(ndi.binary_fill_holes(mask), mask)
    assert ndi.label(mask)[1] == 1
    # ventricle is internal: not on the brain surface
    surface = mask & ~ndi.binary_erosion(mask)
    assert not (surface & (tissue == TISSUE_CSF)).any()


def test_bag_bubbles_and_brain_are_separated():
    s = 1.0
    y, x, z = P._axes_full(s, "L")
    comp = P._compartments(P._features_y(y), P._features_x(x), P._features_z(z))
    brain = comp >= P._CSF
    bubbles = comp == P._BUBBLE
    assert ndi.label(bubbles)[1] == len(P._BUBBLES)
    ball = ndi.generate_binary_structure(3, 1)
    # bubbles lie in fluid: their 1-voxel neighbourhood is fluid or bubble only
    near = ndi.binary_dilation(bubbles, ball) & ~bubbles
    assert set(np.unique(comp[near])) == {P._FLUID}
    # the brain lies in fluid too: never touches plastic or air
    near = ndi.binary_dilation(brain, ball) & ~brain
    assert set(np.unique(comp[near])) == {P._FLUID}
    # the bag sits inside the field of view with air around it; the tight left-right field of view (82 mm, as
    # in the real scans) may graze the plastic, never the fluid or the brain
    for axis in range(3):
        for end in (0, -1):
            face = np.take(comp, end, axis=axis)
            assert (face == P._AIR).all() if axis != 1 else np.isin(face, (P._AIR, P._PLASTIC)).all()
    assert set(np.unique(comp)) == set(range(P._NCOMP))


def test_hypothalamus_geometry_across_spacings():
    cents = {}
    for sp in (1.0, 2.0):
        vols = phantom(sp, side="L", chunks=48)
        hyp = vols["hypothalamus"].values
        ijk = np.argwhere(np.isin(hyp, HYPOTHALAMUS_CODES["L"]))
        cents[sp] = voxel_to_world(affine_of(vols["hypothalamus"]), ijk).mean(axis=0)
        vol_mm3 = len(ijk) * sp**3
        g = phantom_geometry(sp, "L")
        assert 500 < sum(g["hypothalamus_volume_mm3"].values()) < 1000
        assert vol_mm3 == pytest.approx(sum(g["hypothalamus_volume_mm3"].values()), rel=0.25)
        assert np.linalg.norm(cents[sp] - g["hypothalamus_centroid_mm"]) < sp
    assert np.linalg.norm(cents[1.0] - cents[2.0]) < 1.0
    g = phantom_geometry(0.5, "L")
    vols = g["hypothalamus_volume_mm3"]
    assert set(vols) == set(HYPOTHALAMUS_CODES["L"]) and min(vols.values()) > 50
    # the hypothalamus touches the medial plane (it lines the third ventricle)
    plane = g["medial_plane"]
    dist = np.dot(g["hypothalamus_centroid_mm"] - plane["point_mm"], plane["normal"])
    assert -5.0 < dist < 0.0
    assert np.linalg.norm(plane["normal"]) == pytest.approx(1.0)


def test_same_world_point_same_tissue_across_spacings():
    fine = phantom(0.5, side="L", chunks=96)["truth_tissue"]
    coarse = phantom(2.0, side="L", chunks=96)["truth_tissue"]
    tc = coarse.values
    ijk = np.argwhere(tc >= 0)
    world = voxel_to_world(affine_of(coarse), ijk)
    near = np.rint(world_to_voxel(affine_of(fine), world)).astype(int)
    inside = np.all((near >= 0) & (near < np.array(fine.shape)), axis=1)
    assert inside.all()
    tf = fine.values[tuple(near.T)]
    agree = (tf == tc[tuple(ijk.T)]).mean()
    assert agree > 0.97
    brain = tc[tuple(ijk.T)] > 0
    assert (tf[brain] == tc[tuple(ijk.T)][brain]).mean() > 0.9


def test_right_is_mirror_of_left(left_right):
    (lv, la), (rv, ra) = left_right["L"], left_right["R"]
    # voxel data: the left one flipped along voxel axis 1; same orientation code; world mirror x -> -x
    for name in ("truth_mask", "truth_tissue", "truth_bias"):
        np.testing.assert_array_equal(rv[name], lv[name][:, ::-1, :], err_msg=name)
    lh = lv["hypothalamus"][:, ::-1, :].astype(np.int32)
    np.testing.assert_array_equal(rv["hypothalamus"], np.where((lh >= 801) & (lh <= 805), lh + 5, lh))
    assert set(np.unique(rv["hypothalamus"])) == {0, FORNIX_LABEL, *HYPOTHALAMUS_CODES["R"]}
    assert orientation_code(ra) == orientation_code(la) == "PLI"
    n1 = lv["truth_mask"].shape[1]
    ijk = np.array([[0, 0, 0], [5, 7, 9], [100, 50, 80]], dtype=float)
    flipped = ijk.copy()
    flipped[:, 1] = n1 - 1 - flipped[:, 1]
    np.testing.assert_allclose(voxel_to_world(ra, ijk), voxel_to_world(la, flipped) * [-1, 1, 1], atol=1e-9)
    # independent noise, same noise-free image
    assert not np.array_equal(rv["scan"], lv["scan"][:, ::-1, :])
    # hypothalamus on the medial side: +x of the brain for L, -x for R (in world mm)
    for side, (v, a) in left_right.items():
        brain_x = voxel_to_world(a, np.argwhere(v["truth_mask"] == 1))[:, 0].mean()
        hyp_x = voxel_to_world(a, np.argwhere(np.isin(v["hypothalamus"], HYPOTHALAMUS_CODES[side])))[:, 0].mean()
        assert (hyp_x - brain_x > 20) if side == "L" else (brain_x - hyp_x > 20)
        g = phantom_geometry(SP, side)
        assert (g["medial_plane"]["normal"][0] > 0.99) == (side == "L")
        assert abs(g["hypothalamus_centroid_mm"][0] - hyp_x) < SP
    gl, gr = phantom_geometry(SP, "L"), phantom_geometry(SP, "R")
    np.testing.assert_allclose(gr["hypothalamus_centroid_mm"], gl["hypothalamus_centroid_mm"] * [-1, 1, 1])
    np.testing.assert_allclose(gr["medial_plane"]["point_mm"], gl["medial_plane"]["point_mm"] * [-1, 1, 1])


def test_medial_plane_is_exact():
    """Brain voxel centres lie on the hemisphere side of the true medial plane, and reach it."""
    for side in "LR":
        vols = phantom(1.0, side=side, chunks=64)
        g = phantom_geometry(1.0, side)
        w = voxel_to_world(g["affine"], np.argwhere(vols["truth_mask"].values == 1))
        d = (w - g["medial_plane"]["point_mm"]) @ g["medial_plane"]["normal"]
        assert d.max() <= 1e-9 and d.max() > -1.0
        assert d.min() == pytest.approx(-74.0, abs=2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spacing_mm=0), "positive"),
        (dict(spacing_mm=float("nan")), "positive"),
        (dict(spacing_mm="abc"), "number"),
        (dict(spacing_mm=50), "too coarse"),
        (dict(spacing_mm=0.001), "too fine"),
        (dict(side="X"), "side"),
        (dict(echoes=5), "echoes"),
        (dict(echoes=0), "echoes"),
        (dict(seed=-1), "seed"),
        (dict(chunks=(10, 10)), "chunks"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(spacing_mm=2.0)
    args.update(kwargs)
    with pytest.raises(HelmError, match=match):
        phantom(args.pop("spacing_mm"), **args)


def test_side_aliases():
    assert phantom_geometry(2.0, "left")["side"] == "L"
    assert phantom(2.0, side="r")["hypothalamus"].attrs["phantom"]["side"] == "R"
