"""SynthSeg-style synthetic ``(image, labels)`` pairs from a label map, seeded, reproducible and lazy on input.

Every sample lives on its own small OUTPUT grid: ``crop`` voxels of ``spacing_mm`` (axis-aligned RAS+), centred
on the hypothalamus (centroid of codes 801-810) by default. A sample is built in five steps:

1. **Spatial augmentation** (pull-back, nearest neighbour). Output voxel ``v`` -> world point ``p`` ->
   source world point ``q = c + M (p + d(p) - c)`` -> continuous source voxel ``inv(A_src) q`` -> label.
   ``c`` is the crop centre; ``M = inv(R S H)`` undoes the forward augmentation of the anatomy (rotation
   ``R = Rz Ry Rx``, angles U(-15, 15) deg; scaling ``S`` U(0.85, 1.15) per axis; shear ``H = I + off-diagonal
   U(-shear, shear)``); ``d`` is a smooth displacement (mm): a cubic B-spline with control points every
   ``nonlin_spacing_mm`` and coefficients N(0, sigma^2), sigma U(0, ``nonlin_std_mm``) per sample. A B-spline
   lies inside the convex hull of its coefficients, so ``|d| <= max |coefficient|`` bounds the source region.
   (A displacement, not an integrated velocity field: its gradient has a standard deviation of about
   ``sigma / nonlin_spacing_mm`` <= 0.2 with the defaults, so folds are very rare but not impossible.)
2. **Intensities**: each label ``l`` present gets ``N(mean_l, std_l^2)`` with ``mean_l`` U(0, 255) and
   ``std_l`` U(0, 35), drawn from a stream keyed by ``(seed, index, l)`` (the same label always gets the same
   model within a sample, whatever else is in the crop).
3. **Bias field**: the image is multiplied by ``exp(b)``, ``b`` a cubic B-spline (control points every
   ``bias_spacing_mm``) with coefficients N(0, sigma^2), sigma U(0, ``bias_std``).
4. **Gamma**: ``I <- 255 (max(I, 0) / 255) ** gamma``, ``log(gamma)`` ~ N(0, ``gamma_std^2``).
5. **Simulated acquisition**: one random output axis is given a random spacing U(``spacing_mm``, 8 mm); the
   image is blurred along it with a Gaussian of sigma ``0.75 * ratio`` output voxels (``ratio`` = that
   spacing / ``spacing_mm``), sampled (linearly) every ``ratio`` voxels and linearly interpolated back.

Rounding convention (nearest neighbour): the source voxel of a continuous index ``x`` is ``floor(x + 0.5)``
(halves go up) and points whose rounded index falls outside the label map are background (0) -- exactly
``scipy.ndimage.affine_transform(..., order=0, mode="grid-constant", cval=0)``.

Lazy and chunked where it matters: the label map (a dask array, possibly 0.1 mm and never materialised) is
only sliced to the **box** a sample can touch (the crop's corners pushed through the affine, widened by the
deformation bound), and the labels are gathered by one task per source chunk that holds a needed voxel (the
chunk and the within-chunk indices in, the labels out; :func:`gather_tasks`): memory per task is one chunk,
the client holds only output-sized arrays, and a sample never reads the whole map. A 96 mm crop at 1 mm over a
0.1 mm map would touch a ~1300^3 voxel region, so the labels are read at the coarsest pyramid level whose
spacing is at most half the output spacing (``level="auto"``): the stored level of a helm-dask store (stride
pyramid: level ``L`` voxel ``i`` is level-0 voxel ``2^L i``) or, for an in-memory volume, the same stride taken
lazily from the dask array. Nearest-neighbour sampling at that level differs from level 0 by at most half a
level voxel (a quarter of an output voxel); ``level=0`` is exact. Everything after the gather happens in
memory on the output grid (a 96^3 sample is 3.5 MB of float32), so samples do not depend on the chunking of
the label map or on the scheduler: same ``(seed, index)`` -> bit-identical sample.

Randomness: ``np.random.default_rng((seed, index))`` draws the JSON-able :class:`SampleParams`; the grids
(deformation, bias, noise) and per-label intensities come from separate streams keyed by ``(seed, index,
stream)``. Every draw is made whatever the flags, so disabling one augmentation leaves the others unchanged.

Example
-------
>>> import numpy as np, dask.array as da
>>> from helm_dask.volume import make_volume
>>> lab = np.zeros((40, 40, 40), np.uint16); lab[10:30, 10:30, 10:30] = 3; lab[18:22, 18:22, 18:22] = 801
>>> vol = make_volume(da.from_array(lab, chunks=16), np.eye(4), kind="labels")
>>> cfg = SynthConfig(crop=(24, 24, 24), spacing_mm=1.0)
>>> image, labels = next(iter_samples(vol, 1, seed=0, config=cfg))
>>> image.shape, image.dtype, labels.dtype, sorted(np.unique(labels).tolist())
((24, 24, 24), dtype('float32'), dtype('uint16'), [0, 3, 801])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import xarray as xr

from .errors import HelmError
from .labels import HYPOTHALAMUS
from .volume import affine_of, make_volume, provenance_record, spacing_of

if TYPE_CHECKING:
    import dask.array as da

# dask.array and scipy.ndimage are imported where they are used: the CLI imports this module to build its
# parser, and they would double ``helm-dask --help``'s start-up time.

__all__ = [
    "HYPOTHALAMUS_CODES",
    "LabelSource",
    "SampleParams",
    "SamplePlan",
    "SynthConfig",
    "add_synth_parser",
    "cmd_synth",
    "gather_tasks",
    "generate_sample",
    "iter_samples",
    "label_intensity",
    "plan_sample",
    "sample_params",
    "write_samples",
]

#: FreeSurfer hypothalamic subunit codes (both sides): the default crop centre is their centroid.
HYPOTHALAMUS_CODES = tuple(HYPOTHALAMUS)
#: The hypothalamus centroid is found at the coarsest pyramid level with voxels no larger than this (mm):
#: ~700 mm3 of hypothalamus is still > 1000 voxels there, and the pass reads a few MB instead of gigabytes.
CENTROID_SPACING_MM = 1.0

# Independent random streams of one sample (keys appended to (seed, index)).
_STREAM_INTENSITY, _STREAM_NOISE, _STREAM_DEFORM, _STREAM_BIAS = 1, 2, 3, 4
_MAX_LABEL = np.iinfo(np.uint16).max


# ----------------------------------------------------------------------------------------------------------------
# configuration and per-sample parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the generator, with the MISSION defaults; ``affine=False`` etc. switch a step off.

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
        Pyramid level the labels are read at (see the module docstring); 0 is exact nearest neighbour.
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

    def __post_init__(self):
        _validate_config(self)

    def without_augmentation(self) -> SynthConfig:
        """The same configuration with every augmentation off (intensities and their noise kept)."""
        return dataclasses.replace(
            self, affine=False, deformation=False, bias=False, gamma=False, acquisition=False, max_shift_mm=0.0
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _validate_config(c: SynthConfig) -> None:
    def bad(what, hint):
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


@dataclass(frozen=True)
class SampleParams:
    """The random draws of one sample (JSON-able: :meth:`to_dict` / :meth:`from_dict`).

    ``rotation_deg`` (about x, y, z; ``R = Rz Ry Rx``), ``scaling`` (3), ``shear`` (the off-diagonal terms
    ``H01, H02, H10, H12, H20, H21``), ``shift_mm`` (3) make the forward augmentation ``R S H`` of the anatomy
    about the crop centre; ``nonlin_std_mm``, ``bias_std`` are the standard deviations of the B-spline
    coefficients (the coefficients themselves come from the ``(seed, index)`` streams); ``gamma``;
    ``acq_axis`` / ``acq_spacing_mm`` (None: no simulated acquisition). Disabled steps hold neutral values.
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
        """``R S H`` (3x3): how the anatomy is rotated, scaled and sheared about the crop centre."""
        ax, ay, az = np.deg2rad(np.asarray(self.rotation_deg, dtype=np.float64))
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        h = np.eye(3)
        h[0, 1], h[0, 2], h[1, 0], h[1, 2], h[2, 0], h[2, 1] = self.shear
        return rz @ ry @ rx @ np.diag(self.scaling) @ h

    def pull_matrix(self) -> np.ndarray:
        """``inv(R S H)``: maps an output displacement from the crop centre to the source displacement."""
        return np.linalg.inv(self.forward_matrix())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SampleParams:
        kw = {
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in d.items()
            if k in {f.name for f in dataclasses.fields(cls)}
        }
        return cls(**kw)


