"""Stage 4 (bias-field correction) on real anatomy: on the template phantom (folded cortex, sulci and ventricles
filled with bright fixative inside the brain mask) our DCT-mixture fit, run as the pipeline runs it with the true
brain mask, recovers the true bias field at least as well as SimpleITK's N4 with fixed settings (defaults,
4 levels x 50 iterations, on a 2 mm shrink). ``bench/bias_real.py`` runs the full table (three fluids, 1 and
0.5 mm)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from helm_dask.bias import bias_field, estimate_bias
from helm_dask.errors import HelmError
from helm_dask.volume import affine_of, make_volume

sitk = pytest.importorskip("SimpleITK")

# 1 mm: the fit's 2 mm coarse copy averages 2x2x2 voxels as it does in the pipeline (a 2 mm phantom would be fitted
# voxel by voxel: ours 0.72, N4 0.64); N4 runs on a 2 mm shrink either way, so 2 mm would not be faster
SPACING_MM = 1.0


@pytest.fixture(scope="module")
def bright():
    from helm_dask.phantom_mni import phantom_mni

    try:
        v = phantom_mni(SPACING_MM, fluid="bright", bag_gap_mm=5.0, seed=0)
    except HelmError as e:  # the template ships in the nilearn wheel
        pytest.skip(f"template phantom unavailable: {e}")
    scan, mask, tissue, bias = dask.compute(*[v[k].data for k in ("scan", "truth_mask", "truth_tissue", "truth_bias")])
    masked = np.where(mask > 0, scan, np.float32(0)).astype(np.float32)
    return {
        "scan": scan,
        "masked": masked,
        "mask": mask,
        "tissue": tissue,
        "bias": bias,
        "affine": affine_of(v["scan"]),
        "chunks": v["scan"].data.chunks,
    }


def _n4_log_field(masked: np.ndarray, mask: np.ndarray, spacing: float) -> np.ndarray:
    """SimpleITK N4 with its defaults, 4 levels x 50 iterations, on a ~2 mm shrink; log-field on the full grid."""
    f = max(1, int(round(2.0 / spacing)))
    img = sitk.GetImageFromArray(masked.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    msk = sitk.GetImageFromArray((mask > 0).astype(np.uint8))
    msk.SetSpacing((spacing,) * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50] * 4)
    n4.Execute(sitk.Shrink(img, [f] * 3), sitk.Shrink(msk, [f] * 3))
    return sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).astype(np.float64)


def _corr(log_field: np.ndarray, p: dict) -> float:
    inside = p["mask"] > 0
    return float(np.corrcoef(log_field[inside], np.log(p["bias"][inside].astype(np.float64)))[0, 1])


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.mark.slow
def test_bias_on_template_phantom_no_worse_than_n4(bright):
    p = bright
    image = make_volume(da.from_array(p["masked"], chunks=p["chunks"]), p["affine"])
    mask = make_volume(da.from_array(p["mask"], chunks=p["chunks"]), p["affine"], kind="mask")
    model = estimate_bias(image, mask)  # as the pipeline calls it
    ours = np.log(bias_field(model, image).values.astype(np.float64))
    n4 = _n4_log_field(p["masked"], p["mask"], SPACING_MM)
    r_ours, r_n4 = _corr(ours, p), _corr(n4, p)
    # measured (1 mm, seed 0): ours 0.90, N4 0.66; with the former 50 mm basis ours was 0.55
    assert r_ours >= 0.85, (r_ours, r_n4)
    assert r_ours >= r_n4, (r_ours, r_n4)
    # the correction flattens white and grey matter (their CV falls towards the true-field floor)
    for code in (2, 3):
        sel = (p["mask"] > 0) & (p["tissue"] == code)
        before = p["scan"][sel].astype(np.float64)
        after = before / np.exp(ours[sel])
        floor = before / p["bias"][sel]
        assert _cv(after) < _cv(before) and _cv(after) <= 1.15 * _cv(floor), (code, _cv(before), _cv(after), _cv(floor))
