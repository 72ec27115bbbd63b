"""OME-Zarr placement and label metadata: the scale + translation chosen for each level (exact for axis-aligned
grids, centre-exact for tilted ones, with the worst corner's error stated), ``image-label`` colours from the LUT,
validity for ome-zarr-models, and -- over every store of a pipeline run -- where ome-zarr-py's and
napari-ome-zarr's readers put each corner voxel (tests/ome_placement.py)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_placement import (  # tests/ helper module
    VOXEL_TOL,
    check_run,
    check_store,
    failures,
    napari_drops_translation,
    report,
    volume_stores,
)

from helm_dask.io import convert, open_volume, save_volume
from helm_dask.labels import label_colours
from helm_dask.volume import make_volume, ome_placement, placement_error_mm, spacing_of

ome_zarr_models = pytest.importorskip("ome_zarr_models")
pytest.importorskip("ome_zarr")
pytest.importorskip("napari_ome_zarr")


@pytest.fixture(scope="module")
def readers(tmp_path_factory) -> tuple:
    """The readers whose placement is checked: napari-ome-zarr only where it applies OME 0.5 translations."""
    drops = napari_drops_translation(tmp_path_factory.mktemp("napari_probe"))
    return ("ome-zarr-py",) + (() if drops else ("napari-ome-zarr",))


HELM = [sys.executable, "-m", "helm_dask.cli"]


def _rotation(axis, deg) -> np.ndarray:
    """Rodrigues: rotation by ``deg`` about the unit vector ``axis`` (independent of helm_dask)."""
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _affine(lin, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = lin, origin
    return a


def _validate(path) -> object:
    """ome-zarr-models' own check of an OME-Zarr 0.5 group (raises on an invalid one)."""
    return ome_zarr_models.open_ome_zarr(zarr.open_group(str(path), mode="r"))


# ---- the placement itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_centre_exact_and_worst_corner_against_brute_force_and_closed_form(seed):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(1, 40)
    rot = _rotation(rng.normal(size=3), theta)
    sp = rng.uniform(0.2, 1.5, 3)
    shape = tuple(int(n) for n in rng.integers(5, 40, 3))
    a = _affine(rot @ np.diag(sp), rng.normal(scale=50, size=3))
    scale, trans = ome_placement(a, shape)
    np.testing.assert_allclose(scale, sp, rtol=1e-12)
    # every voxel centre, placed both ways
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    err = np.linalg.norm(ijk * scale + trans - (ijk @ a[:3, :3].T + a[:3, 3]), axis=1)
    centre = (np.array(shape) - 1) / 2
    np.testing.assert_allclose(centre * scale + trans, a[:3, :3] @ centre + a[:3, 3], atol=1e-9)
    assert placement_error_mm(a, shape) == pytest.approx(err.max(), rel=1e-12)  # the worst voxel is a corner
    half_diagonal = np.linalg.norm(sp * (np.array(shape) - 1) / 2)
    assert err.max() <= 2 * np.sin(np.radians(theta) / 2) * half_diagonal * (1 + 1e-12)
    # the previous choice (voxel 0 exact) is never better: the centre-exact error at a corner is half the
    # difference of the voxel-0-exact errors at that corner and the opposite one
    corner0 = ijk * scale + a[:3, 3] - (ijk @ a[:3, :3].T + a[:3, 3])
    assert np.linalg.norm(corner0, axis=1).max() >= err.max() * (1 - 1e-12)


def test_closed_form_is_reached_when_the_rotation_axis_is_perpendicular_to_the_diagonal():
    # rotation about z of a flat (x, y) grid: every corner offset is perpendicular to the axis
    a = _affine(_rotation((0, 0, 1), 12.0) @ np.diag([0.5, 0.5, 0.5]), (3.0, -2.0, 7.0))
    shape = (201, 161, 1)
    half = np.linalg.norm(0.5 * (np.array(shape) - 1) / 2)
    assert placement_error_mm(a, shape) == pytest.approx(2 * np.sin(np.radians(6.0)) * half, rel=1e-12)


