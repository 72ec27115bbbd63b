"""helm_dask.view: planes equal NumPy slicing, mm extents follow the affine, pyramid levels, bounded reads, colours."""

from __future__ import annotations

import sys

import dask.array as da
import numpy as np
import pytest
from dask.core import flatten

from helm_dask.errors import HelmError
from helm_dask.io import open_volume, save_volume
from helm_dask.labels import COLOURS, LabelTable, cluster_colour, freesurfer_table, write_lut
from helm_dask.view import (
    at_level,
    choose_level,
    crop_mm,
    histogram,
    label_centroid_mm,
    label_colormap,
    orthogonal_slices,
    plot_orthogonal,
    pyramid_levels,
    slice_browser,
)
from helm_dask.volume import affine_of, like, make_volume, voxel_to_world

SHAPE = (20, 16, 12)


def _rot(deg):
    a, b = np.deg2rad(deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(kind):
    a = np.eye(4)
    if kind == "ras":
        a[:3, :3] = np.diag([0.5, 0.7, 1.1])
        a[:3, 3] = [-4.0, 10.0, 3.0]
    elif kind == "las":  # axis-aligned with a negative x step: coords decrease along x
        a[:3, :3] = np.diag([-0.5, 0.7, 1.1])
        a[:3, 3] = [4.0, -10.0, 3.0]
    else:  # oblique and permuted (PLI-like): coords are mm along the voxel axes
        perm = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, -1]], dtype=float)
        a[:3, :3] = _rot((7.0, -4.0)) @ perm @ np.diag([0.5, 0.7, 1.1])
        a[:3, 3] = [12.0, -3.0, 40.0]
    return a


def _frame_coords(aff, shape):
    """The display frame's voxel-centre coordinates, computed here (independent of view.py): world mm along each
    axis for an axis-aligned affine (decreasing along a negative step), else mm from the first voxel centre.
    Not the volume's xarray coordinates, which are the OME placement (positive steps)."""
    m = aff[:3, :3]
    if np.allclose(m, np.diag(np.diag(m))):
        return tuple(aff[i, 3] + aff[i, i] * np.arange(shape[i]) for i in range(3))
    sp = np.sqrt((m**2).sum(axis=0))
    return tuple(sp[i] * np.arange(shape[i]) for i in range(3))


@pytest.fixture(scope="module")
def ref():
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def _edges(c):
    """Outer edges of the first and last voxel from voxel-centre coordinates (independent of view.py)."""
    step = c[1] - c[0]
    return (c[0] - step / 2, c[-1] + step / 2)


@pytest.mark.parametrize("chunks", [SHAPE, (7, 5, 4), (20, 3, 12)])
@pytest.mark.parametrize("kind", ["ras", "las", "oblique"])
def test_planes_equal_numpy_slicing_and_extents_follow_the_affine(ref, chunks, kind):
    aff = _affine(kind)
    vol = make_volume(da.from_array(ref, chunks=chunks), aff)
    point = voxel_to_world(aff, np.array([[5.3, 7.8, 2.6]]))[0]  # nearest voxel centre (5, 8, 3)
    s = orthogonal_slices(vol, point_mm=point)
    assert s.level == 0 and s.index == (5, 8, 3)
    np.testing.assert_array_equal(s["x"].data, ref[5, :, :])
    np.testing.assert_array_equal(s["y"].data, ref[:, 8, :])
    np.testing.assert_array_equal(s["z"].data, ref[:, :, 3])
    cx, cy, cz = _frame_coords(aff, SHAPE)
    assert s["x"].axes == ("y", "z") and s["y"].axes == ("x", "z") and s["z"].axes == ("x", "y")
    np.testing.assert_allclose(s["x"].extent_mm, _edges(cy) + _edges(cz), atol=1e-9)
    np.testing.assert_allclose(s["y"].extent_mm, _edges(cx) + _edges(cz), atol=1e-9)
    np.testing.assert_allclose(s["z"].extent_mm, _edges(cx) + _edges(cy), atol=1e-9)
    assert s["x"].position_mm == pytest.approx(cx[5]) and s["z"].position_mm == pytest.approx(cz[3])
    np.testing.assert_allclose(s["y"].coords_mm[0], cx, atol=1e-9)
    assert s.coords == ("voxel_mm" if kind == "oblique" else "world")

    # level 1 = stride 2 of an in-memory / lazy volume: voxel (6, 8, 4) -> level-1 voxel (3, 4, 2)
    s1 = orthogonal_slices(vol, point_mm=voxel_to_world(aff, np.array([[6.2, 7.9, 4.3]]))[0], level=1)
    assert s1.index == (3, 4, 2) and s1.source == "stride 2"
    np.testing.assert_array_equal(s1["x"].data, ref[6, ::2, ::2])
    np.testing.assert_array_equal(s1["y"].data, ref[::2, 8, ::2])
    np.testing.assert_array_equal(s1["z"].data, ref[::2, ::2, 4])
    np.testing.assert_allclose(s1["z"].extent_mm, _edges(cx[::2]) + _edges(cy[::2]), atol=1e-9)
    assert s1["y"].position_mm == pytest.approx(cy[8])


