"""``--extra-labels``: users' own structures in the manual file -- parsed and refused early, laid over the k-means
maps without joining the closing (a fornix given so is never absorbed), mirrored to their right codes, in the LUT and
the QC page; and the closing's additions counted per label and per k-means cluster against scipy."""

from __future__ import annotations

import json

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from helm_dask.closing import close_labels, closing_additions, overlay_labels
from helm_dask.errors import HelmError
from helm_dask.labels import check_extra_labels, lut_tables, parse_extra_labels
from helm_dask.pipeline import RunParams
from helm_dask.pipeline.params import check_params
from helm_dask.volume import make_volume


def test_parse_pairs_and_lut_files(tmp_path):
    e = parse_extra_labels("1018:1054:amygdala, 2000:2000")
    assert [(x.left, x.right, x.name) for x in e] == [(1018, 1054, "amygdala"), (2000, 2000, "extra-2000")]
    assert parse_extra_labels(None) == () and parse_extra_labels(["250:250:fornix"])[0].name == "fornix"
    lut = tmp_path / "extra.txt"
    lut.write_text("1018 Left-Amygdala 1 2 3 0\n1054 Right-Amygdala 4 5 6 0\n3000 Midline-Thing 7 8 9 0\n")
    pairs = {(x.left, x.right, x.name, x.rgba) for x in parse_extra_labels(str(lut))}
    assert pairs == {(1018, 1054, "Amygdala", (1, 2, 3, 0)), (3000, 3000, "Midline-Thing", (7, 8, 9, 0))}
    for bad in ("1018", "a:b", "1018:1054:two words", "1:2:3:4"):
        with pytest.raises(HelmError, match="--extra-labels"):
            parse_extra_labels(bad)


@pytest.mark.parametrize(
    "spec, table, match",
    [
        ("18:54", "freesurfer", "k-means cluster number"),
        ("1018:806", "freesurfer", "hypothalamus code"),
        ("801:1801", "freesurfer", "hypothalamus code"),
        ("25:1025", "helm", "hypothalamus code"),  # 2k+7 for k = 9
        ("1018:1054,1018:1055", "freesurfer", "given twice"),
        ("1018:1054,1054:1090", "freesurfer", "given twice"),
        ("250:1250", "freesurfer", "fornix"),
        ("65535:65535", "freesurfer", "outside"),
    ],
)
def test_colliding_codes_are_refused(spec, table, match):
    with pytest.raises(HelmError, match=match) as e:
        check_extra_labels(parse_extra_labels(spec), table, (4, 5, 6, 7, 8, 9))
    assert "--extra-labels" in str(e.value) and "\n" not in str(e.value)


