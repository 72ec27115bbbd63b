"""Stage 1 (orientation): exact reorientation, left-right mirroring, code mapping, side detection, grid checks."""

from __future__ import annotations

import itertools
import math
import warnings

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

from helm_dask.errors import HelmError
from helm_dask.orient import (
    RIGHT_TO_LEFT,
    check_same_grid,
    check_side,
    detect_side,
    flip_left_right,
    map_right_to_left_codes,
    orient_subject,
    to_ras,
)
from helm_dask.volume import affine_of, make_volume, orientation_code, voxel_to_world

CHUNKINGS = [None, (7, 9, 5), (4, 25, 3)]


def rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def make_affine(spacing, *, deg=0.0, perm=(0, 1, 2), signs=(1, 1, 1), origin=(-12.3, 4.5, 7.8)):
    """Voxel axis d points along world axis perm[d] with sign signs[d]; then rotated by ``deg``."""
    m = np.zeros((3, 3))
    for d in range(3):
        m[perm[d], d] = signs[d] * spacing[d]
    a = np.eye(4)
    a[:3, :3] = rotation((1, 2, 3), deg) @ m
    a[:3, 3] = origin
    return a


def vol_of(arr, affine, chunks=None, kind="image"):
    return make_volume(da.from_array(arr, chunks=chunks or arr.shape), affine, kind=kind)


def assert_same_world_values(vol_in, vol_out, mirror=False):
    """Every output voxel centre maps (optionally through x -> -x) onto an input voxel centre with the
    same value."""
    a_in, a_out = affine_of(vol_in), affine_of(vol_out)
    ijk = np.indices(vol_out.shape).reshape(3, -1).T
    w = voxel_to_world(a_out, ijk)
    if mirror:
        w[:, 0] = -w[:, 0]
    src = (np.linalg.inv(a_in) @ np.c_[w, np.ones(len(w))].T)[:3].T
    src_int = np.round(src).astype(int)
    np.testing.assert_allclose(src, src_int, atol=1e-9)  # lands exactly on a voxel centre
    vin, vout = vol_in.values, vol_out.values
    np.testing.assert_array_equal(vout.reshape(-1), vin[tuple(src_int.T)])


# ---------------------------------------------------------------------------------------------------------
# to_ras
# ---------------------------------------------------------------------------------------------------------


def test_to_ras_undoes_all_48_permutations_and_flips():
    rng = np.random.default_rng(0)
    shape = (6, 5, 4)
    data = rng.integers(0, 1000, shape).astype(np.int32)
    a = make_affine([0.3, 0.4, 0.5], origin=(-3.0, 2.0, 5.0))
    n = np.array(shape)
    seen = set()
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            stored = np.transpose(np.flip(data, axis=tuple(d for d in range(3) if flips[d])), perm)
            # new voxel index -> original voxel index: o[perm[a]] = new[a], then the flips
            t = np.zeros((4, 4))
            t[3, 3] = 1
            for ax in range(3):
                t[perm[ax], ax] = 1
            for d in range(3):
                if flips[d]:
                    t[d, :] *= -1
                    t[d, 3] += n[d] - 1
            a_stored = a @ t
            seen.add(orientation_code(a_stored))
            out = to_ras(vol_of(stored, a_stored, chunks=(4, 3, 2)))
            assert isinstance(out.data, da.Array)
            np.testing.assert_array_equal(out.values, data)
            np.testing.assert_allclose(affine_of(out), a, atol=1e-12)
            assert out.attrs["provenance"][-1]["stage"] == "orient.to_ras"
    assert len(seen) == 48


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("perm, signs", [((2, 0, 1), (-1, 1, -1)), ((1, 0, 2), (-1, 1, 1)), ((0, 1, 2), (1, 1, 1))])
def test_to_ras_oblique_matches_nibabel_and_keeps_world_positions(chunks, perm, signs):
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(30, 25, 20)).astype(np.float32)
    a = make_affine([0.12, 0.15, 0.1], deg=9.0, perm=perm, signs=signs)
    vol = vol_of(arr, a, chunks)
    out = to_ras(vol)
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, a))
    np.testing.assert_array_equal(out.values, np.asarray(ref.dataobj))
    np.testing.assert_allclose(affine_of(out), ref.affine, atol=1e-12)
    assert orientation_code(affine_of(out)) == "RAS"
    assert_same_world_values(vol, out)


