"""The random draws of one sample: :class:`SampleParams` and :func:`sample_params`, from seeded streams."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HelmError
from .config import SynthConfig

#: Independent random streams of one sample (keys appended to ``(seed, index)``): switching one step off or
#: changing its draws leaves the others' numbers unchanged.
_STREAM_INTENSITY, _STREAM_NOISE, _STREAM_DEFORM, _STREAM_BIAS = 1, 2, 3, 4


@dataclass(frozen=True)
class SampleParams:
    """The random draws of one sample (JSON-able: :meth:`to_dict` / :meth:`from_dict`).

    ``rotation_deg`` (about x, y, z; ``R = Rz Ry Rx``), ``scaling`` (3), ``shear`` (the off-diagonal terms
    ``H01, H02, H10, H12, H20, H21``), ``shift_mm`` (3) make the forward augmentation ``R S H`` of the anatomy
    about the crop centre; ``nonlin_std_mm``, ``bias_std`` are the standard deviations of the B-spline
    coefficients (the coefficients themselves come from the ``(seed, index)`` streams); ``gamma``;
    ``acq_axis`` / ``acq_spacing_mm`` (None: no simulated acquisition). Disabled steps hold neutral values.

    Example
    -------
    >>> p = SampleParams(seed=0, index=3, scaling=(2.0, 1.0, 1.0))
    >>> SampleParams.from_dict(p.to_dict()) == p, float(p.forward_matrix()[0, 0])
    (True, 2.0)
    """

    seed: int
    index: int
    rotation_deg: tuple = (0.0, 0.0, 0.0)
    scaling: tuple = (1.0, 1.0, 1.0)
    shear: tuple = (0.0,) * 6
    shift_mm: tuple = (0.0, 0.0, 0.0)
    nonlin_std_mm: float = 0.0
    bias_std: float = 0.0
    gamma: float = 1.0
    acq_axis: int | None = None
    acq_spacing_mm: float | None = None

    def forward_matrix(self) -> np.ndarray:
        """``R S H``: how the anatomy is rotated, scaled and sheared about the crop centre.

        Returns
        -------
        ndarray
            3x3 float64 matrix, ``R = Rz Ry Rx``.
        """
        ax, ay, az = np.deg2rad(np.asarray(self.rotation_deg, dtype=np.float64))
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        h = np.eye(3)
        h[0, 1], h[0, 2], h[1, 0], h[1, 2], h[2, 0], h[2, 1] = self.shear
        return rz @ ry @ rx @ np.diag(self.scaling) @ h

    def pull_matrix(self) -> np.ndarray:
        """``inv(R S H)``: maps an output displacement from the crop centre to the source displacement.

        Returns
        -------
        ndarray
            3x3 float64 matrix.
        """
        return np.linalg.inv(self.forward_matrix())

    def to_dict(self) -> dict:
        """The draws as a JSON-able dict (tuples become lists).

        Returns
        -------
        dict
            ``{field: value}`` for every field; :meth:`from_dict` reads it back.
        """
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SampleParams:
        """The parameters written by :meth:`to_dict` (unknown keys are ignored).

        Parameters
        ----------
        d : dict
            E.g. a sample's ``params`` in ``samples.json``.

        Returns
        -------
        SampleParams
        """
        kw: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in d.items()
            if k in {f.name for f in dataclasses.fields(cls)}
        }
        return cls(**kw)


def _check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int, or a :class:`HelmError` naming the flag ``--{what}`` if it is not a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"{what} must be a non-negative integer, got {seed!r}", hint=f"e.g. --{what} 0")
    return int(seed)


def sample_params(config: SynthConfig | None, seed: int, index: int) -> SampleParams:
    """Draw the parameters of sample ``index`` from ``np.random.default_rng((seed, index))``.

    All draws are made whatever the flags (then neutralised), so switching a step off does not change the
    other steps' draws.

    Parameters
    ----------
    config : SynthConfig or None
        The ranges to draw from and the steps switched on (None: the defaults).
    seed, index : int
        Non-negative: the run's seed and the sample's number.

    Returns
    -------
    SampleParams
        The draws, with neutral values for the steps switched off.

    Example
    -------
    >>> p = sample_params(SynthConfig(), seed=1, index=0)
    >>> p == sample_params(SynthConfig(), seed=1, index=0), p == sample_params(SynthConfig(), seed=2, index=0)
    (True, False)
    """
    cfg = config or SynthConfig()
    seed, index = _check_seed(seed), _check_seed(index, "index")
    rng = np.random.default_rng((seed, index))
    rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)
    scl = rng.uniform(cfg.scaling[0], cfg.scaling[1], 3)
    shr = rng.uniform(-cfg.shear, cfg.shear, 6)
    shift = rng.uniform(-cfg.max_shift_mm, cfg.max_shift_mm, 3)
    nonlin = rng.uniform(0.0, cfg.nonlin_std_mm)
    bias = rng.uniform(0.0, cfg.bias_std)
    gamma = float(np.exp(rng.normal(0.0, cfg.gamma_std)))
    axis = int(rng.integers(0, 3))
    acq = rng.uniform(cfg.spacing_mm, max(cfg.spacing_mm, cfg.max_spacing_mm))
    f = lambda a: tuple(float(v) for v in a)
    kw: dict[str, Any] = {}
    if cfg.affine:
        kw.update(rotation_deg=f(rot), scaling=f(scl), shear=f(shr))
    if cfg.max_shift_mm > 0:
        kw["shift_mm"] = f(shift)
    if cfg.deformation:
        kw["nonlin_std_mm"] = float(nonlin)
    if cfg.bias:
        kw["bias_std"] = float(bias)
    if cfg.gamma:
        kw["gamma"] = gamma
    if cfg.acquisition and cfg.max_spacing_mm > cfg.spacing_mm:
        kw.update(acq_axis=axis, acq_spacing_mm=float(acq))
    return SampleParams(seed=seed, index=index, **kw)
