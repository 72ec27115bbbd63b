"""Smooth random fields on the output grid: seeded cubic B-spline coefficients and their tensor-product
evaluation, for the deformation and the bias field."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _bspline3(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel (support ``|t| < 2``)."""
    t = np.abs(t)
    out = np.where(t < 1, 2.0 / 3.0 - t**2 + t**3 / 2, 0.0)
    return np.where((t >= 1) & (t < 2), (2 - t) ** 3 / 6, out)


def _bspline_nodes(n: int, step_vox: float) -> int:
    """Number of control points along an axis of ``n`` voxels with about ``step_vox`` voxels between them."""
    return max(1, math.ceil((n - 1) / step_vox)) + 3


def _bspline_weights(n: int, nodes: int) -> np.ndarray:
    """``(n, nodes)`` cubic B-spline weights: control points evenly cover voxels 0..n-1 (plus one outside each
    end), so every row sums to 1 (partition of unity)."""
    m = nodes - 3
    x = np.arange(n, dtype=np.float64) * (m / (n - 1) if n > 1 else 0.0)
    return _bspline3(x[:, None] - (np.arange(nodes) - 1)[None, :])


def _bspline_field(coef: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
    """Tensor-product B-spline: ``sum_abc Wx[i,a] Wy[j,b] Wz[k,c] coef[..., a, b, c]``."""
    wx, wy, wz = weights
    f = np.tensordot(coef, wz, axes=([-1], [1]))  # (..., a, b, k)
    f = np.tensordot(f, wy, axes=([-2], [1]))  # (..., a, k, j)
    f = np.tensordot(f, wx, axes=([-3], [1]))  # (..., k, j, i)
    return np.moveaxis(f, (-1, -2, -3), (-3, -2, -1))


def _grid_coefficients(
    seed: int, index: int, stream: int, lead: tuple, crop: Sequence[int], spacing_mm: float, step_mm: float, std: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """N(0, ``std``^2) coefficients of shape ``lead + nodes`` from the stream ``(seed, index, stream)``, control
    points every ``step_mm`` over the ``crop`` grid, and the per-axis weights that evaluate them on it."""
    nodes = tuple(_bspline_nodes(n, step_mm / spacing_mm) for n in crop)
    rng = np.random.default_rng((seed, index, stream))
    coef = rng.standard_normal(lead + nodes) * std
    return coef, [_bspline_weights(n, k) for n, k in zip(crop, nodes)]
