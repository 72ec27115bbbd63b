"""The image of a label crop: per-label Gaussian intensities, bias field, gamma and simulated acquisition."""

from __future__ import annotations

import math

import numpy as np

from .bspline import _bspline_field, _grid_coefficients
from .config import SynthConfig
from .params import _STREAM_BIAS, _STREAM_INTENSITY, _STREAM_NOISE, SampleParams


def label_intensity(seed: int, index: int, label: int, config: SynthConfig | None = None) -> tuple[float, float]:
    """``(mean, std)`` of label ``label`` in sample ``(seed, index)``: U(mean_range), U(std_range).

    Drawn from the stream ``(seed, index, intensity, label)``: a label gets the same model within a sample
    whatever else is in the crop.

    Parameters
    ----------
    seed, index : int
        The run's seed and the sample's number.
    label : int
        The label code.
    config : SynthConfig, optional
        ``mean_range``, ``std_range`` and ``intensity_noise`` (off: the standard deviation is 0).

    Returns
    -------
    (float, float)
        The mean and the standard deviation of the label's Gaussian intensities.

    Example
    -------
    >>> mu, sd = label_intensity(0, 0, 801)
    >>> 0 <= mu <= 255 and 0 <= sd <= 35, label_intensity(0, 0, 801) == (mu, sd)
    (True, True)
    """
    cfg = config or SynthConfig()
    rng = np.random.default_rng((int(seed), int(index), _STREAM_INTENSITY, int(label)))
    mean = rng.uniform(*cfg.mean_range)
    std = rng.uniform(*cfg.std_range)
    return float(mean), float(std) if cfg.intensity_noise else 0.0


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
    """The image of a label crop (steps 2-5 in ``docs/method/synth.md``) and the per-label model used."""
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
        assert params.acq_spacing_mm is not None  # drawn with acq_axis
        img = _simulate_acquisition(img, params.acq_axis, params.acq_spacing_mm / cfg.spacing_mm, cfg.blur_factor)
    if cfg.normalize:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)).astype(np.float32)
    return np.ascontiguousarray(img, dtype=np.float32), model
