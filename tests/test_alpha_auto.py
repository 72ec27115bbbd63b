"""``--alpha auto``: the mirror plane refitted over a log grid of alpha, the smallest alpha whose plane leaves the
95th percentile of the medial gap within ``--max-gap-mm`` chosen (else the smallest gap); checked against
hemispheres whose medial gaps are known in closed form, and on the geometric phantom's known medial face."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest

from helm_dask import orient
from helm_dask import phantom as phantom_mod
from helm_dask.errors import HelmError
from helm_dask.mirror import MirrorTransform, fit_mirror
from helm_dask.mirror.fit import AUTO_ALPHAS
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams
from helm_dask.pipeline.options import run_option_actions
from helm_dask.pipeline.params import check_params
from helm_dask.pipeline.steps import Run, _mirror_params
from helm_dask.volume import make_volume

S = 0.5  # mm
I0 = 20  # the main medial face: voxel layer i = I0
BUMP = 4  # a BUMP x BUMP patch of voxel columns stands out of the face


def _hemisphere(depth_vox: int):
    """A half ellipsoid (i <= I0; semi-axes 12, 25, 25 voxels) whose flat face has a small bump standing
    ``depth_vox`` voxels out of it. Returns the mask volume, its voxel count and the bump's voxel columns."""
    shape = (I0 + depth_vox + 4, 60, 60)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    m = (((i - I0) / 12.0) ** 2 + ((j - 30) / 25.0) ** 2 + ((k - 30) / 25.0) ** 2 <= 1.0) & (i <= I0)
    m[I0 + 1 : I0 + depth_vox + 1, 28 : 28 + BUMP, 28 : 28 + BUMP] = True
    vol = make_volume(da.from_array(m.astype(np.uint8), chunks=16), np.diag([S, S, S, 1.0]), kind="mask")
    return vol, int(m.sum()), BUMP * BUMP


def _expected(count: int, p: int, depth: int) -> tuple[list[float], list[float]]:
    """Closed form with the plane's normal held at +x: the m-th largest x (m = floor(alpha n) + 1, the fit's
    order statistic) lies ``L = (m - 1) // p`` layers below the bump's tip (p voxels per layer) until it reaches
    the face; every footprint column but the bump's (< 5% of them) then has the gap ``(depth - L) S``, and
    ``p L`` voxels are across."""
    gaps, fracs = [], []
    for a in AUTO_ALPHAS:
        m = min(count, int(math.floor(a * count)) + 1)
        layers = min((m - 1) // p, depth)
        gaps.append((depth - layers) * S)
        fracs.append(p * layers / count)
    return gaps, fracs


@pytest.mark.parametrize(
    ("depth", "max_gap", "chosen"),
    [(6, 1.0, 1e-2), (6, 2.0, 3.16e-3), (6, 5.0, 1e-5), (20, 1.0, 1e-2)],
)
def test_auto_gap_and_choice_on_a_placed_plane(depth, max_gap, chosen):
    vol, count, p = _hemisphere(depth)
    tr = fit_mirror(vol, alpha="auto", max_gap_mm=max_gap, grid_deg=(0.0, 1.0), refine=False)
    search = tr.alpha_search
    gaps, fracs = _expected(count, p, depth)
    assert search["alphas"] == list(AUTO_ALPHAS) and search["gap_quantile"] == 0.95
    assert np.allclose(search["gap_mm"], gaps, atol=1e-9, rtol=0)
    assert np.allclose(search["fraction_across"], fracs, atol=1e-12, rtol=0)
    # the rule: the smallest alpha with gap <= max, else the smallest gap (depth 20: 5.5 mm at best)
    ok = [a for a, g in zip(AUTO_ALPHAS, gaps, strict=True) if g <= max_gap]
    assert (ok[0] if ok else AUTO_ALPHAS[int(np.argmin(gaps))]) == chosen
    assert search["chosen_alpha"] == chosen == tr.alpha and search["rule"].startswith("smallest" if ok else "no")
    # the transform is the chosen alpha's: the plane sits at its order statistic
    layers = round(depth - search["chosen_gap_mm"] / S)
    face_x = float(tr.apply([[(I0 + depth - layers) * S, 15.0, 15.0]])[0, 0])
    assert abs(face_x) < 1e-9 and tr.normal == (1.0, 0.0, 0.0)
    assert tr.fraction_across == pytest.approx(fracs[AUTO_ALPHAS.index(chosen)], abs=1e-12)
    # recorded in transform.json and read back
    back = MirrorTransform.from_dict(tr.to_dict())
    assert back.alpha_search == search


def test_auto_on_the_phantom_s_known_medial_face():
    """The geometric phantom's medial face is flat: every alpha leaves no gap, so the smallest one is chosen, and
    its plane is the true medial plane."""
    spacing = 2.0
    mask = orient.to_ras(phantom_mod.phantom(spacing, side="L", chunks=40)["truth_mask"])
    tr = fit_mirror(mask, alpha="auto")
    assert tr.alpha == AUTO_ALPHAS[0] and max(tr.alpha_search["gap_mm"]) < 0.5 * spacing
    normal = np.asarray(phantom_mod.phantom_geometry(spacing, "L")["medial_plane"]["normal"], float)
    assert math.degrees(math.acos(min(1.0, float(np.dot(tr.normal, normal))))) < 1.0
    fixed = fit_mirror(mask, alpha=AUTO_ALPHAS[0])  # the same fit as the chosen alpha's, alone
    assert np.array_equal(fixed.matrix, tr.matrix) and fixed.alpha_search is None
    assert "alpha_search" not in fixed.to_dict()  # a fixed alpha's transform.json is as before


def test_options_checked_early_and_in_the_key_only_with_auto(tmp_path):
    actions = run_option_actions()
    assert actions["alpha"].type("auto") == "auto" and actions["alpha"].type("1e-3") == 1e-3
    assert actions["max_gap_mm"].default == 1.0
    write_phantom(tmp_path / "ph", spacing_mm=4.0, side="L", seed=0)
    base = dict(scan=str(tmp_path / "ph" / "scan.nii.gz"), hypothalamus=str(tmp_path / "ph" / "hypothalamus.nii.gz"))
    for kw, msg in (({"alpha": "often"}, "--alpha"), ({"alpha": 0.7}, "--alpha"), ({"max_gap_mm": 0.0}, "--max-gap")):
        with pytest.raises(HelmError, match=msg):
            check_params(RunParams(out=str(tmp_path / "o"), **base, **kw))
    check_params(RunParams(out=str(tmp_path / "o"), **base, alpha="auto"))
    fixed = _mirror_params(Run(RunParams(out="o", **base, max_gap_mm=2.0), None))
    auto = _mirror_params(Run(RunParams(out="o", **base, alpha="auto", max_gap_mm=2.0), None))
    assert fixed == {"alpha": 5e-4, "margin_mm": 10.0, "seed": 0}  # as before: the stage key is unchanged
    assert auto == {"alpha": "auto", "margin_mm": 10.0, "seed": 0, "max_gap_mm": 2.0}
