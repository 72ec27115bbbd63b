"""Label codes, colour tables (FreeSurfer ColorLUT) and the checking of manual segmentations."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from helm_dask.errors import HelmError
from helm_dask.labels import (
    COLOURS,
    FORNIX,
    GROUPS,
    HYPOTHALAMUS,
    HYPOTHALAMUS_LEFT,
    HYPOTHALAMUS_RIGHT,
    MANUAL_CODES,
    LabelTable,
    freesurfer_table,
    label_counts,
    load_label_table,
    parse_label_map,
    validate_manual_labels,
    write_lut,
)
from helm_dask.volume import affine_of, make_volume

AFF = np.diag([0.3, 0.3, 0.3, 1.0])
CHUNKINGS = [(12, 10, 8), (5, 4, 3), (12, 1, 8)]


def manual(seed=0, extra=()):
    rng = np.random.default_rng(seed)
    lab = np.zeros((12, 10, 8), np.int32)
    lab[3:8, 2:7, 2:6] = rng.choice([801, 802, 803, 804, 805], size=(5, 5, 4))
    lab[8:10, 4:6, 3:5] = FORNIX
    for v, n in extra:
        idx = rng.choice(lab.size, size=n, replace=False)
        lab.ravel()[idx] = v
    return lab


def vol_of(a, chunks=(12, 10, 8)):
    return make_volume(da.from_array(a, chunks=chunks), AFF, kind="labels", source="hyp.nii.gz")


# ----------------------------------------------------------------------------------------------------------
# codes
# ----------------------------------------------------------------------------------------------------------


def test_freesurfer_codes_names_and_colours():
    assert HYPOTHALAMUS_LEFT[801] == "L_hypothalamus_anterior_inferior"
    assert HYPOTHALAMUS_LEFT[804] == "L_hypothalamus_tubular_inferior"
    assert HYPOTHALAMUS_RIGHT[808] == "R_hypothalamus_posterior"
    assert sorted(HYPOTHALAMUS) == list(range(801, 811)) and FORNIX == 250
    assert MANUAL_CODES == set(range(801, 811)) | {250}
    assert COLOURS[801] == (250, 255, 50, 0) and COLOURS[806] == COLOURS[801]
    assert COLOURS[805] == (20, 180, 130, 0) and COLOURS[250] == (255, 0, 0, 0)
    assert GROUPS["anterior"] == (801, 802, 806, 807) and GROUPS["posterior"] == (803, 808)
    assert GROUPS["tuberal"] == (804, 805, 809, 810) and set(GROUPS["whole"]) == set(HYPOTHALAMUS)


# ----------------------------------------------------------------------------------------------------------
# colour tables
# ----------------------------------------------------------------------------------------------------------


def test_lut_round_trip(tmp_path):
    p = write_lut(tmp_path / "lut.txt", ks=(4, 5, 6, 7, 8, 9))
    text = p.read_text().splitlines()
    assert any(line.startswith("#No. Label Name:") for line in text)
    assert "801   L_hypothalamus_anterior_inferior" in p.read_text()
    back = LabelTable.from_colorlut(p)
    want = freesurfer_table().with_clusters(9)
    assert back.entries == want.entries
    assert sorted(back.entries) == [0, *range(1, 10), 250, *range(801, 811)]
    greys = [back.entries[j][1] for j in range(1, 10)]
    assert len(set(greys)) == 9 and [g[1] for g in greys] == sorted(g[1] for g in greys)  # dark -> light
    # and writing what was read gives the same file content
    back.to_colorlut(tmp_path / "again.txt")
    assert LabelTable.from_colorlut(tmp_path / "again.txt").entries == back.entries


def test_colorlut_reader_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\n801 Name 1 2\n")
    with pytest.raises(HelmError, match="line 2"):
        LabelTable.from_colorlut(bad)
    with pytest.raises(HelmError, match="cannot read"):
        LabelTable.from_colorlut(tmp_path / "missing.txt")


def test_published_numbering_needs_a_file(tmp_path):
    with pytest.raises(HelmError, match="not built into helm-dask") as e:
        load_label_table("published")
    assert "--label-table PATH" in str(e.value)
    with pytest.raises(HelmError, match="no such label table"):
        load_label_table(tmp_path / "nope.json")
    assert load_label_table("freesurfer").code_map == {}


def test_json_and_tsv_code_maps(tmp_path):
    j = tmp_path / "pub.json"
    j.write_text(
        json.dumps(
            {"name": "pub", "map": {"801": 11, "802": 12, "250": 20}, "entries": {"11": ["hyp_ai", [1, 2, 3, 0]]}}
        )
    )
    t = load_label_table(j)
    assert t.out_code(801) == 11 and t.out_code(803) == 803 and t.out_code(3) == 3
    assert t.entries[11] == ("hyp_ai", (1, 2, 3, 0))
    assert t.entries[12] == (HYPOTHALAMUS[802], COLOURS[802])  # our name and colour carried over
    assert 801 not in t.entries and t.entries[20][0] == "Fornix"
    tsv = tmp_path / "pub.tsv"
    tsv.write_text("ours\tpublished\tname\n801\t11\thyp_ai\n802\t12\n3\t103\n")
    t2 = load_label_table(tsv)
    assert (t2.out_code(801), t2.out_code(802), t2.out_code(3)) == (11, 12, 103)
    assert t2.entries[11] == ("hyp_ai", COLOURS[801])
    lut = t2.with_clusters(4)
    assert lut.entries[103][0] == "kmeans-cluster-3" and 3 not in lut.entries
    # relabelling a merged map (lazy, uint16)
    a = np.array([0, 1, 3, 801, 802, 805, 250], np.uint16).reshape(7, 1, 1)
    out = t2.relabel(vol_of(a, chunks=(3, 1, 1)))
    np.testing.assert_array_equal(out.values.ravel(), [0, 1, 103, 11, 12, 805, 250])
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(affine_of(out), AFF)


def test_code_map_collisions_are_refused(tmp_path):
    with pytest.raises(HelmError, match="same output code"):
        LabelTable("x", {}, {801: 12, 802: 12})
    with pytest.raises(HelmError, match="same output code"):
        LabelTable("x", {}, {801: 803})  # 803 itself is left as it is
    with pytest.raises(HelmError, match="same output code"):
        LabelTable("x", {}, {801: 5}).with_clusters(6)  # cluster 5 keeps code 5
    with pytest.raises(HelmError, match="cannot be renumbered"):
        LabelTable("x", {}, {801: 0})


def test_colorlut_matched_by_name(tmp_path):
    p = tmp_path / "published_lut.txt"
    p.write_text(
        "#No. Label Name: R G B A\n0 Unknown 0 0 0 0\n"
        "21 Left-Hypothalamus-anterior-inferior 1 1 1 0\n"
        "22 left_hypothalamus_Anterior_Superior 2 2 2 0\n"
        "23 Left-hypothalamus-posterior 3 3 3 0\n"
        "24 Left-hypothalamus-tuberal-inferior 4 4 4 0\n"
        "25 L_hypothalamus_tubular_superior 5 5 5 0\n"
        "26 Fornix 6 6 6 0\n"
        "31 kmeans-cluster-1 7 7 7 0\n"
    )
    t = load_label_table(p)
    assert [t.out_code(c) for c in (801, 802, 803, 804, 805, 250, 1, 2)] == [21, 22, 23, 24, 25, 26, 31, 2]
    assert t.entries[24] == ("Left-hypothalamus-tuberal-inferior", (4, 4, 4, 0))
    out = write_lut(tmp_path / "lut.txt", t, ks=(4,))
    entries = LabelTable.from_colorlut(out).entries
    assert entries[31][0] == "kmeans-cluster-1" and entries[2][0] == "kmeans-cluster-2"
    nothing = tmp_path / "other.txt"
    nothing.write_text("0 Unknown 0 0 0 0\n5 Something 1 1 1 0\n")
    with pytest.raises(HelmError, match="matches a hypothalamus label by name"):
        load_label_table(nothing)


# ----------------------------------------------------------------------------------------------------------
# manual segmentations
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_label_counts_matches_numpy(chunks):
    a = manual(1, extra=[(7, 5), (3, 2)])
    vals, cnts = np.unique(a, return_counts=True)
    assert label_counts(vol_of(a, chunks)) == dict(zip(vals.tolist(), cnts.tolist()))


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_valid_labels_pass_through(chunks):
    a = manual(2)
    out = validate_manual_labels(vol_of(a, chunks))
    assert out.dtype == np.uint16 and out.attrs["kind"] == "labels"
    assert out.data.chunks == vol_of(a, chunks).data.chunks
    np.testing.assert_array_equal(out.values, a)


def test_unknown_codes_are_listed():
    a = manual(3, extra=[(17, 4), (3, 1)])
    with pytest.raises(HelmError) as e:
        validate_manual_labels(vol_of(a, (5, 4, 3)), path="hyp.nii.gz")
    msg = str(e.value)
    assert msg.startswith("hyp.nii.gz: ")
    assert "3 (1 voxel)" in msg and "17 (4 voxels)" in msg
    assert "map them with --label-map CODE=CODE or remove them" in msg
    assert e.value.exit_code == 2


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_explicit_mapping(chunks):
    a = manual(4, extra=[(17, 4), (3, 6), (70000, 2)])
    mapping = parse_label_map(["17=802", "3=0,70000=250"])
    out = validate_manual_labels(vol_of(a, chunks), mapping=mapping)
    want = a.copy()
    want[a == 17], want[a == 3], want[a == 70000] = 802, 0, 250
    np.testing.assert_array_equal(out.values, want)
    assert out.dtype == np.uint16
    assert out.attrs["provenance"][-1]["params"]["mapping"] == {"17": 802, "3": 0, "70000": 250}
    # string keys (as from a JSON run record) work as well
    np.testing.assert_array_equal(
        validate_manual_labels(vol_of(a, chunks), mapping={"17": 802, "3": 0, "70000": 250}).values, want
    )


def test_mapping_to_an_unknown_code_is_refused():
    with pytest.raises(HelmError, match="not manual label codes"):
        validate_manual_labels(vol_of(manual(5)), mapping={801: 999})


def test_no_hypothalamus_label():
    only_fornix = np.zeros((6, 6, 6), np.uint16)
    only_fornix[2:4, 2:4, 2:4] = FORNIX
    with pytest.raises(HelmError, match="no hypothalamus label") as e:
        validate_manual_labels(vol_of(only_fornix, (3, 3, 3)), path="hyp.nii.gz")
    assert "250" in str(e.value) and "--label-map" in str(e.value)
    with pytest.raises(HelmError, match="no hypothalamus label"):
        validate_manual_labels(vol_of(np.zeros((4, 4, 4), np.uint8), (2, 2, 2)))
    # everything mapped away is no hypothalamus either
    with pytest.raises(HelmError, match="no hypothalamus label"):
        validate_manual_labels(vol_of(manual(6)), mapping={c: 0 for c in range(801, 806)})


def test_float_and_negative_values():
    a = manual(7).astype(np.float32)
    np.testing.assert_array_equal(validate_manual_labels(vol_of(a, (4, 4, 4))).values, a.astype(np.uint16))
    a[0, 0, 0] = 801.5
    a[1, 0, 0] = -2
    with pytest.raises(HelmError) as e:
        validate_manual_labels(vol_of(a, (4, 4, 4)))
    assert "801.5 (1 voxel)" in str(e.value) and "-2 (1 voxel)" in str(e.value)


def test_parse_label_map_errors():
    assert parse_label_map(None) == {} and parse_label_map("5=801") == {5: 801}
    with pytest.raises(HelmError, match="CODE=CODE"):
        parse_label_map(["5:801"])
    with pytest.raises(HelmError, match="integer"):
        parse_label_map(["5=80.5"])
    with pytest.raises(HelmError, match="integer"):
        parse_label_map(["x=801"])