def test_radius_crops_around_the_point(ref):
    aff = _affine("ras")
    vol = make_volume(da.from_array(ref, chunks=(7, 5, 4)), aff)
    # spacing (0.5, 0.7, 1.1), radius 2 mm -> half-widths 4, 2.86, 1.82 voxels around voxel (10, 8, 6)
    s = orthogonal_slices(vol, point_mm=voxel_to_world(aff, np.array([[10, 8, 6]]))[0], radius_mm=2.0)
    # voxel centres within +-2 mm: x 6..14, y 6..10 (5.14..10.86), z 5..7 (4.18..7.82)
    np.testing.assert_array_equal(s["x"].data, ref[10, 6:11, 5:8])
    np.testing.assert_array_equal(s["z"].data, ref[6:15, 6:11, 6])
    cx, cy = vol.x.values, vol.y.values
    np.testing.assert_allclose(s["z"].extent_mm, _edges(cx[6:15]) + _edges(cy[6:11]), atol=1e-9)
    # near a border the crop is clipped to the volume
    s = orthogonal_slices(vol, point_mm=voxel_to_world(aff, np.array([[1, 0, 11]]))[0], radius_mm=2.0)
    np.testing.assert_array_equal(s["z"].data, ref[0:6, 0:3, 11])


@pytest.mark.parametrize("kind", ["ras", "las", "oblique"])
def test_crop_mm_is_numpy_slicing_with_a_shifted_affine(ref, kind):
    aff = _affine(kind)
    vol = make_volume(da.from_array(ref, chunks=(7, 5, 4)), aff, name="img")
    point = voxel_to_world(aff, np.array([[10.2, 8.0, 6.0]]))[0]
    small = crop_mm(vol, point, 2.0)
    # spacing (0.5, 0.7, 1.1): centres within +-2 mm -> x 6.2..14.2 -> 7..14, y 5.14..10.86 -> 6..10, z 5..7
    np.testing.assert_array_equal(small.values, ref[7:15, 6:11, 5:8])
    np.testing.assert_allclose(
        voxel_to_world(affine_of(small), np.array([[0, 0, 0], [3, 2, 1]])),
        voxel_to_world(aff, np.array([[7, 6, 5], [10, 8, 6]])),
        atol=1e-9,
    )
    assert small.attrs["kind"] == "image" and small.attrs["provenance"][-1]["stage"] == "view.crop_mm"
    clipped = crop_mm(vol, voxel_to_world(aff, np.array([[0.0, 15.0, 0.0]]))[0], 1.0)
    np.testing.assert_array_equal(clipped.values, ref[0:3, 14:16, 0:1])
    with pytest.raises(HelmError, match="no voxel"):
        crop_mm(vol, voxel_to_world(aff, np.array([[60.0, 0.0, 0.0]]))[0], 1.0)
    with pytest.raises(HelmError, match="radius_mm"):
        crop_mm(vol, point, -1)