def _check_seed(seed: Any, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"{what} must be a non-negative integer, got {seed!r}", hint=f"e.g. --{what} 0")
    return int(seed)


def sample_params(config: SynthConfig | None, seed: int, index: int) -> SampleParams:
    """Draw the parameters of sample ``index`` from ``np.random.default_rng((seed, index))``.

    All draws are made whatever the flags (then neutralised), so switching a step off does not change the
    other steps' draws.

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


def label_intensity(seed: int, index: int, label: int, config: SynthConfig | None = None) -> tuple[float, float]:
    """``(mean, std)`` of label ``label`` in sample ``(seed, index)``: U(mean_range), U(std_range)."""
    cfg = config or SynthConfig()
    rng = np.random.default_rng((int(seed), int(index), _STREAM_INTENSITY, int(label)))
    mean = rng.uniform(*cfg.mean_range)
    std = rng.uniform(*cfg.std_range)
    return float(mean), float(std) if cfg.intensity_noise else 0.0


# ----------------------------------------------------------------------------------------------------------------
# the label map and its pyramid
# ----------------------------------------------------------------------------------------------------------------


def _level_shapes(shape0: Sequence[int], n: int) -> list[tuple[int, int, int]]:
    """Shapes of stride levels 0..n-1 exactly as the store's pyramid makes them (``n // 2`` per level)."""
    shapes = [tuple(int(s) for s in shape0)]
    for _ in range(1, n):
        shapes.append(tuple(s // 2 for s in shapes[-1]))
    return shapes


class LabelSource:
    """A label map and its (stored or virtual) stride pyramid, opened once for many samples.

    Build with :meth:`open` from a volume DataArray (dask-backed; never computed whole), a helm-dask
    ``.zarr`` store (its stored pyramid levels are used) or a ``.nii``/``.nii.gz`` file (imported into a
    temporary store first, removed by :meth:`close`). Level ``L`` has the affine ``A0 @ diag(2^L, 2^L, 2^L, 1)``
    (stride pyramid, no shift) and voxel ``i`` equal to level-0 voxel ``2^L i``.
    """

    def __init__(
        self,
        data0: da.Array,
        affine0: np.ndarray,
        *,
        stored: Sequence[da.Array] = (),
        name: str = "labels",
        path: str | None = None,
        tmpdir: str | None = None,
    ):
        if data0.ndim != 3:
            raise HelmError(
                f"the label map must be 3-D, got {data0.ndim}-D", path=path, hint="give a single 3-D label volume"
            )
        if not (np.issubdtype(data0.dtype, np.integer) or np.issubdtype(data0.dtype, np.floating)):
            raise HelmError(
                f"the label map has dtype {data0.dtype}, not integer codes", path=path, hint="give an integer label map"
            )
        self.data0 = data0
        self.affine0 = np.asarray(affine0, dtype=np.float64)
        self.spacing0 = spacing_of(self.affine0)
        self.stored = list(stored) or [data0]
        self.name = name
        self.path = path
        self._tmpdir = tmpdir
        # Virtual levels go on while every axis keeps at least one voxel.
        n = 1
        while min(_level_shapes(data0.shape, n + 1)[-1]) >= 1 and n < 32:
            n += 1
        self.shapes = _level_shapes(data0.shape, n)
        self._centroid: dict[tuple, np.ndarray] = {}

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, src: Any, *, tmp_dir: str | os.PathLike | None = None) -> LabelSource:
        """A :class:`LabelSource` from a DataArray, a ``.zarr`` store or a NIfTI file (or itself)."""
        if isinstance(src, LabelSource):
            return src
        if isinstance(src, xr.DataArray):
            import dask.array as da

            data = src.data if isinstance(src.data, da.Array) else da.from_array(np.asarray(src.data))
            return cls(data, affine_of(src), name=str(src.name or "labels"))
        from .io.nifti import is_nifti_path
        from .io.store import read_meta

        p = os.fspath(src)
        if is_nifti_path(p):
            from .io.convert import nifti_to_zarr

            if not Path(p).exists():
                raise HelmError("label map not found", path=p, hint="check the path")
            tmp = tempfile.mkdtemp(prefix="helm-synth-", dir=tmp_dir)
            try:
                store = os.path.join(tmp, "labels.zarr")
                nifti_to_zarr(p, store, kind="labels")
                src_obj = cls._from_store(store, name=Path(p).name, path=p)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            src_obj._tmpdir = tmp
            return src_obj
        if p.rstrip("/").endswith(".zarr") or os.path.isdir(p) or "://" in p:
            read_meta(p)
            return cls._from_store(p, name=Path(p.rstrip("/")).stem, path=p)
        raise HelmError(
            "is neither a NIfTI file nor a helm-dask .zarr store",
            path=p,
            hint="give a .nii/.nii.gz label map or a .zarr store",
        )

    @classmethod
    def _from_store(cls, store: str, *, name: str, path: str) -> LabelSource:
        from .io.store import open_volume, read_meta

        meta = read_meta(store)
        if meta.get("four_d"):
            raise HelmError("is a 4-D volume, not a label map", path=path, hint="give a 3-D label map")
        if meta.get("kind") not in ("labels", "mask"):
            raise HelmError(
                f"is a store of kind {meta.get('kind')!r}, not labels (its pyramid is averaged)",
                path=path,
                hint="convert the label map with kind labels (a NIfTI with the label "
                "intent, or pass the .nii.gz directly)",
            )
        vols = [open_volume(store, level=lev) for lev in range(int(meta.get("nlevels", 1)))]
        return cls(vols[0].data, affine_of(vols[0]), stored=[v.data for v in vols], name=name, path=path)

    def close(self) -> None:
        """Remove the temporary store of an imported NIfTI file (if any)."""
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- levels ----------------------------------------------------------------------------------------------
    @property
    def nlevels(self) -> int:
        return len(self.shapes)

    def level_affine(self, level: int) -> np.ndarray:
        f = 2.0**level
        return self.affine0 @ np.diag([f, f, f, 1.0])

    def level(self, level: int) -> da.Array:
        """Level ``level`` as a lazy dask array: a stored level, or a stride of the nearest stored one."""
        if not 0 <= level < self.nlevels:
            raise HelmError(
                f"the label map has no level {level} (levels 0..{self.nlevels - 1})",
                path=self.path,
                hint="choose --level auto or a smaller level",
            )
        m = min(level, len(self.stored) - 1)
        arr = self.stored[m]
        if level == m:
            return arr
        f = 2 ** (level - m)
        n = self.shapes[level]
        # Same voxels as the stored pyramid would hold: level-m voxel f*i, trimmed like build_pyramid.
        return arr[: n[0] * f : f, : n[1] * f : f, : n[2] * f : f]

    def auto_level(self, spacing_mm: float) -> int:
        """Coarsest level whose voxels are at most half of ``spacing_mm`` (level 0 if none is)."""
        best = 0
        for lev in range(self.nlevels):
            if float(self.spacing0.max()) * 2**lev <= spacing_mm / 2 * (1 + 1e-9):
                best = lev
        return best

    # -- centre ----------------------------------------------------------------------------------------------
    def centroid_mm(self, codes: Sequence[int] = HYPOTHALAMUS_CODES) -> np.ndarray:
        """World centroid (mm) of ``codes``, by an exact integer chunked reduction at a coarse level.

        Computed eagerly once per source (cached): the coarsest level with voxels <= 1 mm, or a finer one if
        the codes vanish there. Reads that level whole (a few MB for a stored pyramid; for a lazily generated
        map every chunk of level 0 is computed once -- pass ``center=`` explicitly to avoid that).
        """
        key = tuple(int(c) for c in codes)
        if key in self._centroid:
            return self._centroid[key].copy()
        start = 0
        for lev in range(self.nlevels):
            if float(self.spacing0.max()) * 2**lev <= CENTROID_SPACING_MM * (1 + 1e-9):
                start = lev
        for lev in range(start, -1, -1):
            sums = _index_sums(self.level(lev), np.asarray(key))
            if sums[0] > 0:
                ijk = sums[1:] / sums[0]
                c = self.level_affine(lev)[:3, :3] @ ijk + self.level_affine(lev)[:3, 3]
                self._centroid[key] = c
                return c.copy()
        raise HelmError(
            f"the label map has no hypothalamus labels ({key[0]}-{key[-1]}) to centre the crop on",
            path=self.path,
            hint="centre it elsewhere: --center volume or --center-mm X Y Z",
        )

    def center_mm(self, center: Any) -> np.ndarray:
        if isinstance(center, str):
            if center == "hypothalamus":
                return self.centroid_mm()
            n = np.asarray(self.shapes[0], dtype=np.float64)
            return self.affine0[:3, :3] @ ((n - 1) / 2) + self.affine0[:3, 3]
        return np.asarray(center, dtype=np.float64)


def _index_sums_block(block: np.ndarray, codes: np.ndarray, block_info=None) -> np.ndarray:
    loc = block_info[0]["array-location"]
    idx = np.nonzero(np.isin(block, codes))
    out = np.zeros((1, 1, 1, 4), dtype=np.int64)
    n = len(idx[0])
    out[0, 0, 0, 0] = n
    for d in range(3):
        # integer sums: exact, so the centroid does not depend on the chunking
        out[0, 0, 0, 1 + d] = int(idx[d].sum(dtype=np.int64)) + n * int(loc[d][0])
    return out


def _index_sums(arr: da.Array, codes: np.ndarray) -> np.ndarray:
    """``[count, sum_i, sum_j, sum_k]`` of the voxels whose value is in ``codes`` (int64, chunk by chunk)."""
    import dask.array as da

    parts = da.map_blocks(
        _index_sums_block,
        arr,
        codes=codes,
        chunks=((1,) * arr.numblocks[0], (1,) * arr.numblocks[1], (1,) * arr.numblocks[2], (4,)),
        new_axis=3,
        dtype=np.int64,
    )
    return np.asarray(parts.sum(axis=(0, 1, 2), dtype=np.int64).compute(), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# geometry of a sample
# ----------------------------------------------------------------------------------------------------------------


def _out_affine(center: np.ndarray, crop: Sequence[int], spacing_mm: float) -> np.ndarray:
    """Axis-aligned RAS+ grid of ``crop`` voxels whose centre (voxel (n-1)/2) is ``center``."""
    n = np.asarray(crop, dtype=np.float64)
    a = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    a[:3, 3] = np.asarray(center, dtype=np.float64) - spacing_mm * (n - 1) / 2
    return a


def _bspline3(t: np.ndarray) -> np.ndarray:
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
    seed: int, index: int, stream: int, lead: tuple, crop, spacing_mm: float, step_mm: float, std: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    nodes = tuple(_bspline_nodes(n, step_mm / spacing_mm) for n in crop)
    rng = np.random.default_rng((seed, index, stream))
    coef = rng.standard_normal(lead + nodes) * std
    return coef, [_bspline_weights(n, k) for n, k in zip(crop, nodes)]


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
        return int(np.prod(np.maximum(self.box_hi - self.box_lo, 0)))


def plan_sample(source: Any, params: SampleParams, config: SynthConfig | None = None) -> SamplePlan:
    """The geometry of one sample and the lazy box of the label map it needs (nothing is computed, except
    the hypothalamus centroid the first time a source is used with ``center="hypothalamus"``).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
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


# ----------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------

_SLAB_VOXELS = 1 << 20  # output voxels per coordinate slab: bounds the float64 temporaries (~50 MB)


def _source_indices(plan: SamplePlan) -> tuple[np.ndarray, np.ndarray]:
    """Rounded source voxel (``floor(x + 0.5)``) of every output voxel, as int32 ``(3, N)`` over the voxels
    that fall inside the label map, and their flat output indices (C order)."""
    nx, ny, nz = plan.crop
    lim = np.asarray(plan.level_shape)
    jj = np.arange(ny, dtype=np.float64)[None, :, None]
    kk = np.arange(nz, dtype=np.float64)[None, None, :]
    step = max(1, _SLAB_VOXELS // max(1, ny * nz))
    m, off = plan.matrix, plan.offset
    idx_parts, flat_parts = [], []
    for x0 in range(0, nx, step):
        x1 = min(nx, x0 + step)
        ii = np.arange(x0, x1, dtype=np.float64)[:, None, None]
        d = None
        if plan.deform_coef is not None:
            wx, wy, wz = plan.deform_weights
            d = _bspline_field(plan.deform_coef, (wx[x0:x1], wy, wz))
        rounded = []
        inside = np.ones((x1 - x0, ny, nz), dtype=bool)
        for a in range(3):
            # same arithmetic as scipy.ndimage.affine_transform: x = matrix @ v + offset, then floor(x + 0.5)
            c = ii * m[a, 0] + jj * m[a, 1] + kk * m[a, 2] + off[a]
            if d is not None:
                c = c + (plan.disp_matrix[a, 0] * d[0] + plan.disp_matrix[a, 1] * d[1] + plan.disp_matrix[a, 2] * d[2])
            r = np.floor(c + 0.5)
            inside &= (r >= 0) & (r < lim[a])
            rounded.append(r)
        flat = np.flatnonzero(inside)
        if flat.size:
            idx_parts.append(np.stack([r.ravel()[flat] for r in rounded]).astype(np.int32))
            flat_parts.append(flat + x0 * ny * nz)
    if not idx_parts:
        return np.zeros((3, 0), np.int32), np.zeros(0, np.int64)
    return np.concatenate(idx_parts, axis=1), np.concatenate(flat_parts)


def _take_block(block: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.asarray(block)[i, j, k]


def gather_tasks(plan: SamplePlan) -> tuple[list, list[np.ndarray], np.ndarray]:
    """The lazy label gather of a sample: one ``dask.delayed`` task per source chunk that holds at least one
    needed voxel (the chunk and the within-chunk indices in, the labels out), the output positions each task
    fills, and the output positions inside the map. Memory per task: one chunk plus its share of the output.
    """
    idx, flat = _source_indices(plan)
    if plan.box is None or flat.size == 0:
        return [], [], flat
    local = idx - plan.box_lo[:, None].astype(np.int32)
    bounds = [np.cumsum((0,) + c) for c in plan.box.chunks]
    block = [np.searchsorted(b, loc, side="right") - 1 for b, loc in zip(bounds, local)]
    bid = np.ravel_multi_index(block, plan.box.numblocks)
    order = np.argsort(bid, kind="stable")
    bid_sorted = bid[order]
    starts = np.flatnonzero(np.r_[True, bid_sorted[1:] != bid_sorted[:-1]])
    ends = np.r_[starts[1:], bid_sorted.size]
    delayed_blocks = plan.box.to_delayed(optimize_graph=True)
    tasks, positions = [], []
    for s0, s1 in zip(starts, ends):
        sel = order[s0:s1]
        b = tuple(int(blk[sel[0]]) for blk in block)
        within = [(local[a, sel] - bounds[a][b[a]]).astype(np.int32) for a in range(3)]
        tasks.append(dask.delayed(_take_block, pure=True)(delayed_blocks[b], *within))
        positions.append(flat[sel])
    return tasks, positions, flat


def _gather_labels(plan: SamplePlan, path: str | None) -> np.ndarray:
    """Nearest-neighbour labels on the output grid (``floor(x + 0.5)``, outside the map -> 0)."""
    out = np.zeros(int(np.prod(plan.crop)), dtype=np.uint16)
    tasks, positions, _ = gather_tasks(plan)
    if tasks:
        for pos, vals in zip(positions, dask.compute(*tasks)):
            out[pos] = _as_codes(vals, path)
    return out.reshape(plan.crop)


def _as_codes(vals: np.ndarray, path: str | None) -> np.ndarray:
    if vals.size == 0:
        return vals.astype(np.uint16)
    if np.issubdtype(vals.dtype, np.floating):
        if not np.all(np.isfinite(vals)) or np.any(vals != np.round(vals)):
            raise HelmError(
                "the label map has non-integer values",
                path=path,
                hint="give integer label codes (round or convert the map)",
            )
    lo, hi = vals.min(), vals.max()
    if lo < 0 or hi > _MAX_LABEL:
        raise HelmError(
            f"the label map has codes outside 0..{_MAX_LABEL} ({lo}..{hi})",
            path=path,
            hint="relabel the map to 16-bit codes",
        )
    return vals.astype(np.uint16)


def _interp_axis(arr: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``arr`` at positions ``pos`` (index units) along ``axis``, edges clamped."""
    n = arr.shape[axis]
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0, n - 1)
    if n == 1:
        return np.take(arr, np.zeros(len(pos), dtype=np.int64), axis=axis)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    w = (pos - i0).astype(arr.dtype)
    shape = [1] * arr.ndim
    shape[axis] = len(pos)
    w = w.reshape(shape)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i0 + 1, axis=axis) * w