def test_to_ras_is_lazy():
    def boom(block):
        raise AssertionError("computed while building the graph")

    lazy = make_volume(da.zeros((6, 5, 4), chunks=2).map_blocks(boom, dtype=float), np.diag([-1.0, 1, -1, 1]))
    out = to_ras(lazy)
    assert isinstance(out.data, da.Array) and orientation_code(affine_of(out)) == "RAS"


def test_stored_volume_stays_stored_through_to_ras_and_flip(tmp_path):
    """A volume opened from a store, reoriented (to_ras) and mirrored (flip_left_right), is still recognised as
    stored -- its StoredSource travels with its data through like() -- so region tasks and the export read it
    straight from the store; any operation that changes the values drops it."""
    from helm_dask.io.regions import store_view_of, stored_source_of, zarr_array_of
    from helm_dask.io.store import open_volume, save_volume
    from helm_dask.volume import like

    arr = np.random.default_rng(7).random((7, 6, 5)).astype(np.float32)
    affine = make_affine([0.5, 0.4, 0.3], perm=(1, 0, 2), signs=(-1, 1, -1))
    path = save_volume(make_volume(arr, affine), tmp_path / "s.zarr", chunks=(3, 4, 2), pyramid=False)
    opened = open_volume(path)
    source = stored_source_of(opened)
    assert source is not None and source.untouched and zarr_array_of(opened.data) is not None
    assert (source.store, source.level) == (path, 0)
    out = flip_left_right(to_ras(opened))
    moved = stored_source_of(out.data)
    assert moved is not None and moved.store == path and not moved.untouched
    assert zarr_array_of(out.data) is None  # a view of the store, not the stored array itself
    view = store_view_of(out.data)
    assert view is not None
    np.testing.assert_array_equal(view.read((0, 0, 0), out.shape), out.values)
    assert stored_source_of(like(out, out.data)) == moved  # same data: same source
    assert stored_source_of(like(out, out.data * 2)) is None  # other values: not the store's
    assert stored_source_of(out.data.astype(np.float64)) is None
    changed = to_ras(opened).data
    changed[0, 0, 0] = 5.0  # in place: the array is no longer what the store holds
    assert stored_source_of(changed) is None


# ---------------------------------------------------------------------------------------------------------
# flip_left_right and codes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize(
    "name, affine",
    [
        ("ras", make_affine([0.3, 0.3, 0.3], origin=(-9.0, 1.0, 2.0))),
        ("ras_oblique", make_affine([0.12, 0.15, 0.1], deg=6.0, origin=(-9.0, 1.0, 2.0))),
        ("pli_oblique", make_affine([0.12, 0.15, 0.1], deg=4.0, perm=(1, 0, 2), signs=(-1, 1, -1))),
    ],
)
def test_flip_left_right_mirrors_world_x(chunks, name, affine):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 50, (30, 25, 20)).astype(np.uint16)
    vol = vol_of(arr, affine, chunks, kind="labels")
    out = flip_left_right(vol)
    assert isinstance(out.data, da.Array) and out.dtype == arr.dtype
    # value at world (x, y, z) in the input == value at (-x, y, z) in the output
    assert_same_world_values(vol, out, mirror=True)
    # the orientation code is kept (RAS stays RAS) and so is the voxel size
    assert orientation_code(affine_of(out)) == orientation_code(affine)
    np.testing.assert_allclose(np.abs(np.linalg.det(affine_of(out))), abs(np.linalg.det(affine)))
    # flipping twice is the identity, exactly
    twice = flip_left_right(out)
    np.testing.assert_array_equal(twice.values, arr)
    np.testing.assert_allclose(affine_of(twice), affine, atol=1e-12)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_map_right_to_left_codes(chunks):
    rng = np.random.default_rng(3)
    codes = np.array([0, 3, 250, 801, 802, 803, 804, 805, 806, 807, 808, 809, 810, 811], np.uint16)
    arr = rng.choice(codes, size=(30, 25, 20))
    out = map_right_to_left_codes(vol_of(arr, np.eye(4), chunks, kind="labels"))
    assert out.dtype == np.uint16 and isinstance(out.data, da.Array)
    expect = np.vectorize(lambda v: RIGHT_TO_LEFT.get(int(v), int(v)))(arr)
    np.testing.assert_array_equal(out.values, expect)
    assert RIGHT_TO_LEFT == {806: 801, 807: 802, 808: 803, 809: 804, 810: 805}
    small = rng.integers(0, 9, (5, 4, 3)).astype(np.uint8)
    np.testing.assert_array_equal(map_right_to_left_codes(vol_of(small, np.eye(4), kind="labels")).values, small)


