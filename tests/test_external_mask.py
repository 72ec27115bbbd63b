"""``run --mask``: a brain mask of the user's (NIfTI or FreeSurfer MGZ) replaces the bag removal, checked, resumable."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from helm_dask.cli import main
from helm_dask.errors import HelmError
from helm_dask.io import open_volume
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams, run_subject

SPACING_IN = 3.0  # mm: the mask path does not depend on the resolution; small keeps it quick
SPACING_WORK = 3.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    write_phantom(root / "L", spacing_mm=SPACING_IN, side="L", seed=2)
    return root / "L"


def _params(ph, out, mask, **kw):
    base = dict(
        scan=str(ph / "scan.nii.gz"),
        hypothalamus=str(ph / "hypothalamus.nii.gz"),
        out=str(out),
        side="L",
        spacing=SPACING_WORK,
        ks=(4,),
        until="preprocess",
        qc=False,
        mask=str(mask),
    )
    base.update(kw)
    return RunParams(**base)


def _truth(ph):
    img = nib.load(ph / "truth_mask.nii.gz")
    return np.asanyarray(img.dataobj), img.affine


def _save(data, aff, path):
    """A mask file in the format its name says (FreeSurfer .mgz or NIfTI)."""
    image = nib.MGHImage if str(path).endswith(".mgz") else nib.Nifti1Image
    nib.save(image(data, aff), path)


def _status(info):
    return {k: v["status"] for k, v in info["stages"].items()}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nii.gz", "mgz"])
def test_external_mask_is_stored_recorded_and_resumes(phantom, tmp_path, fmt):
    data, aff = _truth(phantom)
    mask_file = tmp_path / f"mask.{fmt}"
    # non-zero = brain: a label image (like SAMSEG's) with several codes
    labelled = np.where(data > 0, np.where(np.arange(data.shape[2]) % 2 == 0, 3, 41), 0).astype(np.int32)
    _save(labelled, aff, mask_file)
    info = run_subject(_params(phantom, tmp_path / "o", mask_file), quiet=True)
    assert _status(info) == {"import": "computed", "background": "computed", "resample": "computed", "bias": "computed"}
    assert info["stages"]["background"]["params"]["method"] == "external"
    bg = info["background"]
    assert bg["method"] == "external" and bg["path"] == str(mask_file)
    sha = info["inputs"][str(mask_file)]
    assert bg["sha256"] == sha == info["stages"]["background"]["params"]["mask_sha256"]
    assert bg["voxels"] == int((data > 0).sum())
    # the stored mask is the file, binarised and reoriented exactly like the scan
    ras = nib.as_closest_canonical(nib.load(phantom / "truth_mask.nii.gz"))
    stored = open_volume(tmp_path / "o" / "scan" / "helm.zarr" / "mask_ras")
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored.values, (np.asanyarray(ras.dataobj) > 0).astype(np.uint8))
    np.testing.assert_allclose(stored.attrs["affine"], ras.affine, atol=1e-4)
    run_json = json.loads((tmp_path / "o" / "scan" / "run.json").read_text())
    assert run_json["background"]["sha256"] == sha and run_json["params"]["mask"] == str(mask_file)

    again = run_subject(_params(phantom, tmp_path / "o", mask_file), quiet=True)
    assert set(_status(again).values()) == {"skipped"}
    assert again["background"]["sha256"] == sha and again["background"]["method"] == "external"

    # another mask file: the mask and everything after it are recomputed, the import is not
    smaller = np.where(np.arange(data.shape[0])[:, None, None] < data.shape[0] // 2, 0, labelled).astype(np.int32)
    _save(smaller, aff, mask_file)
    changed = run_subject(_params(phantom, tmp_path / "o", mask_file), quiet=True)
    assert _status(changed) == {
        "import": "skipped",
        "background": "computed",
        "resample": "computed",
        "bias": "computed",
    }
    assert changed["background"]["sha256"] != sha and changed["background"]["voxels"] == int((smaller > 0).sum())


def test_mask_on_another_grid_is_refused(phantom, tmp_path):
    data, aff = _truth(phantom)
    moved = aff.copy()
    moved[:3, 3] += aff[:3, 0]
    bad = tmp_path / "shifted_mask.nii.gz"
    nib.save(nib.Nifti1Image(data[1:], moved), bad)
    with pytest.raises(HelmError, match="different voxel grids") as ei:
        run_subject(_params(phantom, tmp_path / "o", bad), quiet=True)
    msg = str(ei.value)
    assert str(bad) in msg and "brain mask" in msg and "shape" in msg and "--resample-labels" not in msg


def test_empty_and_nonfinite_masks_are_refused(phantom, tmp_path):
    data, aff = _truth(phantom)
    empty = tmp_path / "empty.mgz"
    nib.save(nib.MGHImage(np.zeros(data.shape, np.uint8), aff), empty)
    with pytest.raises(HelmError, match="empty") as ei:
        run_subject(_params(phantom, tmp_path / "o", empty), quiet=True)
    assert str(empty) in str(ei.value)
    nan = tmp_path / "nan.nii.gz"
    f = data.astype(np.float32)
    f[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(f, aff), nan)
    with pytest.raises(HelmError, match="1 NaN") as ei:
        run_subject(_params(phantom, tmp_path / "o", nan), quiet=True)
    assert str(nan) in str(ei.value) and "--nonfinite" not in str(ei.value)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["empty", "missing", "not_a_volume"])
def test_cli_bad_mask_is_one_line_exit_2(phantom, tmp_path, capsys, case):
    data, aff = _truth(phantom)
    mask = tmp_path / "m.nii.gz"
    if case == "empty":
        nib.save(nib.Nifti1Image(np.zeros(data.shape, np.uint8), aff), mask)
    elif case == "not_a_volume":
        mask = tmp_path / "m.txt"
        mask.write_text("brain")
    code = main(
        [
            "run",
            str(phantom / "scan.nii.gz"),
            "--hypothalamus",
            str(phantom / "hypothalamus.nii.gz"),
            "--mask",
            str(mask),
            "--out",
            str(tmp_path / "o"),
            "--spacing",
            str(SPACING_WORK),
            "--k",
            "4",
            "--until",
            "preprocess",
            "--no-qc",
            "--scheduler",
            "threads",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("helm-dask: error: ") and str(mask) in lines[0], err


def test_manifest_mask_key_relative_to_the_manifest(phantom, tmp_path):
    from helm_dask.batch import load_manifest, subject_params

    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "params: {fluid: none}\nsubjects:\n"
        f"  - {{scan: {phantom / 'scan.nii.gz'}, hypothalamus: {phantom / 'hypothalamus.nii.gz'},"
        " mask: masks/s1.mgz}\n"
    )
    shared, subjects = load_manifest(manifest)
    p = subject_params(RunParams(scan="", hypothalamus="", out=str(tmp_path)), shared, subjects[0])
    assert p.mask == str(tmp_path / "masks" / "s1.mgz") and p.fluid == "none"


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32])
def test_mgz_import_is_streamed_and_exact(tmp_path, dtype):
    """An .mgz/.mgh goes through the NIfTI slab reader (thin slabs here): same values, vox2ras, file checksum."""
    import hashlib

    from helm_dask.io.convert import nifti_to_zarr

    data = (np.random.default_rng(0).random((7, 9, 11)) * 100).astype(dtype)
    aff = np.array([[0, 0, 0.3, 1], [-0.3, 0, 0, 2], [0, -0.3, 0, 3], [0, 0, 0, 1.0]])
    for ext in ("mgz", "mgh"):
        f = tmp_path / f"a.{ext}"
        nib.save(nib.MGHImage(data, aff), f)
        out = nifti_to_zarr(f, tmp_path / f"a_{ext}.zarr", chunks=4, layer_mb=1e-4)
        vol = open_volume(out["path"])
        assert vol.dtype == dtype
        np.testing.assert_array_equal(vol.values, data)
        np.testing.assert_allclose(vol.attrs["affine"], nib.load(f).affine, atol=1e-6)
        assert out["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_not_an_mgh_file(tmp_path):
    from helm_dask.io.mgh import read_mgh_header

    bad = tmp_path / "x.mgz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), tmp_path / "x.nii.gz")
    bad.write_bytes((tmp_path / "x.nii.gz").read_bytes())
    with pytest.raises(HelmError, match="not a FreeSurfer MGH"):
        read_mgh_header(bad)
