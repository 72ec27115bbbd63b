"""``--label-table helm``: the published HELM maps' numbering, which depends on k, checked against codes derived by
hand from the authors' code (repository liviamarodrigues/hsynex), a table file overriding it, one LUT per k, and a
pipeline run whose maps are the default run's maps renumbered."""

from __future__ import annotations

import numpy as np
import pytest

from helm_dask.errors import HelmError
from helm_dask.labels import (
    FORNIX,
    MIRRORED_FORNIX,
    helm_table,
    label_colours,
    load_label_table,
    lut_table,
    lut_tables,
)


def authors_codes(k: int) -> dict:
    """The whole-brain codes of one k as the authors' code makes them, in memory.

    ``label_maps/mesh.py`` (the acquired hemisphere is ``left``: ``rotation.py`` moves it to x < 0; the mirrored
    copy, ``aff_neg``, is ``right``)::

        max_val = img_left.max()
        k_ = int(value_k.split('.')[0])
        img_left[img_left>k_] = img_left[img_left>k_]+max_val #changing values from the segmented structure in one side

    ``training/label2img.py`` (channels = the map's codes in increasing order, background dropped; k_ clusters first)::

        k_ = labels_one.shape[0]-15 #find k_ labels from k-means
        anterior = [k_, k_+5, k_+6, k_+11] #labels for anterior subnuclei
        if idx != k_+4 and idx != k_+10: #label for fornix, taking out of hypot.

    A merged hemisphere holds clusters 1..k and six codes k+1..k+6 (five subunits and the fornix).
    """
    hemi = np.arange(1, k + 7, dtype=float)  # every code of a merged hemisphere map, once
    img_left = hemi.copy()
    max_val = img_left.max()
    img_left[img_left > k] = img_left[img_left > k] + max_val
    img_right = hemi.copy()
    channels = {int(c): i for i, c in enumerate(np.unique(np.concatenate([img_left, img_right])))}
    return {
        "left": [int(c) for c in img_left[k:]],
        "right": [int(c) for c in img_right[k:]],
        "channel": channels,
        "anterior": {k, k + 5, k + 6, k + 11},
        "fornix": {k + 4, k + 10},
    }


@pytest.mark.parametrize("k", [2, 4, 6, 9, 20])
def test_helm_codes_are_the_authors(k):
    ref = authors_codes(k)
    t = helm_table().for_k(k)
    left = [801, 802, 803, 804, 805, FORNIX]
    right = [806, 807, 808, 809, 810, MIRRORED_FORNIX]
    # the six codes of each side are the authors' (the order inside a side: below)
    assert sorted(t.out_code(c) for c in left) == ref["left"]
    assert sorted(t.out_code(c) for c in right) == ref["right"]
    assert ref["left"] == [2 * k + 7 + i for i in range(6)] and ref["right"] == [k + 1 + i for i in range(6)]
    # clusters keep 1..k
    assert [t.out_code(j) for j in range(1, k + 1)] == list(range(1, k + 1))
    # anterior and fornix at the channels label2img gives them
    ch = ref["channel"]
    assert {ch[t.out_code(c)] for c in (801, 802, 806, 807)} == ref["anterior"]
    assert {ch[t.out_code(c)] for c in (FORNIX, MIRRORED_FORNIX)} == ref["fornix"]
    # the other side is the mirrored side + max_val (k + 6), code by code
    assert all(t.out_code(a) == t.out_code(b) + k + 6 for a, b in zip(left, right))
    assert t.right_codes() == {t.out_code(a): t.out_code(b) for a, b in zip(left, right)}


def test_helm_table_says_what_the_code_leaves_open():
    text = lut_tables("helm", (4, 6))[6].colorlut_text()
    assert "does not say which anterior code is inferior" in text.replace("\n# ", " ")
    rows = {int(r.split()[0]): r.split()[1] for r in text.splitlines() if r and not r.startswith("#")}
    assert rows[6] == "kmeans-cluster-6" and rows[7] == "R_hypothalamus_anterior_inferior"
    assert rows[23] == "L_fornix" and rows[11] == "R_fornix" and 801 not in rows and 250 not in rows


