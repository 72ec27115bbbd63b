"""Stage 2 (background / bag removal): chunked results vs plain NumPy/SciPy references, chunk independence,
accuracy on synthetic bagged brains (and on the built-in phantom when present), bad inputs."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from helm_dask.background import (
    apply_mask,
    block_mean,
    brain_mask,
    coarse_factors,
    fit_coarse_model,
    gmm1d,
    refine_mask,
)
from helm_dask.errors import HelmError
from helm_dask.volume import affine_of, make_volume

SHAPE = (64, 60, 56)


def synth_bagged_brain(shape=SHAPE, *, fluid=160.0, seed=0, noise=4.0, bias_amp=0.3):
    """Bagged ellipsoidal 'hemisphere' at 1 mm: WM core, GM rim, deep GM, an internal ventricle with fluid-like
    CSF, fluid around it in a plastic bag, three air bubbles (one touching the brain), smooth bias, Rician noise.

    Returns image (float32), true brain mask (ventricle included), true bias, tissue codes, ventricle, bubbles,
    fluid (bag content that is neither brain nor bubble).
    """
    rng = np.random.default_rng(seed)
    idx = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    x, y, z = idx

    def ell(c, r):
        return sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(idx, c, r))

    brain = ell((2, 0, -2), (22, 17, 15)) <= 1
    wm = ell((2, 0, -2), (19, 14, 12)) <= 1
    vent = ell((4, 1, -1), (7, 3, 3)) <= 1
    deep = ell((-6, -3, -4), (4, 3, 3)) <= 1
    bag = ell((0, 0, 0), (30, 27, 25)) <= 1
    bag_in = ell((0, 0, 0), (29, 26, 24)) <= 1
    img = np.zeros(shape)
    img[bag & ~bag_in] = 15.0
    img[bag_in] = fluid
    bubbles = np.zeros(shape, bool)
    for c, r in [((10, 22, 8), 3.5), ((-14, 18, 10), 3.0), ((0, 0, 17), 3.0)]:
        bubbles |= ell(c, (r, r, r)) <= 1
    bubbles &= bag_in & ~brain
    img[bubbles] = 0.0
    img[brain] = 100.0
    img[wm] = 60.0
    img[deep] = 80.0
    img[vent] = fluid
    logb = bias_amp * (0.6 * x / 30 + 0.5 * np.cos(np.pi * y / 40) - 0.4 * (z / 30) ** 2 + 0.3 * x * z / 900)
    logb -= logb[brain].mean()
    img = img * np.exp(logb)
    img = np.sqrt((img + rng.normal(0, noise, shape)) ** 2 + rng.normal(0, noise, shape) ** 2).astype(np.float32)
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 2
    tissue[wm] = 3
    tissue[deep] = 4
    tissue[vent] = 1
    return (
        img,
        brain.astype(np.uint8),
        np.exp(logb).astype(np.float32),
        tissue,
        vent,
        bubbles,
        bag_in & ~brain & ~bubbles,
    )


@pytest.fixture(scope="module")
def bright():
    return synth_bagged_brain(fluid=160.0)


@pytest.fixture(scope="module")
def dark():
    return synth_bagged_brain(fluid=30.0, seed=1)


def _oblique_affine(spacing=(1.0, 1.0, 1.0)):
    """A permuted, slightly oblique acquisition affine (like the phantom's)."""
    a = np.deg2rad(7.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    perm = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = rot @ perm @ np.diag(spacing)
    aff[:3, 3] = [-30.0, 20.0, 11.0]
    return aff


def _vol(img, chunks, affine=None, kind="image"):
    return make_volume(da.from_array(img, chunks=chunks), np.eye(4) if affine is None else affine, kind=kind)


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# -------------------------------------------------------------------------------------------------------------
# building blocks vs independent references
# -------------------------------------------------------------------------------------------------------------


def test_coarse_factors():
    assert coarse_factors([0.5, 0.5, 0.5], 1.0) == (2, 2, 2)
    assert coarse_factors([0.1, 0.12, 0.3], 1.0) == (10, 8, 3)
    assert coarse_factors([2.0, 2.0, 2.0], 1.0) == (1, 1, 1)


@pytest.mark.parametrize("chunks", [(37, 23, 29), 8, (5, 60, 11), (37, 23, 29)[::-1]])
@pytest.mark.parametrize("factors", [(2, 2, 2), (3, 2, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # exact integer sums / float sums of whole blocks
def test_block_mean_matches_numpy_and_is_chunk_independent(chunks, factors, dtype):
    rng = np.random.default_rng(3)
    arr = rng.gamma(2.0, 10.0, size=(37, 23, 29)).astype(dtype)
    msk = (rng.random(arr.shape) < 0.7).astype(np.uint8)
    ref = np.empty(tuple(-(-n // f) for n, f in zip(arr.shape, factors)))
    ref_m = np.empty_like(ref)
    ref_f = np.empty_like(ref)
    for i in range(ref.shape[0]):
        for j in range(ref.shape[1]):
            for k in range(ref.shape[2]):
                sl = tuple(slice(q * f, (q + 1) * f) for q, f in zip((i, j, k), factors))
                ref[i, j, k] = arr[sl].astype(np.float64).mean()
                m = msk[sl] > 0
                ref_m[i, j, k] = arr[sl][m].astype(np.float64).mean() if m.any() else 0.0
                ref_f[i, j, k] = m.mean()
    v = _vol(arr, chunks)
    mean, frac = block_mean(v, factors)
    np.testing.assert_allclose(mean, ref, rtol=1e-12)
    assert np.all(frac == 1.0)
    mean_m, frac_m = block_mean(v, factors, mask=_vol(msk, chunks, kind="mask"))
    np.testing.assert_allclose(mean_m, ref_m, rtol=1e-12)
    np.testing.assert_allclose(frac_m, ref_f, rtol=1e-12)
    # bit-identical to the single-chunk result
    mean1, _ = block_mean(_vol(arr, arr.shape), factors)
    assert np.array_equal(mean, mean1)


@pytest.mark.parametrize("factors", [(10, 10, 10), (3, 2, 5), (1, 1, 1), (20, 20, 20), (17, 16, 16)])
def test_compiled_block_sums_are_numpy_s_bit_for_bit(factors):
    """The compiled block sums equal NumPy's (each block a row of a float64 copy, ``sum``) to the bit: values over
    60 orders of magnitude with NaN, inf and -0.0 (another summation order would show), blocks of 1 to 8000
    values (NumPy's pairwise halves above 128), uint8 masks and a reversed (non-contiguous) view."""
    from helm_dask.coarse import _block_sum_chunk

    def numpy_sums(block):
        b = np.asarray(block, dtype=np.float64)
        b = np.where(np.isfinite(b), b, 0.0)
        n = [s // f for s, f in zip(b.shape, factors)]
        b = b.reshape(n[0], factors[0], n[1], factors[1], n[2], factors[2]).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(b).reshape(n[0], n[1], n[2], -1).sum(axis=-1)

    rng = np.random.default_rng(1)
    shape = tuple(f * k for f, k in zip(factors, (4, 3, 2)))
    x = (rng.normal(0, 1, shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    x.ravel()[::17], x.ravel()[::23], x.ravel()[::29] = np.nan, -0.0, np.inf
    m = (rng.random(shape) < 0.5).astype(np.uint8)
    for block in (x, x[::-1], m):
        got = _block_sum_chunk(block, factors)
        assert got.dtype == np.float64
        assert np.array_equal(got.view(np.int64), numpy_sums(block).view(np.int64))


def test_exact_block_sums_are_exact_in_any_chunking():
    """The exact block sums equal math.fsum of each block's finite values (the correctly rounded exact sum) within
    an ulp, on values whose float sum depends on the order (1e30 cancelling, 1e-30 and subnormals next to 1), the
    same to the bit for any chunking, and the mask's counts are exact."""
    import math

    from helm_dask.coarse import exact_block_sums

    rng = np.random.default_rng(5)
    shape, factors = (23, 19, 17), (5, 4, 3)
    x = (rng.normal(0, 1, shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    x[0, 0, :3] = [3e30, 1.0, -3e30]
    x[1, 1, 1], x[2, 2, 2], x[3, 3, 0] = np.float32(1e-45), np.nan, -np.inf
    m = rng.random(shape) < 0.6
    ref = np.zeros(tuple(-(-n // f) for n, f in zip(shape, factors)))
    ref_c = np.zeros_like(ref)
    for b in np.ndindex(*ref.shape):
        sl = tuple(slice(i * f, (i + 1) * f) for i, f in zip(b, factors))
        v = x[sl][m[sl]].astype(np.float64)
        ref[b] = math.fsum(v[np.isfinite(v)])
        ref_c[b] = m[sl].sum()
    first = None
    for chunks in [shape, 8, (5, 19, 2), (7, 3, 11)]:
        sums, counts = exact_block_sums(da.from_array(x, chunks=chunks), factors, mask=da.from_array(m, chunks=chunks))
        np.testing.assert_array_max_ulp(sums, ref, maxulp=1)
        assert np.array_equal(counts, ref_c)
        first = sums if first is None else first
        assert np.array_equal(sums.view(np.int64), first.view(np.int64))


def test_exact_block_sums_of_a_stored_volume_read_the_store_in_boxes(tmp_path, monkeypatch):
    """A stored volume (and mask), also seen through to_ras's flips and transpose, is summed by tasks that read
    boxes of stored chunks themselves: the same sums to the bit and the same counts as the in-memory arrays, on a
    chunk grid that the boxes do not divide."""
    import helm_dask.coarse as coarse
    from helm_dask.io import open_volume, save_volume
    from helm_dask.orient import to_ras

    rng = np.random.default_rng(7)
    shape, factors = (29, 21, 19), (5, 4, 3)
    x = (rng.gamma(2.0, 10.0, shape) * 10.0 ** rng.integers(-3, 3, shape)).astype(np.float32)
    m = ((rng.random(shape) < 0.6) * rng.integers(1, 3, shape)).astype(np.uint8)  # mask > 0: 1 or 2
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # to_ras flips and transposes
    boxes: list = []
    real = coarse._exact_box

    def counted(first, edges, view, mview, fs):
        boxes.append([len(e) - 1 for e in edges])
        return real(first, edges, view, mview, fs)

    monkeypatch.setattr(coarse, "_exact_box", counted)
    for affine in (np.eye(4), lia):
        vol = open_volume(save_volume(_vol(x, 8, affine=affine), tmp_path / f"x{len(boxes)}.zarr", chunks=8))
        msk = open_volume(save_volume(_vol(m, 8, affine, kind="mask"), tmp_path / f"m{len(boxes)}.zarr", chunks=8))
        vol, msk = to_ras(vol), to_ras(msk)
        a, b = np.asarray(vol.values), np.asarray(msk.values)
        n = len(boxes)
        for mask in (None, msk.data):
            sums, counts = coarse.exact_block_sums(vol.data, factors, mask=mask)
            ref, ref_c = coarse.exact_block_sums(
                da.from_array(a, chunks=8), factors, mask=None if mask is None else da.from_array(b, chunks=8)
            )
            assert np.array_equal(sums.view(np.int64), ref.view(np.int64))
            assert (counts is None) == (ref_c is None) and (counts is None or np.array_equal(counts, ref_c))
        grid = [-(-k // 8) for k in vol.shape]
        # two calls, each in boxes of 2x2x2 chunks (fewer at the grid's ends)
        assert len(boxes) - n == 2 * int(np.prod([-(-g // 2) for g in grid]))
        assert all(1 <= k <= 2 for bx in boxes for k in bx)


def test_gmm1d_matches_sklearn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(1.0, 0.3, 4000), rng.normal(3.0, 0.5, 3000), rng.normal(4.5, 0.2, 2000)]
    ours = gmm1d(x, n_components=3, tol=1e-12, max_iter=2000)
    sk = GaussianMixture(
        3,
        covariance_type="full",
        tol=1e-10,
        max_iter=2000,
        random_state=0,
        means_init=np.array([[0.9], [3.1], [4.4]]),
        reg_covar=0.0,
    ).fit(x[:, None])
    o = np.argsort(sk.means_[:, 0])
    np.testing.assert_allclose(ours["means"], sk.means_[o, 0], atol=1e-4)
    np.testing.assert_allclose(ours["sds"], np.sqrt(sk.covariances_[o, 0, 0]), atol=1e-4)
    np.testing.assert_allclose(ours["weights"], sk.weights_[o], atol=1e-4)
    # weighted samples (a histogram) give the same fit as the samples themselves
    h, e = np.histogram(x, bins=4096)
    hw = gmm1d(0.5 * (e[1:] + e[:-1]), h, 3, tol=1e-12, max_iter=2000)
    np.testing.assert_allclose(hw["means"], ours["means"], atol=2e-3)


def _reference_refinement(img, model, spacing, refine_sigma_mm=0.25):
    """The full-resolution rule on the whole array with plain SciPy (map_coordinates + gaussian_filter)."""
    f = model.factors
    b = np.where(np.isfinite(img), img, 0).astype(np.float32)
    q = np.meshgrid(*[(np.arange(n) - (fi - 1) / 2) / fi for n, fi in zip(img.shape, f)], indexing="ij")
    m_b = ndi.map_coordinates(model.m_brain, q, order=1, mode="nearest")
    m_o = ndi.map_coordinates(model.m_out, q, order=1, mode="nearest")
    t_air = 0.5 * (model.m_air + (m_b if model.side == "none" else np.minimum(m_b, m_o)))
    w = (b > t_air).astype(np.float32) if model.side == "bright" else np.ones_like(b)
    sig = [refine_sigma_mm / s for s in spacing]
    num = ndi.gaussian_filter(b * w, sig, mode="nearest", truncate=3.0).astype(np.float64)
    den = ndi.gaussian_filter(w, sig, mode="nearest", truncate=3.0).astype(np.float64)
    s = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-6)
    par = np.ix_(*[np.minimum(np.arange(n) // fi, nc - 1) for n, fi, nc in zip(img.shape, f, model.mask.shape)])
    t = m_o + np.where(model.mask[par], model.theta, max(model.theta, 0.5)) * (m_b - m_o)
    if model.side == "bright":
        rule = (w > 0) & (s < t)
    else:
        rule = s > t
        if model.cap is not None:
            rule &= s <= ndi.map_coordinates(model.cap, q, order=1, mode="nearest")
    par = np.ix_(*[np.minimum(np.arange(n) // fi, nc - 1) for n, fi, nc in zip(img.shape, f, model.mask.shape)])
    fill = model.fill[par]
    brain = np.where(model.band[par], rule | fill, model.mask[par])
    for _ in range(2):  # two passes of the three-neighbour test
        p = np.pad(brain, 1)  # nothing beyond the volume
        nb = sum(np.roll(p, sh, axis=ax)[1:-1, 1:-1, 1:-1].astype(int) for ax in range(3) for sh in (-1, 1))
        brain = np.where(model.band[par], (rule & (nb >= 3)) | fill, model.mask[par])
    return brain.astype(np.uint8)


@pytest.mark.parametrize("chunks", [SHAPE, 16, (20, 13, 56), (7, 60, 9)])
@pytest.mark.parametrize("which", ["bright", "dark"])
def test_refinement_matches_numpy_reference(bright, dark, which, chunks):
    img = (bright if which == "bright" else dark)[0]
    vol = _vol(img, chunks)
    model = fit_coarse_model(vol, coarse_spacing_mm=2.0)
    assert model.side == which
    assert 0 < model.band.sum() < model.band.size
    got = refine_mask(vol, model).compute()
    assert got.dtype == np.uint8 and got.shape == img.shape
    ref = _reference_refinement(img, model, (1.0, 1.0, 1.0))
    assert np.array_equal(got, ref)
    # the band really changes something with respect to the coarse answer
    par = np.ix_(*[np.arange(n) // 2 for n in img.shape])
    assert (got != model.mask[par]).sum() > 100


@pytest.mark.parametrize("sigma_mm", [1.5, 3.0])
@pytest.mark.parametrize("which", ["bright", "dark"])
def test_band_only_smoothing_matches_numpy_reference(bright, dark, which, sigma_mm, tmp_path, monkeypatch):
    """The smoothing is computed on the band's tiles only (each pass on the tiles the later ones read): with a
    kernel of 5 and 9 voxels' radius (tiles grown by 1 and 2 tiles per pass), computed and stored, the mask is
    the whole-array SciPy reference's, and the smoothing really skipped voxels."""
    import helm_dask.background as bg
    from helm_dask.io import open_volume, store

    img = (bright if which == "bright" else dark)[0]
    model = fit_coarse_model(_vol(img, SHAPE), coarse_spacing_mm=2.0)
    ref = _reference_refinement(img, model, (1.0, 1.0, 1.0), refine_sigma_mm=sigma_mm)
    stored = open_volume(store.save_volume(_vol(img, 16), tmp_path / "s.zarr", chunks=16))
    seen: list = []
    real = bg._band_tiles

    def spy(*args):
        tiles = real(*args)
        seen.append(tiles.mean())
        return tiles

    monkeypatch.setattr(bg, "_band_tiles", spy)
    for vol in (_vol(img, 16), _vol(img, (20, 13, 56)), stored):
        assert np.array_equal(refine_mask(vol, model, refine_sigma_mm=sigma_mm).compute(), ref)
    assert seen and min(seen) < 1.0


@pytest.mark.parametrize("chunks", [16, (7, 60, 9)])
def test_refinement_of_a_stored_reoriented_image_matches_numpy_reference(bright, tmp_path, chunks):
    """A stored image seen through a reorientation is read box by box from its store (chunk cache, halos
    clipped at the volume's edges and padded like scipy's "nearest"): the same mask as the reference."""
    from helm_dask.io import open_volume, regions
    from helm_dask.io.store import save_volume
    from helm_dask.orient import to_ras

    img = bright[0]
    las = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored x runs right to left: to_ras flips it
    las[0, 3] = img.shape[0] - 1.0
    store = save_volume(make_volume(da.from_array(img[::-1], chunks=chunks), las), tmp_path / "s.zarr", chunks=chunks)
    vol = to_ras(open_volume(store))
    assert regions.store_view_of(vol.data) is not None
    np.testing.assert_array_equal(vol.values, img)
    model = fit_coarse_model(_vol(img, SHAPE), coarse_spacing_mm=2.0)
    got = refine_mask(vol, model).compute()
    assert np.array_equal(got, _reference_refinement(img, model, (1.0, 1.0, 1.0)))


@pytest.mark.parametrize("which", ["bright", "dark"])
def test_stored_refinement_decodes_each_chunk_a_few_times(bright, dark, which, tmp_path, monkeypatch):
    """A stored scan is refined in batches of band chunks along a Hilbert curve that keep the stored chunks they
    decode: the same mask as one task per chunk of an in-memory array, each stored chunk decoded at most a few
    times (one task per chunk decoded every overlapping chunk for every box: ~27 per band chunk)."""
    from helm_dask.io import open_volume, regions
    from helm_dask.io.store import save_volume

    img = (bright if which == "bright" else dark)[0]
    store = save_volume(_vol(img, 8), tmp_path / "s.zarr", chunks=8)
    vol = open_volume(store)
    model = fit_coarse_model(_vol(img, SHAPE), coarse_spacing_mm=2.0)
    assert model.side == which
    reads: list = []
    real = regions.StoreView.read

    def counted(self, lo, hi, scope=""):
        reads.append(tuple(lo))
        return real(self, lo, hi, scope)

    monkeypatch.setattr(regions.StoreView, "read", counted)
    got = refine_mask(vol, model).compute()
    ref = refine_mask(_vol(img, 8), model).compute()  # one task per chunk, pasted from the dask chunks
    assert np.array_equal(got, ref)
    assert np.array_equal(got, _reference_refinement(img, model, (1.0, 1.0, 1.0)))
    n_chunks = int(np.prod([-(-n // 8) for n in img.shape]))
    assert all(len(r) == 3 for r in reads) and 0 < len(set(reads)) <= n_chunks
    assert len(reads) <= 3 * n_chunks, (len(reads), n_chunks)


def test_batched_write_refines_each_band_chunk_once(bright, tmp_path, monkeypatch):
    """Written in batches (boxes of chunks computed one after the other) whose boxes hold the boxes the refine
    tasks of a stored scan are grouped in -- the same boxes (the store's default, or the pipeline's
    :data:`MASK_BATCH_CHUNKS`), or bigger ones -- every band chunk is refined once (tasks along one Hilbert curve
    of the whole volume ran once per batch they reached: 1.7x the refinements on the 0.2 mm phantom), and the
    mask is the unbatched one whatever the grouping."""
    import dask

    import helm_dask.background as bg
    from helm_dask.io import open_volume, store

    img = bright[0]
    vol = open_volume(store.save_volume(_vol(img, 8), tmp_path / "s.zarr", chunks=8))
    model = fit_coarse_model(_vol(img, SHAPE), coarse_spacing_mm=2.0)
    ref = refine_mask(_vol(img, 8), model).compute()
    real = bg._refine_batch
    groups = {}
    # boxes of edge 2 and 4 (the default's 64 and the pipeline's 512 have edges 4 and 8)
    for n, (grouped, written) in enumerate(((8, 8), (64, 64), (8, 64))):
        refined: list = []

        def counted(view, items, refined=refined):
            refined.extend(tuple(r[0] for r in ranges) for ranges, *_ in items)
            return real(view, items)

        monkeypatch.setattr(bg, "_refine_batch", counted)
        mask = refine_mask(vol, model, batch_chunks=grouped)
        groups[grouped] = len([k for k in mask.dask if isinstance(k, tuple) and str(k[0]).endswith("-batch")])
        path = tmp_path / f"m{n}.zarr"
        with dask.config.set(scheduler="synchronous"):
            store.save_volume(make_volume(mask, np.eye(4), kind="mask"), path, chunks=8, batch_chunks=written)
        got = open_volume(path).values
        assert np.array_equal(got, ref)
        assert len(refined) == len(set(refined)) > 8, (grouped, written, len(refined))
    assert groups[64] < groups[8]  # bigger boxes: fewer, fuller refine tasks


@pytest.mark.parametrize("sig", [(1.25, 1.25, 1.25), (2.5, 0.7, 1.9), (1.0, 0.0, 2.0)])
def test_compiled_gaussian_is_scipy_s_bit_for_bit(sig):
    """The cropped Gaussian (compiled passes where the halo holds the kernel) equals scipy's gaussian_filter bit
    for bit, also on values spanning 40 orders of magnitude (a different summation order would show there)."""
    from helm_dask.background import _gaussian_cropped

    rng = np.random.default_rng(0)
    shape = (40, 37, 45)
    x = (rng.normal(0, 1, shape) * 10.0 ** rng.integers(-20, 20, shape)).astype(np.float32)
    r = [int(3.0 * s + 0.5) for s in sig]
    for keep in [tuple(slice(ri, n - ri) for ri, n in zip(r, shape)), (slice(1, 30), slice(0, 37), slice(3, 44))]:
        ref = ndi.gaussian_filter(x, sig, mode="nearest", truncate=3.0)[keep]
        got = _gaussian_cropped(x, sig, 3.0, keep)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref)
    ones = ndi.gaussian_filter(np.ones(shape, np.float32), sig, mode="nearest", truncate=3.0)
    # the dark side's denominator: one number everywhere, that of a single voxel
    assert np.all(ones == ndi.gaussian_filter(np.ones((1, 1, 1), np.float32), sig, mode="nearest", truncate=3.0))


def test_refinement_reads_only_chunks_near_the_boundary(bright):
    img = bright[0]
    read = []

    def load(block, block_id=None):
        read.append(block_id)
        return block

    arr = da.from_array(img, chunks=8)
    vol = make_volume(arr.map_blocks(load, dtype=arr.dtype), np.eye(4))
    model = fit_coarse_model(_vol(img, 8), coarse_spacing_mm=2.0)
    out = refine_mask(vol, model).compute()
    assert np.array_equal(out, refine_mask(_vol(img, 8), model).compute())
    n_blocks = int(np.prod(arr.numblocks))
    assert 0 < len(set(read)) < 0.9 * n_blocks  # uniform chunks (deep inside / outside) are not read


def test_mask_is_chunk_and_affine_independent(bright):
    img = bright[0]
    ref = brain_mask(_vol(img, SHAPE), coarse_spacing_mm=2.0)
    ref_np = ref.values
    for chunks in [16, (9, 31, 56)]:
        got = brain_mask(_vol(img, chunks), coarse_spacing_mm=2.0)
        assert got.data.chunks == da.from_array(img, chunks=chunks).chunks
        assert np.array_equal(got.values, ref_np)
    # the method works in voxel space: an oblique/permuted affine with the same voxel sizes gives the same mask
    aff = _oblique_affine()
    obl = brain_mask(_vol(img, 16, aff), coarse_spacing_mm=2.0)
    assert np.array_equal(obl.values, ref_np)
    assert np.array_equal(affine_of(obl), aff)
    # the threaded and the synchronous scheduler agree (worker count does not matter)
    import dask

    with dask.config.set(scheduler="synchronous"):
        assert np.array_equal(brain_mask(_vol(img, 16), coarse_spacing_mm=2.0).values, ref_np)


@pytest.mark.parametrize("which", ["bright", "dark"])
def test_mask_accuracy_on_synthetic_bagged_brain(which, bright, dark):
    img, truth, _, tissue, vent, bubbles, fluid = bright if which == "bright" else dark
    m = brain_mask(_vol(img, 16), coarse_spacing_mm=2.0)
    mm = m.values
    assert m.attrs["kind"] == "mask" and mm.dtype == np.uint8 and set(np.unique(mm)) <= {0, 1}
    d = _dice(mm, truth)
    assert d >= 0.995, d
    assert ndi.label(mm)[1] == 1  # one connected brain
    assert mm[vent].all()  # internal ventricle filled
    assert mm[bubbles].mean() < 0.02  # bubbles removed
    assert mm[fluid].mean() < 0.02  # fluid removed
    info = m.attrs["background"]
    json.dumps(info)  # JSON-able
    assert info["fluid_side"] == which
    assert info["coarse_factors"] == [2, 2, 2]
    assert info["coarse_component_voxels"] > 0


def test_fluid_without_signal(bright):
    """A fluid that gives no signal (Fomblin-like) cannot be told from air: fluid="none" keeps all the signal."""
    img, truth, *_ = synth_bagged_brain(fluid=0.0, seed=2)
    m = brain_mask(_vol(img, 16), coarse_spacing_mm=2.0, fluid="none")
    assert m.attrs["background"]["fluid_side"] == "none"
    assert _dice(m.values, truth) >= 0.99


def test_apply_mask(bright):
    img = bright[0]
    vol = _vol(img, 16)
    m = brain_mask(vol, coarse_spacing_mm=2.0)
    out = apply_mask(vol, m)
    assert out.dtype == np.float32
    assert np.array_equal(out.values, np.where(m.values > 0, img, 0))
    assert np.array_equal(affine_of(out), affine_of(vol))
    with pytest.raises(HelmError, match="does not match"):
        apply_mask(vol, _vol(m.values[:-1], 16, kind="mask"))


# -------------------------------------------------------------------------------------------------------------
# bad inputs
# -------------------------------------------------------------------------------------------------------------


def test_empty_and_constant_images_raise():
    with pytest.raises(HelmError, match="all background"):
        brain_mask(_vol(np.zeros((32, 32, 32), np.float32), 16), coarse_spacing_mm=2.0)
    with pytest.raises(HelmError, match="all background"):
        brain_mask(_vol(np.full((32, 32, 32), 7.0, np.float32), 16), coarse_spacing_mm=2.0)
    noise = np.abs(np.random.default_rng(0).normal(0, 3, (32, 32, 32))).astype(np.float32)
    with pytest.raises(HelmError, match="background"):
        brain_mask(_vol(noise, 16), coarse_spacing_mm=2.0)


def test_mask_filling_the_field_of_view_raises():
    # tissue everywhere (no bag, no fluid or air around it), with a dark blob inside: whatever is called brain
    # fills the field of view -> refuse rather than return the whole volume
    rng = np.random.default_rng(0)
    blobs = ndi.gaussian_filter(rng.normal(size=(32, 32, 32)), 3.0) > 0
    img = np.where(blobs, 60.0, 100.0)
    img[12:18, 12:18, 12:18] = 2.0
    img = (img + rng.normal(0, 2, img.shape)).astype(np.float32)
    for fluid in ("auto", "none"):
        with pytest.raises(HelmError, match="bag/fluid was not removed|no brain found"):
            brain_mask(_vol(img, 16), coarse_spacing_mm=2.0, fluid=fluid)
    with pytest.raises(HelmError, match="bag/fluid was not removed"):
        brain_mask(_vol(img, 16), coarse_spacing_mm=2.0, fluid="none")


def test_four_d_input_raises():
    v = make_volume(da.zeros((8, 8, 8, 2), chunks=4), np.eye(4))
    with pytest.raises(HelmError, match="3-D"):
        brain_mask(v)


# -------------------------------------------------------------------------------------------------------------
# acceptance on the built-in phantom (1 mm for speed; 0.5 mm is checked by hand, see the module docstring)
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("spacing_mm", [1.0, 2.0])
def test_phantom_brain_mask(spacing_mm):
    """Also on a coarse 2 mm input (the pipeline tests' size), where the bag lining is only one voxel deep."""
    phantom = pytest.importorskip("helm_dask.phantom")
    vols = phantom.phantom(spacing_mm, chunks=64)
    truth = vols["truth_mask"].values
    tissue = vols["truth_tissue"].values
    m = brain_mask(vols["scan"], coarse_spacing_mm=1.0)
    mm = m.values
    assert np.array_equal(affine_of(m), affine_of(vols["scan"]))  # oblique, permuted acquisition affine
    d = _dice(mm, truth)
    assert d >= 0.98, d
    assert ndi.label(mm)[1] == 1  # one connected brain
    assert mm[tissue == phantom.TISSUE_CSF].mean() > 0.99  # internal ventricle filled
    assert m.attrs["background"]["fluid_side"] == "bright"


# -------------------------------------------------------------------------------------------------------------
# real anatomy: the template phantom, every fixative contrast, the bag pressed on the brain or not; always
# fluid="auto" (choosing the variant by hand would be per-case tuning)
# -------------------------------------------------------------------------------------------------------------


def _template_case(spacing_mm, fluid, gap):
    pm = pytest.importorskip("helm_dask.phantom_mni")
    vols = pm.phantom_mni(spacing_mm, fluid=fluid, bag_gap_mm=gap, seed=1, chunks=64)
    scan = make_volume(vols["scan"].data.persist(), affine_of(vols["scan"]))
    return scan, vols["truth_mask"].values > 0


def _check_template_mask(spacing_mm, fluid, gap, max_detached=0):
    scan, truth = _template_case(spacing_mm, fluid, gap)
    m = brain_mask(scan)
    mm = m.values > 0
    d = _dice(mm, truth)
    assert d >= 0.97, (fluid, gap, d)
    # one connected brain; at 0.5 mm a lone voxel of true brain can come out cut off from it where a thin
    # bridge of tissue is thinner than a voxel (seen: 1-2 voxels of 7.6 million)
    lab, n = ndi.label(mm)
    sizes = np.bincount(lab.ravel())[1:]
    assert sizes.sum() - sizes.max() <= max_detached, (n, sorted(sizes)[-3:])
    info = m.attrs["background"]
    json.dumps(info)
    assert info["fluid_side"] == fluid  # what auto decided, and said
    assert info["fluid"] == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 5.0])
@pytest.mark.parametrize("fluid", ["bright", "dark", "none"])
def test_template_phantom_mask_1mm(fluid, gap):
    _check_template_mask(1.0, fluid, gap)


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 5.0])
@pytest.mark.parametrize("fluid", ["bright", "dark", "none"])
def test_template_phantom_mask_05mm(fluid, gap):
    _check_template_mask(0.5, fluid, gap, max_detached=3)


def test_fluid_choice_given_against_the_data_is_refused():
    scan, _ = _template_case(2.0, "bright", 5.0)
    with pytest.raises(HelmError, match="--fluid dark was given"):
        brain_mask(scan, fluid="dark")
    with pytest.raises(HelmError, match="fluid must be one of"):
        brain_mask(scan, fluid="purple")


def test_fluid_hypothesis_that_leaves_no_brain_is_rejected(monkeypatch):
    """A specimen in a fixative without signal whose bag contents look as smooth as a bag of fluid (as the 1 mm
    block means of a 0.2 mm scan do: the partial volume fills the sulci) is first taken for a bag of fluid; the
    cortex then plays the fluid and no brain is left, so ``auto`` falls back to "no fluid signal" and says so."""
    import helm_dask.background as bgmod

    scan, truth = _template_case(2.0, "none", 5.0)
    real = bgmod._closing

    def no_gain(m, radius_mm, spacing_c):
        return m.copy() if radius_mm == 4.0 else real(m, radius_mm, spacing_c)  # the smoothness cue's closing

    monkeypatch.setattr(bgmod, "_closing", no_gain)
    m = brain_mask(scan)
    info = m.attrs["background"]
    assert info["lining"]["smooth"] and info["lining"]["is_fluid"]  # the cues said: fluid
    reason = info["rejected"]["reason"]
    assert info["rejected"]["fluid_with_signal"] and ("no brain" in reason or "signal voxels" in reason), reason
    assert info["fluid_side"] == "none"
    assert _dice(m.values > 0, truth) >= 0.95
    with pytest.raises(HelmError, match="no brain found"):  # forced: no second hypothesis
        brain_mask(scan, fluid="bright")


@pytest.mark.parametrize("seed", range(6))
def test_coarse_closing_equals_scipy(seed):
    """The coarse fit's closing (two Euclidean feature transforms on the mask's box) is scipy's closing with the
    ball, the field of view zero-padded: blobs touching the faces, anisotropic grids, radii whose sphere passes
    through grid points, and an empty mask."""
    import helm_dask.background as bgmod

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(12, 36, 3))
    m = ndi.gaussian_filter(rng.random(shape), 2.0) > 0.52
    m[0, : shape[1] // 2] = True  # on a face: the padding must keep it from eroding
    spacing = [1.0, 1.0, 1.0] if seed % 2 else rng.uniform(0.5, 1.5, 3).round(2).tolist()
    for radius in (1.0, 2.0, 3.0, 4.0, 5.0):  # 5: (3, 4, 0) voxels lie on the sphere
        se = bgmod.ball(radius, spacing)
        h = [s // 2 for s in se.shape]
        ref = ndi.binary_closing(np.pad(m, [(x, x) for x in h]), structure=se)
        ref = ref[tuple(slice(x, x + n) for x, n in zip(h, shape))]
        np.testing.assert_array_equal(bgmod._closing(m, radius, np.asarray(spacing)), ref)
    assert not bgmod._closing(np.zeros(shape, bool), 3.0, np.ones(3)).any()