# ---------------------------------------------------------------------------------------------------------
# a small synthetic hemisphere (world-defined, so left and right are exact mirror images)
# ---------------------------------------------------------------------------------------------------------

SUBJECT_SHAPE = (40, 36, 30)
# a non-RAS, slightly oblique acquisition grid (voxel axes ~ P, L, I) around the world origin
SUBJECT_AFFINE = make_affine([1.2, 1.2, 1.2], deg=5.0, perm=(1, 0, 2), signs=(-1, -1, -1), origin=(22.0, 20.0, 17.0))


def hemisphere(side, affine=SUBJECT_AFFINE, shape=SUBJECT_SHAPE, seed=0):
    """(scan, brain mask, hypothalamus labels) of a left (x < 0) or right (x > 0) hemisphere in a bag."""
    ijk = np.indices(shape).reshape(3, -1).T
    w = voxel_to_world(affine, ijk)
    x = w[:, 0] if side == "L" else -w[:, 0]  # a right hemisphere is the left one mirrored
    y, z = w[:, 1], w[:, 2]
    brain = ((x + 20) / 17) ** 2 + (y / 19) ** 2 + (z / 15) ** 2 <= 1
    bag = (np.abs(x + 20) <= 21) & (np.abs(y) <= 22) & (np.abs(z) <= 17)
    hyp = brain & (((x + 6) / 3.5) ** 2 + ((y - 2) / 4.5) ** 2 + ((z + 3) / 3.5) ** 2 <= 1)
    sub = np.clip(((y - 2 + 4.5) / 9 * 5).astype(int), 0, 4)  # five subunits along y
    codes = (801 if side == "L" else 806) + sub
    lab = np.where(hyp, codes, 0).astype(np.uint16)
    rng = np.random.default_rng(seed)
    scan = np.where(brain, 100.0 + 20 * (x > -10), np.where(bag, 35.0, 2.0)) + rng.normal(0, 3, len(x))
    return (scan.reshape(shape).astype(np.float32), brain.reshape(shape).astype(np.uint8), lab.reshape(shape))


def world_centroid(mask, affine):
    return voxel_to_world(affine, [np.argwhere(mask).mean(axis=0)])[0]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("side", ["L", "R"])
def test_detect_side_with_mask_equals_numpy_centroids(chunks, side):
    scan, mask, lab = hemisphere(side)
    got, info = detect_side(
        vol_of(mask, SUBJECT_AFFINE, chunks, kind="mask"), vol_of(lab, SUBJECT_AFFINE, chunks, kind="labels")
    )
    assert got == side and info["side"] == side and info["confident"]
    hc, bc = world_centroid(lab > 0, SUBJECT_AFFINE), world_centroid(mask > 0, SUBJECT_AFFINE)
    np.testing.assert_allclose(info["hypothalamus_centroid_mm"], hc, atol=1e-9)
    np.testing.assert_allclose(info["brain_centroid_mm"], bc, atol=1e-9)
    xw = voxel_to_world(SUBJECT_AFFINE, np.argwhere(mask > 0))[:, 0]
    np.testing.assert_allclose(info["brain_x_range_mm"], [xw.min(), xw.max()], atol=1e-9)
    assert info["offset_x_mm"] == pytest.approx(hc[0] - bc[0], abs=1e-9)
    assert (info["offset_x_mm"] > 5) if side == "L" else (info["offset_x_mm"] < -5)
    assert info["hypothalamus_voxels"] == int((lab > 0).sum()) and info["brain_voxels"] == int(mask.sum())
    assert ("left" if side == "L" else "right") in info["reason"]
    assert f"{hc[0]:.2f}" in info["reason"] and f"{bc[0]:.2f}" in info["reason"]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("side", ["L", "R"])
