"""Stage 4 (bias-field correction): DCT basis and chunked field evaluation vs plain NumPy/SciPy, the EM fit vs
an explicit-design-matrix NumPy reference, chunk independence, accuracy on synthetic data (and on the built-in
phantom when present), bad inputs."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import scipy.fft

from helm_dask.background import gmm1d
from helm_dask.bias import BiasModel, bias_field, correct_bias, dct_basis, estimate_bias
from helm_dask.errors import HelmError
from helm_dask.volume import affine_of, make_volume

SHAPE = (48, 40, 36)


def _oblique_affine(spacing=(1.0, 1.0, 1.0), origin=(-30.0, 20.0, 11.0)):
    a = np.deg2rad(7.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    perm = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = rot @ perm @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _vol(arr, chunks, affine=None, kind="image"):
    return make_volume(da.from_array(arr, chunks=chunks), np.eye(4) if affine is None else affine, kind=kind)


def _synthetic(shape=SHAPE, seed=0, noise=2.0, spacing=(1.0, 1.0, 1.0)):
    """Ellipsoidal brain (WM core, GM rim, deep GM, ventricle) with a smooth non-DCT bias field."""
    rng = np.random.default_rng(seed)
    idx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    x, y, z = idx

    def ell(c, r):
        return sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(idx, c, r))

    brain = ell((0, 0, 0), (21, 17, 15)) <= 1
    wm = ell((0, 0, 0), (16, 12, 10)) <= 1
    deep = ell((-5, -3, -2), (4, 3, 3)) <= 1
    vent = ell((4, 1, 1), (6, 2.5, 2.5)) <= 1
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 2
    tissue[wm] = 3
    tissue[deep] = 4
    tissue[vent] = 1
    means = np.array([0.0, 160.0, 100.0, 60.0, 80.0])
    logb = 0.35 * (x / 25 + 0.6 * np.sin(y / 14) - 0.5 * (z / 20) ** 2 + 0.4 * x * y / 400)
    logb -= logb[brain].mean()
    img = means[tissue] * np.exp(logb)
    img = np.sqrt((img + rng.normal(0, noise, shape)) ** 2 + rng.normal(0, noise, shape) ** 2)
    img[~brain] = 0.0
    return img.astype(np.float32), brain.astype(np.uint8), np.exp(logb), tissue


@pytest.fixture(scope="module")
def synth():
    return _synthetic()


def _reference_field(model: BiasModel, like_shape, like_affine):
    """exp(log-bias) at every voxel centre of a grid, with plain NumPy and explicit voxel->model mapping."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in like_shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ like_affine[:3, :3].T + like_affine[:3, 3]
    inv = np.linalg.inv(model.affine)
    u = world @ inv[:3, :3].T + inv[:3, 3]
    c = model.coefficients
    out = np.zeros(len(u))
    for a in range(c.shape[0]):
        pa = np.cos(np.pi * a * (u[:, 0] + 0.5) / model.shape[0])
        for b in range(c.shape[1]):
            pb = np.cos(np.pi * b * (u[:, 1] + 0.5) / model.shape[1])
            for k in range(c.shape[2]):
                out += c[a, b, k] * pa * pb * np.cos(np.pi * k * (u[:, 2] + 0.5) / model.shape[2])
    return np.exp(out).reshape(like_shape)


def _random_model(shape=SHAPE, affine=None, seed=1):
    rng = np.random.default_rng(seed)
    coef = rng.normal(0, 0.1, (3, 4, 2))
    return BiasModel(coefficients=coef, shape=shape, affine=np.eye(4) if affine is None else affine)


# -------------------------------------------------------------------------------------------------------------
# basis and field evaluation
# -------------------------------------------------------------------------------------------------------------


def test_dct_basis_is_scipy_dct_ii():
    n = 17
    b = dct_basis(np.arange(n), n, n)
    # scipy's unnormalised DCT-II of the identity: y[k, j] = 2 cos(pi k (2 j + 1) / (2 n))
    np.testing.assert_allclose(b, scipy.fft.dct(np.eye(n), type=2, axis=0).T / 2, atol=1e-12)
    # orthogonal columns on the voxel centres
    g = b.T @ b
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-9)


