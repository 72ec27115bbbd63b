"""Tests of the template phantom (MNI ICBM152 2009a from the nilearn wheel): provenance, chunk independence,
the truth mask's rule, every option (fluid, bag gap, header rotation), bubbles, bias, hypothalamus, mirror
image, the ``anatomy`` dispatch, ``write_phantom`` and the command line."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata

import dask
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from helm_dask import phantom_mni as M
from helm_dask.cli import main
from helm_dask.errors import HelmError
from helm_dask.io import open_volume
from helm_dask.phantom import (
    FORNIX_LABEL,
    HYPOTHALAMUS_CODES,
    NOISE_SIGMA,
    TISSUE_CSF,
    TISSUE_GM,
    TISSUE_HYPOTHALAMUS,
    TISSUE_WM,
    phantom,
)
from helm_dask.phantom_io import PHANTOM_FILES, write_phantom
from helm_dask.phantom_mni import phantom_mni, phantom_mni_geometry, template_files
from helm_dask.volume import affine_of

NAMES = ("scan", "hypothalamus", "truth_mask", "truth_tissue", "truth_bias")


def _values(vols: dict) -> dict:
    names = list(vols)
    return dict(zip(names, dask.compute(*[vols[n].data for n in names])))


@pytest.fixture(scope="module")
def mm1():
    """The default template phantom (left, bright fluid, 5 mm gap) at 1 mm, all five outputs."""
    vols = phantom_mni(1.0, chunks=(101, 98, 87))
    return vols, _values(vols)


def _bag(s: float, gap: float = 5.0, side: str = "L"):
    """The phantom's own compartments on the whole grid: inside the bag, the bag wall, air bubbles."""
    shape = phantom_mni_geometry(s, side, bag_gap_mm=gap)["shape"]
    m = M._block_model(s, side, 0, float(gap), [(0, n) for n in shape], fractions=False)
    return m["bag_in"], m["wall"], m["bubble"]


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


# ------------------------------------------------------------------------------------------------------------
# the template, found through the installed distribution


