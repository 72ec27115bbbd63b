"""k-means vs a reference tissue map: ARI against scikit-learn, best-match Dice, grids, and the run's QC table."""

from __future__ import annotations

import json
import math

import dask.array as da
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from helm_dask.errors import HelmError
from helm_dask.metrics import (
    adjusted_rand_from_table,
    contingency_tables,
    kmeans_agreement,
    kmeans_agreement_many,
    reference_on_grid,
)
from helm_dask.volume import make_volume

CHUNKINGS = [None, (13, 7, 9), (5, 4, 3), (1, 7, 9), (4, 1, 2)]


def _pair(seed: int, kk: int = 6, nc: int = 4, shape=(13, 7, 9), noise: float = 0.3):
    """A random 'k-means map' and 'tissue map' that partly agree (codes 0..kk-1 and 0..nc-1)."""
    rng = np.random.default_rng(seed)
    tissue = rng.integers(0, nc, shape).astype(np.uint8)
    km = ((tissue.astype(int) * (kk - 1)) // max(nc - 1, 1)).astype(np.uint8)
    flip = rng.random(shape) < noise
    km[flip] = rng.integers(0, kk, int(flip.sum()))
    return km, tissue


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ari_matches_sklearn_inside_both(seed, chunks):
    km, tissue = _pair(seed)
    a = km if chunks is None else da.from_array(km, chunks=chunks)
    b = tissue if chunks is None else da.from_array(tissue, chunks=(3, 3, 3))  # rechunked to a's chunks
    r = kmeans_agreement(a, b)
    inside = (km != 0) & (tissue != 0)
    assert r["voxels"] == int(inside.sum())
    assert r["ari"] == pytest.approx(adjusted_rand_score(tissue[inside], km[inside]), abs=1e-12)
    assert r["excluded"]["kmeans_only"] == int(((km != 0) & (tissue == 0)).sum())
    assert r["excluded"]["tissue_only"] == int(((km == 0) & (tissue != 0)).sum())


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_ari_matches_sklearn_with_mask_and_uncorrelated(chunks):
    rng = np.random.default_rng(7)
    km = rng.integers(0, 9, (13, 7, 9)).astype(np.uint8)
    tissue = rng.integers(0, 5, (13, 7, 9)).astype(np.uint16)
    mask = rng.random((13, 7, 9)) < 0.6
    a = km if chunks is None else da.from_array(km, chunks=chunks)
    r = kmeans_agreement(a, tissue, mask=mask)
    assert r["region"] == "mask" and "excluded" not in r
    assert r["voxels"] == int(mask.sum())
    assert r["ari"] == pytest.approx(adjusted_rand_score(tissue[mask], km[mask]), abs=1e-12)


def test_tables_exact_for_every_chunking_and_sparse_codes():
    # large, sparse codes take the np.unique path; the table must not depend on the chunking
    km, tissue = _pair(3, kk=5, nc=3)
    km = km.astype(np.int64) * 100_003
    tissue = tissue.astype(np.int32) * 70_001
    ref = None
    for ch in CHUNKINGS[1:]:
        (t,) = contingency_tables([da.from_array(km, chunks=ch)], tissue)
        assert sum(t.values()) == km.size
        ref = t if ref is None else ref
        assert t == ref
    inside = (km != 0) & (tissue != 0)
    assert kmeans_agreement(km, tissue)["ari"] == pytest.approx(
        adjusted_rand_score(tissue[inside], km[inside]), abs=1e-12
    )


def test_ari_special_cases():
    assert adjusted_rand_from_table({(1, 5): 10}) == 1.0  # one cluster, one class
    assert adjusted_rand_from_table({(1, 2): 3, (2, 1): 4}) == 1.0  # relabelled
    assert math.isnan(adjusted_rand_from_table({}))
    km, tissue = _pair(4, noise=0.9)
    r = kmeans_agreement(km, tissue)
    assert -1.0 <= r["ari"] <= 1.0


def test_best_match_dice_constructed():
    # tissue: classes 1 (10 voxels), 2 (20), 3 (10); clusters: 1 = class 1 exactly, 2 = first 12 of class 2,
    # 3 = last 8 of class 2 + 2 voxels of class 3, 4 = the other 8 of class 3
    tissue = np.array([1] * 10 + [2] * 20 + [3] * 10, np.uint8)[:, None, None]
    km = np.array([1] * 10 + [2] * 12 + [3] * 8 + [3] * 2 + [4] * 8, np.uint8)[:, None, None]
    r = kmeans_agreement(da.from_array(km, chunks=(7, 1, 1)), tissue)
    d = r["dice"]
    assert r["clusters"] == [1, 2, 3, 4] and r["classes"] == [1, 2, 3]
    assert d[1]["dice"] == 1.0 and d[1]["cluster"] == 1
    assert d[2]["cluster"] == 2 and d[2]["dice"] == pytest.approx(2 * 12 / (12 + 20))
    assert d[3]["cluster"] == 4 and d[3]["dice"] == pytest.approx(2 * 8 / (8 + 10))
    assert d[2]["class_voxels"] == 20 and d[2]["cluster_voxels"] == 12
    # merged: clusters 2 and 3 are mostly class 2 -> 2*20 / (22 + 20); cluster 4 alone for class 3
    assert d[2]["merged_clusters"] == [2, 3] and d[2]["dice_merged"] == pytest.approx(40 / 42)
    assert d[3]["dice_merged"] == pytest.approx(2 * 8 / 18)
    assert r["ari"] == pytest.approx(adjusted_rand_score(tissue.ravel(), km.ravel()), abs=1e-12)


def test_volumes_must_share_the_grid():
    km, tissue = _pair(5)
    a = make_volume(da.from_array(km), np.diag([0.5, 0.5, 0.5, 1.0]), kind="labels")
    b = make_volume(da.from_array(tissue), np.diag([0.5, 0.5, 0.5, 1.0]), kind="labels")
    assert kmeans_agreement(a, b)["voxels"] > 0
    shifted = np.diag([0.5, 0.5, 0.5, 1.0])
    shifted[0, 3] = 0.25
    c = make_volume(da.from_array(tissue), shifted, kind="labels")
    with pytest.raises(HelmError, match="not on the same grid"):
        kmeans_agreement_many({4: a}, c)
    with pytest.raises(HelmError, match="shape"):
        kmeans_agreement(km[:-1], tissue)
    with pytest.raises(HelmError, match="integer"):
        kmeans_agreement(km.astype(np.float32), tissue)


def test_reference_on_grid_flip_and_spacing():
    from helm_dask.orient import flip_left_right, to_ras
    from helm_dask.resample import resample_labels

    rng = np.random.default_rng(0)
    tissue = rng.integers(0, 4, (12, 10, 8)).astype(np.uint8)
    aff = np.array([[-1.0, 0, 0, 20], [0, 1, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]])  # LAS on disk
    vol = make_volume(da.from_array(tissue, chunks=5), aff, kind="labels")
    for side in ("L", "R"):
        v = to_ras(vol)
        if side == "R":
            v = flip_left_right(v)
        target = resample_labels(v, 2.0, method="majority")  # what the run's working grid looks like
        out = reference_on_grid(vol, target, side=side, spacing=2.0)
        np.testing.assert_array_equal(out.values, target.values)
        same = reference_on_grid(vol, v, side=side)  # already on the grid: returned as is
        np.testing.assert_array_equal(same.values, v.values)
    other = make_volume(da.zeros((5, 5, 5), np.uint8), np.eye(4), kind="labels")
    with pytest.raises(HelmError, match="working grid"):
        reference_on_grid(vol, other, side="L", spacing=2.0)


@pytest.mark.e2e
def test_cli_reference_tissue_flag(tmp_path, capsys):
    from helm_dask.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--reference-tissue FILE optional: a tissue-class map on the scan's grid (e.g. a phantom's "
        "truth_tissue.nii.gz); QC then reports the k-means agreement"
    ) in text
    code = main(
        [
            "run",
            str(tmp_path / "s.nii.gz"),
            "--hypothalamus",
            str(tmp_path / "h.nii.gz"),
            "--out",
            str(tmp_path),
            "--reference-tissue",
            str(tmp_path / "nope.nii.gz"),
            "--scheduler",
            "threads",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "reference tissue map not found" in err and "Traceback" not in err
    (tmp_path / "m.csv").write_text("scan,hypothalamus\ns.nii.gz,h.nii.gz\n")
    (tmp_path / "t.nii.gz").write_bytes(b"")
    code = main(
        [
            "run",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path),
            "--reference-tissue",
            str(tmp_path / "t.nii.gz"),
            "--scheduler",
            "threads",
        ]
    )
    assert code != 0 and "--reference-tissue is one subject's" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end

SPACING = 3.0
KS = (4, 6)  # two maps keep the test short; the agreement pass is the same for six


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    root = tmp_path_factory.mktemp("template3mm")
    ph = root / "phantom"
    write_phantom(ph, anatomy="mni152", spacing_mm=SPACING, side="L", seed=1, fluid="bright", bag_gap_mm=5.0)
    params = RunParams(
        scan=str(ph / "scan.nii.gz"),
        hypothalamus=str(ph / "hypothalamus.nii.gz"),
        out=str(root / "out"),
        side="auto",
        spacing=SPACING,
        ks=KS,
        subject="t",
        nifti=False,
        reference_tissue=str(ph / "truth_tissue.nii.gz"),
    )
    info = run_subject(params, quiet=True)
    return root / "out" / "t", info


@pytest.mark.e2e
@pytest.mark.slow
def test_run_reports_kmeans_agreement(template_run):
    d, info = template_run
    run = json.loads((d / "run.json").read_text())
    ag = run["kmeans_agreement"]
    assert ag["error"] is None, ag["error"]
    assert sorted(ag["ks"], key=int) == [str(k) for k in KS]
    for k, r in ag["ks"].items():
        assert math.isfinite(r["ari"]) and -1.0 <= r["ari"] <= 1.0, (k, r["ari"])
        assert r["voxels"] > 0
        assert {"1", "2", "3"} <= set(r["dice"])  # CSF/fluid, grey and white matter at least
        for c in r["dice"].values():
            assert 0.0 <= c["dice"] <= 1.0
    assert json.loads((d / "qc" / "kmeans_agreement.json").read_text())["ks"] == ag["ks"]
    page = (d / "qc" / "report.html").read_text()
    assert "k-means vs reference tissue" in page and 'id="kmeans-agreement-table"' in page
    assert page.count("<tr data-k=") == len(KS)
    qc = json.loads((d / "qc" / "qc.json").read_text())
    assert qc["kmeans_agreement"]["ks"]["6"]["ari"] == pytest.approx(ag["ks"]["6"]["ari"])


@pytest.mark.e2e
@pytest.mark.slow
def test_without_reference_nothing_changes(template_run, tmp_path):
    from helm_dask.pipeline import RunParams
    from helm_dask.qc import _reference_agreement, _Subject

    assert RunParams(scan="s", hypothalamus="h", out="o").reference_tissue is None
    d, _ = template_run
    run = json.loads((d / "run.json").read_text())
    run.pop("kmeans_agreement")
    run["params"]["reference_tissue"] = None
    before = (d / "run.json").read_text()
    # the QC's hook does nothing without the option: no computation, no file, run.json untouched
    assert _reference_agreement(_Subject(d), run, [4, 6], tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert (d / "run.json").read_text() == before


@pytest.mark.e2e
@pytest.mark.slow
def test_template_run_mirror_plane_is_the_medial_plane(template_run):
    """Real anatomy end to end: the mirror plane fitted to the pipeline's own mask of the template phantom is
    the template's mid-sagittal plane (the hemisection is a curved cut near it), and the anatomical check
    passed with the hypothalamus near the plane."""
    from helm_dask.phantom_mni import phantom_mni_geometry

    d, info = template_run
    run = json.loads((d / "run.json").read_text())
    geo = phantom_mni_geometry(SPACING, "L", seed=1, bag_gap_mm=5.0)
    true_n = np.asarray(geo["medial_plane"]["normal"], float)
    true_p = np.asarray(geo["medial_plane"]["point_mm"], float)
    # the pipeline works in RAS+ with a right hemisphere flipped to the left: a left one keeps its frame
    t = run["transform"]
    n = np.asarray(t["matrix"], float)[0, :3]
    T = np.asarray(t["matrix"], float)
    ang = math.degrees(math.acos(min(1.0, abs(float(n @ true_n)) / np.linalg.norm(n) / np.linalg.norm(true_n))))
    # the plane x = 0 after T passes through the true medial point within a few mm
    off = float((T[:3, :3] @ true_p + T[:3, 3])[0])
    assert ang < 3.0 and abs(off) < 3.0, (ang, off)  # measured: 0.9 deg, 0.4 mm on a 3 mm grid
    chk = run["mirror_check"]
    assert chk["ok"] and abs(chk["centroid_distance_mm"]) < 10.0, chk