@pytest.mark.parametrize("chunks", [SHAPE, 16, (7, 40, 11), (48, 5, 36)])
def test_bias_field_matches_numpy_on_model_grid(chunks):
    aff = _oblique_affine()
    model = _random_model(affine=aff)
    like_vol = _vol(np.zeros(SHAPE, np.float32), chunks, aff)
    fld = bias_field(model, like_vol)
    assert fld.dtype == np.float32 and fld.data.chunks == like_vol.data.chunks
    assert np.array_equal(affine_of(fld), aff)
    np.testing.assert_allclose(fld.values, _reference_field(model, SHAPE, aff), rtol=1e-6)


def test_bias_field_keep_bits_rounds_and_compresses():
    import zlib

    aff = _oblique_affine()
    model = _random_model(affine=aff)
    like_vol = _vol(np.zeros(SHAPE, np.float32), 16, aff)
    exact = bias_field(model, like_vol).values
    kept = bias_field(model, like_vol, keep_bits=13).values
    ref = _reference_field(model, SHAPE, aff)
    np.testing.assert_allclose(kept, ref, rtol=2.0**-14 + 1e-6)  # round to nearest on 13 mantissa bits
    assert np.all(kept.view(np.uint32) & np.uint32(0x3FF) == 0)  # the 10 dropped bits are zero
    assert not np.array_equal(kept, exact)
    assert len(zlib.compress(kept.tobytes(), 1)) < 0.75 * len(zlib.compress(exact.tobytes(), 1))


def test_saved_field_and_correction_evaluate_the_field_once():
    import dask

    aff = _oblique_affine()
    model = _random_model(affine=aff)
    rng = np.random.default_rng(3)
    img = _vol(rng.uniform(50, 150, SHAPE).astype(np.float32), 16, aff)
    kept = bias_field(model, img, keep_bits=13)
    corrected = correct_bias(img, model)
    # one graph for both: each chunk's field is one task that both outputs read
    graph = dict(kept.data.__dask_graph__()) | dict(corrected.data.__dask_graph__())
    n_field = sum(1 for k in graph if isinstance(k, tuple) and str(k[0]).startswith("bias-field-"))
    assert n_field == int(np.prod(img.data.numblocks))
    f, c = dask.compute(kept.data, corrected.data)
    exact = _reference_field(model, SHAPE, aff)
    np.testing.assert_allclose(f, exact, rtol=2.0**-14 + 1e-6)  # the saved field: rounded
    np.testing.assert_allclose(c, img.values / exact, rtol=1e-6)  # the correction: the exact field


@pytest.mark.parametrize("chunks", [9, (30, 11, 13)])
def test_bias_field_on_other_grids(chunks):
    """The analytic model evaluated on a coarser, axis-permuted grid and on an oblique grid of the same FOV."""
    aff = _oblique_affine()
    model = _random_model(affine=aff)
    # coarser grid, axes permuted (z, x, y of the model), spacing 1.5 mm: separable path
    perm = np.zeros((4, 4))
    perm[:3, :3] = np.array([[0, 1.5, 0], [0, 0, 1.5], [1.5, 0, 0]])
    perm[:3, 3] = [0.25, 0.25, 0.25]
    perm[3, 3] = 1
    aff2 = aff @ perm
    shape2 = (24, 32, 27)
    fld = bias_field(model, _vol(np.zeros(shape2, np.float32), chunks, aff2))
    np.testing.assert_allclose(fld.values, _reference_field(model, shape2, aff2), rtol=1e-6)
    # a grid rotated with respect to the model's voxel axes: per-voxel path
    rot = np.eye(4)
    t = np.deg2rad(20)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    aff3 = aff @ rot
    shape3 = (30, 28, 20)
    fld = bias_field(model, _vol(np.zeros(shape3, np.float32), chunks, aff3))
    np.testing.assert_allclose(fld.values, _reference_field(model, shape3, aff3), rtol=1e-6)


def test_model_json_roundtrip():
    model = _random_model(affine=_oblique_affine())
    model.info = {"n_iter": 3}
    back = BiasModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(back.coefficients, model.coefficients)
    assert np.array_equal(back.affine, model.affine) and back.shape == model.shape and back.info == model.info


# -------------------------------------------------------------------------------------------------------------
# estimation
# -------------------------------------------------------------------------------------------------------------