def test_template_files_from_the_installed_wheel():
    dist = metadata.distribution("nilearn")
    root = os.path.realpath(str(dist.locate_file("")))
    files = template_files()
    assert set(files) == {"t1", "gm", "wm"}
    vols = phantom_mni(3.0)
    for key, f in files.items():
        assert f["file"] == M.TEMPLATE_FILES[key]
        assert os.path.realpath(f["path"]).startswith(root) and os.path.isfile(f["path"])
        with open(f["path"], "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        assert f["sha256"] == sha
        for name in NAMES:
            assert vols[name].attrs["phantom"]["template"][key] == {"file": f["file"], "sha256": sha}
            assert vols[name].attrs["provenance"][0]["params"]["template"][key]["sha256"] == sha
    assert vols["scan"].attrs["phantom"]["anatomy"] == "mni152"


def test_missing_nilearn_is_a_helm_error(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M.metadata, "distribution", missing)
    with pytest.raises(HelmError, match="nilearn"):
        M.template_files.__wrapped__()  # the uncached function: the cache keeps the real files


# ------------------------------------------------------------------------------------------------------------
# chunk independence


@pytest.fixture(scope="module")
def one_chunk3():
    return _values(phantom_mni(3.0, fluid="dark", chunks=(1000, 1000, 1000)))


@pytest.mark.parametrize("kind", ["irregular", "slabs"])
def test_same_voxels_for_any_chunking(one_chunk3, kind):
    ref = one_chunk3
    n0, n1, n2 = phantom_mni_geometry(3.0)["shape"]
    if kind == "irregular":
        chunks = ((7, 30, n0 - 37), (17, n1 - 17), (5, 40, n2 - 45))  # odd sizes
    else:
        # thin planes, like the NIfTI writer's (a block may hold the fornix without the hypothalamus)
        chunks = ((n0,), (n1,), (4,) * (n2 // 4) + ((n2 % 4,) if n2 % 4 else ()))
    vols = phantom_mni(3.0, fluid="dark", chunks=chunks)
    assert vols["scan"].data.chunks == chunks
    got = _values(vols)
    for name in NAMES:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert np.isfinite(ref["scan"]).all() and ref["scan"].min() >= 0


def test_four_echoes_decay_and_first_echo_is_the_one_echo_scan():
    one = phantom_mni(3.0, chunks=40)["scan"].values
    four = phantom_mni(3.0, echoes=4, chunks=(40, 20, 60))["scan"]
    assert four.dims == ("x", "y", "z", "echo") and four.shape == one.shape + (4,)
    v = four.values
    np.testing.assert_array_equal(v[..., 0], one)
    tissue = phantom_mni(3.0)["truth_tissue"].values
    for cls in (TISSUE_GM, TISSUE_WM):
        m = [v[..., e][tissue == cls].mean() for e in range(4)]
        assert all(a > b for a, b in zip(m, m[1:])), m


# ------------------------------------------------------------------------------------------------------------
# the truth mask is the fixed rule


def test_truth_mask_is_the_template_brain_left_of_the_cut(mm1):
    vols, v = mm1
    mask = v["truth_mask"].astype(bool)
    g = phantom_mni_geometry(1.0)
    assert mask.shape == g["shape"]
    np.testing.assert_array_equal(affine_of(vols["truth_mask"]), g["affine"])
    # independent computation: the template's non-zero T1 voxels, holes filled, sampled (linear) at the voxel
    # centres of the true grid; template mm = true world - the world shift (left hemisphere)
    t1 = nib.load(template_files()["t1"]["path"])
    brain = ndi.binary_fill_holes(np.asarray(t1.dataobj) > 0).astype(np.float32)
    ijk = np.indices(g["shape"], dtype=np.float64).reshape(3, -1)
    a = g["true_affine"]
    tmpl = a[:3, :3] @ ijk + a[:3, 3:] - np.asarray(M._WORLD_SHIFT_MM)[:, None]
    inv = np.linalg.inv(np.asarray(t1.affine, dtype=np.float64))
    vox = inv[:3, :3] @ tmpl + inv[:3, 3:]
    f = ndi.map_coordinates(brain, vox, order=1, mode="constant", cval=0.0)
    ref = ((f >= 0.5) & (tmpl[0] < M._cut_x(tmpl[1], tmpl[2]))).reshape(g["shape"])
    dice = 2 * (ref & mask).sum() / (ref.sum() + mask.sum())
    assert dice > 0.999, dice
    # half the template's brain mask (1.89 l, cerebellum, brainstem and sulcal CSF included): one connected
    # piece, no holes (sulci and ventricles are inside it)
    assert 850e3 < mask.sum() < 1050e3
    assert ndi.label(mask)[1] == 1
    assert np.array_equal(ndi.binary_fill_holes(mask), mask)
    assert np.array_equal(mask, v["truth_tissue"] > 0)


# ------------------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("fluid", ["bright", "dark", "none"])
def test_fluid_outside_and_in_the_sulci(fluid):
    s = 2.0
    v = _values(phantom_mni(s, fluid=fluid, chunks=64))
    scan, tissue, mask, bias = v["scan"], v["truth_tissue"], v["truth_mask"].astype(bool), v["truth_bias"]
    bag_in, _, bubble = _bag(s)
    flat = scan / bias
    far_wall = ndi.distance_transform_edt(bag_in, sampling=s) > 3.0
    far_brain = ndi.distance_transform_edt(~mask, sampling=s) > 3.0
    fluid_vox = bag_in & ~bubble & ~mask & far_wall & far_brain
    assert fluid_vox.sum() > 10000
    gm, wm = np.median(flat[tissue == TISSUE_GM]), np.median(flat[tissue == TISSUE_WM])
    out, csf = np.median(flat[fluid_vox]), np.median(flat[tissue == TISSUE_CSF])
    assert (tissue == TISSUE_CSF).sum() > 2000  # sulci and ventricles
    assert gm > wm + 8  # ex vivo contrast: grey brighter than white
    if fluid == "bright":
        assert out > gm + 10 and csf > gm + 5, (out, csf, gm)
    elif fluid == "dark":
        assert 4 * NOISE_SIGMA < out < wm - 10 and csf < wm - 5, (out, csf, wm)
    else:
        # no signal: the Rician noise floor (median sigma sqrt(2 ln 2) = 2.35), like the air around the bag
        assert np.median(scan[fluid_vox]) < 1.5 * NOISE_SIGMA and csf < wm - 10, (out, csf, wm)
        air = ~bag_in & ~M._block_model(s, "L", 0, 5.0, [(0, n) for n in mask.shape], fractions=False)["wall"]
        assert abs(np.median(scan[fluid_vox]) - np.median(scan[air])) < 0.5
    assert v["truth_mask"].sum() == phantom_mni(s)["truth_mask"].values.sum()  # same anatomy


def test_bag_gap(mm1):
    s = 1.0
    # 5 mm (default): no brain voxel within 4.5 mm of the wall (voxel centres; at least 5 mm by construction)
    bag_in, wall, _ = _bag(s, 5.0)
    mask = mm1[1]["truth_mask"].astype(bool)
    dist = ndi.distance_transform_edt(bag_in, sampling=s)
    assert dist[mask].min() >= 4.5, dist[mask].min()
    # 0 mm: the bag touches the brain -- some brain voxel has a wall or air neighbour
    mask0 = phantom_mni(s, bag_gap_mm=0, chunks=128)["truth_mask"].values.astype(bool)
    bag0, _, _ = _bag(s, 0.0)
    assert (ndi.binary_dilation(mask0) & ~bag0).any()
    assert ndi.distance_transform_edt(bag0, sampling=s)[mask0].min() <= 1.5
    # the bag shrinks around the same anatomy: fewer voxels, same brain volume (to partial voxels)
    assert mask0.size < mask.size and abs(int(mask0.sum()) - int(mask.sum())) < 0.01 * mask.sum()


def test_bubbles_touch_the_tissue_and_hold_air(mm1):
    v = mm1[1]
    mask = v["truth_mask"].astype(bool)
    bag_in, _, bubble = _bag(1.0)
    assert not (bubble & mask).any() and not (bubble & ~bag_in).any()
    lab, n = ndi.label(bubble)
    assert n >= 3
    for i in range(1, n + 1):
        assert (ndi.binary_dilation(lab == i) & mask).any(), f"bubble {i} floats in the fluid"
    # air: the noise floor, far below the bright fluid around it
    assert np.median(v["scan"][bubble]) < 2.0 * NOISE_SIGMA
    assert np.median(v["scan"][bag_in & ~bubble & ~mask]) > 50


def test_bias_is_a_smooth_7t_like_field(mm1):
    v = mm1[1]
    bias, mask = v["truth_bias"], v["truth_mask"].astype(bool)
    b = bias[mask]
    assert 0.55 < b.min() < 0.7 and 1.3 < b.max() < 1.5, (b.min(), b.max())
    assert (bias > 0).all()
    for ax in range(3):
        assert np.abs(np.diff(bias, axis=ax)).max() < 0.03  # per mm
    # the scan carries it: the grey matter's intensity follows the field
    gm = v["truth_tissue"] == TISSUE_GM
    lo, hi = bias[gm] < np.percentile(bias[gm], 20), bias[gm] > np.percentile(bias[gm], 80)
    ratio = v["scan"][gm][hi].mean() / v["scan"][gm][lo].mean()
    assert 1.3 < ratio < 2.2


@pytest.fixture(scope="module")
def unrotated3():
    vols = phantom_mni(3.0, chunks=64)
    return vols, _values(vols)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_header_rotation(unrotated3, axis):
    g0 = phantom_mni_geometry(3.0)
    g = phantom_mni_geometry(3.0, header_rotation_deg=90, header_rotation_axis=axis)
    np.testing.assert_array_equal(g["true_affine"], g0["true_affine"])
    h = g["affine"] @ np.linalg.inv(g["true_affine"])
    np.testing.assert_allclose(h[:3, :3], _rot(axis, 90.0), atol=1e-12)
    np.testing.assert_allclose(h[3], [0, 0, 0, 1], atol=1e-12)
    # about the centre of the field of view
    centre = g["true_affine"] @ np.append((np.asarray(g["shape"]) - 1) / 2.0, 1.0)
    np.testing.assert_allclose(h @ centre, centre, atol=1e-9)
    # the truths in the stored world follow the header
    np.testing.assert_allclose(g["medial_plane"]["normal"], _rot(axis, 90.0) @ g0["medial_plane"]["normal"], atol=1e-12)
    vols = phantom_mni(3.0, header_rotation_deg=90, header_rotation_axis=axis, chunks=64)
    assert vols["scan"].attrs["phantom"]["header_rotation_deg"] == 90.0
    assert vols["scan"].attrs["phantom"]["header_rotation_axis"] == axis
    got = _values(vols)
    for name in NAMES:
        np.testing.assert_allclose(affine_of(vols[name]), g["affine"], atol=1e-9)
        np.testing.assert_array_equal(got[name], unrotated3[1][name], err_msg=name)


# ------------------------------------------------------------------------------------------------------------
# hypothalamus, mirror image


def test_hypothalamus_labels(mm1):
    vols, v = mm1
    hyp, mask, tissue = v["hypothalamus"], v["truth_mask"].astype(bool), v["truth_tissue"]
    codes = HYPOTHALAMUS_CODES["L"]
    assert codes == (801, 802, 803, 804, 805)
    assert set(np.unique(hyp).tolist()) == {0, FORNIX_LABEL, *codes}
    assert (mask[hyp > 0]).all()
    assert np.array_equal(np.isin(hyp, codes), tissue == TISSUE_HYPOTHALAMUS)
    volume = np.isin(hyp, codes).sum() * 1.0**3
    assert 400 <= volume <= 1200, volume
    for c in codes:
        assert (hyp == c).sum() >= 20, c
    # medial: within 12 mm of the medial plane, on the hemisphere's side of it
    g = phantom_mni_geometry(1.0)
    ijk = np.argwhere(hyp > 0).T.astype(np.float64)
    a = affine_of(vols["hypothalamus"])
    world = a[:3, :3] @ ijk + a[:3, 3:]
    d = g["medial_plane"]["normal"] @ (world - g["medial_plane"]["point_mm"][:, None])
    assert d.max() < 0.0 and d.min() > -12.0, (d.min(), d.max())
    cen = world[:, np.isin(hyp[hyp > 0], codes)].mean(axis=1)
    assert np.linalg.norm(cen - g["hypothalamus_centroid_mm"]) < 3.0


def test_right_is_the_mirror_image_of_left():
    left = phantom_mni(2.0, side="L", chunks=48)
    right = phantom_mni(2.0, side="R", chunks=48)
    lv = _values({k: left[k] for k in ("truth_mask", "hypothalamus", "truth_tissue")})
    rv = _values({k: right[k] for k in ("truth_mask", "hypothalamus", "truth_tissue")})
    np.testing.assert_array_equal(rv["truth_mask"], lv["truth_mask"][:, ::-1, :])
    np.testing.assert_array_equal(rv["truth_tissue"], lv["truth_tissue"][:, ::-1, :])
    lut = np.zeros(1024, np.uint16)
    lut[FORNIX_LABEL] = FORNIX_LABEL
    lut[list(HYPOTHALAMUS_CODES["L"])] = HYPOTHALAMUS_CODES["R"]
    np.testing.assert_array_equal(rv["hypothalamus"], lut[lv["hypothalamus"][:, ::-1, :]])
    assert set(np.unique(rv["hypothalamus"]).tolist()) == {0, FORNIX_LABEL, 806, 807, 808, 809, 810}
    # world: voxel (i, j, k) of R is voxel (i, n1 - 1 - j, k) of L mirrored (x -> -x)
    gl, gr = phantom_mni_geometry(2.0, "L"), phantom_mni_geometry(2.0, "R")
    n1 = gl["shape"][1]
    ijk = np.array([[3, 5, 7, 1], [40, 0, 20, 1]], dtype=float).T
    mirrored = ijk.copy()
    mirrored[1] = n1 - 1 - ijk[1]
    np.testing.assert_allclose(gr["affine"] @ ijk, np.diag([-1.0, 1, 1, 1]) @ gl["affine"] @ mirrored, atol=1e-9)
    assert gr["medial_plane"]["normal"][0] < -0.99 and gl["medial_plane"]["normal"][0] > 0.99
    assert gr["orientation"] == gl["orientation"]


# ------------------------------------------------------------------------------------------------------------
# argument checks, the anatomy dispatch, write_phantom, the command line


@pytest.mark.parametrize(
    "kw",
    [
        {"fluid": "grey"},
        {"bag_gap_mm": -1},
        {"bag_gap_mm": "wide"},
        {"header_rotation_axis": "w"},
        {"header_rotation_deg": float("nan")},
        {"echoes": 5},
        {"seed": -1},
        {"side": "both"},
    ],
)
def test_bad_arguments_are_helm_errors(kw):
    with pytest.raises(HelmError):
        phantom_mni(3.0, **kw)


def test_anatomy_dispatch():
    a = phantom(3.0, anatomy="mni152", fluid="dark", bag_gap_mm=2, header_rotation_deg=10)
    b = phantom_mni(3.0, fluid="dark", bag_gap_mm=2, header_rotation_deg=10)
    assert a["scan"].data.name == b["scan"].data.name  # the same graph
    np.testing.assert_array_equal(affine_of(a["scan"]), affine_of(b["scan"]))
    assert a["scan"].attrs["phantom"]["bag_gap_mm"] == 2.0
    # None means the default
    assert phantom(3.0, anatomy="mni152", fluid=None)["scan"].data.name == phantom_mni(3.0)["scan"].data.name
    # the geometric phantom is unchanged and refuses the template's options
    assert phantom(3.0)["scan"].data.name == phantom(3.0, anatomy="geometric")["scan"].data.name
    with pytest.raises(HelmError, match="anatomy='mni152'"):
        phantom(3.0, fluid="dark")
    with pytest.raises(HelmError, match="anatomy"):
        phantom(3.0, anatomy="colin27")
    with pytest.raises(TypeError):
        phantom(3.0, anatomy="mni152", flud="dark")


def test_write_phantom_store_records_anatomy_and_options(tmp_path):
    out = tmp_path / "t.zarr"
    paths = write_phantom(
        out,
        spacing_mm=4.0,
        anatomy="mni152",
        fluid="none",
        bag_gap_mm=0,
        header_rotation_deg=15,
        header_rotation_axis="x",
    )
    assert list(paths) == list(PHANTOM_FILES)
    attrs = zarr.open_group(str(out), mode="r").attrs["helm_dask_collection"]
    assert attrs["anatomy"] == "mni152" and attrs["fluid"] == "none" and attrs["bag_gap_mm"] == 0.0
    assert attrs["header_rotation_deg"] == 15.0 and attrs["header_rotation_axis"] == "x"
    assert attrs["template"]["t1"]["sha256"] == template_files()["t1"]["sha256"]
    ref = phantom_mni(4.0, fluid="none", bag_gap_mm=0, header_rotation_deg=15, header_rotation_axis="x")
    for name in PHANTOM_FILES:
        vol = open_volume(out / name)
        np.testing.assert_array_equal(vol.values, ref[name].values, err_msg=name)
        np.testing.assert_allclose(affine_of(vol), affine_of(ref[name]), atol=1e-9)
    # geometric: recorded as such, without the template's options; with them, an error and nothing written
    write_phantom(tmp_path / "g.zarr", spacing_mm=8.0)
    attrs = zarr.open_group(str(tmp_path / "g.zarr"), mode="r").attrs["helm_dask_collection"]
    assert attrs["anatomy"] == "geometric" and "fluid" not in attrs
    with pytest.raises(HelmError, match="mni152"):
        write_phantom(tmp_path / "bad.zarr", spacing_mm=8.0, bag_gap_mm=3)
    assert not (tmp_path / "bad.zarr").exists()


def test_cli_mni152_nifti(tmp_path, capsys):
    out = tmp_path / "ph"
    code = main(
        [
            "phantom",
            str(out),
            "--anatomy",
            "mni152",
            "--spacing",
            "3",
            "--fluid",
            "dark",
            "--scheduler",
            "threads",
            "--quiet",
        ]
    )
    assert code == 0
    for name in PHANTOM_FILES:
        assert (out / f"{name}.nii.gz").exists(), name
    g = phantom_mni_geometry(3.0)
    img = nib.load(out / "scan.nii.gz")
    assert img.shape == g["shape"]
    np.testing.assert_allclose(img.affine, g["affine"], atol=1e-4)
    ref = phantom_mni(3.0, fluid="dark")
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(out / "hypothalamus.nii.gz").dataobj), ref["hypothalamus"].values
    )
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), ref["scan"].values)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--fluid", "dark"], ["--fluid applies to --anatomy mni152"]),
        (
            ["--anatomy", "geometric", "--bag-gap-mm", "2", "--header-rotation-axis", "x"],
            ["--bag-gap-mm, --header-rotation-axis apply to --anatomy mni152"],
        ),
        (["--anatomy", "mni152", "--bag-gap-mm", "-2"], ["--bag-gap-mm must be between 0 and 50 mm"]),
    ],
)
def test_cli_bad_options_are_one_line_errors(tmp_path, capsys, args, words):
    out = tmp_path / "ph"
    code = main(["phantom", str(out), "--spacing", "8", "--scheduler", "threads", "--quiet", *args])
    assert code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("helm-dask: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
