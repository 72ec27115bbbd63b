"""``run --preprocessed``: a run started from a full run's own preprocessed image, mask and labels gives the same
k-means, merged and whole-brain maps; the mask defaults to the image's non-zero voxels; the run is resumable and
``--spacing`` other than native is refused before anything is read."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from helm_dask.cli import main
from helm_dask.errors import HelmError
from helm_dask.io import open_volume
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams, run_subject
from helm_dask.pipeline.params import check_params

KS = (4, 6)


def _data(path):
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The whole pipeline on the geometric phantom at 1 mm (native spacing, working grid RAS+)."""
    root = tmp_path_factory.mktemp("pre")
    write_phantom(root / "ph", spacing_mm=1.0, side="L", seed=2)
    p = RunParams(
        scan=str(root / "ph" / "scan.nii.gz"),
        hypothalamus=str(root / "ph" / "hypothalamus.nii.gz"),
        out=str(root / "full"),
        subject="s",
        spacing="native",
        ks=KS,
        qc=False,
    )
    run_subject(p, quiet=True)
    return root, root / "full" / "s"


def _given(full, out, **kw):
    return RunParams(
        scan=str(full / "preprocessed.nii.gz"),
        hypothalamus=str(full / "hypothalamus.nii.gz"),
        out=str(out),
        subject="s",
        spacing="native",
        ks=KS,
        qc=False,
        preprocessed=True,
        **kw,
    )


def _closing_ties(hyp: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Every voxel where two merged maps differ was added by the closing (no manual label there) and lies at the
    same distance from its two candidate labels: a tie of the closing's nearest-label rule."""
    for p in map(tuple, np.argwhere(a != b)):
        if hyp[p] != 0:
            return False
        da, db = (ndi.distance_transform_edt(hyp != c)[p] for c in (a[p], b[p]))
        if abs(da - db) > 1e-9:
            return False
    return True


@pytest.mark.e2e
@pytest.mark.slow
def test_preprocessed_run_gives_the_full_run_s_maps(full_run):
    """The same k-means maps; the merged and whole-brain maps differ only where the full run's exact float64 grid
    and the float32 affine of a NIfTI-1 header (what the preprocessed run reads) break a tie differently."""
    root, full = full_run
    p = _given(full, root / "given", mask=str(full / "mask.nii.gz"))
    info = run_subject(p, quiet=True)
    d = root / "given" / "s"
    for name in [f"kmeans_k{k}" for k in KS] + ["mask", "hypothalamus", "preprocessed"]:
        a, b = _data(full / f"{name}.nii.gz"), _data(d / f"{name}.nii.gz")
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    # the given image's grid is the full run's, rounded to float32 by the NIfTI-1 header (up to 3e-6 mm here)
    a_full, a_given = (open_volume(str(x / "helm.zarr" / "preprocessed")).attrs["affine"] for x in (full, d))
    assert np.array_equal(np.asarray(a_given), np.asarray(a_full).astype(np.float32).astype(np.float64))
    hyp = _data(full / "hypothalamus.nii.gz")
    for k in KS:
        a, b = _data(full / f"hemi_k{k}.nii.gz"), _data(d / f"hemi_k{k}.nii.gz")
        assert int((a != b).sum()) <= 3 and _closing_ties(hyp, a, b), k  # measured: 1 voxel (803 vs 250)
        a, b = _data(full / f"label_map_k{k}.nii.gz"), _data(d / f"label_map_k{k}.nii.gz")
        assert a.shape == b.shape and (a != b).sum() <= 1e-5 * a.size, k  # measured: 4 and 6 of 3.4 M voxels
    tr_full = json.loads((full / "transform.json").read_text())["transform"]
    tr_given = json.loads((d / "transform.json").read_text())["transform"]
    assert np.allclose(tr_full["matrix"], tr_given["matrix"], atol=1e-4) and "alpha_search" not in tr_given
    # only the three later stages ran; the others are recorded as given, under the import's key
    st = info["stages"]
    assert [st[s]["status"] for s in ("import", "background", "resample", "bias")] == [
        "computed",
        "given",
        "given",
        "given",
    ]
    assert all(st[s]["status"] == "computed" for s in ("kmeans", "merge", "mirror"))
    assert not (d / "bias.nii.gz").exists() and not (d / "helm.zarr" / "scan_raw").exists()
    doc = json.loads((d / "run.json").read_text())
    assert doc["params"]["preprocessed"] is True and doc["preprocessed"]["mask"].endswith("mask.nii.gz")
    assert doc["background"]["method"].startswith("external")
    # resumable: a second run recomputes nothing
    again = run_subject(p, quiet=True)
    assert all(again["stages"][s]["status"] in ("skipped", "given") for s in again["stages"])


@pytest.mark.e2e
@pytest.mark.slow
def test_without_mask_the_mask_is_the_non_zero_voxels(full_run):
    root, full = full_run
    info = run_subject(_given(full, root / "nonzero", until="kmeans"), quiet=True)
    d = root / "nonzero" / "s"
    pre, mask = _data(full / "preprocessed.nii.gz"), _data(d / "mask.nii.gz")
    assert np.array_equal(mask, (pre != 0).astype(np.uint8))
    assert info["background"]["method"] == "given" and "label_map_k4" not in {p.name for p in d.iterdir()}
    # the full run's image is zero outside its mask and nowhere inside it: the same mask, the same k-means
    assert np.array_equal(mask, _data(full / "mask.nii.gz"))
    for k in KS:
        assert np.array_equal(_data(d / f"kmeans_k{k}.nii.gz"), _data(full / f"kmeans_k{k}.nii.gz"))


def test_spacing_other_than_native_is_refused(tmp_path, capsys):
    write_phantom(tmp_path / "ph", spacing_mm=4.0, side="L", seed=0)
    p = RunParams(
        scan=str(tmp_path / "ph" / "scan.nii.gz"),
        hypothalamus=str(tmp_path / "ph" / "hypothalamus.nii.gz"),
        out=str(tmp_path / "o"),
        preprocessed=True,
    )
    with pytest.raises(HelmError, match="--spacing must be native"):
        check_params(p)
    rc = main(["run", p.scan, "--hypothalamus", p.hypothalamus, "--out", p.out, "--preprocessed", "--spacing", "0.5"])
    line = capsys.readouterr().err.splitlines()[-1]  # the one error line (after the cluster's address)
    assert rc == 2 and line.startswith("helm-dask: error: --preprocessed") and line.endswith("add --spacing native")
    assert not (tmp_path / "o").exists()