def _simulate_acquisition(img: np.ndarray, axis: int, ratio: float, blur_factor: float) -> np.ndarray:
    """Blur along ``axis`` (sigma ``blur_factor * ratio`` voxels), sample every ``ratio`` voxels, back."""
    if ratio <= 1.0:
        return img
    n = img.shape[axis]
    import scipy.ndimage as ndi

    img = ndi.gaussian_filter1d(img, sigma=blur_factor * ratio, axis=axis, mode="nearest")
    k = int(math.floor((n - 1) / ratio)) + 1
    t = ((n - 1) - (k - 1) * ratio) / 2.0  # low-res samples centred on the axis
    low = _interp_axis(img, t + ratio * np.arange(k), axis)
    return _interp_axis(low, (np.arange(n) - t) / ratio, axis).astype(np.float32)


def _synthesize(labels: np.ndarray, params: SampleParams, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """The image of a label crop (steps 2-5 of the module docstring) and the per-label model used."""
    counts = np.bincount(labels.ravel(), minlength=1)
    present = np.nonzero(counts)[0]
    mean_lut = np.zeros(len(counts), dtype=np.float32)
    std_lut = np.zeros(len(counts), dtype=np.float32)
    model = {}
    for lab in present.tolist():
        mu, sd = label_intensity(params.seed, params.index, lab, cfg)
        mean_lut[lab], std_lut[lab] = mu, sd
        model[int(lab)] = [mu, sd]
    img = mean_lut[labels]
    if cfg.intensity_noise:
        noise = np.random.default_rng((params.seed, params.index, _STREAM_NOISE)).standard_normal(
            labels.shape, dtype=np.float32
        )
        img += std_lut[labels] * noise
    if params.bias_std > 0:
        coef, w = _grid_coefficients(
            params.seed, params.index, _STREAM_BIAS, (), cfg.crop, cfg.spacing_mm, cfg.bias_spacing_mm, params.bias_std
        )
        img *= np.exp(_bspline_field(coef, w)).astype(np.float32)
    if params.gamma != 1.0:
        img = (255.0 * (np.maximum(img, 0) / np.float32(255.0)) ** np.float32(params.gamma)).astype(np.float32)
    if params.acq_axis is not None:
        img = _simulate_acquisition(img, params.acq_axis, params.acq_spacing_mm / cfg.spacing_mm, cfg.blur_factor)
    if cfg.normalize:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)).astype(np.float32)
    return np.ascontiguousarray(img, dtype=np.float32), model