def test_detect_side_from_scan_uses_thresholded_brain(chunks, side):
    scan, mask, lab = hemisphere(side, seed=1)
    got, info = detect_side(vol_of(scan, SUBJECT_AFFINE, chunks), vol_of(lab, SUBJECT_AFFINE, chunks, kind="labels"))
    assert got == side
    assert "Otsu" in info["brain_from"]
    # the thresholded scan's centroid is the brain's (bag fluid and air are below the threshold)
    np.testing.assert_allclose(info["brain_centroid_mm"], world_centroid(mask > 0, SUBJECT_AFFINE), atol=0.5)
    # the same numbers for every chunking (integer sums)
    _, info0 = detect_side(vol_of(scan, SUBJECT_AFFINE), vol_of(lab, SUBJECT_AFFINE, kind="labels"))
    assert info["brain_centroid_mm"] == info0["brain_centroid_mm"]
    assert info["hypothalamus_centroid_mm"] == info0["hypothalamus_centroid_mm"]


def test_detect_side_errors_and_weak_evidence():
    scan, mask, lab = hemisphere("L")
    with pytest.raises(HelmError, match="hypothalamus labels are empty"):
        detect_side(vol_of(mask, SUBJECT_AFFINE, kind="mask"), vol_of(np.zeros_like(lab), SUBJECT_AFFINE))
    # a hypothalamus at the brain's centre: decided, but flagged as weak evidence
    centre = np.round(np.argwhere(mask > 0).mean(axis=0)).astype(int)
    lab2 = np.zeros_like(lab)
    lab2[tuple(centre)] = 801
    _, info = detect_side(vol_of(mask, SUBJECT_AFFINE, kind="mask"), vol_of(lab2, SUBJECT_AFFINE, kind="labels"))
    assert not info["confident"] and "weak evidence" in info["reason"]


def test_check_side_messages():
    _, mask, lab = hemisphere("L")
    _, info = detect_side(vol_of(mask, SUBJECT_AFFINE, kind="mask"), vol_of(lab, SUBJECT_AFFINE, kind="labels"))
    assert check_side("L", info) is None
    assert check_side("left", info) is None
    assert check_side("auto", info) is None
    msg = check_side("R", info)
    assert msg is not None and "--side R" in msg and "--side L" in msg
    assert f"{info['hypothalamus_centroid_mm'][0]:.2f}" in msg and f"{info['distance_mm']:.2f}" in msg
    with pytest.raises(HelmError, match="--side"):
        check_side("middle", info)


# ---------------------------------------------------------------------------------------------------------
# grid checks
# ---------------------------------------------------------------------------------------------------------


def test_check_same_grid_accepts_same_grid_and_other_storage_order():
    a = make_affine([0.12, 0.15, 0.1], deg=3.0)
    scan = vol_of(np.zeros((30, 25, 20), np.float32), a)
    assert check_same_grid(scan, vol_of(np.zeros((30, 25, 20), np.uint16), a, kind="labels")) is None
    tiny = a.copy()
    tiny[:3, 3] += 2e-5  # below the 1e-4 mm tolerance
    assert check_same_grid(scan, vol_of(np.zeros((30, 25, 20), np.uint16), tiny, kind="labels")) is None
    # the same voxels stored with axis 0 reversed and axes 1, 2 swapped: to_ras makes them identical
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, 29
    swap = np.eye(4)[[0, 2, 1, 3]]
    stored = vol_of(np.zeros((30, 20, 25), np.uint16), a @ flip @ swap, kind="labels")
    assert orientation_code(affine_of(stored)) != orientation_code(a)
    assert check_same_grid(scan, stored) is None