def _reference_estimate(img, mask, factors, K, n_classes, max_iter, tol=1e-6, regularization=1e-4):
    """The same EM with plain NumPy: block means by reshaping the whole array, an explicit design matrix."""
    nc = [-(-n // f) for n, f in zip(img.shape, factors)]
    pad = [(0, c * f - n) for c, f, n in zip(nc, factors, img.shape)]
    im = np.pad(np.where(mask > 0, img.astype(np.float64), 0), pad)
    mk = np.pad((mask > 0).astype(np.float64), pad)
    r6 = (nc[0], factors[0], nc[1], factors[1], nc[2], factors[2])
    s, cm = im.reshape(r6).sum(axis=(1, 3, 5)), mk.reshape(r6).sum(axis=(1, 3, 5))
    cnt = np.pad(np.ones(img.shape), pad).reshape(r6).sum(axis=(1, 3, 5))
    y = np.divide(s, cm, out=np.zeros_like(s), where=cm > 0)
    cov = cm / cnt
    valid = (cov >= 0.5) & (y > 0)
    centres = []
    for n, f, c in zip(img.shape, factors, nc):
        st = np.arange(c) * f
        centres.append((st + np.minimum(st + f, n) - 1) / 2.0)
    g = np.meshgrid(*centres, indexing="ij")
    u = np.stack([gi[valid] for gi in g], 1)
    ks = [(a, b, c) for a in range(K[0]) for b in range(K[1]) for c in range(K[2])]
    Phi = np.stack(
        [
            np.cos(np.pi * a * (u[:, 0] + 0.5) / img.shape[0])
            * np.cos(np.pi * b * (u[:, 1] + 0.5) / img.shape[1])
            * np.cos(np.pi * c * (u[:, 2] + 0.5) / img.shape[2])
            for a, b, c in ks
        ],
        1,
    )
    pen = np.array([(a / K[0]) ** 2 + (b / K[1]) ** 2 + (c / K[2]) ** 2 for a, b, c in ks])
    lv, wv = np.log(y[valid]), cov[valid]
    h, e = np.histogram(lv, bins=2048, weights=wv)  # the mixture starts from a fit to the histogram
    gm = gmm1d(0.5 * (e[1:] + e[:-1]), h, n_classes, var_floor=(e[1] - e[0]) ** 2)
    pi, mu, var = np.array(gm["weights"]), np.array(gm["means"]), np.array(gm["sds"]) ** 2
    floor = 1e-6 * np.var(lv) + 1e-12
    lb = np.zeros_like(lv)
    prev = -np.inf
    coef = np.zeros(len(ks))
    for it in range(1, max_iter + 1):
        r = lv - lb
        logp = np.log(pi) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (r[:, None] - mu) ** 2 / var
        lse = np.logaddexp.reduce(logp, axis=1)
        ll = np.sum(wv * lse) / np.sum(wv)
        gam = np.exp(logp - lse[:, None]) * wv[:, None]
        nk = gam.sum(0)
        mu = (gam * r[:, None]).sum(0) / nk
        var = np.maximum((gam * (r[:, None] - mu) ** 2).sum(0) / nk, floor)
        pi = nk / nk.sum()
        prec = gam / var
        w = prec.sum(1)
        d = lv - (prec * mu).sum(1) / w
        A = Phi[:, 1:].T @ (w[:, None] * Phi[:, 1:])
        lam = regularization * np.trace(A) / A.shape[0]
        A += np.diag(lam * pen[1:] + 1e-12 * np.trace(A) / A.shape[0])
        coef = np.r_[0.0, np.linalg.solve(A, Phi[:, 1:].T @ (w * d))]
        lb = Phi @ coef
        if it > 1 and abs(ll - prev) <= tol * max(1.0, abs(ll)):
            break
        prev = ll
    coef[0] -= np.sum(wv * lb) / np.sum(wv)
    return coef.reshape(K)


@pytest.mark.parametrize("chunks", [SHAPE, 16, (7, 40, 11)])
def test_estimate_matches_numpy_reference_and_is_chunk_independent(synth, chunks):
    img, mask, _, _ = synth
    aff = _oblique_affine()
    model = estimate_bias(
        _vol(img, chunks, aff),
        _vol(mask, chunks, aff, "mask"),
        coarse_spacing_mm=2.0,
        basis_spacing_mm=30.0,
        max_iter=40,
        tol=1e-6,
    )
    assert model.info["basis_functions"] == [4, 3, 3]
    ref = _reference_estimate(img, mask, (2, 2, 2), (4, 3, 3), 3, 40)
    np.testing.assert_allclose(model.coefficients, ref, atol=1e-6)
    one = estimate_bias(
        _vol(img, SHAPE, aff),
        _vol(mask, SHAPE, aff, "mask"),
        coarse_spacing_mm=2.0,
        basis_spacing_mm=30.0,
        max_iter=40,
        tol=1e-6,
    )
    assert np.array_equal(model.coefficients, one.coefficients)  # bit-identical across chunkings
    json.dumps(model.to_dict())


def test_estimate_recovers_bias_and_flattens_white_matter(synth):
    img, mask, true_bias, tissue = synth
    iv, mv = _vol(img, 16), _vol(mask, 16, kind="mask")
    model = estimate_bias(iv, mv, coarse_spacing_mm=2.0, basis_spacing_mm=30.0, n_classes=4)
    fld = bias_field(model, iv).values
    inside = mask > 0
    r = np.corrcoef(np.log(fld[inside]), np.log(true_bias[inside]))[0, 1]
    assert r >= 0.95, r
    assert abs(float(np.mean(np.log(fld[inside])))) < 0.02  # normalised: mean log-bias ~ 0
    corrected = correct_bias(iv, model, mv).values
    wm = tissue == 3
    cv0 = img[wm].std() / img[wm].mean()
    cv1 = corrected[wm].std() / corrected[wm].mean()
    assert cv1 <= 0.5 * cv0, (cv0, cv1)
    # corrected = image / field inside the mask, 0 outside
    np.testing.assert_allclose(corrected, np.where(inside, img / fld, 0), rtol=1e-6)
    assert corrected.dtype == np.float32
    # without a mask the image is divided everywhere
    np.testing.assert_allclose(correct_bias(iv, model).values, img / fld, rtol=1e-6)


def test_bias_field_chunk_independent(synth):
    img, mask, _, _ = synth
    model = estimate_bias(_vol(img, 16), _vol(mask, 16, kind="mask"), coarse_spacing_mm=2.0, max_iter=20)
    ref = bias_field(model, _vol(img, SHAPE)).values
    for chunks in [(5, 40, 36), (13, 7, 36)]:
        np.testing.assert_allclose(bias_field(model, _vol(img, chunks)).values, ref, rtol=1e-6)


# -------------------------------------------------------------------------------------------------------------
# bad inputs
# -------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise(synth):
    img, mask, _, _ = synth
    iv = _vol(img, 16)
    with pytest.raises(HelmError, match="mask is empty"):
        estimate_bias(iv, _vol(np.zeros_like(mask), 16, kind="mask"))
    with pytest.raises(HelmError, match="not on the image grid"):
        estimate_bias(iv, _vol(mask[:-1], 16, kind="mask"))
    with pytest.raises(HelmError, match="too few coarse voxels"):
        tiny = np.zeros_like(mask)
        tiny[20:24, 18:22, 16:20] = 1
        estimate_bias(iv, _vol(tiny, 16, kind="mask"), coarse_spacing_mm=2.0, basis_spacing_mm=10.0)
    with pytest.raises(HelmError, match="3-D"):
        estimate_bias(make_volume(da.zeros((8, 8, 8, 2), chunks=4), np.eye(4)), _vol(mask, 16, kind="mask"))
    model = estimate_bias(iv, _vol(mask, 16, kind="mask"), coarse_spacing_mm=2.0, max_iter=5)
    with pytest.raises(HelmError, match="not on the image grid"):
        correct_bias(iv, model, _vol(mask[:, :-1], 16, kind="mask"))


# -------------------------------------------------------------------------------------------------------------
# acceptance on the built-in phantom (1 mm for speed; 0.5 mm is checked by hand)
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_phantom_bias():
    phantom = pytest.importorskip("helm_dask.phantom")
    vols = phantom.phantom(1.0, chunks=64)
    scan, mask = vols["scan"], vols["truth_mask"]
    model = estimate_bias(scan, mask)
    fld = bias_field(model, scan).values
    inside = mask.values > 0
    true_log = np.log(vols["truth_bias"].values[inside])
    # the bias is identifiable only up to a constant factor: correlation of the logs
    r = np.corrcoef(np.log(fld[inside]), true_log)[0, 1]
    assert r >= 0.95, r
    corrected = correct_bias(scan, model, mask).values
    img = scan.values
    wm = vols["truth_tissue"].values == phantom.TISSUE_WM
    cv0 = img[wm].std() / img[wm].mean()
    cv1 = corrected[wm].std() / corrected[wm].mean()
    assert cv1 <= 0.5 * cv0, (cv0, cv1)
    assert np.all(corrected[~inside] == 0)