def generate_sample(
    source: Any, params: SampleParams, config: SynthConfig | None = None
) -> tuple[xr.DataArray, xr.DataArray]:
    """One synthetic ``(image, labels)`` pair, computed eagerly on its output grid.

    Parameters
    ----------
    source : DataArray, path or LabelSource
        The label map (a lazy volume, a ``.zarr`` store, a ``.nii``/``.nii.gz`` -- imported on each call, so
        open a :class:`LabelSource` once for many samples).
    params : SampleParams
        From :func:`sample_params`.
    config : SynthConfig

    Returns
    -------
    (image, labels) : two in-memory (NumPy-backed) volumes on the output grid, float32 and uint16, with the
    exact output affine; ``attrs["synth"]`` holds the params, the per-label ``(mean, std)`` and the level read.
    Only the source chunks holding a needed voxel are computed (see :func:`gather_tasks`).

    ``params`` decide which steps run (a step switched off in the config that drew them has neutral values);
    ``config`` gives the output grid, the centre, the level and the model ranges.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((30, 30, 30), np.uint16); lab[10:20, 10:20, 10:20] = 801
    >>> cfg = SynthConfig(crop=(8, 8, 8)).without_augmentation()
    >>> img, labels = generate_sample(make_volume(da.from_array(lab, chunks=10), np.eye(4), kind="labels"),
    ...                               sample_params(cfg, 0, 0), cfg)
    >>> int(labels.values.min()), labels.attrs["affine"][:3, 3].tolist()
    (801, [11.0, 11.0, 11.0])
    """
    cfg = config or SynthConfig()
    own = not isinstance(source, (LabelSource, xr.DataArray))
    src = LabelSource.open(source)
    try:
        plan = plan_sample(src, params, cfg)
        labels = _gather_labels(plan, src.path)
        image, model = _synthesize(labels, params, cfg)
    finally:
        if own:
            src.close()
    info = {
        "params": params.to_dict(),
        "intensities": {str(k): v for k, v in model.items()},
        "level": plan.level,
        "center_mm": plan.center_mm.tolist(),
        "source": src.path or src.name,
    }
    step = provenance_record("synth", dict(info, config=cfg.to_dict()))
    img_vol = make_volume(
        image,
        plan.out_affine,
        kind="image",
        name="image",
        source=src.path or src.name,
        provenance=[step],
        attrs={"synth": info},
    )
    lab_vol = make_volume(
        labels,
        plan.out_affine,
        kind="labels",
        name="labels",
        source=src.path or src.name,
        provenance=[step],
        attrs={"synth": info},
    )
    return img_vol, lab_vol


