"""Validation metrics against an independent brute-force reference (k-d tree on world coordinates, in mm)."""

from __future__ import annotations

import csv
import json
import math

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial import cKDTree

from helm_dask.errors import HelmError
from helm_dask.metrics import (
    DEFINITIONS,
    PAPER_GROUPS,
    average_hausdorff,
    compare_volumes,
    dice,
    format_table,
    label_statistics,
    pair_by_name,
    summarise,
    to_csv,
    to_jsonable,
)
from helm_dask.volume import make_volume, voxel_to_world

ANISO = (0.3, 0.3, 0.6)


# ------------------------------------------------------------------------------ independent reference


def ref_dice(a, b):
    sa = set(map(tuple, np.argwhere(a)))
    sb = set(map(tuple, np.argwhere(b)))
    if not sa and not sb:
        return math.nan
    return 2 * len(sa & sb) / (len(sa) + len(sb))


def ref_distances(a, b, affine):
    """Brute force: voxel centres in world mm, nearest neighbours with a k-d tree."""
    pa = voxel_to_world(affine, np.argwhere(a))
    pb = voxel_to_world(affine, np.argwhere(b))
    if len(pa) == 0 and len(pb) == 0:
        return dict(mean=math.nan, max=math.nan, d_ab=math.nan, d_ba=math.nan, hd95=math.nan, hd=math.nan)
    if len(pa) == 0 or len(pb) == 0:
        return dict(mean=math.inf, max=math.inf, d_ab=math.inf, d_ba=math.inf, hd95=math.inf, hd=math.inf)
    dab = cKDTree(pb).query(pa)[0]
    dba = cKDTree(pa).query(pb)[0]
    return dict(
        mean=(dab.mean() + dba.mean()) / 2,
        max=max(dab.mean(), dba.mean()),
        d_ab=dab.mean(),
        d_ba=dba.mean(),
        hd95=max(np.percentile(dab, 95), np.percentile(dba, 95)),
        hd=max(dab.max(), dba.max()),
    )


def diag_affine(spacing, origin=(-5.0, 3.0, 7.0)):
    a = np.diag(list(spacing) + [1.0])
    a[:3, 3] = origin
    return a


def oblique_affine(spacing, deg=23.0):
    t = math.radians(deg)
    r = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])
    r = r @ np.array([[1, 0, 0], [0, 0, -1.0], [0, 1, 0]])  # axis permutation too
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(spacing)
    a[:3, 3] = (10.0, -4.0, 2.5)
    return a


def assert_close(got, ref, tol=1e-6):
    for k in ref:
        g, r = got[k], ref[k]
        if math.isnan(r):
            assert math.isnan(g), (k, g, r)
        elif math.isinf(r):
            assert g == r, (k, g, r)
        else:
            assert abs(g - r) <= tol, (k, g, r)


def blob(shape, seed, frac=0.5, sigma=1.5):
    rng = np.random.default_rng(seed)
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return f > np.quantile(f, 1 - frac)


# ------------------------------------------------------------------------------------ in-memory core


@pytest.mark.parametrize(
    "shape,spacing,seed",
    [
        ((9, 8, 7), ANISO, 0),
        ((16, 11, 6), ANISO, 1),
        ((5, 20, 13), (1.0, 1.0, 1.0), 2),
        ((12, 12, 12), (0.1, 0.25, 0.7), 3),
    ],
)
def test_average_hausdorff_matches_bruteforce(shape, spacing, seed):
    a = blob(shape, seed, frac=0.3)
    b = blob(shape, seed + 100, frac=0.2)
    # touch every border face with both sets
    a[0], b[-1], a[:, -1], b[:, :, 0] = True, True, True, True
    got = average_hausdorff(a, b, spacing)
    assert got["status"] == "ok"
    ref = ref_distances(a, b, diag_affine(spacing))
    assert ref["hd"] > 0 and ref["d_ab"] != ref["d_ba"]
    assert_close(got, ref)
    assert abs(dice(a, b) - ref_dice(a, b)) < 1e-12


