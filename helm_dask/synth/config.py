"""The generator's configuration: :class:`SynthConfig`, every knob with its default, checked when it is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from ..errors import HelmError


@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the generator, with their defaults; ``affine=False`` etc. switch a step off.

    Parameters
    ----------
    crop : 3 ints
        Output grid size in voxels (x, y, z).
    spacing_mm : float
        Output voxel size (isotropic, mm).
    center : "hypothalamus", "volume" or 3 floats
        Crop centre: the centroid of codes 801-810, the centre of the label map's field of view, or a world
        point (RAS+ mm).
    level : "auto" or int
        Pyramid level the labels are read at (see ``docs/method/synth.md``); 0 is exact nearest neighbour.
    max_shift_mm : float
        Random translation of the crop centre, U(-max_shift_mm, max_shift_mm) per axis (0: none).
    affine, deformation, intensity_noise, bias, gamma, acquisition : bool
        Switch the random affine (rotation, scaling, shear), the non-linear deformation, the per-label noise
        (off: every voxel of label ``l`` is exactly ``mean_l``), the bias field, gamma and the simulated
        acquisition on or off.
    rotation_deg, scaling, shear : float, (float, float), float
        Rotation U(-rotation_deg, rotation_deg) about each axis; scaling U(scaling) per axis; shear
        U(-shear, shear) for each of the six off-diagonal terms.
    nonlin_std_mm, nonlin_spacing_mm : float
        Maximum standard deviation of the deformation's B-spline coefficients and their spacing (mm).
    mean_range, std_range : (float, float)
        Per-label mean and standard deviation, uniform in these ranges.
    bias_std, bias_spacing_mm : float
        Maximum standard deviation of the log bias field's coefficients, their spacing (mm).
    gamma_std : float
        Standard deviation of ``log(gamma)``.
    max_spacing_mm, blur_factor : float
        Largest simulated acquisition spacing (mm), blur sigma = ``blur_factor * ratio`` (output voxels).
    normalize : bool
        Rescale each image to [0, 1] (min-max) at the end.

    Example
    -------
    >>> cfg = SynthConfig(crop=(64, 64, 64), center=(10, -5, 3))
    >>> cfg.center, cfg.without_augmentation().affine
    ((10.0, -5.0, 3.0), False)
    """

    crop: tuple = (96, 96, 96)
    spacing_mm: float = 1.0
    center: Any = "hypothalamus"
    level: Any = "auto"
    max_shift_mm: float = 0.0
    affine: bool = True
    deformation: bool = True
    intensity_noise: bool = True
    bias: bool = True
    gamma: bool = True
    acquisition: bool = True
    rotation_deg: float = 15.0
    scaling: tuple = (0.85, 1.15)
    shear: float = 0.05
    nonlin_std_mm: float = 3.0
    nonlin_spacing_mm: float = 16.0
    mean_range: tuple = (0.0, 255.0)
    std_range: tuple = (0.0, 35.0)
    bias_std: float = 0.5
    bias_spacing_mm: float = 32.0
    gamma_std: float = 0.25
    max_spacing_mm: float = 8.0
    blur_factor: float = 0.75
    normalize: bool = False

    def __post_init__(self) -> None:
        _validate_config(self)

    def without_augmentation(self) -> SynthConfig:
        """The same configuration with every augmentation off (intensities and their noise kept).

        Returns
        -------
        SynthConfig
            A copy without the affine, the deformation, the shift, the bias field, gamma and the acquisition.
        """
        return dataclasses.replace(
            self, affine=False, deformation=False, bias=False, gamma=False, acquisition=False, max_shift_mm=0.0
        )

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (tuples become lists), as written to ``samples.json``.

        Returns
        -------
        dict
            ``{field: value}`` for every field.
        """
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _validate_config(c: SynthConfig) -> None:
    """Check every field and normalise ``crop``, the ranges and a world ``center`` to tuples of numbers, in place
    (``object.__setattr__``: the dataclass is frozen so that a config cannot change between samples)."""

    def bad(what: str, hint: str) -> NoReturn:
        raise HelmError(f"synth: {what}", hint=hint)

    try:
        crop = tuple(int(v) for v in c.crop)
    except (TypeError, ValueError):
        bad(f"crop must be three integers, got {c.crop!r}", "e.g. --crop 96 96 96")
    if len(crop) != 3 or min(crop) < 1 or any(float(a) != float(b) for a, b in zip(crop, c.crop)):
        bad(f"crop must be three positive integers, got {c.crop!r}", "e.g. --crop 96 96 96")
    object.__setattr__(c, "crop", crop)
    for name in ("spacing_mm", "nonlin_spacing_mm", "bias_spacing_mm", "max_spacing_mm", "blur_factor"):
        v = getattr(c, name)
        if not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0:
            bad(f"{name} must be a positive number, got {v!r}", f"e.g. {name}=1.0")
    for name in ("max_shift_mm", "rotation_deg", "shear", "nonlin_std_mm", "bias_std", "gamma_std"):
        v = getattr(c, name)
        if not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0:
            bad(f"{name} must be a non-negative number, got {v!r}", f"e.g. {name}=0")
    for name in ("scaling", "mean_range", "std_range"):
        v = getattr(c, name)
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            bad(f"{name} must be two numbers (low, high), got {v!r}", f"e.g. {name}=(0, 1)")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            bad(f"{name} must be (low, high) with low <= high, got {v!r}", f"e.g. {name}=(0, 1)")
        object.__setattr__(c, name, (lo, hi))
    if c.scaling[0] <= 0:
        bad(f"scaling must be positive, got {c.scaling!r}", "e.g. scaling=(0.85, 1.15)")
    if c.std_range[0] < 0:
        bad(f"std_range must be non-negative, got {c.std_range!r}", "e.g. std_range=(0, 35)")
    if not (
        c.level == "auto" or (isinstance(c.level, (int, np.integer)) and not isinstance(c.level, bool) and c.level >= 0)
    ):
        bad(f"level must be 'auto' or a non-negative integer, got {c.level!r}", "e.g. --level auto")
    if isinstance(c.center, str):
        if c.center not in ("hypothalamus", "volume"):
            bad(
                f"center must be 'hypothalamus', 'volume' or three world coordinates, got {c.center!r}",
                "e.g. --center hypothalamus or --center-mm 10 -5 3",
            )
    else:
        try:
            ctr = tuple(float(v) for v in c.center)
        except (TypeError, ValueError):
            ctr = ()
        if len(ctr) != 3 or not all(math.isfinite(v) for v in ctr):
            bad(
                f"center must be 'hypothalamus', 'volume' or three world coordinates, got {c.center!r}",
                "e.g. --center-mm 10 -5 3",
            )
        object.__setattr__(c, "center", ctr)