def iter_samples(
    labels: Any,
    n: int | None,
    seed: int,
    config: SynthConfig | None = None,
    *,
    start: int = 0,
    tmp_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` (``None``: endless) ``(image, labels)`` NumPy pairs for a training loop.

    Sample ``i`` is ``generate_sample(labels, sample_params(config, seed, start + i), config)``; the label map
    is opened once (a NIfTI file is imported into a temporary store, removed when the iterator ends) and the
    hypothalamus centroid computed once. No deep-learning framework is needed: wrap the arrays as you like.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((30, 30, 30), np.uint16); lab[10:20, 10:20, 10:20] = 805
    >>> vol = make_volume(da.from_array(lab, chunks=10), np.eye(4), kind="labels")
    >>> [im.shape for im, _ in iter_samples(vol, 2, seed=3, config=SynthConfig(crop=(8, 8, 8)))]
    [(8, 8, 8), (8, 8, 8)]
    """
    cfg = config or SynthConfig()
    seed, start = _check_seed(seed), _check_seed(start, "start")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise HelmError(f"n must be a non-negative integer or None, got {n!r}", hint="e.g. --n 10")
    own = not isinstance(labels, LabelSource)
    src = LabelSource.open(labels, tmp_dir=tmp_dir)
    try:
        i = 0
        while n is None or i < n:
            img, lab = generate_sample(src, sample_params(cfg, seed, start + i), cfg)
            yield img.values, lab.values
            i += 1
    finally:
        if own:
            src.close()


def write_samples(
    label_path: Any,
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    config: SynthConfig | None = None,
    *,
    start: int = 0,
    zarr: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
) -> list[dict]:
    """Write ``n`` samples as ``sample_{i:04d}_image.nii.gz`` / ``_labels.nii.gz`` (and ``.zarr``) in ``out_dir``.

    Also writes ``samples.json`` (config, and per sample its params, per-label intensities, files). A NIfTI
    label map is imported into a temporary store inside ``out_dir`` first. Returns the per-sample records.
    """
    from .io.convert import save_nifti
    from .io.store import save_volume
    from .progress import Progress

    cfg = config or SynthConfig()
    seed, start = _check_seed(seed), _check_seed(start, "start")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise HelmError(f"n must be a non-negative integer, got {n!r}", hint="e.g. --n 10")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HelmError(
            f"cannot create the output folder ({e.strerror or e})",
            path=out,
            hint="choose a folder you can write to",
            exit_code=3,
        ) from None
    manifest = out / "samples.json"
    if manifest.exists() and not overwrite:
        raise HelmError(
            "already exists", path=manifest, hint="pass --overwrite to replace it, or choose another --out", exit_code=3
        )
    records = []
    with contextlib.ExitStack() as stack:
        src = LabelSource.open(label_path, tmp_dir=out)
        if not isinstance(label_path, LabelSource):
            stack.callback(src.close)
        prog = Progress(n, "synth", quiet=quiet)
        for i in range(start, start + n):
            params = sample_params(cfg, seed, i)
            img, lab = generate_sample(src, params, cfg)
            rec = {
                "index": i,
                "params": params.to_dict(),
                "intensities": img.attrs["synth"]["intensities"],
                "level": img.attrs["synth"]["level"],
                "center_mm": img.attrs["synth"]["center_mm"],
            }
            for what, vol in (("image", img), ("labels", lab)):
                rec[what] = save_nifti(vol, out / f"sample_{i:04d}_{what}.nii.gz", overwrite=overwrite)
                if zarr:
                    rec[f"{what}_zarr"] = save_volume(vol, out / f"sample_{i:04d}_{what}.zarr", overwrite=overwrite)
            records.append(rec)
            prog.update(1)
        prog.close()
    doc = {
        "source": os.fspath(label_path)
        if not isinstance(label_path, (xr.DataArray, LabelSource))
        else str(getattr(label_path, "name", "")),
        "seed": seed,
        "config": cfg.to_dict(),
        "samples": records,
    }
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, manifest)
    return records


# ----------------------------------------------------------------------------------------------------------------
# command line (hooked into helm_dask.cli by add_synth_parser)
# ----------------------------------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _level_arg(text: str):
    import argparse

    if text == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"level is 'auto' or an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"level is 'auto' or an integer >= 0, got {text!r}")
    return v


def add_synth_parser(subparsers, common_parents, add_compute_options):
    """Add the ``synth`` sub-command to the ``helm-dask`` parser (``subparsers`` from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "synth",
        parents=list(common_parents),
        help="SynthSeg-style synthetic (image, labels) pairs from a label map",
        description="Write N synthetic (image, labels) pairs generated from LABEL_MAP (NIfTI or .zarr): random "
        "affine + smooth deformation, per-label Gaussian intensities, bias field, gamma and a "
        "simulated low-resolution acquisition, cropped around the hypothalamus. Same --seed, same "
        "samples.",
    )
    p.add_argument("label_map", metavar="LABEL_MAP", help="a .nii/.nii.gz label map or a helm-dask .zarr store")
    p.add_argument("--n", type=int, default=10, help="number of samples (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="index of the first sample (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--spacing", type=_positive, default=1.0, metavar="MM", help="output voxel size (default 1.0)")
    p.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=(96, 96, 96),
        metavar=("X", "Y", "Z"),
        help="output size in voxels (default 96 96 96)",
    )
    p.add_argument(
        "--center",
        choices=["hypothalamus", "volume"],
        default="hypothalamus",
        help="crop centre: the hypothalamus (codes 801-810, default) or the map's centre",
    )
    p.add_argument(
        "--center-mm",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="crop centre as a world point (RAS+ mm); overrides --center",
    )
    p.add_argument(
        "--level",
        type=_level_arg,
        default="auto",
        help="pyramid level to read the labels at (default auto: voxels <= spacing/2; 0 is exact)",
    )
    p.add_argument("--zarr", action="store_true", help="also write each sample as .zarr stores")
    p.add_argument("--normalize", action="store_true", help="rescale every image to [0, 1]")
    g = p.add_argument_group("augmentations (all on by default)")
    for flag, what in (
        ("affine", "rotation, scaling and shear"),
        ("deformation", "the smooth non-linear deformation"),
        ("bias", "the bias field"),
        ("gamma", "the gamma augmentation"),
        ("acquisition", "the simulated low-resolution acquisition"),
    ):
        g.add_argument(f"--no-{flag}", action="store_true", help=f"switch off {what}")
    g.add_argument("--no-augmentation", action="store_true", help="switch all of the above off")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_compute_options(p)
    p.set_defaults(func=cmd_synth)
    return p


def config_from_args(args) -> SynthConfig:
    off = getattr(args, "no_augmentation", False)
    return SynthConfig(
        crop=tuple(args.crop),
        spacing_mm=args.spacing,
        center=tuple(args.center_mm) if args.center_mm else args.center,
        level=args.level,
        affine=not (off or args.no_affine),
        deformation=not (off or args.no_deformation),
        bias=not (off or args.no_bias),
        gamma=not (off or args.no_gamma),
        acquisition=not (off or args.no_acquisition),
        normalize=args.normalize,
    )


def cmd_synth(args) -> int:
    """``helm-dask synth``: write the samples, print where they went."""
    from .cluster import ClusterOptions, compute_context

    cfg = config_from_args(args)
    opts = ClusterOptions.from_args(args)  # TLS and every other compute option, as for the other commands
    with compute_context(opts):
        records = write_samples(
            args.label_map,
            args.out,
            args.n,
            args.seed,
            cfg,
            start=args.start,
            zarr=args.zarr,
            overwrite=args.overwrite,
            quiet=getattr(args, "quiet", False),
        )
    if not getattr(args, "quiet", False):
        print(f"wrote {len(records)} sample(s) to {args.out} (samples.json lists their parameters)", flush=True)
    return 0