def test_refused_before_anything_runs(tmp_path):
    for name in ("scan.nii.gz", "hyp.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / name)
    base = dict(scan=str(tmp_path / "scan.nii.gz"), hypothalamus=str(tmp_path / "hyp.nii.gz"), out=str(tmp_path / "o"))
    check_params(RunParams(**base, extra_labels="1018:1054"))
    with pytest.raises(HelmError, match="--extra-labels: code 5 is a k-means cluster number"):
        check_params(RunParams(**base, extra_labels="5:1054"))
    assert not (tmp_path / "o").exists()


def test_lut_entries_for_both_sides():
    t = lut_tables("freesurfer", (4,), parse_extra_labels("1018:1054:amygdala,250:250:fornix"))[4]
    assert t.entries[1018][0] == "L_amygdala" and t.entries[1054][0] == "R_amygdala" and t.entries[250][0] == "fornix"
    h = lut_tables("helm", (4,), parse_extra_labels("250:250:fornix"))[4]
    assert 250 not in h.entries and h.entries[19][0] == "L_fornix"  # the helm table numbers the fornix


def test_stage_keys_change_only_with_extra_labels():
    from helm_dask.pipeline.steps import Run, _merge_params, _mirror_params, _resample_params

    p = RunParams(scan="s.nii.gz", hypothalamus="h.nii.gz", out="o")
    run = Run(p=p, subj=None)  # type: ignore[arg-type]
    assert "extra_labels" not in _merge_params(run) and "extra_labels" not in _mirror_params(run)
    assert "extra_labels" not in _resample_params(run)
    p.extra_labels = "1018:1054:amygdala"
    want = [{"left": 1018, "right": 1054, "name": "amygdala"}]
    assert _merge_params(run)["extra_labels"] == _mirror_params(run)["extra_labels"] == want


def _vol(a, chunks=7):
    return make_volume(da.from_array(a, chunks=chunks), np.diag([0.3, 0.3, 0.3, 1.0]), kind="labels")


def _scipy_closing(mask, radius, spacing):
    """Reference: scipy's binary closing with a ball in mm, on a copy padded by the ball's reach."""
    h = int(np.floor(radius / spacing + 1e-9))
    g = np.arange(-h, h + 1) * spacing
    ball = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= radius**2 * (1 + 1e-9)
    pad = 2 * h
    out = ndi.binary_closing(np.pad(mask, pad), ball)
    return out[pad:-pad, pad:-pad, pad:-pad]


def _manual():
    """Two hypothalamus plates 2 voxels apart (the closing bridges them) with a fornix column in the gap."""
    lab = np.zeros((24, 22, 22), np.uint16)
    lab[4:10, 6:16, 6:16] = 801
    lab[12:18, 6:16, 6:16] = 803
    lab[10:12, 10:12, 4:18] = 250  # the fornix runs through the gap
    return lab


def test_a_fornix_given_as_extra_label_is_never_absorbed():
    lab = _manual()
    man = _vol(lab)
    closed = overlay_labels(close_labels(man, 1.2, codes=[801, 802, 803, 804, 805]), man, [250]).values
    np.testing.assert_array_equal(closed[lab == 250], 250)  # every fornix voxel keeps its code
    assert (closed == 250).sum() == (lab == 250).sum()  # and the fornix grows nowhere
    hyp = np.isin(lab, [801, 803])
    ref = _scipy_closing(hyp, 1.2, 0.3)
    added = ref & (lab == 0)
    assert added.sum() > 50 and np.array_equal((closed != 0) & (lab == 0), added)  # the gap is bridged


def test_closing_additions_match_scipy():
    lab = _manual()
    man = _vol(lab)
    closed_v = close_labels(man, 1.2)
    rng = np.random.default_rng(0)
    km = {k: _vol(rng.integers(0, k + 1, lab.shape).astype(np.uint8), chunks=9) for k in (4, 6)}
    rec = closing_additions(man, closed_v, km)
    closed = closed_v.values
    added = _scipy_closing(lab != 0, 1.2, 0.3) & (lab == 0)
    # per label: the added voxels' nearest manual label (scipy's distance per code; ties go to the smallest code)
    codes = np.array([250, 801, 803])
    dist = np.stack([ndi.distance_transform_edt(lab != c, sampling=0.3) for c in codes])
    nearest = codes[np.argmax(dist <= dist.min(axis=0) * (1 + 1e-9), axis=0)]
    want = {str(c): int(n) for c, n in zip(*np.unique(nearest[added], return_counts=True))}
    assert rec["by_label"] == want and np.array_equal(closed[added], nearest[added])
    for k, v in km.items():
        vals = v.values[added]
        assert rec["by_cluster"][str(k)] == {str(c): int(n) for c, n in zip(*np.unique(vals, return_counts=True))}
    assert rec["voxel_mm3"] == pytest.approx(0.027)
    assert closing_additions(man, man)["by_label"] == {}


@pytest.mark.e2e
@pytest.mark.slow
def test_run_with_extra_labels(tmp_path):
    from helm_dask.io import open_volume
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import run_subject

    ph = tmp_path / "ph"
    write_phantom(ph, spacing_mm=1.0, side="L", seed=2)
    img = nib.load(ph / "hypothalamus.nii.gz")
    lab = np.asanyarray(img.dataobj).astype(np.int32)
    c = np.argwhere(lab == 801).mean(0).astype(int)
    box = lab[c[0] - 2 : c[0] + 1, c[1] + 6 : c[1] + 9, c[2] - 1 : c[2] + 2]
    box[box == 0] = 2018
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), ph / "hyp.nii.gz")
    params = RunParams(
        scan=str(ph / "scan.nii.gz"),
        hypothalamus=str(ph / "hyp.nii.gz"),
        out=str(tmp_path / "o"),
        side="L",
        spacing=1.0,
        ks=(4,),
        extra_labels="250:250:fornix,2018:2054:thing",
    )
    info = run_subject(params, quiet=True)
    z = tmp_path / "o" / "scan" / "helm.zarr"
    hyp = open_volume(z / "hypothalamus").values
    hemi = open_volume(z / "hemi_k4").values
    for code in (250, 2018):  # exactly the manual voxels: not closed, not absorbed
        np.testing.assert_array_equal(hemi == code, hyp == code)
    whole = open_volume(z / "label_map_k4").values
    half = whole.shape[0] // 2
    assert (whole[:half] == 2018).sum() == (whole[half:] == 2054).sum() > 0  # resampled: not the hemisphere's count
    assert not (whole[:half] == 2054).any() and not (whole[half:] == 2018).any()
    assert (whole[half:] == 250).sum() == (whole[:half] == 250).sum() > 0
    rec = info["closing"]["added_voxels"]
    assert set(rec["by_label"]) <= {"801", "802", "803", "804", "805"} and "4" in rec["by_cluster"]
    assert json.loads((tmp_path / "o" / "scan" / "run.json").read_text())["closing"] == info["closing"]
    lut = (tmp_path / "o" / "scan" / "lut.txt").read_text()
    assert "L_thing" in lut and "R_thing" in lut
    qc = json.loads((tmp_path / "o" / "scan" / "qc" / "qc.json").read_text())
    assert any(f[0].startswith("Closing") for f in qc["facts"])
    assert {r["code"]: r["short"] for r in qc["label_volumes_mm3"]}[2018] == "L thing"
