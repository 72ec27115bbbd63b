"""The in-memory re-implementation of the published mirroring method in ``bench/reference.py`` (issue 21): its
cost function on toys whose cost is known by hand, its whole-brain mesh on a toy hemisphere (the mirror half is
the hemisphere's exact mirror image), and its plane fit on a small geometric phantom against the phantom's true
medial plane and against helm-dask's own fit.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from bench_module import load  # tests/ helper module

from helm_dask.mirror import fit_mirror, mirror_cost
from helm_dask.phantom import phantom, phantom_geometry
from helm_dask.volume import make_volume


@pytest.fixture(scope="module")
def ref():
    return load("reference")


def _plane(matrix) -> tuple[np.ndarray, float]:
    row = np.asarray(matrix, dtype=float)[0]
    return row[:3] / np.linalg.norm(row[:3]), float(row[3]) / np.linalg.norm(row[:3])


def test_published_cost_on_symmetric_toy(ref):
    # a 5 x 3 x 3 block of voxels with world x = i - 2 in -2..2, symmetric about the centre (0, 1, 1) mm
    i, j, k = (g.ravel() for g in np.meshgrid(np.arange(5), np.arange(3), np.arange(3), indexing="ij"))
    aff = np.eye(4)
    aff[0, 3] = -2.0
    alpha = 0.01
    args = (aff, 0, 1, 1, i, j, k, alpha)
    # x > 0: x = 1 and 2 on 9 voxels each -> 27; sum of all x = 0
    assert ref.published_cost([0] * 6, *args) == pytest.approx(27.0, abs=1e-12)
    # shifted by 2 mm: x in 0..4 -> sum of positives = sum of all = 9 * (1 + 2 + 3 + 4) = 90
    assert ref.published_cost([0, 0, 0, 2, 0, 0], *args) == pytest.approx(90 - alpha * 90, abs=1e-9)
    # 180 degrees about z through the centre maps the block onto itself: the same cost as no motion
    assert ref.published_cost([0, 0, 180, 0, 0, 0], *args) == pytest.approx(27.0, abs=1e-9)
    # and it is the same C(T) as helm-dask's mirror_cost on the world points
    ras, aff_new = ref.published_transform([3, -4, 7, 0.5, 1, -2], *args[:7])
    pts = (aff @ np.stack([i, j, k, np.ones(len(i))]))[:3].T
    expected = mirror_cost(pts, aff_new @ np.linalg.inv(aff), alpha)
    assert ref.published_cost([3, -4, 7, 0.5, 1, -2], *args) == pytest.approx(expected, rel=1e-12)


def test_published_mesh_mirrors_the_hemisphere(ref):
    img = np.zeros((8, 5, 5), np.uint16)  # world x = i - 7: the hemisphere (i 2..6) at x -5..-1, zero border
    img[2:7, 1:4, 1:4] = 2
    img[5, 2, 2] = 9  # a structure code above k: raised by the map's maximum on the hemisphere's side
    aff = np.eye(4)
    aff[0, 3] = -7.0
    out, out_aff = ref.published_mesh(img, aff, 6, margin=2.0, res=1.0)
    assert out.shape == (14, 6, 6) and out_aff[0, 3] == -7.0  # x -7..6, y and z -1..4
    left, right = out[:8], out[8:]  # x -7..0 and 1..6
    assert sorted(np.unique(left).tolist()) == [0, 2, 18] and sorted(np.unique(right).tolist()) == [0, 2, 9]
    np.testing.assert_array_equal(right, np.where(left > 9, left - 9, left)[6::-1][:6])
    np.testing.assert_array_equal(left[2:7, 2:5, 2:5], np.where(img > 6, img + 9, img)[2:7, 1:4, 1:4])


def test_published_fit_finds_the_medial_plane(ref):
    # 1.5 mm geometric phantom, its true brain mask: the published fit against the truth and against helm-dask.
    # The published search (Nelder-Mead from zero, 500 iterations) does not always get there: on the same phantom
    # at 2 mm and 1.2 mm it stops at the iteration limit 5.7-5.9 degrees off (a property of the method, reported
    # in bench/README.md); at 1.5 mm it converges (0.002 degrees)
    spacing = 1.5
    vols = phantom(spacing, side="L", seed=0)
    mask = np.asarray(vols["truth_mask"].data.compute())
    aff = np.asarray(phantom_geometry(spacing, "L")["affine"], dtype=float)
    fit = ref.published_fit(mask, aff)
    assert fit["n_voxels"] == int(np.count_nonzero(mask))
    n_pub, d_pub = _plane(fit["matrix"])
    truth = phantom_geometry(spacing, "L")["medial_plane"]
    nt = np.asarray(truth["normal"], dtype=float)
    idx = np.argwhere(mask)
    pts = idx @ aff[:3, :3].T + aff[:3, 3]
    centre = pts.mean(axis=0)
    assert np.degrees(np.arccos(min(1.0, float(n_pub @ nt)))) < 1.0
    assert abs(float(n_pub @ centre + d_pub) - float(nt @ (centre - truth["point_mm"]))) < spacing
    tr = fit_mirror(make_volume(da.from_array(mask, chunks=32), aff, kind="mask"))
    n_helm, d_helm = _plane(tr.matrix)
    assert np.degrees(np.arccos(min(1.0, float(n_pub @ n_helm)))) < 0.5
    assert abs(float(n_pub @ centre + d_pub) - float(n_helm @ centre + d_helm)) < 0.25 * spacing
    # the cost the fit reports is its cost function's value at the plane it returns
    assert fit["fopt"] == pytest.approx(mirror_cost(pts, np.asarray(fit["matrix"]), ref.PUBLISHED_ALPHA), rel=1e-9)
