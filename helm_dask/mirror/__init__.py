"""Stage 7 -- hemisphere mirroring, out of core: :func:`fit_mirror` fits the rigid transform that puts a left
hemisphere's medial face on the mirror plane x = 0 (a :class:`MirrorTransform`, saved as ``transform.json``),
:func:`check_hypothalamus_plane` refuses hypothalamus labels that do not lie on that plane,
:func:`whole_brain_grid` builds the symmetric whole-brain grid and :func:`mirror_labels` resamples the label maps
onto it, the hemisphere on x < 0 and its mirror image, with the right-hemisphere codes, on x > 0; the method is
described in ``docs/method/mirror.md``.

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> m = np.zeros((30, 20, 20), np.uint8); m[5:25, 3:17, 3:17] = 1          # a box, medial face at i = 24
>>> mask = make_volume(da.from_array(m, chunks=10), np.eye(4), kind="mask")
>>> tr = fit_mirror(mask, alpha=1e-2, grid_deg=(4.0, 2.0))
>>> [round(a, 3) for a in tr.angles_deg], round(tr.translation_mm[0], 3), tr.gap_mm
([0.0, 0.0, 0.0], -24.0, 0.0)
>>> out = mirror_labels(mask, tr, margin_mm=2.0)
>>> out.shape, int(out.sum())
((44, 20, 20), 7840)
"""

from __future__ import annotations

from ..labels import RIGHT_CODES
from .apply import mirror_labels, reflection_lut
from .check import check_hypothalamus_plane
from .fit import fit_mirror, mirror_cost
from .grid import whole_brain_grid
from .search import _AXES as _AXES  # the six directions the search tries first (tests read them)
from .transform import MirrorTransform, euler_angles, minimal_rotation, rotation_matrix, sphere_normals

__all__ = [
    "RIGHT_CODES",
    "MirrorTransform",
    "check_hypothalamus_plane",
    "euler_angles",
    "fit_mirror",
    "minimal_rotation",
    "mirror_cost",
    "mirror_labels",
    "reflection_lut",
    "rotation_matrix",
    "sphere_normals",
    "whole_brain_grid",
]
