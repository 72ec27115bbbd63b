"""The pipeline end to end on small phantoms: contract outputs, resumability, bad inputs, manifests."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from helm_dask.batch import run_batch
from helm_dask.errors import HelmError
from helm_dask.io.nifti import read_nifti_provenance
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams, run_subject

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # every test runs the pipeline on phantoms

SPACING_IN = 2.0  # mm: small phantoms keep the suite fast; the method is resolution-independent
SPACING_WORK = 2.5
KS = (4, 6)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for side in ("L", "R"):
        write_phantom(root / side, spacing_mm=SPACING_IN, side=side, seed=1)
        out[side] = root / side
    return out


def _params(ph, out, **kw):
    base = dict(
        scan=str(ph / "scan.nii.gz"),
        hypothalamus=str(ph / "hypothalamus.nii.gz"),
        out=str(out),
        side="auto",
        spacing=SPACING_WORK,
        ks=KS,
    )
    base.update(kw)
    return RunParams(**base)


@pytest.fixture(scope="module")
def full_runs(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    infos = {side: run_subject(_params(phantoms[side], out, subject=f"ph{side}"), quiet=True) for side in "LR"}
    return out, infos


def test_contract_outputs(full_runs):
    out, infos = full_runs
    for side in "LR":
        d = out / f"ph{side}"
        for name in ("preprocessed", "mask", "bias", "hypothalamus"):
            assert (d / f"{name}.nii.gz").exists()
        for k in KS:
            for name, dtype in ((f"kmeans_k{k}", np.uint8), (f"hemi_k{k}", np.uint16), (f"label_map_k{k}", np.uint16)):
                img = nib.load(d / f"{name}.nii.gz")
                assert img.header.get_data_dtype() == dtype, name
                assert img.header.get_intent()[0] == "label"
        assert (d / "lut.txt").exists() and (d / "transform.json").exists() and (d / "helm.zarr").is_dir()
        pre = nib.load(d / "preprocessed.nii.gz")
        assert pre.header.get_data_dtype() == np.float32
        assert "".join(nib.aff2axcodes(pre.affine)) == "RAS"
        assert np.allclose(pre.header.get_zooms(), SPACING_WORK, atol=1e-5)
        prov = read_nifti_provenance(d / "label_map_k4.nii.gz")
        assert prov and prov["stage_key"] and any(p["stage"] == "mirror" for p in prov["provenance"])
        assert set(prov["inputs"].values()) == set(infos[side]["inputs"].values())


def test_side_detected_and_right_flipped(full_runs):
    out, infos = full_runs
    assert infos["L"]["side"]["used"] == "L" and infos["R"]["side"]["used"] == "R"
    for side in "LR":
        hyp = np.asanyarray(nib.load(out / f"ph{side}" / "hypothalamus.nii.gz").dataobj)
        codes = set(np.unique(hyp).tolist()) - {0}
        assert codes <= {801, 802, 803, 804, 805, 250} and {801, 803, 805} <= codes


def test_kmeans_order_and_merge(full_runs):
    out, _ = full_runs
    d = out / "phL"
    pre = nib.load(d / "preprocessed.nii.gz").get_fdata()
    km = np.asanyarray(nib.load(d / "kmeans_k6.nii.gz").dataobj)
    hemi = np.asanyarray(nib.load(d / "hemi_k6.nii.gz").dataobj)
    mask = np.asanyarray(nib.load(d / "mask.nii.gz").dataobj)
    assert set(np.unique(km[mask > 0]).tolist()) == set(range(1, 7)) and np.all(km[mask == 0] == 0)
    means = [pre[km == c].mean() for c in range(1, 7)]
    assert means == sorted(means)
    hyp = np.asanyarray(nib.load(d / "hypothalamus.nii.gz").dataobj)
    # manual labels override the clusters; the closing only adds labelled voxels
    assert np.all(hemi[hyp > 0] == hyp[hyp > 0])
    assert np.all(np.isin(hemi[km > 0], list(range(1, 7)) + [250, 801, 802, 803, 804, 805]))


def test_whole_brain_map_is_mirrored(full_runs):
    out, infos = full_runs
    img = nib.load(out / "phL" / "label_map_k6.nii.gz")
    lm = np.asanyarray(img.dataobj)
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    # voxel centres symmetric about x = 0: voxel i <-> n-1-i
    xs = img.affine[0, 0] * np.arange(lm.shape[0]) + img.affine[0, 3]
    np.testing.assert_allclose(xs, -xs[::-1], atol=1e-4)
    left = lm[: lm.shape[0] // 2]
    right = lm[lm.shape[0] // 2 :][::-1]
    right_as_left = np.where((right >= 806) & (right <= 810), right - 5, right)
    assert np.mean(left == right_as_left) > 0.999
    assert {806, 807, 808, 809, 810} <= set(np.unique(lm).tolist())
    tr = json.loads((out / "phL" / "transform.json").read_text())["transform"]
    assert {"matrix", "angles_deg", "translation_mm", "cost", "fraction_across", "gap_mm"} <= set(tr)


def test_rerun_recomputes_nothing_and_changed_parameter_recomputes_downstream(phantoms, tmp_path):
    p = _params(phantoms["L"], tmp_path, until="preprocess")
    first = run_subject(p, quiet=True)
    assert all(s["status"] == "computed" for s in first["stages"].values())
    mtime = (tmp_path / "scan" / "preprocessed.nii.gz").stat().st_mtime_ns
    again = run_subject(p, quiet=True)
    assert all(s["status"] == "skipped" for s in again["stages"].values())
    assert (tmp_path / "scan" / "preprocessed.nii.gz").stat().st_mtime_ns == mtime
    changed = run_subject(_params(phantoms["L"], tmp_path, until="preprocess", spacing=3.0), quiet=True)
    st = {k: v["status"] for k, v in changed["stages"].items()}
    assert st == {"import": "skipped", "background": "skipped", "resample": "computed", "bias": "computed"}
    assert np.allclose(nib.load(tmp_path / "scan" / "preprocessed.nii.gz").header.get_zooms(), 3.0)


def test_stage_version_bump_recomputes_that_stage_and_after(phantoms, tmp_path, monkeypatch):
    import helm_dask.background as bgmod
    from helm_dask import pipeline

    p = _params(phantoms["L"], tmp_path, until="preprocess", qc=False)
    first = run_subject(p, quiet=True)
    bg = first["background"]
    # --fluid enters the stage's parameters; run.json records what the method decided
    assert first["stages"]["background"]["params"]["fluid"] == "auto"
    assert bg["fluid"] == "auto" and "fluid_side" in bg
    monkeypatch.setitem(pipeline.STAGE_VERSIONS, "resample", pipeline.STAGE_VERSIONS["resample"] + 1)
    bumped = run_subject(p, quiet=True)
    st = {k: v["status"] for k, v in bumped["stages"].items()}
    assert st == {"import": "skipped", "background": "skipped", "resample": "computed", "bias": "computed"}
    # a skipped background still reports its decisions (kept in the mask store's metadata)
    assert bumped["background"] == bg
    assert json.loads((tmp_path / "scan" / "run.json").read_text())["background"] == json.loads(json.dumps(bg))
    # another --fluid is another background key; it reaches brain_mask
    seen = []
    real = bgmod.brain_mask
    monkeypatch.setattr(bgmod, "brain_mask", lambda img, **kw: seen.append(kw.get("fluid")) or real(img))
    changed = run_subject(_params(phantoms["L"], tmp_path, until="preprocess", qc=False, fluid="none"), quiet=True)
    st = {k: v["status"] for k, v in changed["stages"].items()}
    assert seen == ["none"] and st["import"] == "skipped" and st["background"] == "computed"


def test_zarr_only_run_then_nifti_exports_without_recomputing(phantoms, tmp_path):
    p = _params(phantoms["L"], tmp_path, until="merge", nifti=False, qc=False)
    first = run_subject(p, quiet=True)
    assert all(s["status"] == "computed" for s in first["stages"].values())
    subj = tmp_path / "scan"
    assert not list(subj.glob("*.nii*"))
    assert (subj / "helm.zarr" / "hemi_k6").is_dir() and (subj / "lut.txt").exists()
    again = run_subject(_params(phantoms["L"], tmp_path, until="merge", qc=False), quiet=True)
    assert all(s["status"] == "skipped" for s in again["stages"].values())
    names = {f.name for f in subj.glob("*.nii.gz")}
    assert {
        "preprocessed.nii.gz",
        "mask.nii.gz",
        "bias.nii.gz",
        "hypothalamus.nii.gz",
        "kmeans_k4.nii.gz",
        "hemi_k6.nii.gz",
    } <= names
    with pytest.raises(HelmError, match="--no-nifti"):
        run_subject(_params(phantoms["L"], tmp_path, nifti=False, layout="helm"), quiet=True)


def test_interrupted_stage_resumes(phantoms, tmp_path, monkeypatch):
    import helm_dask.kmeans as km

    p = _params(phantoms["L"], tmp_path, until="kmeans")
    real = km.kmeans_maps
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(km, "kmeans_maps", dying)
    with pytest.raises(KeyboardInterrupt):
        run_subject(p, quiet=True)
    assert not (tmp_path / "scan" / "kmeans_k4.nii.gz").exists()
    assert not any(x.name.startswith(".") and "tmp" in x.name for x in (tmp_path / "scan" / "helm.zarr").iterdir())
    monkeypatch.setattr(km, "kmeans_maps", real)
    info = run_subject(p, quiet=True)
    st = {k: v["status"] for k, v in info["stages"].items()}
    assert st["bias"] == "skipped" and st["kmeans"] == "computed"
    assert (tmp_path / "scan" / "kmeans_k4.nii.gz").exists()


def test_labels_on_another_grid(phantoms, tmp_path):
    lab = nib.load(phantoms["L"] / "hypothalamus.nii.gz")
    data = np.asanyarray(lab.dataobj)[1:]
    aff = lab.affine.copy()
    aff[:3, 3] += aff[:3, 0]
    moved = tmp_path / "hyp_cropped.nii.gz"
    img = nib.Nifti1Image(data, aff)
    img.header.set_intent("label")
    nib.save(img, moved)
    p = _params(phantoms["L"], tmp_path / "o", hypothalamus=str(moved), until="preprocess")
    with pytest.raises(HelmError, match="resample-labels") as ei:
        run_subject(p, quiet=True)
    assert "shape" in str(ei.value)
    info = run_subject(
        _params(phantoms["L"], tmp_path / "o", hypothalamus=str(moved), until="preprocess", resample_labels=True),
        quiet=True,
    )
    assert info["status"] == "ok"


def test_unknown_label_codes_listed(phantoms, tmp_path):
    lab = nib.load(phantoms["L"] / "hypothalamus.nii.gz")
    data = np.asanyarray(lab.dataobj).copy()
    data[data == 803] = 77
    bad = tmp_path / "bad_hyp.nii.gz"
    nib.save(nib.Nifti1Image(data, lab.affine), bad)
    with pytest.raises(HelmError, match="77"):
        run_subject(_params(phantoms["L"], tmp_path / "o", hypothalamus=str(bad), until="preprocess"), quiet=True)
    info = run_subject(
        _params(phantoms["L"], tmp_path / "o", hypothalamus=str(bad), until="preprocess", label_map={77: 803}),
        quiet=True,
    )
    assert info["status"] == "ok"


def test_manifest_with_a_broken_subject(phantoms, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    manifest = tmp_path / "subjects.yaml"
    manifest.write_text(
        "params:\n  spacing: 2.5\n  k: 4,6\n  until: merge\n"
        "subjects:\n"
        f"  - {{scan: {phantoms['L'] / 'scan.nii.gz'}, hypothalamus: {phantoms['L'] / 'hypothalamus.nii.gz'},"
        " side: L, subject: left}\n"
        f"  - {{scan: {phantoms['R'] / 'scan.nii.gz'}, hypothalamus: {phantoms['R'] / 'hypothalamus.nii.gz'},"
        " side: R, subject: right}\n"
        f"  - {{scan: broken.nii.gz, hypothalamus: {phantoms['L'] / 'hypothalamus.nii.gz'}, subject: broken}}\n"
    )
    base = RunParams(scan="", hypothalamus="", out=str(tmp_path / "out"))
    rows = run_batch(manifest, base, quiet=True)
    status = {r["subject"]: r["status"] for r in rows}
    assert status["left"] == "ok" and status["right"] == "ok"
    assert status["broken"].startswith("failed") and "broken.nii.gz" in status["broken"]
    assert (tmp_path / "out" / "right" / "hemi_k6.nii.gz").exists()
    rows2 = run_batch(manifest, base, quiet=True)
    for r in rows2:
        if r["status"] == "ok":
            assert set(r["skipped"]) == set(r["stages"]), r


def test_compare_truth_with_pipeline_labels(phantoms, full_runs, capsys):
    """helm-dask compare: the phantom's true hypothalamus against the pipeline's merged map, per subregion."""
    from helm_dask.cli import main

    out, _ = full_runs
    code = main(
        [
            "compare",
            str(out / "phL" / "hemi_k6.nii.gz"),
            str(phantoms["L"] / "hypothalamus.nii.gz"),
            "--resample",
            "--scheduler",
            "threads",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in rows}
    for n in ("L anterior-inferior", "L posterior", "L whole", "L anterior", "L tuberal"):
        assert any(n.lower() in k.lower() for k in names), names.keys()
    whole = [r for r in rows if r["name"] == "L whole"][0]
    assert whole["dice"] > 0.5


def test_rerun_that_skips_the_mirror_still_reports_its_check(phantoms, full_runs):
    out, infos = full_runs
    again = run_subject(_params(phantoms["L"], out, subject="phL"), quiet=True)
    assert again["stages"]["mirror"]["status"] == "skipped"
    first = json.loads(json.dumps(infos["L"]["mirror_check"]))
    assert again["mirror_check"] == first and first["ok"] and abs(first["centroid_distance_mm"]) < 15.0