def test_check_same_grid_explains_differences():
    a = make_affine([0.12, 0.15, 0.1], deg=3.0)
    scan = vol_of(np.zeros((30, 25, 20), np.float32), a)

    def err(arr, aff, **kw):
        with pytest.raises(HelmError) as e:
            check_same_grid(scan, vol_of(arr, aff, kind="labels"), **kw)
        text = str(e.value)
        assert "--resample-labels" in text and "nearest neighbour" in text
        return text

    text = err(np.zeros((30, 25, 21), np.uint16), a, path="labels.nii.gz")
    assert text.startswith("labels.nii.gz: ") and "shape 30x25x20 vs 30x25x21" in text
    coarse = make_affine([0.24, 0.3, 0.2], deg=3.0)
    text = err(np.zeros((15, 13, 10), np.uint16), coarse)
    assert "voxel size" in text and "0.24000" in text and "0.12000" in text
    shifted = a.copy()
    shifted[:3, 3] += [0.3, 0.0, 0.4]
    text = err(np.zeros((30, 25, 20), np.uint16), shifted)
    assert "origin" in text and "0.5000 mm apart" in text
    rotated = a.copy()
    rotated[:3, :3] = rotation((1, 2, 3), 2.0) @ a[:3, :3]  # 2 degrees more about the same axis
    text = err(np.zeros((30, 25, 20), np.uint16), rotated)
    # a column perpendicular to the rotation axis turns by 2 degrees, the others by less
    cols = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    axis = np.array([1, 2, 3]) / math.sqrt(14)
    expect = max(math.degrees(math.acos(np.clip(np.dot(rotation(axis, 2.0) @ c, c), -1, 1))) for c in cols.T)
    assert 1.5 < expect <= 2.0
    assert f"differ by up to {expect:.4f} degrees" in text
    las = make_affine([0.12, 0.15, 0.1], signs=(-1, 1, 1))
    text = err(np.zeros((30, 25, 20), np.uint16), las)
    assert "orientation RAS vs LAS" in text


# ---------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------


def pairs(scan, lab):
    """Sorted (scan value, label) pairs: invariant under any voxel permutation applied to both."""
    p = np.stack([scan.ravel().astype(np.float64), lab.ravel().astype(np.float64)], axis=1)
    return p[np.lexsort(p.T[::-1])]


@pytest.mark.parametrize("chunks", CHUNKINGS[:2])
@pytest.mark.parametrize("side_arg", ["R", "auto"])
def test_orient_subject_right_hemisphere_becomes_left(chunks, side_arg):
    scan, mask, lab = hemisphere("R")
    s_in, l_in = vol_of(scan, SUBJECT_AFFINE, chunks), vol_of(lab, SUBJECT_AFFINE, chunks, kind="labels")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right side given/detected: no warning
        s_out, l_out, info = orient_subject(s_in, l_in, side_arg)
    assert info["side"] == "R" and info["flipped"] and info["warning"] is None
    assert info["orientation_in"] == {
        "scan": orientation_code(SUBJECT_AFFINE),
        "labels": orientation_code(SUBJECT_AFFINE),
    }
    assert isinstance(s_out.data, da.Array) and isinstance(l_out.data, da.Array)
    assert orientation_code(affine_of(s_out)) == "RAS" == info["orientation_out"]
    np.testing.assert_array_equal(affine_of(s_out), affine_of(l_out))
    assert s_out.shape == l_out.shape
    if side_arg == "auto":
        assert "detected R" in info["message"]
    # the codes are the left ones, voxel counts kept
    lv = l_out.values
    assert set(np.unique(lv).tolist()) == {0, 801, 802, 803, 804, 805}
    for right, left in RIGHT_TO_LEFT.items():
        assert (lv == left).sum() == (lab == right).sum()
    # still registered: the same (intensity, label) pairs, and every voxel sits at the mirrored position
    mapped = np.vectorize(lambda v: RIGHT_TO_LEFT.get(int(v), int(v)))(lab)
    np.testing.assert_array_equal(pairs(s_out.values, lv), pairs(scan, mapped))
    assert_same_world_values(s_in, s_out, mirror=True)
    # the result is a left hemisphere: hypothalamus centroid at minus the input's x, where the left one's is
    side, _ = detect_side(s_out, l_out)
    assert side == "L"
    c_out = world_centroid(lv > 0, affine_of(l_out))
    c_in = world_centroid(lab > 0, SUBJECT_AFFINE)
    np.testing.assert_allclose(c_out, c_in * [-1, 1, 1], atol=1e-9)
    _, _, lab_left = hemisphere("L")
    np.testing.assert_allclose(c_out, world_centroid(lab_left > 0, SUBJECT_AFFINE), atol=0.6)  # half a voxel


