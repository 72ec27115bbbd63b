"""Stage 6 (closing + merge): chunked results against scipy.ndimage.binary_closing and brute-force references."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from helm_dask.closing import (
    ball,
    binary_closing_mm,
    close_labels,
    closing_depth,
    half_extent,
    merge_labels,
)
from helm_dask.errors import HelmError
from helm_dask.volume import affine_of, make_volume

# name -> (radius mm, spacing mm, shape)
CASES = {
    "r4_iso": (1.2, (0.3, 0.3, 0.3), (36, 34, 32)),  # 4 voxels (4 * 0.3 is not exactly 1.2)
    "r12_iso": (1.2, (0.1, 0.1, 0.1), (30, 29, 28)),  # 12 voxels
    "aniso_03": (1.2, (0.3, 0.3, 0.45), (36, 32, 28)),  # 4 x 4 x 2 voxels
    "aniso_01": (1.2, (0.1, 0.12, 0.15), (32, 30, 28)),  # 12 x 10 x 8 voxels
}
# whole array; chunks larger than the depth on some axes; chunks smaller than the depth everywhere
CHUNKINGS = ["whole", (13, 17, 16), (5, 7, 9)]


def chunks_of(ch, shape):
    return shape if ch == "whole" else ch


def make_mask(shape, half, seed=0):
    """Blobs at the ball's scale, two plates with a gap, a thin broken line, a notch at the border, dust."""
    rng = np.random.default_rng(seed)
    h = np.array(half)
    f = ndi.gaussian_filter(rng.normal(size=shape), sigma=np.maximum(h / 2.0, 1.0))
    m = f > np.quantile(f, 0.93)
    c = np.array(shape) // 2
    g = max(1, int(h[0]) // 2)
    a, b = slice(c[1] - 6, c[1] + 6), slice(c[2] - 6, c[2] + 6)
    m[c[0] - g - 2 : c[0] - g, a, b] = True  # plates 2g voxels apart: narrower than the ball
    m[c[0] + g : c[0] + g + 2, a, b] = True
    m[2 : shape[0] - 2, 3, 3] = True  # a one-voxel line with one-voxel gaps
    m[6 : shape[0] - 6 : 5, 3, 3] = False
    m[0:4, shape[1] - 10 : shape[1] - 2, shape[2] - 10 : shape[2] - 2] = True  # block on the x = 0 face ...
    m[0:2, shape[1] - 7 : shape[1] - 5, shape[2] - 7 : shape[2] - 5] = False  # ... with a notch open to it
    m |= rng.random(shape) < 0.002
    return m


def scipy_closing(m, radius_mm, spacing):
    """Reference: scipy's closing of the volume padded with background by the ball's half size, cropped."""
    se = ball(radius_mm, spacing)
    h = [s // 2 for s in se.shape]
    c = ndi.binary_closing(np.pad(m, [(x, x) for x in h]), structure=se)
    return c[tuple(slice(x, x + n) for x, n in zip(h, m.shape))]


@functools.cache
def case_data(name):
    r, sp, shape = CASES[name]
    m = make_mask(shape, half_extent(r, sp), seed=len(name))
    return m, scipy_closing(m, r, sp)


# ----------------------------------------------------------------------------------------------------------
# the structuring element
# ----------------------------------------------------------------------------------------------------------


def exact_ball(radius, spacing):
    """Independent definition with exact rational arithmetic: sum (d_i s_i)^2 <= r^2."""
    r, s = Fraction(str(radius)), [Fraction(str(x)) for x in spacing]
    n = [int(r / si) for si in s]
    out = np.zeros([2 * k + 1 for k in n], bool)
    for i in range(-n[0], n[0] + 1):
        for j in range(-n[1], n[1] + 1):
            for k in range(-n[2], n[2] + 1):
                out[i + n[0], j + n[1], k + n[2]] = (i * s[0]) ** 2 + (j * s[1]) ** 2 + (k * s[2]) ** 2 <= r * r
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_ball_matches_exact_arithmetic(name):
    r, sp, _ = CASES[name]
    got = ball(r, sp)
    np.testing.assert_array_equal(got, exact_ball(r, sp))
    assert got.shape == tuple(2 * h + 1 for h in half_extent(r, sp))
    assert closing_depth(r, sp) == tuple(2 * h for h in half_extent(r, sp))


def test_ball_sizes_and_depths():
    assert half_extent(1.2, 0.3) == (4, 4, 4) and half_extent(1.2, 0.1) == (12, 12, 12)
    assert half_extent(1.2, (0.1, 0.12, 0.15)) == (12, 10, 8)
    assert closing_depth(1.2, 0.1) == (24, 24, 24)
    # lattice points of the radius-4 and radius-12 spheres (i^2 + j^2 + k^2 <= r^2)
    assert int(ball(1.2, 0.3).sum()) == 257 and int(ball(4.0, 1.0).sum()) == 257
    g = np.arange(-12, 13)
    assert int(ball(1.2, 0.1).sum()) == int(
        ((g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= 144).sum()
    )
    assert ball(0.0, 0.3).shape == (1, 1, 1) and ball(0.2, 0.3).sum() == 1
    # the sphere is symmetric (dilation by it needs no reflection)
    b = ball(1.2, (0.1, 0.12, 0.15))
    np.testing.assert_array_equal(b, b[::-1, ::-1, ::-1])


# ----------------------------------------------------------------------------------------------------------
# binary closing against scipy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_closing_equals_scipy(name, chunking):
    r, sp, shape = CASES[name]
    m, ref = case_data(name)
    assert ref.sum() - m.sum() >= 20, "the test volume must give the closing something to add"
    x = da.from_array(m, chunks=chunks_of(chunking, shape))
    out = binary_closing_mm(x, r, spacing_mm=sp)
    assert out.chunks == x.chunks
    got = out.compute()
    assert got.dtype == bool
    np.testing.assert_array_equal(got, ref)


def test_reference_is_sensitive_to_the_border_and_gaps():
    """The padded reference differs from scipy's unpadded closing (which erodes from the volume border), fills
    the gap between the plates, and keeps a notch that opens onto the border (a ball fits in from outside)."""
    r, sp, shape = CASES["r4_iso"]
    m, ref = case_data("r4_iso")
    unpadded = ndi.binary_closing(m, structure=ball(r, sp))
    assert (m & ~unpadded).any() and not (m & ~ref).any()
    c = np.array(shape) // 2
    assert not m[c[0], c[1], c[2]] and ref[c[0], c[1], c[2]]  # between the plates
    assert not ref[0, shape[1] - 6, shape[2] - 6] and m[0, shape[1] - 3, shape[2] - 3]  # the notch
    got = binary_closing_mm(da.from_array(m, chunks=(7, 8, 9)), r, spacing_mm=sp).compute()
    np.testing.assert_array_equal(got, ref)


def rotation(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_volume_api_uses_the_affine_spacing():
    r, sp, shape = CASES["aniso_03"]
    m, ref = case_data("aniso_03")
    aff = np.eye(4)
    aff[:3, :3] = rotation(20) @ np.diag([-sp[0], sp[1], sp[2]])  # oblique, flipped: spacing from columns
    aff[:3, 3] = [10.0, -4.0, 2.5]
    vol = make_volume(da.from_array(m.astype(np.uint8), chunks=(11, 9, 10)), aff, kind="mask")
    out = binary_closing_mm(vol, r)
    assert out.attrs["kind"] == "mask" and out.dtype == np.uint8
    np.testing.assert_array_equal(affine_of(out), aff)
    assert out.data.chunks == vol.data.chunks
    np.testing.assert_array_equal(out.values.astype(bool), ref)
    assert out.attrs["provenance"][-1]["params"]["radius_mm"] == r


def test_radius_zero_is_identity_and_bad_inputs():
    m = make_mask((12, 12, 12), (1, 1, 1))
    np.testing.assert_array_equal(binary_closing_mm(da.from_array(m, chunks=5), 0.0, spacing_mm=0.3).compute(), m)
    with pytest.raises(HelmError, match="radius"):
        binary_closing_mm(da.from_array(m, chunks=5), -1.0, spacing_mm=0.3)
    with pytest.raises(HelmError, match="spacing_mm is required"):
        binary_closing_mm(da.from_array(m, chunks=5), 1.2)
    with pytest.raises(HelmError, match="spacing"):
        binary_closing_mm(da.from_array(m, chunks=5), 1.2, spacing_mm=(0.3, 0.0, 0.3))
    sheared = np.eye(4)
    sheared[0, 1] = 0.2
    vol = make_volume(da.from_array(m, chunks=5), sheared, kind="mask")
    with pytest.raises(HelmError, match="sheared"):
        binary_closing_mm(vol, 1.2)


def test_axis_shorter_than_the_depth():
    """A thin volume (3 slices, depth 8) is padded internally; still equal to the reference."""
    rng = np.random.default_rng(3)
    m = ndi.gaussian_filter(rng.normal(size=(30, 26, 3)), (2, 2, 0.5)) > 0.15
    ref = scipy_closing(m, 1.2, 0.3)
    assert ref.sum() > m.sum()
    for ch in [(30, 26, 3), (6, 5, 1)]:
        np.testing.assert_array_equal(
            binary_closing_mm(da.from_array(m, chunks=ch), 1.2, spacing_mm=0.3).compute(), ref
        )


# ----------------------------------------------------------------------------------------------------------
# labels: nearest manual code for added voxels
# ----------------------------------------------------------------------------------------------------------

CODES = np.array([801, 802, 803, 804, 805, 250])


def make_labels(shape, half, seed=0):
    """Manual labels: the test mask split into Voronoi regions of six codes (so different codes touch)."""
    rng = np.random.default_rng(seed + 100)
    m = make_mask(shape, half, seed)
    seeds = rng.uniform(0, 1, size=(len(CODES), 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    nearest = np.argmin(((grid[..., None, :] - seeds) ** 2).sum(-1), axis=-1)
    return np.where(m, CODES[nearest], 0).astype(np.uint16)


def sq(d, spacing):
    """The closing module's squared-distance formula, written out: ((d0 s0)^2 + (d1 s1)^2) + (d2 s2)^2."""
    t = [(d[..., i].astype(np.float64) * spacing[i]) ** 2 for i in range(3)]
    return (t[0] + t[1]) + t[2]


def brute_force_close_labels(lab, radius_mm, spacing):
    """Reference: scipy closing of the union, then for every added voxel the code with the smallest squared
    distance to one of its voxels (all voxels, brute force); ties within 1e-9 relative -> smallest code."""
    m = lab != 0
    closed = scipy_closing(m, radius_mm, spacing)
    out = lab.copy()
    added = np.argwhere(closed & ~m)
    lv = np.argwhere(m)
    lc = lab[m]
    codes = np.unique(lc)
    for start in range(0, len(added), 256):
        a = added[start : start + 256]
        q = sq(a[:, None, :] - lv[None, :, :], spacing)  # added x labelled
        per_code = np.stack([np.where(lc[None, :] == c, q, np.inf).min(axis=1) for c in codes])
        qmin = per_code.min(axis=0)
        choice = codes[np.argmax(per_code <= qmin * (1 + 1e-9), axis=0)]
        out[tuple(a.T)] = choice
    return out, closed


@functools.cache
def label_case(name):
    r, sp, shape = CASES[name]
    shape = tuple(min(n, 30) for n in shape)
    lab = make_labels(shape, half_extent(r, sp), seed=7)
    ref, closed = brute_force_close_labels(lab, r, sp)
    return lab, ref, closed


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
@pytest.mark.parametrize("name", ["r4_iso", "aniso_03"])
def test_close_labels_nearest_code(name, chunking):
    r, sp, _ = CASES[name]
    lab, ref, closed = label_case(name)
    added = closed & (lab == 0)
    assert added.sum() >= 50
    assert len(np.unique(ref[added])) >= 3  # several codes compete for the added voxels
    aff = np.diag([*sp, 1.0])
    vol = make_volume(da.from_array(lab, chunks=chunks_of(chunking, lab.shape)), aff, kind="labels")
    out = close_labels(vol, r)
    assert out.dtype == np.uint16 and out.attrs["kind"] == "labels"
    assert out.data.chunks == vol.data.chunks
    got = out.values
    np.testing.assert_array_equal(got[lab != 0], lab[lab != 0])  # manual voxels unchanged
    np.testing.assert_array_equal(got != 0, closed)  # support = the closing of the union
    np.testing.assert_array_equal(got, ref)  # added voxels: nearest code


@pytest.mark.parametrize("chunks", [(7, 30, 9), 16])
def test_close_labels_of_a_stored_volume_reads_boxes_from_the_store(tmp_path, chunks):
    """The pipeline closes the stored hypothalamus labels: each chunk's task reads its box plus the depth from
    the store (chunk cache), zeros beyond the volume -- the same labels as the brute-force reference."""
    from helm_dask.io import open_volume, regions
    from helm_dask.io.store import save_volume

    r, sp, _ = CASES["r4_iso"]
    lab, ref, _ = label_case("r4_iso")
    store = save_volume(
        make_volume(da.from_array(lab, chunks=chunks), np.diag([*sp, 1.0]), kind="labels"),
        tmp_path / "lab.zarr",
        chunks=chunks,
    )
    vol = open_volume(store)
    assert regions.store_view_of(vol.data) is not None
    np.testing.assert_array_equal(close_labels(vol, r).values, ref)


@pytest.mark.parametrize("chunks", [(20, 20, 20), (4, 5, 6), (3, 20, 7)])
def test_close_labels_ties_take_the_smallest_code(chunks):
    lab = np.zeros((20, 20, 20), np.uint16)
    lab[4:9, 5:15, 5:15] = 805
    lab[10:15, 5:15, 5:15] = 802  # one-voxel gap at x = 9, equidistant from both plates
    vol = make_volume(da.from_array(lab, chunks=chunks), np.diag([0.3, 0.3, 0.3, 1.0]), kind="labels")
    got = close_labels(vol, 1.2).values
    ref = scipy_closing(lab != 0, 1.2, 0.3)
    gap = ref[9] & (lab[9] == 0)
    assert gap.sum() > 20
    assert set(np.unique(got[9][gap]).tolist()) == {802}


def test_close_labels_codes_filter_and_radius_zero():
    lab, _, _ = label_case("r4_iso")
    vol = make_volume(da.from_array(lab, chunks=9), np.diag([0.3, 0.3, 0.3, 1.0]), kind="labels")
    keep = [801, 802, 803]
    got = close_labels(vol, 1.2, codes=keep).values
    sub = np.where(np.isin(lab, keep), lab, 0).astype(np.uint16)
    ref, _ = brute_force_close_labels(sub, 1.2, (0.3, 0.3, 0.3))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(close_labels(vol, 0.0).values, lab)
    fl = make_volume(da.from_array(lab.astype(np.float32), chunks=9), np.eye(4), kind="labels")
    with pytest.raises(HelmError, match="integer"):
        close_labels(fl, 1.2)


# ----------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(10, 10, 10), (4, 7, 3)])
def test_merge_manual_overrides_kmeans(chunks):
    rng = np.random.default_rng(5)
    km = rng.integers(0, 7, size=(10, 12, 8)).astype(np.uint8)
    man = np.where(rng.random((10, 12, 8)) < 0.2, rng.choice([801, 803, 250], size=(10, 12, 8)), 0).astype(np.uint16)
    aff = np.diag([0.3, 0.3, 0.3, 1.0])
    kv = make_volume(da.from_array(km, chunks=chunks), aff, kind="labels")
    mv = make_volume(da.from_array(man, chunks=(5, 6, 8)), aff, kind="labels")
    out = merge_labels(kv, mv)
    assert out.dtype == np.uint16 and out.data.chunks == kv.data.chunks
    np.testing.assert_array_equal(out.values, np.where(man != 0, man, km))
    np.testing.assert_array_equal(affine_of(out), aff)


def test_merge_refuses_different_grids():
    aff = np.diag([0.3, 0.3, 0.3, 1.0])
    kv = make_volume(da.zeros((6, 6, 6), np.uint8, chunks=3), aff, kind="labels")
    with pytest.raises(HelmError, match="same grid"):
        merge_labels(kv, make_volume(da.zeros((6, 6, 5), np.uint16, chunks=3), aff, kind="labels"))
    shifted = aff.copy()
    shifted[0, 3] = 0.15
    with pytest.raises(HelmError, match="different affines"):
        merge_labels(kv, make_volume(da.zeros((6, 6, 6), np.uint16, chunks=3), shifted, kind="labels"))
