"""The geometry of one sample: :func:`plan_sample` maps the output grid into the label map and finds the
lazy box of the map the sample can touch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .bspline import _grid_coefficients
from .config import SynthConfig
from .params import _STREAM_DEFORM, SampleParams
from .source import LabelSource

if TYPE_CHECKING:
    import dask.array as da


def _out_affine(center: np.ndarray, crop: Sequence[int], spacing_mm: float) -> np.ndarray:
    """Axis-aligned RAS+ grid of ``crop`` voxels whose centre (voxel (n-1)/2) is ``center``."""
    n = np.asarray(crop, dtype=np.float64)
    a = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    a[:3, 3] = np.asarray(center, dtype=np.float64) - spacing_mm * (n - 1) / 2
    return a


@dataclass
class SamplePlan:
    """Where a sample reads from: the pyramid ``level``, the output grid, the source box and the mapping.

    Continuous source voxel (at ``level``) of output voxel ``v``:
    ``matrix @ v + offset + disp_matrix @ d(v)``, ``d`` the deformation in mm (zero when off). ``box_lo`` /
    ``box_hi`` bound every source voxel the sample can touch; ``box`` is that region of the label map as a
    lazy dask array (None when the crop lies entirely outside the map).
    """

    level: int
    level_affine: np.ndarray
    level_shape: tuple
    out_affine: np.ndarray
    crop: tuple
    center_mm: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    disp_matrix: np.ndarray
    deform_coef: np.ndarray | None
    deform_weights: list | None
    box_lo: np.ndarray
    box_hi: np.ndarray
    box: da.Array | None = field(default=None, repr=False)

    @property
    def box_voxels(self) -> int:
        """Number of voxels in the source box (0: the crop misses the map)."""
        return int(np.prod(np.maximum(self.box_hi - self.box_lo, 0)))


def plan_sample(source: Any, params: SampleParams, config: SynthConfig | None = None) -> SamplePlan:
    """The geometry of one sample and the lazy box of the label map it needs (nothing is computed, except
    the hypothalamus centroid the first time a source is used with ``center="hypothalamus"``).

    Parameters
    ----------
    source : DataArray, path or LabelSource
        The label map (see :meth:`LabelSource.open`).
    params : SampleParams
        From :func:`~helm_dask.synth.sample_params`.
    config : SynthConfig, optional
        The output grid, the centre and the level (default: :class:`SynthConfig`'s defaults).

    Returns
    -------
    SamplePlan
        The level read, the output affine, the output-to-source mapping (with the deformation's coefficients)
        and the box of the map it can touch.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> from helm_dask.synth import sample_params
    >>> vol = make_volume(da.zeros((200, 200, 200), np.uint16, chunks=50), np.eye(4), kind="labels")
    >>> cfg = SynthConfig(crop=(16, 16, 16), center=(100.0, 100.0, 100.0))
    >>> plan = plan_sample(vol, sample_params(cfg, 0, 0), cfg)
    >>> plan.box.numblocks, vol.data.numblocks     # only the chunks around the crop
    ((2, 2, 2), (4, 4, 4))
    """
    cfg = config or SynthConfig()
    src = LabelSource.open(source)
    level = src.auto_level(cfg.spacing_mm) if cfg.level == "auto" else int(cfg.level)
    arr = src.level(level)
    a_lev = src.level_affine(level)
    shape = src.shapes[level]
    center = src.center_mm(cfg.center) + np.asarray(params.shift_mm, dtype=np.float64)
    a_out = _out_affine(center, cfg.crop, cfg.spacing_mm)
    inv = np.linalg.inv(a_lev)
    pull = params.pull_matrix()
    # q = c + M (A_out v + d - c);  source voxel = inv(A_lev) q
    disp = inv[:3, :3] @ pull
    matrix = disp @ a_out[:3, :3]
    offset = inv[:3, :3] @ (center + pull @ (a_out[:3, 3] - center)) + inv[:3, 3]
    coef = weights = None
    margin = np.zeros(3)
    if params.nonlin_std_mm > 0:
        coef, weights = _grid_coefficients(
            params.seed,
            params.index,
            _STREAM_DEFORM,
            (3,),
            cfg.crop,
            cfg.spacing_mm,
            cfg.nonlin_spacing_mm,
            params.nonlin_std_mm,
        )
        # convex-hull property: |d_j| <= max |coef_j| everywhere
        dmax = np.abs(coef).reshape(3, -1).max(axis=1)
        margin = np.abs(disp) @ dmax
    n = np.asarray(cfg.crop) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], dtype=np.float64)
    cc = corners @ matrix.T + offset
    # one extra voxel each side absorbs float rounding differences between this bound and the gather
    lo = np.floor(cc.min(axis=0) - margin + 0.5).astype(np.int64) - 1
    hi = np.floor(cc.max(axis=0) + margin + 0.5).astype(np.int64) + 2
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    plan = SamplePlan(
        level=level,
        level_affine=a_lev,
        level_shape=tuple(shape),
        out_affine=a_out,
        crop=tuple(cfg.crop),
        center_mm=center,
        matrix=matrix,
        offset=offset,
        disp_matrix=disp,
        deform_coef=coef,
        deform_weights=weights,
        box_lo=lo,
        box_hi=hi,
    )
    if plan.box_voxels > 0:
        plan.box = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return plan