def test_axis_aligned_store_is_bit_exact(tmp_path, readers):
    a = np.diag([0.3, 0.7, 1.1, 1.0])
    a[:3, 3] = [-12.345678901234567, 0.1, 1e-7]
    out = save_volume(make_volume(da.zeros((150, 140, 130), dtype="f4", chunks=64), a), tmp_path / "v.zarr")
    attrs = zarr.open_group(out, mode="r").attrs.asdict()
    ds = attrs["ome"]["multiscales"][0]["datasets"]
    assert ds[0]["coordinateTransformations"][1]["translation"] == a[:3, 3].tolist()  # bit for bit
    assert ds[0]["coordinateTransformations"][0]["scale"] == [0.3, 0.7, 1.1]
    assert attrs["helm_dask"]["ome_placement"] == "exact" and attrs["helm_dask"]["ome_placement_error_mm"] == 0.0
    lvl1 = np.asarray(attrs["helm_dask"]["level_affines"][1])  # block means: centres half a fine voxel further
    assert ds[1]["coordinateTransformations"][1]["translation"] == lvl1[:3, 3].tolist()
    assert ds[1]["path"] == "pyramid/1"
    chk = check_store(out, readers)
    assert not chk.problems and max(w for _, w in chk.errors_mm.values()) < 1e-9 < VOXEL_TOL * 0.3


def test_tilted_store_states_its_error_and_viewers_get_the_centre_right(tmp_path, readers):
    a = _affine(_rotation((0.2, 0.1, 1.0), 12.0) @ np.diag([0.8, 0.8, 1.0]), (-40.0, 25.0, 10.0))
    shape = (140, 90, 60)
    vol = make_volume(da.ones(shape, dtype="u2", chunks=64), a, kind="labels")
    out = save_volume(vol, tmp_path / "tilted_labels.zarr", label_colours=label_colours(ks=(4,)))
    meta = zarr.open_group(out, mode="r").attrs["helm_dask"]
    assert meta["ome_placement"] == "approximate"
    assert meta["ome_placement_error_mm"] == pytest.approx(placement_error_mm(a, shape))
    assert meta["ome_affine"]["type"] == "affine" and np.allclose(meta["ome_affine"]["affine"], a[:3])
    chk = check_store(out, readers)
    assert not chk.problems, chk.problems
    for centre, worst in chk.errors_mm.values():
        assert centre < 1e-9 and worst == pytest.approx(meta["ome_placement_error_mm"], rel=1e-9)
    assert open_volume(out).attrs["placement"] == "approximate"


def test_permuted_and_flipped_store_records_a_large_error_without_failing(tmp_path):
    # an LPI file converted as it is: OME 0.5 cannot flip or permute, so only the centre is right
    lin = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]) * 0.9
    a = _affine(lin, (60.0, 80.0, 40.0))
    src = tmp_path / "lpi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 40, 20), np.int16), a), src)
    out = convert(src, tmp_path / "lpi.zarr")
    meta = zarr.open_group(out, mode="r").attrs["helm_dask"]
    assert meta["ome_placement"] == "approximate"
    # independent: the half-extent vectors (mm) of the flipped, permuted grid against their placed images
    half = (np.array([30, 40, 20]) - 1) / 2
    worst = max(
        np.linalg.norm((lin - np.diag(spacing_of(a))) @ (np.array(s) * half))
        for s in itertools.product((-1, 1), repeat=3)
    )
    assert meta["ome_placement_error_mm"] == pytest.approx(worst) and worst > 30
    _validate(out)
    assert not check_store(out, readers=("ome-zarr-py",)).problems


# ---- image-label --------------------------------------------------------------------------------------------------