def test_lut_per_k_and_colours_keyed_by_the_maps_codes():
    t = lut_tables("helm", (4, 5))
    assert t[4].entries[5][0] == "R_hypothalamus_anterior_inferior" and t[5].entries[5][0] == "kmeans-cluster-5"
    assert lut_table("helm", (4, 5)).name == "helm, k = 5"
    c = label_colours("helm", (4,))
    assert c[15][0] == "L_hypothalamus_anterior_inferior" and c[5][0] == "R_hypothalamus_anterior_inferior"
    # a k-independent table is one table for every k, as before
    one = lut_tables("freesurfer", (4, 9))
    assert one[4] is one[9] and one[4].colorlut_text() == lut_table("freesurfer", (4, 9)).colorlut_text()


def test_a_table_file_overrides_the_order(tmp_path):
    rows = [
        "# our_code output_code name",
        "806 k+1 R_ai",
        "808 k+4 R_post",  # posterior and tuberal-superior swapped against the built-in order
        "809 k+3 R_ti",
        "810 k+2 R_ts",
        "250R k+5 R_fx",
        "807 k+6 R_as",
        *[f"{c} {e}" for c, e in ((801, "2k+7"), (803, "2*k+10"), (804, "2k+9"), (805, "2k+8"))],
        "250 2k+11 L_fx",
        "802 2k+12 L_as 1 2 3 0",
    ]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    t = load_label_table(tmp_path / "t.tsv")
    assert t.k_dependent
    t5 = t.for_k(5)
    assert [t5.out_code(c) for c in (808, 810, 803, 805, MIRRORED_FORNIX)] == [9, 7, 20, 18, 10]
    assert t5.entries[22] == ("L_as", (1, 2, 3, 0)) and t5.entries[9][0] == "R_post"
    assert t5.entries[17][0] == "L_hypothalamus_anterior_inferior"  # no name given: ours


def test_bad_table_files_are_refused(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("801 k^2\n")
    with pytest.raises(HelmError, match="line 1"):
        load_label_table(bad)
    low = tmp_path / "low.tsv"
    low.write_text("801 k\n")  # code k is cluster k's
    with pytest.raises(HelmError, match="code <= 4"):
        lut_tables(low, (4,))
    with pytest.raises(HelmError, match="--label-table helm"):
        load_label_table("published")


@pytest.mark.e2e
@pytest.mark.slow
def test_helm_run_is_the_default_run_renumbered(tmp_path):
    from helm_dask.io import open_volume
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    ph = tmp_path / "ph"
    write_phantom(ph, spacing_mm=1.0, side="L", seed=2)
    common = dict(scan=str(ph / "scan.nii.gz"), hypothalamus=str(ph / "hypothalamus.nii.gz"), side="L")
    common.update(spacing=1.0, ks=(4, 6), qc=False, nifti=False)
    run_subject(RunParams(out=str(tmp_path / "fs"), **common), quiet=True)
    run_subject(RunParams(out=str(tmp_path / "helm"), label_table="helm", **common), quiet=True)
    for k in (4, 6):
        t = helm_table().for_k(k)
        for name in (f"hemi_k{k}", f"label_map_k{k}"):
            fs = open_volume(tmp_path / "fs" / "scan" / "helm.zarr" / name).values
            helm = open_volume(tmp_path / "helm" / "scan" / "helm.zarr" / name).values
            assert fs.shape == helm.shape
            expected = fs.copy()
            for ours in (801, 802, 803, 804, 805, 806, 807, 808, 809, 810):
                expected[fs == ours] = t.out_code(ours)
            # the fornix: 250 on both sides by default; the helm table numbers the mirrored one apart
            half = fs.shape[0] // 2 if name.startswith("label_map") else fs.shape[0]
            expected[:half][fs[:half] == FORNIX] = t.out_code(FORNIX)
            expected[half:][fs[half:] == FORNIX] = t.out_code(MIRRORED_FORNIX)
            np.testing.assert_array_equal(helm, expected)
            assert (fs == FORNIX).any() and (fs == 801).any()
        text = (tmp_path / "helm" / "scan" / f"lut_k{k}.txt").read_text()
        assert f"helm, k = {k}" in text
    assert "depends on k" in (tmp_path / "helm" / "scan" / "lut.txt").read_text()
    assert not (tmp_path / "fs" / "scan" / "lut_k4.txt").exists()
