"""Synthetic (image, labels) pairs: determinism, the label gather against scipy.ndimage, the intensity model,
each augmentation against an independent NumPy/SciPy computation, laziness on a 0.1 mm phantom, and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from helm_dask.cli.synth import add_synth_parser
from helm_dask.errors import HelmError
from helm_dask.synth import (
    LabelSource,
    SampleParams,
    SynthConfig,
    gather_tasks,
    generate_sample,
    iter_samples,
    label_intensity,
    plan_sample,
    sample_params,
    write_samples,
)
from helm_dask.volume import affine_of, make_volume

SHAPE = (40, 36, 30)
CHUNKINGS = [SHAPE, (7, 9, 5), (16, 8, 30), (40, 3, 11)]


def rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


# An oblique, permuted (non-RAS) source grid: the output grid is RAS, so nothing lines up by accident.
SRC_AFFINE = np.eye(4)
SRC_AFFINE[:3, :3] = rotation((1, 2, 3), 10) @ np.array([[0, -0.9, 0], [0.9, 0, 0], [0, 0, 1.1]])
SRC_AFFINE[:3, 3] = (10.0, -5.0, 3.0)


def label_array(shape=SHAPE, seed=0):
    """Blocky random tissue codes 1..6 with a hypothalamus (801-803) in the middle and background round it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 7, tuple(-(-s // 6) for s in shape))
    lab = np.kron(coarse, np.ones((6, 6, 6), int))[: shape[0], : shape[1], : shape[2]].astype(np.uint16)
    c = [s // 2 for s in shape]
    lab[c[0] - 4 : c[0] + 4, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2]] = 801
    lab[c[0] - 4 : c[0] + 4, c[1] - 3 : c[1] + 3, c[2] : c[2] + 3] = 802
    lab[c[0] + 4 : c[0] + 7, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = 803
    lab[:2], lab[:, -2:] = 0, 0
    return lab


def label_volume(lab, chunks=None, affine=SRC_AFFINE):
    return make_volume(da.from_array(lab, chunks=chunks or lab.shape), affine, kind="labels", name="labels")


def centre_of(out_affine, crop):
    return out_affine[:3, :3] @ ((np.asarray(crop) - 1) / 2) + out_affine[:3, 3]


def scipy_reference(lab, src_affine, params, out_affine, crop):
    """The sample's labels computed independently: one affine_transform of the whole source array."""
    c = centre_of(out_affine, crop)
    fwd = (
        Rotation.from_euler("xyz", params.rotation_deg, degrees=True).as_matrix()
        @ np.diag(params.scaling)
        @ (np.eye(3) + _offdiag(params.shear))
    )
    pull = np.eye(4)
    pull[:3, :3] = np.linalg.inv(fwd)
    pull[:3, 3] = c - pull[:3, :3] @ c
    t = np.linalg.inv(src_affine) @ pull @ out_affine
    return ndi.affine_transform(
        lab, t[:3, :3], t[:3, 3], output_shape=tuple(crop), order=0, mode="grid-constant", cval=0
    )


def _offdiag(shear):
    h = np.zeros((3, 3))
    h[0, 1], h[0, 2], h[1, 0], h[1, 2], h[2, 0], h[2, 1] = shear
    return h


AFFINE_ONLY = dict(deformation=False, bias=False, gamma=False, acquisition=False)


# ----------------------------------------------------------------------------------------------------------------
# parameters


def test_sample_params_seeded_jsonable_and_independent_of_flags():
    cfg = SynthConfig(crop=(20, 20, 20), max_shift_mm=2.0)
    p = sample_params(cfg, 7, 3)
    assert p == sample_params(cfg, 7, 3)
    assert p != sample_params(cfg, 8, 3) and p != sample_params(cfg, 7, 4)
    assert SampleParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert all(abs(a) <= 15 for a in p.rotation_deg) and all(0.85 <= s <= 1.15 for s in p.scaling)
    assert all(abs(s) <= cfg.shear for s in p.shear) and all(abs(s) <= 2.0 for s in p.shift_mm)
    assert 0 < p.nonlin_std_mm <= 3 and 0 < p.bias_std <= 0.5 and p.gamma != 1.0
    assert p.acq_axis in (0, 1, 2) and cfg.spacing_mm <= p.acq_spacing_mm <= 8.0
    # switching a step off neutralises it and leaves every other draw as it was
    q = sample_params(SynthConfig(crop=(20, 20, 20), max_shift_mm=2.0, bias=False, affine=False), 7, 3)
    assert q.bias_std == 0 and q.rotation_deg == (0, 0, 0) and q.scaling == (1, 1, 1) and q.shear == (0,) * 6
    assert (q.gamma, q.nonlin_std_mm, q.acq_spacing_mm, q.shift_mm) == (
        p.gamma,
        p.nonlin_std_mm,
        p.acq_spacing_mm,
        p.shift_mm,
    )
    off = sample_params(cfg.without_augmentation(), 7, 3)
    assert (off.nonlin_std_mm, off.bias_std, off.gamma, off.acq_axis, off.shift_mm) == (0, 0, 1.0, None, (0, 0, 0))


def test_forward_matrix_is_rotation_scaling_shear():
    p = sample_params(SynthConfig(), 1, 2)
    ref = (
        Rotation.from_euler("xyz", p.rotation_deg, degrees=True).as_matrix()
        @ np.diag(p.scaling)
        @ (np.eye(3) + _offdiag(p.shear))
    )
    np.testing.assert_allclose(p.forward_matrix(), ref, atol=1e-14)
    np.testing.assert_allclose(p.pull_matrix() @ ref, np.eye(3), atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# labels: exact against scipy


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("chunks", CHUNKINGS[:3])
def test_pure_affine_labels_equal_scipy_affine_transform(index, chunks):
    lab = label_array()
    # a crop larger than the map: the grid-constant edge convention is exercised on every face
    cfg = SynthConfig(crop=(44, 40, 36), spacing_mm=0.8, level=0, **AFFINE_ONLY)
    p = sample_params(cfg, 11, index)
    assert p.rotation_deg != (0, 0, 0)
    img, out = generate_sample(label_volume(lab, chunks), p, cfg)
    ref = scipy_reference(lab, SRC_AFFINE, p, affine_of(out), cfg.crop)
    assert out.dtype == np.uint16 and out.shape == cfg.crop
    np.testing.assert_array_equal(out.values, ref)
    assert (ref == 0).any() and (ref == 801).any()
    # the output grid: RAS, the requested spacing, centred on the hypothalamus centroid
    a = affine_of(out)
    np.testing.assert_allclose(a[:3, :3], np.diag([0.8] * 3))
    ijk = np.argwhere(np.isin(lab, np.arange(801, 811))).mean(axis=0)
    np.testing.assert_allclose(centre_of(a, cfg.crop), SRC_AFFINE[:3, :3] @ ijk + SRC_AFFINE[:3, 3], atol=1e-9)
    np.testing.assert_array_equal(affine_of(img), a)


def test_coarse_level_is_scipy_on_the_strided_map():
    lab = label_array((64, 60, 52))
    cfg = SynthConfig(crop=(20, 18, 16), spacing_mm=2.3, **AFFINE_ONLY)  # auto level: 0.9*2 <= 2.3/2 < 0.9*4
    vol = label_volume(lab, (16, 16, 16), affine=np.diag([0.5, 0.5, 0.5, 1.0]))
    p = sample_params(cfg, 2, 0)
    plan = plan_sample(vol, p, cfg)
    assert plan.level == 1
    _, out = generate_sample(vol, p, cfg)
    strided_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = scipy_reference(lab[::2, ::2, ::2], strided_affine, p, affine_of(out), cfg.crop)
    np.testing.assert_array_equal(out.values, ref)


def test_store_pyramid_gives_the_same_samples_as_the_lazy_volume(tmp_path):
    from helm_dask.io import save_volume

    lab = label_array((130, 40, 36))
    vol = label_volume(lab, (32, 32, 32), affine=np.diag([0.4, 0.4, 0.4, 1.0]))
    store = save_volume(vol, tmp_path / "lab.zarr", chunks=(32, 32, 32))
    src = LabelSource.open(store)
    assert len(src.stored) == 2  # level 1 stored; level 2 is a stride of it
    cfg = SynthConfig(crop=(16, 16, 16), spacing_mm=3.3)
    for i in range(2):
        p = sample_params(cfg, 5, i)
        assert plan_sample(src, p, cfg).level == 2
        a_img, a_lab = generate_sample(src, p, cfg)
        b_img, b_lab = generate_sample(vol, p, cfg)
        np.testing.assert_array_equal(a_lab.values, b_lab.values)
        np.testing.assert_array_equal(a_img.values, b_img.values)


def test_deformation_moves_labels_a_little():
    lab = label_array()
    vol = label_volume(lab, (10, 10, 10))
    base = SynthConfig(
        crop=(30, 30, 30),
        spacing_mm=1.0,
        level=0,
        nonlin_std_mm=3.0,
        nonlin_spacing_mm=8.0,
        **{**AFFINE_ONLY, "deformation": True},
    )
    p = sample_params(base, 4, 0)
    _, warped = generate_sample(vol, p, base)
    off = SynthConfig(**{**base.to_dict(), "deformation": False})
    _, straight = generate_sample(vol, sample_params(off, 4, 0), off)  # same draws, deformation off
    differ = (warped.values != straight.values).mean()
    assert 0.01 < differ < 0.6
    assert set(np.unique(warped.values)) <= set(np.unique(lab))


# ----------------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_sample_any_chunking_or_scheduler():
    lab = label_array()
    cfg = SynthConfig(crop=(24, 22, 20), spacing_mm=1.0, max_shift_mm=1.5)
    p = sample_params(cfg, 3, 1)
    with dask.config.set(scheduler="synchronous"):
        ref_img, ref_lab = generate_sample(label_volume(lab), p, cfg)
    for chunks in CHUNKINGS[1:]:
        for scheduler in ("threads", "synchronous"):
            with dask.config.set(scheduler=scheduler):
                img, out = generate_sample(label_volume(lab, chunks), p, cfg)
            np.testing.assert_array_equal(out.values, ref_lab.values)
            np.testing.assert_array_equal(img.values, ref_img.values)
            np.testing.assert_array_equal(affine_of(img), affine_of(ref_img))
    other_img, other_lab = generate_sample(label_volume(lab), sample_params(cfg, 4, 1), cfg)
    assert not np.array_equal(other_img.values, ref_img.values)
    assert not np.array_equal(other_lab.values, ref_lab.values)
    # the iterator yields the same samples, index by index
    pairs = list(iter_samples(label_volume(lab, (9, 9, 9)), 2, seed=3, config=cfg))
    np.testing.assert_array_equal(pairs[1][0], ref_img.values)
    np.testing.assert_array_equal(pairs[1][1], ref_lab.values)
    assert not np.array_equal(pairs[0][0], pairs[1][0])


# ----------------------------------------------------------------------------------------------------------------
# intensities


def test_per_label_means_and_stds_match_the_drawn_ones():
    lab = np.zeros((40, 40, 40), np.uint16)
    lab[:, :20], lab[:, 20:], lab[10:30, 10:30, 10:30] = 3, 7, 801
    cfg = SynthConfig(crop=(40, 40, 40), spacing_mm=1.0, center="volume", level=0, **{**AFFINE_ONLY, "affine": False})
    vol = label_volume(lab, (16, 16, 16), affine=np.eye(4))
    for index in range(3):
        img, out = generate_sample(vol, sample_params(cfg, 9, index), cfg)
        np.testing.assert_array_equal(out.values, lab)
        drawn = img.attrs["synth"]["intensities"]
        assert sorted(int(k) for k in drawn) == [3, 7, 801]
        for code in (3, 7, 801):
            mean, std = label_intensity(9, index, code, cfg)
            assert drawn[str(code)] == [mean, std] and 0 <= mean <= 255 and 0 <= std <= 35
            v = img.values[lab == code].astype(np.float64)
            assert abs(v.mean() - mean) < 5 * std / math.sqrt(v.size) + 1e-3
            assert abs(v.std() - std) < 0.05 * std + 1e-3


def test_without_augmentation_the_image_is_a_function_of_the_labels():
    lab = label_array()
    other = lab.copy()
    other[20:30, 5:15, 5:15] = 4  # same map except one region
    cfg = SynthConfig(crop=(24, 24, 24), spacing_mm=1.0, level=0).without_augmentation()
    p = sample_params(cfg, 6, 2)
    img_a, lab_a = generate_sample(label_volume(lab, (7, 9, 5)), p, cfg)
    img_a2, _ = generate_sample(label_volume(lab, (16, 8, 30)), p, cfg)
    img_b, lab_b = generate_sample(label_volume(other), p, cfg)
    np.testing.assert_array_equal(img_a.values, img_a2.values)
    same = lab_a.values == lab_b.values
    assert (~same).any() and same.any()
    np.testing.assert_array_equal(img_a.values[same], img_b.values[same])
    # no noise: exactly mean[label] everywhere
    flat = SynthConfig(**{**cfg.to_dict(), "intensity_noise": False})
    img, out = generate_sample(label_volume(lab), p, flat)
    lut = {c: np.float32(label_intensity(6, 2, c, flat)[0]) for c in np.unique(out.values).tolist()}
    np.testing.assert_array_equal(img.values, np.vectorize(lut.get, otypes=[np.float32])(out.values))


def test_bias_gamma_and_acquisition_against_references():
    lab = label_array()
    vol = label_volume(lab, (10, 10, 10))
    base = SynthConfig(
        crop=(26, 24, 22), spacing_mm=1.0, level=0, bias_spacing_mm=10.0, **{**AFFINE_ONLY, "affine": False}
    )
    full = SynthConfig(**{**base.to_dict(), "bias": True, "gamma": True, "acquisition": True})
    # a draw with a clearly visible bias field and a clearly coarser acquisition
    i = next(
        i
        for i in range(100)
        if sample_params(full, 8, i).bias_std > 0.3
        and sample_params(full, 8, i).acq_spacing_mm > 3
        and abs(math.log(sample_params(full, 8, i).gamma)) > 0.1
    )
    p_all = sample_params(full, 8, i)
    plain, _ = generate_sample(vol, sample_params(base, 8, i), base)
    plain = plain.values.astype(np.float64)

    # bias: a smooth positive multiplicative field (exp of a cubic B-spline)
    cfg = SynthConfig(**{**base.to_dict(), "bias": True})
    biased, _ = generate_sample(vol, sample_params(cfg, 8, i), cfg)
    ratio = biased.values / plain
    log = np.log(ratio)
    assert ratio.min() > 0 and log.std() > 0.03
    assert np.abs(np.diff(log, 2, axis=0)).max() < 0.05 * (log.max() - log.min()) + 1e-6

    # gamma: 255 (I / 255) ** gamma of the image without it
    cfg = SynthConfig(**{**base.to_dict(), "gamma": True})
    gam, _ = generate_sample(vol, sample_params(cfg, 8, i), cfg)
    np.testing.assert_allclose(gam.values, 255 * (np.maximum(plain, 0) / 255) ** p_all.gamma, rtol=1e-4, atol=1e-3)

    # acquisition: Gaussian blur (sigma 0.75 r) along one axis, linear resampling every r voxels and back
    cfg = SynthConfig(**{**base.to_dict(), "acquisition": True})
    acq, _ = generate_sample(vol, sample_params(cfg, 8, i), cfg)
    ax, r = p_all.acq_axis, p_all.acq_spacing_mm / cfg.spacing_mm
    assert r > 1
    blurred = ndi.gaussian_filter1d(plain, 0.75 * r, axis=ax, mode="nearest")
    n = plain.shape[ax]
    k = int(math.floor((n - 1) / r)) + 1
    t = ((n - 1) - (k - 1) * r) / 2
    lines = np.moveaxis(blurred, ax, -1).reshape(-1, n)
    ref = np.array(
        [
            np.interp((np.arange(n) - t) / r, np.arange(k), np.interp(t + r * np.arange(k), np.arange(n), line))
            for line in lines
        ]
    )
    ref = np.moveaxis(ref.reshape(np.moveaxis(blurred, ax, -1).shape), -1, ax)
    np.testing.assert_allclose(acq.values, ref, rtol=1e-4, atol=1e-3)

    # everything on, normalised: finite, in [0, 1]
    cfg = SynthConfig(crop=(20, 20, 20), normalize=True)
    img, _ = generate_sample(vol, sample_params(cfg, 8, 1), cfg)
    assert np.isfinite(img.values).all() and img.values.min() == 0 and img.values.max() == 1


# ----------------------------------------------------------------------------------------------------------------
# laziness on a 0.1 mm map


def test_a_sample_over_a_lazy_01mm_map_reads_only_a_few_chunks():
    from helm_dask.phantom import phantom, phantom_geometry

    ph = phantom(0.1, chunks=64)
    hyp, tissue = ph["hypothalamus"], ph["truth_tissue"]
    computed = []

    def spy(block, block_info=None):  # records every chunk of the label map that gets computed
        computed.append(tuple(block_info[0]["chunk-location"]))
        return block

    merged = da.where(hyp.data > 0, hyp.data, tissue.data.astype(np.uint16))
    labels = make_volume(da.map_blocks(spy, merged, dtype=np.uint16), affine_of(hyp), kind="labels")
    total = int(np.prod(merged.numblocks))  # whole hemisphere: 2 gigavoxels in 8190 chunks, never stored
    assert total == 30 * 13 * 21
    centre = tuple(phantom_geometry(0.1)["hypothalamus_centroid_mm"])
    for spacing, crop, level in ((0.3, (16, 16, 16), 0), (1.0, (12, 12, 12), 2)):
        computed.clear()
        cfg = SynthConfig(crop=crop, spacing_mm=spacing, center=centre)
        p = sample_params(cfg, 0, 0)
        plan = plan_sample(labels, p, cfg)
        assert plan.level == level and not computed  # planning computes nothing
        tasks, _, _ = gather_tasks(plan)
        assert int(np.prod(plan.box.numblocks)) <= 30
        img, out = generate_sample(labels, p, cfg)
        # each needed chunk computed exactly once, one gather task per chunk, nothing else
        assert len(computed) == len(set(computed)) == len(tasks) <= int(np.prod(plan.box.numblocks))
        assert {803, 804, 805} <= set(np.unique(out.values).tolist())
        assert np.isfinite(img.values).all()


def test_hypothalamus_centroid_is_chunking_independent():
    from helm_dask.phantom import phantom, phantom_geometry

    ph = phantom(1.0, chunks=(50, 30, 40))
    lab = ph["hypothalamus"].values
    ref = np.argwhere(np.isin(lab, np.arange(801, 811))).mean(axis=0)
    ref = affine_of(ph["hypothalamus"]) @ np.r_[ref, 1.0]
    got = []
    for chunks in ((50, 30, 40), (17, 82, 9), (96, 5, 65)):
        src = LabelSource.open(
            make_volume(ph["hypothalamus"].data.rechunk(chunks), affine_of(ph["hypothalamus"]), kind="labels")
        )
        got.append(src.centroid_mm())
        np.testing.assert_allclose(got[-1], ref[:3], atol=1e-12)
        np.testing.assert_array_equal(got[-1], got[0])  # integer sums: bit-identical
    # and close to the phantom's true (continuous) centroid
    assert np.linalg.norm(got[0] - phantom_geometry(1.0)["hypothalamus_centroid_mm"]) < 0.5


# ----------------------------------------------------------------------------------------------------------------
# files and command line


def test_write_samples_from_nifti_and_the_cli(tmp_path):
    from helm_dask import cli

    lab = label_array()
    img = nib.Nifti1Image(lab, SRC_AFFINE)
    src = tmp_path / "labels.nii.gz"
    nib.save(img, src)
    cfg = SynthConfig(crop=(12, 12, 12), spacing_mm=1.2)
    recs = write_samples(src, tmp_path / "out", 2, seed=4, config=cfg, zarr=True)
    assert [r["index"] for r in recs] == [0, 1]
    vol = label_volume(lab, (10, 10, 10))
    for i in range(2):
        e_img, e_lab = generate_sample(vol, sample_params(cfg, 4, i), cfg)
        got = nib.load(tmp_path / "out" / f"sample_{i:04d}_image.nii.gz")
        np.testing.assert_array_equal(np.asarray(got.dataobj), e_img.values)
        np.testing.assert_allclose(got.affine, affine_of(e_img), atol=1e-6)
        got = nib.load(tmp_path / "out" / f"sample_{i:04d}_labels.nii.gz")
        np.testing.assert_array_equal(np.asarray(got.dataobj), e_lab.values)
        assert (tmp_path / "out" / f"sample_{i:04d}_labels.zarr").is_dir()
    doc = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert doc["seed"] == 4 and SampleParams.from_dict(doc["samples"][1]["params"]) == sample_params(cfg, 4, 1)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("helm-synth-")]  # temp store gone
    with pytest.raises(HelmError, match="already exists"):
        write_samples(src, tmp_path / "out", 1, seed=4, config=cfg)

    # the sub-command, hooked the way cli.build_parser will do it
    parser = argparse.ArgumentParser(prog="helm-dask")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true")
    common.add_argument("--debug", action="store_true")
    add_synth_parser(parser.add_subparsers(dest="command"), [common], cli._add_compute_options)
    args = parser.parse_args(
        [
            "synth",
            str(src),
            "--n",
            "1",
            "--seed",
            "4",
            "--start",
            "1",
            "--out",
            str(tmp_path / "cli"),
            "--spacing",
            "1.2",
            "--crop",
            "12",
            "12",
            "12",
            "--scheduler",
            "synchronous",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    got = nib.load(tmp_path / "cli" / "sample_0001_image.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(got.dataobj), generate_sample(vol, sample_params(cfg, 4, 1), cfg)[0].values
    )
    args = parser.parse_args(
        [
            "synth",
            str(src),
            "--out",
            str(tmp_path / "x"),
            "--no-augmentation",
            "--center-mm",
            "1",
            "2",
            "3",
            "--level",
            "0",
        ]
    )
    from helm_dask.cli.synth import config_from_args

    c = config_from_args(args)
    assert (c.affine, c.deformation, c.bias, c.gamma, c.acquisition, c.center, c.level) == (
        False,
        False,
        False,
        False,
        False,
        (1.0, 2.0, 3.0),
        0,
    )


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(crop=(10, 0, 10)), "crop"),
        (dict(crop=(10, 10)), "crop"),
        (dict(spacing_mm=-1), "spacing_mm"),
        (dict(scaling=(1.2, 0.8)), "scaling"),
        (dict(center="brainstem"), "center"),
        (dict(level=-1), "level"),
        (dict(std_range=(-1, 3)), "std_range"),
        (dict(rotation_deg=float("nan")), "rotation_deg"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(HelmError, match=match):
        SynthConfig(**kw)


def test_bad_inputs(tmp_path):
    cfg = SynthConfig(crop=(8, 8, 8))
    p = sample_params(cfg, 0, 0)
    no_hyp = np.ones((20, 20, 20), np.uint16)
    with pytest.raises(HelmError, match="no hypothalamus labels"):
        generate_sample(label_volume(no_hyp), p, cfg)
    fractional = label_array().astype(np.float32)
    fractional[20, 18, 15] = 801.5
    with pytest.raises(HelmError, match="non-integer"):
        generate_sample(
            label_volume(fractional),
            p,
            SynthConfig(crop=(8, 8, 8), center=(*(SRC_AFFINE @ [20, 18, 15, 1])[:3],), **AFFINE_ONLY, affine=False),
        )
    big = label_array().astype(np.int32)
    big[big == 801] = 70000
    with pytest.raises(HelmError, match="outside 0..65535"):
        generate_sample(label_volume(big), p, SynthConfig(crop=(8, 8, 8), center="volume"))
    with pytest.raises(HelmError, match="3-D"):
        LabelSource.open(make_volume(da.zeros((4, 4, 4, 2), np.uint16), np.eye(4)))
    with pytest.raises(HelmError, match="not found"):
        LabelSource.open(tmp_path / "missing.nii.gz")
    with pytest.raises(HelmError, match="neither"):
        LabelSource.open(tmp_path / "labels.txt")
    from helm_dask.io import save_volume

    store = save_volume(make_volume(da.ones((8, 8, 8), np.float32, chunks=4), np.eye(4)), tmp_path / "img.zarr")
    with pytest.raises(HelmError, match="not labels"):
        LabelSource.open(store)
    with pytest.raises(HelmError, match="no level 9"):
        generate_sample(label_volume(label_array()), p, SynthConfig(crop=(8, 8, 8), level=9))
    with pytest.raises(HelmError, match="seed"):
        sample_params(cfg, -1, 0)
    with pytest.raises(HelmError, match="n must be"):
        next(iter_samples(label_volume(label_array()), -2, 0, cfg))