def test_label_and_mask_stores_are_ome_image_labels_with_the_lut_colours(tmp_path):
    a = np.diag([0.5, 0.5, 0.5, 1.0])
    codes = np.array([0, 1, 2, 3, 4, 801, 806, 250], np.uint16)
    lab = make_volume(da.from_array(np.resize(codes, (16, 8, 8))), a, kind="labels", name="hemi_k6")
    colours = label_colours(ks=(4, 6))
    out = save_volume(lab, tmp_path / "label_map_k6.zarr", label_colours=colours)
    mask = save_volume(make_volume(da.ones((16, 8, 8), dtype="u1"), a, kind="mask"), tmp_path / "mask.zarr")
    img = save_volume(make_volume(da.ones((16, 8, 8), dtype="f4"), a, name="image_ws"), tmp_path / "preprocessed.zarr")
    for p, cls in ((out, "ImageLabel"), (mask, "ImageLabel"), (img, "Image")):
        assert type(_validate(p)).__name__ == cls
    ome = zarr.open_group(out, mode="r").attrs["ome"]
    assert ome["multiscales"][0]["name"] == "label_map_k6"  # the store's name, not the volume's
    assert zarr.open_group(img, mode="r").attrs["ome"]["multiscales"][0]["name"] == "preprocessed"
    il = ome["image-label"]
    assert il["version"] == "0.5"
    got = {c["label-value"]: c["rgba"] for c in il["colors"]}
    names = {p["label-value"]: p["name"] for p in il["properties"]}
    # the LUT (lut.txt): FreeSurfer's 801 colour, opaque; the k-means ramp for clusters; 0 transparent
    lut = {int(r[0]): r for r in (line.split() for line in _lut_text(tmp_path, (4, 6)) if not line.startswith("#"))}
    for c in (801, 806, 250, 1, 4, 6):
        assert got[c] == [int(v) for v in lut[c][2:5]] + [255 - int(lut[c][5])] and names[c] == lut[c][1]
    assert got[0] == [0, 0, 0, 0]
    mil = zarr.open_group(mask, mode="r").attrs["ome"]["image-label"]
    assert {p["label-value"]: p["name"] for p in mil["properties"]} == {0: "background", 1: "brain"}
    # both readers see label layers with these colours (wherever napari-ome-zarr places them)
    chk = check_store(out)
    assert not [p for p in chk.problems if "label layer" in p]
    assert chk.label_layers == {"ome-zarr-py": True, "napari-ome-zarr": True}
    from ome_placement import napari_view, ome_zarr_py_view

    assert ome_zarr_py_view(out)["colours"][801] == pytest.approx([250 / 255, 1.0, 50 / 255, 1.0])
    assert napari_view(out)["colormap"][806] == pytest.approx([250 / 255, 1.0, 50 / 255, 1.0])
    assert napari_view(mask)["type"] == "labels" and napari_view(img)["type"] == "image"


def _lut_text(tmp_path, ks) -> list[str]:
    from helm_dask.labels import write_lut

    return write_lut(tmp_path / "lut.txt", ks=ks).read_text().splitlines()


def test_label_table_that_renumbers_colours_the_codes_in_the_maps(tmp_path):
    table = tmp_path / "t.json"
    table.write_text('{"map": {"801": 11}, "entries": {"11": ["hyp-ai", [1, 2, 3, 0]]}}')
    c = label_colours(str(table), ks=(4,))
    assert c[801] == ("hyp-ai", (1, 2, 3, 255)) and 11 not in c


# ---- every store of a run -----------------------------------------------------------------------------------------


def _grids() -> list:
    """``--grid`` values to run with (None: the option does not exist, the run's own default)."""
    out = subprocess.run([*HELM, "run", "--help"], capture_output=True, text=True, check=True).stdout
    return ["ras", "scan"] if "--grid" in out else [None]


def _straighten(src: Path, dst: Path) -> Path:
    """A copy of a phantom folder whose headers keep the nearest signed axis permutation of the original
    directions (no tilt): an axis-aligned scan with the same voxels."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("scan.nii.gz", "hypothalamus.nii.gz"):
        img = nib.load(src / name)
        a = img.affine.copy()
        sp = spacing_of(a)
        cols = a[:3, :3] / sp
        lin = np.zeros((3, 3))
        for j in range(3):
            i = int(np.argmax(np.abs(cols[:, j])))
            lin[i, j] = np.sign(cols[i, j]) * sp[j]
        a[:3, :3] = lin
        out = nib.Nifti1Image(np.asanyarray(img.dataobj), a, img.header)
        out.set_sform(a, 1)
        out.set_qform(a, 1)
        nib.save(out, dst / name)
    return dst


def _phantom(base: Path, case: str) -> Path:
    common = ["--spacing", "1.0", "--quiet", "--workers", "1"]
    if case == "tilted":  # the 1 mm template phantom, its header rotated by 12 degrees
        cmd = [*HELM, "phantom", str(base / "tilted"), *common, "--anatomy", "mni152", "--header-rotation-deg", "12"]
        subprocess.run(cmd, check=True)
        return base / "tilted"
    subprocess.run([*HELM, "phantom", str(base / "geo"), *common], check=True)  # quick, slightly oblique
    return _straighten(base / "geo", base / "aligned")


def _closed_form_mm(affine, shape) -> float:
    """The README's bound: 2 sin(theta / 2) x the half-diagonal, theta the rotation angle of the affine."""
    a = np.asarray(affine)
    sp = spacing_of(a)
    rot = a[:3, :3] / sp
    theta = np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))
    return float(2 * np.sin(theta / 2) * np.linalg.norm(sp * (np.array(shape) - 1) / 2))