def test_average_hausdorff_small_sets_far_apart_and_2d():
    a = np.zeros((30, 3, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True  # corner voxel
    b[29, 2, 3] = b[28, 2, 3] = True  # opposite corner
    assert_close(average_hausdorff(a, b, ANISO), ref_distances(a, b, diag_affine(ANISO)))
    a2 = blob((15, 9), 7, sigma=1.0)
    b2 = blob((15, 9), 8, sigma=1.0)
    pa, pb = np.argwhere(a2) * [0.4, 0.9], np.argwhere(b2) * [0.4, 0.9]
    dab, dba = cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]
    got = average_hausdorff(a2, b2, (0.4, 0.9))
    assert abs(got["mean"] - (dab.mean() + dba.mean()) / 2) < 1e-9
    assert abs(got["hd95"] - max(np.percentile(dab, 95), np.percentile(dba, 95))) < 1e-9


def test_identical_and_subset():
    a = blob((10, 10, 10), 4)
    r = average_hausdorff(a, a, ANISO)
    assert (r["mean"], r["max"], r["hd95"], r["hd"]) == (0.0, 0.0, 0.0, 0.0) and dice(a, a) == 1.0
    b = a.copy()
    b[np.argwhere(a)[0][0]] = False  # remove one plane's voxels of A from B
    r = average_hausdorff(b, a, ANISO)
    assert r["d_ab"] == 0.0 and r["d_ba"] > 0


def test_empty_labels():
    z = np.zeros((4, 5, 6), bool)
    a = z.copy()
    a[0, 0, 0] = True
    both = average_hausdorff(z, z, ANISO)
    assert both["status"] == "absent in both" and all(math.isnan(both[k]) for k in ("mean", "max", "hd95", "hd"))
    assert math.isnan(dice(z, z))
    ra, rb = average_hausdorff(z, a, ANISO), average_hausdorff(a, z, ANISO)
    assert ra["status"] == "absent in A" and rb["status"] == "absent in B"
    assert all(ra[k] == math.inf and rb[k] == math.inf for k in ("mean", "max", "d_ab", "d_ba", "hd95", "hd"))
    assert dice(z, a) == 0.0


def test_bad_inputs_in_memory():
    with pytest.raises(HelmError, match="different shapes"):
        average_hausdorff(np.ones((2, 2, 2)), np.ones((2, 2, 3)), 1.0)
    with pytest.raises(HelmError, match="spacing"):
        average_hausdorff(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------ label volumes

SHAPE = (34, 30, 22)


def make_labels(seed):
    """k-means-like background 1..3, a left hypothalamus 801-805 (split like the real subregions), a few
    right voxels, and a fornix 250 touching the x = 0 border."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    f = ndi.gaussian_filter(rng.standard_normal(SHAPE), 3.0)
    lab = np.digitize(f, np.quantile(f, [0.3, 0.6])).astype(np.uint16) + 1
    c = np.array([17, 15, 11]) + rng.integers(-1, 2, 3)
    ell = ((i - c[0]) / 9.0) ** 2 + ((j - c[1]) / 7.0) ** 2 + ((k - c[2]) / 5.0) ** 2 + 0.15 * ndi.gaussian_filter(
        rng.standard_normal(SHAPE), 1.0
    ) < 1
    ant, tub = i < c[0] - 3, (i >= c[0] - 3) & (i < c[0] + 4)
    sup = k >= c[2]
    lab[ell & ant & ~sup] = 801
    lab[ell & ant & sup] = 802
    lab[ell & ~ant & ~tub] = 803
    lab[ell & tub & ~sup] = 804
    lab[ell & tub & sup] = 805
    lab[0 : 3 + seed % 2, 5:8, 3:6] = 250  # fornix on the border
    if seed % 2 == 0:
        lab[30:33, 25:28, 18:21] = 807  # a right label in A only
    return lab


def vol(arr, affine, chunks):
    return make_volume(da.from_array(arr, chunks=chunks), affine, kind="labels")


def reference_rows(a, b, affine, items):
    vox = abs(np.linalg.det(affine[:3, :3]))
    out = {}
    for name, codes in items:
        ma, mb = np.isin(a, codes), np.isin(b, codes)
        d = ref_distances(ma, mb, affine)
        out[name] = dict(
            dice=ref_dice(ma, mb),
            avg_hd_mean_mm=d["mean"],
            avg_hd_max_mm=d["max"],
            d_ab_mm=d["d_ab"],
            d_ba_mm=d["d_ba"],
            hd95_mm=d["hd95"],
            hd_mm=d["hd"],
            volume_a_mm3=ma.sum() * vox,
            volume_b_mm3=mb.sum() * vox,
            voxels_a=int(ma.sum()),
            voxels_b=int(mb.sum()),
        )
    return out


@pytest.fixture(scope="module")
def pair():
    return make_labels(0), make_labels(1)


@pytest.mark.parametrize(
    "chunks_a,chunks_b,affine",
    [
        (SHAPE, (10, 7, 22), diag_affine(ANISO)),
        ((8, 9, 5), (8, 9, 5), diag_affine(ANISO)),
        ((13, 30, 4), (34, 6, 7), oblique_affine(ANISO)),
    ],
)
def test_compare_volumes_equals_in_memory(pair, chunks_a, chunks_b, affine):
    a, b = pair
    rows = compare_volumes(vol(a, affine, chunks_a), vol(b, affine, chunks_b))
    names = [r["name"] for r in rows]
    # default labels: hypothalamic + fornix codes present in either map, then the paper groups of each side
    # that has labels (807 is in A only, so the right groups are there too)
    codes = sorted({int(c) for c in np.unique(np.concatenate([a.ravel(), b.ravel()]))} & (set(range(801, 811)) | {250}))
    assert [r["codes"] for r in rows if r["kind"] == "label"] == [(c,) for c in codes]
    assert names[len(codes) :] == list(PAPER_GROUPS)
    items = [(r["name"], list(r["codes"])) for r in rows]
    ref = reference_rows(a, b, affine, items)
    for r in rows:
        assert_close(r, ref[r["name"]])
    by = {r["name"]: r for r in rows}
    assert by["fornix"]["status"] == "ok" and by["fornix"]["dice"] < 1
    assert by["R anterior-superior"]["status"] == "absent in B"
    assert by["R anterior-superior"]["avg_hd_mean_mm"] == math.inf and by["R anterior-superior"]["dice"] == 0.0
    assert by["R posterior"]["status"] == "absent in both" and math.isnan(by["R posterior"]["dice"])
    assert 0.3 < by["L whole"]["dice"] < 1 and by["L whole"]["avg_hd_mean_mm"] > 0


def test_groups_combine_codes(pair):
    a, b = pair
    af = diag_affine(ANISO)
    rows = compare_volumes(
        vol(a, af, 11), vol(b, af, 11), labels=[801, 802, 803], groups={"front": [802, 801], "mixed": (803, 250, 2)}
    )
    assert [(r["name"], r["codes"]) for r in rows] == [
        ("L anterior-inferior", (801,)),
        ("L anterior-superior", (802,)),
        ("L posterior", (803,)),
        ("front", (801, 802)),
        ("mixed", (2, 250, 803)),
    ]
    ref = reference_rows(a, b, af, [(r["name"], list(r["codes"])) for r in rows])
    for r in rows:
        assert_close(r, ref[r["name"]])
    # a group's Dice is not a combination of its members' Dice: it comes from the union (the joint counts)
    front = np.isin(a, [801, 802]), np.isin(b, [801, 802])
    assert rows[3]["dice"] == pytest.approx(2 * (front[0] & front[1]).sum() / (front[0].sum() + front[1].sum()))
    # volumes add up
    assert rows[3]["volume_a_mm3"] == pytest.approx(rows[0]["volume_a_mm3"] + rows[1]["volume_a_mm3"])


def test_labels_all_margin_and_too_large(pair):
    a, b = pair
    af = diag_affine(ANISO)
    va, vb = vol(a, af, (9, 10, 11)), vol(b, af, (12, 8, 7))
    rows0 = compare_volumes(va, vb, labels="all", groups=None, margin_mm=0.0)
    rows5 = compare_volumes(va, vb, labels="all", groups=None, margin_mm=5.0)
    present = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    assert [r["codes"][0] for r in rows0] == present and 1 in present
    for r0, r5 in zip(rows0, rows5):  # the margin never changes a number
        assert_close(r0, {k: r5[k] for k in ("dice", "avg_hd_mean_mm", "avg_hd_max_mm", "hd95_mm", "hd_mm")}, tol=1e-12)
    ref = reference_rows(a, b, af, [(r["name"], list(r["codes"])) for r in rows0])
    for r in rows0:
        assert_close(r, ref[r["name"]])
    # k-means clusters span the whole volume: too large for the distances, Dice and volumes still exact
    small = compare_volumes(va, vb, labels=[1, 2, 803], groups=None, margin_mm=0.0, max_box_voxels=5000)
    by = {r["codes"][0]: r for r in small}
    assert by[1]["status"] == "too large for distances" and math.isnan(by[1]["avg_hd_mean_mm"])
    assert by[1]["dice"] == pytest.approx(ref_dice(a == 1, b == 1), abs=1e-12)
    assert by[2]["volume_b_mm3"] == pytest.approx((b == 2).sum() * 0.3 * 0.3 * 0.6)
    assert by[803]["status"] == "ok"


def test_label_statistics_chunk_independent(pair):
    a, b = pair
    ref = label_statistics(a, b)  # one chunk
    for chunks in [(5, 7, 3), (34, 1, 22), (17, 15, 11)]:
        assert label_statistics(da.from_array(a, chunks=chunks), da.from_array(b, chunks=(6, 6, 6))) == ref
    c = 803
    idx = np.argwhere(a == c)
    assert ref["a"][c] == (len(idx), tuple(idx.min(0)), tuple(idx.max(0)))
    brute = {}
    for ca, cb in zip(a.ravel().tolist(), b.ravel().tolist()):
        if ca and cb:
            brute[(ca, cb)] = brute.get((ca, cb), 0) + 1
    assert ref["joint"] == brute and ref["joint"][(803, 803)] > 0


def test_numpy_backed_volume_and_left_only(pair):
    a, _ = pair
    a = a.copy()
    a[a > 805] = 0  # left hemisphere only: no right groups
    af = diag_affine(ANISO)
    rows = compare_volumes(make_volume(a, af, kind="labels"), make_volume(a, af, kind="labels"))
    assert not any(r["name"].startswith("R ") for r in rows)
    assert all(r["dice"] == 1.0 and r["avg_hd_max_mm"] == 0.0 for r in rows)


# ------------------------------------------------------------------------------------ grids and errors


def test_grid_mismatch_raises_and_resample(pair):
    a, b = pair
    af = diag_affine(ANISO)
    with pytest.raises(HelmError, match="different grids.*shapes differ"):
        compare_volumes(vol(a, af, 10), vol(b[:-1], af, 10))
    shifted = af.copy()
    shifted[0, 3] += 3 * 0.3  # B's voxel i sits at A's voxel i + 3
    with pytest.raises(HelmError, match="affines differ.*resample"):
        compare_volumes(vol(a, af, 10), vol(b, shifted, 10))
    # resample_b=True: B is moved onto A's grid (nearest neighbour in world space)
    rows = compare_volumes(vol(a, af, 10), vol(b, shifted, 10), resample_b=True)
    b_on_a = np.zeros_like(b)
    b_on_a[3:] = b[:-3]
    ref = reference_rows(a, b_on_a, af, [(r["name"], list(r["codes"])) for r in rows])
    for r in rows:
        assert_close(r, ref[r["name"]])


def test_bad_volumes_raise(pair):
    a, b = pair
    af = diag_affine(ANISO)
    with pytest.raises(HelmError, match="not an integer label map"):
        compare_volumes(vol(a.astype(np.float32), af, 10), vol(b, af, 10))
    sheared = af.copy()
    sheared[0, 1] = 0.1
    with pytest.raises(HelmError, match="not orthogonal"):
        compare_volumes(vol(a, sheared, 10), vol(b, sheared, 10))
    with pytest.raises(HelmError, match="background"):
        compare_volumes(vol(a, af, 10), vol(b, af, 10), labels=[0, 801])
    with pytest.raises(HelmError, match="groups must be"):
        compare_volumes(vol(a, af, 10), vol(b, af, 10), groups="halves")
    with pytest.raises(HelmError, match="not a volume"):
        compare_volumes(a, b)


# ------------------------------------------------------------------------------------ batches, output


def _rows(d, h, status="ok"):
    return [
        dict(
            name="L whole",
            kind="group",
            codes=(801, 802, 803, 804, 805),
            status=status,
            dice=d,
            avg_hd_mean_mm=h,
            volume_a_mm3=100.0,
        ),
        dict(name="fornix", kind="label", codes=(250,), status="ok", dice=0.5, avg_hd_mean_mm=1.0, volume_a_mm3=2.0),
    ]


def test_summarise_mean_std():
    per = {
        "s1": _rows(0.80, 0.30),
        "s2": _rows(0.85, 0.50),
        "s3": _rows(0.78, 0.31),
        "s4": _rows(0.0, math.inf, status="absent in B"),
    }
    s = summarise(per)
    assert [r["name"] for r in s] == ["L whole", "fornix"]
    w = s[0]
    assert w["n_subjects"] == 4 and w["n_ok"] == 3
    assert w["dice_mean"] == pytest.approx(np.mean([0.8, 0.85, 0.78, 0.0]))
    assert w["dice_std"] == pytest.approx(np.std([0.8, 0.85, 0.78, 0.0], ddof=1))
    # the infinite distance of the absent subject is left out
    assert w["avg_hd_mean_mm_n"] == 3
    assert w["avg_hd_mean_mm_mean"] == pytest.approx(np.mean([0.3, 0.5, 0.31]))
    assert w["avg_hd_mean_mm_std"] == pytest.approx(np.std([0.3, 0.5, 0.31], ddof=1))
    assert s[1]["dice_std"] == 0.0
    text = format_table(s)
    assert "0.607 +- 0.406" in text and "3/4 ok" in text and "sample std" in text


def test_format_table_csv_json(pair, tmp_path):
    a, b = pair
    af = diag_affine(ANISO)
    rows = compare_volumes(vol(a, af, 12), vol(b, af, 12))
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["label", "codes", "kind", "Dice"]
    by = {r["name"]: r for r in rows}
    whole = next(ln for ln in lines if ln.startswith("L whole"))
    assert f"{by['L whole']['dice']:.3f}" in whole and f"{by['L whole']['avg_hd_mean_mm']:.3f}" in whole
    assert "absent in both" in text and DEFINITIONS in text and "'max' = the larger of the two" in text
    summ = summarise({"s1": rows, "s2": rows})
    assert [(r["kind"], r["name"]) for r in summ] == [(r["kind"], r["name"]) for r in rows]
    assert all(r["n_subjects"] == 2 for r in summ) and summ[0]["dice_std"] == 0.0
    # CSV: a batch of two subjects, every value back at full precision
    path = to_csv({"s1": rows, "s2": rows}, tmp_path / "m.csv")
    back = list(csv.DictReader(open(path)))
    assert len(back) == 2 * len(rows) and back[0]["subject"] == "s1"
    got = {r["name"]: r for r in back if r["subject"] == "s2"}
    assert float(got["L whole"]["avg_hd_max_mm"]) == by["L whole"]["avg_hd_max_mm"]
    assert got["L whole"]["codes"] == "801+802+803+804+805"
    assert math.isnan(float(got["R posterior"]["dice"])) and float(got["R anterior-superior"]["hd_mm"]) == math.inf
    js = json.loads(json.dumps(to_jsonable(rows), allow_nan=False))
    assert js[0]["codes"] == list(rows[0]["codes"])
    assert next(r for r in js if r["name"] == "R posterior")["dice"] is None
    with pytest.raises(HelmError, match="cannot write"):
        to_csv(rows, tmp_path / "missing" / "m.csv")


def test_pair_by_name():
    pairs, only_a, only_b = pair_by_name(
        ["x/s1.nii.gz", "x/s2.zarr/", "x/s3.nii"], ["y/s2.nii.gz", "y/s1.zarr", "y/s9.nii.gz"]
    )
    assert pairs == [("s1", "x/s1.nii.gz", "y/s1.zarr"), ("s2", "x/s2.zarr/", "y/s2.nii.gz")]
    assert only_a == ["s3"] and only_b == ["s9"]
    with pytest.raises(HelmError, match="same subject name"):
        pair_by_name(["a/s1.nii", "b/s1.nii.gz"], [])