def test_orient_subject_left_auto_and_wrong_side_warning():
    scan, mask, lab = hemisphere("L")
    s_in, l_in = vol_of(scan, SUBJECT_AFFINE, (7, 9, 5)), vol_of(lab, SUBJECT_AFFINE, kind="labels")
    s_out, l_out, info = orient_subject(s_in, l_in, "auto")
    assert info["side"] == "L" and not info["flipped"]
    np.testing.assert_array_equal(l_out.values, to_ras(l_in).values)
    np.testing.assert_array_equal(affine_of(s_out), affine_of(to_ras(s_in)))
    # a left hemisphere declared right: warned, with numbers, and processed as asked
    with pytest.warns(UserWarning, match=r"--side R was given, but the hypothalamus centroid \(x = -?\d+\.\d\d mm\)"):
        _, l_r, info_r = orient_subject(s_in, l_in, "R")
    assert info_r["flipped"] and info_r["warning"] and "--side L" in info_r["warning"]
    assert set(np.unique(l_r.values).tolist()) == {0, 801, 802, 803, 804, 805}
    # no labels: a given side works, auto cannot
    s_only, none, info_n = orient_subject(s_in, None, "L")
    assert none is None and orientation_code(affine_of(s_only)) == "RAS" and info_n["detection"] is None
    with pytest.raises(HelmError, match="--side auto needs"):
        orient_subject(s_in, None, "auto")
    with pytest.raises(HelmError, match="--side must be"):
        orient_subject(s_in, l_in, "up")


# ---------------------------------------------------------------------------------------------------------
# how strong the side decision is: --side auto refuses a guess, an explicit side is trusted
# ---------------------------------------------------------------------------------------------------------


def header_rotated_about_z(deg):
    """SUBJECT_AFFINE with the world rotated by ``deg`` about the z axis through the brain's centre (-20, 0, 0):
    a header that disagrees with the anatomy (the medial face no longer points along x)."""
    q = np.eye(4)
    q[:3, :3] = rotation((0, 0, 1), deg)
    c = np.array([-20.0, 0.0, 0.0])
    q[:3, 3] = c - q[:3, :3] @ c
    return q @ SUBJECT_AFFINE


class _StubSubject:
    """What pipeline._decide_side uses of a Subject."""

    def __init__(self):
        import types

        self.p = types.SimpleNamespace(hypothalamus="hyp.nii.gz")
        self.logged = []

    def log(self, msg):
        self.logged.append(msg)