def _run_and_check(ph: Path, out: Path, grid, case: str) -> bool:
    """Run the pipeline, validate and check every store; True when napari's placement still has to be checked
    (the installed napari-ome-zarr drops translations)."""
    cmd = [*HELM, "run", str(ph / "scan.nii.gz"), "--hypothalamus", str(ph / "hypothalamus.nii.gz")]
    cmd += ["--side", "auto", "--out", str(out), "--spacing", "native", "--k", "4", "--no-qc", "--no-nifti"]
    cmd += ["--scheduler", "threads", "--quiet"] + ([] if grid is None else ["--grid", grid])
    subprocess.run(cmd, check=True)
    stores = volume_stores(out)
    assert {"scan_raw", "labels_raw", "mask_ras", "mask", "preprocessed", "hemi_k4", "label_map_k4"} <= {
        s.name for s in stores
    }
    for s in stores:
        _validate(s)
    drops = napari_drops_translation(out.parent)
    results = check_run(out, readers=("ome-zarr-py",) + (() if drops else ("napari-ome-zarr",)))
    print(f"{case}, --grid {grid}:\n{report(results)}")
    assert not failures(results), "\n".join(failures(results)) + "\n" + report(results)
    working = [r for r in results if r.store.name in ("preprocessed", "mask", "hemi_k4")]
    if case == "aligned" or grid == "ras":
        assert all(r.placement == "exact" for r in working)
    else:  # the scan's own tilted grid: an error is stated, and the README's closed form bounds it
        assert all(r.placement == "approximate" and r.stated_error_mm > 1 for r in working)
    for r in results:
        meta = zarr.open_group(str(r.store), mode="r").attrs["helm_dask"]
        shape = zarr.open_array(str(r.store), path="0", mode="r").shape
        assert r.stated_error_mm <= _closed_form_mm(meta["affine"], shape) + 1e-9
        if r.kind in ("labels", "mask"):
            assert r.label_layers["ome-zarr-py"], r.store.name
    assert all(r.placement == "exact" for r in results if r.store.name.startswith("label_map"))
    if drops:  # napari still opens every label store as a coloured labels layer
        nap = check_run(out, readers=("napari-ome-zarr",))
        assert all(all(r.label_layers.values()) for r in nap if r.kind in ("labels", "mask"))
    return drops


_NAPARI_XFAIL = (
    "napari-ome-zarr 0.9.0-0.10.0 ignore OME 0.5 translations (they read only the scale of dataset 0); "
    "ome-zarr-py places every store as stated (and napari-ome-zarr 0.8.2 does too)"
)


@pytest.mark.slow
@pytest.mark.e2e
def test_every_store_of_a_tilted_run_is_where_the_readers_put_it(tmp_path):
    """The 12-degree template phantom, with each --grid (one phantom for both: the runs dominate the time)."""
    ph = _phantom(tmp_path, "tilted")
    drops = [_run_and_check(ph, tmp_path / f"out_{grid}", grid, "tilted") for grid in _grids()]
    if any(drops):
        pytest.xfail(_NAPARI_XFAIL)


@pytest.mark.slow
@pytest.mark.e2e
def test_every_store_of_an_axis_aligned_run_is_where_the_readers_put_it(tmp_path):
    """An axis-aligned scan (both grids are the same grid then): every store exact."""
    ph = _phantom(tmp_path, "aligned")
    if _run_and_check(ph, tmp_path / "out", _grids()[-1], "aligned"):
        pytest.xfail(_NAPARI_XFAIL)