@pytest.mark.parametrize("chunks", [SHAPE, (7, 5, 4), (3, 16, 5)])
def test_label_centroid_is_the_mean_voxel_centre_in_world_mm(chunks):
    lab = np.zeros(SHAPE, np.uint16)
    lab[4:12, 5:11, 2:9] = 801
    lab[6:9, 6:9, 4:7] = 250
    lab[15:18, 1:3, 10] = 803
    aff = _affine("oblique")
    vol = make_volume(da.from_array(lab, chunks=chunks), aff, kind="labels")
    for codes in (None, [801], [801, 803], [250]):
        hit = lab != 0 if codes is None else np.isin(lab, codes)
        expected = voxel_to_world(aff, np.argwhere(hit).astype(np.float64)).mean(axis=0)
        np.testing.assert_allclose(label_centroid_mm(vol, codes), expected, atol=1e-9)
    assert label_centroid_mm(vol, [805]) is None


def test_bad_inputs_raise_helm_errors(ref):
    vol = make_volume(da.from_array(ref), _affine("ras"))
    with pytest.raises(HelmError, match="outside"):
        orthogonal_slices(vol, point_mm=(100.0, 0.0, 0.0))
    with pytest.raises(HelmError, match="three finite"):
        orthogonal_slices(vol, point_mm=(1.0, 2.0))
    with pytest.raises(HelmError, match="4-D"):
        orthogonal_slices(make_volume(da.zeros((4, 4, 4, 2)), np.eye(4)))
    with pytest.raises(HelmError, match="helm-dask volume"):
        orthogonal_slices(ref)
    with pytest.raises(HelmError, match="level"):
        orthogonal_slices(vol, level=-1)
    with pytest.raises(HelmError, match="radius_mm"):
        orthogonal_slices(vol, radius_mm=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small image store with a 2-level pyramid (160 x 24 x 20 -> 80 x 12 x 10) and a mask store."""
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 20.0, (160, 24, 20)).astype(np.float32)
    msk = (rng.random((160, 24, 20)) > 0.4).astype(np.uint8)
    aff = np.diag([0.3, 0.4, 0.5, 1.0])
    aff[:3, 3] = [-20.0, 5.0, 1.0]
    d = tmp_path_factory.mktemp("view")
    p_img = save_volume(make_volume(da.from_array(img, chunks=32), aff), str(d / "img.zarr"), chunks=32)
    p_msk = save_volume(make_volume(da.from_array(msk, chunks=32), aff, kind="mask"), str(d / "msk.zarr"), chunks=32)
    return {"img": img, "msk": msk, "p_img": p_img, "p_msk": p_msk, "affine": aff}


def test_pyramid_levels_of_a_store_are_read_from_the_store(store):
    vol = open_volume(store["p_img"])
    levels = pyramid_levels(vol, extra=1)
    assert [lv["shape"] for lv in levels] == [(160, 24, 20), (80, 12, 10), (40, 6, 5)]
    assert [lv["source"] for lv in levels] == ["store level 0", "store level 1", "stride 2 of store level 1"]
    np.testing.assert_allclose(levels[1]["spacing_mm"], (0.6, 0.8, 1.0))
    lvl1 = open_volume(store["p_img"], level=1)
    # block means of the store's level 1 (not a stride of level 0)
    assert choose_level(vol, max_px=100) == 1
    s = orthogonal_slices(vol, max_px=100)
    assert s.level == 1 and s.source == "store level 1"
    ref1 = lvl1.values  # small test store
    i, j, k = s.index
    np.testing.assert_array_equal(s["x"].data, ref1[i])
    np.testing.assert_array_equal(s["z"].data, ref1[:, :, k])
    np.testing.assert_allclose(s["z"].extent_mm, _edges(lvl1.x.values) + _edges(lvl1.y.values), atol=1e-9)
    np.testing.assert_allclose(s.affine, affine_of(lvl1))
    # level 2 is a stride of the coarsest stored level
    s2 = orthogonal_slices(vol, max_px=50)
    assert s2.level == 2 and s2.source == "store level 1, stride 2"
    np.testing.assert_array_equal(s2["y"].data, ref1[::2, 2 * s2.index[1], ::2])
    # a volume opened at level 1 can still be shown at full resolution from its store
    s0 = orthogonal_slices(lvl1, level=0, point_mm=s.point_mm)
    np.testing.assert_array_equal(s0["x"].data, store["img"][s0.index[0]])
    np.testing.assert_array_equal(at_level(vol, 1).values, ref1)
    np.testing.assert_array_equal(at_level(vol, 2).values, ref1[::2, ::2, ::2])


def test_a_derived_volume_does_not_borrow_its_sources_pyramid(store):
    vol = open_volume(store["p_img"])
    doubled = like(vol, vol.data * 2)  # same grid, same attrs["store"], other data
    assert doubled.attrs["store"] == store["p_img"]
    assert [lv["source"] for lv in pyramid_levels(doubled, extra=1)] == ["full resolution", "stride 2"]
    np.testing.assert_array_equal(at_level(doubled, 1).values, (store["img"] * 2)[::2, ::2, ::2])
    s = orthogonal_slices(doubled, level=1)
    assert s.source == "stride 2"


def test_a_big_lazy_volume_is_shown_at_a_coarse_level_computing_only_the_chunks_of_each_plane():
    from helm_dask.phantom import phantom

    vol = phantom(0.1)["scan"]  # 1920 x 820 x 1300, 1155 lazy chunks of 128^3, never computed
    s = orthogonal_slices(vol, compute=False)
    assert s.level == 2 and s.source == "stride 4" and s.shape == (480, 205, 325)
    nblocks = [len(c) for c in vol.data.chunks]
    assert np.prod(nblocks) == 1155
    for d, fixed in enumerate("xyz"):
        plane = s[fixed].data
        assert plane.shape == tuple(n for i, n in enumerate(s.shape) if i != d)
        graph = plane.__dask_graph__().cull(set(flatten(plane.__dask_keys__())))
        made = {k for k in graph.to_dict() if isinstance(k, tuple) and str(k[0]).startswith("phantom-scan")}
        # exactly the chunks that contain the plane (full-res index 4 * index): one along the fixed axis
        a, b = (i for i in range(3) if i != d)
        assert len(made) == nblocks[a] * nblocks[b]
        full_index = 4 * s.index[d]
        bounds = np.cumsum((0,) + vol.data.chunks[d])
        block = int(np.searchsorted(bounds, full_index, side="right") - 1)
        assert {k[1 + d] for k in made} == {block}


def test_label_colormap_gives_the_lut_colours(tmp_path):
    table = freesurfer_table()
    cmap, norm = label_colormap(table)
    for code in [801, 802, 803, 804, 805, 806, 810, 250]:
        np.testing.assert_allclose(cmap(norm(code)), (*np.array(COLOURS[code][:3]) / 255.0, 1.0))
    assert cmap(norm(0))[3] == 0.0  # background transparent
    cmap, norm = label_colormap([0, 1, 2, 3, 801], background_alpha=1.0)
    for j in (1, 2, 3):
        np.testing.assert_allclose(cmap(norm(j))[:3], np.array(cluster_colour(j, 3)[:3]) / 255.0)
    assert cmap(norm(0))[3] == 1.0 and cmap.codes == [0, 1, 2, 3, 801]
    # a LUT file (the lut.txt next to the label maps), with its k-means cluster entries
    lut = write_lut(tmp_path / "lut.txt", ks=(6,))
    cmap, norm = label_colormap([0, 2, 805], table=lut)
    np.testing.assert_allclose(cmap(norm(805))[:3], np.array(COLOURS[805][:3]) / 255.0)
    np.testing.assert_allclose(cmap(norm(2))[:3], np.array(cluster_colour(2, 6)[:3]) / 255.0)
    # a renumbering table: our 801 is drawn in the colour of its output code
    t = LabelTable("demo", {0: ("Unknown", (0, 0, 0, 0)), 11: ("hyp-ai", (10, 20, 30, 0))}, {801: 11})
    cmap, norm = label_colormap([801, 11], table=t)
    np.testing.assert_allclose(cmap(norm(801))[:3], np.array([10, 20, 30]) / 255.0)
    with pytest.raises(HelmError, match="integers"):
        label_colormap([1.5, 2])


@pytest.mark.parametrize("kind", ["ras", "oblique"])
def test_plot_orthogonal_draws_overlay_outline_and_world_plane(ref, kind):
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

    aff = _affine(kind)
    vol = make_volume(da.from_array(ref, chunks=(7, 5, 4)), aff, name="img")
    lab = np.zeros(SHAPE, np.uint16)
    lab[4:12, 5:11, 2:9] = 801
    lab[6:9, 6:9, 4:7] = 250
    labels = make_volume(da.from_array(lab, chunks=5), aff, kind="labels")
    mask = make_volume(da.from_array((ref > 0.3).astype(np.uint8), chunks=6), aff, kind="mask")
    point = voxel_to_world(aff, np.array([[7.0, 8.0, 5.0]]))[0]
    normal = np.array([0.3, 1.0, 0.2])
    fig = plot_orthogonal(
        vol,
        overlay=labels,
        contour=[mask],
        point_mm=point,
        planes=[(point, normal)],
        contour_labels=["mask"],
        title="t",
    )
    assert isinstance(fig, Figure)
    axes = fig.axes[:3]
    expected = {"x": lab[7, :, :], "y": lab[:, 8, :], "z": lab[:, :, 5]}
    base = {"x": ref[7, :, :], "y": ref[:, 8, :], "z": ref[:, :, 5]}
    for ax, fixed in zip(axes, "xyz"):
        images = [c for c in ax.get_children() if isinstance(c, AxesImage)]
        assert len(images) == 2
        np.testing.assert_array_equal(np.asarray(images[0].get_array()), base[fixed].T)
        np.testing.assert_array_equal(np.asarray(images[1].get_array()), expected[fixed].T)
        assert len(ax.collections) >= 1  # the mask outline
        # the dashed plane line: its points, mapped back to world mm, lie on the plane
        line = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"][0]
        xa, xb = line.get_xdata(), line.get_ydata()
        d = "xyz".index(fixed)
        a, b = (i for i in range(3) if i != d)
        s = orthogonal_slices(vol, point_mm=point)
        mm = np.zeros((len(xa), 3))
        mm[:, a], mm[:, b], mm[:, d] = xa, xb, s[fixed].position_mm
        if kind == "oblique":
            u = mm / np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        else:
            u = (mm - aff[:3, 3]) / np.diag(aff)[:3]
        world = voxel_to_world(aff, u)
        np.testing.assert_allclose(world @ normal, point @ normal, atol=1e-9)
    # an overlay on a grid whose axes are not parallel is refused
    other = make_volume(da.from_array(lab, chunks=5), _affine("las" if kind == "ras" else "ras"), kind="labels")
    with pytest.raises(HelmError, match="parallel"):
        plot_orthogonal(vol, overlay=other)


@pytest.mark.parametrize("chunks", [SHAPE, (7, 5, 4)])
def test_histogram_matches_numpy(ref, chunks):
    mask_np = ref > 0.35
    vol = make_volume(da.from_array(ref, chunks=chunks), np.eye(4))
    mask = make_volume(da.from_array(mask_np.astype(np.uint8), chunks=(5, 5, 5)), np.eye(4), kind="mask")
    counts, edges = histogram(vol, mask, bins=17, level=0)
    vals = ref[mask_np]
    np.testing.assert_allclose(edges[[0, -1]], [vals.min(), vals.max()])
    np.testing.assert_array_equal(counts, np.histogram(vals, bins=edges)[0])
    assert counts.sum() == mask_np.sum() and counts.dtype == np.int64
    counts, edges = histogram(vol, bins=np.linspace(0.2, 0.8, 7))
    np.testing.assert_array_equal(counts, np.histogram(ref, bins=np.linspace(0.2, 0.8, 7))[0])
    # a coarser level is a stride of the data for a volume that is not read from a store
    counts, edges = histogram(vol, mask, bins=9, level=1)
    vals1 = ref[::2, ::2, ::2][mask_np[::2, ::2, ::2]]
    np.testing.assert_array_equal(counts, np.histogram(vals1, bins=edges)[0])


def test_histogram_bins_are_numpys_at_the_edges_and_nan_is_not_counted():
    vals = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, -1.0, 5.0, np.nan] * 4, dtype=np.float32)
    vol = make_volume(da.from_array(vals.reshape(6, 4, 2), chunks=(4, 3, 1)), np.eye(4))
    for bins in (4, np.array([0.0, 1.0, 1.5, 4.0])):
        counts, edges = histogram(vol, bins=bins, range=(0.0, 4.0))
        np.testing.assert_array_equal(counts, np.histogram(vals[np.isfinite(vals)], bins=edges)[0])
    assert counts.tolist() == [4 * 2, 4 * 1, 4 * 6]  # 4.0 falls in the last, closed bin


def test_histogram_reads_a_coarse_level_of_a_store(store):
    vol, mask = open_volume(store["p_img"]), open_volume(store["p_msk"])
    assert choose_level(vol, max_px=None, max_voxels=10_000) == 1
    counts, edges = histogram(vol, mask, bins=32, max_voxels=10_000)
    v1, m1 = open_volume(store["p_img"], level=1).values, open_volume(store["p_msk"], level=1).values > 0
    np.testing.assert_array_equal(counts, np.histogram(v1[m1], bins=edges)[0])
    with pytest.raises(HelmError, match="empty"):
        histogram(vol, like(mask, mask.data * 0))
    with pytest.raises(HelmError, match="grid"):
        histogram(vol, make_volume(da.zeros((10, 10, 10), dtype=np.uint8), np.eye(4), kind="mask"))
    with pytest.raises(HelmError, match="bins"):
        histogram(vol, bins=0)


def test_slice_browser_without_and_with_ipywidgets(ref, monkeypatch):
    vol = make_volume(da.from_array(ref, chunks=(7, 5, 4)), _affine("ras"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ipywidgets", None)  # import fails as if it were not installed
        msg = slice_browser(vol)
        assert isinstance(msg, str) and "pip install ipywidgets" in msg
    pytest.importorskip("ipywidgets")
    from matplotlib.image import AxesImage

    w = slice_browser(vol)
    plane_w, index_w = w.children[0].children
    image = w.children[1]
    assert plane_w.value == "z" and index_w.value == SHAPE[2] // 2 and index_w.max == SHAPE[2] - 1

    def shown():
        ax = w.figure.axes[0]
        return np.asarray([c for c in ax.get_children() if isinstance(c, AxesImage)][0].get_array())

    np.testing.assert_array_equal(shown(), ref[:, :, SHAPE[2] // 2].T)
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n"
    plane_w.value = "x"
    assert index_w.max == SHAPE[0] - 1
    np.testing.assert_array_equal(shown(), ref[SHAPE[2] // 2, :, :].T)  # redrawn: plane x, the index kept (6)
    index_w.value = 13
    np.testing.assert_array_equal(shown(), ref[13, :, :].T)


def test_plot_histogram_numbers_the_centroids_in_the_cluster_colours():
    from helm_dask.draw import cluster_rgb
    from helm_dask.view import plot_histogram

    fig = plot_histogram([0, 5, 400, 30], [0.0, 1.0, 2.0, 3.0, 4.0], centroids=[1.5, 3.5], thresholds=[2.5])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(0.7)  # empty bins stay visible
    solid = [ln for ln in ax.get_lines() if ln.get_linewidth() > 2]
    assert [ln.get_xdata()[0] for ln in solid] == [1.5, 3.5]
    for j, ln in enumerate(solid, 1):
        np.testing.assert_allclose(ln.get_color(), cluster_rgb(j, 2))
    assert [t.get_text() for t in ax.texts] == ["1", "2"]
    assert any(ln.get_linestyle() == ":" for ln in ax.get_lines())  # the threshold
    # a second histogram on the same axes (as the notebooks compare before / after)
    plot_histogram([1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0], ax=ax, label="other")
    assert len(fig.axes) == 1 and len(ax.collections) == 2


def test_label_colormap_cluster_styles_and_legend():
    from helm_dask.draw import cluster_rgb, label_legend

    codes = [0, 1, 2, 3, 4, 801]
    grey, gnorm = label_colormap(codes, n_clusters=6)
    viridis, vnorm = label_colormap(codes, n_clusters=4, clusters="viridis")
    hidden, hnorm = label_colormap(codes, n_clusters=4, clusters="none")
    np.testing.assert_allclose(grey(gnorm(2))[:3], np.array(cluster_colour(2, 6)[:3]) / 255.0)
    for j in (1, 4):
        np.testing.assert_allclose(viridis(vnorm(j))[:3], cluster_rgb(j, 4))
        assert hidden(hnorm(j))[3] == 0.0
    for cmap, norm in ((grey, gnorm), (viridis, vnorm), (hidden, hnorm)):  # labels keep the table's colours
        np.testing.assert_allclose(cmap(norm(801)), (*np.array(COLOURS[801][:3]) / 255.0, 1.0))
    with pytest.raises(HelmError, match="clusters"):
        label_colormap(codes, clusters="rainbow")
    items = label_legend([801, 250], n_clusters=4, clusters="viridis")
    assert [t for t, _ in items] == ["801 L anterior-inferior", "250 fornix"] + [
        "cluster 1 (darkest)",
        "cluster 2",
        "cluster 3",
        "cluster 4 (brightest)",
    ]
    np.testing.assert_allclose(items[-1][1], cluster_rgb(4, 4))
    assert label_legend([801], both_sides=True)[0][0] == "anterior-inferior (801 L / 806 R)"


def test_plot_orthogonal_veil_and_fixed_overlay_window(ref):
    from matplotlib.image import AxesImage

    aff = _affine("ras")
    vol = make_volume(da.from_array(ref, chunks=(7, 5, 4)), aff, name="img")
    field = make_volume(da.from_array(ref * 0.2 + 0.9, chunks=5), aff, name="bias")
    inside = np.zeros(SHAPE, np.uint8)
    inside[3:15, 2:14, 2:10] = 1
    mask = make_volume(da.from_array(inside, chunks=6), aff, kind="mask")
    point = voxel_to_world(aff, np.array([[7.0, 8.0, 5.0]]))[0]
    fig = plot_orthogonal(
        vol, overlay=field, overlay_vmin=0.8, overlay_vmax=1.2, overlay_alpha=1.0, veil=mask, point_mm=point
    )
    expected = {"x": inside[7, :, :], "y": inside[:, 8, :], "z": inside[:, :, 5]}
    for ax, fixed in zip(fig.axes[:3], "xyz"):
        images = [c for c in ax.get_children() if isinstance(c, AxesImage)]
        assert len(images) == 3  # image, field, veil
        assert images[1].get_clim() == (0.8, 1.2)
        veil = np.asarray(images[2].get_array())
        np.testing.assert_array_equal(veil[..., 3], (expected[fixed] == 0).T.astype(np.float32))
    assert fig.axes[-1].get_ylabel() == "bias"  # the colour bar, named after the overlay