def test_side_strength_is_exposed_and_weak_auto_is_refused(capsys):
    from helm_dask.orient import SIDE_MIN_STRENGTH, require_clear_side
    from helm_dask.pipeline.inputs import decide_side as _decide_side

    _, mask, lab = hemisphere("L")
    strong = detect_side(vol_of(mask, SUBJECT_AFFINE, kind="mask"), vol_of(lab, SUBJECT_AFFINE, kind="labels"))[1]
    assert strong["strength"] == pytest.approx(abs(strong["relative_offset"])) and strong["strength"] > 0.5
    assert strong["min_strength"] == SIDE_MIN_STRENGTH and strong["confident"]
    require_clear_side(strong)  # a clear decision passes
    # the header 90 degrees off about z: the hypothalamus is no longer off the brain's centre along x
    aff = header_rotated_about_z(90.0)
    m_vol, l_vol = vol_of(mask, aff, kind="mask"), vol_of(lab, aff, kind="labels")
    side, weak = detect_side(m_vol, l_vol)
    assert weak["strength"] < SIDE_MIN_STRENGTH and not weak["confident"] and "weak evidence" in weak["reason"]
    with pytest.raises(HelmError) as err:
        require_clear_side(weak, path="hyp.nii.gz")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("hyp.nii.gz: --side auto cannot tell left from right")
    for part in (
        "header (affine) that does not match the anatomy",
        "labels from another scan",
        "--side L or --side R",
        "fix the header",
    ):
        assert part in msg
    # the same in the pipeline and in orient_subject with --side auto ...
    subj = _StubSubject()
    with pytest.raises(HelmError, match="cannot tell left from right") as err:
        _decide_side(subj, "auto", m_vol, l_vol)
    assert err.value.path == "hyp.nii.gz"
    with pytest.raises(HelmError, match="cannot tell left from right"):
        orient_subject(vol_of(mask.astype(np.float32), aff), l_vol, "auto")
    # ... while an explicit side is trusted: used as given, a disagreement only warned about
    other = "R" if side == "L" else "L"
    assert _decide_side(subj, side, m_vol, l_vol) == (side, weak)
    assert capsys.readouterr().err == ""
    assert _decide_side(subj, other, m_vol, l_vol)[0] == other
    assert "warning" in capsys.readouterr().err and any("WARNING" in m for m in subj.logged)
    # a clear decision goes through the pipeline's auto path
    assert (
        _decide_side(
            _StubSubject(),
            "auto",
            vol_of(mask, SUBJECT_AFFINE, kind="mask"),
            vol_of(lab, SUBJECT_AFFINE, kind="labels"),
        )[0]
        == "L"
    )


def _block_moments_numpy(block, offset, affine, threshold):
    """The NumPy version the compiled _block_moments replaced: the reference, bit for bit."""
    sel = block != 0 if threshold is None else block > threshold
    count = int(np.count_nonzero(sel))
    if count == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, np.inf, -np.inf])
    i0, j0, k0 = offset
    ni, nj, nk = block.shape
    si = int(sel.sum(axis=(1, 2), dtype=np.int64) @ np.arange(i0, i0 + ni, dtype=np.int64))
    sj = int(sel.sum(axis=(0, 2), dtype=np.int64) @ np.arange(j0, j0 + nj, dtype=np.int64))
    sk = int(sel.sum(axis=(0, 1), dtype=np.int64) @ np.arange(k0, k0 + nk, dtype=np.int64))
    xw = (
        affine[0, 0] * np.arange(i0, i0 + ni)[:, None, None]
        + affine[0, 1] * np.arange(j0, j0 + nj)[None, :, None]
        + affine[0, 2] * np.arange(k0, k0 + nk)[None, None, :]
        + affine[0, 3]
    )
    xw = np.broadcast_to(xw, sel.shape)[sel]
    return np.array([count, si, sj, sk, xw.min(), xw.max()], dtype=np.float64)


@pytest.mark.parametrize("seed", range(6))
def test_block_moments_equal_numpy_bit_for_bit(seed):
    from helm_dask.orient import _block_moments

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 23, 3))
    affine = make_affine(rng.uniform(0.08, 0.4, 3), deg=float(rng.uniform(-40, 40)))
    affine[0, 2] *= -1 if seed % 2 else 1  # x falling along k too
    offset = tuple(int(o) for o in rng.integers(0, 5000, 3))
    vals = rng.normal(size=shape).astype(np.float32)
    vals[rng.random(shape) < 0.05] = np.nan
    # a threshold just below a voxel's float32 value w: NumPy compares in float32, where t is w and w is not
    # above it (the kernel must compare so too; in float64 the voxel would be selected)
    w = float(np.nanmax(vals))
    t = w - 0.25 * float(np.spacing(np.float32(w)))
    assert np.float32(t) == np.float32(w) and t < w
    cases = [
        (vals, t),
        (vals, None),
        ((vals > 0.3).astype(np.uint8), None),
        (vals > 0.3, None),
        ((np.nan_to_num(vals) * 3).astype(np.int16).astype(np.uint16), None),
        ((np.nan_to_num(vals) * 300).astype(np.int16), 2.5),
        (vals[::-1, :, ::-2], 0.0),  # a view with negative strides
        (np.zeros(shape, np.uint8), None),
    ]
    for block, thr in cases:
        np.testing.assert_array_equal(
            _block_moments(block, offset, affine, thr), _block_moments_numpy(block, offset, affine, thr)
        )
